//! The `dir` backend: each volume is a directory under the driver's root,
//! with its capacity enforced by the root filesystem's quotas where it can.
//!
//! Layout under the root: `volumes/<key>/` holds a volume's files and
//! `snapshots/<key>/` a snapshot of them. Content is built under a
//! dot-prefixed temporary name and renamed into place, so a crash never leaves
//! a half-copied volume or snapshot under its real name.
//!
//! On btrfs with quotas, a volume is a subvolume limited by its qgroup, and
//! snapshots, restores and clones are btrfs snapshots (instant,
//! copy-on-write; a snapshot is atomic, so it is made under its real name).
//! On XFS/ext4 with project quotas, a volume directory gets its own project
//! id, inherited by everything created in it, and a hard block limit.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Condition, Fill, VolumeStats, in_the_making};
use crate::config::QuotaMode;
use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::ids::Key;
use crate::kernel::Kernel;
use crate::kernel::copy::{copy_into, copy_tree};
use crate::kernel::mount::MountFlags;
use crate::kernel::mountinfo::MountEntry;
use crate::kernel::nofollow::{self, Want};
use crate::kernel::quota::{Enforcer, ProjectIds, QuotaUsage};
use crate::kernel::usage::{TreeUsage, fs_usage, tree_usage};
use crate::records::Enforcement;

/// Mode of a new, empty volume root: writable by any pod user, as hostPath
/// and local volumes are; the CO narrows it with fsGroup when it wants to.
const VOLUME_ROOT_MODE: u32 = 0o777;

/// Directory volumes and their snapshots under one root.
#[derive(Debug)]
pub struct DirBackend {
    volumes: PathBuf,
    snapshots: PathBuf,
    enforcer: Enforcer,
    kernel: Arc<dyn Kernel>,
}

impl DirBackend {
    /// Uses (creating if needed) `volumes/` and `snapshots/` under `root`,
    /// and finds out how capacities can be enforced there.
    pub fn open(root: &Path, quota: QuotaMode, kernel: Arc<dyn Kernel>) -> Result<DirBackend> {
        let volumes = root.join("volumes");
        let snapshots = root.join("snapshots");
        for dir in [&volumes, &snapshots] {
            fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        }
        let enforcer = match quota {
            QuotaMode::Off => Enforcer::None("quota enforcement is turned off (--quota off)".into()),
            QuotaMode::Auto | QuotaMode::Required => kernel
                .quota_enforcer(&volumes, quota == QuotaMode::Required)
                .context(|| format!("finding out how {} can enforce capacities", volumes.display()))?,
        };
        match &enforcer {
            Enforcer::None(reason) if quota == QuotaMode::Off => tracing::info!("capacities not enforced: {reason}"),
            Enforcer::None(reason) => tracing::warn!("capacities of dir volumes are NOT enforced: {reason}"),
            enforcing => tracing::info!(with = %enforcing.describe(), "capacities of dir volumes are enforced"),
        }
        Ok(DirBackend { volumes, snapshots, enforcer, kernel })
    }

    /// How capacities are enforced on this root.
    pub fn enforcer(&self) -> &Enforcer {
        &self.enforcer
    }

    /// Where the volume's files live.
    pub fn volume_path(&self, key: &Key) -> PathBuf {
        self.volumes.join(key.to_string())
    }

    /// Where the snapshot's files live.
    pub fn snapshot_path(&self, key: &Key) -> PathBuf {
        self.snapshots.join(key.to_string())
    }

    /// Makes the volume with its capacity enforced where the root can,
    /// filled as `fill` says (a copy of a volume or snapshot directory).
    /// Replaces leftovers of an earlier attempt that crashed.
    pub fn create_volume(&self, key: &Key, fill: Fill<'_>, capacity: u64) -> Result<Enforcement> {
        let path = self.volume_path(key);
        match &self.enforcer {
            Enforcer::Btrfs => {
                match fill {
                    // A snapshot appears whole or not at all: no temporary name.
                    Fill::Copy(source) if self.kernel.is_subvolume(&source.path) => {
                        self.remove_tree(&path)?;
                        self.kernel
                            .snapshot_subvolume(&source.path, &path, false)
                            .context(|| format!("snapshotting {} as {}", source.path.display(), path.display()))?;
                    }
                    fill => self.build_in_place(&path, |tmp| {
                        self.kernel.create_subvolume(tmp)?;
                        fill_root(tmp, fill)
                    })?,
                }
                let limited = self
                    .kernel
                    .subvolume_id(&path)
                    .context(|| format!("reading subvolume id of {}", path.display()))
                    .and_then(|id| {
                        self.kernel
                            .set_qgroup_limit(&path, id, capacity)
                            .context(|| format!("limiting qgroup 0/{id} to {capacity}"))?;
                        Ok(id)
                    });
                match limited {
                    Ok(id) => Ok(Enforcement::BtrfsQgroup(id)),
                    Err(e) => {
                        // No record will name an unlimited subvolume: take it
                        // away (best effort: a retry replaces it anyway).
                        let _ = self.remove_tree(&path);
                        Err(e)
                    }
                }
            }
            Enforcer::Project(ids) => {
                // What an attempt that crashed left, with its project's limit.
                self.remove_leftover(&in_the_making(&path))?;
                self.remove_leftover(&path)?;
                let id = ids
                    .allocate(|id| self.kernel.project_quota(&self.volumes, id))
                    .context(|| "allocating a project id".into())?;
                let built = self.build_in_place(&path, |tmp| {
                    fs::create_dir(tmp)?;
                    self.kernel.assign_project(tmp, id)?;
                    self.kernel.set_project_limit(&self.volumes, id, capacity, 0)?;
                    fill_root(tmp, fill)
                });
                if let Err(e) = built {
                    // Best effort: an id that still has a limit is skipped by
                    // the next allocation anyway.
                    let _ = self.release_project(ids, id);
                    return Err(e);
                }
                Ok(Enforcement::Project(id))
            }
            Enforcer::None(reason) => {
                self.build_in_place(&path, |tmp| match fill {
                    Fill::Copy(source) => durable_copy(&source.path, tmp),
                    fill => {
                        fs::create_dir(tmp)?;
                        fill_root(tmp, fill)
                    }
                })?;
                // The reason is the root's, the same for every volume: kept
                // once in the enforcer, not in each record (records are held
                // in memory, and 10,000 copies of a sentence add up).
                let _ = reason;
                Ok(Enforcement::Unenforced(String::new()))
            }
        }
    }

    /// Snapshots the volume's files: a read-only btrfs snapshot when the
    /// volume is a subvolume, a copy otherwise.
    pub fn create_snapshot(&self, volume: &Key, snapshot: &Key) -> Result<()> {
        let source = self.volume_path(volume);
        let path = self.snapshot_path(snapshot);
        if self.kernel.is_subvolume(&source) {
            self.remove_tree(&path)?;
            return self
                .kernel
                .snapshot_subvolume(&source, &path, true)
                .context(|| format!("snapshotting {} as {}", source.display(), path.display()));
        }
        self.build_in_place(&path, |tmp| durable_copy(&source, tmp))
    }

    /// Whether [`DirBackend::create_snapshot`] of the volume is point in time
    /// (a btrfs snapshot of its subvolume) rather than a file-by-file copy.
    pub fn snapshots_atomically(&self, volume: &Key) -> bool {
        self.kernel.is_subvolume(&self.volume_path(volume))
    }

    /// Removes the volume's files and gives back its project id; a missing
    /// volume is already removed.
    pub fn delete_volume(&self, key: &Key, enforcement: Option<&Enforcement>) -> Result<()> {
        let path = self.volume_path(key);
        self.remove_tree(&path)?;
        // Gone for good before the record goes, or a crash could bring back
        // a directory no record knows about.
        sync_parent(&path)?;
        if let (Enforcer::Project(ids), Some(Enforcement::Project(id))) = (&self.enforcer, enforcement) {
            self.release_project(ids, *id).context(|| format!("clearing the limits of project {id}"))?;
        }
        Ok(())
    }

    /// Removes what a receive cut short left of a volume no record names:
    /// its tree, whole or still under its temporary name, and the limit of
    /// the project it was given.
    pub fn remove_unrecorded(&self, key: &Key) -> Result<()> {
        let path = self.volume_path(key);
        self.remove_leftover(&in_the_making(&path))?;
        self.remove_leftover(&path)?;
        sync_parent(&path)
    }

    /// Removes a volume tree that no record names (a crash or a failed
    /// attempt left it), and with project quotas clears the limit of the
    /// project it is tagged with: no record will ever give that id back,
    /// and an id with a limit is never allocated again. An id some volume
    /// or creation holds is left alone.
    fn remove_leftover(&self, path: &Path) -> Result<()> {
        if let Enforcer::Project(ids) = &self.enforcer {
            let id = match fs::symlink_metadata(path) {
                Ok(meta) if meta.is_dir() => {
                    self.kernel.tagged_project(path).context(|| format!("reading the project of {}", path.display()))?
                }
                // Missing, or a planted file or symlink: no project (and a
                // symlink is removed itself, never followed).
                _ => 0,
            };
            // Cleared first: a crash before the tree is gone leaves it
            // tagged, and the next removal finds the id again.
            if id != 0 && !ids.holds(id) {
                self.release_project(ids, id).context(|| format!("clearing the limits of project {id}"))?;
            }
        }
        self.remove_tree(path)
    }

    /// Makes the snapshot's directory from what another node sends, built
    /// under a temporary name and renamed in once it checked out.
    pub fn receive_snapshot(&self, key: &Key, receive: &mut dyn FnMut(&Path) -> io::Result<()>) -> Result<()> {
        self.build_in_place(&self.snapshot_path(key), |tmp| {
            fs::create_dir(tmp)?;
            receive(tmp)?;
            durable::sync_filesystem(tmp)
        })
    }

    /// Removes the snapshot's files, and what a crash left of them half
    /// made (an export's cut is never made again under its name to replace
    /// it); a missing snapshot is already removed.
    pub fn delete_snapshot(&self, key: &Key) -> Result<()> {
        let path = self.snapshot_path(key);
        self.remove_tree(&in_the_making(&path))?;
        self.remove_tree(&path)?;
        sync_parent(&path)
    }

    /// Whether the volume's directory exists (and is a directory, not a link).
    pub fn volume_exists(&self, key: &Key) -> bool {
        fs::symlink_metadata(self.volume_path(key)).is_ok_and(|m| m.is_dir())
    }

    /// Space and inodes the volume's files take, found by walking its tree.
    pub fn usage(&self, key: &Key) -> Result<TreeUsage> {
        let path = self.volume_path(key);
        tree_usage(&path).context(|| format!("measuring {}", path.display()))
    }

    /// What the quota has counted for the volume; `None` when its capacity
    /// is not enforced by this root's quotas.
    pub fn quota_usage(&self, enforcement: Option<&Enforcement>) -> Result<Option<QuotaUsage>> {
        match (&self.enforcer, enforcement) {
            (Enforcer::Btrfs, Some(Enforcement::BtrfsQgroup(id))) => {
                let (bytes, limit) =
                    self.kernel.qgroup_usage(&self.volumes, *id).context(|| format!("reading qgroup 0/{id}"))?;
                Ok(Some(QuotaUsage { bytes, inodes: None, limit }))
            }
            (Enforcer::Project(_), Some(Enforcement::Project(id))) => {
                let q =
                    self.kernel.project_quota(&self.volumes, *id).context(|| format!("reading project quota {id}"))?;
                Ok(Some(QuotaUsage { bytes: q.bytes, inodes: Some(q.inodes), limit: Some(q.bytes_limit) }))
            }
            _ => Ok(None),
        }
    }

    /// Sets the volume's enforced limit to `capacity` (no-op when not enforced).
    pub fn set_limit(&self, key: &Key, enforcement: Option<&Enforcement>, capacity: u64) -> Result<()> {
        match (&self.enforcer, enforcement) {
            (Enforcer::Btrfs, Some(Enforcement::BtrfsQgroup(id))) => self
                .kernel
                .set_qgroup_limit(&self.volume_path(key), *id, capacity)
                .context(|| format!("limiting qgroup 0/{id} to {capacity} bytes")),
            (Enforcer::Project(_), Some(Enforcement::Project(id))) => self
                .kernel
                .set_project_limit(&self.volumes, *id, capacity, 0)
                .context(|| format!("limiting project {id} to {capacity} bytes")),
            _ => Ok(()),
        }
    }

    /// Takes over a volume loaded from its record at start-up: holds its
    /// project id, and puts its limit back when it is missing or differs.
    pub fn adopt(&self, key: &Key, enforcement: Option<&Enforcement>, capacity: u64) -> Result<()> {
        if let (Enforcer::Project(ids), Some(Enforcement::Project(id))) = (&self.enforcer, enforcement) {
            ids.hold(*id);
        }
        if !self.volume_exists(key) {
            return Ok(());
        }
        let Some(usage) = self.quota_usage(enforcement)? else {
            return Ok(());
        };
        // Quota limits are kept in 512-byte units: compare in those.
        if usage.limit.map(|l| l.div_ceil(512)) != Some(capacity.div_ceil(512)) {
            tracing::warn!(
                volume = %key,
                found = ?usage.limit,
                capacity,
                "volume limit was missing or changed; putting it back"
            );
            self.set_limit(key, enforcement, capacity)?;
        }
        Ok(())
    }

    /// Clears the limits of project `id` and gives the id back.
    fn release_project(&self, ids: &ProjectIds, id: u32) -> io::Result<()> {
        self.kernel.set_project_limit(&self.volumes, id, 0, 0)?;
        ids.forget(id);
        Ok(())
    }

    /// Builds `path` through `build` on a temporary sibling, then renames it in.
    fn build_in_place(&self, path: &Path, build: impl FnOnce(&Path) -> io::Result<()>) -> Result<()> {
        let tmp = in_the_making(path);
        self.remove_tree(&tmp)?;
        self.remove_tree(path)?;
        if let Err(e) = build(&tmp) {
            // Best effort: the next attempt removes it too.
            let _ = self.remove_tree(&tmp);
            return Err(Error::io(format!("building {}", path.display()), e));
        }
        fs::rename(&tmp, path).context(|| format!("renaming into {}", path.display()))?;
        sync_parent(path)
    }

    /// Removes a tree without following symlinks; a missing tree is fine. A
    /// btrfs subvolume (read-only snapshots included) is deleted as a whole.
    fn remove_tree(&self, path: &Path) -> Result<()> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("inspecting {}", path.display()), e)),
            // A planted symlink is removed itself; its target is never touched.
            Ok(meta) if !meta.is_dir() => fs::remove_file(path).context(|| format!("removing {}", path.display())),
            Ok(_) if self.kernel.is_subvolume(path) => {
                self.kernel.delete_subvolume(path).context(|| format!("deleting subvolume {}", path.display()))
            }
            Ok(_) => fs::remove_dir_all(path).context(|| format!("removing {}", path.display())),
        }
    }
}

// ----- Health, usage and the node half -----
impl DirBackend {
    /// Whether the volume's data directory is there.
    pub fn condition(&self, key: &Key) -> Condition {
        if self.volume_exists(key) {
            Condition { abnormal: false, message: "volume is healthy".into() }
        } else {
            Condition { abnormal: true, message: self.missing(key) }
        }
    }

    /// What the volume uses, as ControllerGetVolume's condition reports it.
    pub fn usage_message(&self, key: &Key, enforcement: Option<&Enforcement>, capacity: u64) -> Result<String> {
        let (used, how) = match self.quota_usage(enforcement)? {
            Some(quota) => (quota.bytes, "counted by the quota"),
            None => (self.usage(key)?.bytes, "counted by walking its files"),
        };
        Ok(format!("volume is healthy; {used} of {capacity} bytes used ({how})"))
    }

    /// Usage of the volume as NodeGetVolumeStats reports it: the quota's
    /// count when there is one (exact and cheap); inodes it does not count
    /// (btrfs) and unenforced volumes take a tree walk. What is available is
    /// bounded by the root's free space too.
    pub fn stats(&self, key: &Key, enforcement: Option<&Enforcement>, capacity: u64) -> Result<VolumeStats> {
        let (used_bytes, used_inodes) = match self.quota_usage(enforcement)? {
            Some(QuotaUsage { bytes, inodes: Some(inodes), .. }) => (bytes, inodes),
            Some(QuotaUsage { bytes, inodes: None, .. }) => (bytes, self.usage(key)?.inodes),
            None => {
                let used = self.usage(key)?;
                (used.bytes, used.inodes)
            }
        };
        let root = fs_usage(&self.volumes).context(|| format!("reading usage of {}", self.volumes.display()))?;
        Ok(VolumeStats {
            total_bytes: capacity,
            used_bytes,
            available_bytes: capacity.saturating_sub(used_bytes).min(root.available_bytes),
            used_inodes,
            available_inodes: root.free_inodes,
        })
    }

    /// Binds the volume's directory onto its staging path (an inline volume
    /// is staged on its own data directory, with nothing to bind).
    pub fn stage(&self, key: &Key, path: &Path) -> Result<()> {
        if !self.volume_exists(key) {
            return Err(Error::FailedPrecondition(self.missing(key)));
        }
        let data = self.volume_path(key);
        if path == data {
            return Ok(());
        }
        nofollow::open_or_create(path, Want::Dir).map_err(|e| Error::at_caller_path("staging path", e))?;
        let mounted = self.kernel.mount_at(path).context(|| format!("looking for a mount on {}", path.display()))?;
        if !mounted.is_some_and(|e| self.shows_volume(&e, key)) {
            self.kernel.bind(&data, path, MountFlags::default()).map_err(|e| {
                Error::at_caller_path(format!("bind-mounting {} on {}", data.display(), path.display()), e)
            })?;
        }
        Ok(())
    }

    /// Whether a mount shows this volume: a bind whose root is its directory.
    pub fn shows_volume(&self, entry: &MountEntry, key: &Key) -> bool {
        entry.root.ends_with(Path::new("volumes").join(key.to_string()))
    }

    fn missing(&self, key: &Key) -> String {
        format!(
            "data directory {} is missing; restore it from a backup or delete the volume",
            self.volume_path(key).display()
        )
    }
}

/// Fills a prepared, empty volume root: a copy of `source`, or an empty
/// volume's mode.
fn fill_root(root: &Path, fill: Fill<'_>) -> io::Result<()> {
    match fill {
        Fill::Copy(source) => {
            copy_into(&source.path, root)?;
            durable::sync_filesystem(root)
        }
        Fill::Receive(receive) => {
            receive(root)?;
            durable::sync_filesystem(root)
        }
        // Set explicitly: mkdir's mode is filtered by the umask.
        Fill::Empty => fs::set_permissions(root, fs::Permissions::from_mode(VOLUME_ROOT_MODE)),
    }
}

/// Makes a new or removed entry of the parent directory durable.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    durable::sync_dir(parent).context(|| format!("syncing {}", parent.display()))
}

/// Copies a tree and makes the copy durable before it gets its real name.
fn durable_copy(source: &Path, target: &Path) -> io::Result<()> {
    copy_tree(source, target)?;
    durable::sync_filesystem(target)
}

#[cfg(test)]
mod seam_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Source;
    use crate::ids::Kind;
    use crate::kernel::FakeKernel;

    #[test]
    fn volumes_snapshots_and_restores_keep_content() {
        let root = tempfile::tempdir().unwrap();
        let dir = DirBackend::open(root.path(), QuotaMode::Off, Arc::new(FakeKernel::new())).unwrap();
        let (vol, snap, restored) =
            (Key::for_name(Kind::Volume, "v"), Key::for_name(Kind::Snapshot, "s"), Key::for_name(Kind::Volume, "r"));
        let enforcement = dir.create_volume(&vol, Fill::Empty, 1 << 20).unwrap();
        assert_eq!(enforcement, Enforcement::Unenforced(String::new()));
        assert!(matches!(dir.enforcer(), Enforcer::None(r) if r.contains("--quota off")));
        fs::write(dir.volume_path(&vol).join("data"), b"hello").unwrap();
        dir.create_snapshot(&vol, &snap).unwrap();
        fs::write(dir.volume_path(&vol).join("data"), b"changed").unwrap();
        dir.create_volume(&restored, Fill::Copy(&Source { path: dir.snapshot_path(&snap), mounted: None }), 1 << 20)
            .unwrap();
        assert_eq!(fs::read(dir.volume_path(&restored).join("data")).unwrap(), b"hello");
        assert_eq!(dir.quota_usage(Some(&enforcement)).unwrap(), None);
        dir.delete_volume(&vol, Some(&enforcement)).unwrap();
        dir.delete_volume(&vol, Some(&enforcement)).unwrap();
        assert!(!dir.volume_exists(&vol));
        dir.delete_snapshot(&snap).unwrap();
        assert!(!dir.snapshot_path(&snap).exists());
    }

    #[test]
    fn a_crashed_attempt_is_replaced_and_planted_symlinks_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious"), b"keep").unwrap();
        let dir = DirBackend::open(root.path(), QuotaMode::Auto, Arc::new(FakeKernel::new())).unwrap();
        let key = Key::for_name(Kind::Volume, "v");
        // Leftovers: a half-built temp dir and a symlink where the volume goes.
        let path = dir.volume_path(&key);
        fs::create_dir(in_the_making(&path)).unwrap();
        std::os::unix::fs::symlink(outside.path(), &path).unwrap();
        let enforcement = dir.create_volume(&key, Fill::Empty, 1 << 20).unwrap();
        assert!(dir.volume_exists(&key));
        dir.delete_volume(&key, Some(&enforcement)).unwrap();
        assert_eq!(fs::read(outside.path().join("precious")).unwrap(), b"keep");
    }
}
