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

use std::time::Duration;

use crate::App;
use crate::plugins::world::{Answer, RecordedRequest, answer_like};
use crate::plugins::{Compared, DeliveryRequest, LoadedPlugin, Outcome, PluginError, Status};
use crate::store::ShadowComparison;
use crate::telemetry::ShadowLabels;

/// Differences kept per comparison.
const MAX_DIFFERENCES: usize = 10;
/// Characters of each body shown around the first difference.
const BODY_CONTEXT: usize = 60;
/// Longest a candidate may run (its answers come at once): the live job
/// waits for it before it is settled.
const BUDGET: Duration = Duration::from_secs(2);

/// What an outcome is called in the attempt log.
pub fn outcome_name(result: &Result<Outcome, PluginError>) -> &'static str {
    match result {
        Ok(Outcome::Delivered { .. }) => "delivered",
        Ok(Outcome::Retryable { .. }) => "retryable",
        Ok(Outcome::Permanent { .. }) => "permanent",
        Err(_) => "plugin_error",
    }
}

/// An outcome's status, reason and name, for comparing.
fn outcome_summary(result: &Result<Outcome, PluginError>) -> (&'static str, Option<u16>, String) {
    let (status, reason) = match result {
        Ok(delivered @ Outcome::Delivered { .. }) => (delivered.status(), String::new()),
        Ok(failed) => (failed.status(), failed.text().to_string()),
        Err(e) => (None, e.to_string()),
    };
    (outcome_name(result), status, reason)
}

/// Run `candidate` for the delivery `req` that `live` made (with `result`
/// and `live_requests`), and compare the two.
pub async fn compare(
    app: &App,
    live: &LoadedPlugin,
    candidate: &LoadedPlugin,
    req: DeliveryRequest<'_>,
    result: &Result<Outcome, PluginError>,
    live_requests: &[RecordedRequest],
) -> ShadowComparison {
    // Each of its requests gets what the live request in the same place got.
    let answers: Vec<Answer> = live_requests
        .iter()
        .map(|r| answer_like(r.denied.as_deref(), r.response_status, r.response_excerpt.as_deref(), r.error.as_deref()))
        .collect();
    let (shadow_result, requests) =
        match tokio::time::timeout(BUDGET, candidate.deliver_with(req, Compared::Shadow(answers))).await {
            Ok(ran) => ran,
            Err(_) => (
                Err(PluginError::TimeLimit {
                    plugin: candidate.name().to_string(),
                    limit_ms: BUDGET.as_millis() as u64,
                }),
                Vec::new(),
            ),
        };
    // Either plugin's secrets may show in a difference: both redact, before
    // any excerpt is cut around one.
    let redact = |text: &str| live.config.redact_excerpt(&candidate.config.redact_excerpt(text));
    let mut differences = Vec::new();
    let (live_outcome, candidate_outcome) = (outcome_summary(result), outcome_summary(&shadow_result));
    if (live_outcome.0, live_outcome.1) != (candidate_outcome.0, candidate_outcome.1) {
        let (name, status, reason) = candidate_outcome.clone();
        differences.push(redact(&format!(
            "outcome: live {} (status {}), candidate {name} (status {}): {reason}",
            live_outcome.0,
            Status(live_outcome.1),
            Status(status)
        )));
    }
    differences.extend(self::differences(live_requests, &requests, &redact));
    differences.truncate(MAX_DIFFERENCES);
    let matched = differences.is_empty();
    let labels = ShadowLabels { destination: live.name().to_string(), candidate: candidate.name().to_string() };
    app.metrics.shadow_comparisons.get_or_create(&labels).inc();
    if !matched {
        app.metrics.shadow_mismatches.get_or_create(&labels).inc();
        // Differences quote request bodies: they stay on the receipt, whose
        // retention purges them, not in the log.
        tracing::warn!(candidate = %candidate.name(), differences = differences.len(), "shadow candidate differs from the live version");
    }
    ShadowComparison {
        candidate: candidate.name().to_string(),
        version: candidate.manifest.version.clone(),
        digest: candidate.digest.clone(),
        matched,
        differences,
        outcome: candidate_outcome.0.to_string(),
    }
}

/// How the candidate's requests differ from the live ones, in order; URLs
/// and bodies shown as `redact` leaves them.
fn differences(
    live: &[RecordedRequest],
    candidate: &[RecordedRequest],
    redact: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    if live.len() != candidate.len() {
        out.push(format!("requests: the live version made {}, the candidate {}", live.len(), candidate.len()));
    }
    for (n, (l, c)) in live.iter().zip(candidate).enumerate().map(|(i, pair)| (i + 1, pair)) {
        if l.method != c.method {
            out.push(format!("request {n} method: live {}, candidate {}", l.method, c.method));
        }
        if l.url != c.url {
            out.push(format!("request {n} URL: live {}, candidate {}", redact(&l.url), redact(&c.url)));
        }
        match (&l.denied, &c.denied) {
            (None, Some(why)) => out.push(format!("request {n}: the host refused the candidate's: {}", redact(why))),
            (Some(why), None) => out.push(format!("request {n}: the host refused the live version's: {}", redact(why))),
            _ => {}
        }
        let headers = header_differences(&l.headers, &c.headers);
        if !headers.is_empty() {
            out.push(format!("request {n} headers (values not shown): {}", headers.join(", ")));
        }
        if l.body_sha256 != c.body_sha256 {
            out.push(body_difference(n, &redact(&l.body), &redact(&c.body), l.body_bytes, c.body_bytes));
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

/// Where two bodies part, shown from their (redacted) excerpts.
fn body_difference(n: usize, live: &str, candidate: &str, live_bytes: usize, candidate_bytes: usize) -> String {
    if live == candidate {
        return format!("request {n} body differs past the part kept ({live_bytes} and {candidate_bytes} bytes)");
    }
    let at = live.chars().zip(candidate.chars()).take_while(|(a, b)| a == b).count();
    let around =
        |body: &str| body.chars().skip(at.saturating_sub(BODY_CONTEXT / 2)).take(BODY_CONTEXT).collect::<String>();
    format!("request {n} body differs at character {at}: live …{}…, candidate …{}…", around(live), around(candidate))
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
            body_sha256: crate::plugins::world::digest(body.as_bytes()),
            denied: None,
            response_status: Some(200),
            response_excerpt: None,
            error: None,
        }
    }

    fn shown(text: &str) -> String {
        text.to_string()
    }

    #[test]
    fn the_same_requests_do_not_differ() {
        let a = request("https://graph.example/v21.0/1/events", &[("content-type", "application/json")], "{\"a\":1}");
        assert!(differences(std::slice::from_ref(&a), std::slice::from_ref(&a), &shown).is_empty());
    }

    #[test]
    fn differences_name_the_url_headers_and_where_bodies_part() {
        let live =
            request("https://x.test/v21.0/e", &[("api-key", "k1"), ("x-a", "1")], "{\"value\":100,\"c\":\"USD\"}");
        let candidate =
            request("https://x.test/v22.0/e", &[("api-key", "k2"), ("x-b", "1")], "{\"value\":101,\"c\":\"USD\"}");
        let found = differences(&[live], &[candidate], &shown);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], "request 1 URL: live https://x.test/v21.0/e, candidate https://x.test/v22.0/e");
        assert_eq!(found[1], "request 1 headers (values not shown): ~api-key, -x-a, +x-b");
        assert!(found[2].starts_with("request 1 body differs at character 11:"), "{}", found[2]);
        assert!(found[2].contains("100") && found[2].contains("101"), "{}", found[2]);
    }

    #[test]
    fn a_secret_beside_the_first_difference_shows_none_of_it() {
        let secret = "EAAB0123456789abcdefghijklmnopqrstuvwxyz";
        let live = request("https://x.test/e", &[], &format!("{{\"access_token\":\"{secret}\",\"a\":1}}"));
        let candidate = request("https://x.test/e", &[], &format!("{{\"access_token\":\"{secret}\",\"a\":2}}"));
        let config = crate::plugins::manifest::ResolvedConfig { secrets: vec![secret.into()], ..Default::default() };
        let found = differences(&[live], &[candidate], &|t: &str| config.redact_excerpt(t)).join(" ");
        assert!(found.contains("«redacted»"), "{found}");
        // Not even a slice of it: the window is cut after redacting.
        assert!(!found.contains(&secret[secret.len() - 12..]), "{found}");
    }

    #[test]
    fn a_missing_or_refused_request_is_reported() {
        let a = request("https://x.test/e", &[], "{}");
        assert_eq!(
            differences(&[a.clone(), a.clone()], std::slice::from_ref(&a), &shown),
            ["requests: the live version made 2, the candidate 1"]
        );
        let refused = RecordedRequest { denied: Some("not allowed".into()), ..a.clone() };
        assert_eq!(
            differences(std::slice::from_ref(&a), std::slice::from_ref(&refused), &shown),
            ["request 1: the host refused the candidate's: not allowed"]
        );
        assert_eq!(
            differences(&[refused], &[a], &shown),
            ["request 1: the host refused the live version's: not allowed"]
        );
    }
}
