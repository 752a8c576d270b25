//! Prometheus metrics: one process-wide registry, filled where things happen
//! and served as text by [`serve`] when `--metrics-listen` asks for it.
//!
//! What every process records: each RPC's duration by method and gRPC code
//! (a call its caller cancelled counts as `Cancelled`), and build info. The
//! controller adds its agents' reachability, forwarded-call latency by node
//! and discovery refreshes; a node agent adds its root's space and its
//! volumes through a [`NodeSource`] read at each scrape, so nothing is
//! measured unless someone asks.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// Labels of one RPC's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The CSI method, e.g. `CreateVolume`.
    pub method: &'static str,
    /// The gRPC code it ended with, e.g. `Ok`, `NotFound`, `Cancelled`.
    pub code: String,
}

/// Labels of a call the controller forwarded to a node's agent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// The node whose agent was called.
    pub node: String,
    /// The CSI method forwarded.
    pub method: &'static str,
}

/// Labels naming a node.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The node id.
    pub node: String,
}

/// Labels of a discovery refresh's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// `found` when at least one agent answered, `none` otherwise.
    pub outcome: &'static str,
}

/// Labels of bytes copied between nodes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CopyLabels {
    /// `sent` by the source's node, `received` by the new volume's.
    pub direction: &'static str,
}

/// What a node agent reports about its root and volumes at each scrape.
pub trait NodeSource: Send + Sync + fmt::Debug {
    /// The figures as of now; `None` when they cannot be read (the scrape
    /// then leaves them out rather than failing).
    fn node_figures(&self) -> Option<NodeFigures>;
}

/// A node agent's root and volumes, as one scrape reports them.
#[derive(Debug, Clone, Default)]
pub struct NodeFigures {
    /// Size of the root's filesystem.
    pub root_size_bytes: u64,
    /// Bytes free on it for Loam.
    pub root_available_bytes: u64,
    /// Bytes promised to volumes but not written yet.
    pub promised_bytes: u64,
    /// Volume counts by (backend, enforcement).
    pub volumes: Vec<((&'static str, &'static str), u64)>,
    /// Loop devices of staged volumes running without direct I/O.
    pub loop_devices_without_direct_io: u64,
    /// Copies from other nodes this node is receiving.
    pub copies_in_flight: u64,
    /// Per volume: (name, id, capacity bytes, used bytes when known), when
    /// per-volume metrics are on.
    pub per_volume: Vec<VolumeFigures>,
}

/// One volume's figures.
#[derive(Debug, Clone)]
pub struct VolumeFigures {
    /// The CSI name (the PersistentVolume's name under Kubernetes).
    pub name: String,
    /// The Loam volume id.
    pub id: String,
    /// Its capacity.
    pub capacity_bytes: u64,
    /// What it uses, as last measured; `None` before the first measurement.
    pub used_bytes: Option<u64>,
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    rpc_duration: Family<RpcLabels, Histogram>,
    forward_duration: Family<ForwardLabels, Histogram>,
    agent_up: Family<NodeLabels, Gauge>,
    discovery_refreshes: Family<RefreshLabels, Counter>,
    copy_bytes: Family<CopyLabels, Counter>,
}

/// Seconds from 1 ms to about 65 s, doubling: CSI calls range from a record
/// lookup to an mkfs or a copy.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("loam");
        let rpc_duration = Family::<RpcLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> _);
        registry.register_with_unit(
            "rpc_duration",
            "Duration of CSI calls served, by method and gRPC code (Cancelled: the caller gave up)",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let forward_duration =
            Family::<ForwardLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> _);
        registry.register_with_unit(
            "forward_duration",
            "Duration of calls the controller forwarded to a node's agent, by node and method",
            Unit::Seconds,
            forward_duration.clone(),
        );
        let agent_up = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "agent_up",
            "Whether the controller reached the node's agent at its last refresh",
            agent_up.clone(),
        );
        let discovery_refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "discovery_refreshes",
            "Refreshes of the controller's table of agents, by whether any agent answered",
            discovery_refreshes.clone(),
        );
        let copy_bytes = Family::<CopyLabels, Counter>::default();
        // Served at 0 from the start, so a rate over them is defined before
        // the first copy.
        for direction in ["sent", "received"] {
            drop(copy_bytes.get_or_create(&CopyLabels { direction }));
        }
        registry.register_with_unit(
            "copy",
            "Bytes of volume content copied between nodes, by direction (sent, received)",
            Unit::Bytes,
            copy_bytes.clone(),
        );
        registry.register(
            "build",
            "The running Loam's version and git revision",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("revision", crate::config::GIT_REVISION)]),
        );
        Metrics {
            registry: Mutex::new(registry),
            rpc_duration,
            forward_duration,
            agent_up,
            discovery_refreshes,
            copy_bytes,
        }
    }

    /// Records a served CSI call.
    pub fn rpc(&self, method: &'static str, code: tonic::Code, took: Duration) {
        let code = format!("{code:?}");
        self.rpc_duration.get_or_create(&RpcLabels { method, code }).observe(took.as_secs_f64());
    }

    /// Records a call forwarded to `node`'s agent.
    pub fn forwarded(&self, node: &str, method: &'static str, took: Duration) {
        self.forward_duration
            .get_or_create(&ForwardLabels { node: node.to_owned(), method })
            .observe(took.as_secs_f64());
    }

    /// Records a refresh of the controller's agents: the nodes that answered;
    /// every node seen before and missing now is down.
    pub fn agents_refreshed<'a>(&self, up: impl Iterator<Item = &'a str>, gone: impl Iterator<Item = &'a str>) {
        let mut any = false;
        for node in up {
            any = true;
            self.agent_up.get_or_create(&NodeLabels { node: node.to_owned() }).set(1);
        }
        for node in gone {
            self.agent_up.get_or_create(&NodeLabels { node: node.to_owned() }).set(0);
        }
        let outcome = if any { "found" } else { "none" };
        self.discovery_refreshes.get_or_create(&RefreshLabels { outcome }).inc();
    }

    /// Records bytes of a copy between nodes, `direction` `sent` or `received`.
    pub fn copied(&self, direction: &'static str, bytes: u64) {
        self.copy_bytes.get_or_create(&CopyLabels { direction }).inc_by(bytes);
    }

    /// Adds a node agent's figures to every scrape.
    pub fn register_node(&self, source: Arc<dyn NodeSource>) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(Box::new(NodeCollector(source)));
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        // Writing to a String cannot fail.
        let _ = text::encode(&mut out, &registry);
        out
    }
}

/// The process's metrics, made on first use.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Reads a [`NodeSource`] at each scrape.
#[derive(Debug)]
struct NodeCollector(Arc<dyn NodeSource>);

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(figures) = self.0.node_figures() else { return Ok(()) };
        let mut gauge = |name: &str, help: &str, unit: Option<&Unit>, value: u64| -> Result<(), fmt::Error> {
            let metric = ConstGauge::new(saturating_i64(value));
            metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
        };
        gauge(
            "root_size",
            "Size of the filesystem holding the node's root",
            Some(&Unit::Bytes),
            figures.root_size_bytes,
        )?;
        gauge(
            "root_available",
            "Bytes free for Loam on the filesystem holding the node's root",
            Some(&Unit::Bytes),
            figures.root_available_bytes,
        )?;
        gauge(
            "root_promised",
            "Bytes promised to volumes on this node and not written yet (free space left for new volumes is available minus promised)",
            Some(&Unit::Bytes),
            figures.promised_bytes,
        )?;
        gauge(
            "loop_devices_without_direct_io",
            "Loop devices of staged volumes running without direct I/O (their I/O goes through the host page cache twice)",
            None,
            figures.loop_devices_without_direct_io,
        )?;
        gauge(
            "copies_in_flight",
            "Volumes this node is making from a copy of another node's volume or snapshot, not finished yet",
            None,
            figures.copies_in_flight,
        )?;
        let help = "Volumes on this node by backend and how their capacity is enforced (none: not enforced)";
        let mut volumes =
            encoder.encode_descriptor("volumes", help, None, prometheus_client::metrics::MetricType::Gauge)?;
        for ((backend, enforcement), count) in &figures.volumes {
            let labels = [("backend", *backend), ("enforcement", *enforcement)];
            ConstGauge::new(saturating_i64(*count)).encode(volumes.encode_family(&labels)?)?;
        }
        if figures.per_volume.is_empty() {
            return Ok(());
        }
        let per_volume = |volume: &VolumeFigures| Some(volume.capacity_bytes);
        encode_per_volume(
            &mut encoder,
            "volume_capacity",
            "Capacity of each volume on this node",
            &figures,
            per_volume,
        )?;
        let help = "Bytes each volume on this node uses, as last measured (every few seconds)";
        encode_per_volume(&mut encoder, "volume_used", help, &figures, |volume| volume.used_bytes)
    }
}

/// One gauge family with a series per volume (those `value` has a number for).
fn encode_per_volume(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    figures: &NodeFigures,
    value: impl Fn(&VolumeFigures) -> Option<u64>,
) -> Result<(), fmt::Error> {
    let gauge = prometheus_client::metrics::MetricType::Gauge;
    let mut family = encoder.encode_descriptor(name, help, Some(&Unit::Bytes), gauge)?;
    for volume in &figures.per_volume {
        let Some(bytes) = value(volume) else { continue };
        let labels = [("volume", volume.name.as_str()), ("volume_id", volume.id.as_str())];
        ConstGauge::new(saturating_i64(bytes)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                global().render(),
            )
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
