//! The hostile-path corpus: staging and target paths, ids, capabilities and
//! mount flags a caller (or a pod that planted something in a path) can
//! send, each with the answer it must get. None may be INTERNAL, none may
//! reach outside the path named, and none may touch another volume's mounts
//! or a file Loam did not make.
//!
//! Stand-ins for sensitive files (`etc/passwd`) live in the test's own
//! directory. The table runs with the fake kernel unprivileged and with real
//! mounts as root; the cases that need loop devices or real mounts are
//! `#[ignore]`d and run with `--include-ignored` as root in a private mount
//! namespace.

mod common;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::{Access, Harness, block_capability, mount_capability, path_str};
use loam::csi;
use tonic::Code;

const MIB: i64 = 1 << 20;
const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";

/// A stand-in /etc with a passwd file, and the links and files a hostile
/// caller would point Loam at.
struct Traps {
    etc: PathBuf,
}

impl Traps {
    fn plant(h: &Harness) -> Traps {
        let co = h.co_path("");
        let etc = co.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), PASSWD).unwrap();
        std::fs::create_dir(co.join("full")).unwrap();
        std::fs::write(co.join("full/data"), b"keep me").unwrap();
        std::fs::write(co.join("file"), b"").unwrap();
        symlink(&etc, co.join("link")).unwrap();
        symlink(&co, co.join("linkdir")).unwrap();
        symlink(etc.join("shadow"), co.join("dangling")).unwrap();
        Traps { etc }
    }

    /// The stand-in /etc holds exactly what it was planted with.
    fn assert_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.etc).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["passwd"], "something was created in the stand-in /etc");
        assert_eq!(std::fs::read(self.etc.join("passwd")).unwrap(), PASSWD);
        assert!(!std::fs::symlink_metadata(self.etc.join("passwd")).unwrap().file_type().is_symlink());
    }
}

/// One request of the corpus.
enum Call {
    Stage { id: String, path: String, cap: Option<csi::VolumeCapability> },
    Publish { id: String, staging: String, target: String, cap: csi::VolumeCapability },
    Unpublish { id: String, target: String },
}

async fn run(h: &mut Harness, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::Stage { id, path, cap } => h
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: path,
                volume_capability: cap,
                ..Default::default()
            })
            .await
            .map(drop),
        Call::Publish { id, staging, target, cap } => h
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id,
                staging_target_path: staging,
                target_path: target,
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(drop),
        Call::Unpublish { id, target } => h
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: id, target_path: target })
            .await
            .map(drop),
    }
}

fn flags(words: &[&str]) -> csi::VolumeCapability {
    let mut cap = mount_capability(Access::Writer);
    if let Some(csi::volume_capability::AccessType::Mount(mount)) = cap.access_type.as_mut() {
        mount.mount_flags = words.iter().map(|w| w.to_string()).collect();
    }
    cap
}

fn multi_node() -> csi::VolumeCapability {
    let mut cap = mount_capability(Access::Writer);
    cap.access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    cap
}

/// Whether anything is mounted exactly at `path`, per the real mount table
/// (always false with the fake kernel, which mounts nothing).
fn mounted(path: &Path) -> bool {
    loam::kernel::mountinfo::read().unwrap().iter().any(|m| m.mount_point == path)
}

#[tokio::test]
async fn hostile_node_requests_get_the_code_the_caller_can_act_on() {
    let mut h = Harness::start().await;
    let traps = Traps::plant(&h);
    let base = h.co_path("");
    let co = |p: &str| path_str(&base.join(p));
    // Volume a is staged and published; the corpus stages c and publishes b
    // (staged) at hostile paths, a's among them; gone was deleted, so its id
    // is well formed but names nothing.
    let a = h.create("a", MIB).await;
    let b = h.create("b", MIB).await;
    let c = h.create("c", MIB).await;
    let gone = h.create("gone", MIB).await;
    h.controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: gone.clone(), ..Default::default() })
        .await
        .unwrap();
    let (a_staging, a_target) = (h.co_path("a/staging"), h.co_path("a/target"));
    h.stage(&a, &a_staging).await.unwrap();
    h.publish(&a, &a_staging, &a_target, Access::Writer, false).await.unwrap();
    let b_staging = h.co_path("b/staging");
    h.stage(&b, &b_staging).await.unwrap();
    let root = path_str(&h.root());
    let names_a: &[&str] = &[&a];
    let other_node = b.replace(common::NODE, "other-node");

    let stage =
        |id: &str, path: String| Call::Stage { id: id.into(), path, cap: Some(mount_capability(Access::Writer)) };
    let publish = |target: String, cap: csi::VolumeCapability| Call::Publish {
        id: b.clone(),
        staging: path_str(&b_staging),
        target,
        cap,
    };
    let unpublish = |id: &str, target: String| Call::Unpublish { id: id.into(), target };
    let writer = || mount_capability(Access::Writer);
    // (case, request, code, words the message must name)
    let cases: Vec<(&str, Call, Code, &[&str])> = vec![
        // Staging paths.
        ("staging is a symlink", stage(&c, co("link")), Code::InvalidArgument, &["symlink"]),
        ("staging under a symlinked parent", stage(&c, co("linkdir/s")), Code::InvalidArgument, &["symlink"]),
        ("staging is a dangling symlink", stage(&c, co("dangling")), Code::InvalidArgument, &["symlink"]),
        ("staging is a regular file", stage(&c, co("file")), Code::FailedPrecondition, &["not a directory"]),
        ("staging under a regular file", stage(&c, co("file/s")), Code::FailedPrecondition, &["not a directory"]),
        ("staging is relative", stage(&c, "co/s".into()), Code::InvalidArgument, &["absolute"]),
        ("staging has ..", stage(&c, co("a/../etc")), Code::InvalidArgument, &[".."]),
        ("staging has .", stage(&c, co("./s")), Code::InvalidArgument, &["'.'"]),
        ("staging is empty", stage(&c, String::new()), Code::InvalidArgument, &["required"]),
        ("staging has NUL", stage(&c, co("s\0x")), Code::InvalidArgument, &["NUL"]),
        ("staging is too long", stage(&c, format!("/{}", "x".repeat(5000))), Code::InvalidArgument, &["bytes"]),
        ("staging inside the root", stage(&c, format!("{root}/volumes")), Code::InvalidArgument, &["root"]),
        ("staging is /", stage(&c, "/".into()), Code::InvalidArgument, &["root"]),
        // Another volume's paths.
        ("staging at a's staging", stage(&c, path_str(&a_staging)), Code::FailedPrecondition, names_a),
        ("staging inside a's staging", stage(&c, co("a/staging/x")), Code::FailedPrecondition, names_a),
        ("staging around a's paths", stage(&c, co("a")), Code::FailedPrecondition, names_a),
        ("staging at a's target", stage(&c, path_str(&a_target)), Code::FailedPrecondition, names_a),
        ("publish at a's target", publish(path_str(&a_target), writer()), Code::FailedPrecondition, names_a),
        ("publish at a's staging", publish(path_str(&a_staging), writer()), Code::FailedPrecondition, names_a),
        ("publish inside a's target", publish(co("a/target/x"), writer()), Code::FailedPrecondition, names_a),
        // Target paths.
        ("target is a symlink", publish(co("link"), writer()), Code::InvalidArgument, &["symlink"]),
        ("target under a symlinked parent", publish(co("linkdir/t"), writer()), Code::InvalidArgument, &["symlink"]),
        ("target is a dangling symlink", publish(co("dangling"), writer()), Code::InvalidArgument, &["symlink"]),
        ("mount target is a file", publish(co("file"), writer()), Code::FailedPrecondition, &["not a directory"]),
        ("target under a file", publish(co("file/t"), writer()), Code::FailedPrecondition, &["not a directory"]),
        ("target is relative", publish("t".into(), writer()), Code::InvalidArgument, &["absolute"]),
        ("target inside the root", publish(format!("{root}/x"), writer()), Code::InvalidArgument, &["root"]),
        ("target is empty", publish(String::new(), writer()), Code::InvalidArgument, &["required"]),
        // Capabilities and mount flags.
        ("unknown mount flag", publish(co("t1"), flags(&["suidx"])), Code::InvalidArgument, &["unknown mount flag"]),
        ("mount flag with a value", publish(co("t2"), flags(&["uid=0"])), Code::InvalidArgument, &["mount flag"]),
        ("mount flag with NUL", publish(co("t3"), flags(&["ro\0"])), Code::InvalidArgument, &["mount flag"]),
        ("empty mount flag", publish(co("t4"), flags(&[""])), Code::InvalidArgument, &["mount flag"]),
        ("multi-node access", publish(co("t5"), multi_node()), Code::InvalidArgument, &["not supported"]),
        (
            "no capability",
            Call::Stage { id: c.clone(), path: co("s"), cap: None },
            Code::InvalidArgument,
            &["capability is required"],
        ),
        // Ids.
        ("stage a deleted volume", stage(&gone, co("s")), Code::NotFound, &[]),
        ("stage a malformed id", stage("../../etc/passwd", co("s")), Code::NotFound, &[]),
        ("stage another node's volume", stage(&other_node, co("s")), Code::NotFound, &["other-node"]),
        // Unpublish removes only what Loam made.
        ("unpublish a deleted volume", unpublish(&gone, co("etc/passwd")), Code::Ok, &[]),
        ("unpublish another node's volume", unpublish(&other_node, co("etc/passwd")), Code::Ok, &[]),
        ("unpublish at a stand-in file", unpublish(&b, co("etc/passwd")), Code::Ok, &[]),
        ("unpublish at a stand-in dir", unpublish(&b, co("etc")), Code::Ok, &[]),
        ("unpublish at a full dir", unpublish(&b, co("full")), Code::Ok, &[]),
        ("unpublish at a's target", unpublish(&b, path_str(&a_target)), Code::Ok, &[]),
        ("unpublish through a symlink", unpublish(&b, co("link/passwd")), Code::Ok, &[]),
    ];

    let mut failures = Vec::new();
    for (case, call, code, words) in cases {
        let got = run(&mut h, call).await;
        let (got_code, message) = match &got {
            Ok(()) => (Code::Ok, String::new()),
            Err(status) => (status.code(), status.message().to_owned()),
        };
        if got_code != code || !words.iter().all(|w| message.contains(w)) {
            failures.push(format!("{case}: want {code:?} naming {words:?}, got {got_code:?} {message:?}"));
        }
    }
    assert!(failures.is_empty(), "{} cases answered wrongly:\n{}", failures.len(), failures.join("\n"));

    traps.assert_untouched();
    assert_eq!(std::fs::read(h.co_path("full/data")).unwrap(), b"keep me");
    assert!(h.co_path("file").is_file());
    // Volume a is as it was: still published at its target, still staged.
    assert!(a_target.is_dir() && a_staging.is_dir());
    if common::privileged() {
        assert!(mounted(&a_target) && mounted(&a_staging), "another volume's request took a's mounts");
    }
    h.unpublish(&a, &a_target).await.unwrap();
    h.unstage(&a, &a_staging).await.unwrap();
    h.unstage(&b, &b_staging).await.unwrap();
}

#[tokio::test]
async fn unpublish_removes_the_target_it_made_and_nothing_it_did_not() {
    let mut h = Harness::start().await;
    let id = h.create("v", MIB).await;
    let (staging, target) = (h.co_path("staging"), h.co_path("pod/target"));
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap();
    // A target the volume was never published at stays, empty or not.
    let stranger = h.co_path("pod/stranger");
    std::fs::create_dir(&stranger).unwrap();
    h.unpublish(&id, &stranger).await.unwrap();
    assert!(stranger.is_dir(), "an empty directory Loam never published at was removed");
    // The target Loam made is removed once unmounted.
    h.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists());
    h.unpublish(&id, &target).await.unwrap();
    h.unstage(&id, &staging).await.unwrap();
}

/// A loop volume with a filesystem (or a raw block volume).
fn loop_request(name: &str, block: bool) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![if block { block_capability() } else { mount_capability(Access::Writer) }],
        parameters: HashMap::from([("backend".to_owned(), "loop".to_owned())]),
        ..Default::default()
    }
}

#[tokio::test]
#[ignore = "needs root: loop devices and real mounts in a private mount namespace"]
async fn a_loop_stage_never_mounts_through_a_symlink() {
    assert!(common::privileged(), "run as root with LOAM_PRIVILEGED_TESTS=1");
    let mut h = Harness::start().await;
    let traps = Traps::plant(&h);
    let id = h.create_volume(loop_request("fs", false)).await.unwrap().volume_id;
    for path in [h.co_path("link"), h.co_path("linkdir/staging"), h.co_path("dangling")] {
        let err = h.stage(&id, &path).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}: {err:?}", path.display());
        assert!(err.message().contains("symlink"), "{err:?}");
    }
    assert!(!mounted(&traps.etc), "the volume was mounted on the stand-in /etc");
    traps.assert_untouched();
    // The volume still stages, and unstages, at a proper path.
    let staging = h.co_path("staging");
    h.stage(&id, &staging).await.unwrap();
    assert!(mounted(&staging));
    h.unstage(&id, &staging).await.unwrap();
    assert!(!mounted(&staging));
}

#[tokio::test]
#[ignore = "needs root: loop devices and real mounts in a private mount namespace"]
async fn a_block_publish_creates_its_target_without_following_links() {
    assert!(common::privileged(), "run as root with LOAM_PRIVILEGED_TESTS=1");
    let mut h = Harness::start().await;
    let traps = Traps::plant(&h);
    let id = h.create_volume(loop_request("block", true)).await.unwrap().volume_id;
    let staging = h.co_path("staging");
    h.stage_as(&id, &staging, block_capability()).await.unwrap();
    let cases = [
        (h.co_path("dangling"), Code::InvalidArgument),
        (h.co_path("link/shadow"), Code::InvalidArgument),
        (h.co_path("linkdir/dev"), Code::InvalidArgument),
        (h.co_path("full"), Code::FailedPrecondition),
        (h.co_path("file/dev"), Code::FailedPrecondition),
    ];
    for (target, code) in cases {
        let err = h.publish_as(&id, &staging, &target, block_capability(), false).await.unwrap_err();
        assert_eq!(err.code(), code, "{}: {err:?}", target.display());
    }
    assert!(!traps.etc.join("shadow").exists(), "the block target was created through a dangling symlink");
    traps.assert_untouched();
    let target = h.co_path("pod/dev");
    h.publish_as(&id, &staging, &target, block_capability(), false).await.unwrap();
    assert!(mounted(&target));
    h.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists(), "the block target Loam made is removed");
    h.unstage(&id, &staging).await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: real mounts in a private mount namespace"]
async fn a_mount_point_that_is_not_utf8_does_not_stop_the_node() {
    assert!(common::privileged(), "run as root with LOAM_PRIVILEGED_TESTS=1");
    let mut h = Harness::start().await;
    // A tmpfs at a Latin-1 path elsewhere in the namespace; the harness
    // unmounts everything under its directory when dropped.
    let odd = h.co_path("").join(std::ffi::OsStr::from_bytes(b"caf\xe9 \\x"));
    std::fs::create_dir_all(&odd).unwrap();
    nix::mount::mount(Some("tmpfs"), &odd, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m")).unwrap();
    let id = h.create("v", MIB).await;
    let (staging, target) = (h.co_path("staging"), h.co_path("target"));
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap();
    assert!(mounted(&target) && mounted(&odd));
    h.unpublish(&id, &target).await.unwrap();
    h.unstage(&id, &staging).await.unwrap();
    assert!(!mounted(&staging));
}

#[tokio::test]
async fn a_publish_never_binds_through_a_staging_path_swapped_for_a_symlink() {
    let mut h = Harness::start().await;
    let traps = Traps::plant(&h);
    let id = h.create("v", MIB).await;
    let staging = h.co_path("st/staging");
    h.stage(&id, &staging).await.unwrap();
    // The staging path's parent is moved away and a link to a stand-in
    // with a `staging` directory of its own takes its place.
    std::fs::rename(h.co_path("st"), h.co_path("st-moved")).unwrap();
    symlink(&traps.etc, h.co_path("st")).unwrap();
    std::fs::create_dir(traps.etc.join("staging")).unwrap();
    std::fs::write(traps.etc.join("staging/secret"), b"host data").unwrap();
    let target = h.co_path("pod/target");
    let err = h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("symlink"), "{err:?}");
    assert!(!target.join("secret").exists(), "the stand-in was published to the pod");
    assert!(!mounted(&target));
}

#[tokio::test]
async fn an_unpublish_never_removes_through_a_target_swapped_for_a_symlink() {
    let mut h = Harness::start().await;
    let traps = Traps::plant(&h);
    let id = h.create("v", MIB).await;
    let (staging, target) = (h.co_path("staging"), h.co_path("pod/target"));
    h.stage(&id, &staging).await.unwrap();
    h.publish(&id, &staging, &target, Access::Writer, false).await.unwrap();
    // The target's parent is moved away (its mount with it) and a link to a
    // stand-in holding an empty `target` directory takes its place.
    std::fs::rename(h.co_path("pod"), h.co_path("pod-moved")).unwrap();
    symlink(&traps.etc, h.co_path("pod")).unwrap();
    std::fs::create_dir(traps.etc.join("target")).unwrap();
    h.unpublish(&id, &target).await.unwrap();
    assert!(traps.etc.join("target").is_dir(), "unpublish removed a directory through a symlink");
    // The publication is gone from the record: the volume unstages.
    h.unstage(&id, &staging).await.unwrap();
}
