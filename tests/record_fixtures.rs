//! Records written by earlier versions of Loam (`tests/fixtures/records/`)
//! still load with today's code, mean what they meant, and are written back
//! in today's format without losing a field; a driver opened over them
//! serves every volume. A node upgraded in place keeps its volumes only if
//! this holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use loam::config::{Config, QuotaMode};
use loam::driver::Driver;
use loam::ids::ObjectId;
use loam::kernel::FakeKernel;
use loam::kernel::blockfs::FsType;
use loam::records::{
    Enforcement, Formatting, GroupSnapshotRecord, Layout, LoopSpec, Provisioning, SnapshotRecord, VolumeRecord,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/records");
    let mut dirs: Vec<_> =
        std::fs::read_dir(&root).expect("fixtures").map(|e| e.expect("entry").path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    dirs
}

/// Every record of one table in a fixture, by file name.
fn table<R: DeserializeOwned + Serialize>(meta: &Path, table: &str) -> BTreeMap<String, R> {
    let mut rows = BTreeMap::new();
    for entry in std::fs::read_dir(meta.join(table)).expect("table") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let record: R = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Written back, it is the same record with today's schema in front:
        // no field is lost, renamed or re-encoded, except the retired ones.
        let written = serde_json::to_string(&record).expect("encode");
        let expected =
            if text.starts_with(r#"{"schema":"#) { text.clone() } else { text.replacen('{', r#"{"schema":1,"#, 1) };
        let mut expected: Value = serde_json::from_str(&expected).expect("fixture is JSON");
        retire(&mut expected);
        let written: Value = serde_json::from_str(&written).expect("encoded JSON");
        assert_eq!(written, expected, "{} changes when written back", path.display());
        rows.insert(path.file_name().unwrap().to_string_lossy().into_owned(), record);
    }
    rows
}

/// Fields earlier versions wrote that today's drop on purpose, each with why.
const RETIRED: &[&str] = &[
    // A stage's mount group: Loam left VOLUME_MOUNT_GROUP, the kubelet
    // applies fsGroup itself (docs/volumes.md, Capabilities).
    "mount_group",
];

/// `value` without the retired fields, at any depth.
fn retire(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !RETIRED.contains(&k.as_str()));
            map.values_mut().for_each(retire);
        }
        Value::Array(items) => items.iter_mut().for_each(retire),
        _ => {}
    }
}

fn by_name<'a>(volumes: &'a BTreeMap<String, VolumeRecord>, name: &str) -> &'a VolumeRecord {
    volumes.values().find(|v| v.name == name).unwrap_or_else(|| panic!("no volume {name} in the fixture"))
}

#[test]
fn records_written_by_earlier_versions_load_and_round_trip() {
    for meta in fixtures() {
        let volumes: BTreeMap<String, VolumeRecord> = table(&meta, "volumes");
        let snapshots: BTreeMap<String, SnapshotRecord> = table(&meta, "snapshots");
        let groups: BTreeMap<String, GroupSnapshotRecord> = table(&meta, "groups");
        assert!(!volumes.is_empty() && !snapshots.is_empty() && !groups.is_empty(), "{}", meta.display());
        if meta.ends_with("1418e8e") {
            let thick_ext4 = by_name(&volumes, "loop-thick-ext4");
            assert_eq!(
                thick_ext4.layout,
                Layout::Loop(LoopSpec {
                    fs: FsType::Ext4,
                    provisioning: Provisioning::Thick,
                    mkfs_options: vec!["-m".into(), "1".into()]
                })
            );
            assert_eq!(thick_ext4.formatting, Some(Formatting::Done));
            let modified = by_name(&volumes, "loop-thin-xfs");
            assert!(modified.layout.thick(), "made thick by ModifyVolume");
            assert_eq!(modified.mutable_parameters.get("provisioning").map(String::as_str), Some("thick"));
            let plain = by_name(&volumes, "dir-plain");
            assert_eq!(plain.layout, Layout::Dir);
            assert!(matches!(plain.enforcement, Some(Enforcement::BtrfsQgroup(_))));
            assert!(plain.attachment.is_some() && plain.stage.is_some() && plain.publications.len() == 1);
            // Staged with a mount group before Loam left VOLUME_MOUNT_GROUP to
            // the kubelet: the group is dropped, so the kubelet's next stage
            // (which no longer sends one) is the same stage, not a conflict.
            let restaged = loam::records::Capability {
                access_mode: loam::records::AccessMode::SingleNodeWriter,
                block: false,
                fs_type: String::new(),
                mount_flags: Vec::new(),
            };
            assert_eq!(plain.stage.as_ref().unwrap().capability, restaged);
            assert!(by_name(&volumes, "inline-vol-1").inline.is_some());
            assert!(matches!(by_name(&volumes, "dir-unenforced").enforcement, Some(Enforcement::Unenforced(_))));
            assert!(snapshots.values().any(|s| s.group_snapshot_id.is_some()));
            assert!(groups.values().all(|g| g.complete));
        }
    }
}

#[test]
fn a_driver_opened_over_earlier_records_serves_every_volume() {
    for meta in fixtures() {
        let root = tempfile::tempdir().expect("tempdir");
        for table in ["volumes", "snapshots", "groups"] {
            let to = root.path().join("meta").join(table);
            std::fs::create_dir_all(&to).expect("mkdir");
            for entry in std::fs::read_dir(meta.join(table)).expect("table") {
                let path = entry.expect("entry").path();
                std::fs::copy(&path, to.join(path.file_name().unwrap())).expect("copy");
            }
        }
        let volumes: BTreeMap<String, VolumeRecord> = table(&meta, "volumes");
        let node = ObjectId::parse(&volumes.values().next().unwrap().id).expect("id").node;
        let config = Config {
            driver_name: "loam.csi.dev".into(),
            node_id: node,
            root: root.path().to_owned(),
            max_volumes_per_node: 0,
            quota: QuotaMode::Off,
        };
        let driver = Driver::open(config, Arc::new(FakeKernel::new())).expect("the driver opens over them");
        for record in volumes.values() {
            let key = ObjectId::parse(&record.id).expect("id").key;
            let loaded = driver.volume(&key).unwrap_or_else(|e| panic!("volume {}: {e}", record.name));
            assert_eq!(*loaded, *record);
        }
        let listed = driver.list_volumes(None, 0).rows.len();
        let inline = volumes.values().filter(|v| v.inline.is_some()).count();
        assert_eq!(listed, volumes.len() - inline, "every volume the CO made is listed");
        assert_eq!(driver.list_snapshots(None, 0, None).rows.len(), table::<SnapshotRecord>(&meta, "snapshots").len());
    }
}
