//! A volume's content as a stream of frames, for copying it to another node:
//! [`Sender`] reads it, [`Receiver`] writes and checks it.
//!
//! A `loop` volume's image travels as [`Frame`]s: the sending side reads only the image's data ranges (holes are never
//! sent), the receiving side writes them into a new file at the same offsets
//! and, at the end, reads back what it wrote and checks it against the
//! sender's digest. A stream that ends early, arrives damaged or out of order
//! never yields a finished image: the caller removes the partial file.
//!
//! The digest is SHA-256 over every data frame as `offset (u64 LE) || length
//! (u64 LE) || bytes`, in order, then the image's size (u64 LE). Both sides
//! hash the same frames, so it checks the bytes on the receiver's disk against
//! the bytes the sender read, whatever the two filesystems' extent maps are.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::kernel::blockfs;
use crate::kernel::copy::data_ranges;
use crate::records::Provisioning;

pub mod tree;

pub use tree::{TreeFrame, TreeReceiver, TreeSender};

/// The most bytes one data frame carries: bounds what either side holds in
/// memory per frame, whatever the peer sends.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// One piece of an image on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `bytes` belong at `offset` of the image.
    Data {
        /// Where in the image.
        offset: u64,
        /// At most [`MAX_FRAME_BYTES`].
        bytes: Vec<u8>,
    },
    /// The image is `size` bytes long; `digest` covers every data frame sent.
    End {
        /// The image's length (holes included).
        size: u64,
        /// See the module's description.
        digest: [u8; 32],
    },
}

/// What a copy carries: decided by the source's backend, and the target's
/// must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A `loop` volume's image.
    Image,
    /// A `dir` volume's files.
    Tree,
}

impl Carried {
    /// What it is, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Carried::Image => "a loop volume's image",
            Carried::Tree => "a dir volume's files",
        }
    }
}

/// One frame of a copy, whatever it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A frame of an image.
    Image(Frame),
    /// A frame of a tree.
    Tree(TreeFrame),
}

impl Piece {
    /// The bytes of content it carries.
    pub fn data_len(&self) -> u64 {
        match self {
            Piece::Image(Frame::Data { bytes, .. }) | Piece::Tree(TreeFrame::Data { bytes, .. }) => bytes.len() as u64,
            Piece::Image(Frame::End { .. }) | Piece::Tree(_) => 0,
        }
    }
}

/// Reads the content of a volume or snapshot as pieces.
#[derive(Debug)]
pub enum Sender {
    /// An image's frames.
    Image(ImageSender),
    /// A tree's frames (boxed: its walk state is large).
    Tree(Box<TreeSender>),
}

impl Sender {
    /// Opens what `carried` says is at `path` (never through a symlink); its
    /// content must not change while it is sent.
    pub fn open(carried: Carried, path: &Path) -> io::Result<Sender> {
        match carried {
            Carried::Image => ImageSender::open(path).map(Sender::Image),
            Carried::Tree => TreeSender::open(path).map(|tree| Sender::Tree(Box::new(tree))),
        }
    }

    /// What it sends.
    pub fn carried(&self) -> Carried {
        match self {
            Sender::Image(_) => Carried::Image,
            Sender::Tree(_) => Carried::Tree,
        }
    }

    /// The bytes of data it will send (holes are not sent), for progress;
    /// 0 when not known before the end (a tree is walked as it is sent).
    pub fn data_bytes(&self) -> u64 {
        match self {
            Sender::Image(image) => image.data_bytes,
            Sender::Tree(_) => 0,
        }
    }
}

impl Iterator for Sender {
    type Item = io::Result<Piece>;

    fn next(&mut self) -> Option<io::Result<Piece>> {
        match self {
            Sender::Image(image) => image.next().map(|frame| frame.map(Piece::Image)),
            Sender::Tree(tree) => tree.next().map(|frame| frame.map(Piece::Tree)),
        }
    }
}

/// Writes pieces into new storage and checks it at the end.
#[derive(Debug)]
pub enum Receiver {
    /// Into a new image file.
    Image(ImageReceiver),
    /// Into a new, empty directory (boxed: its state is large).
    Tree(Box<TreeReceiver>),
}

impl Receiver {
    /// Starts receiving `carried` at `path`: the image file to create (it
    /// must not exist), allocated in full when `provisioning` is thick; or
    /// the tree's root, an existing empty directory.
    pub fn create(carried: Carried, path: &Path, provisioning: Provisioning) -> io::Result<Receiver> {
        match carried {
            Carried::Image => ImageReceiver::create(path, provisioning).map(Receiver::Image),
            Carried::Tree => TreeReceiver::new(path).map(|tree| Receiver::Tree(Box::new(tree))),
        }
    }

    /// Takes the next piece; returns the bytes of data received once the end
    /// arrived and checked out, durably written.
    pub fn apply(&mut self, piece: Piece) -> Result<Option<u64>, ReceiveError> {
        match (self, piece) {
            (Receiver::Image(image), Piece::Image(frame)) => Ok(image.apply(frame)?.map(|r| r.data_bytes)),
            (Receiver::Tree(tree), Piece::Tree(frame)) => Ok(tree.apply(frame)?.map(|r| r.data_bytes)),
            _ => Err(ReceiveError::Malformed("a frame of another kind of content".into())),
        }
    }
}

/// Reads an image as frames: its data ranges in order, cut to
/// [`MAX_FRAME_BYTES`], then the end frame.
#[derive(Debug)]
pub struct ImageSender {
    file: File,
    size: u64,
    ranges: std::vec::IntoIter<Range<u64>>,
    current: Range<u64>,
    digest: Sha256,
    ended: bool,
    data_bytes: u64,
}

impl ImageSender {
    /// Opens the image at `path` (never through a symlink). Its content must
    /// not change while it is sent: the caller freezes or snapshots it.
    pub fn open(path: &Path) -> io::Result<ImageSender> {
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        let size = file.metadata()?.len();
        let ranges = data_ranges(&file, size)?;
        let data_bytes = ranges.iter().map(|r| r.end - r.start).sum();
        Ok(ImageSender {
            file,
            size,
            ranges: ranges.into_iter(),
            current: 0..0,
            digest: Sha256::new(),
            ended: false,
            data_bytes,
        })
    }

    fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        while self.current.is_empty() {
            match self.ranges.next() {
                Some(range) => self.current = range,
                None if self.ended => return Ok(None),
                None => {
                    self.ended = true;
                    self.digest.update(self.size.to_le_bytes());
                    let digest = std::mem::take(&mut self.digest).finalize().into();
                    return Ok(Some(Frame::End { size: self.size, digest }));
                }
            }
        }
        let offset = self.current.start;
        let len = (self.current.end - offset).min(MAX_FRAME_BYTES as u64);
        let mut bytes = vec![0; usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?];
        self.file.read_exact_at(&mut bytes, offset)?;
        self.current.start += len;
        hash_frame(&mut self.digest, offset, &bytes);
        Ok(Some(Frame::Data { offset, bytes }))
    }
}

impl Iterator for ImageSender {
    type Item = io::Result<Frame>;

    fn next(&mut self) -> Option<io::Result<Frame>> {
        self.next_frame().transpose()
    }
}

/// What a completed receive wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The image's length.
    pub size: u64,
    /// Data bytes written (the rest are holes, or allocated zeroes when thick).
    pub data_bytes: u64,
}

/// Why a stream was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The peer broke the protocol: frames out of order or overlapping, too
    /// large, past the end, a path that leaves the root or names something
    /// that exists, or anything after the end frame.
    #[error("the copy's stream is malformed: {0}")]
    Malformed(String),
    /// What was written does not match what was sent.
    #[error("the copy does not match its source (digest mismatch); remove the partial copy and retry")]
    Mismatch,
    /// Writing or reading back what was received failed.
    #[error("writing the copy: {0}")]
    Io(#[from] io::Error),
}

impl From<rustix::io::Errno> for ReceiveError {
    fn from(errno: rustix::io::Errno) -> ReceiveError {
        ReceiveError::Io(errno.into())
    }
}

/// Writes frames into a new image file and checks it at the end.
#[derive(Debug)]
pub struct ImageReceiver {
    file: File,
    provisioning: Provisioning,
    /// Where the next data frame may start (frames are in order and never overlap).
    next_offset: u64,
    /// Every data frame written, to read back at the end.
    written: Vec<(u64, u64)>,
    data_bytes: u64,
    done: bool,
}

impl ImageReceiver {
    /// Creates the file at `path`, which must not exist (a leftover of an
    /// earlier attempt is the caller's to remove first).
    pub fn create(path: &Path, provisioning: Provisioning) -> io::Result<ImageReceiver> {
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        Ok(ImageReceiver { file, provisioning, next_offset: 0, written: Vec::new(), data_bytes: 0, done: false })
    }

    /// Takes the next frame; returns what was received once the end frame
    /// arrived and checked out, durably written.
    pub fn apply(&mut self, frame: Frame) -> Result<Option<Received>, ReceiveError> {
        if self.done {
            return Err(ReceiveError::Malformed("a frame after the end".into()));
        }
        match frame {
            Frame::Data { offset, bytes } => {
                if bytes.is_empty() || bytes.len() > MAX_FRAME_BYTES {
                    return Err(ReceiveError::Malformed(format!(
                        "a data frame of {} bytes (1 to {MAX_FRAME_BYTES})",
                        bytes.len()
                    )));
                }
                if offset < self.next_offset {
                    return Err(ReceiveError::Malformed(format!(
                        "data at {offset} overlaps or precedes data already written up to {}",
                        self.next_offset
                    )));
                }
                let len = bytes.len() as u64;
                let end = offset.checked_add(len).ok_or_else(|| ReceiveError::Malformed("offset overflows".into()))?;
                self.file.write_all_at(&bytes, offset)?;
                self.written.push((offset, len));
                self.next_offset = end;
                self.data_bytes += len;
                Ok(None)
            }
            Frame::End { size, digest } => {
                if size < self.next_offset {
                    return Err(ReceiveError::Malformed(format!(
                        "data up to {} in an image of {size} bytes",
                        self.next_offset
                    )));
                }
                self.done = true;
                self.file.set_len(size)?;
                if self.provisioning == Provisioning::Thick {
                    blockfs::allocate(&self.file, size)?;
                }
                self.file.sync_all()?;
                if self.read_back_digest(size)? != digest {
                    return Err(ReceiveError::Mismatch);
                }
                Ok(Some(Received { size, data_bytes: self.data_bytes }))
            }
        }
    }

    /// The digest of what is on disk at the frames received.
    fn read_back_digest(&self, size: u64) -> io::Result<[u8; 32]> {
        let mut digest = Sha256::new();
        let mut bytes = Vec::new();
        for &(offset, len) in &self.written {
            bytes.resize(usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?, 0);
            self.file.read_exact_at(&mut bytes, offset)?;
            hash_frame(&mut digest, offset, &bytes);
        }
        digest.update(size.to_le_bytes());
        Ok(digest.finalize().into())
    }
}

fn hash_frame(digest: &mut Sha256, offset: u64, bytes: &[u8]) {
    digest.update(offset.to_le_bytes());
    digest.update((bytes.len() as u64).to_le_bytes());
    digest.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse image: data at the start, in the middle (across a frame
    /// boundary) and at the very end, holes between.
    fn sparse_image(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("source.img");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 0).unwrap();
        file.write_all_at(&vec![9u8; (3 << 20) + 5], 10 << 20).unwrap();
        file.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        file.sync_all().unwrap();
        path
    }

    fn receive(frames: impl IntoIterator<Item = Frame>, to: &Path) -> Result<Option<Received>, ReceiveError> {
        let mut receiver = ImageReceiver::create(to, Provisioning::Thin)?;
        let mut last = None;
        for frame in frames {
            last = receiver.apply(frame)?;
        }
        Ok(last)
    }

    #[test]
    fn a_sparse_image_arrives_whole_with_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let source = sparse_image(dir.path());
        let frames: Vec<Frame> = ImageSender::open(&source).unwrap().map(Result::unwrap).collect();
        assert!(matches!(frames.last(), Some(Frame::End { size, .. }) if *size == 64 << 20));
        let sent: u64 = frames
            .iter()
            .map(|f| match f {
                Frame::Data { bytes, .. } => bytes.len() as u64,
                Frame::End { .. } => 0,
            })
            .sum();
        assert!(sent < 8 << 20, "holes are not sent: {sent} bytes of a 64 MiB image with 3 MiB of data");
        assert!(frames.iter().all(|f| !matches!(f, Frame::Data { bytes, .. } if bytes.len() > MAX_FRAME_BYTES)));

        let target = dir.path().join("target.img");
        let received = receive(frames, &target).unwrap().expect("complete");
        assert_eq!(received.size, 64 << 20);
        assert_eq!(std::fs::read(&source).unwrap(), std::fs::read(&target).unwrap(), "the same bytes");
        assert!(blockfs::allocated_bytes(&target).unwrap() < 8 << 20, "the copy stays sparse");
    }

    #[test]
    fn a_thick_target_is_allocated_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let source = sparse_image(dir.path());
        let target = dir.path().join("thick.img");
        let mut receiver = ImageReceiver::create(&target, Provisioning::Thick).unwrap();
        for frame in ImageSender::open(&source).unwrap() {
            receiver.apply(frame.unwrap()).unwrap();
        }
        assert!(blockfs::allocated_bytes(&target).unwrap() >= 64 << 20);
        assert_eq!(std::fs::read(&source).unwrap(), std::fs::read(&target).unwrap());
    }

    #[test]
    fn a_byte_changed_in_transit_fails_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let source = sparse_image(dir.path());
        let mut frames: Vec<Frame> = ImageSender::open(&source).unwrap().map(Result::unwrap).collect();
        if let Some(Frame::Data { bytes, .. }) = frames.get_mut(1) {
            bytes[17] ^= 1;
        }
        let err = receive(frames, &dir.path().join("target.img")).unwrap_err();
        assert!(matches!(err, ReceiveError::Mismatch), "{err}");
    }

    #[test]
    fn a_stream_cut_short_is_never_complete() {
        let dir = tempfile::tempdir().unwrap();
        let source = sparse_image(dir.path());
        let mut frames: Vec<Frame> = ImageSender::open(&source).unwrap().map(Result::unwrap).collect();
        frames.pop();
        assert_eq!(receive(frames, &dir.path().join("target.img")).unwrap(), None);
    }

    #[test]
    fn malformed_streams_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let digest = [0; 32];
        let data = |offset, len| Frame::Data { offset, bytes: vec![1; len] };
        let cases = [
            ("overlap", vec![data(0, 10), data(5, 10)]),
            ("out of order", vec![data(100, 10), data(0, 10)]),
            ("too large", vec![data(0, MAX_FRAME_BYTES + 1)]),
            ("empty", vec![data(0, 0)]),
            ("past the end", vec![data(100, 10), Frame::End { size: 50, digest }]),
            (
                "after the end",
                vec![Frame::End { size: 0, digest: Sha256::digest(0u64.to_le_bytes()).into() }, data(0, 1)],
            ),
            ("overflow", vec![data(u64::MAX - 1, 10)]),
        ];
        for (i, (what, frames)) in cases.into_iter().enumerate() {
            let err = receive(frames, &dir.path().join(format!("{i}.img"))).unwrap_err();
            assert!(matches!(err, ReceiveError::Malformed(_)), "{what}: {err}");
        }
    }

    #[test]
    fn a_leftover_target_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.img");
        std::fs::write(&target, b"earlier attempt").unwrap();
        let err = ImageReceiver::create(&target, Provisioning::Thin).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }
}
