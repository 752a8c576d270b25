//! The `loam` binary: `loam serve` runs the driver, `loam ctl` talks to one.

mod ctl;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use loam::config::{Config, Mode, QuotaMode};
use loam::driver::Driver;
use loam::kernel::mount::KernelMounter;

/// Loam: node-local PersistentVolumes for Kubernetes, over CSI.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    /// This node's id (the Kubernetes node name).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
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
    /// Log format.
    #[arg(long, env = "LOAM_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Ctl(args) => {
            // Scripts read `error: CODE: message` on stderr and a non-zero exit.
            if let Err(e) = runtime.block_on(ctl::run(args)) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    loam::ids::validate_node_id(&args.node_id).map_err(|e| anyhow::anyhow!("--node-id: {e}"))?;
    std::fs::create_dir_all(&args.root).with_context(|| format!("creating root {}", args.root.display()))?;
    let root = args.root.canonicalize().with_context(|| format!("resolving root {}", args.root.display()))?;
    let config = Config {
        driver_name: args.driver_name,
        node_id: args.node_id,
        root,
        max_volumes_per_node: args.max_volumes_per_node,
        quota: args.quota,
    };
    let socket = loam::server::socket_path(&args.endpoint)?;
    let driver = tokio::task::spawn_blocking(move || Driver::open(config, Arc::new(KernelMounter)))
        .await?
        .context("opening the driver's root")?;
    let listener = loam::server::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(
        endpoint = %socket.display(),
        node = %driver.config().node_id,
        root = %driver.config().root.display(),
        mode = ?args.mode,
        "serving"
    );
    let served = loam::server::run(listener, Arc::new(driver), args.mode, shutdown_signal()).await;
    let _ = std::fs::remove_file(&socket);
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
