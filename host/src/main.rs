//! The `crm-event-handler` command line: `serve` (the default) and the
//! plugin author's tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crm_event_handler::Role;
use crm_event_handler::config::Environment;
use crm_event_handler::deploy;
use crm_event_handler::dry_run::{self, DryRun};
use crm_event_handler::plugins::grants::PluginEnv;
use crm_event_handler::plugins::world::Reply;
use crm_event_handler::plugins::{EngineOptions, PluginEngine};
use crm_event_handler::routing::Routes;
use crm_event_handler::scaffold::{self, Lang};

/// mimalloc: less time in the allocator than glibc's under many threads and
/// short-lived buffers, and less fragmentation (lower RSS) under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "crm-event-handler",
    version,
    about = "Receives CRM deal webhooks and delivers their actions through WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the delivery workers (the default).
    Serve {
        /// Accept webhooks only; leave delivery to other processes.
        #[arg(long, conflicts_with = "workers_only")]
        api_only: bool,
        /// Deliver jobs only (health, readiness and metrics are still served).
        #[arg(long)]
        workers_only: bool,
    },
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(Box<PluginCommand>),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin against a payload file and print the exact HTTP requests
    /// it would send, its log lines and its outcome, attempt by attempt.
    /// Nothing is sent. With --receipt, replay a stored receipt through a
    /// candidate folder and show how it differs from what was sent.
    #[command(alias = "run")]
    Test {
        /// Plugin name (in PLUGINS_DIR) or plugin folder.
        plugin: String,
        /// The webhook body, as the CRM would post it.
        #[arg(long, required_unless_present = "receipt")]
        payload: Option<PathBuf>,
        /// A request header, "name: value" (repeatable), e.g. -H "x-event: deal_updated".
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Source plugin that parses the payload for a destination.
        #[arg(long, default_value = "crm")]
        source: String,
        /// Run this action instead of the ones the routing table gives.
        #[arg(long)]
        action: Option<String>,
        /// Status of the answer each request gets (without --answers).
        #[arg(long, default_value_t = 200)]
        respond_status: u16,
        /// Body of that answer.
        #[arg(long, default_value = "{}")]
        respond_body: String,
        /// One answer per attempt, a JSON list inline or in a file:
        /// [{"status": 429, "headers": {"Retry-After": "2"}}, {"status": 200, "body": {}}, {"error": "refused"}].
        /// A retryable outcome goes on to the next answer.
        #[arg(long, conflicts_with_all = ["respond_status", "respond_body"])]
        answers: Option<String>,
        /// The first attempt's number.
        #[arg(long, default_value_t = 1)]
        attempt: u32,
        /// Replay this stored receipt's actions for the plugin's destination
        /// (a candidate's `shadow_of`) through the plugin folder, answered as
        /// the live version was, and show how its requests differ.
        #[arg(long, conflicts_with = "payload")]
        receipt: Option<String>,
        /// The running host holding the receipt (default: http://127.0.0.1:$PORT).
        #[arg(long, requires = "receipt")]
        url: Option<String>,
        /// Print secrets instead of «redacted».
        #[arg(long)]
        show_secrets: bool,
    },
    /// List the plugins a running host has loaded: version, kind, digest,
    /// load time, and folders whose latest change was refused.
    List {
        /// The running host (default: http://127.0.0.1:$PORT).
        #[arg(long)]
        url: Option<String>,
    },
    /// Check a plugin folder: manifest, component, world, allowed hosts.
    Check {
        /// The plugin's folder.
        dir: PathBuf,
    },
    /// Start a plugin: a folder with its manifest, working code, the
    /// contract, a README and a test, in Rust, Python or JavaScript.
    New {
        /// The plugin's name: a provider (source) or destination name.
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        #[arg(long, value_enum)]
        lang: Lang,
        /// Where the folder NAME is made.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Build a plugin folder's component with its language's tool (cargo,
    /// componentize-py or componentize-js, installed on first use).
    Build {
        /// The plugin's folder.
        dir: PathBuf,
    },
    /// Put a built plugin into a running host's PLUGINS_DIR (written aside,
    /// then renamed into place) and wait until the host runs it, or says
    /// why it refused it (the previous version then keeps running).
    Deploy {
        /// The plugin's folder (its plugin.toml and component are copied).
        dir: PathBuf,
        /// The host's plugin folder (default: $PLUGINS_DIR, else ./plugins).
        #[arg(long)]
        to: Option<PathBuf>,
        /// The running host (default: http://127.0.0.1:$PORT).
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the host to load it.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Only put it in place; do not ask a host.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Source,
    Destination,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve { api_only: false, workers_only: false }) {
            Command::Serve { api_only, workers_only } => {
                crm_event_handler::run(Role { api: !workers_only, workers: !api_only }).await
            }
            Command::Plugin(cmd) => run_plugin(*cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The running host to ask (`--url`, else port `PORT` here) and its
/// operator key.
fn host(env: &Environment, url: Option<String>) -> anyhow::Result<(String, &str)> {
    let url = url.unwrap_or_else(|| format!("http://127.0.0.1:{}", env.get("PORT").unwrap_or("3000")));
    let key = env
        .get("ADMIN_API_KEY")
        .or_else(|| env.get("API_KEY"))
        .context("ADMIN_API_KEY is not set (asking the host needs its operator key)")?;
    Ok((url, key))
}

fn plugins_dir(env: &Environment) -> PathBuf {
    env.get("PLUGINS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("plugins"))
}

async fn run_plugin(cmd: PluginCommand) -> anyhow::Result<()> {
    let env = Environment::load()?;
    match cmd {
        PluginCommand::Test {
            plugin,
            payload,
            headers,
            source,
            action,
            respond_status,
            respond_body,
            answers,
            attempt,
            receipt,
            url,
            show_secrets,
        } => {
            if let Some(id) = receipt {
                let (url, key) = host(&env, url)?;
                let receipt = deploy::receipt(&url, key, &id).await?;
                let dir = dry_run::find_plugin(&plugins_dir(&env), &plugin)?;
                print!("{}", dry_run::replay(&dir, &receipt, action.as_deref(), show_secrets, &env).await?);
                return Ok(());
            }
            let routes = match env.get("ROUTES_FILE") {
                Some(path) => Routes::load(path.as_ref())?,
                None => Routes::default_table(),
            };
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .with_context(|| format!("header {h:?} must look like \"name: value\""))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let payload = payload.context("--payload names the webhook body to test with")?;
            let payload = std::fs::read(&payload).with_context(|| format!("cannot read {}", payload.display()))?;
            let answers = match answers {
                Some(spec) => dry_run::parse_answers(&spec)?,
                None => {
                    vec![Ok(Reply { status: respond_status, headers: Vec::new(), body: respond_body.into_bytes() })]
                }
            };
            let report = dry_run::run(
                &DryRun {
                    plugins_dir: plugins_dir(&env),
                    plugin,
                    payload,
                    headers,
                    base_url: env
                        .get("BASE_URL")
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("http://localhost:{}", env.get("PORT").unwrap_or("3000"))),
                    source,
                    action,
                    routes,
                    answers,
                    attempt,
                    show_secrets,
                },
                &env,
            )
            .await?;
            print!("{report}");
            Ok(())
        }
        PluginCommand::List { url } => {
            let (url, key) = host(&env, url)?;
            let body = deploy::listing(&url, key)
                .await
                .context("`plugin check DIR` inspects a folder without a running host")?;
            println!("{:<14} {:<9} {:<12} {:<14} {:<20} STATUS", "NAME", "VERSION", "KIND", "DIGEST", "LOADED (UTC)");
            for p in body["plugins"].as_array().into_iter().flatten() {
                let loaded = p["loaded_at_ms"].as_u64().map(|ms| {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
                    httpdate::fmt_http_date(t)
                });
                let missing: Vec<&str> =
                    p["not_configured"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
                let status = if missing.is_empty() {
                    "ready".to_string()
                } else {
                    format!("not configured: set {}", missing.join(", "))
                };
                println!(
                    "{:<14} {:<9} {:<12} {:<14} {:<20} {status}",
                    p["name"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?"),
                    p["kind"].as_str().unwrap_or("?"),
                    p["digest"].as_str().unwrap_or("").get(..12).unwrap_or(""),
                    loaded.as_deref().and_then(|d| d.get(5..25)).unwrap_or("?"),
                );
            }
            for e in body["load_errors"].as_array().into_iter().flatten() {
                println!("refused: {}: {}", e["dir"].as_str().unwrap_or("?"), e["error"].as_str().unwrap_or("?"));
            }
            Ok(())
        }
        PluginCommand::Deploy { dir, to, url, wait, no_wait } => {
            let to = to.unwrap_or_else(|| plugins_dir(&env));
            if no_wait {
                let placed = deploy::place(&dir, &to)?;
                deploy::confirm(&placed)?;
                println!(
                    "placed {} {} in {} (digest {})",
                    placed.name,
                    placed.version,
                    placed.folder.display(),
                    placed.digest
                );
                return Ok(());
            }
            let (url, key) = host(&env, url)?;
            // Asked first: nothing is touched when no host answers.
            let before = deploy::listing(&url, key).await.context("pass --no-wait to only put it in place")?;
            let placed = deploy::place(&dir, &to)?;
            println!(
                "placed {} {} in {}; waiting for {url} to load it",
                placed.name,
                placed.version,
                placed.folder.display()
            );
            let stale = deploy::refusal(&before, &placed);
            match deploy::wait_live(&url, key, &placed, stale, Duration::from_secs(wait)).await? {
                deploy::Landed::Live => {
                    deploy::confirm(&placed)?;
                    println!("live: {} {} (digest {})", placed.name, placed.version, placed.digest);
                    Ok(())
                }
                deploy::Landed::Refused(reason) => {
                    deploy::roll_back(&placed)?;
                    anyhow::bail!(
                        "the host refused {}; the previous files are back in place, and the version it ran before \
                         keeps running: {reason}",
                        placed.folder.display()
                    )
                }
            }
        }
        PluginCommand::New { name, kind, lang, dir } => {
            let kind = match kind {
                KindArg::Source => crm_event_handler::plugins::Kind::Source,
                KindArg::Destination => crm_event_handler::plugins::Kind::Destination,
            };
            let made = scaffold::create(&name, kind, lang, &dir)?;
            println!(
                "made {}: see its README.md; build it with `crm-event-handler plugin build {}`",
                made.display(),
                made.display()
            );
            Ok(())
        }
        PluginCommand::Build { dir } => {
            let built = scaffold::build(&dir)?;
            let bytes = std::fs::metadata(&built).map(|m| m.len()).unwrap_or(0);
            println!(
                "built {} ({bytes} bytes); check it with `crm-event-handler plugin check {}`",
                built.display(),
                dir.display()
            );
            Ok(())
        }
        PluginCommand::Check { dir } => {
            let engine = PluginEngine::new(EngineOptions::default())?;
            let plugin_env = PluginEnv::from_environment(&env).map_err(|e| anyhow::anyhow!(e))?;
            let p = engine.load(&dir, &plugin_env, None)?;
            println!("ok: {} {} ({}), component sha256 {}", p.name(), p.manifest.version, p.manifest.kind, p.digest);
            let allowed = p.allow.describe();
            println!("allowed outbound hosts: {}", if allowed.is_empty() { "none".into() } else { allowed.join(", ") });
            println!("may read: {}", plugin_env.grants().describe(p.manifest.grantee()).join(", "));
            if let Some(live) = &p.manifest.shadow_of {
                println!("shadows {live}: runs beside its deliveries, compared with them; its requests are never sent");
            }
            for v in &p.config.vars {
                let source = match (&v.env, &v.granted_by) {
                    (Some(var), Some(grant)) => {
                        format!("{var} (granted by {grant}, {})", if v.set { "set" } else { "not set" })
                    }
                    _ => "manifest default".to_string(),
                };
                let flags = [(v.secret, " secret"), (v.required, " required")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, f)| *f)
                    .collect::<String>();
                println!("  config.{}: {source}{flags}", v.key);
            }
            let l = p.manifest.limits;
            println!(
                "limits: {} ms per call, {} MiB memory, {} requests and {} request body bytes per call",
                l.time_per_call_ms, l.memory_mb, l.max_requests_per_call, l.max_request_bytes_per_call
            );
            if !p.config.missing.is_empty() {
                println!("not configured here: set {}", p.config.missing.join(", "));
            }
            if !p.config.short_secrets.is_empty() {
                println!(
                    "warning: {} is shorter than {} characters (a test value?)",
                    p.config.short_secrets.join(" and "),
                    crm_event_handler::plugins::manifest::SHORT_SECRET
                );
            }
            Ok(())
        }
    }
}
