//! The frames of a copy on the wire ([`crate::api::ExportFrame`]) and as the
//! driver reads and writes them ([`Piece`]): one mapping each way. What a
//! peer sends is checked again by the receiver; here only what protobuf
//! cannot say is refused (an unknown kind, a digest of the wrong length, a
//! name that is not UTF-8).

use crate::api::export_frame::Frame as Wire;
use crate::api::tree_entry::Kind;
use crate::api::{ExportFrame, ImageData, ImageEnd, TreeData, TreeEnd, TreeEntry, Xattr};
use crate::driver::transfer::tree::{EntryKind, Meta};
use crate::driver::transfer::{Frame, Piece, TreeFrame};

/// A piece as it goes on the wire.
pub fn to_wire(piece: Piece) -> ExportFrame {
    let frame = match piece {
        Piece::Image(Frame::Data { offset, bytes }) => Wire::ImageData(ImageData { offset, data: bytes }),
        Piece::Image(Frame::End { size, digest }) => Wire::ImageEnd(ImageEnd { size, digest: digest.to_vec() }),
        Piece::Tree(TreeFrame::Entry { path, kind, meta }) => Wire::TreeEntry(entry(path, kind, meta)),
        Piece::Tree(TreeFrame::Link { path, target }) => {
            Wire::TreeEntry(TreeEntry { path, kind: Kind::HardLink as i32, target, ..Default::default() })
        }
        Piece::Tree(TreeFrame::Data { offset, bytes }) => Wire::TreeData(TreeData { offset, data: bytes }),
        Piece::Tree(TreeFrame::End { entries, files, data_bytes, digest }) => {
            Wire::TreeEnd(TreeEnd { entries, files, data_bytes, digest: digest.to_vec() })
        }
    };
    ExportFrame { frame: Some(frame) }
}

fn entry(path: Vec<u8>, kind: EntryKind, meta: Meta) -> TreeEntry {
    let (kind, size, target, rdev) = match kind {
        EntryKind::Directory => (Kind::Directory, 0, Vec::new(), 0),
        EntryKind::File { length } => (Kind::File, length, Vec::new(), 0),
        EntryKind::Symlink { target } => (Kind::Symlink, 0, target, 0),
        EntryKind::Fifo => (Kind::Fifo, 0, Vec::new(), 0),
        EntryKind::CharDevice { rdev } => (Kind::CharDevice, 0, Vec::new(), rdev),
        EntryKind::BlockDevice { rdev } => (Kind::BlockDevice, 0, Vec::new(), rdev),
    };
    TreeEntry {
        path,
        kind: kind as i32,
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        atime_secs: meta.atime,
        atime_nanos: meta.atime_nsec,
        mtime_secs: meta.mtime,
        mtime_nanos: meta.mtime_nsec,
        size,
        target,
        rdev,
        xattrs: meta.xattrs.into_iter().map(|(name, value)| Xattr { name: name.into_bytes(), value }).collect(),
    }
}

/// A frame from the wire as a piece; what it cannot be is said in words.
pub fn from_wire(frame: ExportFrame) -> Result<Piece, String> {
    match frame.frame {
        Some(Wire::ImageData(ImageData { offset, data })) => Ok(Piece::Image(Frame::Data { offset, bytes: data })),
        Some(Wire::ImageEnd(ImageEnd { size, digest })) => {
            Ok(Piece::Image(Frame::End { size, digest: digest32(digest)? }))
        }
        Some(Wire::TreeEntry(entry)) => tree_entry(entry).map(Piece::Tree),
        Some(Wire::TreeData(TreeData { offset, data })) => Ok(Piece::Tree(TreeFrame::Data { offset, bytes: data })),
        Some(Wire::TreeEnd(TreeEnd { entries, files, data_bytes, digest })) => {
            Ok(Piece::Tree(TreeFrame::End { entries, files, data_bytes, digest: digest32(digest)? }))
        }
        Some(Wire::Header(_)) => Err("a second header".into()),
        None => Err("an empty frame".into()),
    }
}

fn tree_entry(entry: TreeEntry) -> Result<TreeFrame, String> {
    let kind = match Kind::try_from(entry.kind) {
        Ok(Kind::HardLink) => return Ok(TreeFrame::Link { path: entry.path, target: entry.target }),
        Ok(Kind::Directory) => EntryKind::Directory,
        Ok(Kind::File) => EntryKind::File { length: entry.size },
        Ok(Kind::Symlink) => EntryKind::Symlink { target: entry.target },
        Ok(Kind::Fifo) => EntryKind::Fifo,
        Ok(Kind::CharDevice) => EntryKind::CharDevice { rdev: entry.rdev },
        Ok(Kind::BlockDevice) => EntryKind::BlockDevice { rdev: entry.rdev },
        Ok(Kind::Unspecified) | Err(_) => return Err(format!("an entry of unknown kind {}", entry.kind)),
    };
    let xattrs = entry
        .xattrs
        .into_iter()
        .map(|Xattr { name, value }| {
            String::from_utf8(name)
                .map(|name| (name, value))
                .map_err(|_| "an extended attribute name that is not UTF-8")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = Meta {
        mode: entry.mode,
        uid: entry.uid,
        gid: entry.gid,
        atime: entry.atime_secs,
        atime_nsec: entry.atime_nanos,
        mtime: entry.mtime_secs,
        mtime_nsec: entry.mtime_nanos,
        xattrs,
    };
    Ok(TreeFrame::Entry { path: entry.path, kind, meta })
}

fn digest32(digest: Vec<u8>) -> Result<[u8; 32], String> {
    digest.try_into().map_err(|_| "a digest that is not 32 bytes".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_crosses_the_wire_unchanged() {
        let meta = Meta {
            mode: 0o2775,
            uid: 1000,
            gid: 2000,
            atime: -5,
            atime_nsec: 7,
            mtime: 1_700_000_000,
            mtime_nsec: 999_999_999,
            xattrs: vec![("user.a".into(), b"1".to_vec()), ("trusted.b".into(), Vec::new())],
        };
        let entry = |path: &[u8], kind| Piece::Tree(TreeFrame::Entry { path: path.to_vec(), kind, meta: meta.clone() });
        let pieces = vec![
            Piece::Image(Frame::Data { offset: 4096, bytes: vec![1, 2, 3] }),
            Piece::Image(Frame::End { size: 1 << 30, digest: [9; 32] }),
            entry(b"", EntryKind::Directory),
            entry(b"f", EntryKind::File { length: 12 }),
            entry(b"s", EntryKind::Symlink { target: b"/abs/target".to_vec() }),
            entry(b"p", EntryKind::Fifo),
            entry(b"c", EntryKind::CharDevice { rdev: 0x0501 }),
            entry(b"b", EntryKind::BlockDevice { rdev: 0x0700 }),
            Piece::Tree(TreeFrame::Link { path: b"g".to_vec(), target: b"f".to_vec() }),
            Piece::Tree(TreeFrame::Data { offset: 0, bytes: b"hello".to_vec() }),
            Piece::Tree(TreeFrame::End { entries: 8, files: 1, data_bytes: 5, digest: [3; 32] }),
        ];
        for piece in pieces {
            assert_eq!(from_wire(to_wire(piece.clone())).unwrap(), piece);
        }
    }

    #[test]
    fn what_protobuf_cannot_say_is_refused() {
        let unknown = ExportFrame { frame: Some(Wire::TreeEntry(TreeEntry { kind: 42, ..Default::default() })) };
        assert!(from_wire(unknown).unwrap_err().contains("unknown kind 42"));
        let short = ExportFrame { frame: Some(Wire::ImageEnd(ImageEnd { size: 0, digest: vec![0; 31] })) };
        assert!(from_wire(short).unwrap_err().contains("32 bytes"));
        let name = Xattr { name: vec![0xff], value: Vec::new() };
        let entry = TreeEntry { kind: Kind::File as i32, xattrs: vec![name], ..Default::default() };
        assert!(from_wire(ExportFrame { frame: Some(Wire::TreeEntry(entry)) }).unwrap_err().contains("UTF-8"));
        assert!(from_wire(ExportFrame { frame: None }).is_err());
    }
}
