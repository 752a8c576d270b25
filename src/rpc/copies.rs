//! Loam's Copies service on the agent endpoint: making a volume from another
//! node's volume or snapshot ([`CopiesService::create_volume_from`], called by
//! the controller on the new volume's node) and streaming one out
//! ([`CopiesService::export`], called by that node's agent on the source's).
//!
//! The wire frames are mapped to the pieces the driver reads and writes
//! ([`crate::driver::transfer`]) in `wire`; the data goes node to node,
//! never through the controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::copies_server::Copies;
use crate::api::export_frame::Frame as Wire;
use crate::api::export_header::Content;
use crate::api::export_request::Source as WireSource;
use crate::api::{
    CopySnapshotRequest, CreateVolumeFromRequest, CutSnapshotRequest, ExportFrame, ExportHeader, ExportRequest,
};
use crate::auth::RequireRole;
use crate::csi;
use crate::driver::transfer::{Carried, Piece};
use crate::driver::{Driver, Export, Incoming, SnapshotCopy};
use crate::error::{Error, Result};
use crate::ids::{Kind, ObjectId, SnapshotId, validate_name, validate_node_id};
use crate::records::ContentSource;
use crate::routing::peer::Peers;
use crate::rpc::controller::{new_volume, snapshot_message, volume_message};
use crate::rpc::validate::{PROTECTION_PARAMETER, Protection};
use crate::rpc::{blocking, claimed, traced, validate};
use crate::tls::Role;

mod wire;

use wire::{from_wire, to_wire};

/// Frames buffered between the network and the disk on either side: bounds
/// memory per copy to a few MiB.
const FRAMES_IN_FLIGHT: usize = 4;

/// How this node's agent copies to and from others.
#[derive(Debug, Clone, Default)]
pub struct CopySettings {
    /// Most bytes per second one export sends; `None`: as fast as it goes.
    pub bandwidth: Option<u64>,
}

/// The Copies service of one node agent.
#[derive(Debug, Clone)]
pub struct CopiesService {
    driver: Arc<Driver>,
    peers: Peers,
    settings: CopySettings,
}

impl CopiesService {
    /// Serves `driver`'s copies, reaching other agents through `peers`.
    pub fn new(driver: Arc<Driver>, peers: Peers, settings: CopySettings) -> Self {
        CopiesService { driver, peers, settings }
    }
}

#[tonic::async_trait]
impl Copies for CopiesService {
    async fn create_volume_from(
        &self,
        request: Request<CreateVolumeFromRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        RequireRole(Role::Controller).check(&request)?;
        let CreateVolumeFromRequest { request, source_address, source_node } = request.into_inner();
        let request = request.unwrap_or_default();
        let (driver, peers) = (self.driver.clone(), self.peers.clone());
        traced("CreateVolumeFrom", &request.name.clone(), async move {
            let new = new_volume(request)?;
            let Some(source) = new.source.clone() else {
                return Err(Error::InvalidArgument("CreateVolumeFrom needs a content source".into()));
            };
            let holders = holders_of(&source)?;
            let key = driver.key_for(Kind::Volume, &new.name);
            let own = &driver.config().node_id;
            if holders.contains(own) {
                // The source is here after all: a local copy, as CreateVolume.
                let claim = driver.claim_create(key, new.source.as_ref())?;
                let record = claimed(claim, &driver, move |d| d.create_volume(key, new)).await?;
                return Ok(csi::CreateVolumeResponse { volume: Some(volume_message(&record, &driver)) });
            }
            let from_node = match source_node {
                named if named.is_empty() => holders[0].clone(),
                named if holders.contains(&named) => named,
                named => {
                    return Err(Error::InvalidArgument(format!(
                        "node {} does not hold the source {}",
                        crate::error::quote(&named),
                        source.id()
                    )));
                }
            };
            let addr = source_addr(&source_address)?;
            let claim = driver.claim(Kind::Volume, key).map_err(|busy| match driver.copy_progress(&key) {
                Some(progress) => {
                    Error::Aborted(format!("volume {} is {}; retry later", new.name, progress.describe()))
                }
                None => busy,
            })?;
            if let Some(record) = driver.existing_volume(&key, &new)? {
                return Ok(csi::CreateVolumeResponse { volume: Some(volume_message(&record, &driver)) });
            }
            driver.check_room(&new)?;
            let target = ObjectId { key, node: own.clone() }.to_string();
            let wire_source = match source {
                ContentSource::Volume(id) => WireSource::VolumeId(id),
                ContentSource::Snapshot(id) => WireSource::SnapshotId(id),
            };
            let ask = ExportRequest { source: Some(wire_source), target_volume_id: target };
            let incoming = pull(&peers, &from_node, addr, ask).await?;
            let record = claimed(claim, &driver, move |d| d.create_volume_from(key, new, incoming)).await?;
            Ok(csi::CreateVolumeResponse { volume: Some(volume_message(&record, &driver)) })
        })
        .await
    }

    async fn cut_snapshot(
        &self,
        request: Request<CutSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        RequireRole(Role::Controller).check(&request)?;
        let CutSnapshotRequest { request, copy_nodes, copy_held, gone_copy_node } = request.into_inner();
        let req = request.unwrap_or_default();
        let driver = self.driver.clone();
        traced("CutSnapshot", &req.name.clone(), async move {
            validate_name("snapshot", &req.name)?;
            validate::required_id("source volume id", &req.source_volume_id)?;
            if validate::snapshot_parameters(&req.parameters)? != Protection::OffNode {
                return Err(Error::InvalidArgument(format!(
                    "CutSnapshot makes snapshots with {PROTECTION_PARAMETER}: {}; others are CreateSnapshot's",
                    Protection::OffNode.name()
                )));
            }
            for node in copy_nodes.iter().chain(Some(&gone_copy_node).filter(|n| !n.is_empty())) {
                validate_node_id(node)?;
            }
            let gone_copy_node = Some(gone_copy_node).filter(|n| !n.is_empty());
            let key = driver.key_for(Kind::Snapshot, &req.name);
            let record = claimed(driver.claim(Kind::Snapshot, key)?, &driver, move |d| {
                if copy_held {
                    d.confirm_snapshot_copy(key, &req.name, &req.source_volume_id)
                } else {
                    d.cut_protected_snapshot(
                        key,
                        &req.name,
                        &req.source_volume_id,
                        &copy_nodes,
                        gone_copy_node.as_deref(),
                    )
                }
            })
            .await?;
            Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
        })
        .await
    }

    async fn copy_snapshot(
        &self,
        request: Request<CopySnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        RequireRole(Role::Controller).check(&request)?;
        let CopySnapshotRequest { snapshot, name, source_address } = request.into_inner();
        let snapshot = snapshot.unwrap_or_default();
        let (driver, peers) = (self.driver.clone(), self.peers.clone());
        traced("CopySnapshot", &snapshot.snapshot_id.clone(), async move {
            let own = driver.config().node_id.clone();
            let id = SnapshotId::parse(&snapshot.snapshot_id).filter(|id| id.copy.as_ref() == Some(&own)).ok_or_else(
                || {
                    Error::InvalidArgument(format!(
                        "snapshot {} is not one whose copy this node ({own}) keeps",
                        crate::error::quote(&snapshot.snapshot_id)
                    ))
                },
            )?;
            validate_name("snapshot", &name)?;
            let key = id.key;
            let claim = driver.claim(Kind::Snapshot, key).map_err(|busy| match driver.copy_progress(&key) {
                Some(progress) => {
                    Error::Aborted(format!("the copy of snapshot {id} is {}; retry later", progress.describe()))
                }
                None => busy,
            })?;
            if let Some(record) = driver.existing_snapshot_copy(&key, &snapshot.snapshot_id)? {
                return Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) });
            }
            let addr = source_addr(&source_address)?;
            let ask = ExportRequest {
                source: Some(WireSource::SnapshotId(id.to_string())),
                target_volume_id: format!("its copy on node {own}"),
            };
            let incoming = pull(&peers, &id.node, addr, ask).await?;
            let created = snapshot.creation_time.unwrap_or_default();
            let copy = SnapshotCopy {
                id: id.to_string(),
                name,
                source_volume_id: snapshot.source_volume_id,
                size_bytes: incoming.capacity_bytes,
                // The origin reports the restore size, at most the capacity.
                restore_bytes: u64::try_from(snapshot.size_bytes)
                    .ok()
                    .filter(|asked| *asked > 0 && *asked < incoming.capacity_bytes),
                created_secs: created.seconds,
                created_nanos: created.nanos,
            };
            let record = claimed(claim, &driver, move |d| d.receive_snapshot(key, copy, incoming)).await?;
            Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot_message(&record)) })
        })
        .await
    }

    type ExportStream = ReceiverStream<std::result::Result<ExportFrame, Status>>;

    async fn export(&self, request: Request<ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        RequireRole(Role::Peer).check(&request)?;
        let ExportRequest { source, target_volume_id } = request.into_inner();
        let (driver, bandwidth) = (self.driver.clone(), self.settings.bandwidth);
        let id = match &source {
            Some(WireSource::VolumeId(id) | WireSource::SnapshotId(id)) => id.clone(),
            None => String::new(),
        };
        traced("Export", &id.clone(), async move {
            let source = match source {
                Some(WireSource::VolumeId(id)) => ContentSource::Volume(id),
                Some(WireSource::SnapshotId(id)) => ContentSource::Snapshot(id),
                None => return Err(Error::InvalidArgument("Export needs a volume or snapshot id".into())),
            };
            let claim = match &source {
                ContentSource::Volume(id) => {
                    validate::required_id("volume id", id)?;
                    driver.claim(Kind::Volume, driver.volume_key(id)?)?
                }
                ContentSource::Snapshot(id) => {
                    validate::required_id("snapshot id", id)?;
                    driver.claim(Kind::Snapshot, driver.snapshot_key(id)?)?
                }
            };
            let exporting = driver.clone();
            let export = blocking(move || exporting.export(&source, claim)).await?;
            let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
            let header = ExportHeader {
                content: match export.sender.carried() {
                    Carried::Image => Content::Image,
                    Carried::Tree => Content::Tree,
                } as i32,
                capacity_bytes: export.capacity_bytes,
                data_bytes: export.sender.data_bytes(),
            };
            tx.send(Ok(ExportFrame { frame: Some(Wire::Header(header)) }))
                .await
                .map_err(|_| Error::Aborted("the receiving agent went away".into()))?;
            let span = tracing::info_span!("export", source = %id, target = %target_volume_id);
            tokio::task::spawn_blocking(move || span.in_scope(|| send_pieces(export, &tx, bandwidth)));
            Ok(ReceiverStream::new(rx))
        })
        .await
    }
}

/// The nodes holding `source`: the node in a volume's or snapshot's id, and
/// the copy's node of a snapshot kept off node.
fn holders_of(source: &ContentSource) -> Result<Vec<String>> {
    let holders = match source {
        ContentSource::Volume(id) => ObjectId::parse(id).map(|id| vec![id.node]),
        ContentSource::Snapshot(id) => SnapshotId::parse(id).map(|id| id.holders().map(str::to_owned).collect()),
    };
    holders.ok_or_else(|| Error::NotFound(format!("source {} does not exist (not an id Loam made)", source.id())))
}

/// The address of the agent to pull from, as the controller sent it.
fn source_addr(text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        Error::InvalidArgument(format!("source address {} is not an IP address and port", crate::error::quote(text)))
    })
}

/// Starts pulling `ask` from the agent of `node` at `addr`: the stream,
/// once its header said what it carries.
async fn pull(peers: &Peers, node: &str, addr: SocketAddr, ask: ExportRequest) -> Result<Incoming> {
    let mut stream = peers.export(node, addr, ask).await?;
    let header = match stream.message().await {
        Ok(Some(ExportFrame { frame: Some(Wire::Header(header)) })) => header,
        Ok(_) => return Err(malformed(node, "it did not start with a header")),
        Err(status) => return Err(cut_short(node, &status)),
    };
    let carried = match header.content() {
        Content::Image => Carried::Image,
        Content::Tree => Carried::Tree,
        Content::Unspecified => return Err(malformed(node, "its header names no content")),
    };
    Ok(Incoming {
        from_node: node.to_owned(),
        carried,
        capacity_bytes: header.capacity_bytes,
        data_bytes: header.data_bytes,
        pieces: receive_pieces(stream, node.to_owned()),
    })
}

/// Sends every piece of `export` into `tx` (from a blocking thread), at most
/// `bandwidth` bytes per second; stops when the receiver goes away. The
/// export's cut and claim go with it when this returns.
fn send_pieces(
    mut export: Export,
    tx: &mpsc::Sender<std::result::Result<ExportFrame, Status>>,
    bandwidth: Option<u64>,
) {
    let started = Instant::now();
    let mut sent = 0u64;
    for piece in &mut export.sender {
        let frame = match piece {
            Ok(piece) => piece,
            Err(e) => {
                tracing::warn!("reading the source failed: {e}; the copy is cut short and the receiver retries");
                let status = Error::io("reading the source of a copy", e);
                let _ = tx.blocking_send(Err(status.into()));
                return;
            }
        };
        let bytes = frame.data_len();
        if tx.blocking_send(Ok(to_wire(frame))).is_err() {
            tracing::warn!(sent, "the receiving agent went away; the copy is cut short");
            return;
        }
        sent += bytes;
        crate::metrics::global().copied("sent", bytes);
        if let Some(limit) = bandwidth.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(sent as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    tracing::info!(sent, elapsed = ?started.elapsed(), "export sent");
}

/// The pieces of an export stream, read on the driver's blocking thread;
/// the stream is read by a task of its own, a few frames ahead.
fn receive_pieces(
    mut stream: tonic::Streaming<ExportFrame>,
    node: String,
) -> Box<dyn Iterator<Item = Result<Piece>> + Send> {
    let (tx, mut rx) = mpsc::channel(FRAMES_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            let piece = match stream.message().await {
                Ok(Some(frame)) => from_wire(frame).map_err(|what| malformed(&node, &what)),
                // The end of the stream: the driver decides whether it was whole.
                Ok(None) => return,
                Err(status) => Err(cut_short(&node, &status)),
            };
            let failed = piece.is_err();
            // The driver stopped reading (it failed): dropping the stream
            // tells the source to stop.
            if tx.send(piece).await.is_err() || failed {
                return;
            }
        }
    });
    Box::new(std::iter::from_fn(move || rx.blocking_recv()))
}

fn malformed(node: &str, what: &str) -> Error {
    Error::Aborted(format!(
        "the copy from node {node} was refused: {what}; nothing was kept; if this repeats, the two nodes run Loam \
         versions that do not agree"
    ))
}

fn cut_short(node: &str, status: &Status) -> Error {
    Error::Aborted(format!(
        "the copy from node {node} was cut short: {}; nothing was kept, and the retry starts it again",
        status.message()
    ))
}
