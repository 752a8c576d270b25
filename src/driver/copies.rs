//! Copies between nodes, this node's side of either end.
//!
//! - **Sending** ([`Driver::export`]): a snapshot is sent as it is (it never
//!   changes; its claim is held while it is sent, so it cannot be deleted
//!   mid-copy). A volume is cut first, as CreateSnapshot would cut it (a
//!   staged `loop` filesystem frozen around a reflink, a btrfs snapshot), into
//!   a snapshot no record names, which is removed when the copy ends. A volume
//!   in use whose cut would be a file-by-file copy, not one instant, is
//!   refused: a copy to another node must be point in time. The cut's name is
//!   written to `exports/` before it is made, so a crash that leaves one
//!   behind, whole or half made, is cleaned up at the next start.
//! - **Receiving** ([`Driver::create_volume_from`]): the volume is made as
//!   CreateVolume makes one, its storage filled from the incoming pieces
//!   under a temporary name and renamed into place only after the content
//!   checked out against the sender's digest; the record is written last. A
//!   cut connection leaves no record and no storage, and the retry starts
//!   over. The volume's key is written to `volume-copies/` before anything
//!   is received, so what a crash leaves (storage half received, or whole
//!   under the real name without its record: never reported complete) is
//!   removed at the next start, whether the CO retries or not (it may have
//!   given up). While a copy runs it holds the volume's
//!   claim, so a retry is ABORTED; [`Driver::copy_progress`] says how far it
//!   got, for that answer and for ControllerGetVolume.
//! - **Keeping a snapshot's copy** ([`Driver::receive_snapshot`]): the
//!   other node of a snapshot kept off node receives it as a volume is
//!   received, under a temporary name, checked against the sender's digest,
//!   and records it only then, under the same id as its source node's record.
//!   Its key is written to `snapshot-copies/` first, so a crash anywhere
//!   before the record leaves nothing the next start does not remove.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Driver, NewVolume};
use crate::backend::transfer::{Carried, Piece, ReceiveError, Receiver, Sender};
use crate::backend::{BackendKind, Fill, Layout, Provisioning};
use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::guard::Guard;
use crate::ids::{Key, Kind};
use crate::records::{ContentSource, Schema, SnapshotRecord, VolumeRecord};

use super::Stillness;

/// How often a running copy logs its progress.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// What another node sends for a new volume of this node.
pub struct Incoming {
    /// The node it comes from.
    pub from_node: String,
    /// What it carries.
    pub carried: Carried,
    /// The source's capacity: the least the new volume gets.
    pub capacity_bytes: u64,
    /// The bytes of data it will carry, for progress.
    pub data_bytes: u64,
    /// The pieces, in order; an error ends the copy (a cut connection).
    pub pieces: Box<dyn Iterator<Item = Result<Piece>> + Send>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("from_node", &self.from_node)
            .field("carried", &self.carried)
            .field("capacity_bytes", &self.capacity_bytes)
            .finish_non_exhaustive()
    }
}

/// What the node a snapshot kept off node was cut on recorded of it: its
/// copy's record says the same.
#[derive(Debug, Clone)]
pub struct SnapshotCopy {
    /// The id, naming both holders.
    pub id: String,
    /// The CSI name.
    pub name: String,
    /// The volume it was taken of.
    pub source_volume_id: String,
    /// The capacity of that volume then.
    pub size_bytes: u64,
    /// What the snapshot tells a restore to ask for, when less.
    pub restore_bytes: Option<u64>,
    /// When it was taken: seconds since the Unix epoch.
    pub created_secs: i64,
    /// When it was taken: nanoseconds within that second.
    pub created_nanos: i32,
}

/// A volume or snapshot of this node being sent to another node.
#[derive(Debug)]
pub struct Export {
    /// The source's capacity.
    pub capacity_bytes: u64,
    /// What to send.
    pub sender: Sender,
    /// The cut made for it, removed when the export ends.
    _cut: Option<Cut>,
    /// The snapshot's claim, held while it is read.
    _claim: Option<Guard>,
}

/// A cut of a volume made for one export: a snapshot no record names.
#[derive(Debug)]
struct Cut {
    driver: Arc<Driver>,
    key: Key,
    backend: BackendKind,
}

impl Drop for Cut {
    fn drop(&mut self) {
        if let Err(e) = self.driver.remove_cut(&self.key, Some(self.backend)) {
            tracing::warn!(cut = %self.key, "cannot remove the cut of a copy to another node: {e}; the next start removes it");
        }
    }
}

/// How far one incoming copy got.
#[derive(Debug)]
pub struct Progress {
    /// The volume or snapshot it copies.
    pub source: String,
    /// The node it comes from.
    pub from_node: String,
    /// The room it holds back until it is written: the new volume's
    /// capacity, or a snapshot copy's data.
    pub capacity_bytes: u64,
    /// The bytes of data the sender said it would send.
    pub data_bytes: u64,
    /// The bytes received so far.
    pub received: AtomicU64,
    started: Instant,
}

impl Progress {
    /// Where the copy stands, in words.
    pub fn describe(&self) -> String {
        let received = self.received.load(Ordering::Relaxed);
        let of = match self.data_bytes {
            0 => String::new(),
            total => format!(" of {total}"),
        };
        format!(
            "being copied from {} on node {}: {received}{of} bytes after {:.0?}",
            self.source,
            self.from_node,
            self.started.elapsed()
        )
    }
}

/// The copies this node is receiving, by volume.
#[derive(Debug, Default)]
pub struct Copies(Mutex<BTreeMap<Key, Arc<Progress>>>);

impl Copies {
    fn get(&self, key: &Key) -> Option<Arc<Progress>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Bytes of capacity promised to copies in flight and not received yet.
    pub fn unreceived(&self) -> u64 {
        let copies = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        copies.values().map(|p| p.capacity_bytes.saturating_sub(p.received.load(Ordering::Relaxed))).sum()
    }

    /// How many copies are in flight.
    pub fn in_flight(&self) -> u64 {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len() as u64
    }
}

/// Takes a copy out of [`Copies`] and gives back the room it held when it
/// ends, however it ends (a finished volume promises its own).
struct Running<'a> {
    driver: &'a Driver,
    key: Key,
    capacity: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.driver.copies.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
        self.driver.fulfil(self.capacity);
    }
}

impl Driver {
    /// The volume called as `req` asks, if it exists already (a retry): the
    /// copy need not be started again. ALREADY_EXISTS when it differs.
    pub fn existing_volume(&self, key: &Key, req: &NewVolume) -> Result<Option<Arc<VolumeRecord>>> {
        match self.volumes.get(key) {
            Some(existing) => self.check_same_volume(existing, req).map(Some),
            None => Ok(None),
        }
    }

    /// Refuses, before anything is asked of the source's node, a copy this
    /// node cannot take whatever the source holds: the topology or a
    /// capability rules it out, or it lacks room for the capacity asked.
    pub fn check_room(&self, req: &NewVolume) -> Result<()> {
        self.check_fit(req)?;
        self.room_for(req, 0).map(drop)
    }

    /// Where the copy making the volume stands, while one runs.
    pub fn copy_progress(&self, key: &Key) -> Option<Arc<Progress>> {
        self.copies.get(key)
    }

    /// Makes a volume filled with what another node sends (see the module's
    /// description); the caller holds the volume's claim.
    pub fn create_volume_from(&self, key: Key, req: NewVolume, incoming: Incoming) -> Result<Arc<VolumeRecord>> {
        self.check_fit(&req)?;
        if let Some(existing) = self.existing_volume(&key, &req)? {
            return Ok(existing);
        }
        let provisioning = match (&req.layout, incoming.carried) {
            (Layout::Loop(spec), Carried::Image) => spec.provisioning,
            // A directory has no provisioning; the quota holds its capacity.
            (Layout::Dir, Carried::Tree) => Provisioning::Thin,
            (layout, carried) => {
                return Err(Error::InvalidArgument(format!(
                    "the source is {}, which a {} volume cannot hold; restore or clone it into a volume of its \
                     source's backend",
                    carried.describe(),
                    layout.backend().name()
                )));
            }
        };
        let capacity = self.room_for(&req, incoming.capacity_bytes)?;
        let source = match &req.source {
            Some(ContentSource::Volume(id) | ContentSource::Snapshot(id)) => id.clone(),
            None => return Err(Error::InvalidArgument("a copy from another node needs a content source".into())),
        };
        let progress = Arc::new(Progress {
            source,
            from_node: incoming.from_node.clone(),
            capacity_bytes: capacity,
            data_bytes: incoming.data_bytes,
            received: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.copies.0.lock().unwrap_or_else(PoisonError::into_inner).insert(key, progress.clone());
        let running = Running { driver: self, key, capacity };
        // Held back at once, not at the next measurement (which counts what
        // the copy has not written yet): a create racing this one must not
        // get the same room.
        self.promise(capacity);
        let backend = req.layout.backend();
        let note = self.volume_copies_dir().join(key.to_string());
        write_intent(&note, backend).context(|| format!("recording the copy {}", note.display()))?;
        tracing::info!(volume = %req.name, from = %progress.source, node = %progress.from_node, bytes = progress.data_bytes, "copy from another node started");

        let mut failure: Option<Error> = None;
        let mut pieces = incoming.pieces;
        let carried = incoming.carried;
        let mut receive = |path: &std::path::Path| -> io::Result<()> {
            let outcome = receive_into(path, carried, provisioning, &mut pieces, &progress);
            outcome.map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                io::Error::other(message)
            })
        };
        let made = self.backends.create_volume(&key, &req.layout, capacity, Fill::Receive(&mut receive));
        let enforcement = match made {
            Ok(enforcement) => enforcement,
            Err(e) => {
                let e = failure.take().unwrap_or(e);
                tracing::warn!(volume = %req.name, from = %progress.source, "copy from another node failed: {e}");
                // The note stays unless the storage is surely gone: the
                // next start removes what is left.
                match self.backends.remove_unrecorded_volume(&key, Some(backend)) {
                    Ok(()) => {
                        let _ = durable::remove(&note);
                    }
                    Err(left) => {
                        tracing::warn!(volume = %req.name, "cannot remove what the failed copy left: {left}; the next start removes it")
                    }
                }
                return Err(e);
            }
        };
        tracing::info!(volume = %req.name, from = %progress.source, bytes = progress.received.load(Ordering::Relaxed), elapsed = ?progress.started.elapsed(), "copy from another node verified and complete");
        drop(running);
        // Verified storage under the real name, no record yet: the retry
        // must copy again over it, never take it as the volume, and the
        // next start removes it.
        crate::failpoint!("volume.received");
        let record = self.record_new_volume(key, req, capacity, enforcement, None)?;
        durable::remove(&note).context(|| format!("removing {}", note.display()))?;
        Ok(record)
    }

    fn volume_copies_dir(&self) -> PathBuf {
        self.config.root.join("volume-copies")
    }

    /// Keeps this node's copy of a snapshot kept off node, filled with what
    /// its source node sends (see the module's description); the caller
    /// holds the snapshot's claim. A retry finds the record and sends nothing.
    pub fn receive_snapshot(&self, key: Key, copy: SnapshotCopy, incoming: Incoming) -> Result<Arc<SnapshotRecord>> {
        if let Some(existing) = self.existing_snapshot_copy(&key, &copy.id)? {
            return Ok(existing);
        }
        let backend = match incoming.carried {
            Carried::Image => BackendKind::Loop,
            Carried::Tree => BackendKind::Dir,
        };
        // A snapshot is promised nothing: what it takes is what it holds.
        let needed = incoming.data_bytes;
        let free = self.capacity()?;
        if needed > free {
            return Err(Error::ResourceExhausted(format!(
                "the copy of snapshot {} needs {needed} bytes but {} has {free} bytes not yet promised to volumes; \
                 free space on node {}",
                copy.id,
                self.config.root.display(),
                self.config.node_id
            )));
        }
        let progress = Arc::new(Progress {
            source: copy.id.clone(),
            from_node: incoming.from_node.clone(),
            capacity_bytes: needed,
            data_bytes: incoming.data_bytes,
            received: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.copies.0.lock().unwrap_or_else(PoisonError::into_inner).insert(key, progress.clone());
        let running = Running { driver: self, key, capacity: needed };
        self.promise(needed);
        let note = self.snapshot_copies_dir().join(key.to_string());
        write_intent(&note, backend).context(|| format!("recording the copy {}", note.display()))?;
        tracing::info!(snapshot = %copy.id, node = %progress.from_node, bytes = needed, "copy of a snapshot from another node started");

        let mut failure: Option<Error> = None;
        let mut pieces = incoming.pieces;
        let carried = incoming.carried;
        let mut receive = |path: &std::path::Path| -> io::Result<()> {
            // Snapshot images stay as sparse as their source sent them.
            receive_into(path, carried, Provisioning::Thin, &mut pieces, &progress).map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                io::Error::other(message)
            })
        };
        if let Err(e) = self.backends.receive_snapshot(&key, backend, &mut receive) {
            let e = failure.take().unwrap_or(e);
            tracing::warn!(snapshot = %copy.id, "copy of a snapshot from another node failed: {e}");
            // The storage is gone already; the note goes too (or the next start takes it).
            let _ = durable::remove(&note);
            return Err(e);
        }
        tracing::info!(snapshot = %copy.id, bytes = progress.received.load(Ordering::Relaxed), elapsed = ?progress.started.elapsed(), "copy of a snapshot from another node verified and complete");
        drop(running);
        // Verified storage under the real name and its note, no record: the
        // next start removes both, the retry copies again.
        crate::failpoint!("snapshot.copy.received");
        let record = SnapshotRecord {
            schema: Schema,
            id: copy.id,
            name: copy.name,
            source_volume_id: copy.source_volume_id,
            backend,
            size_bytes: copy.size_bytes,
            restore_bytes: copy.restore_bytes,
            created_secs: copy.created_secs,
            created_nanos: copy.created_nanos,
            group_snapshot_id: None,
            awaiting_copy: false,
        };
        let record = self.snapshots.put(key, record)?;
        durable::remove(&note).context(|| format!("removing {}", note.display()))?;
        Ok(record)
    }

    /// This node's copy of the snapshot `id`, when a retry finds it made;
    /// ALREADY_EXISTS when the key holds another snapshot.
    pub fn existing_snapshot_copy(&self, key: &Key, id: &str) -> Result<Option<Arc<SnapshotRecord>>> {
        match self.snapshots.get(key) {
            Some(existing) if existing.id == id => Ok(Some(existing)),
            Some(existing) => Err(Error::AlreadyExists(format!(
                "this node holds snapshot {} under the key of {id}; its name was used twice",
                existing.id
            ))),
            None => Ok(None),
        }
    }

    fn snapshot_copies_dir(&self) -> PathBuf {
        self.config.root.join("snapshot-copies")
    }

    /// Removes what a crash left of copies from other nodes (start-up), of
    /// snapshots and of volumes; see [`Self::remove_unfinished`].
    pub(super) fn remove_unfinished_copies(&self) -> Result<()> {
        self.remove_unfinished(Copied::Snapshot)?;
        self.remove_unfinished(Copied::Volume)
    }

    /// Removes what a crash left of one kind of copy: a note without
    /// a record is a copy never reported complete, so its storage, half
    /// received or whole, goes; a note beside a record is only the note.
    /// Like the other repairs, a removal that fails is logged and its note
    /// kept for the next start: the driver starts anyway.
    fn remove_unfinished(&self, copied: Copied) -> Result<()> {
        let dir = match copied {
            Copied::Volume => self.volume_copies_dir(),
            Copied::Snapshot => self.snapshot_copies_dir(),
        };
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        for entry in fs::read_dir(&dir).context(|| format!("reading {}", dir.display()))? {
            let entry = entry.context(|| format!("reading {}", dir.display()))?;
            let Some(key) = entry.file_name().to_str().and_then(Key::parse) else { continue };
            let recorded = match copied {
                Copied::Volume => self.volumes.get(&key).is_some(),
                Copied::Snapshot => self.snapshots.get(&key).is_some(),
            };
            if !recorded {
                let backend = BackendKind::parse(fs::read_to_string(entry.path()).unwrap_or_default().trim());
                let what = copied.name();
                tracing::warn!(%key, "removing the unfinished copy of a {what} from another node that a crash left behind");
                let removed = match copied {
                    Copied::Volume => self.backends.remove_unrecorded_volume(&key, backend),
                    Copied::Snapshot => self.backends.delete_snapshot(&key, backend),
                };
                if let Err(e) = removed {
                    tracing::warn!(%key, "cannot remove the unfinished copy of a {what}: {e}; the next start tries again");
                    continue;
                }
            }
            durable::remove(&entry.path()).context(|| format!("removing {}", entry.path().display()))?;
        }
        Ok(())
    }

    /// Prepares a copy of this node's volume or snapshot `source` for
    /// another node (see the module's description). The caller holds the
    /// source's claim and hands it over: a snapshot keeps it until the
    /// export ends.
    pub fn export(self: &Arc<Self>, source: &ContentSource, claim: Guard) -> Result<Export> {
        match source {
            ContentSource::Snapshot(id) => {
                let key = self.snapshot_key(id)?;
                let snapshot = self
                    .snapshots
                    .get(&key)
                    .ok_or_else(|| Error::NotFound(format!("source snapshot {id} does not exist")))?;
                let (carried, path) = self.backends.snapshot_content(&key, snapshot.backend)?;
                let sender = Sender::open(carried, &path).context(|| format!("opening {}", path.display()))?;
                Ok(Export { capacity_bytes: snapshot.size_bytes, sender, _cut: None, _claim: Some(claim) })
            }
            ContentSource::Volume(id) => {
                let key = self.volume_key(id)?;
                let volume = self.volume(&key)?;
                if self.stillness(&key, &volume)? == Stillness::Copied {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is in use and its content can only be copied file by file (a dir volume on a \
                         root that is not btrfs, or a raw block image on a filesystem without reflinks), which is \
                         not one point in time; stop the pods using it, or clone it on its own node"
                    )));
                }
                let cut = self.cut_for_export(&key, &volume)?;
                let (carried, path) = self.backends.snapshot_content(&cut.key, cut.backend)?;
                let sender = Sender::open(carried, &path).context(|| format!("opening {}", path.display()))?;
                // The cut is the export's own: the volume is free again.
                drop(claim);
                Ok(Export { capacity_bytes: volume.capacity_bytes, sender, _cut: Some(cut), _claim: None })
            }
        }
    }

    /// Cuts `volume` into a snapshot no record names, its name written down
    /// first so a crash cannot leave it behind unnoticed.
    fn cut_for_export(self: &Arc<Self>, key: &Key, volume: &VolumeRecord) -> Result<Cut> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let cut = Key::for_name(Kind::Snapshot, &format!("loam-export:{}:{nanos}", volume.id));
        let backend = volume.layout.backend();
        let intent = self.cuts_dir().join(cut.to_string());
        write_intent(&intent, backend).context(|| format!("recording the cut {}", intent.display()))?;
        // A note whose cut was never made: the next start removes the note.
        crate::failpoint!("export.intent");
        let cut = Cut { driver: self.clone(), key: cut, backend };
        self.backends.create_snapshot(key, volume, &cut.key, true)?;
        // A whole cut nobody streams: the next start removes it and its note.
        crate::failpoint!("export.cut");
        Ok(cut)
    }

    fn cuts_dir(&self) -> PathBuf {
        self.config.root.join("exports")
    }

    /// Removes a cut and then the note of it.
    fn remove_cut(&self, key: &Key, backend: Option<BackendKind>) -> Result<()> {
        self.backends.delete_snapshot(key, backend)?;
        let intent = self.cuts_dir().join(key.to_string());
        durable::remove(&intent).context(|| format!("removing {}", intent.display()))
    }

    /// Removes the cuts a crash left behind (start-up).
    pub(super) fn remove_leftover_cuts(&self) -> Result<()> {
        let dir = self.cuts_dir();
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        for entry in fs::read_dir(&dir).context(|| format!("reading {}", dir.display()))? {
            let entry = entry.context(|| format!("reading {}", dir.display()))?;
            let Some(key) = entry.file_name().to_str().and_then(Key::parse) else { continue };
            let backend = BackendKind::parse(fs::read_to_string(entry.path()).unwrap_or_default().trim());
            tracing::warn!(cut = %key, "removing the cut of a copy to another node that a crash left behind");
            self.remove_cut(&key, backend)?;
        }
        Ok(())
    }
}

/// Writes the note of a cut: its backend's name, durably.
fn write_intent(path: &std::path::Path, backend: BackendKind) -> io::Result<()> {
    let mut file = fs::File::create(path)?;
    file.write_all(backend.name().as_bytes())?;
    file.sync_all()?;
    durable::sync_dir(path.parent().unwrap_or(std::path::Path::new("/")))
}

/// Receives every piece into new storage at `path`; complete only when the
/// end arrived and checked out.
fn receive_into(
    path: &std::path::Path,
    carried: Carried,
    provisioning: Provisioning,
    pieces: &mut dyn Iterator<Item = Result<Piece>>,
    progress: &Progress,
) -> Result<()> {
    let mut receiver = Receiver::create(carried, path, provisioning)
        .context(|| format!("creating {} for the copy", path.display()))?;
    let mut logged = Instant::now();
    for piece in pieces {
        let piece = piece?;
        let bytes = piece.data_len();
        match receiver.apply(piece) {
            Ok(Some(data_bytes)) => {
                progress.received.store(data_bytes, Ordering::Relaxed);
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => return Err(receive_error(e, progress)),
        }
        let received = progress.received.fetch_add(bytes, Ordering::Relaxed) + bytes;
        crate::metrics::global().copied("received", bytes);
        if logged.elapsed() >= PROGRESS_LOG_EVERY {
            logged = Instant::now();
            tracing::info!(from = %progress.source, received, of = progress.data_bytes, "copy from another node in progress");
        }
    }
    Err(Error::Aborted(format!(
        "the copy from {} on node {} ended after {} bytes without its end; nothing was kept, and the retry starts it \
         again",
        progress.source,
        progress.from_node,
        progress.received.load(Ordering::Relaxed)
    )))
}

/// What a refused stream means for the CreateVolume that asked for it.
fn receive_error(e: ReceiveError, progress: &Progress) -> Error {
    let from = format!("the copy from {} on node {}", progress.source, progress.from_node);
    match e {
        ReceiveError::Mismatch => Error::Aborted(format!(
            "{from} does not match its source (digest mismatch); nothing was kept, and the retry copies again"
        )),
        ReceiveError::Malformed(what) => Error::Aborted(format!(
            "{from} was refused: {what}; nothing was kept; if this repeats, the two nodes run Loam versions that do not agree"
        )),
        ReceiveError::Io(e) => Error::io(format!("writing {from}"), e),
    }
}

/// What a copy from another node makes here, for the start-up repair.
#[derive(Clone, Copy)]
enum Copied {
    Volume,
    Snapshot,
}

impl Copied {
    fn name(self) -> &'static str {
        match self {
            Copied::Volume => "volume",
            Copied::Snapshot => "snapshot",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;

    use super::*;
    use crate::backend::LoopSpec;
    use crate::backend::transfer::Frame;
    use crate::driver::{CapacityRange, test_driver, test_driver_on};
    use crate::kernel::blockfs::FsType;

    fn loop_request(name: &str, mib: u64, source: Option<ContentSource>) -> NewVolume {
        NewVolume {
            name: name.into(),
            capacity: CapacityRange { required: mib << 20, limit: 0 },
            capabilities: Vec::new(),
            parameters: BTreeMap::new(),
            mutable_parameters: BTreeMap::new(),
            layout: Layout::Loop(LoopSpec { fs: FsType::Ext4, provisioning: Provisioning::Thin, mkfs_options: vec![] }),
            source,
            allowed_nodes: None,
        }
    }

    /// A source node with an 8 MiB loop volume holding data, and its id.
    fn source_node(root: &std::path::Path) -> (Arc<Driver>, String) {
        let driver = Arc::new(test_driver(root));
        let key = Key::for_name(Kind::Volume, "primary");
        let record = driver.create_volume(key, loop_request("primary", 8, None)).unwrap();
        let image = fs::OpenOptions::new().write(true).open(root.join("volumes").join(format!("{key}.img"))).unwrap();
        image.write_all_at(b"rows", 0).unwrap();
        image.write_all_at(&[5u8; 100_000], 3 << 20).unwrap();
        (driver, record.id.clone())
    }

    /// What the source node sends for `source`, as the receiving node reads it.
    fn incoming(export: Export) -> Incoming {
        let Export { capacity_bytes, sender, _cut, _claim } = export;
        let (carried, data_bytes) = (sender.carried(), sender.data_bytes());
        // The cut lives as long as the pieces are read.
        let pieces = sender.map(move |piece| {
            let _hold = (&_cut, &_claim);
            piece.map_err(|e| Error::io("reading", e))
        });
        Incoming { from_node: "a".into(), carried, capacity_bytes, data_bytes, pieces: Box::new(pieces) }
    }

    fn export_of(driver: &Arc<Driver>, id: &str) -> Export {
        driver.export(&ContentSource::Volume(id.into()), driver.claim(Kind::Volume, key_of(id)).unwrap()).unwrap()
    }

    fn key_of(id: &str) -> Key {
        crate::ids::ObjectId::parse(id).unwrap().key
    }

    fn image_of(root: &std::path::Path, key: &Key) -> std::path::PathBuf {
        root.join("volumes").join(format!("{key}.img"))
    }

    /// Only the volume images in `root/volumes`, nothing half made.
    fn leftovers(root: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(root.join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_copy_arrives_whole_and_leaves_no_cut_behind() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id) = source_node(a.path());
        let target = test_driver(b.path());
        let key = Key::for_name(Kind::Volume, "replica");
        let request = loop_request("replica", 8, Some(ContentSource::Volume(id.clone())));
        let record = target.create_volume_from(key, request, incoming(export_of(&source, &id))).unwrap();
        assert_eq!(record.source, Some(ContentSource::Volume(id.clone())));
        let source_image = image_of(a.path(), &key_of(&id));
        assert_eq!(fs::read(image_of(b.path(), &key)).unwrap(), fs::read(source_image).unwrap());
        assert_eq!(fs::read_dir(a.path().join("exports")).unwrap().count(), 0, "the cut's note is gone");
        assert_eq!(fs::read_dir(a.path().join("snapshots")).unwrap().count(), 0, "the cut is gone");
        assert!(target.copy_progress(&key).is_none());
        assert_eq!(target.copies.unreceived(), 0);
    }

    /// Every name in `root`'s volumes/, volume-copies/ and volume records.
    fn volume_files(root: &std::path::Path) -> Vec<String> {
        let mut names = Vec::new();
        for dir in ["volumes", "volume-copies", "meta/volumes"] {
            for entry in fs::read_dir(root.join(dir)).unwrap() {
                names.push(format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy()));
            }
        }
        names.sort();
        names
    }

    /// Receives `incoming` into `target`, whose process dies after the first
    /// piece: a panic in the stream stands in for SIGKILL (none of the
    /// copy's own clean-up on failure runs), then the node starts again.
    fn die_mid_receive(root: &std::path::Path, key: Key, request: NewVolume, mut incoming: Incoming) -> Driver {
        let target = test_driver(root);
        let first = incoming.pieces.next().unwrap();
        let rest = std::iter::once(()).map(|()| -> Result<Piece> { panic!("the node dies mid-copy") });
        incoming.pieces = Box::new(std::iter::once(first).chain(rest));
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            target.create_volume_from(key, request, incoming)
        }));
        assert!(died.is_err(), "the copy reached the kill");
        drop(target);
        test_driver(root)
    }

    #[test]
    fn a_copy_half_received_when_its_node_died_is_removed_at_the_next_start_without_a_retry() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id) = source_node(a.path());
        let key = Key::for_name(Kind::Volume, "replica");
        let request = || loop_request("replica", 8, Some(ContentSource::Volume(id.clone())));
        let restarted = die_mid_receive(b.path(), key, request(), incoming(export_of(&source, &id)));
        assert_eq!(volume_files(b.path()), Vec::<String>::new(), "nothing of the copy is left");
        assert!(restarted.volume(&key).is_err());
        assert_eq!(restarted.copies.unreceived(), 0);
        // A retry, if the CO still makes one, starts over.
        restarted.create_volume_from(key, request(), incoming(export_of(&source, &id))).unwrap();
        assert_eq!(volume_files(b.path()), [format!("meta/volumes/{key}.json"), format!("volumes/{key}.img")]);
    }

    #[test]
    fn a_dir_copy_half_received_when_its_node_died_is_removed_at_the_next_start() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = Arc::new(test_driver(a.path()));
        let primary = Key::for_name(Kind::Volume, "primary");
        let dir_request = |name: &str, source| NewVolume { layout: Layout::Dir, ..loop_request(name, 8, source) };
        let id = source.create_volume(primary, dir_request("primary", None)).unwrap().id.clone();
        for n in 0..4 {
            fs::write(a.path().join("volumes").join(primary.to_string()).join(format!("f{n}")), [n; 5000]).unwrap();
        }
        let key = Key::for_name(Kind::Volume, "replica");
        let request = dir_request("replica", Some(ContentSource::Volume(id.clone())));
        let restarted = die_mid_receive(b.path(), key, request, incoming(export_of(&source, &id)));
        assert_eq!(volume_files(b.path()), Vec::<String>::new(), "nothing of the copy is left");
        assert!(restarted.volume(&key).is_err());
    }

    #[test]
    fn a_copy_verified_but_not_recorded_when_its_node_died_is_removed_at_the_next_start() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id) = source_node(a.path());
        let key = Key::for_name(Kind::Volume, "replica");
        let request = loop_request("replica", 8, Some(ContentSource::Volume(id.clone())));
        let target = test_driver(b.path());
        target.create_volume_from(key, request, incoming(export_of(&source, &id))).unwrap();
        // What the fault point volume.received leaves: the storage under
        // its name and the copy's note, no record (never reported complete).
        target.volumes.remove(&key).unwrap();
        write_intent(&b.path().join("volume-copies").join(key.to_string()), BackendKind::Loop).unwrap();
        drop(target);
        let restarted = test_driver(b.path());
        assert_eq!(volume_files(b.path()), Vec::<String>::new());
        assert!(restarted.volume(&key).is_err());
    }

    #[test]
    fn a_recorded_copy_keeps_its_storage_at_the_next_start_and_only_its_note_goes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id) = source_node(a.path());
        let key = Key::for_name(Kind::Volume, "replica");
        let request = loop_request("replica", 8, Some(ContentSource::Volume(id.clone())));
        let target = test_driver(b.path());
        target.create_volume_from(key, request, incoming(export_of(&source, &id))).unwrap();
        // A crash between the record and the note's removal.
        write_intent(&b.path().join("volume-copies").join(key.to_string()), BackendKind::Loop).unwrap();
        drop(target);
        let restarted = test_driver(b.path());
        assert_eq!(volume_files(b.path()), [format!("meta/volumes/{key}.json"), format!("volumes/{key}.img")]);
        assert!(restarted.volume(&key).is_ok());
    }

    #[test]
    fn a_cut_connection_or_a_damaged_copy_keeps_nothing_and_the_retry_converges() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id) = source_node(a.path());
        let target = test_driver(b.path());
        let key = Key::for_name(Kind::Volume, "replica");
        let request = || loop_request("replica", 8, Some(ContentSource::Volume(id.clone())));

        // The connection drops after the first frame.
        let mut cut = incoming(export_of(&source, &id));
        let first = cut.pieces.next().unwrap();
        let dropped = Error::Aborted("the copy from node a was cut short: connection reset".into());
        cut.pieces = Box::new(vec![first, Err(dropped)].into_iter());
        let err = target.create_volume_from(key, request(), cut).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
        assert!(target.volume(&key).is_err(), "no record");
        assert!(leftovers(b.path()).is_empty(), "nothing under any name: {:?}", leftovers(b.path()));

        // The stream just ends before its end frame.
        let mut short = incoming(export_of(&source, &id));
        let frames: Vec<_> = short.pieces.by_ref().collect();
        short.pieces = Box::new(frames.into_iter().rev().skip(1).rev());
        let err = target.create_volume_from(key, request(), short).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(err.to_string().contains("without its end"), "{err}");
        assert!(leftovers(b.path()).is_empty());

        // A byte changes on the way.
        let mut damaged = incoming(export_of(&source, &id));
        let pieces: Vec<_> = damaged
            .pieces
            .by_ref()
            .map(|p| match p {
                Ok(Piece::Image(Frame::Data { offset, mut bytes })) if offset == 0 => {
                    bytes[1] ^= 0x20;
                    Ok(Piece::Image(Frame::Data { offset, bytes }))
                }
                other => other,
            })
            .collect();
        damaged.pieces = Box::new(pieces.into_iter());
        let err = target.create_volume_from(key, request(), damaged).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(leftovers(b.path()).is_empty());
        assert_eq!(target.copies.unreceived(), 0, "failed copies hold no room");

        // The retry gets it all.
        target.create_volume_from(key, request(), incoming(export_of(&source, &id))).unwrap();
        assert_eq!(leftovers(b.path()), [format!("{key}.img")]);
    }

    /// A snapshot of node "n" kept off node, its copy on node "m": the
    /// source's driver, the id, and what its copy's record says.
    fn protected_snapshot(root: &std::path::Path) -> (Arc<Driver>, String, SnapshotCopy) {
        let (source, volume) = source_node(root);
        let key = Key::for_name(Kind::Snapshot, "snap");
        let record = source.cut_protected_snapshot(key, "snap", &volume, &["n".into(), "m".into()], None).unwrap();
        assert!(record.awaiting_copy);
        let copy = SnapshotCopy {
            id: record.id.clone(),
            name: record.name.clone(),
            source_volume_id: record.source_volume_id.clone(),
            size_bytes: record.size_bytes,
            restore_bytes: record.restore_bytes,
            created_secs: record.created_secs,
            created_nanos: record.created_nanos,
        };
        (source, record.id.clone(), copy)
    }

    fn snapshot_export(driver: &Arc<Driver>, id: &str) -> Export {
        let key = crate::ids::SnapshotId::parse(id).unwrap().key;
        driver.export(&ContentSource::Snapshot(id.into()), driver.claim(Kind::Snapshot, key).unwrap()).unwrap()
    }

    /// Every name under `root`'s snapshots/ and snapshot-copies/.
    fn snapshot_files(root: &std::path::Path) -> Vec<String> {
        let mut names = Vec::new();
        for dir in ["snapshots", "snapshot-copies"] {
            for entry in fs::read_dir(root.join(dir)).unwrap() {
                names.push(format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy()));
            }
        }
        names.sort();
        names
    }

    #[test]
    fn a_snapshots_copy_is_kept_whole_or_not_at_all() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id, copy) = protected_snapshot(a.path());
        assert!(id.ends_with("@n+m"), "the first candidate that is another node: {id}");
        let target = test_driver_on(b.path(), "m");
        let key = crate::ids::SnapshotId::parse(&id).unwrap().key;

        // The connection drops after the first frame.
        let mut cut = incoming(snapshot_export(&source, &id));
        let first = cut.pieces.next().unwrap();
        cut.pieces = Box::new(vec![first, Err(Error::Aborted("connection reset".into()))].into_iter());
        let err = target.receive_snapshot(key, copy.clone(), cut).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
        assert!(target.snapshot(&key).is_err(), "no record");
        assert!(snapshot_files(b.path()).is_empty(), "{:?}", snapshot_files(b.path()));

        // A byte changes on the way.
        let mut damaged = incoming(snapshot_export(&source, &id));
        let pieces: Vec<_> = damaged
            .pieces
            .by_ref()
            .map(|p| match p {
                Ok(Piece::Image(Frame::Data { offset, mut bytes })) if offset == 0 => {
                    bytes[0] ^= 1;
                    Ok(Piece::Image(Frame::Data { offset, bytes }))
                }
                other => other,
            })
            .collect();
        damaged.pieces = Box::new(pieces.into_iter());
        let err = target.receive_snapshot(key, copy.clone(), damaged).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(target.snapshot(&key).is_err());
        assert!(snapshot_files(b.path()).is_empty(), "{:?}", snapshot_files(b.path()));
        assert_eq!(target.copies.unreceived(), 0, "failed copies hold no room");

        // Whole: recorded under the same id, ready, with the source's bytes.
        let record = target.receive_snapshot(key, copy.clone(), incoming(snapshot_export(&source, &id))).unwrap();
        assert_eq!((record.id.as_str(), record.awaiting_copy), (id.as_str(), false));
        let image = |root: &std::path::Path| fs::read(root.join("snapshots").join(format!("{key}.img"))).unwrap();
        assert_eq!(image(b.path()), image(a.path()));
        assert_eq!(snapshot_files(b.path()), [format!("snapshots/{key}.img")]);
        // A retry sends nothing (an exhausted stream would fail) and gets the record.
        let nothing = Incoming { pieces: Box::new(std::iter::empty()), ..incoming(snapshot_export(&source, &id)) };
        assert_eq!(target.receive_snapshot(key, copy, nothing).unwrap(), record);
        // The source is ready once told; telling it again changes nothing.
        let ready = source.confirm_snapshot_copy(key, "snap", &record.source_volume_id).unwrap();
        assert!(!ready.awaiting_copy);
        assert_eq!(source.confirm_snapshot_copy(key, "snap", &record.source_volume_id).unwrap(), ready);
    }

    #[test]
    fn a_snapshot_kept_off_node_names_a_node_that_fits_or_is_refused_before_the_cut() {
        let a = tempfile::tempdir().unwrap();
        let (source, volume) = source_node(a.path());
        let key = Key::for_name(Kind::Snapshot, "snap");
        let (long, short) = ("x".repeat(94), "m".to_owned());
        // The roomiest candidate does not fit beside "n"; the next does.
        let record = source.cut_protected_snapshot(key, "snap", &volume, &[long.clone(), short], None).unwrap();
        assert!(record.id.ends_with("@n+m"), "{}", record.id);
        source.delete_snapshot(key).unwrap();
        let err = source.cut_protected_snapshot(key, "snap", &volume, std::slice::from_ref(&long), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = source.cut_protected_snapshot(key, "snap", &volume, &[], None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(snapshot_files(a.path()).is_empty(), "nothing cut: {:?}", snapshot_files(a.path()));
    }

    #[test]
    fn a_cut_left_by_a_crash_of_the_source_node_is_removed_at_its_next_start() {
        let a = tempfile::tempdir().unwrap();
        let (source, id) = source_node(a.path());
        // The process dies mid-export: nothing it would do on the way out runs.
        std::mem::forget(export_of(&source, &id));
        assert_eq!(fs::read_dir(a.path().join("exports")).unwrap().count(), 1);
        assert_eq!(fs::read_dir(a.path().join("snapshots")).unwrap().count(), 1);
        drop(source);
        let restarted = test_driver(a.path());
        assert_eq!(fs::read_dir(a.path().join("exports")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(a.path().join("snapshots")).unwrap().count(), 0);
        assert!(restarted.volume(&key_of(&id)).is_ok(), "the source itself is untouched");
    }

    #[test]
    fn a_cut_half_made_when_the_source_node_crashed_is_removed_at_its_next_start() {
        let a = tempfile::tempdir().unwrap();
        let (source, id) = source_node(a.path());
        std::mem::forget(export_of(&source, &id));
        drop(source);
        // The crash came while the cut was being copied: its note, and its
        // image under the name it is built under.
        let snapshots = a.path().join("snapshots");
        let cut = fs::read_dir(&snapshots).unwrap().next().unwrap().unwrap().path();
        fs::rename(&cut, crate::backend::in_the_making(&cut)).unwrap();
        let restarted = test_driver(a.path());
        assert_eq!(fs::read_dir(a.path().join("exports")).unwrap().count(), 0);
        let left: Vec<_> = fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(restarted.volume(&key_of(&id)).is_ok(), "the source itself is untouched");
    }

    #[test]
    fn a_copy_needs_room_for_the_sources_capacity() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (source, id) = source_node(a.path());
        let target = test_driver(b.path());
        let key = Key::for_name(Kind::Volume, "huge");
        let mut copy = incoming(export_of(&source, &id));
        copy.capacity_bytes = 1 << 60;
        let request = loop_request("huge", 8, Some(ContentSource::Volume(id.clone())));
        let err = target.create_volume_from(key, request, copy).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(leftovers(b.path()).is_empty());
    }

    #[test]
    fn a_running_copy_says_how_far_it_got_and_holds_its_room() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = Arc::new(test_driver(a.path()));
        let key = Key::for_name(Kind::Volume, "primary");
        let id = source.create_volume(key, loop_request("primary", 8, None)).unwrap().id.clone();
        let image =
            fs::OpenOptions::new().write(true).open(a.path().join("volumes").join(format!("{key}.img"))).unwrap();
        image.write_all_at(&[1u8; 4096], 0).unwrap();
        let export =
            source.export(&ContentSource::Volume(id.clone()), source.claim(Kind::Volume, key).unwrap()).unwrap();
        let Export { capacity_bytes, sender, _cut, _claim } = export;
        let (carried, data_bytes) = (sender.carried(), sender.data_bytes());
        // The network: the first piece goes through, the rest waits for the test.
        let (go, wait) = mpsc::channel::<()>();
        let mut first = true;
        let pieces = sender.map(move |piece| {
            let _hold = &_cut;
            if !first {
                let _ = wait.recv();
            }
            first = false;
            piece.map_err(|e| Error::io("reading", e))
        });
        let incoming =
            Incoming { from_node: "a".into(), carried, capacity_bytes, data_bytes, pieces: Box::new(pieces) };

        let target = Arc::new(test_driver(b.path()));
        let replica = Key::for_name(Kind::Volume, "replica");
        let copying = {
            let target = target.clone();
            let request = loop_request("replica", 8, Some(ContentSource::Volume(id.clone())));
            std::thread::spawn(move || target.create_volume_from(replica, request, incoming))
        };
        let started = std::time::Instant::now();
        while target.copy_progress(&replica).is_none_or(|p| p.received.load(Ordering::Relaxed) == 0) {
            assert!(started.elapsed() < Duration::from_secs(10), "the copy never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (record, condition) = target.volume_with_condition(&replica).unwrap();
        assert!(record.is_none(), "no record before the copy is verified");
        assert!(condition.abnormal);
        assert!(
            condition.message.contains(&format!("being copied from {id} on node a: 4096 of 4096 bytes")),
            "{}",
            condition.message
        );
        assert!(target.copies.unreceived() > 0, "the room the copy still needs is held back");

        drop(go);
        copying.join().unwrap().unwrap();
        assert!(target.copy_progress(&replica).is_none());
        assert!(!target.volume_with_condition(&replica).unwrap().1.abnormal);
    }
}
