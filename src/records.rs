//! What Loam remembers about each volume, snapshot and group snapshot.
//!
//! These are the rows of the [`crate::store`] tables, one small JSON file
//! each. They hold only what cannot be read back from the kernel: the mount
//! table stays the authority on what is mounted, and records say what the
//! CO asked for.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::kernel::blockfs::FsType;

/// The version of the record format this build reads and writes, carried in
/// every record as `schema`. Records without the field were written before
/// it existed, in this same format. A record of a later version (written by a
/// newer Loam) is refused as damaged rather than misread: run the newer
/// version again; downgrading over its records is not supported.
pub const SCHEMA: u32 = 1;

/// The `schema` field of a record: always [`SCHEMA`] in memory, checked when
/// read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schema;

impl Serialize for Schema {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(SCHEMA)
    }
}

impl<'de> Deserialize<'de> for Schema {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Schema, D::Error> {
        match u32::deserialize(deserializer)? {
            SCHEMA => Ok(Schema),
            other => Err(serde::de::Error::custom(format!(
                "record schema {other} is not the one this version of Loam reads ({SCHEMA}); it was written by \
                 another version: run that version again"
            ))),
        }
    }
}

/// The storage engine that holds a volume or snapshot, chosen by the
/// StorageClass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A directory per volume under the driver's root.
    #[default]
    Dir,
    /// An image file per volume on a loop device.
    Loop,
}

impl BackendKind {
    /// The StorageClass's name for it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Dir => "dir",
            BackendKind::Loop => "loop",
        }
    }

    /// The backend [`BackendKind::name`] names, if any.
    pub fn parse(name: &str) -> Option<BackendKind> {
        [BackendKind::Dir, BackendKind::Loop].into_iter().find(|kind| kind.name() == name)
    }
}

/// How a volume is laid out: the backend holding it and, for `loop`, its
/// image. Stored as the `backend` tag and, for `loop`, a `loop_spec`, as
/// records have always been; a `loop` record without its spec is damaged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", content = "loop_spec", rename_all = "snake_case")]
pub enum Layout {
    /// A directory under the root.
    Dir,
    /// An image file on a loop device.
    Loop(LoopSpec),
}

impl Layout {
    /// The backend holding the volume.
    pub fn backend(&self) -> BackendKind {
        match self {
            Layout::Dir => BackendKind::Dir,
            Layout::Loop(_) => BackendKind::Loop,
        }
    }

    /// Whether every byte of the capacity is allocated up front (a thick
    /// image), so nothing is left to promise.
    pub fn thick(&self) -> bool {
        matches!(self, Layout::Loop(LoopSpec { provisioning: Provisioning::Thick, .. }))
    }
}

/// Whether a `loop` volume's image is allocated up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Every byte allocated when the image is made or grown.
    Thick,
    /// A sparse image that allocates as it is written.
    Thin,
}

impl Provisioning {
    /// Reads the StorageClass's name for it.
    pub fn parse(name: &str) -> Option<Provisioning> {
        match name {
            "thick" => Some(Provisioning::Thick),
            "thin" => Some(Provisioning::Thin),
            _ => None,
        }
    }

    /// The StorageClass's (and VolumeAttributesClass's) name for it.
    pub fn name(self) -> &'static str {
        match self {
            Provisioning::Thick => "thick",
            Provisioning::Thin => "thin",
        }
    }
}

/// Stored as `"thick": true|false`, as records have always been.
mod thick_flag {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Provisioning;

    pub fn serialize<S: Serializer>(provisioning: &Provisioning, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bool(*provisioning == Provisioning::Thick)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Provisioning, D::Error> {
        Ok(if bool::deserialize(deserializer)? { Provisioning::Thick } else { Provisioning::Thin })
    }
}

/// How a `loop` volume's image is laid out, from its StorageClass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopSpec {
    /// Filesystem of mount volumes.
    #[serde(rename = "fs_type")]
    pub fs: FsType,
    /// Whether the image is allocated up front.
    #[serde(rename = "thick", with = "thick_flag")]
    pub provisioning: Provisioning,
    /// Extra mkfs options as their words, checked when the volume was
    /// created. Kept as words, not parsed when the record loads: options a
    /// later version no longer accepts must not make the record unreadable
    /// (the volume could not even be deleted); they are refused when the
    /// image is formatted instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mkfs_options: Vec<String>,
}

/// How far formatting a `loop` volume's image got, recorded around mkfs so a
/// crash during it can be told apart from data Loam did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Formatting {
    /// mkfs was started on the image Loam made and found blank. Still so
    /// after a crash: the image holds at most a partial filesystem of
    /// Loam's own, never mounted, so the next stage formats it again.
    Started,
    /// mkfs finished; from here on the image holds the pod's data.
    Done,
}

/// The single-node access modes Loam serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    /// One node reads and writes; any number of its pods.
    SingleNodeWriter,
    /// One node reads only.
    SingleNodeReaderOnly,
    /// One pod on one node reads and writes.
    SingleNodeSingleWriter,
    /// Many pods on one node read and write.
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Whether every mount of the volume must be read-only.
    pub fn read_only(self) -> bool {
        self == AccessMode::SingleNodeReaderOnly
    }
}

/// A validated CSI volume capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// How the volume may be shared.
    pub access_mode: AccessMode,
    /// Block device instead of a filesystem.
    pub block: bool,
    /// Filesystem type asked for (empty: the backend's default).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fs_type: String,
    /// Mount flags asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_flags: Vec<String>,
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    /// Restored from this snapshot id.
    Snapshot(String),
    /// Cloned from this volume id.
    Volume(String),
}

impl ContentSource {
    /// The source's id.
    pub fn id(&self) -> &str {
        match self {
            ContentSource::Snapshot(id) | ContentSource::Volume(id) => id,
        }
    }
}

/// How a volume's capacity is enforced, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// A btrfs subvolume whose qgroup `0/<id>` limits referenced bytes.
    BtrfsQgroup(u64),
    /// A directory with this XFS/ext4 project id and a hard block limit.
    Project(u32),
    /// Not enforced: the root could not, or was told not to. The reason is
    /// the root's (see the driver's enforcer); records written by early
    /// versions carry it here too.
    Unenforced(String),
}

impl Enforcement {
    /// Whether a quota limits the volume.
    pub fn enforced(&self) -> bool {
        !matches!(self, Enforcement::Unenforced(_))
    }
}

/// A volume's ControllerPublish ("attach") to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The node it is attached to.
    pub node_id: String,
    /// Whether it was attached read-only.
    pub read_only: bool,
    /// The capability it was attached with.
    pub capability: Capability,
}

/// A volume's NodeStage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The staging path the CO named.
    pub path: PathBuf,
    /// The capability it was staged with.
    pub capability: Capability,
}

/// One NodePublish of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Whether the target is mounted read-only.
    pub read_only: bool,
    /// The capability it was published with.
    pub capability: Capability,
}

/// What makes a volume inline (a pod's `csi` volume, which CSI calls
/// ephemeral; Loam says inline everywhere): the kubelet's
/// name for it and the pod it was made for. Such a volume has no CreateVolume
/// behind it; it is made by its first NodePublish and deleted by its last
/// NodeUnpublish.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineOrigin {
    /// The kubelet's volume id (`csi-<sha256>`), which names the volume in
    /// NodePublish, NodeUnpublish and NodeGetVolumeStats.
    pub volume_id: String,
    /// The pod's namespace, when the CO said (`podInfoOnMount`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_namespace: String,
    /// The pod's name, when the CO said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// The pod's UID, when the CO said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
}

/// Everything Loam remembers about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The record format it was written in.
    #[serde(default)]
    pub schema: Schema,
    /// The volume id handed to the CO.
    pub id: String,
    /// The CSI name it was created with.
    pub name: String,
    /// Its capacity in bytes.
    pub capacity_bytes: u64,
    /// The capacity CreateVolume asked for, when the volume got more (rounded
    /// up to its filesystem's least): what a claim of the same size asks, and
    /// so what its snapshots tell a restore to ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_bytes: Option<u64>,
    /// The backend holding it and how.
    #[serde(flatten)]
    pub layout: Layout,
    /// The StorageClass parameters it was created with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// The mutable parameters last applied (CreateVolume's, then each
    /// ControllerModifyVolume's); `layout` already reflects them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mutable_parameters: BTreeMap<String, String>,
    /// Where its initial content came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
    /// Its ControllerPublish, when attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
    /// Its NodeStage, when staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// Its NodePublish targets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub publications: BTreeMap<PathBuf, Publication>,
    /// How its capacity is enforced; absent in records written before
    /// Loam enforced capacities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// How far formatting its image got (`loop` filesystem volumes); absent
    /// before the first stage formats it, and in records written before
    /// Loam recorded it, whose image content alone decides (as it did then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatting: Option<Formatting>,
    /// Set for an inline volume; absent for every volume CreateVolume made,
    /// so records from before inline volumes load as they were. Stored as
    /// `ephemeral`, its name when it was introduced.
    #[serde(default, rename = "ephemeral", skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineOrigin>,
}

impl VolumeRecord {
    /// What a snapshot of it tells a restore to ask for, when less than its
    /// capacity: the capacity it was asked for, before rounding up.
    pub fn restore_bytes(&self) -> Option<u64> {
        self.requested_bytes.filter(|asked| *asked < self.capacity_bytes)
    }
}

/// Everything Loam remembers about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The record format it was written in.
    #[serde(default)]
    pub schema: Schema,
    /// The snapshot id handed to the CO.
    pub id: String,
    /// The CSI name it was created with; a group member carries its group's.
    pub name: String,
    /// The volume it was taken of.
    pub source_volume_id: String,
    /// The engine of that volume, which holds the snapshot too.
    #[serde(default)]
    pub backend: BackendKind,
    /// The capacity of that volume when the snapshot was taken.
    pub size_bytes: u64,
    /// The least capacity a restore must ask for, when less than `size_bytes`:
    /// its volume's requested capacity (the volume was rounded up, and so is
    /// every restore of it), reported as the snapshot's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_bytes: Option<u64>,
    /// When it was taken: seconds since the Unix epoch.
    pub created_secs: i64,
    /// When it was taken: nanoseconds within that second.
    pub created_nanos: i32,
    /// The group snapshot it belongs to, when it was cut as part of one; such
    /// a snapshot is deleted only with its group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_id: Option<String>,
    /// Set on the node a snapshot kept off node was cut on (its id names two
    /// holders, [`crate::ids::SnapshotId`]) until the controller confirms the
    /// other node holds its verified copy: until then it is not ready to use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_copy: bool,
}

impl SnapshotRecord {
    /// The size CSI reports: the least capacity a restore must ask for.
    pub fn reported_bytes(&self) -> u64 {
        self.restore_bytes.unwrap_or(self.size_bytes)
    }
}

/// Everything Loam remembers about one volume group snapshot.
///
/// Written twice: first with `complete: false`, before any member is cut (the
/// intent, so a crash leaves a record naming what to roll back), then with
/// `complete: true` once every member is cut and recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshotRecord {
    /// The record format it was written in.
    #[serde(default)]
    pub schema: Schema,
    /// The group snapshot id handed to the CO.
    pub id: String,
    /// The CSI name it was created with.
    pub name: String,
    /// The volumes it was taken of, in the order the request named them.
    pub source_volume_ids: Vec<String>,
    /// Its members' snapshot ids, one per source volume, in the same order.
    pub snapshot_ids: Vec<String>,
    /// When it was cut: seconds since the Unix epoch.
    pub created_secs: i64,
    /// When it was cut: nanoseconds within that second.
    pub created_nanos: i32,
    /// Whether every member is cut and recorded; an incomplete group is
    /// rolled back by the next attempt or the next start.
    pub complete: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_record_without_its_image_layout_is_refused_not_served_as_a_directory() {
        let broken = r#"{"id":"v@n","name":"v","capacity_bytes":1,"backend":"loop"}"#;
        let err = serde_json::from_str::<VolumeRecord>(broken).unwrap_err();
        assert!(err.to_string().contains("loop_spec"), "{err}");
        let unknown_fs = r#"{"id":"v@n","name":"v","capacity_bytes":1,"backend":"loop","loop_spec":{"fs_type":"ntfs","thick":true}}"#;
        assert!(serde_json::from_str::<VolumeRecord>(unknown_fs).is_err());
    }

    #[test]
    fn records_of_another_schema_are_refused_with_what_to_do() {
        let newer = r#"{"schema":2,"id":"v@n","name":"v","capacity_bytes":1,"backend":"dir"}"#;
        let err = serde_json::from_str::<VolumeRecord>(newer).unwrap_err();
        assert!(err.to_string().contains("record schema 2 is not the one this version of Loam reads (1)"), "{err}");
        let current = r#"{"schema":1,"id":"v@n","name":"v","capacity_bytes":1,"backend":"dir"}"#;
        let record = serde_json::from_str::<VolumeRecord>(current).unwrap();
        assert_eq!(record.layout, Layout::Dir);
        assert_eq!(serde_json::to_string(&record).unwrap(), current, "written with its schema first");
        let older = r#"{"schema":0,"id":"g@n","name":"g","source_volume_ids":[],"snapshot_ids":[],"created_secs":0,"created_nanos":0,"complete":true}"#;
        assert!(serde_json::from_str::<GroupSnapshotRecord>(older).is_err());
    }

    #[test]
    fn volume_records_from_before_formatting_was_recorded_still_load_and_stay_as_they_were() {
        let old = r#"{"id":"v@n","name":"v","capacity_bytes":1,"backend":"loop","loop_spec":{"fs_type":"ext4","thick":true}}"#;
        let record: VolumeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.formatting, None);
        assert_eq!(serde_json::to_string(&record).unwrap(), old.replacen('{', r#"{"schema":1,"#, 1));
        let started = VolumeRecord { formatting: Some(Formatting::Started), ..record };
        assert!(serde_json::to_string(&started).unwrap().contains(r#""formatting":"started""#));
    }

    #[test]
    fn snapshot_records_from_before_groups_still_load_and_stay_as_they_were() {
        let old = r#"{"id":"s@n","name":"s","source_volume_id":"v@n","backend":"dir","size_bytes":1,"created_secs":2,"created_nanos":3}"#;
        let record: SnapshotRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.group_snapshot_id, None);
        assert!(!record.awaiting_copy, "snapshots from before off-node copies are ready");
        assert_eq!(serde_json::to_string(&record).unwrap(), old.replacen('{', r#"{"schema":1,"#, 1));
        let member = SnapshotRecord { group_snapshot_id: Some("g@n".into()), ..record.clone() };
        assert!(serde_json::to_string(&member).unwrap().contains(r#""group_snapshot_id":"g@n""#));
        let pending = SnapshotRecord { awaiting_copy: true, ..record };
        let text = serde_json::to_string(&pending).unwrap();
        assert!(text.contains(r#""awaiting_copy":true"#), "{text}");
        assert_eq!(serde_json::from_str::<SnapshotRecord>(&text).unwrap(), pending);
    }
}
