//! The node half: staging, publishing, stats and expansion of volumes on
//! this machine, reconciled against the mount table.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{CapacityRange, Condition, Driver, VolumeStats};
use crate::backend::loopback::FormatLog;
use crate::error::{Error, IoContext, Result};
use crate::ids::Key;
use crate::kernel::mount::MountFlags;
use crate::kernel::mountinfo::MountEntry;
use crate::kernel::nofollow::{self, Removal, Want};
use crate::records::{Capability, Formatting, Layout, Publication, Stage, VolumeRecord};

impl Driver {
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
        let _path = self.paths.try_claim(path)?;
        self.check_path_free(&key, &record.layout, path)?;
        let record_formatting = |formatting| self.record_formatting(&key, formatting);
        let formats = FormatLog { state: record.formatting, record: &record_formatting };
        self.backends.stage(&key, &record.layout, path, &capability, &formats)?;
        crate::failpoint!("stage.mounted");
        // Formatting may have been recorded since it was read.
        let record = self.volume(&key)?;
        if record.stage.is_none() {
            let mut staged = (*record).clone();
            staged.stage = Some(Stage { path: path.to_owned(), capability });
            if let Err(e) = self.put_volume(key, staged) {
                // Leave nothing the record does not know about.
                let _ = self.backends.unstage(&key, Some(&record.layout), path, true);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Durably records how far formatting the volume's image got.
    fn record_formatting(&self, key: &Key, formatting: Formatting) -> Result<()> {
        let mut record = (*self.volume(key)?).clone();
        record.formatting = Some(formatting);
        self.put_volume(*key, record).map(drop)
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
        self.backends.unstage(&key, record.as_ref().map(|r| &r.layout), path, ours)?;
        crate::failpoint!("unstage.unmounted");
        if let Some(record) = record
            && ours
        {
            let mut unstaged = (*record).clone();
            unstaged.stage = None;
            self.put_volume(key, unstaged)?;
        }
        Ok(())
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
        let _path = self.paths.try_claim(target)?;
        self.check_path_free(&key, &record.layout, target)?;
        let source = self.backends.publish_source(&key, &record.layout, staging, capability.block, read_only)?;
        let published = self.bind_publication(&record, key, &source, target, flags, publication);
        // A read-only block publication may have just attached a read-only
        // device; if it did not come to be and no other one uses that
        // device, detach it now rather than at some later unpublish.
        if published.is_err()
            && capability.block
            && read_only
            && !record.publications.values().any(|p| p.read_only && p.capability.block)
            && let Err(e) = self.backends.release_read_only(&key, &record.layout)
        {
            tracing::warn!(volume = %record.id, "cannot detach the read-only device of a failed publish: {e}");
        }
        published
    }

    /// Binds `source` onto `target` unless it is there already, and records
    /// the publication (undoing the bind if the record cannot be written).
    fn bind_publication(
        &self,
        record: &VolumeRecord,
        key: Key,
        source: &Path,
        target: &Path,
        flags: MountFlags,
        publication: Publication,
    ) -> Result<()> {
        let want = if publication.capability.block { Want::File } else { Want::Dir };
        nofollow::open_or_create(target, want).map_err(|e| Error::at_caller_path("target path", e))?;
        if !self.mount_at(target)?.is_some_and(|e| self.backends.shows_volume(&e, &key, Some(&record.layout))) {
            self.kernel.bind(source, target, flags).map_err(|e| {
                Error::at_caller_path(format!("bind-mounting {} on {}", source.display(), target.display()), e)
            })?;
        }
        crate::failpoint!("publish.bound");
        if !record.publications.contains_key(target) {
            let mut published = record.clone();
            published.publications.insert(target.to_owned(), publication);
            if let Err(e) = self.put_volume(key, published) {
                let _ = self.kernel.unmount(target);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unpublishes a volume from a target and removes the target Loam made
    /// there; unpublishing what is not published succeeds and deletes
    /// nothing. A volume this node does not have (deleted already, as when
    /// the kubelet retries after a forced deletion) has nothing published
    /// but, at most, a mount of it a crash left: that is undone, nothing else.
    pub fn node_unpublish(&self, key: Key, target: &Path) -> Result<()> {
        let record = self.volumes.get(&key);
        if record.is_none() {
            tracing::info!(%key, target = %target.display(), "no such volume on this node: nothing to unpublish but its own mount");
        }
        self.unpublish_target(key, record, target)
    }

    /// [`Driver::node_unpublish`] for a volume that may have no record yet
    /// (an inline volume whose publish crashed before writing it): then only
    /// a mount that shows the volume is undone.
    pub(super) fn unpublish_target(&self, key: Key, record: Option<Arc<VolumeRecord>>, target: &Path) -> Result<()> {
        let publication = record.as_ref().and_then(|r| r.publications.get(target).cloned());
        let layout = record.as_ref().map(|r| &r.layout);
        let unmounted = self.backends.unmount(target, &key, layout, publication.is_some())?;
        // The target is Loam's to remove only when Loam published there
        // (the record says so, or our mount was there): never a path some
        // other volume or program uses, and only in the empty shape Loam
        // made it, with nothing mounted on it any more.
        if publication.is_some() || unmounted {
            self.remove_target(target)?;
        }
        crate::failpoint!("unpublish.unmounted");
        if let (Some(record), Some(publication)) = (record, publication) {
            let mut unpublished = (*record).clone();
            unpublished.publications.remove(target);
            let read_only_block_left = unpublished.publications.values().any(|p| p.read_only && p.capability.block);
            self.put_volume(key, unpublished)?;
            if publication.read_only && publication.capability.block && !read_only_block_left {
                self.backends.release_read_only(&key, &record.layout)?;
            }
        }
        Ok(())
    }

    /// Removes an unmounted target if it is an empty directory or an empty
    /// file; whatever else is there (a pod's files written under it after
    /// the unmount, a stranger's mount) is left and logged.
    fn remove_target(&self, target: &Path) -> Result<()> {
        if let Some(entry) = self.mount_at(target)? {
            tracing::warn!(target = %target.display(), source = %entry.source, "left the target: something else is mounted on it");
            return Ok(());
        }
        match nofollow::remove_if_empty(target) {
            Ok(Removal::Removed | Removal::Missing) => {}
            Ok(Removal::Kept) => tracing::warn!(target = %target.display(), "left the target: it is not empty"),
            // The volume is unmounted from it already; a path that now leads
            // through a symlink is left alone rather than failing the
            // unpublish forever.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                tracing::warn!(target = %target.display(), "left the target: {e}");
            }
            Err(e) => return Err(Error::io(format!("removing the target {}", target.display()), e)),
        }
        Ok(())
    }

    /// Refuses `path` when another volume is staged or published at it, or
    /// at a path inside or around it (the mounts would hide each other, and
    /// unmounting one would take the other's), or when a mount that is not
    /// this volume's sits on it.
    fn check_path_free(&self, key: &Key, layout: &Layout, path: &Path) -> Result<()> {
        if let Some((other_key, used)) = self.places.clash(key, path) {
            let other = self.volumes.get(&other_key).map_or_else(|| other_key.to_string(), |r| r.id.clone());
            let relation = if used == path {
                "the path"
            } else if used.starts_with(path) {
                "around the path"
            } else {
                "inside the path"
            };
            return Err(Error::FailedPrecondition(format!(
                "{} is {relation} volume {other} is staged or published at ({}); unpublish or unstage volume {other} there first, or use another path",
                path.display(),
                used.display()
            )));
        }
        if let Some(entry) = self.mount_at(path)?
            && !self.backends.shows_volume(&entry, key, Some(layout))
        {
            return Err(Error::FailedPrecondition(format!(
                "{} already has {} (from {}) mounted on it, which is not volume {key}; unmount it first or use another path",
                path.display(),
                entry.fs_type,
                entry.source
            )));
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
        Ok((self.backends.stats(&key, &record, &stage)?, condition))
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
        self.backends.node_expand(&key, &record.layout, &stage)?;
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

    /// Whether a recorded stage still exists in the kernel.
    pub(super) fn stage_is_live(&self, record: &VolumeRecord, key: &Key, stage: &Stage) -> Result<bool> {
        self.backends.stage_is_live(key, &record.layout, stage)
    }

    /// The topmost mount on `path`, if any; the mount table is read only
    /// when there is one.
    fn mount_at(&self, path: &Path) -> Result<Option<MountEntry>> {
        self.kernel.mount_at(path).context(|| format!("looking for a mount on {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Config, QuotaMode};
    use crate::driver::{CapacityRange, NewVolume};
    use crate::ids::Kind;
    use crate::kernel::{FakeKernel, Kernel};
    use crate::records::AccessMode;

    fn capability() -> Capability {
        Capability {
            access_mode: AccessMode::SingleNodeWriter,
            block: false,
            fs_type: String::new(),
            mount_flags: Vec::new(),
        }
    }

    /// A driver on `fake` with one directory volume; returns it and the volume's key.
    fn driver_with_volume(root: &Path, fake: Arc<FakeKernel>) -> (Driver, Key) {
        let config = Config {
            driver_name: "loam.csi.dev".into(),
            node_id: "n".into(),
            root: root.join("root"),
            max_volumes_per_node: 0,
            quota: QuotaMode::Off,
        };
        let driver = Driver::open(config, fake).unwrap();
        let key = Key::for_name(Kind::Volume, "pvc-1");
        let request = NewVolume {
            name: "pvc-1".into(),
            capacity: CapacityRange { required: 1 << 20, limit: 0 },
            capabilities: vec![capability()],
            parameters: BTreeMap::new(),
            mutable_parameters: BTreeMap::new(),
            layout: Layout::Dir,
            source: None,
            allowed_nodes: None,
        };
        driver.create_volume(key, request).unwrap();
        (driver, key)
    }

    /// Reading the whole mount table costs in proportion to the node's
    /// mounts; the node cycle of a volume asks only about its own paths.
    #[test]
    fn a_node_cycle_never_reads_the_whole_mount_table() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeKernel::new());
        let (driver, key) = driver_with_volume(dir.path(), fake.clone());
        let (staging, target) = (dir.path().join("staging"), dir.path().join("target"));
        let reads_before = fake.table_reads();

        for _ in 0..2 {
            driver.node_stage(key, &staging, capability()).unwrap();
            driver.node_publish(key, &staging, &target, false, capability()).unwrap();
            assert!(fake.is_mounted(&staging) && fake.is_mounted(&target));
            driver.node_unpublish(key, &target).unwrap();
            driver.node_unstage(key, &staging).unwrap();
            assert!(!fake.is_mounted(&staging) && !fake.is_mounted(&target));
            assert!(!target.exists(), "the target Loam made is removed");
        }
        assert_eq!(fake.table_reads(), reads_before, "{:?}", fake.calls());
    }

    /// A crash between a bind and its record leaves mounts the record does
    /// not know; the retried unpublish and unstage take every stacked mount
    /// of the volume, and a stranger's mount on another path stays.
    #[test]
    fn stacked_mounts_of_the_volume_all_go_and_a_strangers_stays() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeKernel::new());
        let (driver, key) = driver_with_volume(dir.path(), fake.clone());
        let (staging, target) = (dir.path().join("staging"), dir.path().join("target"));
        let (stranger, theirs) = (dir.path().join("stranger"), dir.path().join("theirs"));
        for path in [&stranger, &theirs] {
            std::fs::create_dir(path).unwrap();
        }
        fake.bind(&stranger, &theirs, MountFlags::default()).unwrap();
        driver.node_stage(key, &staging, capability()).unwrap();
        driver.node_publish(key, &staging, &target, false, capability()).unwrap();
        // What a crashed, retried publish and stage leave on top.
        fake.bind(&staging, &target, MountFlags::default()).unwrap();
        let data = dir.path().join("root/volumes").join(key.to_string());
        fake.bind(&data, &staging, MountFlags::default()).unwrap();

        // Not the volume's: refused, left alone.
        let err = driver.node_publish(key, &staging, &theirs, false, capability()).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        driver.node_unpublish(key, &theirs).unwrap();
        assert!(fake.is_mounted(&theirs), "a stranger's mount stays");

        driver.node_unpublish(key, &target).unwrap();
        driver.node_unstage(key, &staging).unwrap();
        assert!(!fake.is_mounted(&target) && !fake.is_mounted(&staging), "{:?}", fake.calls());
        assert!(fake.is_mounted(&theirs));
    }
}
