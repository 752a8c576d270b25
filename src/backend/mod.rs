//! The storage engines behind volumes, and every step that depends on which
//! engine holds a volume.
//!
//! A StorageClass picks one with its `backend` parameter; a volume's record
//! keeps the choice as its [`Layout`]. The set is closed and known at compile
//! time, so [`Backends`] matches on the layout here, once per step, and the
//! driver above never does: it orchestrates records, guards and the mount
//! table and asks [`Backends`] for the storage work.

pub mod dir;
pub mod loopback;
mod spec;
pub mod transfer;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use spec::{filesystem_of, min_capacity, parse_layout, parse_mutable_parameters, parse_parameters};

use crate::config::QuotaMode;
use crate::error::{Error, IoContext, Result};
use crate::ids::Key;
use crate::kernel::Kernel;
use crate::kernel::loopdev::LoopDevice;
use crate::kernel::mountinfo::MountEntry;
use crate::kernel::quota::Enforcer;
pub use crate::records::{BackendKind, Layout, LoopSpec, Provisioning};
use crate::records::{Capability, Enforcement, SnapshotRecord, Stage, VolumeRecord};
use dir::DirBackend;
use loopback::{FormatLog, LoopBackend, Orphan};
use transfer::Carried;

/// The least capacity of a `loop` volume used only as a raw block device:
/// one 4 KiB block, the largest logical block a loop device is given.
pub const BLOCK_MIN_BYTES: u64 = 4096;

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

/// What a new volume copies its content from, resolved from its record.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A snapshot of this node.
    Snapshot(&'a Key, &'a SnapshotRecord),
    /// A volume of this node.
    Volume(&'a Key, &'a VolumeRecord),
}

/// Where a new volume's content comes from, checked against its layout.
#[derive(Debug, Clone)]
pub struct Source {
    /// The directory or image to copy.
    path: PathBuf,
    /// Where the source's filesystem is mounted, when it is a staged `loop`
    /// filesystem: frozen for the copy, as for a snapshot.
    mounted: Option<PathBuf>,
}

/// What a new volume's storage starts with.
pub enum Fill<'a> {
    /// Nothing: an empty directory, a blank image.
    Empty,
    /// A copy of a volume or snapshot of this node.
    Copy(&'a Source),
    /// What another node sends: `receive` writes it into the new image file
    /// (which it creates) or into the new, empty root directory, and fails
    /// unless the whole content arrived and checked out. The storage gets its
    /// real name only after that.
    Receive(&'a mut dyn FnMut(&Path) -> std::io::Result<()>),
}

impl std::fmt::Debug for Fill<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fill::Empty => f.write_str("Empty"),
            Fill::Copy(source) => f.debug_tuple("Copy").field(source).finish(),
            Fill::Receive(_) => f.write_str("Receive(..)"),
        }
    }
}

/// The temporary sibling a volume's or snapshot's storage is built under
/// before it is renamed to `path`: whatever a crash leaves there was never
/// finished.
pub(crate) fn in_the_making(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// The engines of one node's root.
#[derive(Debug)]
pub struct Backends {
    dir: DirBackend,
    loopback: LoopBackend,
    kernel: Arc<dyn Kernel>,
}

impl Backends {
    /// Prepares both engines under `root` (creating their directories) and
    /// finds out how directory capacities can be enforced there.
    pub fn open(root: &Path, quota: QuotaMode, kernel: Arc<dyn Kernel>) -> Result<Backends> {
        let dir = DirBackend::open(root, quota, kernel.clone())?;
        let loopback = LoopBackend::new(root, kernel.clone());
        Ok(Backends { dir, loopback, kernel })
    }

    /// Why directory volumes on this root are not enforced, when they are not.
    pub fn unenforced_reason(&self) -> Option<&str> {
        match self.dir.enforcer() {
            Enforcer::None(reason) => Some(reason),
            _ => None,
        }
    }

    // ----- Start-up -----

    /// Takes over a volume loaded from its record: a directory's limit lives
    /// in the filesystem, which an operator or a restore can change behind
    /// Loam's back, so what the record promises is put back.
    pub fn adopt(&self, key: &Key, record: &VolumeRecord) -> Result<()> {
        match record.layout {
            Layout::Dir => self.dir.adopt(key, record.enforcement.as_ref(), record.capacity_bytes),
            Layout::Loop(_) => Ok(()),
        }
    }

    /// Detaches loop devices of volumes that are not `staged`: what a crash
    /// between attach and record can leave (see [`LoopBackend::detach_orphans`]).
    pub fn detach_orphans(&self, staged: impl Fn(&Key) -> bool) -> Result<Vec<(LoopDevice, Orphan)>> {
        self.loopback.detach_orphans(staged)
    }

    /// Thaws the volume's staged filesystem if a driver killed during a
    /// snapshot left it frozen; returns whether it was frozen.
    pub fn thaw_stage(&self, key: &Key, record: &VolumeRecord) -> Result<bool> {
        match (&record.layout, &record.stage) {
            (Layout::Loop(_), Some(stage)) if !stage.capability.block => self.loopback.thaw_stage(key, &stage.path),
            _ => Ok(false),
        }
    }

    // ----- Volumes -----

    /// Whether a volume laid out as `layout` can serve `capability`; the
    /// reason when it cannot.
    pub fn supports(layout: &Layout, capability: &Capability) -> std::result::Result<(), String> {
        match layout {
            Layout::Dir if capability.block => {
                Err("the dir backend serves filesystem volumes only; use a block-capable backend for raw block".into())
            }
            Layout::Dir => Ok(()),
            Layout::Loop(_) if capability.block || capability.fs_type.is_empty() => Ok(()),
            Layout::Loop(_) if matches!(capability.fs_type.as_str(), "ext4" | "xfs") => Ok(()),
            Layout::Loop(_) => {
                Err(format!("fs type {:?} is not supported by the loop backend; use ext4 or xfs", capability.fs_type))
            }
        }
    }

    /// Refuses a new directory volume when `--quota required` cannot be met.
    pub fn check_enforceable(&self, layout: &Layout, mode: QuotaMode) -> Result<()> {
        match (mode, layout, self.dir.enforcer()) {
            (QuotaMode::Required, Layout::Dir, Enforcer::None(reason)) => {
                Err(Error::FailedPrecondition(format!("--quota required, but capacities cannot be enforced: {reason}")))
            }
            _ => Ok(()),
        }
    }

    /// The least capacity a volume with `layout` can have, asked for with
    /// `capabilities`: a `loop` volume only ever used as a raw block device
    /// is never formatted, so its filesystem's minimum does not apply (a
    /// 1 MiB block claim gets a 1 MiB device, and a restore of its snapshot
    /// into another 1 MiB claim fits).
    pub fn min_capacity(layout: &Layout, capabilities: &[Capability]) -> Result<u64> {
        match layout {
            Layout::Dir => Ok(0),
            Layout::Loop(_) if !capabilities.is_empty() && capabilities.iter().all(|c| c.block) => Ok(BLOCK_MIN_BYTES),
            Layout::Loop(spec) => min_capacity(spec),
        }
    }

    /// What a new volume with `layout` copies from `origin`. Content never
    /// crosses backends.
    pub fn source(&self, layout: &Layout, origin: Origin<'_>) -> Result<Source> {
        let (from, source) = match origin {
            Origin::Snapshot(key, snapshot) => {
                let path = match snapshot.backend {
                    BackendKind::Dir => self.dir.snapshot_path(key),
                    BackendKind::Loop => self.loopback.snapshot_path(key),
                };
                (snapshot.backend, Source { path, mounted: None })
            }
            Origin::Volume(key, volume) => {
                let source = match volume.layout {
                    Layout::Dir => Source { path: self.dir.volume_path(key), mounted: None },
                    Layout::Loop(_) => Source {
                        path: self.loopback.image_path(key),
                        mounted: filesystem_stage(volume).map(|s| s.path.clone()),
                    },
                };
                (volume.layout.backend(), source)
            }
        };
        let to = layout.backend();
        if from != to {
            return Err(Error::InvalidArgument(format!(
                "the source lives on the {from:?} backend; restore or clone it into a {from:?} volume, not {to:?}"
            )));
        }
        Ok(source)
    }

    /// Makes a volume's storage, filled as `fill` says; returns how its
    /// capacity is enforced, for a directory.
    pub fn create_volume(
        &self,
        key: &Key,
        layout: &Layout,
        capacity: u64,
        fill: Fill<'_>,
    ) -> Result<Option<Enforcement>> {
        match layout {
            Layout::Dir => Ok(Some(self.dir.create_volume(key, fill, capacity)?)),
            Layout::Loop(spec) => {
                self.loopback.create_volume(key, capacity, spec, fill)?;
                Ok(None)
            }
        }
    }

    /// Removes a volume's storage; without a record (a crash after the
    /// storage was made, before the record) both engines are cleared.
    pub fn delete_volume(&self, key: &Key, record: Option<&VolumeRecord>) -> Result<()> {
        let layout = record.map(|r| &r.layout);
        if !matches!(layout, Some(Layout::Loop(_))) {
            self.dir.delete_volume(key, record.and_then(|r| r.enforcement.as_ref()))?;
        }
        if !matches!(layout, Some(Layout::Dir)) {
            self.loopback.delete_volume(key)?;
        }
        Ok(())
    }

    /// Removes what a receive from another node cut short (a crash) left of
    /// a volume no record names, in `backend` (both when unknown): its
    /// storage under its name or under the temporary one it is built under.
    pub fn remove_unrecorded_volume(&self, key: &Key, backend: Option<BackendKind>) -> Result<()> {
        if backend != Some(BackendKind::Loop) {
            self.dir.remove_unrecorded(key)?;
        }
        if backend != Some(BackendKind::Dir) {
            self.loopback.remove_unrecorded(key)?;
        }
        Ok(())
    }

    /// The bytes a volume takes on the root: an image's allocated blocks, a
    /// directory's as its quota counts them or (not enforced) as a walk of
    /// its tree finds them; `None` when its storage is missing.
    pub fn used_bytes(&self, key: &Key, layout: &Layout, quota: Option<&Enforcement>) -> Result<Option<u64>> {
        match layout {
            Layout::Loop(_) => Ok(Some(self.loopback.allocated_bytes(key))),
            Layout::Dir if !self.dir.volume_exists(key) => Ok(None),
            Layout::Dir => match self.dir.quota_usage(quota)? {
                Some(quota) => Ok(Some(quota.bytes)),
                None => Ok(Some(self.dir.usage(key)?.bytes)),
            },
        }
    }

    /// Puts back the allocation a thick volume lost (see
    /// [`LoopBackend::reallocate`]) when it `used` less than its `capacity`;
    /// returns the bytes allocated again, `None` when there was nothing to
    /// do (a thin or directory volume, or a whole thick one).
    pub fn keep_thick(&self, key: &Key, layout: &Layout, capacity: u64, used: u64) -> Result<Option<u64>> {
        match layout {
            Layout::Loop(LoopSpec { provisioning: Provisioning::Thick, .. }) if used < capacity => {
                self.loopback.reallocate(key).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// How a volume's capacity is enforced, in a word: an image's size bounds
    /// a loop volume; a directory has a quota or none.
    pub fn enforcement_name(layout: &Layout, enforcement: Option<&Enforcement>) -> &'static str {
        match (layout, enforcement) {
            (Layout::Loop(_), _) => "image",
            (Layout::Dir, Some(Enforcement::BtrfsQgroup(_))) => "btrfs_qgroup",
            (Layout::Dir, Some(Enforcement::Project(_))) => "project_quota",
            (Layout::Dir, Some(Enforcement::Unenforced(_)) | None) => "none",
        }
    }

    /// How many loop devices of this root's volumes run without direct I/O.
    pub fn loop_devices_without_direct_io(&self) -> Result<u64> {
        self.loopback.devices_without_direct_io()
    }

    /// Whether the volume's data is where it should be (and, for a staged
    /// `loop` volume, its device and direct I/O).
    pub fn condition(&self, key: &Key, record: &VolumeRecord) -> Condition {
        match record.layout {
            Layout::Loop(_) => self.loopback.condition(key, record.stage.is_some()),
            Layout::Dir => self.dir.condition(key),
        }
    }

    /// [`Backends::condition`] with what the volume uses, where that is
    /// cheap to know and not in its stats (ControllerGetVolume).
    pub fn condition_with_usage(&self, key: &Key, record: &VolumeRecord) -> Result<Condition> {
        let mut condition = self.condition(key, record);
        if !condition.abnormal && record.layout == Layout::Dir {
            condition.message = self.dir.usage_message(key, record.enforcement.as_ref(), record.capacity_bytes)?;
        }
        Ok(condition)
    }

    /// Grows a volume's storage to `capacity`.
    pub fn expand_volume(&self, key: &Key, record: &VolumeRecord, capacity: u64) -> Result<()> {
        match &record.layout {
            Layout::Loop(spec) => self.loopback.expand_volume(key, capacity, spec),
            Layout::Dir => self.dir.set_limit(key, record.enforcement.as_ref(), capacity),
        }
    }

    /// Whether growing a volume needs NodeExpandVolume too: a loop volume's
    /// filesystem grows on the node; a directory has nothing to grow.
    pub fn node_expansion_required(layout: &Layout) -> bool {
        matches!(layout, Layout::Loop(_))
    }

    /// Changes a `loop` volume's provisioning: to thick allocates the whole
    /// image now (staged or not; `free` is what the host still has), to thin
    /// changes nothing until the next growth. Returns the new layout and the
    /// bytes allocated. Refused for a directory volume (it has no mutable
    /// parameters, as [`parse_mutable_parameters`] already said).
    pub fn set_provisioning(
        &self,
        key: &Key,
        record: &VolumeRecord,
        provisioning: Provisioning,
        free: u64,
    ) -> Result<(Layout, u64)> {
        let Layout::Loop(spec) = &record.layout else {
            return Err(Error::InvalidArgument(format!("volume {} has no provisioning to change", record.id)));
        };
        let changed = LoopSpec { provisioning, ..spec.clone() };
        if provisioning == Provisioning::Thin {
            return Ok((Layout::Loop(changed), 0));
        }
        let before = self.loopback.allocated_bytes(key);
        let needed = record.capacity_bytes.saturating_sub(before);
        // The volume's thin promise already holds these bytes back from new
        // volumes, but the host may have filled up since.
        if needed > free {
            return Err(Error::ResourceExhausted(format!(
                "making volume {} thick needs {needed} more bytes but the node's root has {free} free; free space \
                 on the host",
                record.id
            )));
        }
        self.loopback.expand_volume(key, record.capacity_bytes, &changed)?;
        let allocated = self.loopback.allocated_bytes(key).saturating_sub(before);
        Ok((Layout::Loop(changed), allocated))
    }

    // ----- Snapshots -----

    /// Cuts a snapshot of a volume. With `freeze`, a staged `loop`
    /// filesystem is frozen around the copy so the snapshot is consistent;
    /// without, the caller holds the volume still (a group's cut).
    pub fn create_snapshot(&self, key: &Key, volume: &VolumeRecord, snapshot: &Key, freeze: bool) -> Result<()> {
        match volume.layout {
            Layout::Dir => self.dir.create_snapshot(key, snapshot),
            Layout::Loop(_) => {
                let mounted = filesystem_stage(volume).filter(|_| freeze).map(|s| s.path.as_path());
                self.loopback.create_snapshot(key, snapshot, mounted)
            }
        }
    }

    /// What a copy of the snapshot `key` to another node reads, and where:
    /// its image or its tree.
    pub fn snapshot_content(&self, key: &Key, backend: BackendKind) -> Result<(Carried, PathBuf)> {
        match backend {
            BackendKind::Loop => Ok((Carried::Image, self.loopback.snapshot_path(key))),
            BackendKind::Dir => Ok((Carried::Tree, self.dir.snapshot_path(key))),
        }
    }

    /// Makes the snapshot `key` of `backend` from what another node sends
    /// (the off-node copy of a snapshot): `receive` writes it into the new
    /// image file (which it creates) or the new, empty directory, and fails
    /// unless the whole content arrived and checked out. The snapshot gets
    /// its real name only after that.
    pub fn receive_snapshot(
        &self,
        key: &Key,
        backend: BackendKind,
        receive: &mut dyn FnMut(&Path) -> std::io::Result<()>,
    ) -> Result<()> {
        match backend {
            BackendKind::Dir => self.dir.receive_snapshot(key, receive),
            BackendKind::Loop => self.loopback.receive_snapshot(key, receive),
        }
    }

    /// Removes a snapshot's data, and what a crashed attempt to make it left
    /// under its temporary name; without a record both engines are cleared.
    pub fn delete_snapshot(&self, key: &Key, backend: Option<BackendKind>) -> Result<()> {
        if backend != Some(BackendKind::Loop) {
            self.dir.delete_snapshot(key)?;
        }
        if backend != Some(BackendKind::Dir) {
            self.loopback.delete_snapshot(key)?;
        }
        Ok(())
    }

    /// Whether a snapshot of the volume is cut at one instant even while it
    /// is written (a btrfs snapshot, a reflink) rather than copied.
    pub fn snapshots_atomically(&self, key: &Key, layout: &Layout) -> Result<bool> {
        match layout {
            Layout::Dir => Ok(self.dir.snapshots_atomically(key)),
            Layout::Loop(_) => self.loopback.reflinks(),
        }
    }

    /// Where the volume's filesystem can be frozen for a cut: the staging
    /// path of a `loop` volume staged as a filesystem.
    pub fn freezable(record: &VolumeRecord) -> Option<&Path> {
        filesystem_stage(record).map(|s| s.path.as_path())
    }

    // ----- Node -----

    /// Where an inline volume is staged: a loop volume's filesystem is
    /// mounted under `root`; a directory volume is staged on its own data
    /// directory, which needs no mount.
    pub fn inline_staging(&self, key: &Key, layout: &Layout, root: &Path) -> PathBuf {
        match layout {
            Layout::Dir => self.dir.volume_path(key),
            // The directory keeps the name it had when inline volumes were
            // called ephemeral here: a staged one from then is found again.
            Layout::Loop(_) => root.join("ephemeral").join(key.to_string()),
        }
    }

    /// Removes the staging directory [`Backends::inline_staging`] made for
    /// an unstaged inline volume (a directory volume's is its data, which
    /// goes with the volume).
    pub fn remove_inline_staging(&self, key: &Key, layout: &Layout, root: &Path) -> Result<()> {
        match layout {
            Layout::Dir => Ok(()),
            Layout::Loop(_) => {
                let staging = self.inline_staging(key, layout, root);
                match fs::remove_dir(&staging) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(Error::io(format!("removing {}", staging.display()), e))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Stages a volume at `path`; `formats` says how far formatting its
    /// image got and records progress.
    pub fn stage(
        &self,
        key: &Key,
        layout: &Layout,
        path: &Path,
        capability: &Capability,
        formats: &FormatLog<'_>,
    ) -> Result<()> {
        match layout {
            Layout::Dir => self.dir.stage(key, path),
            Layout::Loop(spec) => self.loopback.stage(key, spec, path, capability, formats),
        }
    }

    /// Unstages a volume from `path`. Without a record only a mount that
    /// shows the volume is undone; with one, `ours` says the record stages
    /// it there, so whatever is mounted there is the volume's.
    pub fn unstage(&self, key: &Key, layout: Option<&Layout>, path: &Path, ours: bool) -> Result<()> {
        match layout {
            Some(Layout::Loop(_)) => self.loopback.unstage(key, path),
            Some(Layout::Dir) | None => self.unmount(path, key, layout, ours).map(drop),
        }
    }

    /// What a publication binds onto its target: the staging path of a
    /// filesystem, or the device node of a block volume.
    pub fn publish_source(
        &self,
        key: &Key,
        layout: &Layout,
        staging: &Path,
        block: bool,
        read_only: bool,
    ) -> Result<PathBuf> {
        match layout {
            Layout::Dir => Ok(staging.to_owned()),
            Layout::Loop(_) => self.loopback.publish_source(key, staging, block, read_only),
        }
    }

    /// Releases what read-only block publications of the volume held, once
    /// none is left.
    pub fn release_read_only(&self, key: &Key, layout: &Layout) -> Result<()> {
        match layout {
            Layout::Dir => Ok(()),
            Layout::Loop(_) => self.loopback.release_read_only(key),
        }
    }

    /// Whether a mount shows this volume; without a layout (no record),
    /// whether it shows it in either engine's way.
    pub fn shows_volume(&self, entry: &MountEntry, key: &Key, layout: Option<&Layout>) -> bool {
        match layout {
            Some(Layout::Dir) => self.dir.shows_volume(entry, key),
            Some(Layout::Loop(_)) => self.loopback.shows_volume(entry, key),
            None => self.dir.shows_volume(entry, key) || self.loopback.shows_volume(entry, key),
        }
    }

    /// Unmounts `path` if `ours` (the record says the volume is mounted
    /// there) or the mount table shows the volume there; never a stranger's
    /// mount. Stacked mounts of the volume (a retry after a crash) all go.
    /// Returns whether it unmounted anything.
    pub fn unmount(&self, path: &Path, key: &Key, layout: Option<&Layout>, ours: bool) -> Result<bool> {
        // The bound keeps a confused table from looping.
        for round in 0..8 {
            if !self.unmountable(path, key, layout, ours)? {
                return Ok(round > 0);
            }
            self.kernel.unmount(path).context(|| format!("unmounting {}", path.display()))?;
        }
        Err(Error::FailedPrecondition(format!(
            "{} still has mounts after 8 unmounts; inspect it with findmnt",
            path.display()
        )))
    }

    /// Whether [`Backends::unmount`] unmounts what is on `path` now: when
    /// `ours`, anything mounted there (found without reading the mount
    /// table); otherwise only a mount that shows the volume.
    fn unmountable(&self, path: &Path, key: &Key, layout: Option<&Layout>, ours: bool) -> Result<bool> {
        if ours {
            return self.kernel.is_mount_point(path).context(|| format!("looking for a mount on {}", path.display()));
        }
        Ok(self.mount_at(path)?.is_some_and(|e| self.shows_volume(&e, key, layout)))
    }

    /// Whether a recorded stage still exists in the kernel: the staging
    /// mount shows the volume, or (loop) a device is attached to its image.
    pub fn stage_is_live(&self, key: &Key, layout: &Layout, stage: &Stage) -> Result<bool> {
        if matches!(layout, Layout::Loop(_)) && self.loopback.is_attached(key)? {
            return Ok(true);
        }
        Ok(self.mount_at(&stage.path)?.is_some_and(|e| self.shows_volume(&e, key, Some(layout))))
    }

    /// The topmost mount on `path`, if any.
    fn mount_at(&self, path: &Path) -> Result<Option<MountEntry>> {
        self.kernel.mount_at(path).context(|| format!("looking for a mount on {}", path.display()))
    }

    /// Usage of a volume staged at `stage`.
    pub fn stats(&self, key: &Key, record: &VolumeRecord, stage: &Stage) -> Result<VolumeStats> {
        match record.layout {
            Layout::Loop(_) => self.loopback.stats(key, &stage.path, stage.capability.block),
            Layout::Dir => self.dir.stats(key, record.enforcement.as_ref(), record.capacity_bytes),
        }
    }

    /// Node half of an expansion: grows a staged `loop` filesystem to its
    /// grown device; a directory has nothing to grow.
    pub fn node_expand(&self, key: &Key, layout: &Layout, stage: &Stage) -> Result<()> {
        match layout {
            Layout::Dir => Ok(()),
            Layout::Loop(spec) => self.loopback.node_expand(key, spec, &stage.path, &stage.capability),
        }
    }
}

/// The volume's stage when it is staged as a filesystem on a `loop` device.
fn filesystem_stage(record: &VolumeRecord) -> Option<&Stage> {
    match (&record.layout, &record.stage) {
        (Layout::Loop(_), Some(stage)) if !stage.capability.block => Some(stage),
        _ => None,
    }
}
