//! How much a directory tree holds and how full its filesystem is, for
//! volume statistics and capacity reporting.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::statvfs::statvfs;

/// Unit of `st_blocks`, fixed by POSIX regardless of the filesystem block size.
const STAT_BLOCK_SIZE: u64 = 512;

/// Space and inodes taken by a tree.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Allocated bytes (`st_blocks * 512`), each hard-linked inode counted once.
    pub bytes: u64,
    /// Inodes in the tree, including the root; hard links count once.
    pub inodes: u64,
}

/// Walks `path` without following symlinks or crossing filesystems (explicit stack).
///
/// Entries on another filesystem (mount points inside the tree) are neither
/// counted nor entered. Entries deleted during the walk are ignored, since
/// the tree is usually in use while it is measured.
pub fn tree_usage(path: &Path) -> io::Result<TreeUsage> {
    let root = fs::symlink_metadata(path)?;
    let dev = root.dev();
    let mut usage = TreeUsage::default();
    let mut seen = HashSet::new();
    count(&mut usage, &mut seen, &root);

    let mut dirs = Vec::new();
    if root.is_dir() {
        dirs.push(path.to_path_buf());
    }
    while let Some(dir) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in entries {
            let entry = entry?;
            let meta = match fs::symlink_metadata(entry.path()) {
                Ok(meta) => meta,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            if meta.dev() != dev {
                continue;
            }
            count(&mut usage, &mut seen, &meta);
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Adds an inode to `usage` unless another name for it was already counted.
fn count(usage: &mut TreeUsage, seen: &mut HashSet<u64>, meta: &fs::Metadata) {
    // Only multiply-linked inodes can be met twice, so only they are remembered.
    if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
        return;
    }
    usage.inodes += 1;
    usage.bytes += meta.blocks() * STAT_BLOCK_SIZE;
}

/// Capacity of a filesystem.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Size of the filesystem (`f_blocks * f_frsize`).
    pub total_bytes: u64,
    /// Bytes available to unprivileged users (`f_bavail * f_frsize`).
    pub available_bytes: u64,
    /// Total inodes (`f_files`).
    pub total_inodes: u64,
    /// Free inodes (`f_ffree`).
    pub free_inodes: u64,
}

/// statvfs of the filesystem holding `path`.
pub fn fs_usage(path: &Path) -> io::Result<FsUsage> {
    let stat = statvfs(path)?;
    let fragment = stat.fragment_size();
    Ok(FsUsage {
        total_bytes: stat.blocks().saturating_mul(fragment),
        available_bytes: stat.blocks_available().saturating_mul(fragment),
        total_inodes: stat.files(),
        free_inodes: stat.files_free(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn counts_entries_blocks_and_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).expect("mkdirs");
        fs::write(root.join("a/b/data"), vec![1u8; 100_000]).expect("write");
        fs::hard_link(root.join("a/b/data"), root.join("a/again")).expect("link");
        symlink("/etc/passwd", root.join("link")).expect("symlink");
        fs::write(root.join("empty"), b"").expect("write");

        let usage = tree_usage(root).expect("usage");
        // root, a, a/b, data (linked twice), link, empty.
        assert_eq!(usage.inodes, 6);
        let expected: u64 = ["", "a", "a/b", "a/b/data", "link", "empty"]
            .iter()
            .map(|p| fs::symlink_metadata(root.join(p)).expect(p).blocks() * 512)
            .sum();
        assert_eq!(usage.bytes, expected);
        assert!(usage.bytes >= 100_000);
    }

    #[test]
    fn single_file_and_missing_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("f"), b"x").expect("write");
        assert_eq!(tree_usage(&dir.path().join("f")).expect("file").inodes, 1);
        let err = tree_usage(&dir.path().join("missing")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn fs_usage_is_sane() {
        let dir = tempfile::tempdir().expect("tempdir");
        let usage = fs_usage(dir.path()).expect("statvfs");
        assert!(usage.total_bytes > 0);
        assert!(usage.available_bytes <= usage.total_bytes);
        assert!(usage.free_inodes <= usage.total_inodes);
    }
}
