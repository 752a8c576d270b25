//! The node half: staging, publishing, stats and expansion of volumes on
//! this machine, reconciled against the mount table.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::{fs, io};

use super::{CapacityRange, Condition, Driver, VolumeStats};
use crate::backend::loopback::FormatLog;
use crate::error::{Error, IoContext, Result};
use crate::ids::Key;
use crate::kernel::mount::MountFlags;
use crate::kernel::mountinfo;
use crate::kernel::mountinfo::MountEntry;
use crate::kernel::nofollow::{self, Removal, Want};
use crate::kernel::quota::QuotaUsage;
use crate::records::{BackendKind, Capability, Formatting, Publication, Stage, VolumeRecord};

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
        self.check_path_free(&key, record.backend, path)?;
        match (record.backend, &record.loop_spec) {
            (BackendKind::Loop, Some(spec)) => {
                // A bad staging path is refused before the image is attached
                // or formatted, not after.
                if !capability.block {
                    nofollow::open_or_create(path, Want::Dir).map_err(|e| Error::at_caller_path("staging path", e))?;
                }
                let record_formatting = |formatting| self.record_formatting(&key, formatting);
                let formats = FormatLog { state: record.formatting, record: &record_formatting };
                self.loopback.stage(&key, spec, path, &capability, &formats)?;
                if let (Some(gid), false) = (capability.mount_group, capability.block) {
                    apply_mount_group(path, gid)?;
                }
            }
            _ => self.stage_dir(&key, path, &capability)?,
        }
        crate::failpoint!("stage.mounted");
        // Formatting may have been recorded since it was read.
        let record = self.volume(&key)?;
        if record.stage.is_none() {
            let mut staged = (*record).clone();
            staged.stage = Some(Stage { path: path.to_owned(), capability });
            if let Err(e) = self.put_volume(key, staged) {
                // Leave nothing the record does not know about.
                let _ = self.unstage_backend(&record, &key, path, true);
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

    /// Binds a directory volume onto its staging path; an inline volume is
    /// staged on its own data directory, with nothing to bind.
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
        if path == data {
            return Ok(());
        }
        nofollow::open_or_create(path, Want::Dir).map_err(|e| Error::at_caller_path("staging path", e))?;
        let mounts = self.mount_table()?;
        if !mountinfo::find_mount_point(&mounts, path).is_some_and(|e| self.shows_volume(e, key, BackendKind::Dir)) {
            self.kernel.bind(&data, path, MountFlags::default()).map_err(|e| {
                Error::at_caller_path(format!("bind-mounting {} on {}", data.display(), path.display()), e)
            })?;
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
            None => drop(self.unmount_ours(path, &key, BackendKind::Dir, false)?),
        }
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

    fn unstage_backend(&self, record: &VolumeRecord, key: &Key, path: &Path, ours: bool) -> Result<()> {
        match record.backend {
            BackendKind::Dir => self.unmount_ours(path, key, BackendKind::Dir, ours).map(drop),
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
        let _path = self.paths.try_claim(target)?;
        self.check_path_free(&key, record.backend, target)?;
        let source = match record.backend {
            BackendKind::Dir => staging.to_owned(),
            BackendKind::Loop => self.loopback.publish_source(&key, staging, capability.block, read_only)?,
        };
        let published = self.bind_publication(&record, key, &source, target, flags, publication);
        // A read-only block publication may have just attached a read-only
        // device; if it did not come to be and no other one uses that
        // device, detach it now rather than at some later unpublish.
        if published.is_err()
            && record.backend == BackendKind::Loop
            && capability.block
            && read_only
            && !record.publications.values().any(|p| p.read_only && p.capability.block)
            && let Err(e) = self.loopback.release_read_only(&key)
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
        let mounts = self.mount_table()?;
        if !mountinfo::find_mount_point(&mounts, target).is_some_and(|e| self.shows_volume(e, &key, record.backend)) {
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
        let backend = record.as_ref().map_or(BackendKind::Dir, |r| r.backend);
        let unmounted = self.unmount_ours(target, &key, backend, publication.is_some())?;
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

    /// Removes an unmounted target if it is an empty directory or an empty
    /// file; whatever else is there (a pod's files written under it after
    /// the unmount, a stranger's mount) is left and logged.
    fn remove_target(&self, target: &Path) -> Result<()> {
        let mounts = self.mount_table()?;
        if let Some(entry) = mountinfo::find_mount_point(&mounts, target) {
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
    fn check_path_free(&self, key: &Key, backend: BackendKind, path: &Path) -> Result<()> {
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
        let mounts = self.mount_table()?;
        if let Some(entry) = mountinfo::find_mount_point(&mounts, path)
            && !self.shows_volume(entry, key, backend)
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

    /// Whether a recorded stage still exists in the kernel: the staging
    /// mount shows the volume, or (loop) a device is attached to its image.
    pub(super) fn stage_is_live(&self, record: &VolumeRecord, key: &Key, stage: &Stage) -> Result<bool> {
        if record.backend == BackendKind::Loop && self.loopback.is_attached(key)? {
            return Ok(true);
        }
        let mounts = self.mount_table()?;
        Ok(mountinfo::find_mount_point(&mounts, &stage.path).is_some_and(|e| self.shows_volume(e, key, record.backend)))
    }

    fn mount_table(&self) -> Result<Vec<MountEntry>> {
        self.kernel.mounts().context(|| "reading the mount table".into())
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
    /// shows our volume there; never touches a stranger's mount. Returns
    /// whether it unmounted anything.
    fn unmount_ours(&self, path: &Path, key: &Key, backend: BackendKind, ours: bool) -> Result<bool> {
        // Stacked binds of the same volume (a retried publish after a crash)
        // are all removed; the bound keeps a confused table from looping.
        for round in 0..8 {
            let mounts = self.mount_table()?;
            let Some(entry) = mountinfo::find_mount_point(&mounts, path) else { return Ok(round > 0) };
            if !ours && !self.shows_volume(entry, key, backend) {
                return Ok(round > 0);
            }
            self.kernel.unmount(path).context(|| format!("unmounting {}", path.display()))?;
        }
        Err(Error::FailedPrecondition(format!(
            "{} still has mounts after 8 unmounts; inspect it with findmnt",
            path.display()
        )))
    }
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
