//! `plugin test` (also `plugin run`): run a plugin against a payload file
//! and show exactly what it would do, sending nothing.
//!
//! A source plugin prints the normalized event (or the 400 the API would
//! answer). A destination plugin is fed the event parsed by a source plugin,
//! for the action(s) the routing table (or `--action`) gives it; every HTTP
//! request it makes is recorded and answered from a script instead of being
//! sent: one answer per attempt (status, headers, body, or a transport
//! failure), a retryable outcome going on to the next attempt. The plugin's
//! log lines are shown. Secrets are redacted unless asked otherwise; required
//! settings that are not set get a visible placeholder (an origin, for a
//! URL the allow-list names).
//!
//! `replay` runs a stored receipt's actions through a candidate folder and
//! shows how its requests differ from what the live version sent.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::Environment;
use crate::event::Event;
use crate::plugins::grants::PluginEnv;
use crate::plugins::manifest::{Format, Manifest};
use crate::plugins::world::{
    Answer, BODY_EXCERPT_BYTES, HttpMode, LogLine, RecordedRequest, Reply, answer_like, excerpt,
};
use crate::plugins::{
    Compared, DeliveryRequest, EngineOptions, IncomingRequest, Kind, LoadedPlugin, Outcome, ParseFailure, PluginEngine,
    Status, plugin_folders,
};
use crate::queue::idempotency_key;
use crate::routing::Routes;
use crate::store::Receipt;
use crate::worker::shadow::outcome_name;

/// What to run.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub plugins_dir: PathBuf,
    /// A plugin name (looked up in `plugins_dir`) or a plugin folder.
    pub plugin: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// What the service's `BASE_URL` would be: the request's URL starts so.
    pub base_url: String,
    /// The source plugin that parses the payload for a destination.
    pub source: String,
    /// Run this action instead of the routed ones.
    pub action: Option<String>,
    pub routes: Routes,
    /// One answer per attempt, in order (`Reply`, or a transport failure).
    pub answers: Vec<Answer>,
    /// The first attempt's number.
    pub attempt: u32,
    pub show_secrets: bool,
}

/// A scripted answer as `--answers` gives it: `{"status": 429, "headers":
/// {"Retry-After": "2"}, "body": "…" or any JSON}`, or `{"error": "…"}` for
/// a transport failure.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedAnswer {
    status: Option<u16>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: Option<serde_json::Value>,
    error: Option<String>,
}

/// Read `--answers`: a JSON list of answers, inline or in a file.
pub fn parse_answers(spec: &str) -> anyhow::Result<Vec<Answer>> {
    let text = if spec.trim_start().starts_with('[') {
        spec.to_string()
    } else {
        std::fs::read_to_string(spec).with_context(|| format!("cannot read --answers {spec}"))?
    };
    let script: Vec<ScriptedAnswer> = serde_json::from_str(&text).context(
        "--answers must be a JSON list such as [{\"status\": 429, \"headers\": {\"Retry-After\": \"2\"}}, \
         {\"status\": 200, \"body\": {}}, {\"error\": \"connection refused\"}]",
    )?;
    if script.is_empty() {
        bail!("--answers is empty: give at least one answer");
    }
    script
        .into_iter()
        .enumerate()
        .map(|(n, a)| match (a.status, a.error) {
            (Some(status), None) => Ok(Ok(Reply {
                status,
                headers: a.headers.into_iter().collect(),
                body: match a.body {
                    Some(serde_json::Value::String(text)) => text.into_bytes(),
                    Some(json) => json.to_string().into_bytes(),
                    None => Vec::new(),
                },
            })),
            (None, Some(error)) => Ok(Err(error)),
            _ => bail!("--answers, answer {}: give either \"status\" or \"error\"", n + 1),
        })
        .collect()
}

/// Find a plugin folder by name or path.
pub fn find_plugin(plugins_dir: &Path, plugin: &str) -> anyhow::Result<PathBuf> {
    let as_path = PathBuf::from(plugin);
    if as_path.join("plugin.toml").is_file() {
        return Ok(as_path);
    }
    for folder in plugin_folders(plugins_dir) {
        if Manifest::load(&folder).is_ok_and(|m| m.name == plugin) {
            return Ok(folder);
        }
    }
    if crate::plugins::bundled::names().contains(&plugin) {
        // Built into the binary: written out, for this run, in a temporary
        // folder of its own (private to this user), where the dry run can
        // load it.
        let out = tempfile::Builder::new().prefix("crm-event-handler-bundled-").tempdir()?.keep();
        crate::plugins::bundled::write_out(&out).with_context(|| format!("cannot write out {}", out.display()))?;
        return Ok(out.join(plugin));
    }
    bail!("no plugin named {plugin:?} in {} (and no plugin.toml in a folder of that name)", plugins_dir.display())
}

/// The environment with a placeholder for every unset variable the plugin
/// needs: a required one, or one whose URL the allow-list names (that one
/// gets an origin that resolves nowhere); a note for each.
fn with_placeholders(dir: &Path, env: &PluginEnv, notes: &mut Vec<String>) -> anyhow::Result<PluginEnv> {
    let manifest = Manifest::load(dir)?;
    let resolved = manifest.resolve_config(env)?;
    let mut vars: HashMap<String, String> = HashMap::new();
    for (key, c) in &manifest.config {
        let Some(var) = &c.env else { continue };
        let in_allow_list = manifest.allowed_outbound_hosts.iter().any(|h| *h == format!("{{{key}}}"));
        if resolved.values.contains_key(key) || !(c.required || in_allow_list) {
            continue;
        }
        let placeholder = if in_allow_list || c.format == Some(Format::Url) {
            let origin = format!("https://{}.placeholder.invalid", var.to_lowercase().replace('_', "-"));
            notes.push(format!("{var} is not set; using the placeholder origin {origin}"));
            origin
        } else {
            notes.push(format!("{var} is not set; using the placeholder <{var}>"));
            format!("<{var}>")
        };
        vars.insert(var.clone(), placeholder);
    }
    Ok(env.with_placeholders(vars))
}

fn load(
    engine: &PluginEngine,
    dir: &Path,
    env: &PluginEnv,
    mode: HttpMode,
    notes: &mut Vec<String>,
) -> anyhow::Result<LoadedPlugin> {
    let env = with_placeholders(dir, env, notes)?;
    Ok(engine.load(dir, &env, Some(mode))?)
}

/// Run it and return the report to print.
pub async fn run(opts: &DryRun, env: &Environment) -> anyhow::Result<String> {
    let env = &PluginEnv::from_environment(env).map_err(|e| anyhow::anyhow!(e))?;
    let engine = PluginEngine::new(EngineOptions::default())?;
    let mode = HttpMode::Record;
    let mut notes = Vec::new();
    let dir = find_plugin(&opts.plugins_dir, &opts.plugin)?;
    let plugin = load(&engine, &dir, env, mode.clone(), &mut notes)?;
    let mut out = String::new();

    let source = match plugin.manifest.kind {
        Kind::Source => &plugin,
        Kind::Destination => {
            let source_dir = find_plugin(&opts.plugins_dir, &opts.source).context("the --source plugin")?;
            &load(&engine, &source_dir, env, mode, &mut notes)?
        }
    };
    let received_at_ms = crate::store::now_ms();
    let request = IncomingRequest {
        method: "POST".into(),
        url: format!("{}/api/v1/webhook/{}", opts.base_url.trim_end_matches('/'), source.name()),
        headers: opts.headers.clone(),
        body: opts.payload.clone(),
        received_at_ms,
    };
    // A source that enriches gets the first answer.
    let (parsed, trace) = source.parse_traced(&request, opts.answers.first().cloned().into_iter().collect()).await;
    if !trace.requests.is_empty() {
        writeln!(out, "== {} made {} request(s), none sent", source.name(), trace.requests.len())?;
        for r in &trace.requests {
            writeln!(out, "{}", shown(source, &render_request(r), opts.show_secrets))?;
        }
    }
    write_logs(&mut out, source, &trace.logs, opts.show_secrets)?;
    let events = match parsed? {
        Ok(events) => events,
        Err(failure) => {
            let status = match failure {
                ParseFailure::Unauthenticated(_) => 401,
                ParseFailure::Unavailable(_) => 503,
                _ => 400,
            };
            writeln!(
                out,
                "{} rejected the payload (the API would answer {status}): {}: {failure}",
                source.name(),
                failure.code()
            )?;
            return Ok(out);
        }
    };
    let events: Vec<Event> = events.into_iter().map(|e| Event { received_at: received_at_ms / 1000, ..e }).collect();

    if plugin.manifest.kind == Kind::Source {
        match events.as_slice() {
            [one] => writeln!(
                out,
                "{} parsed the payload into this event:\n{}",
                plugin.name(),
                serde_json::to_string_pretty(one)?
            )?,
            all => writeln!(
                out,
                "{} parsed the payload into {} events:\n{}",
                plugin.name(),
                all.len(),
                serde_json::to_string_pretty(all)?
            )?,
        }
        return Ok(with_notes(out, &notes));
    }

    for event in &events {
        let actions: Vec<(String, Vec<(String, String)>)> = match &opts.action {
            Some(a) => vec![(a.clone(), Vec::new())],
            None => opts
                .routes
                .actions_for(source.name(), &event.status)
                .into_iter()
                .filter(|a| a.destination == plugin.name())
                .map(|a| (a.action, a.params.into_iter().collect()))
                .collect(),
        };
        if actions.is_empty() {
            writeln!(
                out,
                "The routing table sends nothing to {} for status {:?} (deal {}); pass --action NAME to run one anyway.",
                plugin.name(),
                event.status,
                event.reference
            )?;
        }
        for (action, params) in actions {
            describe_delivery(&mut out, &plugin, source.name(), event, &action, &params, opts).await?;
        }
    }
    Ok(with_notes(out, &notes))
}

/// Run one action, an attempt per scripted answer while the outcome is
/// retryable, and describe each attempt.
async fn describe_delivery(
    out: &mut String,
    plugin: &LoadedPlugin,
    provider: &str,
    event: &Event,
    action: &str,
    params: &[(String, String)],
    opts: &DryRun,
) -> anyhow::Result<()> {
    let key = idempotency_key(provider, &event.reference, &event.status_key(), plugin.name(), action);
    for (n, answer) in opts.answers.iter().enumerate() {
        let attempt = opts.attempt.saturating_add(n as u32);
        let request =
            DeliveryRequest { event, action, params, receipt_id: "dry-run", provider, attempt, idempotency_key: &key };
        let (result, trace) = plugin.deliver_traced(request, Compared::Scripted(vec![answer.clone()])).await;
        writeln!(
            out,
            "== {} action {action:?}, attempt {attempt}: {} request(s), none sent",
            plugin.name(),
            trace.requests.len()
        )?;
        for r in &trace.requests {
            writeln!(out, "{}", shown(plugin, &render_request(r), opts.show_secrets))?;
        }
        write_logs(out, plugin, &trace.logs, opts.show_secrets)?;
        let given = match answer {
            Ok(reply) => format!("a {} answer", reply.status),
            Err(error) => format!("a transport failure ({error})"),
        };
        let (outcome, again) = match result {
            Ok(Outcome::Delivered { detail, .. }) => (format!("delivered ({detail})"), false),
            Ok(Outcome::Retryable { reason, retry_after, .. }) => {
                let after = retry_after.map(|d| format!(" no sooner than {} ms,", d.as_millis())).unwrap_or_default();
                (format!("retryable failure: {reason}; the host would try again{after} with its backoff"), true)
            }
            Ok(Outcome::Permanent { reason, .. }) => (format!("permanent failure: {reason}; dead-lettered"), false),
            Err(e) => (format!("plugin error: {e}; retried like a retryable failure"), true),
        };
        writeln!(out, "-- outcome, given {given}: {}\n", shown(plugin, &outcome, opts.show_secrets))?;
        if !again {
            if n + 1 < opts.answers.len() {
                writeln!(out, "(answers {} and on are not used: no attempt follows)\n", n + 2)?;
            }
            break;
        }
    }
    Ok(())
}

/// `text` with the plugin's secrets redacted, unless asked otherwise.
fn shown(plugin: &LoadedPlugin, text: &str, show_secrets: bool) -> String {
    if show_secrets { text.to_string() } else { plugin.config.redact(text) }
}

fn write_logs(out: &mut String, plugin: &LoadedPlugin, logs: &[LogLine], show_secrets: bool) -> std::fmt::Result {
    for line in logs {
        writeln!(out, "log {} {}: {}", line.level, plugin.name(), shown(plugin, &line.message, show_secrets))?;
    }
    Ok(())
}

/// A request as an HTTP message, JSON bodies pretty-printed.
pub fn render_request(r: &RecordedRequest) -> String {
    let mut s = format!("{} {}\n", r.method, r.url);
    for (n, v) in &r.headers {
        s.push_str(&format!("{n}: {v}\n"));
    }
    if let Some(why) = &r.denied {
        s.push_str(&format!("(refused by the host: {why})\n"));
    }
    if !r.body.is_empty() {
        let body = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| r.body.clone());
        s.push('\n');
        s.push_str(&body);
        s.push('\n');
    }
    s
}

fn with_notes(mut out: String, notes: &[String]) -> String {
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

/// Replay `receipt`'s actions for the destination of the plugin in `dir`
/// (a candidate's `shadow_of`, else its own name) through that folder:
/// each action's latest logged attempt, with the same attempt number and
/// idempotency key, its requests answered as the live version's were. The
/// report says how its requests and outcome differ from what was sent.
pub async fn replay(
    dir: &Path,
    receipt: &Receipt,
    action: Option<&str>,
    show_secrets: bool,
    env: &Environment,
) -> anyhow::Result<String> {
    let env = &PluginEnv::from_environment(env).map_err(|e| anyhow::anyhow!(e))?;
    let engine = PluginEngine::new(EngineOptions::default())?;
    let mut notes = Vec::new();
    let plugin = load(&engine, dir, env, HttpMode::Record, &mut notes)?;
    if plugin.manifest.kind != Kind::Destination {
        bail!("{} is a source; --receipt replays a destination's actions", plugin.name());
    }
    let live = plugin.manifest.shadow_of.clone().unwrap_or_else(|| plugin.name().to_string());
    let chosen: Vec<_> =
        receipt.actions.iter().filter(|a| a.destination == live && action.is_none_or(|n| a.action == n)).collect();
    if chosen.is_empty() {
        let which = action.map(|a| format!(" {a:?}")).unwrap_or_default();
        bail!("receipt {} has no {live} action{which}", receipt.id);
    }
    let mut out = String::new();
    for a in chosen {
        let Some(sent) = a.log.last() else {
            writeln!(out, "== {live} action {:?}: no attempt is logged, so there is nothing to compare\n", a.action)?;
            continue;
        };
        let event = &receipt.event;
        let key = idempotency_key(&receipt.provider, &event.reference, &event.status_key(), &live, &a.action);
        let answers = sent
            .requests
            .iter()
            .map(|r| {
                answer_like(r.denied.as_deref(), r.response_status, r.response_excerpt.as_deref(), r.error.as_deref())
            })
            .collect();
        let request = DeliveryRequest {
            event,
            action: &a.action,
            params: &a.params,
            receipt_id: &receipt.id,
            provider: &receipt.provider,
            attempt: sent.attempt,
            idempotency_key: &key,
        };
        let (result, trace) = plugin.deliver_traced(request, Compared::Replayed(answers)).await;
        writeln!(
            out,
            "== receipt {}, {live} action {:?}, attempt {}: sent by {live} {} (digest {}), replayed through {} {}",
            receipt.id,
            a.action,
            sent.attempt,
            sent.plugin_version,
            sent.plugin_digest.get(..12).unwrap_or(&sent.plugin_digest),
            plugin.name(),
            plugin.manifest.version
        )?;
        // Compared as the attempt log keeps requests: the start of each
        // body, redacted.
        let kept = |text: &str| plugin.config.redact_excerpt(&excerpt(text.as_bytes(), BODY_EXCERPT_BYTES));
        let mut differences = Vec::new();
        let outcome = outcome_name(&result);
        let status = result.as_ref().ok().and_then(Outcome::status);
        if (outcome, status) != (sent.outcome.as_str(), sent.status) {
            differences.push(format!(
                "outcome: sent {} (status {}), replayed {outcome} (status {})",
                sent.outcome,
                Status(sent.status),
                Status(status)
            ));
        }
        let sent_count = sent.requests.len() + sent.requests_omitted as usize;
        if trace.requests.len() != sent_count {
            differences.push(format!("requests: sent {sent_count}, replayed {}", trace.requests.len()));
        }
        for (n, (was, now)) in sent.requests.iter().zip(&trace.requests).enumerate() {
            let place = n + 1;
            if was.method != now.method {
                differences.push(format!("request {place} method: sent {}, replayed {}", was.method, now.method));
            }
            let url = kept(&now.url);
            if was.url != url {
                differences.push(format!("request {place} URL: sent {}, replayed {url}", was.url));
            }
            let refused = now.denied.as_deref().map(kept);
            if was.denied != refused {
                let show = |d: Option<&str>| d.map(|d| format!("refused ({d})")).unwrap_or_else(|| "allowed".into());
                differences.push(format!(
                    "request {place}: sent {}, replayed {}",
                    show(was.denied.as_deref()),
                    show(refused.as_deref())
                ));
            }
            body_differences(place, &was.body_excerpt, &kept(&now.body), &mut differences);
        }
        if differences.is_empty() {
            writeln!(
                out,
                "the same: {} request(s) with the same method, URL and body, and the outcome {outcome} \
                 (bodies compared as the attempt log keeps them: the first {BODY_EXCERPT_BYTES} bytes, redacted)",
                trace.requests.len()
            )?;
        } else {
            for d in &differences {
                writeln!(out, "{}", shown(&plugin, d, show_secrets))?;
            }
        }
        write_logs(&mut out, &plugin, &trace.logs, show_secrets)?;
        writeln!(out)?;
    }
    Ok(with_notes(out, &notes))
}

/// How two request bodies differ: field by field when both are JSON,
/// else from the first character that differs.
fn body_differences(place: usize, sent: &str, replayed: &str, out: &mut Vec<String>) {
    if sent == replayed {
        return;
    }
    match (serde_json::from_str(sent), serde_json::from_str(replayed)) {
        (Ok(was), Ok(now)) => {
            let (mut was_fields, mut now_fields) = (BTreeMap::new(), BTreeMap::new());
            flatten("", &was, &mut was_fields);
            flatten("", &now, &mut now_fields);
            let paths: std::collections::BTreeSet<&String> = was_fields.keys().chain(now_fields.keys()).collect();
            for path in paths {
                let (was, now) = (was_fields.get(path), now_fields.get(path));
                if was != now {
                    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
                    out.push(format!("request {place} body {path}: sent {}, replayed {}", show(was), show(now)));
                }
            }
        }
        _ => {
            let at = sent.chars().zip(replayed.chars()).take_while(|(a, b)| a == b).count();
            let around = |text: &str| text.chars().skip(at.saturating_sub(20)).take(60).collect::<String>();
            out.push(format!(
                "request {place} body, from character {at}: sent …{}…, replayed …{}…",
                around(sent),
                around(replayed)
            ));
        }
    }
}

/// Every leaf of `value`, by its path (`data[0].user_data.em[0]`).
fn flatten(path: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (k, v) in fields {
                let path = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten(&path, v, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), v, out);
            }
        }
        leaf => {
            out.insert(if path.is_empty() { "(the body)".into() } else { path.to_string() }, leaf.to_string());
        }
    }
}
