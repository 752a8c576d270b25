//! The node's volume manager: what each CSI operation means for Loam's records,
//! its backend and the mount table.
//!
//! Every method here is blocking and expects the caller to hold the
//! [`Guard`] of the object it changes; the RPC layer takes it and runs the
//! method on a blocking thread. Each method converges when retried after a
//! failure or a crash: it compares the record and the mount table with what
//! was asked and does only what is missing.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::dir::DirBackend;
use crate::backend::loopback::{LoopBackend, XFS_MIN_BYTES};
use crate::config::{Config, QuotaMode, TOPOLOGY_NODE_KEY};
use crate::error::{Error, IoContext, Result};
use crate::guard::{Guard, InFlight};
use crate::ids::{Key, Kind, ObjectId};
use crate::kernel::mount::{MountFlags, Mounter};
use crate::kernel::mountinfo::{self, MountEntry};
use crate::kernel::quota::{Enforcer, QuotaUsage};
use crate::kernel::usage::{FsUsage, fs_usage};
use crate::records::{
    Attachment, BackendKind, Capability, ContentSource, LoopSpec, Publication, SnapshotRecord, Stage, VolumeRecord,
};
use crate::store::{Page, Table};

/// Capacity of a volume whose request names none.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// How stale the promised-bytes sum may be for CreateVolume's space check.
pub const PROMISES_MAX_AGE: Duration = Duration::from_secs(10);
/// Capacities are rounded up to a multiple of this.
pub const CAPACITY_ALIGN: u64 = 4096;

/// A CSI capacity range, in bytes; 0 means "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// The least capacity acceptable.
    pub required: u64,
    /// The most capacity acceptable.
    pub limit: u64,
}

impl CapacityRange {
    /// Whether `capacity` satisfies the range.
    pub fn admits(&self, capacity: u64) -> bool {
        capacity >= self.required && (self.limit == 0 || capacity <= self.limit)
    }

    /// The capacity to give: the request rounded up to [`CAPACITY_ALIGN`]
    /// (never down), at least `floor`, within the limit.
    pub fn choose(&self, floor: u64) -> Result<u64> {
        let want = match (self.required, self.limit) {
            (0, 0) => DEFAULT_CAPACITY,
            (0, limit) => DEFAULT_CAPACITY.min(limit),
            (required, _) => required,
        }
        .max(floor);
        let rounded = want
            .checked_next_multiple_of(CAPACITY_ALIGN)
            .ok_or_else(|| Error::OutOfRange(format!("capacity {want} is too large")))?;
        match self.limit {
            0 => Ok(rounded),
            limit if rounded <= limit => Ok(rounded),
            limit if want <= limit => Ok(limit),
            limit => Err(Error::OutOfRange(format!("the volume needs {want} bytes but the limit is {limit} bytes"))),
        }
    }
}

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// The CSI name.
    pub name: String,
    /// The capacity range asked for.
    pub capacity: CapacityRange,
    /// The capabilities it must support.
    pub capabilities: Vec<Capability>,
    /// The StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// The backend the parameters pick.
    pub backend: BackendKind,
    /// Image layout, for `loop` volumes.
    pub loop_spec: Option<LoopSpec>,
    /// Content to start from.
    pub source: Option<ContentSource>,
    /// Nodes the volume may live on, when the CO restricts it.
    pub allowed_nodes: Option<Vec<String>>,
}

/// A volume's usage as NodeGetVolumeStats reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Capacity in bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes still available.
    pub available_bytes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
    /// Inodes still available.
    pub available_inodes: u64,
}

/// Health of a volume, as VolumeCondition reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Whether something is wrong.
    pub abnormal: bool,
    /// What is wrong, or that all is well.
    pub message: String,
}

/// The volume manager of one node.
#[derive(Debug)]
pub struct Driver {
    config: Config,
    volumes: Table<VolumeRecord>,
    snapshots: Table<SnapshotRecord>,
    dir: DirBackend,
    loopback: LoopBackend,
    mounter: Arc<dyn Mounter>,
    inflight: InFlight,
    /// The last sum of promised bytes and when its computation started.
    promises: Mutex<Option<(Instant, u64)>>,
    /// Whether a thread is measuring the promises right now.
    recomputing: AtomicBool,
    /// How many volumes are attached (ControllerPublish) to this node, or
    /// are being attached: a slot is taken before the record is written and
    /// given back if the write fails, so the lock is never held across I/O.
    attached: Mutex<u32>,
}

impl Driver {
    /// Opens the driver's root: loads every record and prepares the backend.
    pub fn open(config: Config, mounter: Arc<dyn Mounter>) -> Result<Driver> {
        let root = &config.root;
        fs::create_dir_all(root).context(|| format!("creating root {}", root.display()))?;
        // The root holds every volume: keep other users out of it.
        fs::set_permissions(root, fs::Permissions::from_mode(0o711))
            .context(|| format!("setting permissions of {}", root.display()))?;
        let volumes: Table<VolumeRecord> = Table::open(&root.join("meta/volumes"))?;
        let snapshots = Table::open(&root.join("meta/snapshots"))?;
        let dir = DirBackend::open(root, config.quota)?;
        // Limits live in the filesystem, which an operator or a restore can
        // change behind Loam's back: put back what the records promise.
        volumes.for_each(|key, record| {
            if record.backend == BackendKind::Dir
                && let Err(e) = dir.adopt(key, record.enforcement.as_ref(), record.capacity_bytes)
            {
                tracing::error!(volume = %record.id, "cannot restore the volume's limit: {e}");
            }
        });
        let loopback = LoopBackend::new(root, mounter.clone());
        let driver = Driver {
            config,
            volumes,
            snapshots,
            dir,
            loopback,
            mounter,
            inflight: InFlight::default(),
            promises: Mutex::new(None),
            recomputing: AtomicBool::new(false),
            attached: Mutex::new(0),
        };
        driver.detach_orphans()?;
        let mut attached = 0u32;
        driver.volumes.for_each(|_, r| attached += u32::from(r.attachment.is_some()));
        *driver.attached.lock().unwrap_or_else(PoisonError::into_inner) = attached;
        Ok(driver)
    }

    /// Detaches loop devices of volumes that are not staged: leftovers of a
    /// crash between attaching and recording a stage.
    fn detach_orphans(&self) -> Result<()> {
        let staged = |key: &Key| self.volumes.get(key).is_some_and(|r| r.stage.is_some());
        for device in self.loopback.detach_orphans(staged)? {
            tracing::warn!(
                device = %device.device.display(),
                image = %device.backing_file.display(),
                "detached the loop device of a volume that is not staged"
            );
        }
        Ok(())
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Why directory volumes on this root are not enforced, when they are not.
    pub fn unenforced_reason(&self) -> Option<&str> {
        match self.dir.enforcer() {
            Enforcer::None(reason) => Some(reason),
            _ => None,
        }
    }

    /// Claims a volume or snapshot for one operation (ABORTED if busy).
    pub fn claim(&self, kind: Kind, key: Key) -> Result<Guard> {
        self.inflight.try_claim(kind, key)
    }

    /// Reads a volume id from a request; NOT_FOUND when it is not this node's.
    pub fn volume_key(&self, id: &str) -> Result<Key> {
        self.own_key("volume", id)
    }

    /// Reads a snapshot id from a request; NOT_FOUND when it is not this node's.
    pub fn snapshot_key(&self, id: &str) -> Result<Key> {
        self.own_key("snapshot", id)
    }

    fn own_key(&self, what: &str, id: &str) -> Result<Key> {
        match ObjectId::parse(id) {
            Some(parsed) if parsed.node == self.config.node_id => Ok(parsed.key),
            Some(parsed) => Err(Error::NotFound(format!(
                "{what} {id} belongs to node {}, not to this node ({})",
                parsed.node, self.config.node_id
            ))),
            None => Err(Error::NotFound(format!("{what} {id} does not exist (not an id Loam made)"))),
        }
    }

    /// The key a new volume called `name` gets.
    pub fn key_for(&self, kind: Kind, name: &str) -> Key {
        Key::for_name(kind, name)
    }

    /// Whether the root is usable: its filesystem answers.
    pub fn ready(&self) -> Result<()> {
        self.root_usage().map(drop)
    }

    fn root_usage(&self) -> Result<FsUsage> {
        fs_usage(&self.config.root).context(|| format!("reading usage of {}", self.config.root.display()))
    }

    // ----- Controller -----

    /// Creates a volume, or returns the existing one made by the same request.
    pub fn create_volume(&self, key: Key, req: NewVolume) -> Result<Arc<VolumeRecord>> {
        if let Some(allowed) = &req.allowed_nodes
            && !allowed.iter().any(|n| n == &self.config.node_id)
        {
            return Err(Error::ResourceExhausted(format!(
                "the topology requirement allows nodes {allowed:?}, but this driver serves node {}",
                self.config.node_id
            )));
        }
        for capability in &req.capabilities {
            Self::supports(req.backend, capability).map_err(Error::InvalidArgument)?;
        }
        let (source_path, source_floor) = self.content_source(req.source.as_ref(), req.backend)?;
        if let Some(existing) = self.volumes.get(&key) {
            return self.check_same_volume(existing, &req);
        }
        if let (QuotaMode::Required, BackendKind::Dir, Enforcer::None(reason)) =
            (self.config.quota, req.backend, self.dir.enforcer())
        {
            return Err(Error::FailedPrecondition(format!(
                "--quota required, but capacities cannot be enforced: {reason}"
            )));
        }
        let fs_floor = match &req.loop_spec {
            Some(spec) if spec.fs_type == "xfs" => XFS_MIN_BYTES,
            _ => 0,
        };
        let capacity = req.capacity.choose(source_floor.max(fs_floor))?;
        let free = self.capacity_for_check()?;
        if capacity > free {
            return Err(Error::ResourceExhausted(format!(
                "volume {} needs {capacity} bytes but {} has {free} bytes not yet promised to volumes; free space or \
                 use another node",
                req.name,
                self.config.root.display()
            )));
        }
        let enforcement = match (&req.backend, &req.loop_spec) {
            (BackendKind::Loop, Some(spec)) => {
                self.loopback.create_volume(&key, capacity, spec, source_path.as_deref())?;
                None
            }
            _ => Some(self.dir.create_volume(&key, source_path.as_deref(), capacity)?),
        };
        let record = VolumeRecord {
            id: ObjectId { key, node: self.config.node_id.clone() }.to_string(),
            name: req.name,
            capacity_bytes: capacity,
            backend: req.backend,
            loop_spec: req.loop_spec,
            parameters: req.parameters,
            source: req.source,
            attachment: None,
            stage: None,
            publications: BTreeMap::new(),
            enforcement,
        };
        let record = self.volumes.put(key, record)?;
        self.promise(self.unwritten(&record, capacity));
        Ok(record)
    }

    /// Of `bytes` just promised to a volume, what its filesystem has not
    /// already set aside: nothing for a thick image, all of it otherwise.
    fn unwritten(&self, record: &VolumeRecord, bytes: u64) -> u64 {
        match &record.loop_spec {
            Some(spec) if spec.thick => 0,
            _ => bytes,
        }
    }

    fn check_same_volume(&self, existing: Arc<VolumeRecord>, req: &NewVolume) -> Result<Arc<VolumeRecord>> {
        let same = existing.name == req.name
            && req.capacity.admits(existing.capacity_bytes)
            && existing.parameters == req.parameters
            && existing.source == req.source;
        if same {
            Ok(existing)
        } else {
            Err(Error::AlreadyExists(format!(
                "volume {} already exists with capacity {} bytes, parameters {:?} and source {:?}, which this request does not match",
                existing.name, existing.capacity_bytes, existing.parameters, existing.source
            )))
        }
    }

    /// The directory or image a new volume copies its content from, and the
    /// least capacity it needs to hold it. Content never crosses backends.
    fn content_source(&self, source: Option<&ContentSource>, backend: BackendKind) -> Result<(Option<PathBuf>, u64)> {
        let (path, size, from) = match source {
            None => return Ok((None, 0)),
            Some(ContentSource::Snapshot(id)) => {
                let key = self.snapshot_key(id)?;
                let snap = self
                    .snapshots
                    .get(&key)
                    .ok_or_else(|| Error::NotFound(format!("source snapshot {id} does not exist")))?;
                let path = match snap.backend {
                    BackendKind::Dir => self.dir.snapshot_path(&key),
                    BackendKind::Loop => self.loopback.snapshot_path(&key),
                };
                (path, snap.size_bytes, snap.backend)
            }
            Some(ContentSource::Volume(id)) => {
                let key = self.volume_key(id)?;
                let vol = self
                    .volumes
                    .get(&key)
                    .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
                let path = match vol.backend {
                    BackendKind::Dir => self.dir.volume_path(&key),
                    BackendKind::Loop => self.loopback.image_path(&key),
                };
                (path, vol.capacity_bytes, vol.backend)
            }
        };
        if from != backend {
            return Err(Error::InvalidArgument(format!(
                "the source lives on the {from:?} backend; restore or clone it into a {from:?} volume, not {backend:?}"
            )));
        }
        Ok((Some(path), size))
    }

    /// Deletes a volume; deleting one that does not exist succeeds.
    pub fn delete_volume(&self, key: Key) -> Result<()> {
        let record = self.volumes.get(&key);
        if let Some(record) = &record {
            if let Some(stage) = &record.stage {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is still staged at {}; unstage it before deleting",
                    record.id,
                    stage.path.display()
                )));
            }
            if let Some(attachment) = &record.attachment {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is still attached to node {}; unpublish it before deleting",
                    record.id, attachment.node_id
                )));
            }
        }
        // Data first, record last: a crash in between leaves a record whose
        // retried delete finishes the job, never orphaned data. Without a
        // record the backend is unknown, so both are cleared.
        let backend = record.as_ref().map(|r| r.backend);
        if backend != Some(BackendKind::Loop) {
            self.dir.delete_volume(&key, record.as_ref().and_then(|r| r.enforcement.as_ref()))?;
        }
        if backend != Some(BackendKind::Dir) {
            self.loopback.delete_volume(&key)?;
        }
        self.volumes.remove(&key)
    }

    /// The volume's record, or NOT_FOUND.
    pub fn volume(&self, key: &Key) -> Result<Arc<VolumeRecord>> {
        self.volumes.get(key).ok_or_else(|| match self.volumes.damaged(key) {
            Some(reason) => Error::Damaged(reason),
            None => Error::NotFound(format!("volume {key} does not exist")),
        })
    }

    /// The volume's record and condition; a damaged record is reported as
    /// an abnormal condition rather than an error.
    pub fn volume_with_condition(&self, key: &Key) -> Result<(Option<Arc<VolumeRecord>>, Condition)> {
        match self.volumes.get(key) {
            Some(record) => {
                let mut condition = self.condition(&record);
                if !condition.abnormal && record.backend == BackendKind::Dir {
                    condition.message = self.usage_message(key, &record)?;
                }
                Ok((Some(record), condition))
            }
            None => match self.volumes.damaged(key) {
                Some(reason) => Ok((None, Condition { abnormal: true, message: reason })),
                None => Err(Error::NotFound(format!("volume {key} does not exist"))),
            },
        }
    }

    /// Whether the volume's data is where it should be.
    pub fn condition(&self, record: &VolumeRecord) -> Condition {
        let Some(key) = ObjectId::parse(&record.id).map(|id| id.key) else {
            return Condition { abnormal: true, message: format!("record holds a malformed id {:?}", record.id) };
        };
        if record.backend == BackendKind::Loop {
            return self.loopback.condition(&key, record.stage.is_some());
        }
        if self.dir.volume_exists(&key) {
            Condition { abnormal: false, message: "volume is healthy".into() }
        } else {
            Condition {
                abnormal: true,
                message: format!(
                    "data directory {} is missing; restore it from a backup or delete the volume",
                    self.dir.volume_path(&key).display()
                ),
            }
        }
    }

    /// One page of volumes.
    pub fn list_volumes(&self, after: Option<Key>, max: usize) -> Page<VolumeRecord> {
        self.volumes.page(after, max, |_| true)
    }

    /// Bytes available for new volumes on this node: the root's free bytes
    /// minus what existing volumes were promised but do not use yet.
    pub fn capacity(&self) -> Result<u64> {
        let free = self.root_usage()?.available_bytes;
        Ok(free.saturating_sub(self.promised(Duration::ZERO)?))
    }

    /// The capacity check of CreateVolume and expansion: like [`capacity`],
    /// but with promises at most [`PROMISES_MAX_AGE`] old (plus what was
    /// promised since), so an operation costs the same with 10 or 10,000
    /// volumes instead of measuring them all.
    ///
    /// [`capacity`]: Driver::capacity
    fn capacity_for_check(&self) -> Result<u64> {
        let free = self.root_usage()?.available_bytes;
        Ok(free.saturating_sub(self.promised(PROMISES_MAX_AGE)?))
    }

    /// The sum over volumes of what they may still write, computed afresh
    /// when the cached sum is older than `max_age`.
    fn promised(&self, max_age: Duration) -> Result<u64> {
        let cached = *self.promises.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, sum)) = cached
            && at.elapsed() < max_age
        {
            return Ok(sum);
        }
        // One recomputation at a time: the others use the sum they have
        // rather than all measuring every volume at once.
        let leader = !self.recomputing.swap(true, Ordering::AcqRel);
        if !leader && let Some((_, sum)) = cached {
            return Ok(sum);
        }
        let measured = self.measure_promises();
        if leader {
            self.recomputing.store(false, Ordering::Release);
        }
        let (started, sum) = measured?;
        *self.promises.lock().unwrap_or_else(PoisonError::into_inner) = Some((started, sum));
        Ok(sum)
    }

    /// Sums, over volumes, the bytes promised but not written yet.
    fn measure_promises(&self) -> Result<(Instant, u64)> {
        let started = Instant::now();
        // Collected first (small: no strings): usage is I/O, and the table
        // must not wait on it.
        let mut volumes = Vec::new();
        self.volumes.for_each(|key, r| {
            let quota = r.enforcement.as_ref().filter(|e| e.enforced()).cloned();
            volumes.push((*key, r.capacity_bytes, r.backend, quota));
        });
        let mut sum = 0u64;
        for (key, capacity, backend, quota) in volumes {
            let used = match backend {
                BackendKind::Loop => self.loopback.allocated_bytes(&key),
                BackendKind::Dir if !self.dir.volume_exists(&key) => continue,
                BackendKind::Dir => match self.dir.quota_usage(quota.as_ref())? {
                    Some(quota) => quota.bytes,
                    None => self.dir.usage(&key)?.bytes,
                },
            };
            sum = sum.saturating_add(capacity.saturating_sub(used));
        }
        Ok((started, sum))
    }

    /// Counts a new promise in the cached sum until it is next recomputed.
    fn promise(&self, bytes: u64) {
        if let Some((_, sum)) = self.promises.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            *sum = sum.saturating_add(bytes);
        }
    }

    /// What a volume uses, as ControllerGetVolume's condition reports it.
    fn usage_message(&self, key: &Key, record: &VolumeRecord) -> Result<String> {
        let (used, how) = match self.dir.quota_usage(record.enforcement.as_ref())? {
            Some(quota) => (quota.bytes, "counted by the quota"),
            None => (self.dir.usage(key)?.bytes, "counted by walking its files"),
        };
        Ok(format!("volume is healthy; {used} of {} bytes used ({how})", record.capacity_bytes))
    }

    /// Grows a volume to satisfy `range`; returns the new capacity.
    pub fn expand_volume(&self, key: Key, range: CapacityRange) -> Result<u64> {
        let record = self.volume(&key)?;
        if record.capacity_bytes >= range.required && range.admits(record.capacity_bytes) {
            return Ok(record.capacity_bytes);
        }
        let capacity = range.choose(0)?;
        if capacity < record.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {} has {} bytes; shrinking to {capacity} is not supported",
                record.id, record.capacity_bytes
            )));
        }
        let growth = capacity - record.capacity_bytes;
        let free = self.capacity_for_check()?;
        if growth > free {
            return Err(Error::ResourceExhausted(format!(
                "growing volume {} by {growth} bytes needs more than the {free} bytes not yet promised on {}",
                record.id,
                self.config.root.display()
            )));
        }
        match (record.backend, &record.loop_spec) {
            (BackendKind::Loop, Some(spec)) => self.loopback.expand_volume(&key, capacity, spec)?,
            // Limit first, record second: a crash in between leaves a larger
            // limit, which the next start puts back to the recorded capacity.
            _ => self.dir.set_limit(&key, record.enforcement.as_ref(), capacity)?,
        }
        let mut grown = (*record).clone();
        grown.capacity_bytes = capacity;
        self.volumes.put(key, grown)?;
        self.promise(self.unwritten(&record, growth));
        Ok(capacity)
    }

    /// Whether growing the volume needs NodeExpandVolume too: a loop
    /// volume's filesystem grows on the node; a directory has nothing to grow.
    pub fn node_expansion_required(&self, key: &Key) -> bool {
        self.volumes.get(key).is_some_and(|r| r.backend == BackendKind::Loop)
    }

    /// Attaches a volume to this node (ControllerPublish); returns the
    /// publish context.
    pub fn controller_publish(
        &self,
        key: Key,
        node_id: &str,
        read_only: bool,
        capability: Capability,
    ) -> Result<BTreeMap<String, String>> {
        if node_id != self.config.node_id {
            return Err(Error::NotFound(format!(
                "node {node_id} is not served by this driver (it serves {})",
                self.config.node_id
            )));
        }
        let record = self.volume(&key)?;
        self.check_capability(&record, &capability)?;
        let attachment = Attachment { node_id: node_id.to_owned(), read_only, capability };
        match &record.attachment {
            Some(existing) if *existing == attachment => return Ok(BTreeMap::new()),
            Some(existing) => {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already attached to node {} with read_only={} and {:?}; detach it first",
                    record.id, existing.node_id, existing.read_only, existing.capability
                )));
            }
            None => {}
        }
        {
            let mut slots = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
            let max = self.config.max_volumes_per_node;
            if max > 0 && *slots >= max {
                return Err(Error::ResourceExhausted(format!(
                    "node {node_id} already has {} of its {max} volumes attached; detach one or raise --max-volumes-per-node",
                    *slots
                )));
            }
            *slots += 1;
        }
        let mut attached = (*record).clone();
        attached.attachment = Some(attachment);
        if let Err(e) = self.volumes.put(key, attached) {
            *self.attached.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
            return Err(e);
        }
        Ok(BTreeMap::new())
    }

    /// Detaches a volume (ControllerUnpublish); already detached is success.
    pub fn controller_unpublish(&self, key: Key, node_id: &str) -> Result<()> {
        let Some(record) = self.volumes.get(&key) else {
            return Ok(());
        };
        match &record.attachment {
            Some(a) if node_id.is_empty() || a.node_id == node_id => {
                let mut detached = (*record).clone();
                detached.attachment = None;
                self.volumes.put(key, detached)?;
                let mut slots = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
                *slots = slots.saturating_sub(1);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether the volume supports `capability`; the reason when it does not.
    pub fn supports(backend: BackendKind, capability: &Capability) -> std::result::Result<(), String> {
        match backend {
            BackendKind::Dir if capability.block => {
                Err("the dir backend serves filesystem volumes only; use a block-capable backend for raw block".into())
            }
            BackendKind::Dir => Ok(()),
            BackendKind::Loop if capability.block || capability.fs_type.is_empty() => Ok(()),
            BackendKind::Loop if matches!(capability.fs_type.as_str(), "ext4" | "xfs") => Ok(()),
            BackendKind::Loop => {
                Err(format!("fs type {:?} is not supported by the loop backend; use ext4 or xfs", capability.fs_type))
            }
        }
    }

    fn check_capability(&self, record: &VolumeRecord, capability: &Capability) -> Result<()> {
        Self::supports(record.backend, capability).map_err(Error::InvalidArgument)
    }

    // ----- Snapshots -----

    /// Takes a snapshot of a volume, or returns the one the same request made.
    pub fn create_snapshot(&self, key: Key, name: &str, source_id: &str) -> Result<Arc<SnapshotRecord>> {
        if let Some(existing) = self.snapshots.get(&key) {
            if existing.source_volume_id == source_id && existing.name == name {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {name} already exists for volume {}, not {source_id}",
                existing.source_volume_id
            )));
        }
        let volume_key = self.volume_key(source_id)?;
        let volume = self.volume(&volume_key)?;
        // The source must not change under the copy's feet: claim it too.
        let _source = self.claim(Kind::Volume, volume_key)?;
        match volume.backend {
            BackendKind::Dir => self.dir.create_snapshot(&volume_key, &key)?,
            BackendKind::Loop => {
                let mounted = volume.stage.as_ref().filter(|s| !s.capability.block).map(|s| s.path.as_path());
                self.loopback.create_snapshot(&volume_key, &key, mounted)?
            }
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let record = SnapshotRecord {
            id: ObjectId { key, node: self.config.node_id.clone() }.to_string(),
            name: name.to_owned(),
            source_volume_id: volume.id.clone(),
            backend: volume.backend,
            size_bytes: volume.capacity_bytes,
            created_secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            created_nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        };
        self.snapshots.put(key, record)
    }

    /// Deletes a snapshot; deleting one that does not exist succeeds.
    pub fn delete_snapshot(&self, key: Key) -> Result<()> {
        let backend = self.snapshots.get(&key).map(|s| s.backend);
        if backend != Some(BackendKind::Loop) {
            self.dir.delete_snapshot(&key)?;
        }
        if backend != Some(BackendKind::Dir) {
            self.loopback.delete_snapshot(&key)?;
        }
        self.snapshots.remove(&key)
    }

    /// The snapshot's record, or NOT_FOUND.
    pub fn snapshot(&self, key: &Key) -> Result<Arc<SnapshotRecord>> {
        self.snapshots.get(key).ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))
    }

    /// One page of snapshots, optionally only those of one source volume.
    pub fn list_snapshots(&self, after: Option<Key>, max: usize, source: Option<&str>) -> Page<SnapshotRecord> {
        self.snapshots.page(after, max, |s| source.is_none_or(|id| s.source_volume_id == id))
    }

    // ----- Node -----

    /// Stages a volume at the CO's staging path.
    pub fn node_stage(&self, key: Key, path: &Path, capability: Capability) -> Result<()> {
        let record = self.volume(&key)?;
        self.check_capability(&record, &capability)?;
        if let Some(stage) = &record.stage {
            if stage.path != path {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is already staged at {}; unstage it there first",
                    record.id,
                    stage.path.display()
                )));
            }
            if stage.capability != capability {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} with {:?}, not {capability:?}",
                    record.id,
                    path.display(),
                    stage.capability
                )));
            }
        }
        match (record.backend, &record.loop_spec) {
            (BackendKind::Loop, Some(spec)) => {
                self.loopback.stage(&key, spec, path, &capability)?;
                if let (Some(gid), false) = (capability.mount_group, capability.block) {
                    apply_mount_group(path, gid)?;
                }
            }
            _ => self.stage_dir(&key, path, &capability)?,
        }
        if record.stage.is_none() {
            let mut staged = (*record).clone();
            staged.stage = Some(Stage { path: path.to_owned(), capability });
            if let Err(e) = self.volumes.put(key, staged) {
                // Leave nothing the record does not know about.
                let _ = self.unstage_backend(&record, &key, path, true);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Binds a directory volume onto its staging path.
    fn stage_dir(&self, key: &Key, path: &Path, capability: &Capability) -> Result<()> {
        if !self.dir.volume_exists(key) {
            return Err(Error::FailedPrecondition(format!(
                "data directory {} is missing; restore it from a backup or delete the volume",
                self.dir.volume_path(key).display()
            )));
        }
        let data = self.dir.volume_path(key);
        if let Some(gid) = capability.mount_group {
            apply_mount_group(&data, gid)?;
        }
        fs::create_dir_all(path).context(|| format!("creating {}", path.display()))?;
        let mounts = self.mount_table()?;
        if !mountinfo::find_mount_point(&mounts, path).is_some_and(|e| self.shows_volume(e, key, BackendKind::Dir)) {
            self.mounter
                .bind(&data, path, MountFlags::default())
                .context(|| format!("bind-mounting {} on {}", data.display(), path.display()))?;
        }
        Ok(())
    }

    /// Unstages a volume; unstaging what is not staged succeeds.
    pub fn node_unstage(&self, key: Key, path: &Path) -> Result<()> {
        let record = self.volumes.get(&key);
        if let Some(record) = &record
            && let Some((target, _)) = record.publications.iter().next()
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is still published at {}; unpublish it first",
                record.id,
                target.display()
            )));
        }
        let ours = record.as_ref().and_then(|r| r.stage.as_ref()).is_some_and(|s| s.path == path);
        match &record {
            Some(record) => self.unstage_backend(record, &key, path, ours)?,
            None => self.unmount_ours(path, &key, BackendKind::Dir, false)?,
        }
        if let Some(record) = record
            && ours
        {
            let mut unstaged = (*record).clone();
            unstaged.stage = None;
            self.volumes.put(key, unstaged)?;
        }
        Ok(())
    }

    fn unstage_backend(&self, record: &VolumeRecord, key: &Key, path: &Path, ours: bool) -> Result<()> {
        match record.backend {
            BackendKind::Dir => self.unmount_ours(path, key, BackendKind::Dir, ours),
            BackendKind::Loop => self.loopback.unstage(key, path),
        }
    }

    /// Publishes a staged volume at a target path.
    pub fn node_publish(
        &self,
        key: Key,
        staging: &Path,
        target: &Path,
        read_only: bool,
        capability: Capability,
    ) -> Result<()> {
        let record = self.volume(&key)?;
        self.check_capability(&record, &capability)?;
        match &record.stage {
            Some(stage) if stage.path == staging && stage.capability.block == capability.block => {}
            Some(stage) if stage.path == staging => {
                return Err(Error::InvalidArgument(format!(
                    "volume {} was staged as a {} volume; publish it the same way",
                    record.id,
                    if stage.capability.block { "block" } else { "filesystem" }
                )));
            }
            Some(stage) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is staged at {}, not at {}",
                    record.id,
                    stage.path.display(),
                    staging.display()
                )));
            }
            None => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is not staged; call NodeStageVolume first",
                    record.id
                )));
            }
        }
        let read_only = read_only || capability.access_mode.read_only();
        let publication = Publication { read_only, capability: capability.clone() };
        match record.publications.get(target) {
            Some(existing) if *existing != publication => {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already published at {} with read_only={} and {:?}",
                    record.id,
                    target.display(),
                    existing.read_only,
                    existing.capability
                )));
            }
            Some(_) => {}
            None if capability.access_mode == crate::records::AccessMode::SingleNodeSingleWriter
                && !record.publications.is_empty() =>
            {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is single-writer and already published at another target",
                    record.id
                )));
            }
            None => {}
        }
        let mut flags = MountFlags::parse(&capability.mount_flags).map_err(Error::InvalidArgument)?;
        flags.read_only |= read_only;
        let source = match record.backend {
            BackendKind::Dir => staging.to_owned(),
            BackendKind::Loop => self.loopback.publish_source(&key, staging, capability.block, read_only)?,
        };
        if capability.block {
            ensure_file(target)?;
        } else {
            fs::create_dir_all(target).context(|| format!("creating {}", target.display()))?;
        }
        let mounts = self.mount_table()?;
        if !mountinfo::find_mount_point(&mounts, target).is_some_and(|e| self.shows_volume(e, &key, record.backend)) {
            self.mounter
                .bind(&source, target, flags)
                .context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
        }
        if !record.publications.contains_key(target) {
            let mut published = (*record).clone();
            published.publications.insert(target.to_owned(), publication);
            if let Err(e) = self.volumes.put(key, published) {
                let _ = self.mounter.unmount(target);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unpublishes a volume from a target and removes the target; unpublishing
    /// what is not published succeeds.
    pub fn node_unpublish(&self, key: Key, target: &Path) -> Result<()> {
        let record = self.volumes.get(&key);
        let publication = record.as_ref().and_then(|r| r.publications.get(target).cloned());
        let backend = record.as_ref().map_or(BackendKind::Dir, |r| r.backend);
        self.unmount_ours(target, &key, backend, publication.is_some())?;
        let removed = match fs::symlink_metadata(target) {
            Ok(meta) if meta.is_dir() => fs::remove_dir(target),
            Ok(_) => fs::remove_file(target),
            Err(e) => Err(e),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::io(format!("removing target {}", target.display()), e));
            }
            _ => {}
        }
        if let (Some(record), Some(publication)) = (record, publication) {
            let mut unpublished = (*record).clone();
            unpublished.publications.remove(target);
            let read_only_block_left = unpublished.publications.values().any(|p| p.read_only && p.capability.block);
            self.volumes.put(key, unpublished)?;
            if record.backend == BackendKind::Loop
                && publication.read_only
                && publication.capability.block
                && !read_only_block_left
            {
                self.loopback.release_read_only(&key)?;
            }
        }
        Ok(())
    }

    /// Usage of a volume published or staged at `path`.
    pub fn node_stats(&self, key: Key, path: &Path) -> Result<(VolumeStats, Condition)> {
        let record = self.volume(&key)?;
        let stage = self.check_volume_path(&record, path)?;
        let condition = self.condition(&record);
        if condition.abnormal {
            return Ok((VolumeStats::default(), condition));
        }
        if record.backend == BackendKind::Loop {
            let stats = self.loopback.stats(&key, &stage.path, stage.capability.block)?;
            return Ok((stats, condition));
        }
        // The quota's count when there is one: exact and cheap. Inodes it
        // does not count (btrfs) and unenforced volumes take a tree walk.
        let (used_bytes, used_inodes) = match self.dir.quota_usage(record.enforcement.as_ref())? {
            Some(QuotaUsage { bytes, inodes: Some(inodes), .. }) => (bytes, inodes),
            Some(QuotaUsage { bytes, inodes: None, .. }) => (bytes, self.dir.usage(&key)?.inodes),
            None => {
                let used = self.dir.usage(&key)?;
                (used.bytes, used.inodes)
            }
        };
        let fs = self.root_usage()?;
        let stats = VolumeStats {
            total_bytes: record.capacity_bytes,
            used_bytes,
            available_bytes: record.capacity_bytes.saturating_sub(used_bytes).min(fs.available_bytes),
            used_inodes,
            available_inodes: fs.free_inodes,
        };
        Ok((stats, condition))
    }

    /// Node half of an expansion; returns the capacity the volume now has.
    pub fn node_expand(&self, key: Key, path: &Path, range: CapacityRange) -> Result<u64> {
        let record = self.volume(&key)?;
        let stage = self.check_volume_path(&record, path)?;
        let capacity = if record.capacity_bytes >= range.required {
            record.capacity_bytes
        } else {
            self.expand_volume(key, range)?
        };
        if let (BackendKind::Loop, Some(spec)) = (record.backend, &record.loop_spec) {
            self.loopback.node_expand(&key, spec, &stage.path, &stage.capability)?;
        }
        Ok(capacity)
    }

    /// The volume's stage, when `path` is its staging path or one of its
    /// targets; NOT_FOUND otherwise.
    fn check_volume_path(&self, record: &VolumeRecord, path: &Path) -> Result<Stage> {
        let known = record.stage.as_ref().is_some_and(|s| s.path == path) || record.publications.contains_key(path);
        match &record.stage {
            Some(stage) if known && path.exists() => Ok(stage.clone()),
            _ => Err(Error::NotFound(format!("volume {} is not staged or published at {}", record.id, path.display()))),
        }
    }

    fn mount_table(&self) -> Result<Vec<MountEntry>> {
        self.mounter.mounts().context(|| "reading the mount table".into())
    }

    /// Whether a mount shows this volume: a directory volume's bind shows its
    /// directory as root; a loop volume's mount comes from one of its devices
    /// (a filesystem) or is a bind of a device node (a block publication).
    fn shows_volume(&self, entry: &MountEntry, key: &Key, backend: BackendKind) -> bool {
        match backend {
            BackendKind::Dir => entry.root.ends_with(Path::new("volumes").join(key.to_string())),
            BackendKind::Loop => self.loopback.shows_volume(entry, key),
        }
    }

    /// Unmounts `path` if the record says it is ours or the mount table
    /// shows our volume there; never touches a stranger's mount.
    fn unmount_ours(&self, path: &Path, key: &Key, backend: BackendKind, ours: bool) -> Result<()> {
        // Stacked binds of the same volume (a retried publish after a crash)
        // are all removed; the bound keeps a confused table from looping.
        for _ in 0..8 {
            let mounts = self.mount_table()?;
            let Some(entry) = mountinfo::find_mount_point(&mounts, path) else { return Ok(()) };
            if !ours && !self.shows_volume(entry, key, backend) {
                return Ok(());
            }
            self.mounter.unmount(path).context(|| format!("unmounting {}", path.display()))?;
        }
        Err(Error::FailedPrecondition(format!(
            "{} still has mounts after 8 unmounts; inspect it with findmnt",
            path.display()
        )))
    }
}

/// Creates an empty file for a block publication's bind (and its parents).
fn ensure_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(drop)
        .context(|| format!("creating {}", path.display()))
}

/// Gives the volume root to `gid` with the setgid bit, so files created in it
/// belong to the pod's group.
fn apply_mount_group(data: &Path, gid: u32) -> Result<()> {
    let meta = fs::symlink_metadata(data).context(|| format!("inspecting {}", data.display()))?;
    if meta.gid() != gid {
        std::os::unix::fs::lchown(data, None, Some(gid)).context(|| format!("changing group of {}", data.display()))?;
    }
    let mode = meta.mode() & 0o7777 | 0o2070;
    fs::set_permissions(data, fs::Permissions::from_mode(mode))
        .context(|| format!("setting mode of {}", data.display()))
}

/// The topology segment of this node.
pub fn topology(node_id: &str) -> std::collections::HashMap<String, String> {
    [(TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())].into()
}
