//! The `loop` backend: each volume is an image file on a loop device,
//! formatted ext4 or xfs, or handed out as a raw block device.
//!
//! Layout under the root: `volumes/<key>.img` is a volume's image and
//! `snapshots/<key>.img` a snapshot's. A thick image is fully allocated with
//! fallocate (and formatted without discard, so it stays thick); a thin one
//! is sparse. Attachments are found again by the image's inode, so staging is
//! idempotent across driver restarts, and direct I/O is read back from sysfs
//! rather than assumed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Condition, Fill, VolumeStats, in_the_making};
use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::ids::Key;
use crate::kernel::blockfs::{self, Content, FsType};
use crate::kernel::copy::{self, copy_file};
use crate::kernel::loopdev::{AttachOptions, LoopDevice};
use crate::kernel::mount::MountFlags;
use crate::kernel::mountinfo::MountEntry;
use crate::kernel::nofollow::{self, Want};
use crate::kernel::usage::fs_usage;
use crate::kernel::{Frozen, Kernel};
use crate::records::{Capability, Formatting, LoopSpec, Provisioning};

/// Image-file volumes and their snapshots under one root.
#[derive(Debug)]
pub struct LoopBackend {
    volumes: PathBuf,
    snapshots: PathBuf,
    kernel: Arc<dyn Kernel>,
}

impl LoopBackend {
    /// Uses `volumes/` and `snapshots/` under `root` (created by the driver).
    pub fn new(root: &Path, kernel: Arc<dyn Kernel>) -> LoopBackend {
        LoopBackend { volumes: root.join("volumes"), snapshots: root.join("snapshots"), kernel }
    }

    /// The volume's image file.
    pub fn image_path(&self, key: &Key) -> PathBuf {
        self.volumes.join(format!("{key}.img"))
    }

    /// The file that says an offline resize of the volume's filesystem is
    /// under way; present only while one is unfinished.
    fn resize_intent_path(&self, key: &Key) -> PathBuf {
        self.volumes.join(format!("{key}.resizing"))
    }

    /// The snapshot's image file.
    pub fn snapshot_path(&self, key: &Key) -> PathBuf {
        self.snapshots.join(format!("{key}.img"))
    }

    /// Makes the image as `fill` says (blank, a copy of an image, whose
    /// filesystem is frozen around the copy where it is mounted, so the
    /// clone is consistent, or one received from another node), grown to
    /// `capacity`. Nothing is left behind when the filesystem is full.
    pub fn create_volume(&self, key: &Key, capacity: u64, spec: &LoopSpec, fill: Fill<'_>) -> Result<()> {
        let path = self.image_path(key);
        let _frozen = match &fill {
            Fill::Copy(source) if let Some(mounted) = &source.mounted => {
                Some(Frozen::new(&*self.kernel, mounted).context(|| format!("freezing {}", mounted.display()))?)
            }
            _ => None,
        };
        let blank = matches!(fill, Fill::Empty);
        crate::failpoint!("loop.create.building");
        build_file(&path, |tmp| {
            match fill {
                Fill::Copy(source) => {
                    copy_file(&source.path, tmp)?;
                }
                Fill::Receive(receive) => receive(tmp)?,
                Fill::Empty => drop(File::create(tmp)?),
            }
            let file = OpenOptions::new().write(true).open(tmp)?;
            resize(&file, capacity, spec.provisioning)?;
            file.sync_all()
        })?;
        // A copy is formatted already; an empty image will be formatted on a
        // device whose sectors may be larger than the options' block size.
        let fits = if blank { self.check_block_size(&path, spec) } else { Ok(()) };
        if fits.is_err() {
            remove_file(&path)?;
        }
        fits
    }

    /// Refuses mkfsOptions whose filesystem block is smaller than the sectors
    /// of the loop device the image will get: mkfs cannot make it there.
    fn check_block_size(&self, image: &Path, spec: &LoopSpec) -> Result<()> {
        let Some(block) = crate::backend::filesystem_of(spec)?.1.block_size() else { return Ok(()) };
        let sector = self
            .kernel
            .sector_size_for(image)
            .context(|| format!("reading the sector size for {}", image.display()))?;
        if block.bytes() < u64::from(sector) {
            return Err(Error::InvalidArgument(format!(
                "mkfsOptions ask for {}-byte filesystem blocks, but loop devices on this node's root have {sector}-byte \
                 sectors; ask for at least {sector} or leave the block size out",
                block.bytes()
            )));
        }
        Ok(())
    }

    /// Grows the image to `capacity` and tells attached devices about it; a
    /// thick `spec` allocates every byte, which also makes a thin image thick
    /// at its own size. Safe under a live loop device: fallocate only fills
    /// holes, with the zeroes the device already reads there.
    pub fn expand_volume(&self, key: &Key, capacity: u64, spec: &LoopSpec) -> Result<()> {
        let path = self.image_path(key);
        let file = OpenOptions::new().write(true).open(&path).context(|| format!("opening {}", path.display()))?;
        resize(&file, capacity, spec.provisioning)
            .context(|| format!("growing {} to {capacity} bytes", path.display()))?;
        file.sync_all().context(|| format!("syncing {}", path.display()))?;
        for device in self.devices(key)? {
            self.kernel
                .refresh_capacity(&device.device)
                .context(|| format!("refreshing the capacity of {}", device.device.display()))?;
        }
        Ok(())
    }

    /// Allocates every hole of the image again, without changing its length
    /// or content (fallocate fills holes with blocks that read as zeroes, as
    /// the holes did), and returns the bytes that were missing. A thick
    /// image gets holes when something below the filesystem punches them:
    /// ext4's lazy inode table initialisation zeroes through the loop device,
    /// which turns that into punched holes, after a thin volume became thick.
    /// A volume deleted meanwhile is fine (0).
    pub fn reallocate(&self, key: &Key) -> Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.image_path(key);
        let before = blockfs::allocated_bytes(&path).unwrap_or(0);
        let file = match OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            other => other.context(|| format!("opening {}", path.display()))?,
        };
        let len = file.metadata().context(|| format!("reading the size of {}", path.display()))?.len();
        blockfs::allocate(&file, len).context(|| format!("allocating {}", path.display()))?;
        file.sync_all().context(|| format!("syncing {}", path.display()))?;
        Ok(len.saturating_sub(before))
    }

    /// Removes the image (and any attachment left by a crash).
    pub fn delete_volume(&self, key: &Key) -> Result<()> {
        for device in self.devices(key)? {
            self.kernel.detach(&device.device).context(|| format!("detaching {}", device.device.display()))?;
        }
        remove_file(&self.resize_intent_path(key))?;
        remove_file(&self.image_path(key))
    }

    /// Removes what a receive cut short left of a volume no record names:
    /// its image, whole or still under its temporary name.
    pub fn remove_unrecorded(&self, key: &Key) -> Result<()> {
        remove_unfinished(&self.image_path(key))?;
        self.delete_volume(key)
    }

    /// Copies the image into a snapshot; a filesystem mounted at `mounted`
    /// is frozen around the copy, so the snapshot is consistent.
    pub fn create_snapshot(&self, volume: &Key, snapshot: &Key, mounted: Option<&Path>) -> Result<()> {
        let source = self.image_path(volume);
        let _frozen = match mounted {
            Some(path) => Some(Frozen::new(&*self.kernel, path).context(|| format!("freezing {}", path.display()))?),
            None => None,
        };
        crate::failpoint!("snapshot.frozen");
        build_file(&self.snapshot_path(snapshot), |tmp| {
            copy_file(&source, tmp)?;
            File::open(tmp)?.sync_all()
        })
    }

    /// Whether snapshots are reflinks of the image (point in time even while
    /// it is written) rather than byte copies: probed on the root, whose
    /// filesystem decides.
    pub fn reflinks(&self) -> Result<bool> {
        copy::reflinks_in(&self.snapshots).context(|| format!("probing reflinks in {}", self.snapshots.display()))
    }

    /// Makes the snapshot's image from what another node sends, built under
    /// a temporary name and renamed in once it checked out.
    pub fn receive_snapshot(&self, key: &Key, receive: &mut dyn FnMut(&Path) -> io::Result<()>) -> Result<()> {
        build_file(&self.snapshot_path(key), |tmp| {
            receive(tmp)?;
            File::open(tmp)?.sync_all()
        })
    }

    /// Removes a snapshot's image, and what a crash left of it half made
    /// (an export's cut is never made again under its name to replace it).
    pub fn delete_snapshot(&self, key: &Key) -> Result<()> {
        let path = self.snapshot_path(key);
        remove_unfinished(&path)?;
        remove_file(&path)
    }

    /// Bytes the image takes on the host filesystem (0 when it is missing).
    pub fn allocated_bytes(&self, key: &Key) -> u64 {
        blockfs::allocated_bytes(&self.image_path(key)).unwrap_or(0)
    }

    /// Whether the image exists as a regular file (not a planted link).
    pub fn volume_exists(&self, key: &Key) -> bool {
        fs::symlink_metadata(self.image_path(key)).is_ok_and(|m| m.is_file())
    }

    /// Attaches the image (reusing an existing attachment) and, for a
    /// filesystem volume, formats it if it is empty, mounts it at `path`,
    /// grows the filesystem to the image's size. A failure after a fresh
    /// attach detaches again, so a failed stage leaves nothing behind.
    ///
    /// `formats` says how far formatting got and records progress.
    pub fn stage(
        &self,
        key: &Key,
        spec: &LoopSpec,
        path: &Path,
        capability: &Capability,
        formats: &FormatLog<'_>,
    ) -> Result<()> {
        if !self.volume_exists(key) {
            return Err(Error::FailedPrecondition(self.missing(key)));
        }
        // A bad staging path is refused before the image is attached or
        // formatted, not after.
        if !capability.block {
            nofollow::open_or_create(path, Want::Dir).map_err(|e| Error::at_caller_path("staging path", e))?;
        }
        let read_only = capability.access_mode.read_only();
        let existing = self.devices(key)?.into_iter().find(|d| d.read_only == read_only);
        let fresh = existing.is_none();
        let device = match existing {
            Some(device) => device,
            None => self.attach(key, read_only)?,
        };
        crate::failpoint!("loop.stage.attached");
        let staged = if capability.block {
            Ok(())
        } else {
            self.mount_filesystem(key, spec, &device, path, capability, formats)
        };
        if staged.is_err() && fresh {
            let _ = self.kernel.detach(&device.device);
        }
        staged
    }

    fn mount_filesystem(
        &self,
        key: &Key,
        spec: &LoopSpec,
        device: &LoopDevice,
        path: &Path,
        capability: &Capability,
        formats: &FormatLog<'_>,
    ) -> Result<()> {
        let fs = filesystem(spec, capability)?;
        if self.mounted_from(path, std::slice::from_ref(device))? {
            return Ok(());
        }
        let content = self.kernel.probe(&device.device).context(|| format!("probing {}", device.device.display()))?;
        match content {
            Content::Empty => format(&*self.kernel, device, fs, spec, formats)?,
            // Whatever an interrupted mkfs left (a torn superblock, a
            // filesystem e2fsck calls inconsistent) is Loam's own and was
            // never mounted: formatting it again loses nothing.
            _ if formats.state == Some(Formatting::Started) => {
                tracing::warn!(volume = %key, "formatting the image again: an earlier mkfs of it did not finish");
                format(&*self.kernel, device, fs, spec, formats)?;
            }
            Content::Filesystem(found) if same_family(&found, fs) => {}
            Content::Filesystem(found) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {key} holds a {found} filesystem, not {}; stage it with fsType {found}",
                    fs.name()
                )));
            }
            Content::Unknown => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {key} holds data that is not a filesystem Loam knows; refusing to format it (inspect {})",
                    self.image_path(key).display()
                )));
            }
        }
        let mut flags = MountFlags::parse(&capability.mount_flags).map_err(Error::InvalidArgument)?;
        flags.read_only |= capability.access_mode.read_only();
        // An image grown while unstaged gets its filesystem grown now: ext4
        // before mounting (offline needs no CAP_SYS_RESOURCE), xfs after
        // (xfs grows only mounted). A resize a crash cut short is repaired
        // and done again.
        if fs == FsType::Ext4 && !flags.read_only {
            self.kernel
                .grow_ext4_offline(&device.device, &self.resize_intent_path(key))
                .context(|| format!("growing the filesystem on {}", device.device.display()))?;
        }
        // Mounted through a handle opened without following symlinks, so a
        // staging path that is (or leads through) a symlink is refused
        // instead of mounting the volume wherever the link points.
        let staging =
            nofollow::open_or_create(path, Want::Dir).map_err(|e| Error::at_caller_path("staging path", e))?;
        crate::failpoint!("loop.stage.mounting");
        self.kernel
            .mount_filesystem(&device.device, &staging.proc_path(), fs, flags)
            .context(|| format!("mounting {} on {}", device.device.display(), path.display()))?;
        if fs == FsType::Xfs
            && !flags.read_only
            && let Err(e) = self.kernel.grow(fs, &device.device, path)
        {
            let _ = self.kernel.unmount(path);
            return Err(Error::io(format!("growing the filesystem on {}", device.device.display()), e));
        }
        Ok(())
    }

    /// Thaws the filesystem staged at `path` if it is this volume's and
    /// frozen (a driver killed during a snapshot leaves it so, and every
    /// write of its pods hangs). Returns whether it was frozen.
    pub fn thaw_stage(&self, key: &Key, path: &Path) -> Result<bool> {
        let devices = self.devices(key)?;
        if !self.mounted_from(path, &devices)? {
            return Ok(false);
        }
        self.kernel.thaw(path).context(|| format!("thawing {}", path.display()))
    }

    /// Unmounts the staging path (if it shows this volume) and detaches
    /// every device of the image.
    pub fn unstage(&self, key: &Key, path: &Path) -> Result<()> {
        let devices = self.devices(key)?;
        for _ in 0..8 {
            if !self.mounted_from(path, &devices)? {
                break;
            }
            self.kernel.unmount(path).context(|| format!("unmounting {}", path.display()))?;
        }
        for device in devices {
            self.kernel.detach(&device.device).context(|| format!("detaching {}", device.device.display()))?;
        }
        Ok(())
    }

    /// What a publication binds onto its target: the staging mount for a
    /// filesystem; for a block volume the device node, a separate read-only
    /// loop device when the publication is read-only (a read-only bind of a
    /// device node does not stop writes to the device).
    pub fn publish_source(&self, key: &Key, staging: &Path, block: bool, read_only: bool) -> Result<PathBuf> {
        if !block {
            return Ok(staging.to_owned());
        }
        match self.devices(key)?.into_iter().find(|d| d.read_only == read_only) {
            Some(device) => Ok(device.device),
            None => Ok(self.attach(key, read_only)?.device),
        }
    }

    /// Detaches the read-only device of block publications once none is left.
    pub fn release_read_only(&self, key: &Key) -> Result<()> {
        for device in self.devices(key)?.into_iter().filter(|d| d.read_only) {
            self.kernel.detach(&device.device).context(|| format!("detaching {}", device.device.display()))?;
        }
        Ok(())
    }

    /// Usage of a staged volume: the filesystem's for a mount volume, the
    /// device size for a block volume.
    pub fn stats(&self, key: &Key, staging: &Path, block: bool) -> Result<VolumeStats> {
        if block {
            let size = fs::metadata(self.image_path(key)).context(|| format!("reading size of volume {key}"))?.len();
            return Ok(VolumeStats { total_bytes: size, available_bytes: size, ..Default::default() });
        }
        let fs = fs_usage(staging).context(|| format!("reading usage of {}", staging.display()))?;
        Ok(VolumeStats {
            total_bytes: fs.total_bytes,
            used_bytes: fs.total_bytes.saturating_sub(fs.available_bytes),
            available_bytes: fs.available_bytes,
            used_inodes: fs.total_inodes.saturating_sub(fs.free_inodes),
            available_inodes: fs.free_inodes,
        })
    }

    /// Grows the mounted filesystem to fill its grown device.
    pub fn node_expand(&self, key: &Key, spec: &LoopSpec, staging: &Path, capability: &Capability) -> Result<()> {
        if capability.block {
            return Ok(());
        }
        let fs = filesystem(spec, capability)?;
        let device = self
            .devices(key)?
            .into_iter()
            .find(|d| !d.read_only)
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {key} has no loop device; stage it again")))?;
        if fs == FsType::Ext4 && !ext4_smaller_than_device(&*self.kernel, &device.device)? {
            // Already grown (offline, at the stage that followed an earlier refusal).
            return Ok(());
        }
        // Refused before trying, with the way out: the CO must not retry
        // (FAILED_PRECONDITION), and the next stage grows the filesystem offline.
        if !self.kernel.can_grow_online(fs).context(|| "reading this process's capabilities".to_owned())? {
            return Err(Error::FailedPrecondition(format!(
                "volume {key}: growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which the node plugin \
                 lacks; the device has grown and the filesystem will be grown when the volume is next staged \
                 (restart the pods using it), or give the node plugin CAP_SYS_RESOURCE"
            )));
        }
        self.kernel
            .grow(fs, &device.device, staging)
            .context(|| format!("growing the filesystem on {}", device.device.display()))
    }

    /// Health: the image exists; a staged volume has its device, with direct
    /// I/O on (or the message says why throughput may suffer).
    pub fn condition(&self, key: &Key, staged: bool) -> Condition {
        if !self.volume_exists(key) {
            return Condition { abnormal: true, message: self.missing(key) };
        }
        if !staged {
            return Condition { abnormal: false, message: "volume is healthy".into() };
        }
        match self.devices(key) {
            Ok(devices) if devices.is_empty() => Condition {
                abnormal: true,
                message: format!("volume {key} is staged but its loop device is gone; unstage and stage it again"),
            },
            Ok(devices) => match devices.iter().find(|d| !d.direct_io) {
                Some(d) => Condition {
                    abnormal: false,
                    message: format!(
                        "volume is healthy, but direct I/O is off on {} (block size {}): I/O goes through the host page cache twice",
                        d.device.display(),
                        d.block_size
                    ),
                },
                None => Condition { abnormal: false, message: "volume is healthy (direct I/O on)".into() },
            },
            Err(e) => Condition { abnormal: true, message: format!("cannot inspect loop devices: {e}") },
        }
    }

    /// Detaches devices backing images of volumes that are not staged: what
    /// a crash between attach and record can leave. A device that is
    /// mounted (a crash between mount and record) is kept, since the
    /// retried NodeStage adopts it. Returns what became of each device.
    pub fn detach_orphans(&self, staged: impl Fn(&Key) -> bool) -> Result<Vec<(LoopDevice, Orphan)>> {
        let mounts = self.mount_table()?;
        let mut orphans = Vec::new();
        for device in self.kernel.loop_devices().context(|| "listing loop devices".into())? {
            let Some(key) = self.key_of_image(&device.backing_file) else { continue };
            if staged(&key) {
                continue;
            }
            let fate = if mounts.iter().any(|m| Path::new(&m.source) == device.device) {
                Orphan::KeptMounted
            } else {
                match self.kernel.detach(&device.device) {
                    Ok(()) => Orphan::Detached,
                    Err(e) => Orphan::Failed(Error::io(format!("detaching {}", device.device.display()), e)),
                }
            };
            orphans.push((device, fate));
        }
        Ok(orphans)
    }

    /// How many loop devices backing this root's volume images run without
    /// direct I/O.
    pub fn devices_without_direct_io(&self) -> Result<u64> {
        let devices = self.kernel.loop_devices().context(|| "listing loop devices".into())?;
        Ok(devices.iter().filter(|d| !d.direct_io && self.key_of_image(&d.backing_file).is_some()).count() as u64)
    }

    /// Whether any loop device is attached to the volume's image.
    pub fn is_attached(&self, key: &Key) -> Result<bool> {
        Ok(!self.devices(key)?.is_empty())
    }

    /// Whether a mount shows this volume: a filesystem mounted from one of
    /// its devices, or a bind of one of its device nodes.
    pub fn shows_volume(&self, entry: &MountEntry, key: &Key) -> bool {
        self.devices(key).is_ok_and(|devices| {
            devices
                .iter()
                .any(|d| Path::new(&entry.source) == d.device || entry.root.file_name() == d.device.file_name())
        })
    }

    fn key_of_image(&self, backing: &Path) -> Option<Key> {
        if backing.parent()? != self.volumes {
            return None;
        }
        Key::parse(backing.file_name()?.to_str()?.strip_suffix(".img")?)
    }

    fn devices(&self, key: &Key) -> Result<Vec<LoopDevice>> {
        let image = self.image_path(key);
        match self.kernel.find_loop_devices(&image) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            other => other.context(|| format!("finding loop devices of {}", image.display())),
        }
    }

    fn attach(&self, key: &Key, read_only: bool) -> Result<LoopDevice> {
        let image = self.image_path(key);
        let device = self
            .kernel
            .attach(&image, AttachOptions { read_only, direct_io: true })
            .context(|| format!("attaching {} to a loop device", image.display()))?;
        if !device.direct_io {
            tracing::warn!(
                device = %device.device.display(),
                block_size = device.block_size,
                "direct I/O could not be enabled; the volume works but I/O is cached twice"
            );
        }
        Ok(device)
    }

    fn mount_table(&self) -> Result<Vec<MountEntry>> {
        self.kernel.mounts().context(|| "reading the mount table".into())
    }

    /// Whether the topmost mount on `path` is a filesystem of one of
    /// `devices`; reads the mount table only when something is mounted there.
    fn mounted_from(&self, path: &Path, devices: &[LoopDevice]) -> Result<bool> {
        let mounted = self.kernel.mount_at(path).context(|| format!("looking for a mount on {}", path.display()))?;
        Ok(mounted.is_some_and(|entry| devices.iter().any(|d| Path::new(&entry.source) == d.device)))
    }

    fn missing(&self, key: &Key) -> String {
        format!("image {} is missing; restore it from a backup or delete the volume", self.image_path(key).display())
    }
}

/// How far formatting a volume's image got, as its record says, and how to
/// record progress durably in that record.
pub struct FormatLog<'a> {
    /// The recorded state (`None`: never formatted, or a record from before
    /// formatting was recorded).
    pub state: Option<Formatting>,
    /// Durably records a new state.
    pub record: &'a dyn Fn(Formatting) -> Result<()>,
}

/// Formats the device from scratch, recording that it started before and
/// that it finished after.
fn format(
    kernel: &dyn Kernel,
    device: &LoopDevice,
    fs: FsType,
    spec: &LoopSpec,
    formats: &FormatLog<'_>,
) -> Result<()> {
    let options = crate::backend::filesystem_of(spec)?.1;
    // A volume made for raw block access may be smaller than any filesystem
    // (BLOCK_MIN_BYTES): say so instead of letting mkfs fail on it.
    let size = kernel.device_size(&device.device).context(|| format!("sizing {}", device.device.display()))?;
    if size < options.min_bytes() {
        return Err(Error::FailedPrecondition(format!(
            "the volume is {size} bytes, under the {} bytes a {} filesystem needs (it was made for raw block \
             access); expand it first or use it as a block device",
            options.min_bytes(),
            fs.name()
        )));
    }
    (formats.record)(Formatting::Started)?;
    crate::failpoint!("loop.mkfs.started");
    kernel
        .mkfs(&device.device, fs, spec.provisioning == Provisioning::Thick, &options)
        .context(|| format!("formatting {} as {}", device.device.display(), fs.name()))?;
    crate::failpoint!("loop.mkfs.done");
    (formats.record)(Formatting::Done)
}

/// What start-up did with a loop device of a volume that is not staged.
#[derive(Debug)]
pub enum Orphan {
    /// Detached: it was attached but unused.
    Detached,
    /// Kept: it is mounted, so a stage was under way; its retry adopts it.
    KeptMounted,
    /// It could not be detached.
    Failed(Error),
}

/// Whether the ext4 filesystem on `device` is smaller than the device (false
/// when the device holds no ext4 superblock).
fn ext4_smaller_than_device(kernel: &dyn Kernel, device: &Path) -> Result<bool> {
    let fs_size = kernel.ext_size(device).context(|| format!("reading {}", device.display()))?;
    let device_size = kernel.device_size(device).context(|| format!("sizing {}", device.display()))?;
    Ok(fs_size.is_some_and(|size| size < device_size))
}

/// The filesystem a stage uses: the StorageClass's, unless the capability
/// names a different one, which cannot be honoured for an existing image.
fn filesystem(spec: &LoopSpec, capability: &Capability) -> Result<FsType> {
    let fs = spec.fs;
    match capability.fs_type.as_str() {
        "" => Ok(fs),
        asked if asked == fs.name() => Ok(fs),
        asked => Err(Error::InvalidArgument(format!(
            "the volume was created with fsType {}, but the capability asks for {asked}",
            fs.name()
        ))),
    }
}

/// ext4 can mount ext2/ext3 filesystems; anything else must match exactly.
fn same_family(found: &str, fs: FsType) -> bool {
    match fs {
        FsType::Ext4 => matches!(found, "ext4" | "ext3" | "ext2"),
        FsType::Xfs => found == "xfs",
    }
}

/// Sets the file's length to `capacity`, allocating the new space when thick.
fn resize(file: &File, capacity: u64, provisioning: Provisioning) -> io::Result<()> {
    let len = file.metadata()?.len();
    if capacity < len {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "loop images never shrink"));
    }
    match provisioning {
        Provisioning::Thick => blockfs::allocate(file, capacity),
        Provisioning::Thin => file.set_len(capacity),
    }
}

/// Builds `path` through `build` on a temporary sibling, then renames it in;
/// on failure the temporary file is removed, so nothing is left behind.
fn build_file(path: &Path, build: impl FnOnce(&Path) -> io::Result<()>) -> Result<()> {
    remove_unfinished(path)?;
    let tmp = in_the_making(path);
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("building {}", path.display()), e));
    }
    fs::rename(&tmp, path).context(|| format!("renaming into {}", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    durable::sync_dir(parent).context(|| format!("syncing {}", parent.display()))
}

/// Removes what a crashed attempt left of `path` half built: never
/// acknowledged, so the removal need not be durable.
fn remove_unfinished(path: &Path) -> Result<()> {
    let tmp = in_the_making(path);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(format!("removing {}", tmp.display()), e)),
        _ => Ok(()),
    }
}

/// Removes a file durably; a missing file is already removed.
fn remove_file(path: &Path) -> Result<()> {
    durable::remove(path).context(|| format!("removing {}", path.display()))
}

#[cfg(test)]
mod tests;
