//! Bind mounts with per-mount flags and unmounts, through nix; the
//! [`Kernel`](super::Kernel) seam is how the rest of Loam reaches them.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{SFlag, fstat};
use nix::sys::statvfs::{FsFlags, fstatvfs};

use super::nofollow;

/// Longest flag word accepted; real flags are short, so anything longer is junk.
const MAX_FLAG_LEN: usize = 64;

/// Every flag word `MountFlags::parse` accepts, for error messages.
const ACCEPTED_FLAGS: &str = "ro, rw, nosuid, suid, nodev, dev, noexec, exec, noatime, atime, \
     nodiratime, diratime, relatime, norelatime, strictatime, bind, rbind, defaults";

/// Per-mount flags a bind mount can be given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// Mount read-only.
    pub read_only: bool,
    /// Ignore set-user-id and set-group-id bits.
    pub nosuid: bool,
    /// Do not interpret device nodes.
    pub nodev: bool,
    /// Do not allow executing programs.
    pub noexec: bool,
    /// Do not update access times.
    pub noatime: bool,
    /// Do not update directory access times.
    pub nodiratime: bool,
    /// Update access times only relative to modify/change times.
    pub relatime: bool,
    /// Always update access times.
    pub strictatime: bool,
}

impl MountFlags {
    /// Parses CSI mount flags such as `["ro", "noexec"]`; unknown words are an error.
    pub fn parse(flags: &[String]) -> Result<MountFlags, String> {
        let mut parsed = MountFlags::default();
        for flag in flags {
            if flag.is_empty() || flag.len() > MAX_FLAG_LEN || flag.contains('=') || flag.contains('\0') {
                return Err(format!(
                    "invalid mount flag {}: only plain flag words are accepted ({ACCEPTED_FLAGS})",
                    crate::error::quote(flag)
                ));
            }
            match flag.as_str() {
                "ro" => parsed.read_only = true,
                "rw" => parsed.read_only = false,
                "nosuid" => parsed.nosuid = true,
                "suid" => parsed.nosuid = false,
                "nodev" => parsed.nodev = true,
                "dev" => parsed.nodev = false,
                "noexec" => parsed.noexec = true,
                "exec" => parsed.noexec = false,
                "noatime" => parsed.noatime = true,
                "atime" => parsed.noatime = false,
                "nodiratime" => parsed.nodiratime = true,
                "diratime" => parsed.nodiratime = false,
                "relatime" => parsed.relatime = true,
                "norelatime" => parsed.relatime = false,
                "strictatime" => parsed.strictatime = true,
                // Every Loam mount is a bind mount already, and defaults
                // means "no extra flags".
                "bind" | "rbind" | "defaults" => {}
                other => {
                    return Err(format!("unknown mount flag {other:?}; accepted flags: {ACCEPTED_FLAGS}"));
                }
            }
        }
        Ok(parsed)
    }

    /// True when no flag is set, so a bind needs no remount.
    pub fn is_default(&self) -> bool {
        *self == MountFlags::default()
    }

    /// The flags as mount(2) takes them.
    pub(crate) fn ms_flags(&self) -> MsFlags {
        let mut ms = MsFlags::empty();
        for (set, flag) in [
            (self.read_only, MsFlags::MS_RDONLY),
            (self.nosuid, MsFlags::MS_NOSUID),
            (self.nodev, MsFlags::MS_NODEV),
            (self.noexec, MsFlags::MS_NOEXEC),
            (self.noatime, MsFlags::MS_NOATIME),
            (self.nodiratime, MsFlags::MS_NODIRATIME),
            (self.relatime, MsFlags::MS_RELATIME),
            (self.strictatime, MsFlags::MS_STRICTATIME),
        ] {
            if set {
                ms |= flag;
            }
        }
        ms
    }
}

impl MountFlags {
    /// The flags as mount_setattr(2) takes them: the attributes to set and
    /// to clear. Attributes not asked for are left as the source mount has
    /// them; an atime mode asked for replaces the source's.
    fn mount_attr(&self) -> (u64, u64) {
        let mut set = 0;
        for (wanted, attr) in [
            (self.read_only, libc::MOUNT_ATTR_RDONLY),
            (self.nosuid, libc::MOUNT_ATTR_NOSUID),
            (self.nodev, libc::MOUNT_ATTR_NODEV),
            (self.noexec, libc::MOUNT_ATTR_NOEXEC),
            (self.nodiratime, libc::MOUNT_ATTR_NODIRATIME),
        ] {
            if wanted {
                set |= attr;
            }
        }
        // The atime mode is one field; as mount(8) reads it, the strongest
        // word given wins.
        let atime = if self.strictatime {
            Some(libc::MOUNT_ATTR_STRICTATIME)
        } else if self.noatime {
            Some(libc::MOUNT_ATTR_NOATIME)
        } else if self.relatime {
            Some(libc::MOUNT_ATTR_RELATIME)
        } else {
            None
        };
        match atime {
            Some(mode) => (set | mode, libc::MOUNT_ATTR__ATIME),
            None => (set, 0),
        }
    }
}

/// Renders the flags as a mount option string, e.g. `ro,noexec` or `rw`.
impl fmt::Display for MountFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.read_only { "ro" } else { "rw" })?;
        for (set, name) in [
            (self.nosuid, "nosuid"),
            (self.nodev, "nodev"),
            (self.noexec, "noexec"),
            (self.noatime, "noatime"),
            (self.nodiratime, "nodiratime"),
            (self.relatime, "relatime"),
            (self.strictatime, "strictatime"),
        ] {
            if set {
                write!(f, ",{name}")?;
            }
        }
        Ok(())
    }
}

/// Extra tries of an unmount that fails with EBUSY, and the pause between.
const UNMOUNT_BUSY_RETRIES: usize = 10;
const UNMOUNT_BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

fn unmount_outcome(result: nix::Result<()>, target: &Path) -> io::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(false),
        Err(e) => Err(with_context(e, "unmount", target)),
    }
}

/// Bind-mounts existing `source` onto existing `target` of the same kind, then applies `flags`.
///
/// No component of either path may be a symlink (an `InvalidInput`
/// error). If applying the flags fails the bind is undone first.
pub fn bind(source: &Path, target: &Path, flags: MountFlags) -> io::Result<()> {
    let source_fd = nofollow::open(source)?;
    let target_fd = nofollow::open(target)?;
    let source_stat = fstat(&source_fd)?;
    let target_stat = fstat(&target_fd)?;
    check_kinds(source, kind_of(source_stat.st_mode), target, kind_of(target_stat.st_mode))?;

    match attach_with_flags(&source_fd, &target_fd, flags) {
        Ok(()) => return Ok(()),
        // Kernels before 5.12 lack mount_setattr: bind, then remount below.
        Err(Errno::ENOSYS) => {}
        Err(e) => return Err(with_context(e, "bind mount", target)),
    }
    // Going through /proc/self/fd pins both ends to what we just
    // checked, so a path swapped for a symlink after the check is never
    // followed.
    mount(Some(&fd_path(&source_fd)), &fd_path(&target_fd), None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| with_context(e, "bind mount", target))?;

    if flags.is_default() {
        return Ok(());
    }
    // On such a kernel the flags reach only this mount namespace: a
    // remount does not propagate to the namespaces that share the target's
    // mounts (the host's, where the kubelet and the container runtime look).
    // target_fd still names the directory under the new mount; the
    // remount must hit the bind itself, so reopen the path and make sure
    // it is the bind's root (same inode as the source).
    let mounted = match nofollow::open(target) {
        Ok(fd) => fd,
        Err(err) => return Err(undo_bind(&target_fd, err)),
    };
    let result = fstat(&mounted).map_err(io::Error::from).and_then(|stat| {
        if (stat.st_dev, stat.st_ino) != (source_stat.st_dev, source_stat.st_ino) {
            return Err(io::Error::other(format!("{} changed under the bind mount", target.display())));
        }
        remount(&mounted, flags).map_err(|e| with_context(e, "remount", target))
    });
    match result {
        Ok(()) => Ok(()),
        Err(err) => Err(undo_bind(&mounted, err)),
    }
}

/// Clones the mount at `source` (not its submounts, as `MS_BIND`), gives the
/// clone `flags` while it is still detached, then attaches it at `target`.
///
/// A mount carries its flags from the moment it appears, so the copies the
/// kernel makes of it in every mount namespace that shares the target's
/// mounts carry them too: Loam in a pod with `Bidirectional` propagation
/// mounts for the host, where the kubelet and the container runtime see the
/// copy. A bind followed by a remount sets the flags on this namespace's
/// mount only (the kernel does not propagate a remount), so the host's copy
/// would be writable and without nosuid, nodev or noexec. Both ends are the
/// file descriptors checked by the caller. `ENOSYS` on kernels without
/// mount_setattr (5.12).
fn attach_with_flags(source: &OwnedFd, target: &OwnedFd, flags: MountFlags) -> Result<(), Errno> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};
    let errno = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
    let clone = open_tree(
        source,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(errno)?;
    let (set, clear) = flags.mount_attr();
    if set != 0 || clear != 0 {
        let attr = libc::mount_attr { attr_set: set, attr_clr: clear, propagation: 0, userns_fd: 0 };
        // SAFETY: mount_setattr(2) reads `size` bytes of `attr`, which lives
        // across the call, and the empty path with AT_EMPTY_PATH names the
        // open `clone`; it writes nothing of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                clone.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &raw const attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if rc != 0 {
            return Err(Errno::last());
        }
    }
    move_mount(
        &clone,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno)
}

/// Unmounts the topmost mount at `target`: `Ok(false)` if nothing was
/// mounted there (or the path does not exist). A symlink anywhere in the
/// path is an `InvalidInput` error, never followed: the directories up to
/// the target are opened without following one and the unmount goes
/// through the opened parent; `UMOUNT_NOFOLLOW` covers the last component.
pub fn unmount(target: &Path) -> io::Result<bool> {
    let pinned = match nofollow::through_parent(target) {
        Ok(pinned) => pinned,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let path = pinned.proc_path();
    // A process closing its last file in the mount (or a child forked
    // while holding one, before its exec closes it) keeps the mount busy
    // for a moment: wait that out briefly before reporting EBUSY.
    for _ in 0..UNMOUNT_BUSY_RETRIES {
        match umount2(&path, MntFlags::UMOUNT_NOFOLLOW) {
            Err(Errno::EBUSY) => std::thread::sleep(UNMOUNT_BUSY_PAUSE),
            other => return unmount_outcome(other, target),
        }
    }
    unmount_outcome(umount2(&path, MntFlags::UMOUNT_NOFOLLOW), target)
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Remounts the bind with `flags`, keeping the flags it already has.
///
/// An unprivileged (user namespace) remount may not drop nosuid, nodev,
/// noexec or ro inherited from the source mount, so they are ORed in.
fn remount(mounted: &OwnedFd, flags: MountFlags) -> nix::Result<()> {
    let current = fstatvfs(mounted)?.flags();
    // Atime flags are left to the request: when it names none, the kernel
    // keeps the mount's current atime mode by itself.
    let mut ms = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags.ms_flags();
    for (st, msf) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if current.contains(st) {
            ms |= msf;
        }
    }
    mount(None::<&str>, &fd_path(mounted), None::<&str>, ms, None::<&str>)
}

/// Detaches the bind just made through `mounted`, returning `err` annotated if that fails too.
fn undo_bind(mounted: &OwnedFd, err: io::Error) -> io::Error {
    // Lazy detach: our own O_PATH fd keeps the mount busy, and nothing else
    // can be using a mount this young.
    match umount2(&fd_path(mounted), MntFlags::MNT_DETACH) {
        Ok(()) => err,
        Err(undo) => io::Error::new(err.kind(), format!("{err}; undoing the bind mount also failed: {undo}")),
    }
}

fn with_context(errno: Errno, what: &str, path: &Path) -> io::Error {
    let err = io::Error::from(errno);
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// What a mount end is, as far as bind compatibility goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    /// A regular file or block device: either can be bound onto a file.
    File,
    Symlink,
    Other,
}

fn kind_of(mode: libc::mode_t) -> Kind {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFREG | SFlag::S_IFBLK => Kind::File,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

pub(crate) fn kind_of_file_type(file_type: std::fs::FileType) -> Kind {
    if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_file() || file_type.is_block_device() {
        Kind::File
    } else if file_type.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    }
}

/// Refuses symlinks and mismatched ends with `InvalidInput`.
pub(crate) fn check_kinds(source: &Path, source_kind: Kind, target: &Path, target_kind: Kind) -> io::Result<()> {
    for (path, kind) in [(source, source_kind), (target, target_kind)] {
        match kind {
            Kind::Symlink => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("refusing to bind mount through symlink {}", path.display()),
                ));
            }
            Kind::Other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is neither a directory, a regular file nor a block device", path.display()),
                ));
            }
            Kind::Dir | Kind::File => {}
        }
    }
    if source_kind != target_kind {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot bind {} onto {}: one is a directory and the other is not",
                source.display(),
                target.display()
            ),
        ));
    }
    Ok(())
}

/// Unmounts everything still stacked on its path when dropped, so a
/// privileged test leaves no mount behind even after a failed assertion.
#[cfg(test)]
pub(crate) struct Unmount<'a>(pub(crate) &'a Path);

#[cfg(test)]
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        while matches!(unmount(self.0), Ok(true)) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::mountinfo;
    use std::os::unix::fs::symlink;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn parses_flags() {
        let flags = MountFlags::parse(&strings(&["ro", "noexec", "nosuid", "bind"])).expect("ok");
        assert!(flags.read_only && flags.noexec && flags.nosuid);
        assert!(!flags.nodev);
        assert_eq!(flags.to_string(), "ro,nosuid,noexec");

        let undone = MountFlags::parse(&strings(&["ro", "noatime", "rw", "atime"])).expect("ok");
        assert!(undone.is_default());
        assert!(MountFlags::parse(&strings(&["defaults", "rbind"])).expect("ok").is_default());
        assert!(MountFlags::parse(&[]).expect("ok").is_default());
    }

    #[test]
    fn rejects_bad_flags() {
        let err = MountFlags::parse(&strings(&["ro", "bogus"])).expect_err("unknown");
        assert!(err.contains("\"bogus\""), "{err}");
        assert!(err.contains("strictatime"), "{err}");
        for bad in ["size=1G", "r\0o", "", &"x".repeat(65)] {
            assert!(MountFlags::parse(&strings(&[bad])).is_err(), "{bad:?}");
        }
    }

    /// Real mounts need root and a private mount namespace; see `privileged`.
    mod privileged {
        use super::*;
        use std::io::Write;

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_bind_read_only_and_unmount() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
            std::fs::create_dir(&src).expect("mkdir src");
            std::fs::create_dir(&dst).expect("mkdir dst");
            std::fs::write(src.join("hello"), b"hi").expect("write");
            let _guard = Unmount(&dst);

            let flags = MountFlags { read_only: true, noexec: true, ..MountFlags::default() };
            bind(&src, &dst, flags).expect("bind");
            assert_eq!(std::fs::read(dst.join("hello")).expect("read"), b"hi");
            let entry =
                mountinfo::find_mount_point(&mountinfo::read().expect("mounts"), &dst).cloned().expect("listed");
            assert!(entry.read_only(), "{entry:?}");
            assert!(entry.options.split(',').any(|o| o == "noexec"), "{entry:?}");
            let err =
                std::fs::File::create(dst.join("new")).and_then(|mut f| f.write_all(b"x")).expect_err("read-only bind");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS));
            // The source itself stays writable: only the bind is read-only.
            std::fs::write(src.join("other"), b"ok").expect("source writable");

            assert!(unmount(&dst).expect("unmount"));
            assert!(!unmount(&dst).expect("not mounted"));
            assert!(!unmount(&dir.path().join("missing")).expect("missing"));
            assert!(!dst.join("hello").exists());
        }

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_unmount_never_follows_a_symlink_in_the_path() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (src, real) = (dir.path().join("src"), dir.path().join("real"));
            std::fs::create_dir(&src).expect("mkdir src");
            std::fs::create_dir_all(real.join("target")).expect("mkdir target");
            std::fs::write(src.join("hello"), b"hi").expect("write");
            let _guard = Unmount(&real.join("target"));
            bind(&src, &real.join("target"), MountFlags::default()).expect("bind");
            // A directory of the path swapped for a symlink to the mount's.
            let swapped = dir.path().join("swapped");
            std::os::unix::fs::symlink(&real, &swapped).expect("symlink");
            let err = unmount(&swapped.join("target")).expect_err("a symlink in the path");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
            // The last component a symlink to the mount point: not followed either.
            std::os::unix::fs::symlink(real.join("target"), dir.path().join("link")).expect("symlink");
            assert!(!unmount(&dir.path().join("link")).expect("a symlink is not a mount point"));
            assert!(real.join("target/hello").exists(), "the mount is still there");
            assert!(unmount(&real.join("target")).expect("unmount"));
            assert!(!real.join("target/hello").exists());
        }

        /// Loam in a pod mounts for the host through a shared mount; the
        /// kubelet and the container runtime see the host's copy, so the
        /// flags must be on the copy too, not only on Loam's own mount.
        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_bind_flags_reach_the_copies_in_peer_mounts() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (shared, peer, src) = (dir.path().join("shared"), dir.path().join("peer"), dir.path().join("src"));
            for d in [&shared, &peer, &src] {
                std::fs::create_dir(d).expect("mkdir");
            }
            let _shared_guard = Unmount(&shared);
            mount(Some("tmpfs"), &shared, Some("tmpfs"), MsFlags::empty(), Some("size=1m")).expect("mount tmpfs");
            mount(None::<&str>, &shared, None::<&str>, MsFlags::MS_SHARED, None::<&str>).expect("make shared");
            std::fs::create_dir(shared.join("target")).expect("mkdir target");
            // `peer` is a second view of `shared` in its peer group: what is
            // mounted under one appears under the other, as a pod's mounts
            // appear on the host with Bidirectional propagation.
            let _peer_guard = Unmount(&peer);
            mount(Some(&shared), &peer, None::<&str>, MsFlags::MS_BIND, None::<&str>).expect("bind peer");
            let (target, copy) = (shared.join("target"), peer.join("target"));
            let _copy_guard = Unmount(&copy);
            let _guard = Unmount(&target);

            let flags =
                MountFlags { read_only: true, nosuid: true, noexec: true, noatime: true, ..MountFlags::default() };
            bind(&src, &target, flags).expect("bind");
            let table = mountinfo::read().expect("mounts");
            for at in [&target, &copy] {
                let entry = mountinfo::find_mount_point(&table, at).cloned().expect("listed");
                for want in ["ro", "nosuid", "noexec", "noatime"] {
                    assert!(
                        entry.options.split(',').any(|o| o == want),
                        "{want} missing at {}: {entry:?}",
                        at.display()
                    );
                }
            }
            let err = std::fs::write(copy.join("new"), b"x").expect_err("the copy is read-only too");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        }

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_remount_keeps_flags_of_the_source_mount() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (fs_root, dst) = (dir.path().join("fs"), dir.path().join("dst"));
            std::fs::create_dir(&fs_root).expect("mkdir fs");
            std::fs::create_dir(&dst).expect("mkdir dst");
            let _fs_guard = Unmount(&fs_root);
            mount(Some("tmpfs"), &fs_root, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("size=1m"))
                .expect("mount tmpfs");
            std::fs::create_dir(fs_root.join("vol")).expect("mkdir vol");
            let _guard = Unmount(&dst);

            let ro = MountFlags { read_only: true, ..MountFlags::default() };
            bind(&fs_root.join("vol"), &dst, ro).expect("bind");
            let mounts = mountinfo::read().expect("mounts");
            let entry = mountinfo::find_mount_point(&mounts, &dst).expect("listed");
            let options: Vec<&str> = entry.options.split(',').collect();
            for want in ["ro", "nosuid", "nodev"] {
                assert!(options.contains(&want), "{want} missing: {entry:?}");
            }
        }

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_undo_bind_detaches_the_new_mount() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
            std::fs::create_dir(&src).expect("mkdir src");
            std::fs::create_dir(&dst).expect("mkdir dst");
            let _guard = Unmount(&dst);

            bind(&src, &dst, MountFlags::default()).expect("bind");
            let mounted = nofollow::open(&dst).expect("open mount");
            let err = undo_bind(&mounted, io::Error::other("remount failed"));
            assert_eq!(err.to_string(), "remount failed");
            let mounts = mountinfo::read().expect("mounts");
            assert!(mountinfo::find_mount_point(&mounts, &dst).is_none());
        }

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_bind_of_files_is_writable_by_default() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
            std::fs::write(&src, b"data").expect("write src");
            std::fs::write(&dst, b"").expect("write dst");
            let _guard = Unmount(&dst);

            bind(&src, &dst, MountFlags::default()).expect("bind");
            std::fs::write(&dst, b"changed").expect("write through bind");
            assert_eq!(std::fs::read(&src).expect("read"), b"changed");
        }

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn kernel_bind_refuses_symlinks_and_mismatches() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (src, dst, file, link) =
                (dir.path().join("src"), dir.path().join("dst"), dir.path().join("file"), dir.path().join("link"));
            std::fs::create_dir(&src).expect("mkdir src");
            std::fs::create_dir(&dst).expect("mkdir dst");
            std::fs::write(&file, b"").expect("write");
            symlink(&dst, &link).expect("symlink");
            let _guards = (Unmount(&dst), Unmount(&file), Unmount(&src));
            let none = MountFlags::default();

            for (s, t) in [(&src, &link), (&link, &dst)] {
                let err = bind(s, t, none).expect_err("symlink");
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
                assert!(err.to_string().contains("symlink"), "{err}");
            }
            let err = bind(&src, &file, none).expect_err("mismatch");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
            let mounts = mountinfo::read().expect("mounts");
            for path in [&dst, &file, &src] {
                assert!(mountinfo::find_mount_point(&mounts, path).is_none());
            }
        }
    }
}
