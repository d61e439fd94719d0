//! The `klaviyo-proxy` command: serve, simulate, check-config, routes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use klaviyo_proxy::config::{Config, LogFormat, UpstreamUrl};
use klaviyo_proxy::preflight::{self, PreflightOptions};
use klaviyo_proxy::reload::{ConfigSource, LogLevelHook, Reloader};
use klaviyo_proxy::sim::{Faults, Outage, SimOptions, Simulator};

use klaviyo_proxy::App;
use klaviyo_proxy::{catalog, checklist};
use tokio::net::TcpListener;

/// mimalloc: per-thread free lists suit a server whose requests allocate and free on
/// one thread each; glibc's malloc spent a tenth of the request path's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "klaviyo-proxy",
    version,
    about = "A local proxy that keeps Klaviyo API traffic under its rate limits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the embedded default config needs no file).
    Serve {
        /// Config file (TOML); see config/klaviyo-proxy.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, overriding the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Upstream URL, overriding the config; `sim` runs the simulator in-process.
        #[arg(long)]
        upstream: Option<String>,
        /// Admin listen address (/metrics, /health, /ready, /live, /admin/reload),
        /// overriding the config.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Check that this machine, config and key are ready for production.
    Preflight {
        /// Config file (TOML); the embedded default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Upstream URL, overriding the config.
        #[arg(long)]
        upstream: Option<String>,
        /// Status page URL (statuspage `api/v2/status.json`), overriding the config.
        #[arg(long)]
        status_url: Option<String>,
        /// Also scan this source tree for hardcoded private keys (`pk_...`).
        #[arg(long)]
        scan: Option<PathBuf>,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
        /// Also judge a running proxy's traffic: its checklist at this admin URL
        /// (e.g. http://127.0.0.1:9090).
        #[arg(long, value_name = "ADMIN_URL")]
        from_traffic: Option<String>,
    },
    /// The production checklist as a running proxy sees it in its traffic. Exits 0
    /// when nothing is red, 1 when something is, 2 when the proxy cannot be reached.
    Checklist {
        /// The proxy's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and print the effective config, secrets redacted.
    CheckConfig {
        /// Config file (TOML).
        file: PathBuf,
    },
    /// List the endpoint catalog: operation, method, path and limits.
    Routes,
    /// Print a credential's fingerprint, for `[accounts.declared]`: reads the key (or a
    /// whole `Authorization` value, or an OAuth token) on stdin, so it never appears in
    /// the shell history or the process list.
    Fingerprint,
    /// Probe a health URL (for container HEALTHCHECKs and exec probes: the image has no
    /// shell or curl). Exits 0 when the answer is 2xx within the timeout.
    Healthcheck {
        /// The URL to GET (plain HTTP); the default is the admin port's liveness path.
        #[arg(default_value = "http://127.0.0.1:9090/live")]
        url: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Run the Klaviyo simulator (or, with `webhooks`, send signed webhooks to a gate).
    #[command(args_conflicts_with_subcommands = true)]
    Simulate {
        /// A load to send instead of serving.
        #[command(subcommand)]
        load: Option<Box<SimulateLoad>>,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Seed for the windows' phases.
        #[arg(long)]
        seed: Option<u64>,
        /// Serve HTTPS with a certificate generated at start.
        #[arg(long)]
        tls: bool,
        /// With --tls: write the CA certificate (PEM) here, for the proxy's upstream.ca_file.
        #[arg(long, requires = "tls")]
        ca_out: Option<PathBuf>,
        /// Latency added to every response, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Lift every limit.
        #[arg(long)]
        unlimited: bool,
        /// Faults at start; change them at run time with `POST /__sim/faults`.
        #[command(flatten)]
        faults: FaultArgs,
    },
}

/// `simulate` loads.
#[derive(Subcommand)]
enum SimulateLoad {
    /// Send signed system webhooks to a webhook gate and print what it answered (JSON).
    Webhooks(klaviyo_proxy::sim::webhooks::WebhookLoad),
}

/// `simulate` fault flags (see `klaviyo_proxy::sim::Faults`).
#[derive(clap::Args)]
struct FaultArgs {
    /// Share of API requests answered with a 5xx, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Statuses the 5xx errors are drawn from.
    #[arg(long, value_delimiter = ',', default_value = "500,502,503,504")]
    error_statuses: Vec<u16>,
    /// An outage from the start: none, unavailable (503s), reset or refused.
    #[arg(long, default_value = "none")]
    outage: String,
    /// The outage ends by itself after this many ms (0: it lasts).
    #[arg(long, default_value_t = 0)]
    outage_ms: u64,
    /// "Another consumer": every request gets 429 for this many ms from the start.
    #[arg(long, default_value_t = 0)]
    throttle_for_ms: u64,
    /// Share of requests answered 429 at random.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Raw `Retry-After` value of fault 429s (e.g. 0, -1, soon, an HTTP-date).
    #[arg(long)]
    retry_after: Option<String>,
    /// Share of responses delayed by --slow-ms.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Delay of a slow response, in ms.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// A random 429 (--throttle-rate) holds the bucket for its Retry-After: another
    /// consumer spent the quota, every request inside the hold gets a 429 too.
    #[arg(long)]
    throttle_holds: bool,
    /// Share of requests answered 403 `cf-mitigated: challenge` (Cloudflare), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    challenge_rate: f64,
    /// Accounts (`acme` for `pk_acme_...`) whose every API request is answered 503.
    #[arg(long, value_delimiter = ',')]
    failing_accounts: Vec<String>,
}

impl FaultArgs {
    fn faults(self) -> Result<Faults> {
        let outage = match self.outage.as_str() {
            "none" => Outage::None,
            "unavailable" => Outage::Unavailable,
            "reset" => Outage::Reset,
            "refused" => Outage::Refused,
            other => anyhow::bail!("--outage {other}: expected none, unavailable, reset or refused"),
        };
        Ok(Faults {
            error_rate: self.error_rate,
            error_statuses: self.error_statuses,
            latency_ms: 0,
            outage,
            outage_ms: self.outage_ms,
            throttle_for_ms: self.throttle_for_ms,
            throttle_rate: self.throttle_rate,
            retry_after: self.retry_after,
            slow_rate: self.slow_rate,
            slow_ms: self.slow_ms,
            throttle_holds: self.throttle_holds,
            challenge_rate: self.challenge_rate,
            failing_accounts: self.failing_accounts,
        })
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Starts logging to stderr; returns the hook a reload uses to change the level.
fn init_logs(level: &str, format: LogFormat) -> LogLevelHook {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colours only for a terminal: files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Human => registry.with(fmt).init(),
    }
    Arc::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("log.level `{level}`: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: draining open requests");
}

fn main() -> Result<()> {
    let command = Cli::parse().command;
    // `serve` runs one current-thread runtime per serving thread (this one, and the
    // others `workers` starts); the other commands use the multi-threaded runtime.
    let mut runtime = match command {
        Command::Serve { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build().context("start the async runtime")?.block_on(run(command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config, listen, upstream, admin_listen } => {
            serve(config, listen, upstream, admin_listen).await
        }
        Command::Preflight { config, upstream, status_url, scan, json, from_traffic } => {
            let options = PreflightOptions { config, upstream, status_url, scan, from_traffic };
            let report = preflight::run(&options, &env).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            std::process::exit(if report.passed() { 0 } else { 1 });
        }
        Command::Checklist { admin, json } => {
            let report = match checklist::client::fetch(&admin, Duration::from_secs(10)).await {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(2);
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", checklist::client::table(&report));
            }
            std::process::exit(checklist::client::exit_code(&report));
        }
        Command::CheckConfig { file } => {
            let config = Config::load(Some(&file), &env)?;
            config.check_serve()?;
            print!("{}", config.to_redacted_toml());
            eprintln!("{}: OK", file.display());
            Ok(())
        }
        Command::Fingerprint => {
            let mut input = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut input).context("read the key from stdin")?;
            anyhow::ensure!(!input.trim().is_empty(), "no key on stdin (try: klaviyo-proxy fingerprint < keyfile)");
            let credential = klaviyo_proxy::credential::parse_key_input(&input);
            println!("{}", credential.fingerprint());
            Ok(())
        }
        Command::Routes => {
            use std::io::Write;
            // A closed pipe (`routes | head`) ends the listing quietly.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{:<52} {:<7} {:<64} {:>6} {:>8} {:>8} {:>8}  notes",
                "operation", "method", "path", "tier", "burst/s", "steady/m", "daily/d"
            );
            for op in catalog::OPERATIONS {
                let conditions: Vec<String> = op
                    .conditions
                    .iter()
                    .map(|c| format!("{}={}:{}/s,{}/m", c.param, c.value, c.burst_per_second, c.steady_per_minute))
                    .collect();
                let line = writeln!(
                    out,
                    "{:<52} {:<7} {:<64} {:>6} {:>8} {:>8} {:>8}  {}{}",
                    op.id,
                    op.method,
                    op.path,
                    op.tier.as_str(),
                    op.burst_per_second,
                    op.steady_per_minute,
                    op.daily_per_day.map_or_else(|| "-".to_string(), |d| d.to_string()),
                    if op.beta { "beta " } else { "" },
                    conditions.join("; ")
                );
                if line.is_err() {
                    break;
                }
            }
            Ok(())
        }
        Command::Healthcheck { url, timeout_ms } => {
            let status = tokio::time::timeout(Duration::from_millis(timeout_ms), probe(&url))
                .await
                .map_err(|_| anyhow::anyhow!("{url}: no answer within {timeout_ms} ms"))??;
            anyhow::ensure!((200..300).contains(&status), "{url}: HTTP {status}");
            println!("{url}: HTTP {status}");
            Ok(())
        }
        Command::Simulate { load: Some(load), .. } => {
            let SimulateLoad::Webhooks(load) = *load;
            let report = klaviyo_proxy::sim::webhooks::send_webhooks(&load).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Simulate { load: None, listen, seed, tls, ca_out, latency_ms, unlimited, faults } => {
            let _ = init_logs("info", LogFormat::Human);
            let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
            let faults = faults.faults()?;
            let options = SimOptions {
                seed,
                tls,
                latency: Duration::from_millis(latency_ms),
                unlimited,
                faults,
                ..SimOptions::default()
            };
            let sim = Simulator::start(listener, options)?;
            if let (Some(path), Some(pem)) = (&ca_out, &sim.ca_pem) {
                std::fs::write(path, pem).with_context(|| format!("write {}", path.display()))?;
            }
            println!("simulator listening on {}", sim.url);
            shutdown_signal().await;
            sim.stop().await;
            Ok(())
        }
    }
}

async fn serve(
    config_path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    upstream: Option<String>,
    admin_listen: Option<SocketAddr>,
) -> Result<()> {
    let mut config = Config::load(config_path.as_deref(), &env)?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(admin) = admin_listen {
        config.admin.listen = admin;
    }
    let log_level = init_logs(&config.log.level, config.log.format);
    // Load-test mode: the simulator runs in this process and is the only upstream.
    let mut simulator = None;
    match upstream.as_deref() {
        Some("sim") => {
            let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the in-process simulator")?;
            let sim = Simulator::start(listener, SimOptions::default())?;
            config.upstream.url = UpstreamUrl::try_from(sim.url.clone()).map_err(anyhow::Error::msg)?;
            tracing::info!(url = %sim.url, "in-process simulator started (load-test mode)");
            simulator = Some(sim);
        }
        Some(url) => {
            config.upstream.url =
                UpstreamUrl::try_from(url.to_string()).map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
        }
        None => {}
    }
    config.check_serve()?;
    if !config.limits.enabled {
        tracing::warn!("RATE LIMITING IS OFF (limits.enabled = false): requests go upstream unthrottled; use this only to measure overhead");
    }
    let threads = klaviyo_proxy::workers::threads(config.server.threads);
    let (listener, others) = klaviyo_proxy::workers::bind(config.server.listen, threads)
        .await
        .with_context(|| format!("bind {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let admin_listener =
        TcpListener::bind(config.admin.listen).await.with_context(|| format!("bind {}", config.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let upstream_url: String = config.upstream.url.clone().into();
    // A reload reads the same file and env again and re-applies the command line, so
    // only what the operator changed in the file differs.
    let source: ConfigSource = {
        let path = config_path.clone();
        let upstream_flag = upstream.is_some().then(|| config.upstream.url.clone());
        Arc::new(move || {
            let mut c = Config::load(path.as_deref(), &env)?;
            if let Some(listen) = listen {
                c.server.listen = listen;
            }
            if let Some(admin) = admin_listen {
                c.admin.listen = admin;
            }
            if let Some(url) = &upstream_flag {
                c.upstream.url = url.clone();
            }
            Ok(c)
        })
    };
    let app = App::build(config)?.with_reloader(Reloader::new(source).with_log_level(log_level));
    #[cfg(unix)]
    {
        let app = app.clone();
        let mut hup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                let _ = app.reload();
            }
        });
    }
    tracing::info!(%addr, admin = %admin_addr, upstream = %upstream_url, store = app.proxy().limiter().state().as_str(), threads, "klaviyo-proxy listening");
    // Written without panicking: a caller may stop reading stdout after the first line.
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "klaviyo-proxy listening on http://{addr}");
        let _ = writeln!(out, "admin listening on http://{admin_addr}");
        if let Some(gate) = app.webhooks() {
            let _ = writeln!(out, "webhooks listening on {}://{}", gate.scheme(), gate.local_addr());
        }
        let _ = out.flush();
    }
    app.serve_threads(listener, others, Some(admin_listener), shutdown_signal()).await;
    if let Some(sim) = simulator {
        sim.stop().await;
    }
    Ok(())
}

/// One plain-HTTP/1.1 GET; returns the status code.
async fn probe(url: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse().with_context(|| format!("{url}: not a URL"))?;
    anyhow::ensure!(uri.scheme_str() == Some("http"), "{url}: only http:// URLs are probed");
    let host = uri.host().context("URL without a host")?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut stream = tokio::net::TcpStream::connect((host, port)).await.with_context(|| format!("{url}: connect"))?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need; read at most a small head.
    let mut head = vec![0u8; 256];
    let mut len = 0;
    while len < head.len() && !head[..len].contains(&b'\n') {
        match stream.read(&mut head[len..]).await? {
            0 => break,
            n => len += n,
        }
    }
    let line = String::from_utf8_lossy(&head[..len]);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.trim().parse().ok())
        .with_context(|| format!("{url}: not an HTTP answer"))
}
