//! The recording fake side of the [`Kernel`] seam, for tests: an in-memory
//! mount table, loop devices attached to real image files, filesystems
//! recorded in the images themselves, freezes and quotas in memory. It keeps
//! the promises [`Kernel`] documents and refuses what the kernel refuses
//! where the backends depend on it (detaching a mounted device is
//! `ResourceBusy`, a bind onto a missing target `NotFound`, a symlinked path
//! `InvalidInput`), so the backends' logic runs without root.
//!
//! A filesystem lives where a real one does, in the image: `mkfs` writes a
//! small header ([`FakeKernel::write_filesystem`]) at the start of the image
//! file, so copies, clones and snapshots of an image carry it, a blank image
//! probes `Empty`, and any other bytes probe `Unknown`.
//!
//! Every call that changes something is logged ([`FakeKernel::calls`]);
//! [`FakeKernel::fail_next`] makes the next call of one operation fail.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::blockfs::{Content, FsType};
use super::copy::copy_tree;
use super::loopdev::{AttachOptions, LoopDevice};
use super::mkfs_options::MkfsOptions;
use super::mount::{Kind, MountFlags, check_kinds, kind_of_file_type};
use super::mountinfo::MountEntry;
use super::mountpoint;
use super::nofollow;
use super::quota::{Enforcer, ProjectIds, ProjectQuota};
use super::seam::Kernel;

/// What starts a fake filesystem's header in an image.
const MAGIC: &[u8] = b"LOAM-FAKE-FS\n";
/// How much of an image `probe` looks at, as the real probe does.
const PROBE_LEN: u64 = 1 << 20;
/// Where fake device nodes live (nothing is created there).
const DEVICE_PREFIX: &str = "/dev/loop-fake-";
/// The id btrfs gives the first subvolume a user creates.
const FIRST_SUBVOLUME_ID: u64 = 256;
/// Quota limits are kept in 512-byte units.
const BASIC_BLOCK: u64 = 512;

/// One operation of the seam, to inject a failure into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`Kernel::bind`].
    Bind,
    /// [`Kernel::unmount`].
    Unmount,
    /// [`Kernel::mounts`].
    Mounts,
    /// [`Kernel::is_mount_point`] and [`Kernel::mount_at`].
    MountAt,
    /// [`Kernel::mount_filesystem`].
    MountFilesystem,
    /// [`Kernel::attach`].
    Attach,
    /// [`Kernel::loop_devices`].
    LoopDevices,
    /// [`Kernel::find_loop_devices`].
    FindLoopDevices,
    /// [`Kernel::detach`].
    Detach,
    /// [`Kernel::refresh_capacity`].
    RefreshCapacity,
    /// [`Kernel::device_size`].
    DeviceSize,
    /// [`Kernel::sector_size_for`].
    SectorSize,
    /// [`Kernel::probe`].
    Probe,
    /// [`Kernel::mkfs`].
    Mkfs,
    /// [`Kernel::grow`].
    Grow,
    /// [`Kernel::grow_ext4_offline`].
    GrowExt4Offline,
    /// [`Kernel::ext_size`].
    ExtSize,
    /// [`Kernel::can_grow_online`].
    CanGrowOnline,
    /// [`Kernel::freeze`].
    Freeze,
    /// [`Kernel::thaw`].
    Thaw,
    /// [`Kernel::quota_enforcer`].
    QuotaEnforcer,
    /// [`Kernel::create_subvolume`].
    CreateSubvolume,
    /// [`Kernel::snapshot_subvolume`].
    SnapshotSubvolume,
    /// [`Kernel::delete_subvolume`].
    DeleteSubvolume,
    /// [`Kernel::subvolume_id`].
    SubvolumeId,
    /// [`Kernel::set_qgroup_limit`].
    SetQgroupLimit,
    /// [`Kernel::qgroup_usage`].
    QgroupUsage,
    /// [`Kernel::assign_project`].
    AssignProject,
    /// [`Kernel::tagged_project`].
    TaggedProject,
    /// [`Kernel::set_project_limit`].
    SetProjectLimit,
    /// [`Kernel::project_quota`].
    ProjectQuota,
}

/// How the fake's root filesystem enforces capacities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeQuota {
    /// btrfs with qgroups: subvolumes and qgroup limits.
    Btrfs,
    /// XFS/ext4 with project quotas.
    Project,
    /// No quotas, for this reason.
    None(String),
    /// Whatever the host's filesystem under the root can enforce, found
    /// read-only (btrfs quotas are never turned on); the limits themselves
    /// are still kept in memory. For driver tests that show the operator
    /// the host's reasons.
    Host,
}

/// A fake kernel; see the module documentation.
#[derive(Debug)]
pub struct FakeKernel {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    calls: Vec<String>,
    failures: Vec<(Op, io::ErrorKind)>,
    /// Mounts in the order made, so the last one at a path is the topmost.
    mounts: Vec<FakeMount>,
    /// How many times the whole table was read.
    table_reads: usize,
    devices: BTreeMap<u32, FakeDevice>,
    next_device: u32,
    frozen: BTreeSet<PathBuf>,
    sector_size: u32,
    direct_io: bool,
    ext4_grows_online: bool,
    interrupt_next_mkfs: bool,
    quota: FakeQuota,
    /// Subvolume roots, by device and inode (a renamed subvolume is one
    /// still), and their ids.
    subvolumes: BTreeMap<(u64, u64), u64>,
    next_subvolume: u64,
    /// Qgroup id to (charged bytes, limit).
    qgroups: BTreeMap<u64, (u64, Option<u64>)>,
    projects: BTreeMap<u32, ProjectQuota>,
    /// Directories tagged with a project, by device and inode.
    project_dirs: BTreeMap<(u64, u64), u32>,
}

#[derive(Debug, Clone)]
struct FakeMount {
    mount_point: PathBuf,
    source: String,
    root: PathBuf,
    fs_type: String,
    read_only: bool,
    /// The device whose filesystem this mount keeps busy.
    holds: Option<PathBuf>,
}

impl FakeMount {
    /// The mount as the table lists it, with its mount `id`.
    fn entry(&self, id: u32) -> MountEntry {
        MountEntry {
            mount_id: id,
            parent_id: 0,
            root: self.root.clone(),
            mount_point: self.mount_point.clone(),
            options: mode(self.read_only).to_owned(),
            fs_type: self.fs_type.clone(),
            source: self.source.clone(),
            super_options: "rw".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
struct FakeDevice {
    device: LoopDevice,
    /// The image, held open as the kernel holds it: renames do not matter.
    image: Arc<File>,
    /// Device and inode of the image, as the kernel matches it.
    image_id: (u64, u64),
    size: u64,
}

impl Default for FakeKernel {
    fn default() -> Self {
        FakeKernel::new()
    }
}

impl FakeKernel {
    /// A fake with nothing mounted or attached, direct I/O working, 512-byte
    /// sectors, ext4 growable online, and no quotas.
    pub fn new() -> FakeKernel {
        FakeKernel::with_quota(FakeQuota::None("the fake kernel's root has no quotas".into()))
    }

    /// Like [`FakeKernel::new`], with `quota` enforcing capacities.
    pub fn with_quota(quota: FakeQuota) -> FakeKernel {
        FakeKernel {
            state: Mutex::new(State {
                calls: Vec::new(),
                failures: Vec::new(),
                mounts: Vec::new(),
                table_reads: 0,
                devices: BTreeMap::new(),
                next_device: 0,
                frozen: BTreeSet::new(),
                sector_size: 512,
                direct_io: true,
                ext4_grows_online: true,
                interrupt_next_mkfs: false,
                quota,
                subvolumes: BTreeMap::new(),
                next_subvolume: FIRST_SUBVOLUME_ID,
                qgroups: BTreeMap::new(),
                projects: BTreeMap::new(),
                project_dirs: BTreeMap::new(),
            }),
        }
    }

    /// The calls that changed something so far, e.g. `attach /x.img rw`,
    /// `mkfs /dev/loop-fake-0 ext4`, `unmount /stage`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// How many logged calls start with `prefix` (e.g. `"mkfs "`).
    pub fn count(&self, prefix: &str) -> usize {
        self.lock().calls.iter().filter(|c| c.starts_with(prefix)).count()
    }

    /// Makes the next call of `op` fail with an error of `kind` (one shot;
    /// several queue up).
    pub fn fail_next(&self, op: Op, kind: io::ErrorKind) {
        self.lock().failures.push((op, kind));
    }

    /// Makes the next mkfs stop half-way, as a killed mkfs does: it leaves a
    /// torn header that probes `Unknown`, and fails.
    pub fn interrupt_next_mkfs(&self) {
        self.lock().interrupt_next_mkfs = true;
    }

    /// Whether direct I/O can be turned on for new attachments.
    pub fn set_direct_io(&self, works: bool) {
        self.lock().direct_io = works;
    }

    /// The sector size of new direct-I/O attachments.
    pub fn set_sector_size(&self, bytes: u32) {
        self.lock().sector_size = bytes;
    }

    /// Whether this "process" has CAP_SYS_RESOURCE, which online ext4 growth needs.
    pub fn set_ext4_grows_online(&self, can: bool) {
        self.lock().ext4_grows_online = can;
    }

    /// True when something is mounted at `path`.
    pub fn is_mounted(&self, path: &Path) -> bool {
        self.lock().mounts.iter().any(|m| m.mount_point == path)
    }

    /// How many times the whole mount table was read ([`Kernel::mounts`]):
    /// on a real node each read costs in proportion to its mounts.
    pub fn table_reads(&self) -> usize {
        self.lock().table_reads
    }

    /// True when the filesystem mounted at `path` is frozen.
    pub fn is_frozen(&self, path: &Path) -> bool {
        self.lock().frozen.contains(path)
    }

    /// The attached loop devices.
    pub fn attached(&self) -> Vec<LoopDevice> {
        self.lock().devices.values().map(|d| d.device.clone()).collect()
    }

    /// Charges `bytes` to qgroup `0/<id>`, as writes into its subvolume would.
    pub fn charge_qgroup(&self, id: u64, bytes: u64) {
        self.lock().qgroups.entry(id).or_insert((0, None)).0 = bytes;
    }

    /// The limit of qgroup `0/<id>`, if it exists and has one.
    pub fn qgroup_limit(&self, id: u64) -> Option<u64> {
        self.lock().qgroups.get(&id).and_then(|q| q.1)
    }

    /// Charges `bytes` and `inodes` to project `id`.
    pub fn charge_project(&self, id: u32, bytes: u64, inodes: u64) {
        let mut state = self.lock();
        let quota = state.projects.entry(id).or_default();
        quota.bytes = bytes;
        quota.inodes = inodes;
    }

    /// What project `id` has counted and may hold.
    pub fn project(&self, id: u32) -> ProjectQuota {
        self.lock().projects.get(&id).copied().unwrap_or(ProjectQuota::UNUSED)
    }

    /// The project `dir` was tagged with.
    pub fn project_of(&self, dir: &Path) -> Option<u32> {
        let id = inode(dir).ok()?;
        self.lock().project_dirs.get(&id).copied()
    }

    /// Writes the header of a `fs` filesystem of `size` bytes at the start
    /// of `image` (any name: `"btrfs"` makes a foreign filesystem).
    pub fn write_filesystem(image: &Path, fs: &str, size: u64) -> io::Result<()> {
        write_header(&OpenOptions::new().write(true).open(image)?, fs, size)
    }

    /// The fake filesystem in `image` and its size, if it holds one.
    pub fn filesystem_in(image: &Path) -> io::Result<Option<(String, u64)>> {
        Ok(match read_content(&File::open(image)?)? {
            Found::Filesystem(fs, size) => Some((fs, size)),
            Found::Empty | Found::Unknown => None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves valid data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the state, logs `call` (when given) and takes an injected failure of `op`.
    fn enter(&self, op: Op, call: Option<String>) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.lock();
        if let Some(call) = call {
            state.calls.push(call);
        }
        if let Some(index) = state.failures.iter().position(|(o, _)| *o == op) {
            let (_, kind) = state.failures.remove(index);
            return Err(io::Error::new(kind, format!("injected {op:?} failure")));
        }
        Ok(state)
    }
}

impl State {
    fn device(&self, device: &Path) -> io::Result<&FakeDevice> {
        self.devices
            .values()
            .find(|d| d.device.device == device)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} is not attached", device.display())))
    }

    fn device_mut(&mut self, device: &Path) -> io::Result<&mut FakeDevice> {
        self.devices
            .values_mut()
            .find(|d| d.device.device == device)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} is not attached", device.display())))
    }

    fn holds(&self, device: &Path) -> bool {
        self.mounts.iter().any(|m| m.holds.as_deref() == Some(device))
    }

    fn topmost(&self, path: &Path) -> Option<&FakeMount> {
        self.mounts.iter().rev().find(|m| m.mount_point == path)
    }

    fn mount_root(&self, path: &Path, action: &str) -> io::Result<()> {
        match self.topmost(path) {
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to {action} {}: it is not the root of a mount", path.display()),
            )),
        }
    }

    fn quota_id(&self, path: &Path) -> io::Result<u64> {
        inode(path)
            .ok()
            .and_then(|id| self.subvolumes.get(&id).copied())
            .ok_or_else(|| errno(libc::ENOTTY, "not a subvolume", path))
    }
}

/// What an image holds, as the fake reads it.
enum Found {
    Empty,
    Filesystem(String, u64),
    Unknown,
}

fn write_header(image: &File, fs: &str, size: u64) -> io::Result<()> {
    let mut header = MAGIC.to_vec();
    header.extend(format!("fs={fs} size={size}\n").bytes());
    image.write_all_at(&header, 0)
}

fn read_content(image: &File) -> io::Result<Found> {
    let mut head = vec![0; usize::try_from(PROBE_LEN).unwrap_or(usize::MAX)];
    let mut filled = 0;
    while filled < head.len() {
        match image.read_at(&mut head[filled..], filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    head.truncate(filled);
    if let Some(rest) = head.strip_prefix(MAGIC) {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        let text = String::from_utf8_lossy(line);
        let mut fs = None;
        let mut size = None;
        for word in text.split(' ') {
            match word.split_once('=') {
                Some(("fs", name)) => fs = Some(name.to_owned()),
                Some(("size", n)) => size = n.parse().ok(),
                _ => {}
            }
        }
        return Ok(match (fs, size) {
            (Some(fs), Some(size)) => Found::Filesystem(fs, size),
            _ => Found::Unknown,
        });
    }
    Ok(if head.iter().all(|&b| b == 0) { Found::Empty } else { Found::Unknown })
}

/// Whether a filesystem found on a device can be mounted as `fs`.
fn mountable_as(found: &str, fs: FsType) -> bool {
    match fs {
        FsType::Ext4 => matches!(found, "ext4" | "ext3" | "ext2"),
        FsType::Xfs => found == "xfs",
    }
}

fn errno(code: i32, what: &str, path: &Path) -> io::Error {
    let err = io::Error::from_raw_os_error(code);
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// The path a `/proc/self/fd/N` handle path stands for; other paths as they are.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    if path.starts_with("/proc/self/fd") { fs::read_link(path) } else { Ok(path.to_owned()) }
}

/// Device and inode of `path`, not following a symlink.
fn inode(path: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

fn image_id(image: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::metadata(image).map_err(|e| io::Error::new(e.kind(), format!("stat {}: {e}", image.display())))?;
    Ok((meta.dev(), meta.ino()))
}

fn mode(read_only: bool) -> &'static str {
    if read_only { "ro" } else { "rw" }
}

impl Kernel for FakeKernel {
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> io::Result<()> {
        let mut state =
            self.enter(Op::Bind, Some(format!("bind {} {} {flags}", source.display(), target.display())))?;
        // Same checks as the kernel side, so tests catch missing mkdirs.
        let device = state.devices.values().find(|d| d.device.device == source).map(|d| d.device.clone());
        let source_kind = match &device {
            Some(_) => Kind::File,
            None => {
                nofollow::open(source)?;
                kind_of_file_type(fs::symlink_metadata(source)?.file_type())
            }
        };
        nofollow::open(target)?;
        let target_kind = kind_of_file_type(fs::symlink_metadata(target)?.file_type());
        check_kinds(source, source_kind, target, target_kind)?;
        let mount = match (device, state.topmost(source)) {
            // A device node lives on devtmpfs; binding it holds no filesystem.
            (Some(device), _) => FakeMount {
                mount_point: target.to_owned(),
                source: "devtmpfs".into(),
                root: Path::new("/").join(device.device.file_name().unwrap_or_default()),
                fs_type: "devtmpfs".into(),
                read_only: flags.read_only,
                holds: None,
            },
            // Like the kernel, a bind of a mount shows its filesystem and root.
            (None, Some(below)) => {
                FakeMount { mount_point: target.to_owned(), read_only: flags.read_only, ..below.clone() }
            }
            (None, None) => FakeMount {
                mount_point: target.to_owned(),
                source: source.display().to_string(),
                root: source.to_owned(),
                fs_type: "fake".into(),
                read_only: flags.read_only,
                holds: None,
            },
        };
        state.mounts.push(mount);
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<bool> {
        let mut state = self.enter(Op::Unmount, Some(format!("unmount {}", target.display())))?;
        match state.mounts.iter().rposition(|m| m.mount_point == target) {
            Some(index) => {
                state.mounts.remove(index);
                if state.topmost(target).is_none() {
                    state.frozen.remove(target);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn mounts(&self) -> io::Result<Vec<MountEntry>> {
        let mut state = self.enter(Op::Mounts, None)?;
        state.table_reads += 1;
        Ok(state.mounts.iter().zip(1u32..).map(|(m, id)| m.entry(id)).collect())
    }

    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        Ok(self.mount_at(path)?.is_some())
    }

    fn mount_at(&self, path: &Path) -> io::Result<Option<MountEntry>> {
        let state = self.enter(Op::MountAt, None)?;
        // As on the real side, a name that leads through a symlink (or to
        // nothing) reaches no mount.
        if mountpoint::reach(path)?.is_none() {
            return Ok(None);
        }
        let topmost = state.mounts.iter().rposition(|m| m.mount_point == path);
        Ok(topmost.map(|index| state.mounts[index].entry(u32::try_from(index + 1).unwrap_or(u32::MAX))))
    }

    fn mount_filesystem(&self, device: &Path, target: &Path, fs: FsType, flags: MountFlags) -> io::Result<()> {
        let target = resolve(target)?;
        let mut state = self.enter(
            Op::MountFilesystem,
            Some(format!("mount {} {} {} {flags}", device.display(), target.display(), fs.name())),
        )?;
        if !fs::symlink_metadata(&target)?.is_dir() {
            return Err(errno(libc::ENOTDIR, "mount on", &target));
        }
        let attached = state.device(device)?;
        match read_content(&attached.image)? {
            Found::Filesystem(found, _) if mountable_as(&found, fs) => {}
            _ => return Err(errno(libc::EINVAL, &format!("mount ({}) of", fs.name()), device)),
        }
        if attached.device.read_only && !flags.read_only {
            return Err(errno(libc::EROFS, "writable mount of read-only", device));
        }
        state.mounts.push(FakeMount {
            mount_point: target,
            source: device.display().to_string(),
            root: PathBuf::from("/"),
            fs_type: fs.name().to_owned(),
            read_only: flags.read_only,
            holds: Some(device.to_owned()),
        });
        Ok(())
    }

    fn attach(&self, image: &Path, options: AttachOptions) -> io::Result<LoopDevice> {
        let mut state =
            self.enter(Op::Attach, Some(format!("attach {} {}", image.display(), mode(options.read_only))))?;
        let id = image_id(image)?;
        let file = OpenOptions::new().read(true).write(!options.read_only).open(image)?;
        let size = file.metadata()?.len();
        let number = state.next_device;
        state.next_device += 1;
        let direct_io = options.direct_io && state.direct_io;
        let device = LoopDevice {
            device: PathBuf::from(format!("{DEVICE_PREFIX}{number}")),
            number,
            backing_file: image.to_owned(),
            read_only: options.read_only,
            direct_io,
            block_size: if direct_io { state.sector_size } else { 512 },
        };
        state.devices.insert(number, FakeDevice { device: device.clone(), image: Arc::new(file), image_id: id, size });
        Ok(device)
    }

    fn loop_devices(&self) -> io::Result<Vec<LoopDevice>> {
        let state = self.enter(Op::LoopDevices, None)?;
        Ok(state.devices.values().map(|d| d.device.clone()).collect())
    }

    fn find_loop_devices(&self, image: &Path) -> io::Result<Vec<LoopDevice>> {
        let state = self.enter(Op::FindLoopDevices, None)?;
        let id = image_id(image)?;
        Ok(state.devices.values().filter(|d| d.image_id == id).map(|d| d.device.clone()).collect())
    }

    fn detach(&self, device: &Path) -> io::Result<()> {
        let mut state = self.enter(Op::Detach, Some(format!("detach {}", device.display())))?;
        if state.holds(device) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("detach {}: the device is still open elsewhere (mounted or in use)", device.display()),
            ));
        }
        state.devices.retain(|_, d| d.device.device != device);
        Ok(())
    }

    fn refresh_capacity(&self, device: &Path) -> io::Result<()> {
        let mut state = self.enter(Op::RefreshCapacity, Some(format!("refresh {}", device.display())))?;
        let attached = state.device_mut(device).map_err(|_| errno(libc::ENXIO, "LOOP_SET_CAPACITY", device))?;
        attached.size = attached.image.metadata()?.len();
        Ok(())
    }

    fn device_size(&self, device: &Path) -> io::Result<u64> {
        let state = self.enter(Op::DeviceSize, None)?;
        Ok(state.device(device)?.size)
    }

    fn sector_size_for(&self, image: &Path) -> io::Result<u32> {
        let state = self.enter(Op::SectorSize, None)?;
        image_id(image)?;
        Ok(state.sector_size)
    }

    fn probe(&self, device: &Path) -> io::Result<Content> {
        let state = self.enter(Op::Probe, None)?;
        Ok(match read_content(&state.device(device)?.image)? {
            Found::Empty => Content::Empty,
            Found::Filesystem(fs, _) => Content::Filesystem(fs),
            Found::Unknown => Content::Unknown,
        })
    }

    fn mkfs(&self, device: &Path, fs: FsType, thick: bool, _options: &MkfsOptions) -> io::Result<()> {
        let thickness = if thick { "thick" } else { "thin" };
        let mut state = self.enter(Op::Mkfs, Some(format!("mkfs {} {} {thickness}", device.display(), fs.name())))?;
        let attached = state.device(device)?.clone();
        if attached.device.read_only {
            return Err(errno(libc::EROFS, "mkfs on read-only", device));
        }
        if state.holds(device) {
            return Err(errno(libc::EBUSY, "mkfs on mounted", device));
        }
        if std::mem::take(&mut state.interrupt_next_mkfs) {
            attached.image.write_all_at(b"LOAM-FAKE-FS\ntorn by a kill", 0)?;
            return Err(io::Error::other(format!("mkfs.{} {} was killed", fs.name(), device.display())));
        }
        write_header(&attached.image, fs.name(), attached.size)
    }

    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> io::Result<()> {
        let state = self.enter(Op::Grow, Some(format!("grow {} {}", fs.name(), device.display())))?;
        if fs == FsType::Ext4 && !state.ext4_grows_online {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("resize2fs {} failed: Permission denied", device.display()),
            ));
        }
        if state.topmost(mount_point).is_none_or(|m| m.holds.as_deref() != Some(device)) {
            return Err(errno(libc::EINVAL, &format!("{} is not mounted at", device.display()), mount_point));
        }
        let attached = state.device(device)?;
        match read_content(&attached.image)? {
            Found::Filesystem(found, _) if mountable_as(&found, fs) => {
                write_header(&attached.image, &found, attached.size)
            }
            _ => Err(errno(libc::EINVAL, "no filesystem to grow on", device)),
        }
    }

    fn grow_ext4_offline(&self, device: &Path, intent: &Path) -> io::Result<()> {
        let mut state = self.enter(Op::GrowExt4Offline, None)?;
        let attached = state.device(device)?.clone();
        if state.holds(device) {
            return Err(errno(libc::EBUSY, "e2fsck of mounted", device));
        }
        let interrupted = fs::symlink_metadata(intent).is_ok();
        if interrupted {
            state.calls.push(format!("e2fsck -y {}", device.display()));
        }
        let found = match read_content(&attached.image)? {
            Found::Filesystem(found, size) if mountable_as(&found, FsType::Ext4) && size < attached.size => found,
            _ if interrupted => return crate::durable::remove(intent),
            _ => return Ok(()),
        };
        if !interrupted {
            File::create(intent)?.sync_all()?;
            crate::durable::sync_dir(intent.parent().unwrap_or(Path::new("/")))?;
        }
        state.calls.push(format!("resize2fs {}", device.display()));
        write_header(&attached.image, &found, attached.size)?;
        crate::durable::remove(intent)
    }

    fn ext_size(&self, device: &Path) -> io::Result<Option<u64>> {
        let state = self.enter(Op::ExtSize, None)?;
        Ok(match read_content(&state.device(device)?.image)? {
            Found::Filesystem(found, size) if mountable_as(&found, FsType::Ext4) => Some(size),
            _ => None,
        })
    }

    fn can_grow_online(&self, fs: FsType) -> io::Result<bool> {
        let state = self.enter(Op::CanGrowOnline, None)?;
        Ok(fs == FsType::Xfs || state.ext4_grows_online)
    }

    fn freeze(&self, mount_point: &Path) -> io::Result<()> {
        let mut state = self.enter(Op::Freeze, Some(format!("freeze {}", mount_point.display())))?;
        state.mount_root(mount_point, "freeze")?;
        if !state.frozen.insert(mount_point.to_owned()) {
            return Err(errno(libc::EBUSY, "FIFREEZE", mount_point));
        }
        Ok(())
    }

    fn thaw(&self, mount_point: &Path) -> io::Result<bool> {
        let mut state = self.enter(Op::Thaw, Some(format!("thaw {}", mount_point.display())))?;
        state.mount_root(mount_point, "thaw")?;
        Ok(state.frozen.remove(mount_point))
    }

    fn quota_enforcer(&self, root: &Path, _enable_btrfs_quota: bool) -> io::Result<Enforcer> {
        let state = self.enter(Op::QuotaEnforcer, None)?;
        match &state.quota {
            FakeQuota::Btrfs => Ok(Enforcer::Btrfs),
            FakeQuota::Project => Ok(Enforcer::Project(ProjectIds::default())),
            FakeQuota::None(reason) => Ok(Enforcer::None(reason.clone())),
            FakeQuota::Host => Enforcer::detect(root, false),
        }
    }

    fn is_subvolume(&self, path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && self.lock().subvolumes.contains_key(&(m.dev(), m.ino())))
    }

    fn create_subvolume(&self, path: &Path) -> io::Result<()> {
        let mut state = self.enter(Op::CreateSubvolume, Some(format!("create-subvolume {}", path.display())))?;
        fs::create_dir(path)?;
        let id = state.next_subvolume;
        state.next_subvolume += 1;
        state.subvolumes.insert(inode(path)?, id);
        state.qgroups.insert(id, (0, None));
        Ok(())
    }

    fn snapshot_subvolume(&self, source: &Path, path: &Path, read_only: bool) -> io::Result<()> {
        let mut state = self.enter(
            Op::SnapshotSubvolume,
            Some(format!("snapshot-subvolume {} {} {}", source.display(), path.display(), mode(read_only))),
        )?;
        state.quota_id(source)?;
        if fs::symlink_metadata(path).is_ok() {
            return Err(errno(libc::EEXIST, "snapshot onto", path));
        }
        if let Err(e) = copy_tree(source, path) {
            // Atomic, as a real snapshot is: nothing appears on failure.
            let _ = fs::remove_dir_all(path);
            return Err(e);
        }
        let id = state.next_subvolume;
        state.next_subvolume += 1;
        state.subvolumes.insert(inode(path)?, id);
        state.qgroups.insert(id, (0, None));
        Ok(())
    }

    fn delete_subvolume(&self, path: &Path) -> io::Result<()> {
        let mut state = self.enter(Op::DeleteSubvolume, Some(format!("delete-subvolume {}", path.display())))?;
        let id = state.quota_id(path)?;
        let node = inode(path)?;
        fs::remove_dir_all(path)?;
        state.subvolumes.remove(&node);
        state.qgroups.remove(&id);
        Ok(())
    }

    fn subvolume_id(&self, path: &Path) -> io::Result<u64> {
        self.enter(Op::SubvolumeId, None)?.quota_id(path)
    }

    fn set_qgroup_limit(&self, _path: &Path, id: u64, bytes: u64) -> io::Result<()> {
        let mut state = self.enter(Op::SetQgroupLimit, Some(format!("qgroup-limit 0/{id} {bytes}")))?;
        match state.qgroups.get_mut(&id) {
            Some(qgroup) => {
                qgroup.1 = Some(bytes);
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    fn qgroup_usage(&self, _root: &Path, id: u64) -> io::Result<(u64, Option<u64>)> {
        let state = self.enter(Op::QgroupUsage, None)?;
        state.qgroups.get(&id).copied().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn assign_project(&self, dir: &Path, id: u32) -> io::Result<()> {
        let mut state = self.enter(Op::AssignProject, Some(format!("assign-project {} {id}", dir.display())))?;
        if !fs::symlink_metadata(dir)?.is_dir() {
            return Err(errno(libc::ENOTDIR, "FS_IOC_FSSETXATTR on", dir));
        }
        state.project_dirs.insert(inode(dir)?, id);
        Ok(())
    }

    fn tagged_project(&self, dir: &Path) -> io::Result<u32> {
        let state = self.enter(Op::TaggedProject, None)?;
        if !fs::symlink_metadata(dir)?.is_dir() {
            return Err(errno(libc::ENOTDIR, "FS_IOC_FSGETXATTR on", dir));
        }
        Ok(state.project_dirs.get(&inode(dir)?).copied().unwrap_or(0))
    }

    fn set_project_limit(&self, _root: &Path, id: u32, bytes: u64, inodes: u64) -> io::Result<()> {
        let mut state = self.enter(Op::SetProjectLimit, Some(format!("project-limit {id} {bytes} {inodes}")))?;
        let quota = state.projects.entry(id).or_default();
        quota.bytes_limit = bytes.div_ceil(BASIC_BLOCK) * BASIC_BLOCK;
        quota.inodes_limit = inodes;
        Ok(())
    }

    fn project_quota(&self, _root: &Path, id: u32) -> io::Result<ProjectQuota> {
        let state = self.enter(Op::ProjectQuota, None)?;
        Ok(state.projects.get(&id).copied().unwrap_or(ProjectQuota::UNUSED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::mountinfo;
    use crate::kernel::seam::{Frozen, Kernel};
    use std::os::unix::fs::symlink;

    fn rw() -> AttachOptions {
        AttachOptions { read_only: false, direct_io: true }
    }

    fn image(dir: &Path, len: u64) -> PathBuf {
        let path = dir.join("vol.img");
        File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    #[test]
    fn binds_and_unmounts_like_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let fake = FakeKernel::new();
        let ro = MountFlags { read_only: true, ..MountFlags::default() };

        fake.bind(&a, &b, ro).unwrap();
        let mounts = fake.mounts().unwrap();
        assert!(mountinfo::find_mount_point(&mounts, &b).unwrap().read_only());
        assert!(fake.unmount(&b).unwrap());
        assert!(!fake.unmount(&b).unwrap(), "a second unmount finds nothing");
        assert_eq!(
            fake.calls(),
            [
                format!("bind {} {} ro", a.display(), b.display()),
                format!("unmount {}", b.display()),
                format!("unmount {}", b.display())
            ]
        );
    }

    #[test]
    fn refuses_missing_mismatched_and_symlinked_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (a, file, link) = (dir.path().join("a"), dir.path().join("f"), dir.path().join("l"));
        fs::create_dir(&a).unwrap();
        fs::write(&file, b"x").unwrap();
        symlink(&a, &link).unwrap();
        let fake = FakeKernel::new();
        let none = MountFlags::default();
        assert_eq!(fake.bind(&a, &dir.path().join("nope"), none).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(fake.bind(&a, &file, none).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let err = fake.bind(&a, &link, none).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(fake.mounts().unwrap().is_empty());
    }

    #[test]
    fn injected_failures_are_one_shot_per_operation() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeKernel::new();
        fake.fail_next(Op::Bind, io::ErrorKind::PermissionDenied);
        fake.fail_next(Op::Detach, io::ErrorKind::Other);
        let err = fake.bind(dir.path(), dir.path(), MountFlags::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(!fake.is_mounted(dir.path()));
        fake.bind(dir.path(), dir.path(), MountFlags::default()).expect("the second bind succeeds");
        assert!(fake.detach(Path::new("/dev/loop-fake-9")).is_err(), "the queued detach failure");
        fake.detach(Path::new("/dev/loop-fake-9")).expect("an unattached device is detached already");
    }

    #[test]
    fn loop_devices_follow_their_image_and_refuse_detach_while_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20);
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let fake = FakeKernel::new();
        let dev = fake.attach(&img, rw()).unwrap();
        assert!(dev.direct_io && !dev.read_only);
        // Found by inode, also under another name.
        let renamed = dir.path().join("renamed.img");
        fs::rename(&img, &renamed).unwrap();
        assert_eq!(fake.find_loop_devices(&renamed).unwrap(), std::slice::from_ref(&dev));
        assert_eq!(fake.find_loop_devices(&img).unwrap_err().kind(), io::ErrorKind::NotFound);

        assert_eq!(fake.probe(&dev.device).unwrap(), Content::Empty);
        let none = MkfsOptions::none(FsType::Ext4);
        fake.mkfs(&dev.device, FsType::Ext4, true, &none).unwrap();
        assert_eq!(fake.probe(&dev.device).unwrap(), Content::Filesystem("ext4".into()));
        let xfs = fake.mount_filesystem(&dev.device, &mnt, FsType::Xfs, MountFlags::default()).unwrap_err();
        assert_eq!(xfs.kind(), io::ErrorKind::InvalidInput, "the wrong filesystem type: {xfs}");
        fake.mount_filesystem(&dev.device, &mnt, FsType::Ext4, MountFlags::default()).unwrap();
        assert_eq!(fake.detach(&dev.device).unwrap_err().kind(), io::ErrorKind::ResourceBusy);
        assert_eq!(fake.mkfs(&dev.device, FsType::Ext4, true, &none).unwrap_err().kind(), io::ErrorKind::ResourceBusy);

        // Growing the image shows on the device only after a refresh.
        File::options().write(true).open(&renamed).unwrap().set_len(2 << 20).unwrap();
        assert_eq!(fake.device_size(&dev.device).unwrap(), 1 << 20);
        fake.refresh_capacity(&dev.device).unwrap();
        assert_eq!(fake.device_size(&dev.device).unwrap(), 2 << 20);
        assert_eq!(fake.ext_size(&dev.device).unwrap(), Some(1 << 20));
        fake.grow(FsType::Ext4, &dev.device, &mnt).unwrap();
        assert_eq!(fake.ext_size(&dev.device).unwrap(), Some(2 << 20));

        assert!(fake.unmount(&mnt).unwrap());
        fake.detach(&dev.device).unwrap();
        assert!(fake.loop_devices().unwrap().is_empty());
        assert_eq!(FakeKernel::filesystem_in(&renamed).unwrap(), Some(("ext4".into(), 2 << 20)));
    }

    #[test]
    fn a_read_only_device_mounts_only_read_only_and_cannot_be_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20);
        FakeKernel::write_filesystem(&img, "ext4", 1 << 20).unwrap();
        let fake = FakeKernel::new();
        let dev = fake.attach(&img, AttachOptions { read_only: true, direct_io: true }).unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let err = fake.mount_filesystem(&dev.device, &mnt, FsType::Ext4, MountFlags::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ReadOnlyFilesystem, "{err}");
        assert!(fake.mkfs(&dev.device, FsType::Ext4, false, &MkfsOptions::none(FsType::Ext4)).is_err());
        let ro = MountFlags { read_only: true, ..MountFlags::default() };
        fake.mount_filesystem(&dev.device, &mnt, FsType::Ext4, ro).unwrap();
    }

    #[test]
    fn an_interrupted_mkfs_leaves_content_that_is_not_blank() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 1 << 20);
        let fake = FakeKernel::new();
        let dev = fake.attach(&img, rw()).unwrap();
        fake.interrupt_next_mkfs();
        assert!(fake.mkfs(&dev.device, FsType::Xfs, false, &MkfsOptions::none(FsType::Xfs)).is_err());
        assert_eq!(fake.probe(&dev.device).unwrap(), Content::Unknown);
    }

    #[test]
    fn frozen_guards_thaw_on_drop_and_freezes_need_a_mount_root() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeKernel::new();
        let err = fake.freeze(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "not a mount root: {err}");
        fake.bind(dir.path(), dir.path(), MountFlags::default()).unwrap();
        {
            let _frozen = Frozen::new(&fake as &dyn Kernel, dir.path()).unwrap();
            assert!(fake.is_frozen(dir.path()));
            assert_eq!(fake.freeze(dir.path()).unwrap_err().kind(), io::ErrorKind::ResourceBusy);
        }
        assert!(!fake.is_frozen(dir.path()), "dropping the guard thaws");
        fake.freeze(dir.path()).unwrap();
        assert!(fake.thaw(dir.path()).unwrap());
        assert!(!fake.thaw(dir.path()).unwrap());
    }

    #[test]
    fn subvolumes_and_quotas_are_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeKernel::with_quota(FakeQuota::Btrfs);
        assert!(matches!(fake.quota_enforcer(dir.path(), false).unwrap(), Enforcer::Btrfs));
        let (vol, snap) = (dir.path().join("vol"), dir.path().join("snap"));
        fake.create_subvolume(&vol).unwrap();
        fs::write(vol.join("data"), b"x").unwrap();
        fake.snapshot_subvolume(&vol, &snap, true).unwrap();
        assert_eq!(fs::read(snap.join("data")).unwrap(), b"x");
        let id = fake.subvolume_id(&vol).unwrap();
        assert_ne!(id, fake.subvolume_id(&snap).unwrap());
        fake.set_qgroup_limit(&vol, id, 4096).unwrap();
        fake.charge_qgroup(id, 100);
        assert_eq!(fake.qgroup_usage(dir.path(), id).unwrap(), (100, Some(4096)));
        fake.delete_subvolume(&vol).unwrap();
        assert!(!vol.exists() && !fake.is_subvolume(&vol));
        assert!(fake.qgroup_usage(dir.path(), id).is_err());

        fake.set_project_limit(dir.path(), 7, 1000, 0).unwrap();
        assert_eq!(fake.project_quota(dir.path(), 7).unwrap().bytes_limit, 1024, "kept in 512-byte units");
        assert_eq!(fake.project_quota(dir.path(), 8).unwrap(), ProjectQuota::UNUSED);
    }
}
