//! Filesystems on block devices: probing signatures, mkfs, growing, mounting,
//! freezing, and the thick allocation of image files.
//!
//! The only programs run are mkfs.ext4, mkfs.xfs, resize2fs and xfs_growfs;
//! everything else goes straight to the kernel.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, OFlag, fallocate, open};
use nix::sys::stat::Mode;

use super::mkfs_options::MkfsOptions;
use super::mount::MountFlags;

/// How much of a device `probe` reads: signatures and "is it blank".
const PROBE_LEN: usize = 1 << 20;

/// Longest stderr kept in an error, so a chatty tool cannot flood logs.
const MAX_STDERR: usize = 4096;

/// A filesystem Loam can create; stored by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// Parses a CSI fsType: `ext4` or `xfs`.
    pub fn parse(name: &str) -> Option<FsType> {
        match name {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    /// The kernel's (and CSI's) name for it.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// What a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The first MiB is all zeroes and carries no signature: safe to format.
    Empty,
    /// A known signature, e.g. "ext4", "xfs", "btrfs", "swap", "crypto_LUKS".
    Filesystem(String),
    /// Data without a known signature: never format this.
    Unknown,
}

/// Reads superblock signatures from `device` (or any readable file); Empty only if the first MiB is all zeroes.
pub fn probe(device: &Path) -> io::Result<Content> {
    let file = File::open(device).map_err(|e| context(e, "open", device))?;
    let mut head = vec![0u8; PROBE_LEN];
    let mut filled = 0;
    // A short device or file just has less to look at.
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(context(err, "read", device)),
        }
    }
    head.truncate(filled);
    Ok(classify(&head))
}

/// Names the signature in `head` (the start of a device), if any.
fn classify(head: &[u8]) -> Content {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"LUKS\xba\xbe") {
        return Content::Filesystem("crypto_LUKS".to_string());
    }
    if at(0, b"XFSB") {
        return Content::Filesystem("xfs".to_string());
    }
    if let Some(name) = ext_flavour(head) {
        return Content::Filesystem(name.to_string());
    }
    if at(65536 + 64, b"_BHRfS_M") {
        return Content::Filesystem("btrfs".to_string());
    }
    // Swap's signature ends its first page, whatever the page size was.
    for page in [4096, 8192, 16384, 32768, 65536] {
        if at(page - 10, b"SWAPSPACE2") || at(page - 10, b"SWAP-SPACE") {
            return Content::Filesystem("swap".to_string());
        }
    }
    if head.iter().all(|&b| b == 0) { Content::Empty } else { Content::Unknown }
}

/// ext2, ext3, ext4 or an external journal ("jbd"), from the superblock at 1024.
fn ext_flavour(head: &[u8]) -> Option<&'static str> {
    const SB: usize = 1024;
    let le16 = |offset: usize| head.get(SB + offset..SB + offset + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let le32 =
        |offset: usize| head.get(SB + offset..SB + offset + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if le16(56)? != 0xEF53 {
        return None;
    }
    let (compat, incompat, ro_compat) = (le32(0x5C)?, le32(0x60)?, le32(0x64)?);
    // Feature bits as blkid reads them: anything beyond what ext3 knows
    // (extents, 64bit, flex_bg, huge_file, metadata_csum, ...) means ext4.
    const COMPAT_HAS_JOURNAL: u32 = 0x4;
    const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
    const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | 0x10; // filetype, recover, meta_bg
    const EXT3_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4; // sparse_super, large_file, btree_dir
    Some(if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        "jbd"
    } else if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    })
}

/// Formats `device` with `fs`, never discarding, with the volume's `options`.
///
/// With `thick`, ext4's inode tables are zeroed now rather than by the
/// kernel after the first mount: the kernel zeroes them with write-zeroes
/// requests, which a loop device turns into holes punched in its image, so a
/// thick image would lose part of its allocation (mke2fs zeroes keeping it).
/// The error names the program, its exit status and its stderr.
pub fn mkfs(device: &Path, fs: FsType, thick: bool, options: &MkfsOptions) -> io::Result<()> {
    let mut args: Vec<String> = Vec::new();
    match fs {
        FsType::Ext4 => {
            // mke2fs keeps only the last -E, so the volume's extended options
            // are merged into ours rather than allowed to drop nodiscard.
            let mut extended = vec!["nodiscard".to_owned()];
            extended.extend(options.ext4_extended());
            if thick {
                // Last, so no option turns lazy initialisation back on.
                extended.push("lazy_itable_init=0".to_owned());
            }
            args.extend(["-F", "-m", "0", "-E"].map(String::from));
            args.push(extended.join(","));
            args.extend(options.words_without_extended());
        }
        FsType::Xfs => {
            args.extend(["-f", "-K"].map(String::from));
            args.extend(options.words());
        }
    }
    let program = match fs {
        FsType::Ext4 => "mkfs.ext4",
        FsType::Xfs => "mkfs.xfs",
    };
    let mut command = tool(program);
    command.args(&args).arg(device);
    run(command, program)
}

/// Whether this process may grow a mounted `fs`: the kernel's ext4 online
/// resize (EXT4_IOC_RESIZE_FS) demands CAP_SYS_RESOURCE besides
/// CAP_SYS_ADMIN; xfs growth needs only the latter.
pub fn can_grow_online(fs: FsType) -> io::Result<bool> {
    const CAP_SYS_RESOURCE: u32 = 24;
    match fs {
        FsType::Xfs => Ok(true),
        FsType::Ext4 => effective_capabilities().map(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0),
    }
}

/// The effective capability set of this process, from /proc/self/status.
fn effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("/proc/self/status has no readable CapEff line"))
}

/// Grows the filesystem on `device`, mounted at `mount_point`, to fill the
/// device (see [`can_grow_online`] for what ext4 needs).
pub fn grow(fs: FsType, device: &Path, mount_point: &Path) -> io::Result<()> {
    let (program, target) = match fs {
        FsType::Ext4 => ("resize2fs", device),
        // xfs_growfs works on the mounted filesystem, not the device.
        FsType::Xfs => ("xfs_growfs", mount_point),
    };
    let mut command = tool(program);
    command.arg(target);
    run(command, program)
}

/// The size an ext2/3/4 superblock on `device` gives its filesystem, or
/// `None` when the device holds no ext superblock.
pub fn ext_size(device: &Path) -> io::Result<Option<u64>> {
    let file = File::open(device).map_err(|e| context(e, "open", device))?;
    let mut sb = [0u8; 1024];
    file.read_exact_at(&mut sb, 1024).map_err(|e| context(e, "read", device))?;
    let le32 = |offset: usize| u32::from_le_bytes([sb[offset], sb[offset + 1], sb[offset + 2], sb[offset + 3]]);
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        return Ok(None);
    }
    const INCOMPAT_64BIT: u32 = 0x80;
    let high = if le32(0x60) & INCOMPAT_64BIT != 0 { u64::from(le32(0x150)) << 32 } else { 0 };
    let blocks = high | u64::from(le32(0x4));
    let block_size = 1024u64 << le32(0x18).min(16);
    Ok(Some(blocks * block_size))
}

/// Grows the unmounted ext4 filesystem on `device` to fill it: `e2fsck -f -p`
/// first (resize2fs refuses a filesystem not freshly checked), then
/// `resize2fs`. Unlike an online resize, this needs no CAP_SYS_RESOURCE.
///
/// An offline resize cut short (the driver killed with its children) can
/// leave a filesystem that `e2fsck -p` calls inconsistent, so the file
/// `intent` is made (durably) before it and removed after; a call that
/// finds it repairs the filesystem with `e2fsck -f -y` first, which for a
/// growth cut short only touches the metadata resize2fs was writing.
/// (`resize2fs -z`, whose undo file would roll it back, leaves an invalid
/// resize inode in e2fsprogs 1.47.)
pub fn grow_ext4_offline(device: &Path, intent: &Path) -> io::Result<()> {
    let interrupted = std::fs::symlink_metadata(intent).is_ok();
    if interrupted {
        tracing::warn!(device = %device.display(), "repairing a filesystem whose offline resize was cut short");
        e2fsck(device, "-y")?;
    }
    match ext_size(device)? {
        Some(size) if size < super::loopdev::device_size(device)? => {}
        _ if interrupted => return crate::durable::remove(intent),
        _ => return Ok(()),
    }
    if !interrupted {
        File::create(intent)?.sync_all()?;
        crate::durable::sync_dir(intent.parent().unwrap_or(Path::new("/")))?;
    }
    e2fsck(device, "-p")?;
    let mut command = tool("resize2fs");
    command.arg(device);
    run(command, "resize2fs")?;
    crate::failpoint!("ext4.resized");
    crate::durable::remove(intent)
}

/// Runs `e2fsck -f` with `mode` (`-p`: only safe fixes; `-y`: every fix).
fn e2fsck(device: &Path, mode: &str) -> io::Result<()> {
    let output = tool("e2fsck")
        .args(["-f", mode])
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running e2fsck: {e}")))?;
    // 0: clean; 1: errors corrected. Anything else needs an operator.
    if !matches!(output.status.code(), Some(0 | 1)) {
        return Err(io::Error::other(format!(
            "e2fsck -f {mode} {} failed ({}): {}{}; repair the filesystem by hand",
            device.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Mounts `device`, holding a `fs` filesystem, on `target` with `flags`.
pub fn mount(device: &Path, target: &Path, fs: FsType, flags: MountFlags) -> io::Result<()> {
    let ms = flags.ms_flags();
    // A clone or restored snapshot of an XFS volume carries the original's
    // UUID; without nouuid the two could not be mounted on one node.
    let data = match fs {
        FsType::Ext4 => None,
        FsType::Xfs => Some("nouuid"),
    };
    nix::mount::mount(Some(device), target, Some(fs.name()), ms, data).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("mount {} ({}) on {}: {e}", device.display(), fs.name(), target.display()),
        )
    })
}

mod ioctl {
    // FIFREEZE and FITHAW are _IOWR('X', 119/120, int); the int is ignored.
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
}

/// Freezes the filesystem mounted at `mount_point` until [`thaw`]: the
/// freeze belongs to the filesystem, not to this process, so it outlives
/// the call (and the process). A frozen filesystem is refused (EBUSY).
///
/// `mount_point` must be the root of a mount, so a wrong path can never
/// freeze the filesystem it happens to live on (such as the node's root).
pub fn freeze(mount_point: &Path) -> io::Result<()> {
    let fd = open_mount_root(mount_point, "freeze")?;
    let mut unused = 0;
    // SAFETY: FIFREEZE ignores its argument; unused is a valid int.
    unsafe { ioctl::fifreeze(fd.as_raw_fd(), &mut unused) }.map_err(|e| context(e.into(), "FIFREEZE", mount_point))?;
    Ok(())
}

/// Thaws the filesystem mounted at `mount_point` if it is frozen: what a
/// process killed between freeze and thaw leaves, since a freeze outlives
/// the process that made it. Returns whether it was frozen.
pub fn thaw(mount_point: &Path) -> io::Result<bool> {
    let fd = open_mount_root(mount_point, "thaw")?;
    let mut unused = 0;
    // SAFETY: FITHAW ignores its argument; unused is a valid int.
    match unsafe { ioctl::fithaw(fd.as_raw_fd(), &mut unused) } {
        Ok(_) => Ok(true),
        // The kernel's answer for a filesystem that is not frozen.
        Err(Errno::EINVAL) => Ok(false),
        Err(e) => Err(context(e.into(), "FITHAW", mount_point)),
    }
}

/// Opens `mount_point`, refusing anything that is not the root of a mount,
/// so a wrong path never reaches the filesystem it lives on.
fn open_mount_root(mount_point: &Path, action: &str) -> io::Result<OwnedFd> {
    let fd = open(mount_point, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| context(e.into(), "open", mount_point))?;
    // SAFETY: statx is plain old data, so all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the path is a valid C string, stx is writable.
    let rc = unsafe { libc::statx(fd.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, 0, &mut stx) };
    if rc != 0 {
        return Err(context(io::Error::last_os_error(), "statx", mount_point));
    }
    let mount_root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & mount_root == 0 || stx.stx_attributes & mount_root == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to {action} {}: it is not the root of a mount", mount_point.display()),
        ));
    }
    Ok(fd)
}

/// Allocates the first `len` bytes of `file` for real, growing it if shorter, so a thick image never runs out of space later.
pub fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    match fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "fallocate is not supported by this filesystem; thick images need it",
        )),
        Err(e) => Err(io::Error::new(io::Error::from(e).kind(), format!("fallocate {len} bytes: {e}"))),
    }
}

/// Bytes actually allocated to `path` on disk.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    // st_blocks is in 512-byte units whatever the filesystem's block size.
    Ok(std::fs::metadata(path).map_err(|e| context(e, "stat", path))?.blocks() * 512)
}

/// A command running `program` that dies with the driver: an orphaned mkfs
/// or resize2fs would go on writing an image that the restarted driver
/// formats or resizes again.
fn tool(program: &str) -> Command {
    let mut command = Command::new(program);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Runs `command` to completion; a failure carries the program, its status and stderr.
fn run(mut command: Command, program: &str) -> io::Result<()> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running {program}: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push_str("...");
    }
    Err(io::Error::other(format!("{shown} failed ({}): {stderr}", output.status)))
}

fn context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::loopdev::tests::{Attached, Mounted, scratch_dir, thick_image};
    use crate::kernel::loopdev::{self, AttachOptions};
    use nix::sys::statvfs::statvfs;

    /// Fails the test, saying what to install, when a filesystem tool is
    /// missing (scripts/test.sh installs them).
    fn need(program: &str) {
        let found = Command::new(program).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(found, "{program} is not installed: install e2fsprogs and xfsprogs (scripts/test.sh does)");
    }

    #[test]
    fn fs_type_names_round_trip() {
        for fs in [FsType::Ext4, FsType::Xfs] {
            assert_eq!(FsType::parse(fs.name()), Some(fs));
        }
        for other in ["", "EXT4", "ext3", "btrfs", "xfs "] {
            assert_eq!(FsType::parse(other), None, "{other:?}");
        }
    }

    fn probe_bytes(bytes: &[(usize, &[u8])], len: usize) -> Content {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        file.as_file().set_len(len as u64).expect("set_len");
        for (offset, data) in bytes {
            file.as_file().write_all_at(data, *offset as u64).expect("write");
        }
        probe(file.path()).expect("probe")
    }

    fn ext_superblock(compat: u32, incompat: u32, ro_compat: u32) -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x5C..0x60].copy_from_slice(&compat.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        sb[0x64..0x68].copy_from_slice(&ro_compat.to_le_bytes());
        sb
    }

    #[test]
    fn probes_signatures_zeroes_and_junk() {
        let fs = |name: &str| Content::Filesystem(name.to_string());
        assert_eq!(probe_bytes(&[], 4 << 20), Content::Empty);
        assert_eq!(probe_bytes(&[], 0), Content::Empty);
        assert_eq!(probe_bytes(&[], 1000), Content::Empty);
        // Data past the first MiB is not looked at; data inside it is.
        assert_eq!(probe_bytes(&[(1 << 20, b"x")], 2 << 20), Content::Empty);
        assert_eq!(probe_bytes(&[((1 << 20) - 1, b"x")], 2 << 20), Content::Unknown);
        assert_eq!(probe_bytes(&[(0, b"hello")], 4096), Content::Unknown);

        assert_eq!(probe_bytes(&[(0, b"XFSB")], 1 << 20), fs("xfs"));
        assert_eq!(probe_bytes(&[(0, b"LUKS\xba\xbe")], 1 << 20), fs("crypto_LUKS"));
        assert_eq!(probe_bytes(&[(65536 + 64, b"_BHRfS_M")], 1 << 20), fs("btrfs"));
        assert_eq!(probe_bytes(&[(4096 - 10, b"SWAPSPACE2")], 1 << 20), fs("swap"));
        assert_eq!(probe_bytes(&[(65536 - 10, b"SWAP-SPACE")], 1 << 20), fs("swap"));
        // A signature cut off by the end of the file is no signature.
        assert_eq!(probe_bytes(&[(0, b"XFS")], 3), Content::Unknown);

        let ext = |c, i, r| probe_bytes(&[(1024, &ext_superblock(c, i, r))], 1 << 20);
        assert_eq!(ext(0, 0x2, 0x3), fs("ext2"));
        assert_eq!(ext(0x4, 0x2, 0x3), fs("ext3"));
        assert_eq!(ext(0x4, 0x2 | 0x40 | 0x80 | 0x200, 0x3 | 0x400), fs("ext4"));
        // ext4 without a journal is still ext4.
        assert_eq!(ext(0, 0x2 | 0x40, 0x3), fs("ext4"));
        assert_eq!(ext(0, 0x8, 0), fs("jbd"));
    }

    #[test]
    fn allocate_makes_files_thick() {
        let dir = scratch_dir();
        let path = dir.path().join("thick.img");
        let file = File::create(&path).expect("create");
        file.set_len(16 << 20).expect("sparse length");
        assert!(allocated_bytes(&path).expect("allocated") < 1 << 20);
        allocate(&file, 16 << 20).expect("allocate");
        assert!(allocated_bytes(&path).expect("allocated") >= 16 << 20);
        // Growing allocates the new tail too and extends the file.
        allocate(&file, 24 << 20).expect("grow");
        assert_eq!(file.metadata().expect("stat").len(), 24 << 20);
        assert!(allocated_bytes(&path).expect("allocated") >= 24 << 20);
        let err = allocated_bytes(&dir.path().join("missing")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// mkfs works on a plain file too, so nodiscard is checked without root.
    #[test]
    fn mkfs_ext4_on_a_thick_file_keeps_it_allocated() {
        need("mkfs.ext4");
        let dir = scratch_dir();
        let path = dir.path().join("fs.img");
        thick_image(&path, 32 << 20);
        assert_eq!(probe(&path).expect("probe"), Content::Empty);
        let options = MkfsOptions::parse(FsType::Ext4, "-E lazy_itable_init=1 -L loam").expect("options");
        mkfs(&path, FsType::Ext4, true, &options).expect("mkfs");
        assert_eq!(probe(&path).expect("probe"), Content::Filesystem("ext4".to_string()));
        let allocated = allocated_bytes(&path).expect("allocated");
        eprintln!("after mkfs.ext4: {allocated} of {} bytes allocated", 32 << 20);
        assert!(allocated >= 32 << 20, "{allocated}");
        // Nothing left for the kernel to zero after mounting, which on a loop
        // device would punch holes in the image.
        assert_eq!(groups_not_zeroed(&path), 0, "a thick image leaves inode tables to the kernel");
        mkfs(&path, FsType::Ext4, false, &MkfsOptions::none(FsType::Ext4)).expect("mkfs thin");
        assert!(groups_not_zeroed(&path) > 0, "a thin image should leave them (and its holes) to the kernel");
    }

    /// How many block groups' inode tables `dumpe2fs` shows as not zeroed.
    fn groups_not_zeroed(image: &Path) -> usize {
        let out = Command::new("dumpe2fs").arg(image).output().expect("dumpe2fs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let groups = text.lines().filter(|l| l.starts_with("Group ") && l.contains("(Blocks")).collect::<Vec<_>>();
        assert!(!groups.is_empty(), "dumpe2fs listed no groups");
        groups.iter().filter(|l| !l.contains("ITABLE_ZEROED")).count()
    }

    #[test]
    fn mkfs_failure_reports_program_status_and_stderr() {
        need("mkfs.xfs");
        let dir = scratch_dir();
        let path = dir.path().join("small.img");
        thick_image(&path, 16 << 20);
        // mkfs.xfs refuses filesystems this small.
        let err = mkfs(&path, FsType::Xfs, true, &MkfsOptions::none(FsType::Xfs)).expect_err("too small");
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains("mkfs.xfs") && text.contains("exit status"), "{text}");
        assert!(text.len() > text.find("):").expect("stderr follows") + 3, "stderr missing: {text}");

        let err = run(Command::new("loam-no-such-program"), "loam-no-such-program").expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn freeze_refuses_a_directory_that_is_not_a_mount() {
        let dir = scratch_dir();
        let err = freeze(dir.path()).expect_err("not a mount root");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    fn fs_size(path: &Path) -> u64 {
        let st = statvfs(path).expect("statvfs");
        st.blocks() as u64 * st.fragment_size() as u64
    }

    #[ignore = "needs root: real loop devices in a private mount namespace; scripts/test.sh runs it"]
    #[test]
    fn ext4_on_a_thick_direct_io_loop_device() {
        let dir = scratch_dir();
        let image = dir.path().join("vol.img");
        thick_image(&image, 64 << 20);
        let dev = loopdev::attach(&image, AttachOptions { read_only: false, direct_io: true }).expect("attach");
        let _guard = Attached(dev.device.clone());
        eprintln!("attached {dev:?}");

        assert_eq!(probe(&dev.device).expect("probe"), Content::Empty);
        mkfs(&dev.device, FsType::Ext4, true, &MkfsOptions::none(FsType::Ext4)).expect("mkfs");
        assert_eq!(probe(&dev.device).expect("probe"), Content::Filesystem("ext4".to_string()));
        let allocated = allocated_bytes(&image).expect("allocated");
        eprintln!("after mkfs.ext4 through the loop device: {allocated} of {} bytes allocated", 64 << 20);
        assert!(allocated >= 64 << 20, "mkfs discarded the thick image: {allocated}");

        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let _mounted = Mounted(mnt.clone());
        let flags = MountFlags { noatime: true, nodev: true, ..MountFlags::default() };
        mount(&dev.device, &mnt, FsType::Ext4, flags).expect("mount");
        std::fs::write(mnt.join("hello"), b"hi").expect("write");

        freeze(&mnt).expect("freeze");
        let again = freeze(&mnt).expect_err("already frozen");
        assert_eq!(again.kind(), io::ErrorKind::ResourceBusy, "{again}");
        // A freeze outlives the call that made it (as a killed driver's
        // does); thaw lifts it, and says when there was nothing to lift.
        assert!(thaw(&mnt).expect("thaw a frozen filesystem"));
        std::fs::write(mnt.join("after"), b"thawed").expect("write after thaw");
        assert!(!thaw(&mnt).expect("thaw a thawed filesystem"));
        std::fs::write(mnt.join("after-thaw"), b"thawed").expect("write after a lost freeze");
        assert!(freeze(&mnt.join("lost+found")).is_err());

        let before = fs_size(&mnt);
        let file = std::fs::OpenOptions::new().write(true).open(&image).expect("open image");
        allocate(&file, 128 << 20).expect("allocate more");
        loopdev::refresh_capacity(&dev.device).expect("refresh");
        assert_eq!(loopdev::device_size(&dev.device).expect("size"), 128 << 20);
        if !can_grow_online(FsType::Ext4).expect("capabilities") {
            // The kernel refuses online ext4 resize without CAP_SYS_RESOURCE.
            let err = grow(FsType::Ext4, &dev.device, &mnt).expect_err("resize without CAP_SYS_RESOURCE");
            eprintln!("no CAP_SYS_RESOURCE here, online ext4 grow not checked: {err}");
            assert!(err.to_string().contains("resize2fs") && err.to_string().contains("Permission denied"), "{err}");
            return;
        }
        grow(FsType::Ext4, &dev.device, &mnt).expect("resize2fs");
        let after = fs_size(&mnt);
        eprintln!("ext4 grew from {before} to {after} bytes");
        assert!(after > before + (56 << 20), "{before} -> {after}");
        assert_eq!(std::fs::read(mnt.join("hello")).expect("read"), b"hi");
        assert!(allocated_bytes(&image).expect("allocated") >= 128 << 20);
    }

    #[ignore = "needs root: real loop devices in a private mount namespace; scripts/test.sh runs it"]
    #[test]
    fn xfs_on_a_sparse_loop_device() {
        let dir = scratch_dir();
        let image = dir.path().join("xfs.img");
        File::create(&image).expect("create").set_len(512 << 20).expect("sparse");
        let dev = loopdev::attach(&image, AttachOptions { read_only: false, direct_io: true }).expect("attach");
        let _guard = Attached(dev.device.clone());

        let options = MkfsOptions::parse(FsType::Xfs, "-m reflink=1").expect("options");
        mkfs(&dev.device, FsType::Xfs, false, &options).expect("mkfs.xfs");
        assert_eq!(probe(&dev.device).expect("probe"), Content::Filesystem("xfs".to_string()));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let _mounted = Mounted(mnt.clone());
        mount(&dev.device, &mnt, FsType::Xfs, MountFlags::default()).expect("mount");
        std::fs::write(mnt.join("hello"), b"hi").expect("write");
        freeze(&mnt).expect("freeze");
        assert!(thaw(&mnt).expect("thaw"));

        let before = fs_size(&mnt);
        std::fs::OpenOptions::new().write(true).open(&image).expect("open").set_len(768 << 20).expect("grow");
        loopdev::refresh_capacity(&dev.device).expect("refresh");
        assert_eq!(loopdev::device_size(&dev.device).expect("size"), 768 << 20);
        grow(FsType::Xfs, &dev.device, &mnt).expect("xfs_growfs");
        let after = fs_size(&mnt);
        eprintln!("xfs grew from {before} to {after} bytes");
        assert!(after > before + (200 << 20), "{before} -> {after}");
    }

    #[ignore = "needs root: real loop devices in a private mount namespace; scripts/test.sh runs it"]
    #[test]
    fn read_only_mount_of_a_read_only_device() {
        let dir = scratch_dir();
        let image = dir.path().join("ro.img");
        thick_image(&image, 32 << 20);
        mkfs(&image, FsType::Ext4, true, &MkfsOptions::none(FsType::Ext4)).expect("mkfs");
        let dev = loopdev::attach(&image, AttachOptions { read_only: true, direct_io: false }).expect("attach");
        let _guard = Attached(dev.device.clone());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let _mounted = Mounted(mnt.clone());
        // A writable mount of a read-only device is refused, not silently ro.
        let err = mount(&dev.device, &mnt, FsType::Ext4, MountFlags::default()).expect_err("rw mount");
        eprintln!("rw mount of ro device: {err}");
        let ro = MountFlags { read_only: true, ..MountFlags::default() };
        mount(&dev.device, &mnt, FsType::Ext4, ro).expect("mount ro");
        assert_eq!(std::fs::read_dir(&mnt).expect("readdir").count(), 1, "lost+found");
        let err = std::fs::write(mnt.join("x"), b"x").expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    }
}
