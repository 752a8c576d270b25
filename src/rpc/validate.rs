//! Turns CSI request fields into checked values before anything touches a
//! path: ids, names, paths, capabilities, capacity ranges, parameters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use crate::config::CO_PARAMETER_PREFIX;
use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;
use crate::csi::volume_capability::AccessType;
use crate::csi::volume_capability::access_mode::Mode;
use crate::driver::{CapacityRange, InlineVolume, parse_layout};
use crate::error::{Error, Result, quote};
use crate::records::{AccessMode, Capability, ContentSource, InlineOrigin};

/// Longest path Loam accepts from a request (PATH_MAX).
const MAX_PATH_LEN: usize = 4096;
/// Most bytes all parameters of a request may hold (the spec's map limit).
const MAX_PARAMETERS_LEN: usize = 4096;

/// A required id field: present and free of NUL.
pub fn required_id<'a>(what: &str, id: &'a str) -> Result<&'a str> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if id.len() > 128 || id.contains('\0') {
        return Err(Error::InvalidArgument(format!("{what} must be at most 128 bytes without NUL")));
    }
    Ok(id)
}

/// A path the CO names (staging or target): absolute, normalized, and
/// outside the driver's root, so no request can mount over Loam's own files.
pub fn caller_path(what: &str, raw: &str, root: &Path) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if raw.len() > MAX_PATH_LEN || raw.contains('\0') {
        return Err(Error::InvalidArgument(format!("{what} must be at most {MAX_PATH_LEN} bytes without NUL")));
    }
    let path = Path::new(raw);
    // Checked on the raw text: `Path::components` silently drops `.`.
    let normal = path.is_absolute()
        && raw.split('/').all(|part| part != "." && part != "..")
        && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal {
        return Err(Error::InvalidArgument(format!(
            "{what} {} must be an absolute path without '.' or '..' components",
            quote(raw)
        )));
    }
    // Resolve what exists of it, so a symlink cannot lead into the root.
    let resolved = path
        .ancestors()
        .find_map(|p| p.canonicalize().ok().map(|c| c.join(path.strip_prefix(p).unwrap_or(Path::new("")))))
        .unwrap_or_else(|| path.to_owned());
    if resolved.starts_with(root) || root.starts_with(&resolved) {
        return Err(Error::InvalidArgument(format!(
            "{what} {} overlaps the driver's root {}; pick a path outside it",
            quote(raw),
            root.display()
        )));
    }
    Ok(path.components().collect())
}

/// A path that is only compared with paths Loam recorded, never used to
/// reach the filesystem on its own: present and free of NUL.
pub fn known_path(what: &str, raw: &str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if raw.len() > MAX_PATH_LEN || raw.contains('\0') {
        return Err(Error::InvalidArgument(format!("{what} must be at most {MAX_PATH_LEN} bytes without NUL")));
    }
    Ok(PathBuf::from(raw))
}

/// A capability Loam must serve; INVALID_ARGUMENT naming the problem if not.
pub fn capability(cap: Option<&csi::VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::InvalidArgument("volume capability is required".into()))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability needs an access mode".into()))?;
    let access_mode = match Mode::try_from(mode.mode).unwrap_or(Mode::Unknown) {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: Loam volumes live on one node's local disk, so only single-node modes can be served",
                mode_name(mode.mode)
            )));
        }
        Mode::Unknown => {
            return Err(Error::InvalidArgument(format!("access mode {} is not a known mode", mode.mode)));
        }
    };
    match &cap.access_type {
        Some(AccessType::Block(_)) => {
            Ok(Capability { access_mode, block: true, fs_type: String::new(), mount_flags: Vec::new() })
        }
        Some(AccessType::Mount(mount)) => {
            crate::driver::check_mount_flags(&mount.mount_flags)?;
            let fs_ok = mount.fs_type.len() <= 32
                && mount.fs_type.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !fs_ok {
                return Err(Error::InvalidArgument(format!(
                    "fs type {} is not a filesystem name",
                    quote(&mount.fs_type)
                )));
            }
            // Loam does not offer VOLUME_MOUNT_GROUP: with it the kubelet
            // hands fsGroup to the driver and skips its own ownership change,
            // and a driver never learns the pod's fsGroupChangePolicy. The
            // kubelet applies fsGroup itself (CSIDriver fsGroupPolicy: File).
            if !mount.volume_mount_group.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "volume mount group {} given, but Loam does not offer VOLUME_MOUNT_GROUP: the CO applies fsGroup \
                     itself (CSIDriver fsGroupPolicy: File)",
                    quote(&mount.volume_mount_group)
                )));
            }
            Ok(Capability {
                access_mode,
                block: false,
                fs_type: mount.fs_type.clone(),
                mount_flags: mount.mount_flags.clone(),
            })
        }
        None => Err(Error::InvalidArgument("volume capability needs an access type (mount or block)".into())),
    }
}

fn mode_name(mode: i32) -> &'static str {
    Mode::try_from(mode).map_or("UNKNOWN", |m| m.as_str_name())
}

/// A non-empty list of capabilities, each one Loam serves.
pub fn capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument("volume capabilities are required".into()));
    }
    caps.iter().map(|c| capability(Some(c))).collect()
}

/// A capacity range; `None` when the request has none.
pub fn capacity(range: Option<&csi::CapacityRange>) -> Result<Option<CapacityRange>> {
    let Some(range) = range else { return Ok(None) };
    let (Ok(required), Ok(limit)) = (u64::try_from(range.required_bytes), u64::try_from(range.limit_bytes)) else {
        return Err(Error::InvalidArgument("capacity range must not be negative".into()));
    };
    if limit != 0 && limit < required {
        return Err(Error::InvalidArgument(format!("capacity limit {limit} is below the required {required} bytes")));
    }
    Ok(Some(CapacityRange { required, limit }))
}

/// StorageClass parameters within the spec's size limit, sorted.
pub fn parameters(params: &HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    let size: usize = params.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_PARAMETERS_LEN {
        return Err(Error::InvalidArgument(format!("parameters exceed {MAX_PARAMETERS_LEN} bytes")));
    }
    Ok(params.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The source volumes of a group snapshot: at least one, each a present id,
/// none named twice (one volume cannot be two members).
pub fn source_volume_ids(ids: &[String]) -> Result<Vec<String>> {
    if ids.is_empty() {
        return Err(Error::InvalidArgument("source volume ids are required".into()));
    }
    let mut seen = HashSet::new();
    for id in ids {
        required_id("source volume id", id)?;
        if !seen.insert(id) {
            return Err(Error::InvalidArgument(format!("source volume {id} is named twice")));
        }
    }
    Ok(ids.to_vec())
}

/// The one VolumeGroupSnapshotClass parameter Loam accepts, and only with a
/// class's own `deletionPolicy` values. It changes nothing: Kubernetes' own
/// storage suite (`GenerateVolumeGroupSnapshotClassSpec`, e2e v1.37) copies
/// the class's deletion policy into its parameters, which csi-snapshotter
/// passes on, and the class's own field is what decides.
pub const GROUP_DELETION_POLICY_PARAMETER: &str = "deletionPolicy";

/// VolumeGroupSnapshotClass parameters: Loam takes none but the CO's own keys
/// and an inert [`GROUP_DELETION_POLICY_PARAMETER`], and refuses anything
/// else (as it does StorageClass keys) so a typo fails loudly.
pub fn group_snapshot_parameters(params: &HashMap<String, String>) -> Result<()> {
    parameters(params)?;
    for (key, value) in params.iter().filter(|(k, _)| !k.starts_with(CO_PARAMETER_PREFIX)) {
        if key != GROUP_DELETION_POLICY_PARAMETER {
            return Err(Error::InvalidArgument(format!(
                "unknown group snapshot parameter {}: Loam's group snapshots take no parameters",
                quote(key)
            )));
        }
        if !matches!(value.as_str(), "Delete" | "Retain") {
            return Err(Error::InvalidArgument(format!(
                "group snapshot parameter {GROUP_DELETION_POLICY_PARAMETER}={} is not a deletion policy; use \"Delete\" \
                 or \"Retain\" (or leave it out: the class's own deletionPolicy decides)",
                quote(value)
            )));
        }
    }
    Ok(())
}

/// The VolumeSnapshotClass parameter that says where a snapshot is kept.
pub const PROTECTION_PARAMETER: &str = "protection";

/// Where a snapshot is kept (VolumeSnapshotClass `protection`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protection {
    /// On its volume's node only: it goes with the node.
    #[default]
    Local,
    /// On its volume's node and, as a verified copy, on one other node, so
    /// it outlives either ([`crate::ids::SnapshotId`] names both).
    OffNode,
}

impl Protection {
    const ALL: [Protection; 2] = [Protection::Local, Protection::OffNode];

    /// The parameter's value for it.
    pub fn name(self) -> &'static str {
        match self {
            Protection::Local => "local",
            Protection::OffNode => "off-node",
        }
    }
}

/// VolumeSnapshotClass parameters: `protection` and the CO's own keys;
/// anything else, and any other value, is refused (as StorageClass
/// parameters are) so a typo fails loudly.
pub fn snapshot_parameters(params: &HashMap<String, String>) -> Result<Protection> {
    parameters(params)?;
    let mut protection = Protection::default();
    for (key, value) in params.iter().filter(|(k, _)| !k.starts_with(CO_PARAMETER_PREFIX)) {
        if key != PROTECTION_PARAMETER {
            return Err(Error::InvalidArgument(format!(
                "unknown snapshot parameter {}: Loam's snapshots take only {PROTECTION_PARAMETER}",
                quote(key)
            )));
        }
        protection = Protection::ALL.into_iter().find(|p| p.name() == value).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "snapshot parameter {PROTECTION_PARAMETER}={} is not one Loam has; use \"{}\" or \"{}\"",
                quote(value),
                Protection::Local.name(),
                Protection::OffNode.name()
            ))
        })?;
    }
    Ok(protection)
}

/// The source a new volume starts from.
pub fn content_source(source: Option<&csi::VolumeContentSource>) -> Result<Option<ContentSource>> {
    use csi::volume_content_source::Type;
    match source.and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Type::Snapshot(s)) => {
            Ok(Some(ContentSource::Snapshot(required_id("source snapshot id", &s.snapshot_id)?.to_owned())))
        }
        Some(Type::Volume(v)) => {
            Ok(Some(ContentSource::Volume(required_id("source volume id", &v.volume_id)?.to_owned())))
        }
    }
}

/// The nodes a topology requirement allows, or `None` when it allows any.
///
/// Segments without Loam's node key do not constrain Loam.
pub fn allowed_nodes(req: Option<&csi::TopologyRequirement>) -> Option<Vec<String>> {
    let req = req?;
    let nodes: Vec<String> =
        req.requisite.iter().chain(&req.preferred).filter_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned()).collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// The volume context key by which the kubelet marks the NodePublishVolume
/// of a pod's inline volume (given `podInfoOnMount`).
pub const INLINE_CONTEXT_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// The inline volume attribute that sets its size.
pub const SIZE_ATTRIBUTE: &str = "size";
/// The largest size an inline volume may ask for, 1 PiB: no node offers one
/// pod that much local scratch, so a larger size is a typo (`1Ei` for `1Gi`)
/// and is answered as one rather than as a full node.
pub const MAX_INLINE_SIZE: u64 = 1 << 50;

/// Whether a NodePublishVolume is for a pod's inline volume (CSI's ephemeral).
pub fn is_inline(context: &HashMap<String, String>) -> Result<bool> {
    match context.get(INLINE_CONTEXT_KEY).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::InvalidArgument(format!(
            "volume context {INLINE_CONTEXT_KEY}={} must be true or false",
            quote(other)
        ))),
    }
}

/// An inline volume's attributes, as its pod's author wrote them: `size` and
/// the StorageClass parameters the backends take; the kubelet's own keys are
/// dropped and anything else is refused. The pod's `fsType` (the capability's)
/// picks a `loop` volume's filesystem when the attributes do not.
pub fn inline_volume(
    volume_id: &str,
    context: &HashMap<String, String>,
    capability: &Capability,
) -> Result<InlineVolume> {
    if capability.block {
        return Err(Error::InvalidArgument(
            "an inline volume is mounted into its pod as a filesystem; a raw block volume needs a PersistentVolumeClaim"
                .into(),
        ));
    }
    let mut size = None;
    let mut parameters = BTreeMap::new();
    for (key, value) in context {
        // The kubelet's own keys (the inline flag, the pod, service
        // account tokens), under the prefix the sidecars use: never stored.
        if key.starts_with(CO_PARAMETER_PREFIX) {
            continue;
        }
        if key == SIZE_ATTRIBUTE {
            let bytes =
                inline_size(value).map_err(|e| Error::InvalidArgument(format!("volume attribute size: {e}")))?;
            size = Some(bytes);
        } else {
            parameters.insert(key.clone(), value.clone());
        }
    }
    if parameters.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > MAX_PARAMETERS_LEN {
        return Err(Error::InvalidArgument(format!("volume attributes exceed {MAX_PARAMETERS_LEN} bytes")));
    }
    let no_mutable = BTreeMap::new();
    let layout = parse_layout(&parameters, &no_mutable, &capability.fs_type).map_err(|e| match e {
        Error::InvalidArgument(why) => Error::InvalidArgument(format!(
            "inline volume attributes: {why}; besides the StorageClass parameters an inline volume takes only \
                 {SIZE_ATTRIBUTE}"
        )),
        other => other,
    })?;
    let pod = |key: &str| context.get(&format!("{CO_PARAMETER_PREFIX}pod.{key}")).cloned().unwrap_or_default();
    Ok(InlineVolume {
        size,
        parameters,
        layout,
        origin: InlineOrigin {
            volume_id: volume_id.to_owned(),
            pod_namespace: pod("namespace"),
            pod_name: pod("name"),
            pod_uid: pod("uid"),
        },
    })
}

/// The size of an inline volume: a Kubernetes quantity ([`crate::quantity`])
/// above 0 and at most [`MAX_INLINE_SIZE`].
pub fn inline_size(text: &str) -> std::result::Result<u64, String> {
    match crate::quantity::parse(text)? {
        0 => Err(format!("{} is no bytes at all; an inline volume needs a size above 0", quote(text))),
        bytes if bytes <= MAX_INLINE_SIZE => Ok(bytes),
        _ => Err(format!("{} is more than 1Pi, the most an inline volume may ask for", quote(text))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume_capability::{AccessMode as CsiAccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, mount: Option<MountVolume>) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(CsiAccessMode { mode: mode as i32 }),
            access_type: Some(match mount {
                Some(m) => AccessType::Mount(m),
                None => AccessType::Block(BlockVolume {}),
            }),
        }
    }

    #[test]
    fn paths_must_be_absolute_normal_and_outside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().canonicalize().unwrap();
        let inside = root.join("volumes/x");
        for bad in ["", "relative/path", "/a/../b", "/a/./b", "/a\0b"] {
            assert!(caller_path("target path", bad, &root).is_err(), "{bad:?}");
        }
        assert!(caller_path("target path", inside.to_str().unwrap(), &root).is_err());
        assert!(caller_path("target path", "/", &root).is_err());
        assert!(caller_path("target path", &"/x".repeat(3000), &root).is_err());
        // A symlink elsewhere that leads into the root is caught too.
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&root, other.path().join("link")).unwrap();
        let via_link = other.path().join("link/volumes/x");
        assert!(caller_path("target path", via_link.to_str().unwrap(), &root).is_err());
        let fine = other.path().join("target");
        assert_eq!(caller_path("target path", fine.to_str().unwrap(), &root).unwrap(), fine);
    }

    #[test]
    fn multi_node_modes_are_refused_with_a_reason() {
        let err = capability(Some(&cap(Mode::MultiNodeMultiWriter, None))).unwrap_err();
        assert!(err.to_string().contains("single-node"), "{err}");
        assert!(capability(None).is_err());
        let ok = capability(Some(&cap(Mode::SingleNodeWriter, Some(MountVolume::default())))).unwrap();
        assert!(!ok.block);
        assert!(capabilities(&[]).is_err());
    }

    #[test]
    fn mount_options_are_checked() {
        let bad_flag = MountVolume { mount_flags: vec!["x-weird".into()], ..Default::default() };
        assert!(capability(Some(&cap(Mode::SingleNodeWriter, Some(bad_flag)))).is_err());
        // No VOLUME_MOUNT_GROUP: a group is refused, numeric or not, so a
        // CO that sends one anyway learns that nobody applied it.
        for gid in ["wheel", "1000"] {
            let group = MountVolume { volume_mount_group: gid.into(), ..Default::default() };
            let err = capability(Some(&cap(Mode::SingleNodeWriter, Some(group)))).unwrap_err();
            assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("fsGroupPolicy")), "{err:?}");
        }
    }

    #[test]
    fn group_sources_and_parameters_are_checked() {
        let ids = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(source_volume_ids(&ids(&["a", "b"])).unwrap(), ids(&["a", "b"]));
        let refused: [&[&str]; 4] = [&[], &["a", "a"], &["a", ""], &["a\0"]];
        for bad in refused {
            let err = source_volume_ids(&ids(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(group_snapshot_parameters(&params(&[])).is_ok());
        let secret = [("csi.storage.k8s.io/group-snapshotter-secret-name", "s")];
        assert!(group_snapshot_parameters(&params(&secret)).is_ok());
        let err = group_snapshot_parameters(&params(&[("freeze", "false")])).unwrap_err();
        assert!(err.to_string().contains("\"freeze\""), "{err}");
        // What Kubernetes' storage suite puts in every class it makes.
        for policy in ["Delete", "Retain"] {
            assert!(group_snapshot_parameters(&params(&[("deletionPolicy", policy)])).is_ok(), "{policy}");
        }
        for bad in ["delete", "", "Recycle"] {
            let err = group_snapshot_parameters(&params(&[("deletionPolicy", bad)])).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn snapshot_parameters_are_a_closed_list() {
        let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(snapshot_parameters(&params(&[])).unwrap(), Protection::Local);
        let secret = ("csi.storage.k8s.io/snapshotter-secret-name", "s");
        assert_eq!(snapshot_parameters(&params(&[secret])).unwrap(), Protection::Local);
        assert_eq!(snapshot_parameters(&params(&[("protection", "local")])).unwrap(), Protection::Local);
        let off = params(&[("protection", "off-node"), secret]);
        assert_eq!(snapshot_parameters(&off).unwrap(), Protection::OffNode);
        for (bad, named) in [
            (&[("protection", "offnode")][..], "\"offnode\""),
            (&[("protection", "")], "protection=\"\""),
            (&[("protection", "Off-Node")], "\"Off-Node\""),
            (&[("protection", "off-node"), ("copies", "2")], "\"copies\""),
        ] {
            let err = snapshot_parameters(&params(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(err.to_string().contains(named), "{bad:?}: {err}");
        }
    }

    #[test]
    fn capacity_ranges_are_checked() {
        let range = |r, l| csi::CapacityRange { required_bytes: r, limit_bytes: l };
        assert!(capacity(Some(&range(10, 5))).is_err());
        assert!(capacity(Some(&range(-1, 0))).is_err());
        assert_eq!(capacity(None).unwrap(), None);
        assert_eq!(capacity(Some(&range(5, 0))).unwrap(), Some(CapacityRange { required: 5, limit: 0 }));
    }

    #[test]
    fn inline_sizes_are_quantities_above_zero_up_to_1pi() {
        assert_eq!(inline_size("64Mi"), Ok(64 << 20));
        assert_eq!(inline_size("1Pi"), Ok(MAX_INLINE_SIZE));
        for bad in ["0", "0.0Gi", "1Ei", "2Pi", "1E", "64K"] {
            assert!(inline_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn inline_attributes_take_size_and_storage_class_parameters_only() {
        let context = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let mount = |fs: &str| Capability {
            access_mode: AccessMode::SingleNodeMultiWriter,
            block: false,
            fs_type: fs.into(),
            mount_flags: vec![],
        };
        let kubelet = [
            (INLINE_CONTEXT_KEY, "true"),
            ("csi.storage.k8s.io/pod.name", "web-0"),
            ("csi.storage.k8s.io/pod.namespace", "shop"),
            ("csi.storage.k8s.io/pod.uid", "u-1"),
            ("csi.storage.k8s.io/serviceAccount.tokens", "{\"secret\":1}"),
        ];
        let mut pairs = kubelet.to_vec();
        pairs.push(("size", "64Mi"));
        let v = inline_volume("csi-1", &context(&pairs), &mount("")).unwrap();
        assert_eq!((v.size, v.layout), (Some(64 << 20), crate::records::Layout::Dir));
        assert!(v.parameters.is_empty(), "the kubelet's keys (tokens too) are never kept: {:?}", v.parameters);
        assert_eq!(
            v.origin,
            InlineOrigin {
                volume_id: "csi-1".into(),
                pod_namespace: "shop".into(),
                pod_name: "web-0".into(),
                pod_uid: "u-1".into()
            }
        );
        assert_eq!(inline_volume("csi-1", &context(&kubelet), &mount("")).unwrap().size, None, "default size");

        // The pod's fsType picks the loop filesystem; an attribute that disagrees is refused.
        let v = inline_volume("csi-1", &context(&[("backend", "loop")]), &mount("xfs")).unwrap();
        assert!(matches!(v.layout, crate::records::Layout::Loop(spec) if spec.fs.name() == "xfs"), "xfs");
        let both = context(&[("backend", "loop"), ("fsType", "ext4")]);
        assert!(inline_volume("csi-1", &both, &mount("xfs")).is_err());
        let thin = context(&[("backend", "loop"), ("provisioning", "thin"), ("mkfsOptions", "-i 8192")]);
        assert!(!inline_volume("csi-1", &thin, &mount("")).unwrap().layout.thick());

        for bad in [
            &[("size", "-1")][..],
            &[("size", "1Ei")],
            &[("size", "abc")],
            &[("color", "blue")],
            &[("backend", "lvm")],
            &[("fsType", "ext4")],
            &[("backend", "loop"), ("fsType", "ntfs")],
        ] {
            let err = inline_volume("csi-1", &context(bad), &mount("")).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
        }
        let block = Capability { block: true, ..mount("") };
        assert_eq!(inline_volume("csi-1", &context(&[]), &block).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn only_true_marks_an_inline_volume() {
        let flag = |v: &str| HashMap::from([(INLINE_CONTEXT_KEY.to_owned(), v.to_owned())]);
        assert!(is_inline(&flag("true")).unwrap());
        assert!(!is_inline(&flag("false")).unwrap());
        assert!(!is_inline(&HashMap::new()).unwrap());
        assert!(is_inline(&flag("yes")).is_err());
    }
}
