//! Shadow mode: a candidate version of a destination (a plugin folder whose
//! manifest says `shadow_of = "meta-capi"`) runs beside every attempt of the
//! live plugin, on the same event and context, with the live plugin's
//! grants. Its requests are never sent: each is answered with what the
//! live version's request in the same place got. They are compared with the
//! live version's (method, URL, headers, the whole body by digest) and so
//! are the outcomes; the comparison goes on the attempt's log in the
//! receipt, and into `crm_shadow_comparisons_total` and
//! `crm_shadow_mismatches_total`. The candidate is promoted by replacing the
//! live folder with it (hot swap does the rest) and removing its own.

use std::collections::VecDeque;

use crate::App;
use crate::plugins::world::{Answer, RecordedRequest};
use crate::plugins::{DeliveryRequest, LoadedPlugin, Outcome, PluginError};
use crate::store::ShadowComparison;
use crate::telemetry::ShadowLabels;

/// Differences kept per comparison.
const MAX_DIFFERENCES: usize = 10;
/// Characters of each body shown around the first difference.
const BODY_CONTEXT: usize = 60;

/// What an outcome is called in the attempt log.
pub fn outcome_name(result: &Result<Outcome, PluginError>) -> &'static str {
    match result {
        Ok(Outcome::Delivered { .. }) => "delivered",
        Ok(Outcome::Retryable { .. }) => "retryable",
        Ok(Outcome::Permanent { .. }) => "permanent",
        Err(_) => "plugin_error",
    }
}

/// Run `candidate` for the delivery `req` that `live` made (with
/// `live_outcome` and `live_requests`), and compare the two.
pub async fn compare(
    app: &App,
    live: &LoadedPlugin,
    candidate: &LoadedPlugin,
    req: DeliveryRequest<'_>,
    live_outcome: &str,
    live_requests: &[RecordedRequest],
) -> ShadowComparison {
    // A denied request got no answer, live or not: it takes none.
    let answers: VecDeque<Answer> = live_requests
        .iter()
        .filter(|r| r.denied.is_none())
        .map(|r| match r.response_status {
            Some(status) => Ok((status, r.response_excerpt.clone().unwrap_or_default().into_bytes())),
            None => Err(r.error.clone().unwrap_or_else(|| "no answer".into())),
        })
        .collect();
    let (result, requests) = candidate.shadow(req, answers).await;
    let outcome = outcome_name(&result);
    let mut differences = differences(live_requests, &requests);
    if outcome != live_outcome {
        let why = match &result {
            Ok(Outcome::Delivered { .. }) => String::new(),
            Ok(Outcome::Retryable { reason, .. } | Outcome::Permanent { reason, .. }) => format!(": {reason}"),
            Err(e) => format!(": {e}"),
        };
        differences.push(format!("outcome: live {live_outcome}, candidate {outcome}{why}"));
    }
    // Either plugin's secrets may show in a difference.
    let differences: Vec<String> = differences
        .iter()
        .take(MAX_DIFFERENCES)
        .map(|d| live.config.redact_excerpt(&candidate.config.redact_excerpt(d)))
        .collect();
    let matched = differences.is_empty();
    let labels = ShadowLabels { destination: live.name().to_string(), candidate: candidate.name().to_string() };
    app.metrics.shadow_comparisons.get_or_create(&labels).inc();
    if !matched {
        app.metrics.shadow_mismatches.get_or_create(&labels).inc();
        tracing::warn!(candidate = %candidate.name(), differences = ?differences, "shadow candidate differs from the live version");
    }
    ShadowComparison {
        candidate: candidate.name().to_string(),
        version: candidate.manifest.version.clone(),
        digest: candidate.digest.clone(),
        matched,
        differences,
        outcome: outcome.to_string(),
    }
}

/// How the candidate's requests differ from the live ones, in order.
fn differences(live: &[RecordedRequest], candidate: &[RecordedRequest]) -> Vec<String> {
    let mut out = Vec::new();
    if live.len() != candidate.len() {
        out.push(format!("requests: the live version made {}, the candidate {}", live.len(), candidate.len()));
    }
    for (n, (l, c)) in live.iter().zip(candidate).enumerate().map(|(i, pair)| (i + 1, pair)) {
        if l.method != c.method {
            out.push(format!("request {n} method: live {}, candidate {}", l.method, c.method));
        }
        if l.url != c.url {
            out.push(format!("request {n} URL: live {}, candidate {}", l.url, c.url));
        }
        if let (None, Some(why)) = (&l.denied, &c.denied) {
            out.push(format!("request {n}: the host refused the candidate's: {why}"));
        }
        let headers = header_differences(&l.headers, &c.headers);
        if !headers.is_empty() {
            out.push(format!("request {n} headers (values not shown): {}", headers.join(", ")));
        }
        if l.body_sha256 != c.body_sha256 {
            out.push(body_difference(n, l, c));
        }
    }
    out
}

/// Header names only in the live request (`-name`), only in the candidate's
/// (`+name`), or with other values (`~name`).
fn header_differences(live: &[(String, String)], candidate: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = live.iter().chain(candidate).map(|(n, _)| n.to_ascii_lowercase()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| match (values_of(live, &name), values_of(candidate, &name)) {
            (l, c) if l == c => None,
            (_, c) if c.is_empty() => Some(format!("-{name}")),
            (l, _) if l.is_empty() => Some(format!("+{name}")),
            _ => Some(format!("~{name}")),
        })
        .collect()
}

/// The values of header `name` (lower-case), sorted.
fn values_of<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    let mut values: Vec<&str> =
        headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
    values.sort();
    values
}

/// Where two bodies part, shown from their excerpts.
fn body_difference(n: usize, live: &RecordedRequest, candidate: &RecordedRequest) -> String {
    let at = live.body.chars().zip(candidate.body.chars()).take_while(|(a, b)| a == b).count();
    let same_excerpts = live.body == candidate.body;
    if same_excerpts {
        return format!(
            "request {n} body differs past the part kept ({} and {} bytes)",
            live.body_bytes, candidate.body_bytes
        );
    }
    let around =
        |body: &str| body.chars().skip(at.saturating_sub(BODY_CONTEXT / 2)).take(BODY_CONTEXT).collect::<String>();
    format!(
        "request {n} body differs at character {at}: live …{}…, candidate …{}…",
        around(&live.body),
        around(&candidate.body)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(url: &str, headers: &[(&str, &str)], body: &str) -> RecordedRequest {
        RecordedRequest {
            method: "POST".into(),
            url: url.into(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            body: body.into(),
            body_bytes: body.len(),
            body_sha256: crate::plugins::engine::hex(&<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes())),
            denied: None,
            response_status: Some(200),
            response_excerpt: None,
            error: None,
        }
    }

    #[test]
    fn the_same_requests_do_not_differ() {
        let a = request("https://graph.example/v21.0/1/events", &[("content-type", "application/json")], "{\"a\":1}");
        assert!(differences(std::slice::from_ref(&a), std::slice::from_ref(&a)).is_empty());
    }

    #[test]
    fn differences_name_the_url_headers_and_where_bodies_part_but_no_header_values() {
        let live =
            request("https://x.test/v21.0/e", &[("api-key", "s3cret"), ("x-a", "1")], "{\"value\":100,\"c\":\"USD\"}");
        let candidate =
            request("https://x.test/v22.0/e", &[("api-key", "other"), ("x-b", "1")], "{\"value\":101,\"c\":\"USD\"}");
        let found = differences(&[live], &[candidate]);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], "request 1 URL: live https://x.test/v21.0/e, candidate https://x.test/v22.0/e");
        assert_eq!(found[1], "request 1 headers (values not shown): ~api-key, -x-a, +x-b");
        assert!(found[2].starts_with("request 1 body differs at character 11:"), "{}", found[2]);
        assert!(found[2].contains("100") && found[2].contains("101"), "{}", found[2]);
        assert!(!found.join(" ").contains("s3cret"));
    }

    #[test]
    fn a_missing_request_is_counted() {
        let a = request("https://x.test/e", &[], "{}");
        assert_eq!(differences(&[a.clone(), a.clone()], &[a]), ["requests: the live version made 2, the candidate 1"]);
    }
}
