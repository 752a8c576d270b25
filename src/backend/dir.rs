//! The `dir` backend: each volume is a directory under the driver's root.
//!
//! Layout under the root: `volumes/<key>/` holds a volume's files and
//! `snapshots/<key>/` a snapshot's copy of them. Content is built under a
//! dot-prefixed temporary name and renamed into place, so a crash never leaves
//! a half-copied volume or snapshot under its real name.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::ids::Key;
use crate::kernel::copy::copy_tree;
use crate::kernel::usage::{TreeUsage, tree_usage};

/// Mode of a new, empty volume root: writable by any pod user, as hostPath
/// and local volumes are; the CO narrows it with fsGroup when it wants to.
const VOLUME_ROOT_MODE: u32 = 0o777;

/// Directory volumes and their snapshots under one root.
#[derive(Debug)]
pub struct DirBackend {
    volumes: PathBuf,
    snapshots: PathBuf,
}

impl DirBackend {
    /// Uses (creating if needed) `volumes/` and `snapshots/` under `root`.
    pub fn open(root: &Path) -> Result<DirBackend> {
        let backend = DirBackend { volumes: root.join("volumes"), snapshots: root.join("snapshots") };
        for dir in [&backend.volumes, &backend.snapshots] {
            fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        }
        Ok(backend)
    }

    /// Where the volume's files live.
    pub fn volume_path(&self, key: &Key) -> PathBuf {
        self.volumes.join(key.to_string())
    }

    /// Where the snapshot's files live.
    pub fn snapshot_path(&self, key: &Key) -> PathBuf {
        self.snapshots.join(key.to_string())
    }

    /// Makes the volume: empty, or a copy of `source` (a volume or snapshot
    /// directory). Replaces leftovers of an earlier attempt that crashed.
    pub fn create_volume(&self, key: &Key, source: Option<&Path>) -> Result<()> {
        let path = self.volume_path(key);
        build_in_place(&path, |tmp| match source {
            Some(source) => copy_tree(source, tmp).map(drop),
            None => {
                fs::create_dir(tmp)?;
                // Set explicitly: mkdir's mode is filtered by the umask.
                fs::set_permissions(tmp, fs::Permissions::from_mode(VOLUME_ROOT_MODE))
            }
        })
    }

    /// Copies the volume's files into a new snapshot.
    pub fn create_snapshot(&self, volume: &Key, snapshot: &Key) -> Result<()> {
        let source = self.volume_path(volume);
        build_in_place(&self.snapshot_path(snapshot), |tmp| copy_tree(&source, tmp).map(drop))
    }

    /// Removes the volume's files; a missing volume is already removed.
    pub fn delete_volume(&self, key: &Key) -> Result<()> {
        remove_tree(&self.volume_path(key))
    }

    /// Removes the snapshot's files; a missing snapshot is already removed.
    pub fn delete_snapshot(&self, key: &Key) -> Result<()> {
        remove_tree(&self.snapshot_path(key))
    }

    /// Whether the volume's directory exists (and is a directory, not a link).
    pub fn volume_exists(&self, key: &Key) -> bool {
        fs::symlink_metadata(self.volume_path(key)).is_ok_and(|m| m.is_dir())
    }

    /// Space and inodes the volume's files take.
    pub fn usage(&self, key: &Key) -> Result<TreeUsage> {
        let path = self.volume_path(key);
        tree_usage(&path).context(|| format!("measuring {}", path.display()))
    }
}

/// Builds `path` through `build` on a temporary sibling, then renames it in.
fn build_in_place(path: &Path, build: impl FnOnce(&Path) -> io::Result<()>) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    remove_tree(&tmp)?;
    remove_tree(path)?;
    if let Err(e) = build(&tmp) {
        // Best effort: the next attempt removes it too.
        let _ = fs::remove_dir_all(&tmp);
        return Err(crate::error::Error::io(format!("building {}", path.display()), e));
    }
    fs::rename(&tmp, path).context(|| format!("renaming into {}", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::File::open(parent).and_then(|dir| dir.sync_all()).context(|| format!("syncing {}", parent.display()))
}

/// Removes a tree without following symlinks; a missing tree is fine.
fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::error::Error::io(format!("inspecting {}", path.display()), e)),
        // A planted symlink is removed itself; its target is never touched.
        Ok(meta) if !meta.is_dir() => fs::remove_file(path).context(|| format!("removing {}", path.display())),
        Ok(_) => fs::remove_dir_all(path).context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    #[test]
    fn volumes_snapshots_and_restores_keep_content() {
        let root = tempfile::tempdir().unwrap();
        let dir = DirBackend::open(root.path()).unwrap();
        let (vol, snap, restored) =
            (Key::for_name(Kind::Volume, "v"), Key::for_name(Kind::Snapshot, "s"), Key::for_name(Kind::Volume, "r"));
        dir.create_volume(&vol, None).unwrap();
        fs::write(dir.volume_path(&vol).join("data"), b"hello").unwrap();
        dir.create_snapshot(&vol, &snap).unwrap();
        fs::write(dir.volume_path(&vol).join("data"), b"changed").unwrap();
        dir.create_volume(&restored, Some(&dir.snapshot_path(&snap))).unwrap();
        assert_eq!(fs::read(dir.volume_path(&restored).join("data")).unwrap(), b"hello");
        dir.delete_volume(&vol).unwrap();
        dir.delete_volume(&vol).unwrap();
        assert!(!dir.volume_exists(&vol));
        dir.delete_snapshot(&snap).unwrap();
        assert!(!dir.snapshot_path(&snap).exists());
    }

    #[test]
    fn a_crashed_attempt_is_replaced_and_planted_symlinks_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("precious"), b"keep").unwrap();
        let dir = DirBackend::open(root.path()).unwrap();
        let key = Key::for_name(Kind::Volume, "v");
        // Leftovers: a half-built temp dir and a symlink where the volume goes.
        let path = dir.volume_path(&key);
        fs::create_dir(path.with_file_name(format!(".{key}.tmp"))).unwrap();
        std::os::unix::fs::symlink(outside.path(), &path).unwrap();
        dir.create_volume(&key, None).unwrap();
        assert!(dir.volume_exists(&key));
        dir.delete_volume(&key).unwrap();
        assert_eq!(fs::read(outside.path().join("precious")).unwrap(), b"keep");
    }
}
