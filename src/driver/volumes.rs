//! Volume lifecycle on this node: create, delete, attach, expand, and the
//! capacity the node can still promise.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use super::{CapacityRange, Condition, Driver, NewVolume};
use crate::backend::{Backends, Fill, Origin, Source, parse_mutable_parameters};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::ids::{Key, Kind, ObjectId};
use crate::records::{Attachment, Capability, ContentSource, InlineOrigin, Layout, Schema, VolumeRecord};
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
            Some(ContentSource::Snapshot(id)) => self.snapshot_key(id).ok().map(|k| (Kind::Snapshot, k)),
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

    /// [`Driver::create_volume`], recording the pod of an inline volume in
    /// the same write as the volume itself, so no crash can leave an inline
    /// volume that looks like one the CO created.
    pub(super) fn create_volume_as(
        &self,
        key: Key,
        req: NewVolume,
        inline: Option<InlineOrigin>,
    ) -> Result<Arc<VolumeRecord>> {
        self.check_fit(&req)?;
        let (source, source_floor) = self.content_source(req.source.as_ref(), &req.layout)?;
        if let Some(existing) = self.volumes.get(&key) {
            return self.check_same_volume(existing, &req);
        }
        let capacity = self.room_for(&req, source_floor)?;
        let fill = source.as_ref().map_or(Fill::Empty, Fill::Copy);
        let enforcement = self.backends.create_volume(&key, &req.layout, capacity, fill)?;
        crate::failpoint!("volume.created");
        self.record_new_volume(key, req, capacity, enforcement, inline)
    }

    /// Refuses a new volume this node cannot hold: the topology names other
    /// nodes, or its backend cannot serve a capability asked for.
    pub(super) fn check_fit(&self, req: &NewVolume) -> Result<()> {
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
            Backends::supports(&req.layout, capability).map_err(Error::InvalidArgument)?;
        }
        Ok(())
    }

    /// The capacity a new volume gets (at least `floor`, what its content
    /// needs), once the node is known to have room for it.
    pub(super) fn room_for(&self, req: &NewVolume, floor: u64) -> Result<u64> {
        self.backends.check_enforceable(&req.layout, self.config.quota)?;
        let capacity = req.capacity.choose(floor.max(Backends::min_capacity(&req.layout, &req.capabilities)?))?;
        let free = self.capacity()?;
        if capacity > free {
            return Err(Error::ResourceExhausted(format!(
                "volume {} needs {capacity} bytes but {} has {free} bytes not yet promised to volumes; free space or \
                 use another node",
                req.name,
                self.config.root.display()
            )));
        }
        Ok(capacity)
    }

    /// Records a volume whose storage was just made, and promises its capacity.
    pub(super) fn record_new_volume(
        &self,
        key: Key,
        req: NewVolume,
        capacity: u64,
        enforcement: Option<crate::records::Enforcement>,
        inline: Option<InlineOrigin>,
    ) -> Result<Arc<VolumeRecord>> {
        let record = VolumeRecord {
            schema: Schema,
            id: ObjectId { key, node: self.config.node_id.clone() }.to_string(),
            requested_bytes: Some(req.capacity.required).filter(|asked| *asked > 0 && *asked < capacity),
            name: req.name,
            capacity_bytes: capacity,
            layout: req.layout,
            parameters: req.parameters,
            mutable_parameters: req.mutable_parameters,
            source: req.source,
            attachment: None,
            stage: None,
            publications: BTreeMap::new(),
            enforcement,
            formatting: None,
            inline,
        };
        let record = self.put_volume(key, record)?;
        self.promise(self.unwritten(&record, capacity));
        Ok(record)
    }

    /// Of `bytes` just promised to a volume, what its filesystem has not
    /// already set aside: nothing for a thick image, all of it otherwise.
    fn unwritten(&self, record: &VolumeRecord, bytes: u64) -> u64 {
        if record.layout.thick() { 0 } else { bytes }
    }

    pub(super) fn check_same_volume(&self, existing: Arc<VolumeRecord>, req: &NewVolume) -> Result<Arc<VolumeRecord>> {
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

    /// Where a new volume's content comes from and the least capacity it
    /// needs to hold it.
    fn content_source(&self, source: Option<&ContentSource>, layout: &Layout) -> Result<(Option<Source>, u64)> {
        match source {
            None => Ok((None, 0)),
            Some(ContentSource::Snapshot(id)) => {
                let key = self.snapshot_key(id)?;
                let snap = self
                    .snapshots
                    .get(&key)
                    .ok_or_else(|| Error::NotFound(format!("source snapshot {id} does not exist")))?;
                Ok((Some(self.backends.source(layout, Origin::Snapshot(&key, &snap))?), snap.size_bytes))
            }
            Some(ContentSource::Volume(id)) => {
                let key = self.volume_key(id)?;
                let vol = self
                    .volumes
                    .get(&key)
                    .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
                Ok((Some(self.backends.source(layout, Origin::Volume(&key, &vol))?), vol.capacity_bytes))
            }
        }
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
                let used = self.backends.used_bytes(&key, &r.layout, quota)?;
                used.map_or(0, |used| r.capacity_bytes.saturating_sub(used))
            }
            None => 0,
        };
        // Data first, record last: a crash in between leaves a record whose
        // retried delete finishes the job, never orphaned data.
        self.backends.delete_volume(&key, record.as_deref())?;
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
                let condition = self.backends.condition_with_usage(key, &record)?;
                Ok((Some(record), condition))
            }
            None => match self.volumes.damaged(key) {
                Some(reason) => Ok((None, Condition { abnormal: true, message: reason })),
                // Not made yet, but on its way: say how far it got.
                None => match self.copy_progress(key) {
                    Some(progress) => Ok((
                        None,
                        Condition {
                            abnormal: true,
                            message: format!("volume is {}; usable once the copy is verified", progress.describe()),
                        },
                    )),
                    None => Err(Error::NotFound(format!("volume {key} does not exist"))),
                },
            },
        }
    }

    /// Whether the volume's data is where it should be.
    pub fn condition(&self, record: &VolumeRecord) -> Condition {
        let Some(key) = ObjectId::parse(&record.id).map(|id| id.key) else {
            return Condition { abnormal: true, message: format!("record holds a malformed id {:?}", record.id) };
        };
        self.backends.condition(&key, record)
    }

    /// One page of the volumes the CO created. Inline volumes are left
    /// out: the CO never created them and must not delete or attach them, and
    /// their kubelet ids are not Loam ids it could use in any call.
    pub fn list_volumes(&self, after: Option<Key>, max: usize) -> Page<VolumeRecord> {
        self.volumes.page(after, max, |r| r.inline.is_none())
    }

    /// Bytes available for new volumes on this node: the root's free bytes
    /// minus what existing volumes were promised but do not use yet. The
    /// promises are measured at start-up and then every [`PROMISES_REFRESH`](super::PROMISES_REFRESH)
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
        let (sum, used) = self.measure_promises()?;
        *self.promises.lock().unwrap_or_else(PoisonError::into_inner) = sum;
        *self.measured.lock().unwrap_or_else(PoisonError::into_inner) = used;
        Ok(())
    }

    /// Bytes promised to volumes and not written yet, as last measured or
    /// promised since.
    pub fn promised(&self) -> u64 {
        *self.promises.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What each volume used at the last measurement.
    pub fn measured_usage(&self) -> Arc<BTreeMap<Key, u64>> {
        self.measured.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sums, over volumes, the bytes promised but not written yet; and what
    /// each volume uses.
    fn measure_promises(&self) -> Result<(u64, Arc<BTreeMap<Key, u64>>)> {
        // Collected first (small: no strings): usage is I/O, and the table
        // must not wait on it.
        let mut volumes = Vec::new();
        self.volumes.for_each(|key, r| {
            let quota = r.enforcement.as_ref().filter(|e| e.enforced()).cloned();
            volumes.push((*key, r.capacity_bytes, r.layout.clone(), quota));
        });
        // Copies being received hold back what they have not written yet.
        let mut sum = self.copies.unreceived();
        let mut measured = BTreeMap::new();
        for (key, capacity, layout, quota) in volumes {
            let Some(mut used) = self.backends.used_bytes(&key, &layout, quota.as_ref())? else { continue };
            if layout.thick()
                && used < capacity
                && let Some(lost) = self.keep_thick(&key, &layout, capacity, used)
            {
                used = used.saturating_add(lost);
            }
            sum = sum.saturating_add(capacity.saturating_sub(used));
            measured.insert(key, used);
        }
        Ok((sum, Arc::new(measured)))
    }

    /// Gives a thick volume back the allocation it lost (a thick volume must
    /// never fail a write for want of host space); returns the bytes
    /// allocated again. A volume with an operation in flight is left to the
    /// next measurement.
    fn keep_thick(&self, key: &Key, layout: &Layout, capacity: u64, used: u64) -> Option<u64> {
        let _claim = self.claim(Kind::Volume, *key).ok()?;
        match self.backends.keep_thick(key, layout, capacity, used) {
            Ok(Some(lost)) if lost > 0 => {
                tracing::warn!(
                    volume = %key,
                    bytes = lost,
                    "allocated a thick volume's image again: holes were punched in it (ext4's lazy inode table \
                     initialisation does so after a thin volume became thick)"
                );
                Some(lost)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(volume = %key, "cannot allocate a thick volume's image again: {e}; its writes may fail when the host fills up");
                None
            }
        }
    }

    /// Counts a new promise in the cached sum until it is next recomputed.
    pub(super) fn promise(&self, bytes: u64) {
        let mut sum = self.promises.lock().unwrap_or_else(PoisonError::into_inner);
        *sum = sum.saturating_add(bytes);
    }

    /// Takes bytes now written out of the cached sum of promises.
    pub(super) fn fulfil(&self, bytes: u64) {
        let mut sum = self.promises.lock().unwrap_or_else(PoisonError::into_inner);
        *sum = sum.saturating_sub(bytes);
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
        // Storage first, record second: a crash in between leaves a larger
        // image (used at the next growth) or limit (which the next start puts
        // back to the recorded capacity).
        self.backends.expand_volume(&key, &record, capacity)?;
        crate::failpoint!("volume.expanded");
        let mut grown = (*record).clone();
        grown.capacity_bytes = capacity;
        // Grown to what was asked: a restore asks the new size.
        grown.requested_bytes = None;
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
        let Some(provisioning) = parse_mutable_parameters(record.layout.backend(), &mutable)? else {
            return Ok(());
        };
        if record.layout.thick() == (provisioning == crate::records::Provisioning::Thick) {
            return Ok(());
        }
        // Allocate first, record second: a crash in between leaves a thick
        // image recorded thin, which a retry finds already done.
        let free = self.root_usage()?.available_bytes;
        let (layout, allocated) = self.backends.set_provisioning(&key, &record, provisioning, free)?;
        crate::failpoint!("volume.modified");
        let mut modified = (*record).clone();
        modified.layout = layout;
        modified.mutable_parameters = mutable;
        self.put_volume(key, modified)?;
        // Bytes once promised are now written: not promised twice.
        self.fulfil(allocated);
        Ok(())
    }

    /// Whether growing the volume needs NodeExpandVolume too: a loop
    /// volume's filesystem grows on the node; a directory has nothing to grow.
    pub fn node_expansion_required(&self, key: &Key) -> bool {
        self.volumes.get(key).is_some_and(|r| Backends::node_expansion_required(&r.layout))
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

    /// Whether a volume laid out as `layout` supports `capability`; the
    /// reason when it does not.
    pub fn supports(layout: &Layout, capability: &Capability) -> std::result::Result<(), String> {
        Backends::supports(layout, capability)
    }

    pub(super) fn check_capability(&self, record: &VolumeRecord, capability: &Capability) -> Result<()> {
        Backends::supports(&record.layout, capability).map_err(Error::InvalidArgument)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::driver::CapacityRange;
    use crate::driver::test_driver;
    use crate::kernel::blockfs::{self, FsType};
    use crate::records::{LoopSpec, Provisioning};

    #[test]
    fn a_thick_image_that_lost_blocks_gets_them_back_at_the_next_measurement() {
        let root = tempfile::tempdir().unwrap();
        let driver = test_driver(root.path());
        let spec = LoopSpec { fs: FsType::Ext4, provisioning: Provisioning::Thick, mkfs_options: Vec::new() };
        let request = NewVolume {
            name: "thick".into(),
            capacity: CapacityRange { required: 16 << 20, limit: 0 },
            capabilities: Vec::new(),
            parameters: BTreeMap::new(),
            mutable_parameters: BTreeMap::new(),
            layout: Layout::Loop(spec),
            source: None,
            allowed_nodes: None,
        };
        let key = Key::for_name(Kind::Volume, "thick");
        let record = driver.create_volume(key, request).unwrap();
        let image = root.path().join("volumes").join(format!("{key}.img"));
        assert!(blockfs::allocated_bytes(&image).unwrap() >= record.capacity_bytes);

        // What ext4's lazy init does through the loop device: a punched hole.
        let file = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
        let punch = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        nix::fcntl::fallocate(file.as_fd(), punch, 1 << 20, 4 << 20).unwrap();
        assert!(blockfs::allocated_bytes(&image).unwrap() < record.capacity_bytes, "the hole is there");

        driver.refresh_promises().unwrap();
        assert!(blockfs::allocated_bytes(&image).unwrap() >= record.capacity_bytes, "allocated again");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), record.capacity_bytes, "same length");
        assert_eq!(driver.promised(), 0, "nothing left to promise for a whole thick volume");

        // A volume with an operation in flight is left alone until it ends.
        nix::fcntl::fallocate(file.as_fd(), punch, 1 << 20, 4 << 20).unwrap();
        let busy = driver.claim(Kind::Volume, key).unwrap();
        driver.refresh_promises().unwrap();
        assert!(blockfs::allocated_bytes(&image).unwrap() < record.capacity_bytes);
        drop(busy);
        driver.refresh_promises().unwrap();
        assert!(blockfs::allocated_bytes(&image).unwrap() >= record.capacity_bytes);
    }
}
