//! What is mounted on a caller's path, found without reading the whole
//! mount table unless something is mounted there.
//!
//! The node RPCs ask "is anything mounted on this path, and whose is it?"
//! a few times each. `/proc/self/mountinfo` answers, but every read makes
//! the kernel print every mount of the namespace, so its cost grows with
//! the node's mounts: it was half of the driver's CPU in a node cycle.
//! `statx` answers the first half from the path alone:
//! `STATX_ATTR_MOUNT_ROOT` says whether the path is the root of a mount (the
//! topmost one on it, where resolving the path lands), and `stx_mnt_id`
//! which mount that is. The table is read only when something is mounted
//! and the caller must know what; its entry is then picked by that mount id,
//! so a mount hidden under another one is never taken for it.
//!
//! The path is reached as [`nofollow`] reaches it: one that leads through a
//! symlink, or is missing, has nothing mounted on it as far as Loam is
//! concerned (nothing Loam mounted can be reached by that name, and the
//! table lists none under it either).

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, StatxAttributes, StatxFlags, statx};

use super::mountinfo::{self, MountEntry};
use super::nofollow;

/// Whether `path` is the mount point of some mount. Never reads the table
/// on a kernel that reports mount roots (Linux 5.8 and later).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    match probe(path)? {
        Probe::Unmounted => Ok(false),
        Probe::Mounted(_) => Ok(true),
        Probe::Unknown => Ok(mountinfo::find_mount_point(&mountinfo::read()?, path).is_some()),
    }
}

/// The topmost mount on `path`, or `None` when nothing is mounted there.
/// Reads the table only when something is (or the kernel cannot say).
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    match probe(path)? {
        Probe::Unmounted => Ok(None),
        // A mount gone between the probe and the read is no longer there;
        // the path check keeps a reused mount id from naming another mount.
        Probe::Mounted(id) => {
            Ok(mountinfo::read()?.into_iter().find(|e| u64::from(e.mount_id) == id && e.mount_point == path))
        }
        Probe::Unknown => Ok(mountinfo::find_mount_point(&mountinfo::read()?, path).cloned()),
    }
}

/// Opens `path` without following a symlink anywhere in it; `None` when no
/// object can be reached by that name (missing, through a symlink, under
/// something that is not a directory, not absolute or not normal).
pub(crate) fn reach(path: &Path) -> io::Result<Option<OwnedFd>> {
    match nofollow::open(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::InvalidInput
                    | io::ErrorKind::NotADirectory
                    | io::ErrorKind::InvalidFilename
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What statx says of the object at a path.
enum Probe {
    /// Not the root of a mount (or nothing there).
    Unmounted,
    /// The root of the mount with this id.
    Mounted(u64),
    /// The kernel does not report mount roots or mount ids: ask the table.
    Unknown,
}

fn probe(path: &Path) -> io::Result<Probe> {
    let Some(fd) = reach(path)? else { return Ok(Probe::Unmounted) };
    let stx = statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("statx {}: {e}", path.display())))?;
    if !stx.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(Probe::Unknown);
    }
    if !stx.stx_attributes.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(Probe::Unmounted);
    }
    if stx.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
        return Ok(Probe::Unknown);
    }
    Ok(Probe::Mounted(stx.stx_mnt_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_missing_and_symlinked_paths_have_nothing_mounted_on_them() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&plain, &link).unwrap();
        for path in [plain.clone(), dir.path().join("missing"), link.clone(), link.join("under"), "relative".into()] {
            assert!(!is_mount_point(&path).unwrap(), "{}", path.display());
            assert_eq!(mount_at(&path).unwrap(), None, "{}", path.display());
        }
    }

    /// Real mounts need root and a private mount namespace.
    mod privileged {
        use super::*;
        use crate::kernel::mount::{MountFlags, Unmount, bind, unmount};

        #[ignore = "needs root: real mounts in a private mount namespace; scripts/test.sh runs it"]
        #[test]
        fn finds_the_topmost_mount_on_a_path_as_the_table_lists_it() {
            let dir = tempfile::tempdir().unwrap();
            let (a, b, target) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("target"));
            for path in [&a, &b, &target] {
                std::fs::create_dir(path).unwrap();
            }
            let (file, file_target) = (dir.path().join("file"), dir.path().join("file-target"));
            std::fs::write(&file, b"x").unwrap();
            std::fs::write(&file_target, b"").unwrap();
            let _guards = (Unmount(&target), Unmount(&file_target));

            bind(&a, &target, MountFlags::default()).unwrap();
            bind(&b, &target, MountFlags::default()).unwrap();
            bind(&file, &file_target, MountFlags::default()).unwrap();
            let table = mountinfo::read().unwrap();
            for path in [&target, &file_target] {
                assert!(is_mount_point(path).unwrap(), "{}", path.display());
                let found = mount_at(path).unwrap().expect("mounted");
                assert_eq!(Some(&found), mountinfo::find_mount_point(&table, path), "the topmost, as listed");
            }
            assert!(mount_at(&target).unwrap().unwrap().root.ends_with("b"), "the stacked mount is the one seen");
            // Under the mount, a directory of the bound tree is no mount point.
            std::fs::create_dir(b.join("inner")).unwrap();
            assert!(!is_mount_point(&target.join("inner")).unwrap());

            assert!(unmount(&target).unwrap());
            assert!(mount_at(&target).unwrap().unwrap().root.ends_with("a"), "the one below shows again");
            assert!(unmount(&target).unwrap());
            assert!(!is_mount_point(&target).unwrap());
            assert_eq!(mount_at(&target).unwrap(), None);

            // A symlink to a mount point is not one.
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&file_target, &link).unwrap();
            assert!(!is_mount_point(&link).unwrap());
            assert_eq!(mount_at(&link).unwrap(), None);
        }
    }
}
