//! A fresh filesystem with quotas as the driver's root: btrfs (default),
//! XFS or ext4 (`LOAM_QUOTA_FS`) on a loop device, unmounted and detached on
//! every exit; and writers that hit its limits as a pod would.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use loam::config::QuotaMode;

use super::Harness;

const MIB: u64 = 1 << 20;

/// The filesystem under test.
pub fn fs_kind() -> String {
    std::env::var("LOAM_QUOTA_FS").unwrap_or_else(|_| "btrfs".into())
}

/// A blank 512 MiB sparse image attached to a loop device; detached when
/// dropped.
struct LoopImage {
    _image_dir: tempfile::TempDir,
    device: String,
}

impl LoopImage {
    fn new() -> LoopImage {
        let image_dir = tempfile::tempdir().expect("tempdir");
        let image = image_dir.path().join("fs.img");
        // mkfs.xfs refuses filesystems under 300 MB; sparse, so it costs nothing.
        File::create(&image).and_then(|f| f.set_len(512 * MIB)).expect("image");
        let out = Command::new("losetup").args(["--find", "--show"]).arg(&image).output().expect("losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
        LoopImage { _image_dir: image_dir, device }
    }
}

impl Drop for LoopImage {
    fn drop(&mut self) {
        // A device still in use is detached by the kernel once released.
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A fresh filesystem on a loop device, mounted at `mount`; unmounted and
/// detached when dropped.
pub struct TestFs {
    image: LoopImage,
    mount: PathBuf,
}

impl TestFs {
    /// Makes the filesystem (`fs_kind`), attaches and mounts it at `mount`.
    pub fn new(mount: &Path) -> TestFs {
        let kind = fs_kind();
        let (mkfs, options): (&[&str], &str) = match kind.as_str() {
            "btrfs" => (&["mkfs.btrfs", "-q", "-f"], ""),
            "xfs" => (&["mkfs.xfs", "-q", "-f"], "prjquota"),
            "ext4" => (&["mkfs.ext4", "-q", "-F", "-O", "project,quota"], "prjquota"),
            other => panic!("LOAM_QUOTA_FS={other}: use btrfs, xfs or ext4"),
        };
        let fs = TestFs::blank(mount);
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(fs.device()));
        fs::create_dir_all(mount).expect("mount point");
        nix::mount::mount(
            Some(fs.image.device.as_str()),
            mount,
            Some(kind.as_str()),
            nix::mount::MsFlags::empty(),
            Some(options),
        )
        .expect("mount test filesystem");
        fs
    }

    /// A blank loop device for a filesystem to be made on it and mounted at
    /// `mount` by someone else; from here on, Drop unmounts and detaches
    /// whatever happens.
    pub fn blank(mount: &Path) -> TestFs {
        TestFs { image: LoopImage::new(), mount: mount.to_owned() }
    }

    /// The loop device, `/dev/loopN`.
    pub fn device(&self) -> &str {
        &self.image.device
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        // The device is detached after this, when `image` drops.
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A harness whose root is a fresh test filesystem; the filesystem outlives
/// the harness (locals drop in reverse order).
pub async fn start() -> (TestFs, Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = TestFs::new(&dir.path().canonicalize().expect("canonical").join("root"));
    let harness = Harness::start_with_quota(dir, QuotaMode::Required).await;
    (fs, harness)
}

/// Writes `bytes` to a new file at `path` in 1 MiB chunks, from a thread
/// without CAP_SYS_RESOURCE (as a pod's process: ext4 lets that capability
/// exceed hard limits). Returns what was written and the error that stopped it.
pub fn write_unprivileged(path: &Path, bytes: u64) -> (u64, Option<io::Error>) {
    let path = path.to_owned();
    std::thread::spawn(move || {
        drop_sys_resource();
        let mut file = match File::create(&path) {
            Ok(f) => f,
            Err(e) => return (0, Some(e)),
        };
        let chunk = vec![0x5au8; 1 << 20];
        let mut written = 0;
        while written < bytes {
            match file.write(&chunk[..(bytes - written).min(MIB) as usize]) {
                Ok(n) => written += n as u64,
                Err(e) => return (written, Some(e)),
            }
        }
        (written, file.sync_all().err())
    })
    .join()
    .expect("writer thread")
}

/// Drops CAP_SYS_RESOURCE from this thread's effective set (capabilities
/// are per thread, so the test process keeps it).
fn drop_sys_resource() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_SYS_RESOURCE: u32 = 24;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words, as documented.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()), 0, "capget");
        data[0].effective &= !(1 << CAP_SYS_RESOURCE);
        assert_eq!(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()), 0, "capset");
    }
}

pub fn is_over_quota(err: &Option<io::Error>) -> bool {
    // XFS reports ENOSPC, ext4 and btrfs EDQUOT.
    err.as_ref().and_then(io::Error::raw_os_error).is_some_and(|e| e == libc::EDQUOT || e == libc::ENOSPC)
}

/// Commits the filesystem so btrfs qgroup counters are current.
pub fn sync(path: &Path) {
    let dir = File::open(path).expect("open");
    // SAFETY: syncfs on an open fd.
    assert_eq!(unsafe { libc::syncfs(dir.as_raw_fd()) }, 0, "syncfs");
}
