//! btrfs subvolumes and qgroups through their ioctls (linux/btrfs.h).
//!
//! Subvolume calls are free functions: they work whether or not quotas are
//! on. Each enforced volume is a subvolume; btrfs gives every subvolume a level-0
//! qgroup `0/<subvolume id>` while quotas are enabled, and a limit on its
//! referenced bytes caps what the volume can hold. Usage is read back from
//! sysfs, where the kernel publishes every qgroup's counters.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{BTRFS_SUPER_MAGIC, statfs};

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
/// Inode number of every subvolume's root directory.
const FIRST_FREE_OBJECTID: u64 = 256;
/// `btrfs_ioctl_vol_args_v2.flags`: the new snapshot is read-only.
const SUBVOL_RDONLY: u64 = 1 << 1;
/// `btrfs_qgroup_limit.flags`: `max_rfer` is set.
const QGROUP_LIMIT_MAX_RFER: u64 = 1 << 0;
/// `btrfs_ioctl_quota_ctl_args.cmd`: turn quotas on.
const QUOTA_CTL_ENABLE: u64 = 1;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_vol_args_v2` (the name arm of its last union).
#[repr(C)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args` with its `btrfs_qgroup_limit`.
#[repr(C)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_fs_info_args`.
#[repr(C)]
#[allow(dead_code)] // Mirrors the kernel layout; Loam reads only a few fields.
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

nix::ioctl_write_ptr!(
    /// BTRFS_IOC_SUBVOL_CREATE: a subvolume in a directory.
    ioc_subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(
    /// BTRFS_IOC_SNAP_DESTROY: deletes a subvolume or snapshot.
    ioc_snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_readwrite!(
    /// BTRFS_IOC_INO_LOOKUP: the subvolume id of a directory.
    ioc_ino_lookup, BTRFS_IOCTL_MAGIC, 18, InoLookupArgs);
nix::ioctl_write_ptr!(
    /// BTRFS_IOC_SNAP_CREATE_V2: a snapshot of a subvolume.
    ioc_snap_create_v2, BTRFS_IOCTL_MAGIC, 23, VolArgsV2);
nix::ioctl_read!(
    /// BTRFS_IOC_FS_INFO: the filesystem id, to find its sysfs directory.
    ioc_fs_info, BTRFS_IOCTL_MAGIC, 31, FsInfoArgs);
nix::ioctl_readwrite!(
    /// BTRFS_IOC_QUOTA_CTL: turns quotas on.
    ioc_quota_ctl, BTRFS_IOCTL_MAGIC, 40, QuotaCtlArgs);
// The kernel header declares QGROUP_LIMIT as _IOR although it only reads.
nix::ioctl_read!(
    /// BTRFS_IOC_QGROUP_LIMIT: sets a qgroup's limits.
    ioc_qgroup_limit, BTRFS_IOCTL_MAGIC, 43, QgroupLimitArgs);

/// A btrfs filesystem with quotas enabled, found through one of its paths.
#[derive(Debug)]
pub struct Btrfs {
    /// `/sys/fs/btrfs/<fsid>/qgroups`, where qgroup counters are published.
    qgroups: PathBuf,
}

/// Why a btrfs root cannot enforce, or the handle when it can.
pub enum Probe {
    /// Quotas are on: limits can be set.
    Enforcing(Btrfs),
    /// Quotas are off and were not to be turned on.
    QuotaDisabled,
}

impl Btrfs {
    /// Inspects the btrfs filesystem holding `root`, enabling quotas first
    /// when they are off and `enable` allows it.
    pub fn probe(root: &Path, enable: bool) -> io::Result<Probe> {
        let dir = File::open(root)?;
        // SAFETY: FsInfoArgs holds only integers and byte arrays, for which
        // all-zero bytes are a valid value.
        let mut info: FsInfoArgs = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a correctly sized, writable FsInfoArgs.
        unsafe { ioc_fs_info(dir.as_raw_fd(), &mut info) }?;
        let qgroups = PathBuf::from(format!("/sys/fs/btrfs/{}/qgroups", uuid(&info.fsid)));
        if !qgroups.is_dir() {
            if !enable {
                return Ok(Probe::QuotaDisabled);
            }
            let mut args = QuotaCtlArgs { cmd: QUOTA_CTL_ENABLE, status: 0 };
            // SAFETY: `args` is a valid QuotaCtlArgs.
            unsafe { ioc_quota_ctl(dir.as_raw_fd(), &mut args) }?;
            tracing::info!(root = %root.display(), "enabled btrfs quotas (qgroups) on the root's filesystem");
        }
        Ok(Probe::Enforcing(Btrfs { qgroups }))
    }

    /// Caps the referenced bytes of qgroup `0/<id>`; `path` is any path on
    /// the filesystem.
    pub fn set_limit(&self, path: &Path, id: u64, bytes: u64) -> io::Result<()> {
        let dir = File::open(path)?;
        let mut args = QgroupLimitArgs {
            qgroupid: id,
            flags: QGROUP_LIMIT_MAX_RFER,
            max_rfer: bytes,
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        };
        // SAFETY: `args` is a valid QgroupLimitArgs.
        unsafe { ioc_qgroup_limit(dir.as_raw_fd(), &mut args) }?;
        Ok(())
    }

    /// Referenced bytes of qgroup `0/<id>` and its limit (`None` when unset),
    /// as of the last committed transaction.
    pub fn usage(&self, id: u64) -> io::Result<(u64, Option<u64>)> {
        let dir = self.qgroups.join(format!("0_{id}"));
        let referenced = read_u64(&dir.join("referenced"))?;
        let limit = read_u64(&dir.join("max_referenced"))?;
        Ok((referenced, (limit != 0 && limit != u64::MAX).then_some(limit)))
    }
}

/// Creates an empty subvolume at `path` (whose parent must exist).
pub fn create_subvolume(path: &Path) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let mut args = VolArgs { fd: 0, name: [0; 4088] };
    copy_name(&mut args.name, name)?;
    // SAFETY: `args` is a valid VolArgs with a NUL-terminated name.
    unsafe { ioc_subvol_create(parent.as_raw_fd(), &args) }?;
    Ok(())
}

/// Snapshots the subvolume `source` as `path`: instant, copy-on-write.
pub fn snapshot(source: &Path, path: &Path, read_only: bool) -> io::Result<()> {
    let source = File::open(source)?;
    let (parent, name) = split(path)?;
    let mut args =
        VolArgsV2 { fd: i64::from(source.as_raw_fd()), transid: 0, flags: 0, unused: [0; 4], name: [0; 4040] };
    if read_only {
        args.flags = SUBVOL_RDONLY;
    }
    copy_name(&mut args.name, name)?;
    // SAFETY: `args` is a valid VolArgsV2 naming an open subvolume fd.
    unsafe { ioc_snap_create_v2(parent.as_raw_fd(), &args) }?;
    Ok(())
}

/// Deletes the subvolume at `path` with everything in it, read-only
/// snapshots included.
pub fn delete_subvolume(path: &Path) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let mut args = VolArgs { fd: 0, name: [0; 4088] };
    copy_name(&mut args.name, name)?;
    // SAFETY: `args` is a valid VolArgs with a NUL-terminated name.
    unsafe { ioc_snap_destroy(parent.as_raw_fd(), &args) }?;
    Ok(())
}

/// The id of the subvolume whose root is `path` (also its qgroup's id).
pub fn subvolume_id(path: &Path) -> io::Result<u64> {
    let dir = File::open(path)?;
    let mut args = InoLookupArgs { treeid: 0, objectid: FIRST_FREE_OBJECTID, name: [0; 4080] };
    // SAFETY: `args` is a valid, writable InoLookupArgs.
    unsafe { ioc_ino_lookup(dir.as_raw_fd(), &mut args) }?;
    Ok(args.treeid)
}

/// Whether `path` is the root of a btrfs subvolume (not following links).
pub fn is_subvolume(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == FIRST_FREE_OBJECTID)
        && statfs(path).is_ok_and(|s| s.filesystem_type() == BTRFS_SUPER_MAGIC)
}

fn read_u64(path: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {text:?}", path.display())))
}

/// Opens the parent of `path` and returns it with the last component.
fn split(path: &Path) -> io::Result<(File, &OsStr)> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no parent", path.display())));
    };
    Ok((File::open(parent)?, name))
}

/// Copies `name` NUL-terminated into a fixed ioctl buffer.
fn copy_name(buf: &mut [u8], name: &OsStr) -> io::Result<()> {
    let name = CString::new(name.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Formats a filesystem id the way sysfs names it: lowercase, dashed UUID.
fn uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_structs_match_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(std::mem::size_of::<InoLookupArgs>(), 4096);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(std::mem::size_of::<FsInfoArgs>(), 1024);
    }

    #[test]
    fn fsid_is_formatted_like_sysfs() {
        let bytes = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(uuid(&bytes), "12345678-9abc-def0-0102-030405060708");
    }

    #[test]
    fn names_too_long_or_with_nul_are_refused() {
        let mut buf = [0u8; 8];
        assert_eq!(copy_name(&mut buf, OsStr::new("abcdefgh")).unwrap_err().raw_os_error(), Some(libc::ENAMETOOLONG));
        assert!(copy_name(&mut buf, OsStr::from_bytes(b"a\0b")).is_err());
        copy_name(&mut buf, OsStr::new("abc")).unwrap();
        assert_eq!(&buf[..4], b"abc\0");
    }
}
