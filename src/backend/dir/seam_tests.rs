//! The dir backend's logic against the fake kernel: each enforcement
//! (btrfs qgroups, project quotas, none), clones and restores, staging, and
//! where its stats come from, without root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::DirBackend;
use crate::backend::in_the_making;
use crate::backend::{Backends, Fill, Layout, Source};
use crate::config::QuotaMode;
use crate::error::Error;
use crate::ids::{Key, Kind};
use crate::kernel::Kernel;
use crate::kernel::fake::{FakeKernel, FakeQuota, Op};
use crate::kernel::mount::MountFlags;
use crate::kernel::mountinfo;
use crate::kernel::quota::project::FIRST_PROJECT_ID;
use crate::records::{AccessMode, Capability, Enforcement};

const MIB: u64 = 1 << 20;

struct Setup {
    root: tempfile::TempDir,
    fake: Arc<FakeKernel>,
    dir: DirBackend,
}

fn setup(quota: FakeQuota) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeKernel::with_quota(quota));
    let dir = DirBackend::open(root.path(), QuotaMode::Auto, fake.clone()).unwrap();
    Setup { root, fake, dir }
}

fn volume(name: &str) -> Key {
    Key::for_name(Kind::Volume, name)
}

fn capability() -> Capability {
    Capability {
        access_mode: AccessMode::SingleNodeWriter,
        block: false,
        fs_type: String::new(),
        mount_flags: Vec::new(),
    }
}

/// Entries of the volumes directory, hidden ones (temporary builds) included.
fn volume_entries(s: &Setup) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(s.root.path().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn staging(s: &Setup) -> PathBuf {
    s.root.path().join("staging")
}

#[test]
fn on_btrfs_a_volume_is_a_subvolume_limited_by_its_qgroup() {
    let s = setup(FakeQuota::Btrfs);
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, 8 * MIB).unwrap();
    let Enforcement::BtrfsQgroup(id) = enforcement else { panic!("{enforcement:?}") };
    assert!(s.fake.is_subvolume(&s.dir.volume_path(&key)), "renamed into place, still a subvolume");
    assert_eq!(s.fake.qgroup_limit(id), Some(8 * MIB));
    let mode = fs::metadata(s.dir.volume_path(&key)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777, "an empty volume is writable by any pod user");
    s.dir.set_limit(&key, Some(&enforcement), 16 * MIB).unwrap();
    assert_eq!(s.fake.qgroup_limit(id), Some(16 * MIB), "expansion raises the qgroup limit");
}

#[test]
fn on_btrfs_a_deleted_volume_deletes_its_subvolume() {
    let s = setup(FakeQuota::Btrfs);
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, MIB).unwrap();
    fs::write(s.dir.volume_path(&key).join("data"), b"x").unwrap();
    s.dir.delete_volume(&key, Some(&enforcement)).unwrap();
    assert!(!s.dir.volume_exists(&key));
    assert_eq!(s.fake.count("delete-subvolume "), 1, "{:?}", s.fake.calls());
    s.dir.delete_volume(&key, Some(&enforcement)).expect("deleting twice is fine");
}

#[test]
fn on_btrfs_a_failed_limit_leaves_no_subvolume_behind() {
    let s = setup(FakeQuota::Btrfs);
    let key = volume("v");
    s.fake.fail_next(Op::SetQgroupLimit, std::io::ErrorKind::PermissionDenied);
    s.dir.create_volume(&key, Fill::Empty, MIB).expect_err("the limit failed");
    assert!(volume_entries(&s).is_empty(), "left behind: {:?}", volume_entries(&s));
    assert!(!s.fake.is_subvolume(&s.dir.volume_path(&key)));
    // The retry converges.
    assert!(matches!(s.dir.create_volume(&key, Fill::Empty, MIB).unwrap(), Enforcement::BtrfsQgroup(_)));
}

#[test]
fn on_btrfs_clones_snapshots_and_restores_are_subvolume_snapshots() {
    let s = setup(FakeQuota::Btrfs);
    let (source, clone, restored) = (volume("a"), volume("b"), volume("r"));
    let snapshot = Key::for_name(Kind::Snapshot, "s");
    s.dir.create_volume(&source, Fill::Empty, MIB).unwrap();
    fs::write(s.dir.volume_path(&source).join("data"), b"first").unwrap();

    let cloned = s.dir.create_volume(&clone, Fill::Copy(&copy_of(&s.dir.volume_path(&source))), 2 * MIB).unwrap();
    assert_eq!(fs::read(s.dir.volume_path(&clone).join("data")).unwrap(), b"first");
    let Enforcement::BtrfsQgroup(id) = cloned else { panic!("{cloned:?}") };
    assert_eq!(s.fake.qgroup_limit(id), Some(2 * MIB), "the clone has its own limit");

    assert!(s.dir.snapshots_atomically(&source));
    s.dir.create_snapshot(&source, &snapshot).unwrap();
    fs::write(s.dir.volume_path(&source).join("data"), b"changed").unwrap();
    s.dir.create_volume(&restored, Fill::Copy(&copy_of(&s.dir.snapshot_path(&snapshot))), MIB).unwrap();
    assert_eq!(fs::read(s.dir.volume_path(&restored).join("data")).unwrap(), b"first");
    let snapshots: Vec<String> = s.fake.calls().into_iter().filter(|c| c.starts_with("snapshot-subvolume ")).collect();
    assert_eq!(snapshots.len(), 3, "clone, snapshot and restore: {snapshots:?}");
    assert!(snapshots[1].ends_with(" ro"), "a snapshot is read-only: {snapshots:?}");
    assert_eq!(s.fake.count("create-subvolume "), 1, "only the first volume was made empty");
}

#[test]
fn with_project_quotas_a_volume_gets_its_own_project_and_limit() {
    let s = setup(FakeQuota::Project);
    let (a, b) = (volume("a"), volume("b"));
    let Enforcement::Project(first) = s.dir.create_volume(&a, Fill::Empty, 3 * MIB).unwrap() else { panic!() };
    let Enforcement::Project(second) = s.dir.create_volume(&b, Fill::Empty, MIB).unwrap() else { panic!() };
    assert_eq!(first, FIRST_PROJECT_ID);
    assert_ne!(first, second, "each volume has its own project");
    assert_eq!(s.fake.project_of(&s.dir.volume_path(&a)), Some(first), "the tag survives the rename into place");
    assert_eq!(s.fake.project(first).bytes_limit, 3 * MIB);
    assert_eq!(s.fake.project(second).bytes_limit, MIB);
}

#[test]
fn with_project_quotas_ids_used_by_other_tools_are_skipped() {
    let s = setup(FakeQuota::Project);
    // Another tool's project, at the first id Loam would take.
    s.fake.set_project_limit(s.root.path(), FIRST_PROJECT_ID, 4096, 0).unwrap();
    let enforcement = s.dir.create_volume(&volume("v"), Fill::Empty, MIB).unwrap();
    assert_eq!(enforcement, Enforcement::Project(FIRST_PROJECT_ID + 1));
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 4096, "the other tool's limit is untouched");
}

#[test]
fn with_project_quotas_a_failed_limit_leaves_nothing_behind() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    s.fake.fail_next(Op::SetProjectLimit, std::io::ErrorKind::Other);
    s.dir.create_volume(&key, Fill::Empty, MIB).expect_err("the limit failed");
    assert!(volume_entries(&s).is_empty(), "left behind: {:?}", volume_entries(&s));
    // The id was given back: the retry takes it again.
    assert_eq!(s.dir.create_volume(&key, Fill::Empty, MIB).unwrap(), Enforcement::Project(FIRST_PROJECT_ID));
}

#[test]
fn with_project_quotas_a_deleted_volume_gives_its_id_back_cleared() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, MIB).unwrap();
    s.dir.delete_volume(&key, Some(&enforcement)).unwrap();
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 0, "the limit is cleared");
    assert_eq!(s.dir.create_volume(&volume("w"), Fill::Empty, MIB).unwrap(), Enforcement::Project(FIRST_PROJECT_ID));
}

/// What a crash in the middle of making a volume leaves with project quotas:
/// its tree under the temporary name, tagged with a project whose limit is
/// set. The driver that made it is gone, so no id is held in memory.
fn crashed_build(s: &Setup, key: &Key, id: u32) -> PathBuf {
    let tmp = in_the_making(&s.dir.volume_path(key));
    fs::create_dir(&tmp).unwrap();
    s.fake.assign_project(&tmp, id).unwrap();
    s.fake.set_project_limit(s.root.path(), id, MIB, 0).unwrap();
    fs::write(tmp.join("half"), b"received").unwrap();
    tmp
}

#[test]
fn with_project_quotas_what_a_cut_short_receive_left_is_removed_with_its_limit() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    let tmp = crashed_build(&s, &key, FIRST_PROJECT_ID);
    let restarted = DirBackend::open(s.root.path(), QuotaMode::Auto, s.fake.clone()).unwrap();
    restarted.remove_unrecorded(&key).unwrap();
    assert!(!tmp.exists() && volume_entries(&s).is_empty(), "left behind: {:?}", volume_entries(&s));
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 0, "the limit is cleared");
    assert_eq!(
        restarted.create_volume(&volume("w"), Fill::Empty, MIB).unwrap(),
        Enforcement::Project(FIRST_PROJECT_ID),
        "the id is free again"
    );
}

#[test]
fn with_project_quotas_a_create_retried_after_a_crash_takes_the_leftovers_id_back() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    crashed_build(&s, &key, FIRST_PROJECT_ID);
    let restarted = DirBackend::open(s.root.path(), QuotaMode::Auto, s.fake.clone()).unwrap();
    let enforcement = restarted.create_volume(&key, Fill::Empty, 2 * MIB).unwrap();
    assert_eq!(enforcement, Enforcement::Project(FIRST_PROJECT_ID), "not a new id beside a leaked one");
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 2 * MIB);
    assert!(!restarted.volume_path(&key).join("half").exists(), "the half-made content is gone");
}

#[test]
fn with_project_quotas_a_leftover_tagged_with_a_held_id_leaves_that_limit_alone() {
    let s = setup(FakeQuota::Project);
    let live = volume("live");
    let enforcement = s.dir.create_volume(&live, Fill::Empty, 3 * MIB).unwrap();
    // A leftover that carries the live volume's id (copied tags, a tool).
    let key = volume("v");
    let tmp = in_the_making(&s.dir.volume_path(&key));
    fs::create_dir(&tmp).unwrap();
    s.fake.assign_project(&tmp, FIRST_PROJECT_ID).unwrap();
    s.dir.remove_unrecorded(&key).unwrap();
    assert!(!tmp.exists());
    assert_eq!(enforcement, Enforcement::Project(FIRST_PROJECT_ID));
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 3 * MIB, "the live volume keeps its limit");
}

#[test]
fn with_project_quotas_a_failed_read_of_a_leftovers_project_keeps_it_for_the_next_try() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    let tmp = crashed_build(&s, &key, FIRST_PROJECT_ID);
    s.fake.fail_next(Op::TaggedProject, std::io::ErrorKind::Other);
    s.dir.remove_unrecorded(&key).expect_err("the project could not be read");
    assert!(tmp.exists(), "kept, with its tag, for the next start");
    s.dir.remove_unrecorded(&key).unwrap();
    assert!(!tmp.exists());
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 0);
}

#[test]
fn with_project_quotas_a_symlink_planted_as_a_leftover_is_removed_never_followed() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    let elsewhere = tempfile::tempdir().unwrap();
    fs::write(elsewhere.path().join("keep"), b"not Loam's").unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), in_the_making(&s.dir.volume_path(&key))).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), s.dir.volume_path(&key)).unwrap();
    assert_eq!(s.dir.create_volume(&key, Fill::Empty, MIB).unwrap(), Enforcement::Project(FIRST_PROJECT_ID));
    assert!(fs::symlink_metadata(s.dir.volume_path(&key)).unwrap().is_dir(), "a directory of its own now");
    assert!(elsewhere.path().join("keep").exists(), "the symlink's target is untouched");
}

#[test]
fn adopting_a_volume_holds_its_project_and_puts_its_limit_back() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, 2 * MIB).unwrap();
    // Someone loosens the limit, and the driver restarts (a new backend).
    s.fake.set_project_limit(s.root.path(), FIRST_PROJECT_ID, 0, 0).unwrap();
    s.fake.charge_project(FIRST_PROJECT_ID, 10, 1);
    let restarted = DirBackend::open(s.root.path(), QuotaMode::Auto, s.fake.clone()).unwrap();
    restarted.adopt(&key, Some(&enforcement), 2 * MIB).unwrap();
    assert_eq!(s.fake.project(FIRST_PROJECT_ID).bytes_limit, 2 * MIB, "the record's limit is back");
    let other = restarted.create_volume(&volume("w"), Fill::Empty, MIB).unwrap();
    assert_ne!(other, enforcement, "the adopted volume's id is held");
}

#[test]
fn without_quotas_volumes_are_plain_directories_and_clones_copy() {
    let s = setup(FakeQuota::None("no quotas here".into()));
    let (source, clone) = (volume("a"), volume("b"));
    assert_eq!(s.dir.create_volume(&source, Fill::Empty, MIB).unwrap(), Enforcement::Unenforced(String::new()));
    fs::write(s.dir.volume_path(&source).join("data"), b"hello").unwrap();
    s.dir.create_volume(&clone, Fill::Copy(&copy_of(&s.dir.volume_path(&source))), MIB).unwrap();
    assert_eq!(fs::read(s.dir.volume_path(&clone).join("data")).unwrap(), b"hello");
    assert!(!s.dir.snapshots_atomically(&source));
    assert!(s.fake.calls().is_empty(), "no quota call: {:?}", s.fake.calls());
    assert_eq!(s.dir.quota_usage(Some(&Enforcement::Unenforced(String::new()))).unwrap(), None);
}

#[test]
fn stage_binds_the_data_directory_once() {
    let s = setup(FakeQuota::Btrfs);
    let key = volume("v");
    s.dir.create_volume(&key, Fill::Empty, MIB).unwrap();
    let path = staging(&s);
    s.dir.stage(&key, &path).unwrap();
    let mounts = s.fake.mounts().unwrap();
    let entry = mountinfo::find_mount_point(&mounts, &path).expect("staged");
    assert!(s.dir.shows_volume(entry, &key));
    s.dir.stage(&key, &path).unwrap();
    assert_eq!(s.fake.count("bind "), 1, "a second stage binds nothing: {:?}", s.fake.calls());
}

#[test]
fn stage_of_a_missing_data_directory_is_a_failed_precondition() {
    let s = setup(FakeQuota::Btrfs);
    let err = s.dir.stage(&volume("gone"), &staging(&s)).unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("missing")), "{err:?}");
    assert!(!staging(&s).exists(), "nothing made at the staging path");
    assert_eq!(s.fake.count("bind "), 0);
}

#[test]
fn unstage_undoes_its_bind_and_leaves_a_strangers_mount() {
    let root = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeKernel::new());
    let backends = Backends::open(root.path(), QuotaMode::Off, fake.clone()).unwrap();
    let key = volume("v");
    let layout = Layout::Dir;
    backends.create_volume(&key, &layout, MIB, Fill::Empty).unwrap();
    let (ours, theirs) = (root.path().join("ours"), root.path().join("theirs"));
    let stranger = root.path().join("stranger");
    fs::create_dir(&stranger).unwrap();
    fs::create_dir(&theirs).unwrap();
    fake.bind(&stranger, &theirs, MountFlags::default()).unwrap();
    let formats = crate::backend::loopback::FormatLog { state: None, record: &|_| Ok(()) };
    backends.stage(&key, &layout, &ours, &capability(), &formats).unwrap();

    // Without a record saying the path is ours, only a mount showing the volume goes.
    backends.unstage(&key, Some(&layout), &theirs, false).unwrap();
    assert!(fake.is_mounted(&theirs), "a stranger's mount stays");
    backends.unstage(&key, Some(&layout), &ours, false).unwrap();
    assert!(!fake.is_mounted(&ours));
    backends.unstage(&key, Some(&layout), &ours, false).expect("a second unstage is fine");
    assert_eq!(fake.count("unmount "), 1, "{:?}", fake.calls());
}

#[test]
fn stats_come_from_the_project_quota_when_it_counts() {
    let s = setup(FakeQuota::Project);
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, 4 * MIB).unwrap();
    fs::write(s.dir.volume_path(&key).join("small"), b"x").unwrap();
    s.fake.charge_project(FIRST_PROJECT_ID, MIB, 7);
    let stats = s.dir.stats(&key, Some(&enforcement), 4 * MIB).unwrap();
    assert_eq!((stats.used_bytes, stats.used_inodes), (MIB, 7), "the quota's count, not a walk: {stats:?}");
    assert_eq!(stats.total_bytes, 4 * MIB);
    assert!(stats.available_bytes <= 3 * MIB);
    let message = s.dir.usage_message(&key, Some(&enforcement), 4 * MIB).unwrap();
    assert!(message.contains("counted by the quota") && message.contains(&MIB.to_string()), "{message}");
}

#[test]
fn stats_on_btrfs_take_bytes_from_the_qgroup_and_inodes_from_a_walk() {
    let s = setup(FakeQuota::Btrfs);
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, 4 * MIB).unwrap();
    let Enforcement::BtrfsQgroup(id) = enforcement else { panic!() };
    for name in ["a", "b", "c"] {
        fs::write(s.dir.volume_path(&key).join(name), b"x").unwrap();
    }
    s.fake.charge_qgroup(id, 2 * MIB);
    let stats = s.dir.stats(&key, Some(&enforcement), 4 * MIB).unwrap();
    assert_eq!(stats.used_bytes, 2 * MIB, "{stats:?}");
    assert!(stats.used_inodes >= 3, "qgroups count no inodes; the walk does: {stats:?}");
}

#[test]
fn stats_of_an_unenforced_volume_walk_its_tree() {
    let s = setup(FakeQuota::None("off".into()));
    let key = volume("v");
    let enforcement = s.dir.create_volume(&key, Fill::Empty, 4 * MIB).unwrap();
    fs::write(s.dir.volume_path(&key).join("data"), vec![1u8; 100_000]).unwrap();
    let stats = s.dir.stats(&key, Some(&enforcement), 4 * MIB).unwrap();
    assert!(stats.used_bytes >= 100_000, "{stats:?}");
    let message = s.dir.usage_message(&key, Some(&enforcement), 4 * MIB).unwrap();
    assert!(message.contains("walking its files"), "{message}");
}

/// A copy of this node's directory at `path`.
fn copy_of(path: &std::path::Path) -> Source {
    Source { path: path.to_owned(), mounted: None }
}
