//! Point-in-time copies of a directory tree, used to clone and snapshot
//! volumes: reflinks where the filesystem can, sparse-aware copies where it
//! cannot, with ownership, modes, times, symlinks and hard links preserved.

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Whence, lseek};

/// Buffer size for the read/write fallback when copy_file_range is unavailable.
const COPY_BUFFER: usize = 128 * 1024;

/// Permission bits, including setuid, setgid and sticky.
const PERMISSION_BITS: u32 = 0o7777;

/// What a tree copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files whose contents were copied (extra hard links are not counted).
    pub files: u64,
    /// Logical bytes of those files.
    pub bytes: u64,
    /// Files cloned with FICLONE.
    pub reflinked: u64,
}

/// Copies the tree at `src` into `dst`, which must not exist yet.
///
/// Symlinks are copied as symlinks, never followed. An entry on another
/// filesystem than `src` (a mount point inside the volume) is an
/// `InvalidData` error. Sockets are skipped. On error `dst` may hold a
/// partial copy, which the caller should remove.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<CopyStats> {
    source_dir(src)?;
    fs::create_dir(dst)?;
    copy_into(src, dst)
}

/// Copies the tree at `src` into the existing, empty directory `dst`, which
/// takes the owner, mode and times of `src`; otherwise as [`copy_tree`].
/// Used where `dst` must be prepared first (a subvolume, a project id).
pub fn copy_into(src: &Path, dst: &Path) -> io::Result<CopyStats> {
    let root = source_dir(src)?;

    let mut copier = TreeCopier { dev: root.dev(), stats: CopyStats::default(), links: HashMap::new() };
    // An explicit stack keeps deep trees from overflowing the call stack.
    // A directory's metadata is applied after its children are written,
    // because writing them would change its mtime and a read-only mode
    // would refuse them.
    let mut work = vec![Work::Finish(dst.to_path_buf(), root), Work::Fill(src.to_path_buf(), dst.to_path_buf())];
    while let Some(item) = work.pop() {
        match item {
            Work::Fill(from, to) => copier.fill(&from, &to, &mut work)?,
            Work::Finish(path, meta) => apply_metadata(&path, &meta)?,
        }
    }
    Ok(copier.stats)
}

fn source_dir(src: &Path) -> io::Result<Metadata> {
    let root = fs::symlink_metadata(src)?;
    if !root.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", src.display())));
    }
    Ok(root)
}

/// Copies one regular file (reflink, else sparse copy) to new file `dst`; true if reflinked.
pub fn copy_file(src: &Path, dst: &Path) -> io::Result<bool> {
    let from = open_source(src)?;
    let meta = from.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a regular file", src.display())));
    }
    let to = create_target(dst)?;
    let reflinked = copy_contents(&from, &to, meta.len())?;
    to.set_permissions(fs::Permissions::from_mode(meta.mode() & PERMISSION_BITS))?;
    Ok(reflinked)
}

/// Whether files in `dir` can share extents (FICLONE): probed on two unnamed
/// temporary files, so nothing is left behind even by a crash.
pub fn reflinks_in(dir: &Path) -> io::Result<bool> {
    let unnamed = || {
        OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC).open(dir)
    };
    let from = match unnamed() {
        // No unnamed files here: no way to probe without leaving a name.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(false),
        other => other?,
    };
    // One whole block: an empty or partial one may succeed where data would not.
    from.write_all_at(&[0xa5; 4096], 0)?;
    let to = unnamed()?;
    reflink(&from, &to)
}

/// Makes empty `to` share `from`'s extents (FICLONE): false when the
/// filesystem cannot share them here, the one place that decides which
/// errors mean "copy the bytes instead".
fn reflink(from: &File, to: &File) -> io::Result<bool> {
    match rustix::fs::ioctl_ficlone(to, from) {
        Ok(()) => Ok(true),
        Err(
            rustix::io::Errno::OPNOTSUPP
            | rustix::io::Errno::XDEV
            | rustix::io::Errno::INVAL
            | rustix::io::Errno::NOTTY,
        ) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

enum Work {
    /// Copy the entries of a source directory into an existing target directory.
    Fill(PathBuf, PathBuf),
    /// Apply a directory's owner, mode and times once its contents are in place.
    Finish(PathBuf, Metadata),
}

struct TreeCopier {
    dev: u64,
    stats: CopyStats,
    /// First copy of each multiply-linked file, by source inode, so later
    /// names become hard links again instead of duplicate data.
    links: HashMap<u64, PathBuf>,
}

impl TreeCopier {
    fn fill(&mut self, from: &Path, to: &Path, work: &mut Vec<Work>) -> io::Result<()> {
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            let source = entry.path();
            let target = to.join(entry.file_name());
            let meta = fs::symlink_metadata(&source)?;
            if meta.dev() != self.dev {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("mount point inside volume: {}", source.display()),
                ));
            }
            let file_type = meta.file_type();
            if file_type.is_dir() {
                fs::create_dir(&target)?;
                work.push(Work::Finish(target.clone(), meta));
                work.push(Work::Fill(source, target));
            } else if file_type.is_file() {
                self.copy_regular(&source, &target, &meta)?;
            } else if file_type.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
                apply_metadata(&target, &meta)?;
            } else if file_type.is_fifo() || file_type.is_char_device() || file_type.is_block_device() {
                make_node(&target, &meta)?;
                apply_metadata(&target, &meta)?;
            }
            // Sockets are left out: a socket file is useless without the
            // process listening on it.
        }
        Ok(())
    }

    fn copy_regular(&mut self, source: &Path, target: &Path, meta: &Metadata) -> io::Result<()> {
        if meta.nlink() > 1 {
            if let Some(first) = self.links.get(&meta.ino()) {
                return fs::hard_link(first, target);
            }
            self.links.insert(meta.ino(), target.to_path_buf());
        }
        let from = open_source(source)?;
        let opened = from.metadata()?;
        // The name was listed as this inode a moment ago; refuse if it was
        // swapped (for a symlink, O_NOFOLLOW already refused it).
        if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
            return Err(io::Error::other(format!("{} changed during the copy", source.display())));
        }
        let to = create_target(target)?;
        let reflinked = copy_contents(&from, &to, opened.len())?;
        drop(to);
        apply_metadata(target, meta)?;
        self.stats.files += 1;
        self.stats.bytes += opened.len();
        self.stats.reflinked += u64::from(reflinked);
        Ok(())
    }
}

fn open_source(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

fn create_target(path: &Path) -> io::Result<File> {
    // Private until the real mode is applied after the data is in.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Fills empty `to` with the first `len` bytes of `from`; true if reflinked.
fn copy_contents(from: &File, to: &File, len: u64) -> io::Result<bool> {
    if reflink(from, to)? {
        return Ok(true);
    }
    sparse_copy(from, to, len)?;
    Ok(false)
}

/// Copies only the data ranges of `from`, then sets the length so holes stay holes.
fn sparse_copy(from: &File, to: &File, len: u64) -> io::Result<()> {
    for range in data_ranges(from, len)? {
        let at = |offset: u64| i64::try_from(offset).map_err(|_| io::Error::other("file too large"));
        copy_range(from, to, at(range.start)?, at(range.end)?)?;
    }
    to.set_len(len)
}

/// The ranges of the first `len` bytes of `file` that hold data, in order
/// (SEEK_DATA/SEEK_HOLE); everything between them reads as zeroes. A
/// filesystem that cannot report holes gives one range: all of it.
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut ranges = Vec::new();
    let mut pos = 0i64;
    while pos < end {
        let data = match lseek(file, pos, Whence::SeekData) {
            Ok(offset) => offset,
            // No data past pos: the rest is a hole.
            Err(Errno::ENXIO) => break,
            // The filesystem cannot report holes: treat everything as data.
            Err(Errno::EINVAL) => pos,
            Err(errno) => return Err(errno.into()),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(file, data, Whence::SeekHole) {
            Ok(offset) => offset.min(end),
            Err(Errno::ENXIO | Errno::EINVAL) => end,
            Err(errno) => return Err(errno.into()),
        };
        let offset = |at: i64| u64::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidData));
        ranges.push(offset(data)?..offset(hole)?);
        pos = hole;
    }
    Ok(ranges)
}

/// Copies bytes `[start, end)` at the same offsets, in-kernel when possible.
fn copy_range(from: &File, to: &File, start: i64, end: i64) -> io::Result<()> {
    let offset = |at: i64| u64::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (mut off_in, mut off_out, end_at) = (offset(start)?, offset(start)?, offset(end)?);
    while off_in < end_at {
        let want = usize::try_from(end_at - off_in).unwrap_or(usize::MAX);
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            // The file shrank under us; the final set_len pads the rest.
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::NOSYS,
            ) => {
                let resume = i64::try_from(off_in).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                return read_write_range(from, to, resume, end);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

fn read_write_range(from: &File, to: &File, start: i64, end: i64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let (mut pos, end) = (offset(start)?, offset(end)?);
    while pos < end {
        let want = usize::try_from(end - pos).map_or(buf.len(), |n| n.min(buf.len()));
        let read = from.read_at(&mut buf[..want], pos)?;
        if read == 0 {
            break;
        }
        to.write_all_at(&buf[..read], pos)?;
        pos += read as u64;
    }
    Ok(())
}

fn offset(value: i64) -> io::Result<u64> {
    u64::try_from(value).map_err(|_| io::Error::other("negative file offset"))
}

fn make_node(path: &Path, meta: &Metadata) -> io::Result<()> {
    let file_type = meta.file_type();
    let kind = if file_type.is_fifo() {
        SFlag::S_IFIFO
    } else if file_type.is_char_device() {
        SFlag::S_IFCHR
    } else {
        SFlag::S_IFBLK
    };
    let perm = Mode::from_bits_truncate(meta.mode() & PERMISSION_BITS);
    mknod(path, kind, perm, meta.rdev())?;
    Ok(())
}

/// Gives `path` the owner, mode and times in `meta`, without following symlinks.
fn apply_metadata(path: &Path, meta: &Metadata) -> io::Result<()> {
    // Owner first: chown clears setuid/setgid, so the mode goes on after.
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))?;
    if !meta.file_type().is_symlink() {
        // Symlink modes are meaningless on Linux and chmod would follow.
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & PERMISSION_BITS))?;
    }
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(AT_FDCWD, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn copies_nested_tree_with_modes_links_and_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let outside = dir.path().join("secret");
        fs::write(&outside, b"do not read").expect("write outside");
        fs::create_dir_all(src.join("a/b/c")).expect("mkdirs");
        fs::write(src.join("top"), b"top").expect("write");
        fs::write(src.join("a/b/c/deep"), b"deep data").expect("write");
        fs::set_permissions(src.join("top"), fs::Permissions::from_mode(0o640)).expect("chmod");
        fs::set_permissions(src.join("a/b"), fs::Permissions::from_mode(0o750)).expect("chmod");
        fs::hard_link(src.join("top"), src.join("a/top-link")).expect("link");
        symlink(&outside, src.join("a/escape")).expect("symlink");
        symlink("dangling", src.join("dangling")).expect("symlink");
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o604)).expect("fifo");
        let old = TimeSpec::new(1_000_000_000, 0);
        utimensat(AT_FDCWD, &src.join("a/b"), &old, &old, UtimensatFlags::NoFollowSymlink).expect("utimes");
        fs::set_permissions(&src, fs::Permissions::from_mode(0o711)).expect("chmod root");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::lchown(src.join("a/b/c/deep"), Some(1234), Some(5678)).expect("chown");
            std::os::unix::fs::lchown(src.join("dangling"), Some(4321), None).expect("lchown");
        }

        let dst = dir.path().join("dst");
        let stats = copy_tree(&src, &dst).expect("copy");

        assert_eq!(stats.files, 2, "{stats:?}");
        assert_eq!(stats.bytes, 3 + 9);
        assert_eq!(fs::read(dst.join("a/b/c/deep")).expect("read"), b"deep data");
        let mode = |p: &str| fs::symlink_metadata(dst.join(p)).expect(p).mode() & 0o7777;
        assert_eq!(mode(""), 0o711);
        assert_eq!(mode("top"), 0o640);
        assert_eq!(mode("a/b"), 0o750);
        assert_eq!(mode("fifo"), 0o604);
        assert!(fs::symlink_metadata(dst.join("fifo")).expect("fifo").file_type().is_fifo());
        assert_eq!(fs::symlink_metadata(dst.join("a/b")).expect("b").mtime(), 1_000_000_000);

        let top = fs::metadata(dst.join("top")).expect("top");
        let linked = fs::metadata(dst.join("a/top-link")).expect("link");
        assert_eq!(top.ino(), linked.ino());
        assert_eq!(top.nlink(), 2);
        assert_ne!(top.ino(), fs::metadata(src.join("top")).expect("src").ino());

        assert_eq!(fs::read_link(dst.join("a/escape")).expect("readlink"), outside);
        assert_eq!(fs::read_link(dst.join("dangling")).expect("readlink"), Path::new("dangling"));
        assert!(fs::symlink_metadata(dst.join("a/escape")).expect("l").file_type().is_symlink());
    }

    #[test]
    fn keeps_sparse_files_sparse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        let sparse = File::create(src.join("sparse")).expect("create");
        sparse.set_len(64 * MIB).expect("set_len");
        sparse.write_all_at(b"middle", 32 * MIB).expect("write");
        sparse.write_all_at(b"end", 64 * MIB - 3).expect("write");
        drop(sparse);

        let dst = dir.path().join("dst");
        let stats = copy_tree(&src, &dst).expect("copy");
        assert_eq!(stats.bytes, 64 * MIB);

        let copy = File::open(dst.join("sparse")).expect("open");
        let meta = copy.metadata().expect("meta");
        assert_eq!(meta.len(), 64 * MIB);
        assert!(meta.blocks() * 512 < MIB, "copy is not sparse: {} blocks", meta.blocks());
        let mut buf = [0u8; 6];
        copy.read_exact_at(&mut buf, 32 * MIB).expect("read");
        assert_eq!(&buf, b"middle");
        copy.read_exact_at(&mut buf[..3], 64 * MIB - 3).expect("read");
        assert_eq!(&buf[..3], b"end");
        copy.read_exact_at(&mut buf, MIB).expect("read hole");
        assert_eq!(buf, [0u8; 6]);
    }

    #[test]
    fn copy_file_copies_contents_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&src, vec![7u8; 300_000]).expect("write");
        fs::set_permissions(&src, fs::Permissions::from_mode(0o604)).expect("chmod");
        copy_file(&src, &dst).expect("copy");
        assert_eq!(fs::read(&dst).expect("read"), vec![7u8; 300_000]);
        assert_eq!(fs::metadata(&dst).expect("meta").mode() & 0o7777, 0o604);

        let again = copy_file(&src, &dst).expect_err("dst exists");
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn read_write_fallback_copies_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..COPY_BUFFER * 2 + 17).map(|i| u8::try_from(i % 251).expect("below 251")).collect();
        fs::write(dir.path().join("a"), &data).expect("write");
        let from = File::open(dir.path().join("a")).expect("open");
        let to = create_target(&dir.path().join("b")).expect("create");
        read_write_range(&from, &to, 5, i64::try_from(data.len()).expect("small")).expect("copy");
        let copied = fs::read(dir.path().join("b")).expect("read");
        assert_eq!(copied[..5], [0u8; 5]);
        assert_eq!(copied[5..], data[5..]);
    }

    #[test]
    fn refuses_existing_destination_and_non_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = copy_tree(dir.path(), dir.path()).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        fs::write(dir.path().join("f"), b"").expect("write");
        let err = copy_tree(&dir.path().join("f"), &dir.path().join("g")).expect_err("file");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn reflink_probes_leave_nothing_and_agree_with_a_real_clone() {
        let dir = tempfile::tempdir().unwrap();
        let probed = reflinks_in(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "the probe left a file");
        // The probe must say what copy_file then does on the same filesystem.
        fs::write(dir.path().join("src"), vec![7u8; 8192]).unwrap();
        assert_eq!(copy_file(&dir.path().join("src"), &dir.path().join("dst")).unwrap(), probed);
        assert!(reflinks_in(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn copy_file_refuses_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("real"), b"x").expect("write");
        symlink(dir.path().join("real"), dir.path().join("link")).expect("symlink");
        copy_file(&dir.path().join("link"), &dir.path().join("out")).expect_err("symlink");
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn deep_trees_do_not_overflow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        // Deep enough to blow a small stack if copied recursively, while
        // staying under PATH_MAX.
        let mut deep = src.clone();
        for _ in 0..1000 {
            deep.push("d");
        }
        fs::create_dir_all(&deep).expect("mkdirs");
        fs::write(deep.join("leaf"), b"leaf").expect("write");
        let stats = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn({
                let (src, dst) = (src.clone(), dir.path().join("dst"));
                move || copy_tree(&src, &dst)
            })
            .expect("spawn")
            .join()
            .expect("no overflow")
            .expect("copy");
        assert_eq!(stats.files, 1);
    }
}
