//! Volume, snapshot and group snapshot ids: how they are formed and how
//! requests' ids are read.
//!
//! An id is `<key>@<node>`: `key` is 32 hex digits, the first 128 bits of
//! SHA-256 over the object's kind and its CSI name, and `node` is the node that
//! owns the object. Deriving the key from the name makes CreateVolume,
//! CreateSnapshot and CreateVolumeGroupSnapshot idempotent across crashes (a
//! retry lands on the same key, so half-made leftovers are found and finished),
//! and only the key ever becomes part of a path: names and raw ids never touch
//! the filesystem. The snapshots a group snapshot is made of have no CSI name:
//! their keys come from the group's key and each source volume's key
//! ([`Key::group_member`]).
//!
//! A snapshot kept off node too (VolumeSnapshotClass `protection: off-node`)
//! names both nodes that hold it, `<key>@<node>+<copy node>` ([`SnapshotId`]):
//! '+' is no node id's character, so the two are told apart, and the
//! controller, which keeps no state, reads from the id alone where each copy
//! lives.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The most bytes CSI allows in an id.
pub const MAX_ID_LEN: usize = 128;
/// Longest node id Loam accepts, so that every id fits CSI's 128-byte limit.
pub const MAX_NODE_ID_LEN: usize = MAX_ID_LEN - KEY_HEX_LEN - 1;
/// Most bytes the two node ids of a snapshot kept off node may hold together:
/// what is left of the 128 bytes after the key, '@' and '+'.
pub const MAX_HOLDERS_LEN: usize = MAX_ID_LEN - KEY_HEX_LEN - 2;
/// Separates the two holders of a snapshot kept off node.
const COPY_SEPARATOR: char = '+';
/// Longest volume or snapshot name Loam accepts.
pub const MAX_NAME_LEN: usize = 1024;
const KEY_HEX_LEN: usize = 32;

/// What an id names; each kind's names are a separate namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A volume.
    Volume,
    /// A snapshot.
    Snapshot,
    /// A volume group snapshot.
    GroupSnapshot,
}

impl Kind {
    /// The kind in words, as keys are hashed and messages name it.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::GroupSnapshot => "group snapshot",
        }
    }
}

/// Hashed before a group member's keys: no kind's label, so a member's key
/// can never be the key of a snapshot some CSI name gives.
const GROUP_MEMBER_LABEL: &str = "group snapshot member";

/// The on-disk key of a volume or snapshot: 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key([u8; 16]);

impl Key {
    /// The key of the object of `kind` called `name`.
    pub fn for_name(kind: Kind, name: &str) -> Key {
        let digest = Sha256::new().chain_update(kind.label()).chain_update([0u8]).chain_update(name).finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        Key(key)
    }

    /// The key of the snapshot of volume `volume` in group snapshot `group`:
    /// the same on every retry, so a crashed attempt's members are found.
    pub fn group_member(group: &Key, volume: &Key) -> Key {
        let digest = Sha256::new()
            .chain_update(GROUP_MEMBER_LABEL)
            .chain_update([0u8])
            .chain_update(group.0)
            .chain_update(volume.0)
            .finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        Key(key)
    }

    /// Parses a key written by [`Key`]'s `Display`, and nothing else.
    pub fn parse(text: &str) -> Option<Key> {
        let bytes = text.as_bytes();
        if bytes.len() != KEY_HEX_LEN {
            return None;
        }
        let mut key = [0u8; 16];
        for (i, pair) in bytes.chunks(2).enumerate() {
            key[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(Key(key))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A parsed volume or snapshot id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectId {
    /// The on-disk key.
    pub key: Key,
    /// The node that owns the object.
    pub node: String,
}

impl ObjectId {
    /// The id of the object of `kind` called `name`, owned by `node`.
    pub fn for_name(kind: Kind, name: &str, node: &str) -> ObjectId {
        ObjectId { key: Key::for_name(kind, name), node: node.to_owned() }
    }

    /// Parses an id from a request; `None` when it is not one Loam made.
    pub fn parse(text: &str) -> Option<ObjectId> {
        let (key, node) = text.split_once('@')?;
        let key = Key::parse(key)?;
        validate_node_id(node).ok()?;
        Some(ObjectId { key, node: node.to_owned() })
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.key, self.node)
    }
}

/// A parsed snapshot id: held by one node, or by two when it is kept off
/// node too (see the module's description).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotId {
    /// The on-disk key, the same on both nodes.
    pub key: Key,
    /// The node whose volume it was cut from.
    pub node: String,
    /// The other node holding a copy of it, when it is kept off node.
    pub copy: Option<String>,
}

impl SnapshotId {
    /// The id of the snapshot `key` cut on `node` and copied to `copy`;
    /// INVALID_ARGUMENT when the two node ids do not fit in one CSI id
    /// together (nothing is shortened: the id is how the controller finds
    /// both copies).
    pub fn off_node(key: Key, node: &str, copy: &str) -> Result<SnapshotId> {
        if node == copy {
            return Err(Error::InvalidArgument(format!(
                "the copy of a snapshot of node {node} must be on another node"
            )));
        }
        let holders = node.len() + copy.len();
        if holders > MAX_HOLDERS_LEN {
            return Err(Error::InvalidArgument(format!(
                "snapshot ids name both nodes that hold a snapshot kept off node, and CSI ids are at most \
                 {MAX_ID_LEN} bytes: node ids {node} and {copy} take {holders} bytes together, more than the \
                 {MAX_HOLDERS_LEN} that fit; use shorter node names, or a VolumeSnapshotClass without \
                 protection: off-node"
            )));
        }
        Ok(SnapshotId { key, node: node.to_owned(), copy: Some(copy.to_owned()) })
    }

    /// Parses a snapshot id from a request; `None` when it is not one Loam made.
    pub fn parse(text: &str) -> Option<SnapshotId> {
        let (key, nodes) = text.split_once('@')?;
        let key = Key::parse(key)?;
        let (node, copy) = match nodes.split_once(COPY_SEPARATOR) {
            Some((node, copy)) => {
                validate_node_id(copy).ok()?;
                (node, Some(copy.to_owned()))
            }
            None => (nodes, None),
        };
        validate_node_id(node).ok()?;
        if text.len() > MAX_ID_LEN || copy.as_deref() == Some(node) {
            return None;
        }
        Some(SnapshotId { key, node: node.to_owned(), copy })
    }

    /// The nodes holding it: its own node first, then the copy's.
    pub fn holders(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.node.as_str()).chain(self.copy.as_deref())
    }

    /// Whether `node` holds it.
    pub fn is_held_by(&self, node: &str) -> bool {
        self.holders().any(|n| n == node)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.key, self.node)?;
        match &self.copy {
            Some(copy) => write!(f, "{COPY_SEPARATOR}{copy}"),
            None => Ok(()),
        }
    }
}

/// Checks a node id: 1 to [`MAX_NODE_ID_LEN`] bytes of letters, digits, `.`,
/// `-` and `_` (every Kubernetes node name of that length qualifies).
pub fn validate_node_id(node: &str) -> Result<()> {
    let ok = !node.is_empty()
        && node.len() <= MAX_NODE_ID_LEN
        && node.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "node id {} is not usable: it must be 1 to {MAX_NODE_ID_LEN} bytes of letters, digits, '.', '-' or '_'",
            crate::error::quote(node)
        )))
    }
}

/// Checks a CSI volume or snapshot name from a request.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} name is required")));
    }
    if name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(Error::InvalidArgument(format!("{what} name must be at most {MAX_NAME_LEN} bytes without NUL")));
    }
    Ok(())
}

/// Whether `asked` names the same ids as `recorded`, in any order.
pub fn same_ids(asked: &[String], recorded: &[String]) -> bool {
    let sorted = |ids: &[String]| {
        let mut ids = ids.to_vec();
        ids.sort();
        ids
    };
    sorted(asked) == sorted(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_fit_csi_limits() {
        let node = "n".repeat(MAX_NODE_ID_LEN);
        let id = ObjectId::for_name(Kind::Volume, "pvc-1", &node);
        let text = id.to_string();
        assert_eq!(text.len(), 128);
        assert_eq!(ObjectId::parse(&text), Some(id));
    }

    #[test]
    fn kinds_and_names_give_distinct_keys() {
        let v = Key::for_name(Kind::Volume, "a");
        assert_ne!(v, Key::for_name(Kind::Snapshot, "a"));
        assert_ne!(v, Key::for_name(Kind::Volume, "b"));
        assert_eq!(v, Key::for_name(Kind::Volume, "a"));
    }

    #[test]
    fn membership_ignores_order_but_not_content() {
        let ids = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(same_ids(&ids(&["b", "a"]), &ids(&["a", "b"])));
        assert!(!same_ids(&ids(&["a"]), &ids(&["a", "b"])));
        assert!(!same_ids(&ids(&["a", "a"]), &ids(&["a", "b"])));
        assert!(!same_ids(&ids(&["a", "c"]), &ids(&["a", "b"])));
    }

    #[test]
    fn group_members_have_their_own_stable_keys() {
        let (group, volume) = (Key::for_name(Kind::GroupSnapshot, "g"), Key::for_name(Kind::Volume, "v"));
        let member = Key::group_member(&group, &volume);
        assert_eq!(member, Key::group_member(&group, &volume));
        assert_ne!(member, Key::group_member(&Key::for_name(Kind::GroupSnapshot, "h"), &volume));
        assert_ne!(member, Key::group_member(&group, &Key::for_name(Kind::Volume, "w")));
        // Swapping the two keys is another member, not the same one.
        assert_ne!(member, Key::group_member(&volume, &group));
        // Group snapshots are a namespace of their own.
        assert_ne!(group, Key::for_name(Kind::Snapshot, "g"));
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "@node",
            "../../etc@node",
            "0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdef@",
            "0123456789abcdef0123456789abcdef@../x",
            "0123456789abcdef0123456789abcdef@a/b",
            "0123456789ABCDEF0123456789abcdef@node",
            "0123456789abcdef0123456789abcde\0@node",
            "/0123456789abcdef0123456789abcdef@node",
        ] {
            assert_eq!(ObjectId::parse(bad), None, "{bad:?}");
        }
        let long = format!("{}@{}", "0".repeat(32), "n".repeat(MAX_NODE_ID_LEN + 1));
        assert_eq!(ObjectId::parse(&long), None);
    }

    #[test]
    fn snapshots_kept_off_node_name_both_holders_within_128_bytes() {
        let key = Key::for_name(Kind::Snapshot, "snap");
        let id = SnapshotId::off_node(key, "node-a", "node-b").unwrap();
        let text = id.to_string();
        assert_eq!(text, format!("{key}@node-a+node-b"));
        assert_eq!(SnapshotId::parse(&text), Some(id.clone()));
        assert_eq!(id.holders().collect::<Vec<_>>(), ["node-a", "node-b"]);
        assert!(id.is_held_by("node-b") && !id.is_held_by("node-c"));
        // A plain id parses too, with one holder; a volume id never has two.
        let plain = SnapshotId::parse(&format!("{key}@node-a")).unwrap();
        assert_eq!((plain.node.as_str(), plain.copy), ("node-a", None));
        assert_eq!(ObjectId::parse(&text), None);

        // Exactly 128 bytes fit; one more is refused, not shortened.
        let (a, b) = ("a".repeat(47), "b".repeat(MAX_HOLDERS_LEN - 47));
        let longest = SnapshotId::off_node(key, &a, &b).unwrap().to_string();
        assert_eq!(longest.len(), MAX_ID_LEN);
        assert!(SnapshotId::parse(&longest).is_some());
        let err = SnapshotId::off_node(key, &a, &format!("{b}b")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("more than the 94 that fit"), "{err}");
        assert_eq!(SnapshotId::parse(&format!("{longest}b")), None);
        assert_eq!(SnapshotId::off_node(key, "n", "n").unwrap_err().code(), tonic::Code::InvalidArgument);

        for bad in ["@a+b", "{key}@a+", "{key}@+b", "{key}@a+b+c", "{key}@a+a", "{key}@a+b/c"] {
            let bad = bad.replace("{key}", &key.to_string());
            assert_eq!(SnapshotId::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("volume", "").is_err());
        assert!(validate_name("volume", "a\0b").is_err());
        assert!(validate_name("volume", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_name("volume", "../../../etc/passwd").is_ok());
    }
}
