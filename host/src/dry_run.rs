//! The plugin author's first tool: run a plugin against a payload file and
//! show exactly what it would do, sending nothing.
//!
//! A source plugin prints the normalized event (or the 400 the API would
//! answer). A destination plugin is fed the event parsed by a source plugin,
//! for the action(s) the routing table (or `--action`) gives it; every HTTP
//! request it makes is recorded and answered with a canned response instead
//! of being sent. Secrets are redacted unless asked otherwise; required
//! settings that are not set get a visible placeholder.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::Environment;
use crate::event::Event;
use crate::plugins::grants::PluginEnv;
use crate::plugins::manifest::Manifest;
use crate::plugins::world::{HttpMode, RecordedRequest};
use crate::plugins::{
    DeliveryRequest, EngineOptions, IncomingRequest, Kind, LoadedPlugin, Outcome, ParseFailure, PluginEngine,
    plugin_folders,
};
use crate::queue::idempotency_key;
use crate::routing::Routes;

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
    /// Canned answer to every request.
    pub respond_status: u16,
    pub respond_body: String,
    pub show_secrets: bool,
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

/// The environment with a placeholder for every required, unset variable,
/// and a note for each.
fn with_placeholders(dir: &Path, env: &PluginEnv, notes: &mut Vec<String>) -> anyhow::Result<PluginEnv> {
    let manifest = Manifest::load(dir)?;
    let mut vars: HashMap<String, String> = HashMap::new();
    for var in manifest.resolve_config(env)?.missing {
        notes.push(format!("{var} is not set; using the placeholder <{var}>"));
        vars.insert(var.clone(), format!("<{var}>"));
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
    let mode = HttpMode::Record { status: opts.respond_status, body: opts.respond_body.clone().into_bytes() };
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
    let events = match source.parse(&request).await? {
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
    let (result, requests) = plugin
        .deliver(DeliveryRequest {
            event,
            action,
            params,
            receipt_id: "dry-run",
            provider,
            attempt: 1,
            idempotency_key: &key,
        })
        .await;
    writeln!(out, "== {} action {action:?}: {} request(s), none sent", plugin.name(), requests.len())?;
    for r in &requests {
        let shown = render_request(r);
        let shown = if opts.show_secrets { shown } else { plugin.config.redact(&shown) };
        writeln!(out, "{shown}")?;
    }
    let outcome = match result {
        Ok(Outcome::Delivered { detail, .. }) => format!("delivered ({detail})"),
        Ok(Outcome::Retryable { reason, .. }) => format!("retryable failure: {reason}"),
        Ok(Outcome::Permanent { reason, .. }) => format!("permanent failure: {reason}"),
        Err(e) => format!("plugin error: {e}"),
    };
    let outcome = if opts.show_secrets { outcome } else { plugin.config.redact(&outcome) };
    writeln!(out, "-- outcome, given a {} answer: {outcome}\n", opts.respond_status)?;
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
