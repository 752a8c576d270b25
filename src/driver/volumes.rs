//! Volume lifecycle on this node: create, delete, attach, expand, and the
//! capacity the node can still promise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use super::{CapacityRange, Condition, Driver, NewVolume};
use crate::config::QuotaMode;
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::ids::{Key, Kind, ObjectId};
use crate::kernel::quota::Enforcer;
use crate::records::{
    Attachment, BackendKind, Capability, ContentSource, Enforcement, Ephemeral, LoopSpec, VolumeRecord,
};
use crate::store::Page;

impl Driver {
    // ----- Controller -----

    /// Claims everything a CreateVolume touches: the new volume and the
    /// volume or snapshot it copies, so a DeleteVolume or DeleteSnapshot of
    /// the source racing the copy gets ABORTED instead of pulling the source
    /// away mid-copy (and the copy gets ABORTED while the source is busy).
    /// Every claim is a try, so no two operations ever wait on each other.
    /// A source that is not this node's is left to [`Driver::create_volume`]
    /// to report.
    pub fn claim_create(&self, key: Key, source: Option<&ContentSource>) -> Result<Vec<Guard>> {
        let mut guards = vec![self.claim(Kind::Volume, key)?];
        let source = match source {
            Some(ContentSource::Volume(id)) => self.own_key("volume", id).ok().map(|k| (Kind::Volume, k)),
            Some(ContentSource::Snapshot(id)) => self.own_key("snapshot", id).ok().map(|k| (Kind::Snapshot, k)),
            None => None,
        };
        if let Some((kind, source)) = source {
            guards.push(self.claim(kind, source)?);
        }
        Ok(guards)
    }

    /// Creates a volume, or returns the existing one made by the same request.
    pub fn create_volume(&self, key: Key, req: NewVolume) -> Result<Arc<VolumeRecord>> {
        self.create_volume_as(key, req, None)
    }

    /// [`Driver::create_volume`], recording the pod of an ephemeral volume in
    /// the same write as the volume itself, so no crash can leave an inline
    /// volume that looks like one the CO created.
    pub(super) fn create_volume_as(
        &self,
        key: Key,
        req: NewVolume,
        ephemeral: Option<Ephemeral>,
    ) -> Result<Arc<VolumeRecord>> {
        if let Some(allowed) = &req.allowed_nodes
            && !allowed.iter().any(|n| n == &self.config.node_id)
        {
            return Err(Error::ResourceExhausted(format!(
                "the topology requirement allows nodes {}, but this driver serves node {}",
                crate::error::quote(&allowed.join(", ")),
                self.config.node_id
            )));
        }
        for capability in &req.capabilities {
            Self::supports(req.backend, capability).map_err(Error::InvalidArgument)?;
        }
        let (source_path, source_floor, source_mount) = self.content_source(req.source.as_ref(), req.backend)?;
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
            Some(spec) => crate::backend::min_capacity(spec)?,
            None => 0,
        };
        let capacity = req.capacity.choose(source_floor.max(fs_floor))?;
        let free = self.capacity()?;
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
                let source = source_path.as_deref().map(|path| (path, source_mount.as_deref()));
                self.loopback.create_volume(&key, capacity, spec, source)?;
                None
            }
            _ => Some(self.dir.create_volume(&key, source_path.as_deref(), capacity)?),
        };
        crate::failpoint!("volume.created");
        let record = VolumeRecord {
            id: ObjectId { key, node: self.config.node_id.clone() }.to_string(),
            name: req.name,
            capacity_bytes: capacity,
            backend: req.backend,
            loop_spec: req.loop_spec,
            parameters: req.parameters,
            mutable_parameters: req.mutable_parameters,
            source: req.source,
            attachment: None,
            stage: None,
            publications: BTreeMap::new(),
            enforcement,
            formatting: None,
            ephemeral,
        };
        let record = self.put_volume(key, record)?;
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
            && existing.mutable_parameters == req.mutable_parameters
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

    /// The directory or image a new volume copies its content from, the
    /// least capacity it needs to hold it, and where the source volume's
    /// filesystem is mounted when it is a staged `loop` filesystem (frozen
    /// for the copy, as for a snapshot). Content never crosses backends.
    fn content_source(
        &self,
        source: Option<&ContentSource>,
        backend: BackendKind,
    ) -> Result<(Option<PathBuf>, u64, Option<PathBuf>)> {
        let mut mounted = None;
        let (path, size, from) = match source {
            None => return Ok((None, 0, None)),
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
                    BackendKind::Loop => {
                        mounted = vol.stage.as_ref().filter(|s| !s.capability.block).map(|s| s.path.clone());
                        self.loopback.image_path(&key)
                    }
                };
                (path, vol.capacity_bytes, vol.backend)
            }
        };
        if from != backend {
            return Err(Error::InvalidArgument(format!(
                "the source lives on the {from:?} backend; restore or clone it into a {from:?} volume, not {backend:?}"
            )));
        }
        Ok((Some(path), size, mounted))
    }

    /// Deletes a volume; deleting one that does not exist succeeds.
    pub fn delete_volume(&self, key: Key) -> Result<()> {
        let record = self.volumes.get(&key);
        if let Some(record) = &record {
            if let Some(stage) = &record.stage {
                if self.stage_is_live(record, &key, stage)? {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} is still staged at {}; unstage it before deleting",
                        record.id,
                        stage.path.display()
                    )));
                }
                // Recorded but gone from the kernel (the node rebooted and
                // the CO never staged it again): nothing is using it.
                tracing::warn!(volume = %record.id, path = %stage.path.display(), "deleting a volume whose stage did not survive a reboot");
            }
            if let Some(attachment) = &record.attachment {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is still attached to node {}; unpublish it before deleting",
                    record.id, attachment.node_id
                )));
            }
        }
        // What the volume still holds back from other volumes is given back
        // at once, not at the next measurement: a create right after this
        // delete on a full node gets the room.
        let released = match &record {
            Some(r) => {
                let quota = r.enforcement.as_ref().filter(|e| e.enforced());
                self.outstanding(&key, r.capacity_bytes, r.backend, quota)?
            }
            None => 0,
        };
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
        crate::failpoint!("volume.deleted");
        self.remove_volume(&key)?;
        self.fulfil(released);
        Ok(())
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

    /// One page of the volumes the CO created. Ephemeral volumes are left
    /// out: the CO never created them and must not delete or attach them, and
    /// their kubelet ids are not Loam ids it could use in any call.
    pub fn list_volumes(&self, after: Option<Key>, max: usize) -> Page<VolumeRecord> {
        self.volumes.page(after, max, |r| r.ephemeral.is_none())
    }

    /// Bytes available for new volumes on this node: the root's free bytes
    /// minus what existing volumes were promised but do not use yet. The
    /// promises are measured at start-up and then every [`PROMISES_REFRESH`]
    /// off the request path ([`Driver::refresh_promises`]), and what is
    /// promised in between is added at once; so a call costs the same with
    /// 10 or 10,000 volumes.
    pub fn capacity(&self) -> Result<u64> {
        let free = self.root_usage()?.available_bytes;
        let promised = *self.promises.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(free.saturating_sub(promised))
    }

    /// Measures every volume's promise afresh: for the background refresh.
    pub fn refresh_promises(&self) -> Result<()> {
        let sum = self.measure_promises()?;
        *self.promises.lock().unwrap_or_else(PoisonError::into_inner) = sum;
        Ok(())
    }

    /// Sums, over volumes, the bytes promised but not written yet.
    fn measure_promises(&self) -> Result<u64> {
        // Collected first (small: no strings): usage is I/O, and the table
        // must not wait on it.
        let mut volumes = Vec::new();
        self.volumes.for_each(|key, r| {
            let quota = r.enforcement.as_ref().filter(|e| e.enforced()).cloned();
            volumes.push((*key, r.capacity_bytes, r.backend, quota));
        });
        let mut sum = 0u64;
        for (key, capacity, backend, quota) in volumes {
            sum = sum.saturating_add(self.outstanding(&key, capacity, backend, quota.as_ref())?);
        }
        Ok(sum)
    }

    /// Of a volume's capacity, the bytes promised but not written yet.
    fn outstanding(&self, key: &Key, capacity: u64, backend: BackendKind, quota: Option<&Enforcement>) -> Result<u64> {
        let used = match backend {
            BackendKind::Loop => self.loopback.allocated_bytes(key),
            BackendKind::Dir if !self.dir.volume_exists(key) => return Ok(0),
            BackendKind::Dir => match self.dir.quota_usage(quota)? {
                Some(quota) => quota.bytes,
                None => self.dir.usage(key)?.bytes,
            },
        };
        Ok(capacity.saturating_sub(used))
    }

    /// Counts a new promise in the cached sum until it is next recomputed.
    fn promise(&self, bytes: u64) {
        let mut sum = self.promises.lock().unwrap_or_else(PoisonError::into_inner);
        *sum = sum.saturating_add(bytes);
    }

    /// Takes bytes now written out of the cached sum of promises.
    fn fulfil(&self, bytes: u64) {
        let mut sum = self.promises.lock().unwrap_or_else(PoisonError::into_inner);
        *sum = sum.saturating_sub(bytes);
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
        let free = self.capacity()?;
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
        crate::failpoint!("volume.expanded");
        let mut grown = (*record).clone();
        grown.capacity_bytes = capacity;
        self.put_volume(key, grown)?;
        self.promise(self.unwritten(&record, growth));
        Ok(capacity)
    }

    /// Applies a VolumeAttributesClass's `mutable_parameters`. Only a `loop`
    /// volume's `provisioning` can change: thin to thick allocates the whole
    /// image now (staged or not), thick to thin is recorded for later growth
    /// and frees nothing. The same value again changes nothing.
    pub fn modify_volume(&self, key: Key, mutable: BTreeMap<String, String>) -> Result<()> {
        let record = self.volume(&key)?;
        let Some(thick) = crate::backend::parse_mutable_parameters(record.backend, &mutable)? else {
            return Ok(());
        };
        let Some(spec) = &record.loop_spec else {
            return Err(Error::Damaged(format!(
                "loop volume {} has no image layout in its record; repair the record or recreate the volume",
                record.id
            )));
        };
        if spec.thick == thick {
            return Ok(());
        }
        let mut allocated = 0;
        if thick {
            let before = self.loopback.allocated_bytes(&key);
            let needed = record.capacity_bytes.saturating_sub(before);
            // The volume's thin promise already holds these bytes back from
            // new volumes, but the host may have filled up since.
            let free = self.root_usage()?.available_bytes;
            if needed > free {
                return Err(Error::ResourceExhausted(format!(
                    "making volume {} thick needs {needed} more bytes but {} has {free} free; free space on the host",
                    record.id,
                    self.config.root.display()
                )));
            }
            // Allocate first, record second: a crash in between leaves a
            // thick image recorded thin, which a retry finds already done.
            let thick_spec = LoopSpec { thick: true, ..spec.clone() };
            self.loopback.expand_volume(&key, record.capacity_bytes, &thick_spec)?;
            allocated = self.loopback.allocated_bytes(&key).saturating_sub(before);
        }
        crate::failpoint!("volume.modified");
        let mut modified = (*record).clone();
        modified.loop_spec = Some(LoopSpec { thick, ..spec.clone() });
        modified.mutable_parameters = mutable;
        self.put_volume(key, modified)?;
        // Bytes once promised are now written: not promised twice.
        self.fulfil(allocated);
        Ok(())
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
        if let Err(e) = self.put_volume(key, attached) {
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
                self.put_volume(key, detached)?;
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

    pub(super) fn check_capability(&self, record: &VolumeRecord, capability: &Capability) -> Result<()> {
        Self::supports(record.backend, capability).map_err(Error::InvalidArgument)
    }
}
