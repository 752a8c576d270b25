//! The one seam between Loam and the kernel: every mount, loop device,
//! filesystem tool, freeze and quota call the backends and the driver make
//! goes through [`Kernel`]. Production uses [`HostKernel`](super::HostKernel);
//! tests use [`FakeKernel`](super::FakeKernel), which keeps the same promises
//! in memory, so the backends' logic runs without root.
//!
//! Every method documents what it promises (errors, idempotence): the fake
//! must honour the same contract, and the backends may rely on nothing else.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use super::blockfs::{Content, FsType};
use super::loopdev::{AttachOptions, LoopDevice};
use super::mkfs_options::MkfsOptions;
use super::mount::MountFlags;
use super::mountinfo::MountEntry;
use super::quota::{Enforcer, ProjectQuota};

/// What Loam asks of the kernel.
pub trait Kernel: Send + Sync + fmt::Debug {
    // Mounts and the mount table.

    /// Bind-mounts existing `source` onto existing `target` of the same kind
    /// (directory onto directory; file or block device onto file), then
    /// applies `flags`.
    ///
    /// A symlink in either path, or ends of different kinds, is
    /// `InvalidInput`; a missing end is `NotFound`. If applying the flags
    /// fails the bind is undone first. Not idempotent: a second bind stacks.
    fn bind(&self, source: &Path, target: &Path, flags: MountFlags) -> io::Result<()>;
    /// Unmounts the topmost mount at `target`: `Ok(false)` when nothing is
    /// mounted there (so repeating it is harmless).
    fn unmount(&self, target: &Path) -> io::Result<bool>;
    /// The mount table as this process sees it, in mount order. Its cost
    /// grows with the node's mounts: to ask about one path, use
    /// [`Kernel::is_mount_point`] or [`Kernel::mount_at`].
    fn mounts(&self) -> io::Result<Vec<MountEntry>>;
    /// Whether something is mounted on `path`, reached without following a
    /// symlink (a missing or symlinked path has nothing mounted on it). Does
    /// not read the mount table.
    fn is_mount_point(&self, path: &Path) -> io::Result<bool>;
    /// The topmost mount on `path` (the one the path reaches), as the mount
    /// table lists it; `None` when [`Kernel::is_mount_point`] is false.
    /// Reads the table only when something is mounted there.
    fn mount_at(&self, path: &Path) -> io::Result<Option<MountEntry>>;
    /// Mounts the `fs` filesystem on block `device` at directory `target`
    /// (which may be a `/proc/self/fd/N` path of a handle opened without
    /// following symlinks) with `flags`. A device without that filesystem
    /// is `InvalidInput` (EINVAL); a writable mount of a read-only device
    /// is refused (EROFS/EACCES).
    fn mount_filesystem(&self, device: &Path, target: &Path, fs: FsType, flags: MountFlags) -> io::Result<()>;

    // Loop devices.

    /// Attaches `image` to a new loop device with `options`; whether direct
    /// I/O really is on is read back into [`LoopDevice::direct_io`]. A
    /// missing image is `NotFound`. Each call attaches another device.
    fn attach(&self, image: &Path, options: AttachOptions) -> io::Result<LoopDevice>;
    /// Every attached loop device, by number.
    fn loop_devices(&self) -> io::Result<Vec<LoopDevice>>;
    /// The loop devices backed by `image`, matched by its device and inode
    /// (so a renamed image still matches). A missing image is `NotFound`.
    fn find_loop_devices(&self, image: &Path) -> io::Result<Vec<LoopDevice>>;
    /// Detaches `device`; one already detached is fine. A device still in
    /// use (mounted) is `ResourceBusy` and stays attached.
    fn detach(&self, device: &Path) -> io::Result<()>;
    /// Tells `device` that its backing file changed size: its size becomes
    /// the file's length.
    fn refresh_capacity(&self, device: &Path) -> io::Result<()>;
    /// Size of block `device` in bytes, as of its attach or last refresh.
    fn device_size(&self, device: &Path) -> io::Result<u64>;
    /// The logical sector size a direct-I/O attachment of `image` gets: the
    /// smallest filesystem block a volume on it can have.
    fn sector_size_for(&self, image: &Path) -> io::Result<u32>;

    // Filesystems on block devices.

    /// What `device` holds: `Empty` only when its first MiB is all zeroes.
    fn probe(&self, device: &Path) -> io::Result<Content>;
    /// Formats `device` with `fs` and the volume's `options`, never
    /// discarding (`thick`: nothing left for the kernel to zero lazily).
    /// Destroys whatever was there; an interrupted run leaves the device in
    /// no known state.
    fn mkfs(&self, device: &Path, fs: FsType, thick: bool, options: &MkfsOptions) -> io::Result<()>;
    /// Grows the filesystem on `device`, mounted at `mount_point`, to fill
    /// the device. ext4 needs CAP_SYS_RESOURCE (see
    /// [`Kernel::can_grow_online`]); without it this fails.
    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> io::Result<()>;
    /// Grows the unmounted ext4 filesystem on `device` to fill it; nothing
    /// to do when it fills it already (or holds no ext4). The file `intent`
    /// exists (durably) only while a resize is under way; a call that finds
    /// it repairs the filesystem first, so a resize cut short converges.
    fn grow_ext4_offline(&self, device: &Path, intent: &Path) -> io::Result<()>;
    /// The size an ext2/3/4 superblock on `device` gives its filesystem, or
    /// `None` when it holds none.
    fn ext_size(&self, device: &Path) -> io::Result<Option<u64>>;
    /// Whether this process may grow a mounted `fs` (ext4 needs
    /// CAP_SYS_RESOURCE; xfs does not).
    fn can_grow_online(&self, fs: FsType) -> io::Result<bool>;
    /// Freezes the filesystem whose mount root is `mount_point` until
    /// [`Kernel::thaw`]; the freeze outlives the caller. A path that is not
    /// a mount root is `InvalidInput`; a frozen filesystem `ResourceBusy`.
    /// Use [`Frozen`] to be sure of the thaw.
    fn freeze(&self, mount_point: &Path) -> io::Result<()>;
    /// Thaws the filesystem whose mount root is `mount_point`: `Ok(true)`
    /// when it was frozen, `Ok(false)` when not (so repeating is harmless).
    /// A path that is not a mount root is `InvalidInput`.
    fn thaw(&self, mount_point: &Path) -> io::Result<bool>;

    // Quotas of directory volumes.

    /// How the filesystem holding `root` can enforce capacities; btrfs
    /// quotas are turned on only when `enable_btrfs_quota`.
    fn quota_enforcer(&self, root: &Path, enable_btrfs_quota: bool) -> io::Result<Enforcer>;
    /// Whether `path` is the root of a btrfs subvolume (not following links).
    fn is_subvolume(&self, path: &Path) -> bool;
    /// Creates an empty subvolume at `path`, whose parent must exist and
    /// which must not (`AlreadyExists`).
    fn create_subvolume(&self, path: &Path) -> io::Result<()>;
    /// Snapshots subvolume `source` as new `path`, atomically: it appears
    /// whole or not at all.
    fn snapshot_subvolume(&self, source: &Path, path: &Path, read_only: bool) -> io::Result<()>;
    /// Deletes the subvolume at `path` with everything in it.
    fn delete_subvolume(&self, path: &Path) -> io::Result<()>;
    /// The id of the subvolume rooted at `path`, which is its qgroup's.
    fn subvolume_id(&self, path: &Path) -> io::Result<u64>;
    /// Caps the referenced bytes of qgroup `0/<id>`; `path` is any path on
    /// its filesystem. Setting the same limit again changes nothing.
    fn set_qgroup_limit(&self, path: &Path, id: u64, bytes: u64) -> io::Result<()>;
    /// Referenced bytes of qgroup `0/<id>` on the filesystem of `root` and
    /// its limit (`None` when unset).
    fn qgroup_usage(&self, root: &Path, id: u64) -> io::Result<(u64, Option<u64>)>;
    /// Tags directory `dir` with project `id`, inherited by what is created
    /// in it.
    fn assign_project(&self, dir: &Path, id: u32) -> io::Result<()>;
    /// The project directory `dir` is tagged with (0: none), read without
    /// following a symlink at `dir`.
    fn tagged_project(&self, dir: &Path) -> io::Result<u32>;
    /// Sets the hard limits of project `id` on the filesystem of `root`:
    /// bytes (kept in 512-byte units, rounded up) and inodes; 0 removes one.
    fn set_project_limit(&self, root: &Path, id: u32, bytes: u64, inodes: u64) -> io::Result<()>;
    /// Usage and limits of project `id` on the filesystem of `root`; an id
    /// never seen is [`ProjectQuota::UNUSED`].
    fn project_quota(&self, root: &Path, id: u32) -> io::Result<ProjectQuota>;
}

/// A frozen filesystem, thawed through its kernel `K` (borrowed, or shared
/// by a hold that outlives one call) when dropped (or by [`Frozen::thaw`]), so
/// a failed snapshot never leaves a volume's pods hanging on writes.
#[derive(Debug)]
pub struct Frozen<K: Deref<Target = dyn Kernel>> {
    kernel: K,
    /// `None` once thawed.
    mount_point: Option<PathBuf>,
}

impl<K: Deref<Target = dyn Kernel>> Frozen<K> {
    /// Freezes the filesystem whose mount root is `mount_point`.
    pub fn new(kernel: K, mount_point: &Path) -> io::Result<Frozen<K>> {
        kernel.freeze(mount_point)?;
        Ok(Frozen { kernel, mount_point: Some(mount_point.to_owned()) })
    }

    /// Thaws now, reporting a failure (dropping the guard only logs it).
    pub fn thaw(mut self) -> io::Result<()> {
        match self.mount_point.take() {
            Some(path) => self.kernel.thaw(&path).map(drop),
            None => Ok(()),
        }
    }
}

impl<K: Deref<Target = dyn Kernel>> Drop for Frozen<K> {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; start-up thaws what a
        // failed thaw (or a kill) leaves.
        if let Some(path) = self.mount_point.take()
            && let Err(e) = self.kernel.thaw(&path)
        {
            tracing::warn!(path = %path.display(), "cannot thaw: {e}");
        }
    }
}
