//! A `dir` volume's directory tree as a stream of frames, for copying it to
//! another node: what [`super::ImageSender`] does for an image, for a tree.
//!
//! # The stream
//!
//! [`TreeSender`] walks the tree depth first, each directory's names in
//! byte order, and sends: the root's own [`TreeFrame::Entry`] (empty path),
//! then per object an `Entry` (a regular file's `Data` frames right after
//! it: its data ranges, holes never sent) or a [`TreeFrame::Link`] for a
//! further name of a multiply-linked file, and last [`TreeFrame::End`]. A
//! directory's descendants follow it without interruption, so the receiver
//! knows a directory is complete as soon as an entry outside it arrives.
//! Sockets are skipped (useless without their listening process); an entry
//! on another filesystem than the root (a mount point inside the volume) is
//! an error.
//!
//! # The digest
//!
//! SHA-256 over these records, integers little endian, `bytes(x)` being
//! `len(x) as u64 || x`:
//!
//! - `E`: `"E" || bytes(path) || kind`, where kind is one byte (0 directory,
//!   1 file, 2 symlink, 3 fifo, 4 char device, 5 block device) followed by
//!   the file's length (u64), the symlink's `bytes(target)` or the device's
//!   rdev (u64);
//! - `D`: `"D" || offset (u64) || bytes(data)` per data frame;
//! - `M`: `"M" || SHA-256(mode (u32) || uid (u32) || gid (u32) || atime
//!   seconds (i64) || atime nanoseconds (u32) || mtime seconds (i64) ||
//!   mtime nanoseconds (u32) || count (u64) || bytes(name) || bytes(value)
//!   per extended attribute in name order)`;
//! - `L`: `"L" || bytes(path) || bytes(target)` per hard link;
//! - `Z`: `"Z" || entries (u64) || files (u64) || data bytes (u64)`.
//!
//! In stream order, except that an entry's `M` comes after its data, and a
//! directory's `M` when the directory is complete (after its last
//! descendant's records; the root's last of all, before `Z`).
//!
//! # What the receiver checks
//!
//! [`TreeReceiver`] treats the sender as hostile: it refuses paths that are
//! absolute, hold `.`, `..`, empty components or NUL, or are longer than
//! PATH_MAX; it creates every entry with `*at` calls inside a directory it
//! created earlier from this stream and still holds open, so a symlink the
//! stream made can never redirect a later write; it never replaces
//! anything; it takes data only for the current file, in order and within
//! its length; it links only to regular files found under the root without
//! following a symlink; it bounds every frame's size.
//!
//! It computes its own digest from what it reads back after writing, not
//! from what it was sent: each entry's kind as stored (a file's length, a
//! symlink's target read back, a device's rdev), each data frame's bytes
//! read back from the file at the offsets written once the file is
//! complete, each entry's metadata (mode, owner, times, every extended
//! attribute) read back after it was applied, each hard link only if the
//! new name is the target's inode. The filesystem is synced (syncfs) before
//! the end is accepted; the read-back goes through the page cache, so it
//! checks what the filesystem holds, not the disk's media. A mismatch with
//! the sender's digest fails the copy ([`ReceiveError::Mismatch`]).
//!
//! Metadata goes on in this order, because each step can undo the one
//! before: owner (chown clears setuid/setgid and file capabilities),
//! extended attributes (an ACL is kept in step with the mode; any attribute
//! not sent, such as an ACL inherited from a default ACL, is removed), mode,
//! times (every other step changes the ctime only). A regular file's
//! metadata goes on after its data (writing clears setuid and
//! capabilities); a directory's owner and attributes when it is created,
//! its mode and times once its descendants are in (they change its mtime,
//! and a read-only mode would refuse them).
//!
//! The checks are strict by design: a receiving filesystem that cannot
//! hold what was sent (timestamps without nanoseconds, no extended
//! attributes, a security module adding its own label) fails the copy
//! rather than altering it silently.
//!
//! Memory stays bounded by the frame size per frame; each open directory
//! (one per level of depth) holds a descriptor on either side, the sender
//! keeps one directory's sorted names per level and the first name of each
//! multiply-linked file until its last name was sent, the receiver the
//! offsets of the current file's data frames.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Statx, StatxFlags, Timespec, Timestamps, XattrFlags};
use sha2::{Digest, Sha256};

use super::MAX_FRAME_BYTES;
use super::ReceiveError;
use crate::durable;
use crate::kernel::copy::data_ranges;

/// The longest path the receiver accepts, relative to the root: PATH_MAX
/// (4096) less its terminating NUL.
pub const MAX_PATH_BYTES: usize = 4095;

/// The longest name of one path component (NAME_MAX).
const MAX_NAME_BYTES: usize = 255;

/// The longest extended attribute name (XATTR_NAME_MAX).
const MAX_XATTR_NAME_BYTES: usize = 255;

/// The largest extended attribute value (XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE_BYTES: usize = 65536;

/// The most bytes of extended attributes (names and values) one entry may
/// carry: keeps an entry frame within about one data frame's size.
pub const MAX_XATTR_BYTES: usize = MAX_FRAME_BYTES;

/// Permission bits, including setuid, setgid and sticky.
const PERMISSION_BITS: u32 = 0o7777;

/// One piece of a tree on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeFrame {
    /// An object of the tree. The first frame is the root's, with an empty
    /// path; a regular file's data frames follow its entry.
    Entry {
        /// Relative to the root, components separated by `/`.
        path: Vec<u8>,
        /// What the object is.
        kind: EntryKind,
        /// Its owner, mode, times and extended attributes.
        meta: Meta,
    },
    /// A further name of a regular file sent earlier (same inode).
    Link {
        /// The new name, relative to the root.
        path: Vec<u8>,
        /// The file's first name, relative to the root.
        target: Vec<u8>,
    },
    /// `bytes` belong at `offset` of the file of the last entry.
    Data {
        /// Where in the file.
        offset: u64,
        /// 1 to [`MAX_FRAME_BYTES`] bytes.
        bytes: Vec<u8>,
    },
    /// The tree is complete.
    End {
        /// Entry and link frames sent, the root's included.
        entries: u64,
        /// Regular files sent with their data (links not counted).
        files: u64,
        /// Bytes of all data frames.
        data_bytes: u64,
        /// See the module's description.
        digest: [u8; 32],
    },
}

/// What an entry is, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory; its descendants follow.
    Directory,
    /// A regular file of `length` bytes (holes included).
    File {
        /// Its length.
        length: u64,
    },
    /// A symbolic link, never followed.
    Symlink {
        /// What it points to, as stored.
        target: Vec<u8>,
    },
    /// A named pipe.
    Fifo,
    /// A character device node.
    CharDevice {
        /// Its device number (Linux `dev_t` encoding).
        rdev: u64,
    },
    /// A block device node.
    BlockDevice {
        /// Its device number (Linux `dev_t` encoding).
        rdev: u64,
    },
}

/// An entry's metadata, as much as a copy can carry (not the ctime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, setuid, setgid and sticky included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time, seconds since the epoch.
    pub atime: i64,
    /// Access time, nanoseconds (below 1e9).
    pub atime_nsec: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanoseconds (below 1e9).
    pub mtime_nsec: u32,
    /// Every extended attribute the sender could read, in name order
    /// (as root: `user.`, `trusted.`, `security.`, POSIX ACLs).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What a tree stream carried: on completion, what was received.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Entries and links, the root's included.
    pub entries: u64,
    /// Regular files with their data (further hard links not counted).
    pub files: u64,
    /// Data bytes written (holes not counted).
    pub data_bytes: u64,
}

fn malformed(message: impl Into<String>) -> ReceiveError {
    ReceiveError::Malformed(message.into())
}

// ---------------------------------------------------------------------------
// The digest's records, shared by both sides.

fn hash_bytes(digest: &mut Sha256, bytes: &[u8]) {
    digest.update((bytes.len() as u64).to_le_bytes());
    digest.update(bytes);
}

fn hash_entry(digest: &mut Sha256, path: &[u8], kind: &EntryKind) {
    digest.update(b"E");
    hash_bytes(digest, path);
    match kind {
        EntryKind::Directory => digest.update([0]),
        EntryKind::File { length } => {
            digest.update([1]);
            digest.update(length.to_le_bytes());
        }
        EntryKind::Symlink { target } => {
            digest.update([2]);
            hash_bytes(digest, target);
        }
        EntryKind::Fifo => digest.update([3]),
        EntryKind::CharDevice { rdev } => {
            digest.update([4]);
            digest.update(rdev.to_le_bytes());
        }
        EntryKind::BlockDevice { rdev } => {
            digest.update([5]);
            digest.update(rdev.to_le_bytes());
        }
    }
}

fn hash_data(digest: &mut Sha256, offset: u64, bytes: &[u8]) {
    digest.update(b"D");
    digest.update(offset.to_le_bytes());
    hash_bytes(digest, bytes);
}

/// The hash an `M` record carries: held per open directory until it is
/// complete, so it costs 32 bytes whatever the attributes weigh.
fn meta_hash(meta: &Meta) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(meta.mode.to_le_bytes());
    digest.update(meta.uid.to_le_bytes());
    digest.update(meta.gid.to_le_bytes());
    digest.update(meta.atime.to_le_bytes());
    digest.update(meta.atime_nsec.to_le_bytes());
    digest.update(meta.mtime.to_le_bytes());
    digest.update(meta.mtime_nsec.to_le_bytes());
    digest.update((meta.xattrs.len() as u64).to_le_bytes());
    for (name, value) in &meta.xattrs {
        hash_bytes(&mut digest, name.as_bytes());
        hash_bytes(&mut digest, value);
    }
    digest.finalize().into()
}

fn hash_meta(digest: &mut Sha256, meta_hash: &[u8; 32]) {
    digest.update(b"M");
    digest.update(meta_hash);
}

fn hash_link(digest: &mut Sha256, path: &[u8], target: &[u8]) {
    digest.update(b"L");
    hash_bytes(digest, path);
    hash_bytes(digest, target);
}

fn hash_end(digest: &mut Sha256, counts: &Received) {
    digest.update(b"Z");
    digest.update(counts.entries.to_le_bytes());
    digest.update(counts.files.to_le_bytes());
    digest.update(counts.data_bytes.to_le_bytes());
}

// ---------------------------------------------------------------------------
// Reading what is stored, shared by the sender and the receiver's read-back.

/// An object whose metadata is read or written: through its own descriptor
/// (files and directories), or by name in an open directory (symlinks,
/// fifos and devices, which cannot be opened for that; their extended
/// attributes are reached through `/proc/self/fd`).
#[derive(Clone, Copy)]
enum Node<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a OsStr),
}

impl Node<'_> {
    fn statx(self) -> io::Result<Statx> {
        let (dir, name, flags) = match self {
            Node::Fd(fd) => (fd, OsStr::new(""), AtFlags::EMPTY_PATH),
            Node::At(dir, name) => (dir, name, AtFlags::SYMLINK_NOFOLLOW),
        };
        Ok(rustix::fs::statx(dir, name, flags, StatxFlags::BASIC_STATS)?)
    }

    /// The path the `l*xattr` calls take for a named node: the directory
    /// through its descriptor's magic link (followed, it is the directory
    /// itself), the name not followed.
    fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
        Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
    }

    /// Extended attribute names, sorted; none where the filesystem keeps none.
    fn xattr_names(self) -> io::Result<Vec<String>> {
        let query = || match self {
            Node::Fd(fd) => rustix::fs::flistxattr_query(fd),
            Node::At(dir, name) => rustix::fs::llistxattr_query(Node::proc_path(dir, name)),
        };
        let list = |buf: &mut [u8]| match self {
            Node::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            Node::At(dir, name) => rustix::fs::llistxattr(Node::proc_path(dir, name), buf),
        };
        let raw = match read_sized(query, list) {
            Ok(raw) => raw,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = raw
            .split(|b| *b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| {
                String::from_utf8(name.to_vec()).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("an extended attribute name is not UTF-8 ({})", String::from_utf8_lossy(name)),
                    )
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    /// One attribute's value; `None` if it went away since it was listed.
    fn xattr(self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let query = || match self {
            Node::Fd(fd) => rustix::fs::fgetxattr_query(fd, name),
            Node::At(dir, at) => rustix::fs::lgetxattr_query(Node::proc_path(dir, at), name),
        };
        let get = |buf: &mut [u8]| match self {
            Node::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
            Node::At(dir, at) => rustix::fs::lgetxattr(Node::proc_path(dir, at), name, buf),
        };
        match read_sized(query, get) {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every extended attribute, in name order, within [`MAX_XATTR_BYTES`].
    fn xattrs(self) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut xattrs = Vec::new();
        let mut total = 0;
        for name in self.xattr_names()? {
            let Some(value) = self.xattr(&name)? else { continue };
            total += name.len() + value.len();
            if total > MAX_XATTR_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {MAX_XATTR_BYTES} bytes of extended attributes, more than a copy carries"),
                ));
            }
            xattrs.push((name, value));
        }
        Ok(xattrs)
    }

    /// Makes the attributes exactly `wanted`: removes any other (such as an
    /// ACL inherited from a directory's default ACL), then sets each.
    fn set_xattrs(self, wanted: &[(String, Vec<u8>)]) -> io::Result<()> {
        for name in self.xattr_names()? {
            if wanted.iter().all(|(keep, _)| *keep != name) {
                match self {
                    Node::Fd(fd) => rustix::fs::fremovexattr(fd, name.as_str())?,
                    Node::At(dir, at) => rustix::fs::lremovexattr(Node::proc_path(dir, at), name.as_str())?,
                }
            }
        }
        for (name, value) in wanted {
            match self {
                Node::Fd(fd) => rustix::fs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty())?,
                Node::At(dir, at) => {
                    rustix::fs::lsetxattr(Node::proc_path(dir, at), name.as_str(), value, XattrFlags::empty())?;
                }
            }
        }
        Ok(())
    }

    /// The metadata as stored.
    fn meta(self) -> io::Result<Meta> {
        let stat = self.statx()?;
        Ok(Meta {
            mode: u32::from(stat.stx_mode) & PERMISSION_BITS,
            uid: stat.stx_uid,
            gid: stat.stx_gid,
            atime: stat.stx_atime.tv_sec,
            atime_nsec: stat.stx_atime.tv_nsec,
            mtime: stat.stx_mtime.tv_sec,
            mtime_nsec: stat.stx_mtime.tv_nsec,
            xattrs: self.xattrs()?,
        })
    }

    /// The kind as stored; `None` for a socket. Reads a symlink's target,
    /// which touches its atime: call before the times are applied.
    fn kind(self, stat: &Statx) -> io::Result<Option<EntryKind>> {
        let rdev = rustix::fs::makedev(stat.stx_rdev_major, stat.stx_rdev_minor);
        Ok(Some(match FileType::from_raw_mode(u32::from(stat.stx_mode)) {
            FileType::Directory => EntryKind::Directory,
            FileType::RegularFile => EntryKind::File { length: stat.stx_size },
            FileType::Symlink => {
                let Node::At(dir, name) = self else {
                    return Err(io::Error::other("a symlink is read by name, never opened"));
                };
                EntryKind::Symlink { target: rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes() }
            }
            FileType::Fifo => EntryKind::Fifo,
            FileType::CharacterDevice => EntryKind::CharDevice { rdev },
            FileType::BlockDevice => EntryKind::BlockDevice { rdev },
            FileType::Socket | FileType::Unknown => return Ok(None),
        }))
    }
}

/// Calls `read` with a buffer of the size `query` says, again if the value
/// grew in between (ERANGE).
fn read_sized(
    query: impl Fn() -> rustix::io::Result<usize>,
    read: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    loop {
        let size = query()?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0; size];
        match read(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Opens a directory or file of the source to read, without following a
/// symlink and without touching its atime where the kernel allows that
/// (owner or CAP_FOWNER).
fn open_source(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?),
        other => Ok(other?),
    }
}

/// The names in a directory but `.` and `..`, in byte order.
fn sorted_names(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    names.sort();
    Ok(names)
}

fn join(parent: &[u8], name: &OsStr) -> Vec<u8> {
    let mut path = parent.to_vec();
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(name.as_bytes());
    path
}

fn shown(path: &[u8]) -> String {
    if path.is_empty() { "the root".into() } else { String::from_utf8_lossy(path).into_owned() }
}

// ---------------------------------------------------------------------------
// Sending.

/// Reads a tree as frames (see the module's description). Its content must
/// not change while it is sent: the caller freezes or snapshots it.
#[derive(Debug)]
pub struct TreeSender {
    root: PathBuf,
    /// The root's device: an entry on another one is a mount point.
    dev: (u32, u32),
    /// The root's own entry, the first frame.
    first: Option<TreeFrame>,
    /// The directories being walked, the root at the bottom.
    open: Vec<SendingDir>,
    /// The regular file whose data frames are being sent.
    file: Option<SendingFile>,
    /// First names of multiply-linked files whose other names are still to come.
    links: HashMap<(u32, u32, u64), Linked>,
    digest: Sha256,
    counts: Received,
    done: bool,
}

#[derive(Debug)]
struct SendingDir {
    fd: OwnedFd,
    path: Vec<u8>,
    names: std::vec::IntoIter<OsString>,
    meta_hash: [u8; 32],
}

#[derive(Debug)]
struct SendingFile {
    file: File,
    path: Vec<u8>,
    ranges: std::vec::IntoIter<Range<u64>>,
    current: Range<u64>,
    meta_hash: [u8; 32],
}

#[derive(Debug)]
struct Linked {
    path: Vec<u8>,
    /// Names not yet sent.
    remaining: u32,
}

impl TreeSender {
    /// Opens the directory at `root` (itself not through a symlink).
    pub fn open(root: &Path) -> io::Result<TreeSender> {
        let fd =
            open_source(rustix::fs::CWD, root.as_os_str(), OFlags::DIRECTORY).map_err(|e| context(e, "open", root))?;
        let stat = Node::Fd(fd.as_fd()).statx().map_err(|e| context(e, "inspect", root))?;
        let meta = Node::Fd(fd.as_fd()).meta().map_err(|e| context(e, "read the metadata of", root))?;
        let names = sorted_names(&fd).map_err(|e| context(e, "list", root))?;
        let mut digest = Sha256::new();
        hash_entry(&mut digest, b"", &EntryKind::Directory);
        let root_dir = SendingDir { fd, path: Vec::new(), names: names.into_iter(), meta_hash: meta_hash(&meta) };
        Ok(TreeSender {
            root: root.to_path_buf(),
            dev: (stat.stx_dev_major, stat.stx_dev_minor),
            first: Some(TreeFrame::Entry { path: Vec::new(), kind: EntryKind::Directory, meta }),
            open: vec![root_dir],
            file: None,
            links: HashMap::new(),
            digest,
            counts: Received { entries: 1, ..Received::default() },
            done: false,
        })
    }

    fn next_frame(&mut self) -> io::Result<Option<TreeFrame>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        loop {
            if let Some(file) = &mut self.file {
                if let Some((offset, bytes)) = file.next_data(&self.root)? {
                    hash_data(&mut self.digest, offset, &bytes);
                    self.counts.data_bytes += bytes.len() as u64;
                    return Ok(Some(TreeFrame::Data { offset, bytes }));
                }
                hash_meta(&mut self.digest, &file.meta_hash);
                self.file = None;
            }
            let Some(dir) = self.open.last_mut() else {
                if self.done {
                    return Ok(None);
                }
                self.done = true;
                hash_end(&mut self.digest, &self.counts);
                let Received { entries, files, data_bytes } = self.counts;
                let digest = std::mem::take(&mut self.digest).finalize().into();
                return Ok(Some(TreeFrame::End { entries, files, data_bytes, digest }));
            };
            match dir.names.next() {
                Some(name) => {
                    if let Some(frame) = self.visit(&name)? {
                        return Ok(Some(frame));
                    }
                }
                None => {
                    // Complete: its metadata's place in the digest.
                    if let Some(done) = self.open.pop() {
                        hash_meta(&mut self.digest, &done.meta_hash);
                    }
                }
            }
        }
    }

    /// The frame for `name` in the innermost open directory; `None` for a socket.
    fn visit(&mut self, name: &OsStr) -> io::Result<Option<TreeFrame>> {
        let Some(parent) = self.open.last() else { return Ok(None) };
        let path = join(&parent.path, name);
        let full = self.root.join(OsStr::from_bytes(&path));
        let node = Node::At(parent.fd.as_fd(), name);
        let stat = node.statx().map_err(|e| context(e, "inspect", &full))?;
        if (stat.stx_dev_major, stat.stx_dev_minor) != self.dev {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("mount point inside the volume: {}; unmount it before copying the volume", full.display()),
            ));
        }
        let Some(kind) = node.kind(&stat).map_err(|e| context(e, "read", &full))? else {
            return Ok(None);
        };
        match kind {
            EntryKind::Directory => {
                let fd =
                    open_source(parent.fd.as_fd(), name, OFlags::DIRECTORY).map_err(|e| context(e, "open", &full))?;
                same_inode(&Node::Fd(fd.as_fd()).statx()?, &stat, &full)?;
                let meta = Node::Fd(fd.as_fd()).meta().map_err(|e| context(e, "read the metadata of", &full))?;
                let names = sorted_names(&fd).map_err(|e| context(e, "list", &full))?;
                self.count_entry(&path, &kind);
                self.open.push(SendingDir {
                    fd,
                    path: path.clone(),
                    names: names.into_iter(),
                    meta_hash: meta_hash(&meta),
                });
                Ok(Some(TreeFrame::Entry { path, kind, meta }))
            }
            EntryKind::File { .. } => {
                if stat.stx_nlink > 1 {
                    let key = (stat.stx_dev_major, stat.stx_dev_minor, stat.stx_ino);
                    if let Some(linked) = self.links.get_mut(&key) {
                        let target = linked.path.clone();
                        linked.remaining -= 1;
                        if linked.remaining == 0 {
                            self.links.remove(&key);
                        }
                        hash_link(&mut self.digest, &path, &target);
                        self.counts.entries += 1;
                        return Ok(Some(TreeFrame::Link { path, target }));
                    }
                    self.links.insert(key, Linked { path: path.clone(), remaining: stat.stx_nlink - 1 });
                }
                let file = File::from(
                    open_source(parent.fd.as_fd(), name, OFlags::empty()).map_err(|e| context(e, "open", &full))?,
                );
                let opened = Node::Fd(file.as_fd()).statx()?;
                same_inode(&opened, &stat, &full)?;
                let meta = Node::Fd(file.as_fd()).meta().map_err(|e| context(e, "read the metadata of", &full))?;
                let length = opened.stx_size;
                let ranges = data_ranges(&file, length).map_err(|e| context(e, "map the data of", &full))?;
                let kind = EntryKind::File { length };
                self.count_entry(&path, &kind);
                self.counts.files += 1;
                self.file = Some(SendingFile {
                    file,
                    path: path.clone(),
                    ranges: ranges.into_iter(),
                    current: 0..0,
                    meta_hash: meta_hash(&meta),
                });
                Ok(Some(TreeFrame::Entry { path, kind, meta }))
            }
            EntryKind::Symlink { .. }
            | EntryKind::Fifo
            | EntryKind::CharDevice { .. }
            | EntryKind::BlockDevice { .. } => {
                let meta = node.meta().map_err(|e| context(e, "read the metadata of", &full))?;
                self.count_entry(&path, &kind);
                hash_meta(&mut self.digest, &meta_hash(&meta));
                Ok(Some(TreeFrame::Entry { path, kind, meta }))
            }
        }
    }

    fn count_entry(&mut self, path: &[u8], kind: &EntryKind) {
        hash_entry(&mut self.digest, path, kind);
        self.counts.entries += 1;
    }
}

impl Iterator for TreeSender {
    type Item = io::Result<TreeFrame>;

    /// The next frame; after an error, nothing more.
    fn next(&mut self) -> Option<io::Result<TreeFrame>> {
        let next = self.next_frame().transpose();
        if matches!(next, Some(Err(_))) {
            self.done = true;
            self.open.clear();
            self.file = None;
        }
        next
    }
}

impl SendingFile {
    /// The next piece of data, at most [`MAX_FRAME_BYTES`], and its offset.
    fn next_data(&mut self, root: &Path) -> io::Result<Option<(u64, Vec<u8>)>> {
        while self.current.is_empty() {
            match self.ranges.next() {
                Some(range) => self.current = range,
                None => return Ok(None),
            }
        }
        let offset = self.current.start;
        let len = (self.current.end - offset).min(MAX_FRAME_BYTES as u64);
        let mut bytes = vec![0; usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?];
        self.file.read_exact_at(&mut bytes, offset).map_err(|e| {
            let full = root.join(OsStr::from_bytes(&self.path));
            context(e, "read (did it change during the copy?)", &full)
        })?;
        self.current.start += len;
        Ok(Some((offset, bytes)))
    }
}

/// Refuses a name that was swapped for another object between the look-up and the open.
fn same_inode(opened: &Statx, listed: &Statx, path: &Path) -> io::Result<()> {
    let id = |s: &Statx| (s.stx_dev_major, s.stx_dev_minor, s.stx_ino);
    if id(opened) == id(listed) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} changed during the copy; copy from a frozen or snapshotted volume",
            path.display()
        )))
    }
}

fn context(err: impl Into<io::Error>, what: &str, path: &Path) -> io::Error {
    let err = err.into();
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

// ---------------------------------------------------------------------------
// Receiving.

/// Writes a tree stream into an empty directory and checks it at the end
/// (see the module's description). On any error the directory holds a
/// partial copy, which the caller removes.
#[derive(Debug)]
pub struct TreeReceiver {
    root: PathBuf,
    /// The root, where hard link targets are looked up from.
    root_fd: OwnedFd,
    phase: Phase,
    /// The directories that may still receive entries, the root at the bottom.
    open: Vec<ReceivingDir>,
    /// The regular file whose data frames are arriving.
    file: Option<ReceivingFile>,
    check: ReadBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing yet: the root's entry comes first.
    Start,
    Receiving,
    /// The end frame checked out.
    Ended,
    /// An error ended the stream.
    Failed,
}

/// A directory created from the stream, waiting for its descendants before
/// its mode and times go on (owner and attributes are on already).
#[derive(Debug)]
struct ReceivingDir {
    path: Vec<u8>,
    fd: OwnedFd,
    mode: u32,
    times: Timestamps,
}

#[derive(Debug)]
struct ReceivingFile {
    path: Vec<u8>,
    file: File,
    length: u64,
    meta: Meta,
    /// Where the next data frame may start.
    next_offset: u64,
    /// Every data frame written, to read back once the file is complete.
    written: Vec<(u64, u64)>,
}

/// The receiver's digest over what it reads back, and its counts.
#[derive(Debug, Default)]
struct ReadBack {
    digest: Sha256,
    counts: Received,
}

impl TreeReceiver {
    /// Prepares to write into the existing, empty directory `root` (itself
    /// not through a symlink), which takes the sent root's metadata.
    pub fn new(root: &Path) -> io::Result<TreeReceiver> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let root_fd = rustix::fs::open(root, flags, Mode::empty()).map_err(|e| context(e, "open", root))?;
        if !sorted_names(&root_fd)?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                format!("{} is not empty; a tree is copied into an empty directory only", root.display()),
            ));
        }
        Ok(TreeReceiver {
            root: root.to_path_buf(),
            root_fd,
            phase: Phase::Start,
            open: Vec::new(),
            file: None,
            check: ReadBack::default(),
        })
    }

    /// Data bytes written so far, for progress reports.
    pub fn bytes_received(&self) -> u64 {
        self.check.counts.data_bytes
    }

    /// Takes the next frame; returns what was received once the end frame
    /// arrived and the tree, read back, matched its digest, durably written.
    /// After an error the stream is over: every later frame is refused.
    pub fn apply(&mut self, frame: TreeFrame) -> Result<Option<Received>, ReceiveError> {
        let result = match self.phase {
            Phase::Start => self.start(frame).map(|()| None).map_err(|e| locate(e, &self.root, b"")),
            Phase::Receiving => self.receive(frame),
            Phase::Ended => Err(malformed("a frame after the end")),
            Phase::Failed => Err(malformed("a frame after the stream failed")),
        };
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    fn start(&mut self, frame: TreeFrame) -> Result<(), ReceiveError> {
        let TreeFrame::Entry { path, kind: EntryKind::Directory, meta } = frame else {
            return Err(malformed("the stream must begin with the root directory's entry"));
        };
        if !path.is_empty() {
            return Err(malformed("the stream must begin with the root directory's entry (an empty path)"));
        }
        check_meta(&meta)?;
        let fd = self.root_fd.try_clone()?;
        apply_owner_and_xattrs(Node::Fd(fd.as_fd()), &meta)?;
        hash_entry(&mut self.check.digest, b"", &EntryKind::Directory);
        self.check.counts.entries += 1;
        self.open.push(ReceivingDir { path, fd, mode: meta.mode, times: timestamps(&meta) });
        self.phase = Phase::Receiving;
        Ok(())
    }

    fn receive(&mut self, frame: TreeFrame) -> Result<Option<Received>, ReceiveError> {
        match frame {
            TreeFrame::Data { offset, bytes } => self.data(offset, &bytes).map(|()| None),
            TreeFrame::Entry { path, kind, meta } => {
                self.finish_file()?;
                let at = path.clone();
                self.entry(path, kind, meta).map(|()| None).map_err(|e| locate(e, &self.root, &at))
            }
            TreeFrame::Link { path, target } => {
                self.finish_file()?;
                self.link(&path, &target).map(|()| None).map_err(|e| locate(e, &self.root, &path))
            }
            TreeFrame::End { entries, files, data_bytes, digest } => {
                self.finish_file()?;
                while let Some(dir) = self.open.pop() {
                    self.check.close_dir(&dir).map_err(|e| locate(e, &self.root, &dir.path))?;
                }
                let sent = Received { entries, files, data_bytes };
                let counts = self.check.counts;
                if sent != counts {
                    return Err(malformed(format!("the end frame counts {sent:?}, the stream carried {counts:?}")));
                }
                durable::sync_filesystem(&self.root)?;
                hash_end(&mut self.check.digest, &counts);
                if <[u8; 32]>::from(std::mem::take(&mut self.check.digest).finalize()) != digest {
                    return Err(ReceiveError::Mismatch);
                }
                self.phase = Phase::Ended;
                Ok(Some(counts))
            }
        }
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<(), ReceiveError> {
        let Some(file) = &mut self.file else {
            return Err(malformed("a data frame that follows no regular file's entry"));
        };
        if bytes.is_empty() || bytes.len() > MAX_FRAME_BYTES {
            return Err(malformed(format!("a data frame of {} bytes (1 to {MAX_FRAME_BYTES})", bytes.len())));
        }
        let len = bytes.len() as u64;
        if offset < file.next_offset {
            return Err(malformed(format!(
                "data of {} at {offset} overlaps or precedes data already written up to {}",
                shown(&file.path),
                file.next_offset
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= file.length => {
                file.file.write_all_at(bytes, offset)?;
                file.written.push((offset, len));
                file.next_offset = end;
                self.check.counts.data_bytes += len;
                Ok(())
            }
            _ => Err(malformed(format!(
                "data of {} at {offset} ({len} bytes) beyond its length {}",
                shown(&file.path),
                file.length
            ))),
        }
    }

    fn entry(&mut self, path: Vec<u8>, kind: EntryKind, meta: Meta) -> Result<(), ReceiveError> {
        let (parent, name) = split_path(&path)?;
        check_meta(&meta)?;
        let name = OsStr::from_bytes(name);
        self.enter(parent)?;
        let Some(dir) = self.open.last().map(|dir| dir.fd.as_fd()) else {
            return Err(malformed("an entry after the root was closed"));
        };
        let exists = |e: rustix::io::Errno| match e {
            rustix::io::Errno::EXIST => malformed(format!("{} is sent twice, or exists", shown(&path))),
            e => ReceiveError::from(e),
        };
        // Private until its own mode goes on.
        let private = Mode::from_raw_mode(0o700);
        match kind {
            EntryKind::Directory => {
                rustix::fs::mkdirat(dir, name, private).map_err(exists)?;
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(io::Error::from)?;
                self.check.kind(&path, Node::Fd(fd.as_fd()))?;
                apply_owner_and_xattrs(Node::Fd(fd.as_fd()), &meta)?;
                self.check.counts.entries += 1;
                self.open.push(ReceivingDir { path, fd, mode: meta.mode, times: timestamps(&meta) });
            }
            EntryKind::File { length } => {
                if i64::try_from(length).is_err() {
                    return Err(malformed(format!("{} has a length of {length} bytes", shown(&path))));
                }
                let flags = OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::RDWR
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    // Reading it back must not touch the atime.
                    | OFlags::NOATIME;
                let fd = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600)).map_err(exists)?;
                self.check.counts.entries += 1;
                self.check.counts.files += 1;
                let file = File::from(fd);
                self.file = Some(ReceivingFile { path, file, length, meta, next_offset: 0, written: Vec::new() });
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.len() > MAX_PATH_BYTES || target.contains(&0) {
                    return Err(malformed(format!(
                        "{} has a symlink target of {} bytes, or with NUL",
                        shown(&path),
                        target.len()
                    )));
                }
                rustix::fs::symlinkat(OsStr::from_bytes(&target), dir, name).map_err(exists)?;
                self.check.node(&path, dir, name, &meta)?;
            }
            EntryKind::Fifo => {
                rustix::fs::mknodat(dir, name, FileType::Fifo, private, 0).map_err(exists)?;
                self.check.node(&path, dir, name, &meta)?;
            }
            EntryKind::CharDevice { rdev } => {
                rustix::fs::mknodat(dir, name, FileType::CharacterDevice, private, rdev).map_err(exists)?;
                self.check.node(&path, dir, name, &meta)?;
            }
            EntryKind::BlockDevice { rdev } => {
                rustix::fs::mknodat(dir, name, FileType::BlockDevice, private, rdev).map_err(exists)?;
                self.check.node(&path, dir, name, &meta)?;
            }
        }
        Ok(())
    }

    fn link(&mut self, path: &[u8], target: &[u8]) -> Result<(), ReceiveError> {
        let (parent, name) = split_path(path)?;
        let (target_parent, target_name) = split_path(target)?;
        let (target_dir, target_stat) = self.find_file(target_parent, target_name, target)?;
        let name = OsStr::from_bytes(name);
        self.enter(parent)?;
        let Some(dir) = self.open.last().map(|dir| dir.fd.as_fd()) else {
            return Err(malformed("a link after the root was closed"));
        };
        rustix::fs::linkat(&target_dir, OsStr::from_bytes(target_name), dir, name, AtFlags::empty()).map_err(|e| {
            match e {
                rustix::io::Errno::EXIST => malformed(format!("{} is sent twice, or exists", shown(path))),
                e => ReceiveError::from(e),
            }
        })?;
        let linked = Node::At(dir, name).statx()?;
        let id = |s: &Statx| (s.stx_dev_major, s.stx_dev_minor, s.stx_ino);
        if id(&linked) != id(&target_stat) {
            return Err(ReceiveError::Mismatch);
        }
        hash_link(&mut self.check.digest, path, target);
        self.check.counts.entries += 1;
        Ok(())
    }

    /// A regular file under the root, reached without following a symlink:
    /// its directory and what it is.
    fn find_file(&self, parent: &[u8], name: &[u8], target: &[u8]) -> Result<(OwnedFd, Statx), ReceiveError> {
        let not_sent =
            || malformed(format!("a hard link to {}, which is not a regular file this stream sent", shown(target)));
        let mut dir = self.root_fd.try_clone()?;
        for component in parent.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            dir = match rustix::fs::openat(&dir, OsStr::from_bytes(component), flags, Mode::empty()) {
                Ok(next) => next,
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                    return Err(not_sent());
                }
                Err(e) => return Err(e.into()),
            };
        }
        let stat = match Node::At(dir.as_fd(), OsStr::from_bytes(name)).statx() {
            Ok(stat) => stat,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(not_sent()),
            Err(e) => return Err(e.into()),
        };
        if FileType::from_raw_mode(u32::from(stat.stx_mode)) != FileType::RegularFile {
            return Err(not_sent());
        }
        Ok((dir, stat))
    }

    /// Makes the open directory `parent` the innermost one, closing every
    /// open directory that is neither it nor its ancestor: the stream has
    /// left those for good.
    fn enter(&mut self, parent: &[u8]) -> Result<(), ReceiveError> {
        while let Some(dir) = self.open.pop_if(|dir| !contains(&dir.path, parent)) {
            self.check.close_dir(&dir).map_err(|e| locate(e, &self.root, &dir.path))?;
        }
        match self.open.last() {
            Some(dir) if dir.path == parent => Ok(()),
            _ => Err(malformed(format!(
                "an entry under {}, which is not a directory this stream created and still fills",
                shown(parent)
            ))),
        }
    }

    /// Completes the current file, if any.
    fn finish_file(&mut self) -> Result<(), ReceiveError> {
        match self.file.take() {
            Some(file) => self.check.file(&file).map_err(|e| locate(e, &self.root, &file.path)),
            None => Ok(()),
        }
    }
}

impl ReadBack {
    /// Hashes a new entry's kind as stored.
    fn kind(&mut self, path: &[u8], node: Node<'_>) -> Result<(), ReceiveError> {
        let kind = node.kind(&node.statx()?)?.ok_or(ReceiveError::Mismatch)?;
        hash_entry(&mut self.digest, path, &kind);
        Ok(())
    }

    /// Completes a symlink, fifo or device node: reads back its kind (a
    /// symlink's target before its times go on, as reading it touches its
    /// atime), applies its metadata and reads that back.
    fn node(&mut self, path: &[u8], dir: BorrowedFd<'_>, name: &OsStr, meta: &Meta) -> Result<(), ReceiveError> {
        let node = Node::At(dir, name);
        self.kind(path, node)?;
        apply_owner_and_xattrs(node, meta)?;
        if FileType::from_raw_mode(u32::from(node.statx()?.stx_mode)) != FileType::Symlink {
            // Symlink modes mean nothing on Linux, and chmod would follow one.
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())?;
        }
        rustix::fs::utimensat(dir, name, &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)?;
        hash_meta(&mut self.digest, &meta_hash(&node.meta()?));
        self.counts.entries += 1;
        Ok(())
    }

    /// Completes a file: its length, then reads back its kind and data,
    /// applies its metadata (after the data, which would clear setuid and
    /// capabilities) and reads that back.
    fn file(&mut self, file: &ReceivingFile) -> Result<(), ReceiveError> {
        file.file.set_len(file.length)?;
        let node = Node::Fd(file.file.as_fd());
        self.kind(&file.path, node)?;
        let mut bytes = Vec::new();
        for &(offset, len) in &file.written {
            bytes.resize(usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?, 0);
            file.file.read_exact_at(&mut bytes, offset)?;
            hash_data(&mut self.digest, offset, &bytes);
        }
        apply_owner_and_xattrs(node, &file.meta)?;
        rustix::fs::fchmod(&file.file, Mode::from_raw_mode(file.meta.mode))?;
        rustix::fs::futimens(&file.file, &timestamps(&file.meta))?;
        hash_meta(&mut self.digest, &meta_hash(&node.meta()?));
        Ok(())
    }

    /// Applies a complete directory's mode and times, then reads its metadata back.
    fn close_dir(&mut self, dir: &ReceivingDir) -> Result<(), ReceiveError> {
        rustix::fs::fchmod(&dir.fd, Mode::from_raw_mode(dir.mode))?;
        rustix::fs::futimens(&dir.fd, &dir.times)?;
        hash_meta(&mut self.digest, &meta_hash(&Node::Fd(dir.fd.as_fd()).meta()?));
        Ok(())
    }
}

/// Names the object an I/O error is about, for the operator.
fn locate(err: ReceiveError, root: &Path, path: &[u8]) -> ReceiveError {
    match err {
        ReceiveError::Io(e) => ReceiveError::Io(context(e, "at", &root.join(OsStr::from_bytes(path)))),
        other => other,
    }
}

/// Owner first (chown clears setuid, setgid and file capabilities), then
/// the extended attributes.
fn apply_owner_and_xattrs(node: Node<'_>, meta: &Meta) -> io::Result<()> {
    // check_meta refused -1, which chown reads as "leave unchanged".
    let (uid, gid) = (rustix::fs::Uid::from_raw(meta.uid), rustix::fs::Gid::from_raw(meta.gid));
    match node {
        Node::Fd(fd) => rustix::fs::fchown(fd, Some(uid), Some(gid))?,
        Node::At(dir, name) => rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?,
    }
    node.set_xattrs(&meta.xattrs)
}

fn timestamps(meta: &Meta) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: meta.atime, tv_nsec: i64::from(meta.atime_nsec) },
        last_modification: Timespec { tv_sec: meta.mtime, tv_nsec: i64::from(meta.mtime_nsec) },
    }
}

/// Whether `path` is `dir` or under it.
fn contains(dir: &[u8], path: &[u8]) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
}

/// A sent path's parent and last component, if it is a plain relative path.
fn split_path(path: &[u8]) -> Result<(&[u8], &[u8]), ReceiveError> {
    let bad = |why: &str| malformed(format!("the path {:?} {why}", String::from_utf8_lossy(path)));
    if path.is_empty() {
        return Err(bad("is empty, and only the first entry is the root"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(bad(&format!("is longer than {MAX_PATH_BYTES} bytes")));
    }
    if path.contains(&0) {
        return Err(bad("holds a NUL byte"));
    }
    if path.starts_with(b"/") {
        return Err(bad("is absolute"));
    }
    for component in path.split(|b| *b == b'/') {
        if component.is_empty() || component == b"." || component == b".." {
            return Err(bad("has an empty, '.' or '..' component"));
        }
        if component.len() > MAX_NAME_BYTES {
            return Err(bad(&format!("has a component longer than {MAX_NAME_BYTES} bytes")));
        }
    }
    Ok(match path.iter().rposition(|b| *b == b'/') {
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => (&[][..], path),
    })
}

/// Refuses metadata the kernel would misread: bits beyond the permissions,
/// nanoseconds that mean "now" or "omit", attributes out of order or too large.
fn check_meta(meta: &Meta) -> Result<(), ReceiveError> {
    if meta.mode & !PERMISSION_BITS != 0 {
        return Err(malformed(format!("a mode of {:o} (permission bits are at most 7777)", meta.mode)));
    }
    if meta.uid == u32::MAX || meta.gid == u32::MAX {
        return Err(malformed("an owner of -1, which chown reads as \"leave unchanged\""));
    }
    if meta.atime_nsec >= 1_000_000_000 || meta.mtime_nsec >= 1_000_000_000 {
        return Err(malformed("a time with a billion nanoseconds or more"));
    }
    let mut total = 0;
    let mut previous: Option<&str> = None;
    for (name, value) in &meta.xattrs {
        if name.is_empty() || name.len() > MAX_XATTR_NAME_BYTES || name.contains('\0') {
            return Err(malformed(format!("an extended attribute name of {} bytes or with NUL", name.len())));
        }
        if previous.is_some_and(|previous| previous >= name.as_str()) {
            return Err(malformed(format!("extended attribute {name} out of order or twice")));
        }
        if value.len() > MAX_XATTR_VALUE_BYTES {
            return Err(malformed(format!("extended attribute {name} of {} bytes", value.len())));
        }
        total += name.len() + value.len();
        previous = Some(name);
    }
    if total > MAX_XATTR_BYTES {
        return Err(malformed(format!("{total} bytes of extended attributes (at most {MAX_XATTR_BYTES})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
