//! XFS and ext4 project quotas: a project id with the inherit flag on the
//! volume directory (`FS_IOC_FSSETXATTR`), and limits and usage through
//! `quotactl_fd(2)` with the XFS quota commands, which the kernel's generic
//! quota layer also serves for ext4. `quotactl_fd` needs no block device
//! path, so loop devices, device-mapper and bind-mounted roots all work.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// `PRJQUOTA` quota type.
const PRJQUOTA: u32 = 2;
/// `Q_XGETQUOTA`: read one id's limits and usage.
const Q_XGETQUOTA: u32 = 0x5803;
/// `Q_XSETQLIM`: set one id's limits.
const Q_XSETQLIM: u32 = 0x5804;
/// `FS_DQUOT_VERSION`.
const FS_DQUOT_VERSION: i8 = 1;
/// `FS_PROJ_QUOTA` in `fs_disk_quota.d_flags`.
const FS_PROJ_QUOTA: i8 = 2;
/// `FS_DQ_IHARD | FS_DQ_BHARD`: the hard limits are what is being set.
const FS_DQ_HARD_LIMITS: u16 = 2 | 8;
/// Quota blocks are 512-byte "basic blocks" whatever the filesystem.
const BASIC_BLOCK: u64 = 512;
/// `FS_XFLAG_PROJINHERIT`: new entries inherit the directory's project id.
const FS_XFLAG_PROJINHERIT: u32 = 0x200;
/// First project id Loam hands out; ids below are left to the operator.
pub const FIRST_PROJECT_ID: u32 = 1 << 20;

/// `struct fs_disk_quota` (linux/dqblk_xfs.h).
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct DiskQuota {
    d_version: i8,
    d_flags: i8,
    d_fieldmask: u16,
    d_id: u32,
    d_blk_hardlimit: u64,
    d_blk_softlimit: u64,
    d_ino_hardlimit: u64,
    d_ino_softlimit: u64,
    d_bcount: u64,
    d_icount: u64,
    d_itimer: i32,
    d_btimer: i32,
    d_iwarns: u16,
    d_bwarns: u16,
    d_timer_hi: [i8; 4],
    d_rtb_hardlimit: u64,
    d_rtb_softlimit: u64,
    d_rtbcount: u64,
    d_rtbtimer: i32,
    d_rtbwarns: u16,
    d_padding3: i16,
    d_padding4: [u8; 8],
}

/// `struct fsxattr` (linux/fs.h).
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct FsXattr {
    fsx_xflags: u32,
    fsx_extsize: u32,
    fsx_nextents: u32,
    fsx_projid: u32,
    fsx_cowextsize: u32,
    fsx_pad: [u8; 8],
}

nix::ioctl_read!(
    /// FS_IOC_FSGETXATTR: a file's project id and flags.
    ioc_fsgetxattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(
    /// FS_IOC_FSSETXATTR: sets a file's project id and flags.
    ioc_fssetxattr, b'X', 32, FsXattr);

/// A project's usage and hard limits as the kernel counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectQuota {
    /// Bytes charged to the project.
    pub bytes: u64,
    /// Inodes charged to the project.
    pub inodes: u64,
    /// Hard limit on bytes; 0 when unset.
    pub bytes_limit: u64,
    /// Hard limit on inodes; 0 when unset.
    pub inodes_limit: u64,
}

impl ProjectQuota {
    /// An id nothing is charged to and no limit is set for.
    pub const UNUSED: ProjectQuota = ProjectQuota { bytes: 0, inodes: 0, bytes_limit: 0, inodes_limit: 0 };
}

/// Project quotas on the filesystem of one root.
#[derive(Debug)]
pub struct Project {
    /// The root, kept open: `quotactl_fd` names the filesystem by any fd on it.
    root: File,
}

impl Project {
    /// Opens the root and checks that the kernel answers project quota calls.
    pub fn open(root: &Path) -> io::Result<Project> {
        let project = Project::at(root)?;
        project.get(0)?;
        Ok(project)
    }

    /// Opens the root without checking that quotas answer: for one call
    /// on a root [`Project::open`] accepted before.
    pub fn at(root: &Path) -> io::Result<Project> {
        Ok(Project { root: File::open(root)? })
    }

    /// Tags the directory `dir` with project `id` and the inherit flag, so
    /// everything created under it is charged to the project.
    pub fn assign(&self, dir: &Path, id: u32) -> io::Result<()> {
        let dir = File::open(dir)?;
        let mut attr = FsXattr::default();
        // SAFETY: `attr` is a correctly sized, writable FsXattr.
        unsafe { ioc_fsgetxattr(dir.as_raw_fd(), &mut attr) }?;
        attr.fsx_projid = id;
        attr.fsx_xflags |= FS_XFLAG_PROJINHERIT;
        // SAFETY: `attr` is a valid FsXattr.
        unsafe { ioc_fssetxattr(dir.as_raw_fd(), &attr) }?;
        Ok(())
    }

    /// The project id the directory `dir` is tagged with (0 when none); a
    /// symlink at `dir` is refused, never followed.
    pub fn tagged(dir: &Path) -> io::Result<u32> {
        let dir = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir)?;
        let mut attr = FsXattr::default();
        // SAFETY: `attr` is a correctly sized, writable FsXattr.
        unsafe { ioc_fsgetxattr(dir.as_raw_fd(), &mut attr) }?;
        Ok(attr.fsx_projid)
    }

    /// Sets hard limits of `id`: bytes (rounded up to basic blocks) and
    /// inodes; 0 removes a limit.
    pub fn set_limit(&self, id: u32, bytes: u64, inodes: u64) -> io::Result<()> {
        let mut quota = DiskQuota {
            d_version: FS_DQUOT_VERSION,
            d_flags: FS_PROJ_QUOTA,
            d_fieldmask: FS_DQ_HARD_LIMITS,
            d_id: id,
            d_blk_hardlimit: bytes.div_ceil(BASIC_BLOCK),
            d_ino_hardlimit: inodes,
            ..DiskQuota::default()
        };
        self.quotactl(Q_XSETQLIM, id, &mut quota)
    }

    /// Usage and limits of `id`; an id the filesystem never saw is all zero.
    pub fn get(&self, id: u32) -> io::Result<ProjectQuota> {
        let mut quota = DiskQuota::default();
        match self.quotactl(Q_XGETQUOTA, id, &mut quota) {
            Ok(()) => Ok(ProjectQuota {
                bytes: quota.d_bcount.saturating_mul(BASIC_BLOCK),
                inodes: quota.d_icount,
                bytes_limit: quota.d_blk_hardlimit.saturating_mul(BASIC_BLOCK),
                inodes_limit: quota.d_ino_hardlimit,
            }),
            // XFS answers ENOENT for an id without a quota record.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(ProjectQuota::UNUSED),
            Err(e) => Err(e),
        }
    }

    fn quotactl(&self, command: u32, id: u32, quota: &mut DiskQuota) -> io::Result<()> {
        let cmd = (command << 8) | PRJQUOTA;
        // SAFETY: quotactl_fd with an open fd and a valid fs_disk_quota, which
        // the kernel reads (SETQLIM) or fills (GETQUOTA).
        let rc = unsafe {
            libc::syscall(libc::SYS_quotactl_fd, self.root.as_raw_fd(), cmd, id, std::ptr::from_mut(quota).cast::<u8>())
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// The project ids Loam's volumes hold on one root, and the choice of new
/// ones: bookkeeping only; what the filesystem says about an id comes from
/// the caller (through the [`Kernel`](crate::kernel::Kernel) seam).
#[derive(Debug, Default)]
pub struct ProjectIds {
    /// Ids held by volumes, and by creations in flight.
    taken: Mutex<BTreeSet<u32>>,
}

impl ProjectIds {
    /// Marks `id` as held (a volume loaded from its record).
    pub fn hold(&self, id: u32) {
        self.lock().insert(id);
    }

    /// Takes the lowest id from [`FIRST_PROJECT_ID`] that no volume holds and
    /// `quota_of` shows no usage or limit for (so another tool's projects are
    /// left alone).
    pub fn allocate(&self, quota_of: impl Fn(u32) -> io::Result<ProjectQuota>) -> io::Result<u32> {
        let mut taken = self.lock();
        let mut id = FIRST_PROJECT_ID;
        loop {
            if !taken.contains(&id) && quota_of(id)? == ProjectQuota::UNUSED {
                taken.insert(id);
                return Ok(id);
            }
            id = id.checked_add(1).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        }
    }

    /// Whether `id` is held by a volume or a creation in flight.
    pub fn holds(&self, id: u32) -> bool {
        self.lock().contains(&id)
    }

    /// Gives `id` back, once its limits are cleared.
    pub fn forget(&self, id: u32) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_structs_have_kernel_sizes() {
        assert_eq!(std::mem::size_of::<DiskQuota>(), 112);
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
    }
}
