//! The `loam` binary: `loam serve` runs the driver, `loam ctl` talks to one.

mod ctl;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use loam::auth::Token;
use loam::config::{Config, Mode, QuotaMode};
use loam::driver::{Driver, NodeMetrics};
use loam::kernel::HostKernel;
use loam::routing::agents::{Agents, Timeouts};
use loam::routing::cluster::GoneNodes;
use loam::routing::discovery::Resolver;
use loam::routing::kube::KubeApi;
use loam::routing::moves::Moves;
use loam::routing::node_loss::NodeLoss;
use loam::routing::router::Router;
use loam::server::limits::{Admitted, Limits, raise_nofile_limit};
use loam::server::{CopySettings, Services};
use loam::tls::Role;
use tokio::sync::watch;

/// Loam: node-local PersistentVolumes for Kubernetes, over CSI.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (revision ", env!("LOAM_GIT_REVISION"), ")"), about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CSI driver on a Unix socket.
    Serve(ServeArgs),
    /// Call a CSI driver's RPCs (any driver, not only Loam).
    Ctl(ctl::CtlArgs),
}

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// CSI endpoint to listen on.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///var/lib/loam/csi.sock")]
    endpoint: String,
    /// This node's id (the Kubernetes node name); required in modes all and node.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Directory holding every volume, snapshot and record.
    #[arg(long, env = "LOAM_ROOT", default_value = "/var/lib/loam")]
    root: PathBuf,
    /// Name the driver registers under (the StorageClass provisioner).
    #[arg(long, env = "LOAM_DRIVER_NAME", default_value = "loam.csi.dev")]
    driver_name: String,
    /// Most volumes attached to this node at once; 0 for no limit.
    #[arg(long, env = "LOAM_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
    max_volumes_per_node: u32,
    /// Enforce directory volume capacities with quotas: auto, required or off.
    #[arg(long, env = "LOAM_QUOTA", value_enum, default_value = "auto")]
    quota: QuotaMode,
    /// Which services to serve.
    #[arg(long, env = "LOAM_MODE", value_enum, default_value = "all")]
    mode: Mode,
    /// Node mode: TCP address of the agent endpoint the controller calls.
    #[arg(long, env = "LOAM_AGENT_LISTEN")]
    agent_listen: Option<SocketAddr>,
    /// Node mode: most agent connections open at once (lowered to leave descriptors for the CSI socket).
    #[arg(long, env = "LOAM_AGENT_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    agent_max_connections: usize,
    /// Node mode: most agent connections open at once from one IP address.
    #[arg(long, env = "LOAM_AGENT_MAX_CONNECTIONS_PER_PEER", default_value_t = Limits::default().max_per_peer)]
    agent_max_connections_per_peer: usize,
    /// Node mode: seconds a new agent connection has to send its first request's headers.
    #[arg(long, env = "LOAM_AGENT_HANDSHAKE_TIMEOUT", default_value_t = Limits::default().handshake_timeout.as_secs())]
    agent_handshake_timeout: u64,
    /// Node mode: seconds an agent connection may stay silent; keep it above the controller's --agent-timeout.
    #[arg(long, env = "LOAM_AGENT_IDLE_TIMEOUT", default_value_t = Limits::default().idle_timeout.as_secs())]
    agent_idle_timeout: u64,
    /// Node mode: most bytes per second one copy of a volume to another node
    /// sends (a size such as 100Mi); unset: as fast as disks and network go.
    #[arg(long, env = "LOAM_COPY_BANDWIDTH", value_parser = loam::quantity::parse)]
    copy_bandwidth: Option<u64>,
    /// Node and controller modes: file holding the agent token (a mounted Secret).
    #[arg(long, env = "LOAM_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// Controller mode: agent addresses, host:port,...
    #[arg(long, env = "LOAM_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// Controller mode: headless Service NAME:PORT whose records are the agents.
    #[arg(long, env = "LOAM_AGENTS_SERVICE")]
    agents_service: Option<String>,
    /// Controller mode: seconds one forwarded call may take.
    #[arg(long, env = "LOAM_AGENT_TIMEOUT", default_value_t = 60)]
    agent_timeout: u64,
    /// Controller mode: seconds a node's Node object must have been gone from
    /// the cluster before deleting or detaching its volumes and snapshots
    /// succeeds without its agent (they went with the node).
    #[arg(long, env = "LOAM_GONE_NODE_GRACE", default_value_t = 300)]
    gone_node_grace: u64,
    /// Log format.
    #[arg(long, env = "LOAM_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off when unset).
    #[arg(long, env = "LOAM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Node agents: one series per volume (capacity and used bytes); turn it
    /// off on nodes with very many volumes.
    #[arg(long, env = "LOAM_METRICS_PER_VOLUME", default_value_t = true, action = clap::ArgAction::Set)]
    metrics_per_volume: bool,
}

fn main() -> anyhow::Result<()> {
    // glibc gives each thread that allocates its own heap arena and keeps
    // what it frees; with a pool of blocking threads that multiplies the
    // footprint for no gain here (allocations are small and few).
    // SAFETY: called first thing, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let cli = Cli::parse();
    // Two threads drive gRPC I/O, which is light; every filesystem or kernel
    // call runs on the blocking pool, so concurrent operations run in parallel.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Ctl(args) => {
            // Scripts read `error: CODE: message` on stderr and a non-zero exit;
            // the exit status still says so when stderr is closed.
            if let Err(e) = runtime.block_on(ctl::run(args)) {
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Logs to stderr at the levels `LOAM_LOG` names (`info` by default; e.g.
/// `debug` or `info,loam::routing=debug`).
fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = match std::env::var("LOAM_LOG") {
        Ok(directives) => directives.parse().with_context(|| format!("LOAM_LOG={directives:?} is not a log filter"))?,
        Err(_) => Targets::new().with_default(tracing::Level::INFO),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => registry.with(layer.with_filter(filter)).init(),
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).init(),
    }
    Ok(())
}

/// How often the controller rediscovers agents even when nothing fails.
const AGENTS_REFRESH: Duration = Duration::from_secs(30);
/// How long connecting to an agent and asking its node id may take.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the controller looks for claims to recreate on a live node
/// because their volume's node is gone for good.
const NODE_LOSS_SWEEP: Duration = Duration::from_secs(60);
/// How often the controller starts and advances moves of claims to other
/// nodes: two label-selected lists when nothing moves.
const MOVES_SWEEP: Duration = Duration::from_secs(5);

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format)?;
    check_flags(&args)?;
    // Every connection, image and loop device takes a descriptor; the soft
    // limit is often 1024 while the hard one allows far more.
    let nofile = raise_nofile_limit()
        .inspect_err(|e| tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE to its hard limit"))
        .ok();
    let socket = loam::endpoint::Endpoint::unix_socket(&args.endpoint).map_err(anyhow::Error::msg)?;
    tokio::spawn(loam::memory::give_back_after_bursts());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            tracing::info!(%addr, "metrics at /metrics");
            Some(tokio::spawn(loam::metrics::serve(listener, until_stopped())))
        }
        None => None,
    };
    let served = match args.mode {
        Mode::All => {
            let driver = open_driver(&args).await?;
            serve_socket(&socket, Services::All(driver), args.mode, until_stopped()).await
        }
        Mode::Node => {
            let token = read_token(args.agent_token_file.as_deref())?;
            let tls = loam::tls::server_config(&token, Role::Agent).context("the agent endpoint's TLS")?;
            let peer_tls = loam::tls::client_config(&token, Role::Peer).context("the TLS of copies between nodes")?;
            let copies = CopySettings { bandwidth: args.copy_bandwidth };
            let addr = args.agent_listen.context("--mode node needs --agent-listen ADDR:PORT (LOAM_AGENT_LISTEN)")?;
            let driver = open_driver(&args).await?;
            let agent = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            let bound = agent.local_addr().context("reading the agent endpoint's address")?;
            let limits = agent_limits(&args, nofile);
            tracing::info!(addr = %bound, ?limits, "agent endpoint listening");
            let agent = Admitted::new(agent, limits);
            let agent = async {
                loam::server::run_agent(agent, driver.clone(), token, (tls, peer_tls), copies, until_stopped())
                    .await
                    .context("serving the agent endpoint")
            };
            let socket = serve_socket(&socket, Services::Node(driver.clone()), args.mode, until_stopped());
            tokio::try_join!(socket, agent).map(drop)
        }
        Mode::Controller => {
            let token = read_token(args.agent_token_file.as_deref())?;
            let tls = loam::tls::client_config(&token, Role::Controller).context("the agent channel's TLS")?;
            let targets: Vec<String> = args.agents.iter().cloned().chain(args.agents_service.clone()).collect();
            let timeouts = Timeouts {
                connect: AGENT_CONNECT_TIMEOUT,
                call: Duration::from_secs(args.agent_timeout),
                refresh: AGENTS_REFRESH,
            };
            tracing::info!(?targets, "routing to agents");
            let agents = Arc::new(Agents::new(
                args.driver_name.clone(),
                Arc::new(Resolver::new(targets)),
                &token,
                tls,
                timeouts,
            ));
            // Ends with the process; it holds nothing to clean up.
            tokio::spawn(agents.clone().watch());
            let gone_nodes = match KubeApi::in_cluster() {
                Ok(api) => {
                    let api = Arc::new(api);
                    let gone = Arc::new(GoneNodes::new(api.clone(), Duration::from_secs(args.gone_node_grace)));
                    // Both end with the process: the sweeps hold nothing to
                    // clean up, and a move goes on from its records.
                    let sweep = NodeLoss::new(api.clone(), gone.clone(), args.driver_name.clone());
                    tokio::spawn(sweep.run(NODE_LOSS_SWEEP));
                    let router = Arc::new(Router::new(agents.clone(), Some(gone.clone())));
                    let moves = Moves::new(api, router, args.driver_name.clone());
                    tokio::spawn(moves.run(MOVES_SWEEP));
                    Some(gone)
                }
                Err(reason) => {
                    tracing::info!(
                        %reason,
                        "not in a Kubernetes pod: volumes of unreachable nodes are never given up, claims are not moved"
                    );
                    None
                }
            };
            let services = Services::Controller { driver_name: args.driver_name.clone(), agents, gone_nodes };
            serve_socket(&socket, services, args.mode, until_stopped()).await
        }
    };
    if let Some(metrics) = metrics {
        // Stopped with the rest on a signal; a failed server stops it here.
        if served.is_err() {
            metrics.abort();
        }
        match metrics.await {
            Err(e) if e.is_cancelled() => {}
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the metrics endpoint failed"),
            Err(e) => tracing::warn!(error = %e, "the metrics endpoint's task failed"),
        }
    }
    served
}

/// The agent endpoint's connection limits: the flags, with the total lowered
/// if the descriptor limit `nofile` cannot hold it beside what the CSI socket
/// and the volumes need.
fn agent_limits(args: &ServeArgs, nofile: Option<u64>) -> Limits {
    let limits = Limits {
        max_connections: args.agent_max_connections,
        max_per_peer: args.agent_max_connections_per_peer,
        handshake_timeout: Duration::from_secs(args.agent_handshake_timeout),
        idle_timeout: Duration::from_secs(args.agent_idle_timeout),
    };
    match nofile {
        Some(nofile) => limits.reserving_descriptors(nofile),
        None => limits,
    }
}

/// Refuses flags that the chosen mode would silently ignore.
fn check_flags(args: &ServeArgs) -> anyhow::Result<()> {
    let routing = !args.agents.is_empty() || args.agents_service.is_some();
    match args.mode {
        Mode::Controller if !routing => {
            bail!("--mode controller needs --agents HOST:PORT,... or --agents-service NAME:PORT")
        }
        Mode::All | Mode::Node if routing => bail!("--agents and --agents-service are for --mode controller only"),
        Mode::All | Mode::Controller if args.agent_listen.is_some() => bail!("--agent-listen is for --mode node only"),
        Mode::All if args.agent_token_file.is_some() => bail!("--agent-token-file is for --mode node and controller"),
        _ => Ok(()),
    }
}

/// Reads the agent token; there is no default, so the split modes need one.
fn read_token(path: Option<&Path>) -> anyhow::Result<Token> {
    let path = path.context(
        "--mode node and controller need --agent-token-file (LOAM_AGENT_TOKEN_FILE): the agent endpoint is never open",
    )?;
    Token::from_file(path).map_err(|e| anyhow::anyhow!("--agent-token-file: {e}"))
}

async fn open_driver(args: &ServeArgs) -> anyhow::Result<Arc<Driver>> {
    let node_id = args.node_id.clone().context("--node-id (NODE_ID) is required in --mode all and node")?;
    loam::ids::validate_node_id(&node_id).map_err(|e| anyhow::anyhow!("--node-id: {e}"))?;
    std::fs::create_dir_all(&args.root).with_context(|| format!("creating root {}", args.root.display()))?;
    let root = args.root.canonicalize().with_context(|| format!("resolving root {}", args.root.display()))?;
    let config = Config {
        driver_name: args.driver_name.clone(),
        node_id,
        root,
        max_volumes_per_node: args.max_volumes_per_node,
        quota: args.quota,
    };
    let driver = tokio::task::spawn_blocking(move || Driver::open(config, Arc::new(HostKernel)))
        .await?
        .context("opening the driver's root")?;
    tracing::info!(node = %driver.config().node_id, root = %driver.config().root.display(), "driver open");
    let driver = Arc::new(driver);
    if args.metrics_listen.is_some() {
        loam::metrics::global().register_node(Arc::new(NodeMetrics::new(driver.clone(), args.metrics_per_volume)));
    }
    Ok(driver)
}

/// Serves `services` on the CSI socket until stopped, then removes it.
async fn serve_socket(
    socket: &Path,
    services: Services,
    mode: Mode,
    stopped: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = loam::server::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(endpoint = %socket.display(), ?mode, "serving");
    let served = loam::server::run(listener, services, stopped).await;
    let _ = std::fs::remove_file(socket);
    served.context("serving gRPC")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the driver with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}
