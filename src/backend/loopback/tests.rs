//! The loop backend's logic against the fake kernel, without root: stage
//! (attach, probe, format only blank devices, mount, adopt what a crash
//! left), rollback at each step, unstage, expansion staged and unstaged,
//! read-only block publications, frozen snapshots, start-up repairs and the
//! volume's condition. The privileged tests (tests/loop.rs) show what only
//! the real kernel can.

use std::cell::RefCell;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{FormatLog, LoopBackend, Orphan};
use crate::backend::Fill;
use crate::error::{Error, Result};
use crate::ids::{Key, Kind};
use crate::kernel::Kernel;
use crate::kernel::blockfs::FsType;
use crate::kernel::fake::{FakeKernel, Op};
use crate::kernel::loopdev::AttachOptions;
use crate::kernel::mount::MountFlags;
use crate::records::{AccessMode, Capability, Formatting, Layout, LoopSpec, Provisioning};

const MIB: u64 = 1 << 20;

struct Setup {
    root: tempfile::TempDir,
    fake: Arc<FakeKernel>,
    loopback: LoopBackend,
    key: Key,
}

impl Setup {
    fn new() -> Setup {
        let root = tempfile::tempdir().unwrap();
        for dir in ["volumes", "snapshots"] {
            fs::create_dir(root.path().join(dir)).unwrap();
        }
        let fake = Arc::new(FakeKernel::new());
        let loopback = LoopBackend::new(root.path(), fake.clone());
        Setup { root, fake, loopback, key: Key::for_name(Kind::Volume, "v") }
    }

    /// A fresh Setup with an empty volume of `fs`, of the least size that
    /// filesystem takes (4 MiB for ext4, 300 MiB for xfs: sparse).
    fn with_volume(fs: FsType) -> Setup {
        let s = Setup::new();
        s.loopback.create_volume(&s.key, least(fs), &spec(fs), Fill::Empty).unwrap();
        s
    }

    fn image(&self) -> PathBuf {
        self.loopback.image_path(&self.key)
    }

    fn staging(&self) -> PathBuf {
        self.root.path().join("staging")
    }

    /// Stages the volume as `fs` with `capability`, from recorded formatting
    /// `state`; returns the outcome and the formatting states recorded.
    fn stage_from(
        &self,
        fs: FsType,
        capability: &Capability,
        state: Option<Formatting>,
    ) -> (Result<()>, Vec<Formatting>) {
        let recorded = RefCell::new(Vec::new());
        let record = |f: Formatting| -> Result<()> {
            recorded.borrow_mut().push(f);
            Ok(())
        };
        let formats = FormatLog { state, record: &record };
        let result = self.loopback.stage(&self.key, &spec(fs), &self.staging(), capability, &formats);
        (result, recorded.into_inner())
    }

    fn stage(&self, fs: FsType) -> Result<()> {
        self.stage_from(fs, &mount_capability(), None).0
    }

    fn filesystem(&self) -> Option<(String, u64)> {
        FakeKernel::filesystem_in(&self.image()).unwrap()
    }

    fn grow_image(&self, capacity: u64, fs: FsType) {
        self.loopback.expand_volume(&self.key, capacity, &spec(fs)).unwrap();
    }
}

fn least(fs: FsType) -> u64 {
    crate::backend::min_capacity(&spec(fs)).unwrap()
}

fn spec(fs: FsType) -> LoopSpec {
    LoopSpec { fs, provisioning: Provisioning::Thin, mkfs_options: Vec::new() }
}

fn mount_capability() -> Capability {
    Capability {
        access_mode: AccessMode::SingleNodeWriter,
        block: false,
        fs_type: String::new(),
        mount_flags: Vec::new(),
    }
}

fn block_capability() -> Capability {
    Capability { block: true, ..mount_capability() }
}

fn read_only_capability() -> Capability {
    Capability { access_mode: AccessMode::SingleNodeReaderOnly, ..mount_capability() }
}

fn rw() -> AttachOptions {
    AttachOptions { read_only: false, direct_io: true }
}

// ----- Stage -----

#[test]
fn a_blank_image_is_formatted_then_mounted() {
    let s = Setup::with_volume(FsType::Ext4);
    let (result, recorded) = s.stage_from(FsType::Ext4, &mount_capability(), None);
    result.unwrap();
    assert_eq!(recorded, [Formatting::Started, Formatting::Done], "the format is recorded before and after");
    assert_eq!(s.filesystem(), Some(("ext4".into(), 4 * MIB)));
    assert!(s.fake.is_mounted(&s.staging()));
    let calls = s.fake.calls();
    let order: Vec<&str> = calls.iter().map(|c| c.split(' ').next().unwrap_or_default()).collect();
    assert_eq!(order, ["attach", "mkfs", "mount"], "{calls:?}");
}

#[test]
fn a_volume_made_for_raw_block_is_too_small_to_format_and_says_so() {
    let s = Setup::new();
    let least = crate::backend::Backends::min_capacity(&Layout::Loop(spec(FsType::Ext4)), &[block_capability()]);
    assert_eq!(least.unwrap(), crate::backend::BLOCK_MIN_BYTES, "a block-only volume is not held to ext4's minimum");
    let filesystem = crate::backend::Backends::min_capacity(&Layout::Loop(spec(FsType::Ext4)), &[mount_capability()]);
    assert!(filesystem.unwrap() > MIB, "a filesystem volume is");
    s.loopback.create_volume(&s.key, MIB, &spec(FsType::Ext4), Fill::Empty).unwrap();
    let (result, recorded) = s.stage_from(FsType::Ext4, &mount_capability(), None);
    let err = result.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("raw block"), "{err}");
    assert!(recorded.is_empty(), "no format was started");
    assert_eq!(s.filesystem(), None);
    assert!(s.fake.attached().is_empty(), "the fresh device is detached again");
    s.stage_from(FsType::Ext4, &block_capability(), None).0.expect("as a block device it stages");
}

#[test]
fn a_second_stage_neither_attaches_nor_formats_nor_mounts_again() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    let (result, recorded) = s.stage_from(FsType::Ext4, &mount_capability(), Some(Formatting::Done));
    result.unwrap();
    assert!(recorded.is_empty());
    assert_eq!(
        (s.fake.count("attach "), s.fake.count("mkfs "), s.fake.count("mount ")),
        (1, 1, 1),
        "{:?}",
        s.fake.calls()
    );
}

#[test]
fn an_image_with_its_filesystem_is_mounted_without_formatting() {
    let s = Setup::with_volume(FsType::Ext4);
    // ext4 mounts what older ext versions made, too.
    FakeKernel::write_filesystem(&s.image(), "ext3", 4 * MIB).unwrap();
    s.stage(FsType::Ext4).unwrap();
    assert_eq!(s.fake.count("mkfs "), 0, "{:?}", s.fake.calls());
    assert!(s.fake.is_mounted(&s.staging()));
    assert_eq!(s.filesystem(), Some(("ext3".into(), 4 * MIB)), "the data is untouched");
}

#[test]
fn another_filesystem_is_refused_untouched() {
    let s = Setup::with_volume(FsType::Ext4);
    FakeKernel::write_filesystem(&s.image(), "xfs", 4 * MIB).unwrap();
    let err = s.stage(FsType::Ext4).unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("xfs") && m.contains("fsType xfs")), "{err:?}");
    assert_eq!(s.filesystem(), Some(("xfs".into(), 4 * MIB)), "not formatted");
    assert!(s.fake.attached().is_empty(), "the fresh device is detached");
    assert!(!s.fake.is_mounted(&s.staging()));
}

#[test]
fn unknown_content_is_refused_and_never_formatted() {
    let s = Setup::with_volume(FsType::Ext4);
    let image = fs::File::options().write(true).open(s.image()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&image, b"data", 4096).unwrap();
    let err = s.stage(FsType::Ext4).unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("refusing to format")), "{err:?}");
    assert_eq!(s.fake.count("mkfs "), 0);
    assert!(s.fake.attached().is_empty());
}

#[test]
fn a_mkfs_cut_short_is_done_again_by_the_retry() {
    let s = Setup::with_volume(FsType::Xfs);
    s.fake.interrupt_next_mkfs();
    let (result, recorded) = s.stage_from(FsType::Xfs, &mount_capability(), None);
    result.expect_err("mkfs was killed");
    assert_eq!(recorded, [Formatting::Started], "only the start is recorded");
    assert!(s.fake.attached().is_empty(), "the failed stage detached its device");
    assert_eq!(s.filesystem(), None, "a torn superblock, not a filesystem");
    // The record says formatting started: what is there is Loam's own.
    let (result, recorded) = s.stage_from(FsType::Xfs, &mount_capability(), Some(Formatting::Started));
    result.unwrap();
    assert_eq!(recorded, [Formatting::Started, Formatting::Done]);
    assert_eq!(s.filesystem(), Some(("xfs".into(), least(FsType::Xfs))));
}

#[test]
fn a_retry_after_a_crash_between_attach_and_mount_adopts_the_device() {
    let s = Setup::with_volume(FsType::Ext4);
    // The crashed stage attached (and formatted) but never mounted.
    let left = s.fake.attach(&s.image(), rw()).unwrap();
    s.fake
        .mkfs(&left.device, FsType::Ext4, false, &crate::kernel::mkfs_options::MkfsOptions::none(FsType::Ext4))
        .unwrap();
    s.stage(FsType::Ext4).unwrap();
    assert_eq!(s.fake.count("attach "), 1, "no second device: {:?}", s.fake.calls());
    assert_eq!(s.fake.count("mkfs "), 1, "no second format");
    let mounts = s.fake.mounts().unwrap();
    let entry = crate::kernel::mountinfo::find_mount_point(&mounts, &s.staging()).unwrap();
    assert_eq!(Path::new(&entry.source), left.device, "mounted from the device the crash left");
}

#[test]
fn a_failed_mkfs_detaches_the_fresh_device() {
    let s = Setup::with_volume(FsType::Ext4);
    s.fake.fail_next(Op::Mkfs, io::ErrorKind::Other);
    s.stage(FsType::Ext4).expect_err("mkfs failed");
    assert!(s.fake.attached().is_empty());
    assert!(!s.fake.is_mounted(&s.staging()));
}

#[test]
fn a_failed_mount_detaches_the_fresh_device_and_leaves_no_mount() {
    let s = Setup::with_volume(FsType::Ext4);
    s.fake.fail_next(Op::MountFilesystem, io::ErrorKind::Other);
    s.stage(FsType::Ext4).expect_err("mount failed");
    assert!(s.fake.attached().is_empty());
    assert!(s.fake.mounts().unwrap().is_empty());
    s.stage(FsType::Ext4).expect("the retry stages");
    assert_eq!(s.fake.count("mkfs "), 1, "formatted once: the retry finds the filesystem");
}

#[test]
fn a_failed_xfs_grow_unmounts_and_detaches() {
    let s = Setup::with_volume(FsType::Xfs);
    s.fake.fail_next(Op::Grow, io::ErrorKind::Other);
    let err = s.stage(FsType::Xfs).unwrap_err();
    assert!(err.to_string().contains("growing"), "{err}");
    assert!(!s.fake.is_mounted(&s.staging()), "the mount is undone");
    assert!(s.fake.attached().is_empty(), "and the fresh device detached");
}

#[test]
fn a_device_the_stage_did_not_attach_is_kept_on_failure() {
    let s = Setup::with_volume(FsType::Ext4);
    let existing = s.fake.attach(&s.image(), rw()).unwrap();
    s.fake.fail_next(Op::MountFilesystem, io::ErrorKind::Other);
    s.stage(FsType::Ext4).expect_err("mount failed");
    assert_eq!(s.fake.attached(), [existing], "not ours to detach");
    assert_eq!(s.fake.count("detach "), 0);
}

#[test]
fn a_missing_image_is_a_failed_precondition_and_attaches_nothing() {
    let s = Setup::new();
    let err = s.stage(FsType::Ext4).unwrap_err();
    assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("missing")), "{err:?}");
    assert!(s.fake.calls().is_empty(), "{:?}", s.fake.calls());
}

#[test]
fn a_symlinked_staging_path_is_refused_before_attaching() {
    let s = Setup::with_volume(FsType::Ext4);
    let elsewhere = s.root.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, s.staging()).unwrap();
    let err = s.stage(FsType::Ext4).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_) | Error::FailedPrecondition(_)), "{err:?}");
    assert!(s.fake.calls().is_empty(), "nothing attached or formatted: {:?}", s.fake.calls());
}

#[test]
fn a_capability_asking_for_another_filesystem_is_invalid_and_leaves_nothing() {
    let s = Setup::with_volume(FsType::Ext4);
    let xfs = Capability { fs_type: "xfs".into(), ..mount_capability() };
    let (result, _) = s.stage_from(FsType::Ext4, &xfs, None);
    assert!(matches!(result, Err(Error::InvalidArgument(_))), "{result:?}");
    assert!(s.fake.attached().is_empty());
    assert_eq!(s.fake.count("mkfs "), 0);
}

#[test]
fn a_read_only_stage_mounts_read_only_from_a_read_only_device_and_grows_nothing() {
    let s = Setup::with_volume(FsType::Ext4);
    FakeKernel::write_filesystem(&s.image(), "ext4", 2 * MIB).unwrap();
    let (result, _) = s.stage_from(FsType::Ext4, &read_only_capability(), None);
    result.unwrap();
    let [device] = s.fake.attached().try_into().unwrap();
    assert!(device.read_only);
    let mounts = s.fake.mounts().unwrap();
    assert!(crate::kernel::mountinfo::find_mount_point(&mounts, &s.staging()).unwrap().read_only());
    assert_eq!(s.filesystem(), Some(("ext4".into(), 2 * MIB)), "a read-only stage never resizes");
}

#[test]
fn a_block_stage_attaches_without_formatting_or_mounting() {
    let s = Setup::with_volume(FsType::Ext4);
    let (result, recorded) = s.stage_from(FsType::Ext4, &block_capability(), None);
    result.unwrap();
    assert!(recorded.is_empty());
    assert_eq!(s.fake.attached().len(), 1);
    assert_eq!((s.fake.count("mkfs "), s.fake.count("mount ")), (0, 0));
    assert_eq!(s.filesystem(), None, "a raw block volume stays as the pod leaves it");
}

// ----- Unstage -----

#[test]
fn unstage_unmounts_and_detaches_and_twice_is_fine() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    assert!(!s.fake.is_mounted(&s.staging()));
    assert!(s.fake.attached().is_empty());
    s.loopback.unstage(&s.key, &s.staging()).expect("a second unstage is fine");
    assert_eq!(s.fake.count("unmount "), 1);
}

#[test]
fn unstage_leaves_a_strangers_mount_at_the_path() {
    let s = Setup::with_volume(FsType::Ext4);
    let stranger = s.root.path().join("stranger");
    fs::create_dir(&stranger).unwrap();
    fs::create_dir(s.staging()).unwrap();
    s.fake.bind(&stranger, &s.staging(), MountFlags::default()).unwrap();
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    assert!(s.fake.is_mounted(&s.staging()), "not the volume's mount");
    assert_eq!(s.fake.count("unmount "), 0);
}

// ----- Expansion -----

#[test]
fn expansion_while_staged_refreshes_the_device_and_grows_online() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    s.grow_image(8 * MIB, FsType::Ext4);
    assert_eq!(s.fake.count("refresh "), 1, "the device learns its new size");
    let [device] = s.fake.attached().try_into().unwrap();
    assert_eq!(s.fake.device_size(&device.device).unwrap(), 8 * MIB);
    s.loopback.node_expand(&s.key, &spec(FsType::Ext4), &s.staging(), &mount_capability()).unwrap();
    assert_eq!(s.filesystem(), Some(("ext4".into(), 8 * MIB)));
    s.loopback.node_expand(&s.key, &spec(FsType::Ext4), &s.staging(), &mount_capability()).unwrap();
    assert_eq!(s.fake.count("grow "), 1, "a grown filesystem is not grown again");
}

#[test]
fn ext4_without_cap_sys_resource_is_refused_with_the_way_out_and_grows_at_the_next_stage() {
    let s = Setup::with_volume(FsType::Ext4);
    s.fake.set_ext4_grows_online(false);
    s.stage(FsType::Ext4).unwrap();
    s.grow_image(8 * MIB, FsType::Ext4);
    let err = s.loopback.node_expand(&s.key, &spec(FsType::Ext4), &s.staging(), &mount_capability()).unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("CAP_SYS_RESOURCE") && m.contains("next staged")),
        "{err:?}"
    );
    assert_eq!(s.fake.count("grow "), 0, "refused before trying");
    // The way out: the pods restart, the volume is staged again.
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    s.stage(FsType::Ext4).unwrap();
    assert_eq!(s.filesystem(), Some(("ext4".into(), 8 * MIB)), "grown offline");
    s.loopback
        .node_expand(&s.key, &spec(FsType::Ext4), &s.staging(), &mount_capability())
        .expect("nothing left to grow");
}

#[test]
fn an_image_grown_while_unstaged_is_grown_offline_at_the_next_stage() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    s.grow_image(8 * MIB, FsType::Ext4);
    assert_eq!(s.fake.count("refresh "), 0, "no device to tell");
    s.stage(FsType::Ext4).unwrap();
    assert_eq!(s.fake.count("resize2fs "), 1, "{:?}", s.fake.calls());
    assert_eq!(s.filesystem(), Some(("ext4".into(), 8 * MIB)));
    assert!(!s.loopback.resize_intent_path(&s.key).exists(), "the intent is gone once done");
    assert!(s.fake.is_mounted(&s.staging()));
}

#[test]
fn an_offline_resize_cut_short_is_repaired_and_finished() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    s.grow_image(8 * MIB, FsType::Ext4);
    // A driver killed during resize2fs left its intent.
    fs::write(s.loopback.resize_intent_path(&s.key), b"").unwrap();
    s.stage(FsType::Ext4).unwrap();
    let calls = s.fake.calls();
    let repair = calls.iter().position(|c| c.starts_with("e2fsck -y")).expect("repaired first");
    let resize = calls.iter().position(|c| c.starts_with("resize2fs")).expect("then resized");
    assert!(repair < resize, "{calls:?}");
    assert_eq!(s.filesystem(), Some(("ext4".into(), 8 * MIB)));
    assert!(!s.loopback.resize_intent_path(&s.key).exists());
}

#[test]
fn xfs_grown_while_unstaged_grows_after_mounting() {
    let s = Setup::with_volume(FsType::Xfs);
    s.stage(FsType::Xfs).unwrap();
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    s.grow_image(least(FsType::Xfs) + 4 * MIB, FsType::Xfs);
    s.stage(FsType::Xfs).unwrap();
    assert_eq!(s.fake.count("resize2fs "), 0, "xfs never grows offline");
    assert_eq!(s.filesystem(), Some(("xfs".into(), least(FsType::Xfs) + 4 * MIB)));
}

// ----- Block publications -----

#[test]
fn a_read_only_block_publish_gets_its_own_read_only_device_and_release_detaches_only_it() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage_from(FsType::Ext4, &block_capability(), None).0.unwrap();
    let [staged] = s.fake.attached().try_into().unwrap();
    let writable = s.loopback.publish_source(&s.key, &s.staging(), true, false).unwrap();
    assert_eq!(writable, staged.device, "a writable publish binds the staged device");
    let read_only = s.loopback.publish_source(&s.key, &s.staging(), true, true).unwrap();
    assert_ne!(read_only, staged.device);
    let devices = s.fake.attached();
    assert!(devices.iter().any(|d| d.device == read_only && d.read_only), "{devices:?}");
    assert_eq!(s.loopback.publish_source(&s.key, &s.staging(), true, true).unwrap(), read_only, "reused");
    s.loopback.release_read_only(&s.key).unwrap();
    assert_eq!(s.fake.attached(), [staged], "the staged device stays");
}

// ----- Snapshots -----

#[test]
fn a_snapshot_of_a_staged_filesystem_is_cut_frozen_then_thawed() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    let snapshot = Key::for_name(Kind::Snapshot, "s");
    s.loopback.create_snapshot(&s.key, &snapshot, Some(&s.staging())).unwrap();
    assert!(!s.fake.is_frozen(&s.staging()));
    let staging = s.staging().display().to_string();
    let calls = s.fake.calls();
    assert_eq!(calls[calls.len() - 2..], [format!("freeze {staging}"), format!("thaw {staging}")], "{calls:?}");
    let copy = FakeKernel::filesystem_in(&s.loopback.snapshot_path(&snapshot)).unwrap();
    assert_eq!(copy, Some(("ext4".into(), 4 * MIB)), "the snapshot carries the filesystem");
}

#[test]
fn a_snapshot_whose_copy_fails_still_thaws() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    // The image vanishes under the mounted device: the copy cannot read it.
    fs::remove_file(s.image()).unwrap();
    let snapshot = Key::for_name(Kind::Snapshot, "s");
    s.loopback.create_snapshot(&s.key, &snapshot, Some(&s.staging())).expect_err("nothing to copy");
    assert!(!s.fake.is_frozen(&s.staging()), "thawed although the copy failed");
    assert!(!s.loopback.snapshot_path(&snapshot).exists());
}

#[test]
fn a_snapshot_that_cannot_freeze_copies_nothing() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    s.fake.fail_next(Op::Freeze, io::ErrorKind::Other);
    let snapshot = Key::for_name(Kind::Snapshot, "s");
    s.loopback.create_snapshot(&s.key, &snapshot, Some(&s.staging())).expect_err("freeze failed");
    assert!(!s.loopback.snapshot_path(&snapshot).exists(), "an inconsistent copy is never cut");
}

// ----- Start-up and health -----

#[test]
fn thaw_stage_thaws_what_a_crash_left_frozen_and_only_the_volumes() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    s.fake.freeze(&s.staging()).unwrap();
    assert!(s.loopback.thaw_stage(&s.key, &s.staging()).unwrap());
    assert!(!s.fake.is_frozen(&s.staging()));
    assert!(!s.loopback.thaw_stage(&s.key, &s.staging()).unwrap(), "nothing frozen any more");

    let stranger = s.root.path().join("stranger");
    let theirs = s.root.path().join("theirs");
    fs::create_dir(&stranger).unwrap();
    fs::create_dir(&theirs).unwrap();
    s.fake.bind(&stranger, &theirs, MountFlags::default()).unwrap();
    s.fake.freeze(&theirs).unwrap();
    assert!(!s.loopback.thaw_stage(&s.key, &theirs).unwrap());
    assert!(s.fake.is_frozen(&theirs), "another filesystem is not ours to thaw");
}

#[test]
fn detach_orphans_keeps_mounted_devices_and_detaches_unused_ones() {
    let s = Setup::with_volume(FsType::Ext4);
    let (mounted, idle, staged) = (s.key, Key::for_name(Kind::Volume, "idle"), Key::for_name(Kind::Volume, "staged"));
    for key in [idle, staged] {
        s.loopback.create_volume(&key, 4 * MIB, &spec(FsType::Ext4), Fill::Empty).unwrap();
    }
    // A crash between mount and record, one between attach and record, and a recorded stage.
    s.stage(FsType::Ext4).unwrap();
    let idle_device = s.fake.attach(&s.loopback.image_path(&idle), rw()).unwrap();
    let staged_device = s.fake.attach(&s.loopback.image_path(&staged), rw()).unwrap();
    // A device of an image that is not a volume's.
    let foreign = s.root.path().join("foreign.img");
    fs::write(&foreign, vec![0u8; 4096]).unwrap();
    let foreign_device = s.fake.attach(&foreign, rw()).unwrap();

    let orphans = s.loopback.detach_orphans(|key| *key == staged).unwrap();
    let fates: Vec<(PathBuf, &str)> = orphans
        .iter()
        .map(|(d, fate)| {
            let fate = match fate {
                Orphan::Detached => "detached",
                Orphan::KeptMounted => "kept",
                Orphan::Failed(_) => "failed",
            };
            (d.backing_file.clone(), fate)
        })
        .collect();
    assert_eq!(fates, [(s.loopback.image_path(&mounted), "kept"), (s.loopback.image_path(&idle), "detached")]);
    let left: Vec<PathBuf> = s.fake.attached().into_iter().map(|d| d.device).collect();
    assert!(!left.contains(&idle_device.device));
    assert!(left.contains(&staged_device.device) && left.contains(&foreign_device.device), "{left:?}");
    assert!(s.fake.is_mounted(&s.staging()));
}

#[test]
fn condition_reports_a_staged_volume_whose_device_is_gone() {
    let s = Setup::with_volume(FsType::Ext4);
    s.stage(FsType::Ext4).unwrap();
    assert!(!s.loopback.condition(&s.key, true).abnormal);
    // Someone unmounts and detaches behind the driver's back.
    s.fake.unmount(&s.staging()).unwrap();
    for device in s.fake.attached() {
        s.fake.detach(&device.device).unwrap();
    }
    let condition = s.loopback.condition(&s.key, true);
    assert!(condition.abnormal && condition.message.contains("stage it again"), "{condition:?}");
    assert!(!s.loopback.condition(&s.key, false).abnormal, "an unstaged volume needs no device");
}

#[test]
fn condition_says_when_direct_io_is_off_and_when_the_image_is_missing() {
    let s = Setup::with_volume(FsType::Ext4);
    s.fake.set_direct_io(false);
    s.stage(FsType::Ext4).unwrap();
    let condition = s.loopback.condition(&s.key, true);
    assert!(!condition.abnormal && condition.message.contains("direct I/O is off"), "{condition:?}");
    s.loopback.unstage(&s.key, &s.staging()).unwrap();
    s.fake.set_direct_io(true);
    s.stage(FsType::Ext4).unwrap();
    assert!(s.loopback.condition(&s.key, true).message.contains("direct I/O on"));
    fs::remove_file(s.image()).unwrap();
    let condition = s.loopback.condition(&s.key, true);
    assert!(condition.abnormal && condition.message.contains("missing"), "{condition:?}");
}

#[test]
fn delete_detaches_what_a_crash_left_and_removes_image_and_intent() {
    let s = Setup::with_volume(FsType::Ext4);
    s.fake.attach(&s.image(), rw()).unwrap();
    fs::write(s.loopback.resize_intent_path(&s.key), b"").unwrap();
    s.loopback.delete_volume(&s.key).unwrap();
    assert!(s.fake.attached().is_empty());
    assert!(!s.image().exists() && !s.loopback.resize_intent_path(&s.key).exists());
    s.loopback.delete_volume(&s.key).expect("deleting twice is fine");
}

#[test]
fn mkfs_options_finer_than_the_devices_sectors_are_refused_and_leave_no_image() {
    let s = Setup::new();
    s.fake.set_sector_size(4096);
    let spec = LoopSpec { mkfs_options: vec!["-b".into(), "1024".into()], ..spec(FsType::Ext4) };
    let err = s.loopback.create_volume(&s.key, 4 * MIB, &spec, Fill::Empty).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("4096")), "{err:?}");
    assert!(!s.image().exists());
}
