//! A volume's specification, read once from a request wherever one arrives
//! (CreateVolume, GetCapacity, an inline volume, ModifyVolume): the backend
//! the StorageClass picks and, for `loop`, the image layout.

use std::collections::BTreeMap;

use crate::config::CO_PARAMETER_PREFIX;
use crate::error::{Error, Result, quote};
use crate::kernel::blockfs::FsType;
use crate::kernel::mkfs_options::MkfsOptions;
use crate::records::{BackendKind, Layout, LoopSpec, Provisioning};

/// The StorageClass parameter that picks the backend.
pub const BACKEND_PARAM: &str = "backend";
/// The parameter naming a `loop` volume's filesystem.
const FS_TYPE_PARAM: &str = "fsType";

/// The parameters each backend accepts, besides `backend`.
const LOOP_PARAMS: &[&str] = &["fsType", "provisioning", "mkfsOptions"];

/// Reads a new volume's layout from the StorageClass `parameters`, the
/// VolumeAttributesClass's `mutable` ones (which win) and the filesystem the
/// capability names (`capability_fs`, empty when none): it fills in an unset
/// `fsType`, as Kubernetes passes `csi.storage.k8s.io/fstype` there, and must
/// not contradict a set one.
pub fn parse_layout(
    parameters: &BTreeMap<String, String>,
    mutable: &BTreeMap<String, String>,
    capability_fs: &str,
) -> Result<Layout> {
    let fills_in = !capability_fs.is_empty()
        && parameters.get(BACKEND_PARAM).is_some_and(|b| b == "loop")
        && !parameters.contains_key(FS_TYPE_PARAM);
    let mut layout = if fills_in {
        // Parsed with the filesystem in place, so mkfsOptions are checked
        // against the filesystem the volume gets.
        let mut with_fs = parameters.clone();
        with_fs.insert(FS_TYPE_PARAM.to_owned(), capability_fs.to_owned());
        parse_parameters(&with_fs)?
    } else {
        parse_parameters(parameters)?
    };
    if let Layout::Loop(spec) = &layout
        && !capability_fs.is_empty()
        && capability_fs != spec.fs.name()
    {
        return Err(Error::InvalidArgument(format!(
            "the capability's filesystem {} and the fsType parameter {} differ; set one of them",
            quote(capability_fs),
            spec.fs.name()
        )));
    }
    if let Some(provisioning) = parse_mutable_parameters(layout.backend(), mutable)?
        && let Layout::Loop(spec) = &mut layout
    {
        spec.provisioning = provisioning;
    }
    Ok(layout)
}

/// Reads a CreateVolume's parameters: the backend and, for `loop`, the
/// image layout. Unknown keys are refused, so typos fail loudly.
pub fn parse_parameters(parameters: &BTreeMap<String, String>) -> Result<Layout> {
    let kind = match parameters.get(BACKEND_PARAM).map(String::as_str) {
        None | Some("dir") => BackendKind::Dir,
        Some("loop") => BackendKind::Loop,
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "parameter {BACKEND_PARAM}={} is not a backend this driver has; use \"dir\" or \"loop\"",
                quote(other)
            )));
        }
    };
    let accepted: &[&str] = match kind {
        BackendKind::Dir => &[],
        BackendKind::Loop => LOOP_PARAMS,
    };
    for key in parameters.keys() {
        if key != BACKEND_PARAM && !key.starts_with(CO_PARAMETER_PREFIX) && !accepted.contains(&key.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "unknown StorageClass parameter {} for backend {kind:?}; accepted: {BACKEND_PARAM}{}",
                quote(key),
                accepted.iter().map(|k| format!(", {k}")).collect::<String>()
            )));
        }
    }
    if kind == BackendKind::Dir {
        return Ok(Layout::Dir);
    }
    let fs_type = parameters.get(FS_TYPE_PARAM).map_or("ext4", String::as_str);
    let fs = FsType::parse(fs_type).ok_or_else(|| {
        Error::InvalidArgument(format!("fsType {} is not supported; use ext4 or xfs", quote(fs_type)))
    })?;
    let provisioning = match parameters.get("provisioning").map(String::as_str) {
        None => Provisioning::Thick,
        Some(name) => Provisioning::parse(name).ok_or_else(|| {
            Error::InvalidArgument(format!("provisioning {} must be \"thick\" or \"thin\"", quote(name)))
        })?,
    };
    let mkfs_options = match parameters.get("mkfsOptions") {
        Some(text) => {
            MkfsOptions::parse(fs, text).map_err(|why| Error::InvalidArgument(format!("mkfsOptions: {why}")))?
        }
        None => MkfsOptions::none(fs),
    };
    Ok(Layout::Loop(LoopSpec { fs, provisioning, mkfs_options: mkfs_options.words() }))
}

/// The filesystem and mkfs options a `loop` volume is formatted with, read
/// back from its spec. Options a record holds but Loam no longer accepts
/// (written by an older version, or edited) are refused before mkfs runs.
pub fn filesystem_of(spec: &LoopSpec) -> Result<(FsType, MkfsOptions)> {
    let fs = spec.fs;
    let options = MkfsOptions::from_words(fs, &spec.mkfs_options).map_err(|why| {
        Error::FailedPrecondition(format!(
            "the volume's mkfsOptions are no longer accepted ({why}); it was never formatted, so delete it and \
             create it again with accepted options"
        ))
    })?;
    Ok((fs, options))
}

/// The least capacity a `loop` volume with `spec` can have: its filesystem's
/// minimum for its mkfs options (capacities below are rounded up to it).
pub fn min_capacity(spec: &LoopSpec) -> Result<u64> {
    Ok(filesystem_of(spec)?.1.min_bytes())
}

/// The parameters a VolumeAttributesClass may change on a `loop` volume
/// (`mutable_parameters`); `dir` volumes have none.
pub const LOOP_MUTABLE_PARAMS: &[&str] = &["provisioning"];

/// Reads `mutable_parameters` for a volume on `kind`: the provisioning it
/// asks for, or nothing (`None`). Any key the backend cannot change is
/// refused, naming the ones it can.
pub fn parse_mutable_parameters(kind: BackendKind, mutable: &BTreeMap<String, String>) -> Result<Option<Provisioning>> {
    let accepted: &[&str] = match kind {
        BackendKind::Dir => &[],
        BackendKind::Loop => LOOP_MUTABLE_PARAMS,
    };
    if let Some(key) = mutable.keys().find(|k| !accepted.contains(&k.as_str())) {
        let can = if accepted.is_empty() { "none".to_owned() } else { accepted.join(", ") };
        return Err(Error::InvalidArgument(format!(
            "mutable parameter {} cannot be set on a {kind:?} volume; mutable parameters of {kind:?} volumes: {can}",
            quote(key)
        )));
    }
    match mutable.get("provisioning") {
        None => Ok(None),
        Some(name) => Provisioning::parse(name).map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "mutable parameter provisioning {} must be \"thick\" or \"thin\"",
                quote(name)
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn backends_and_their_parameters_are_read_and_typos_refused() {
        assert_eq!(parse_parameters(&params(&[])).unwrap(), Layout::Dir);
        let layout =
            parse_parameters(&params(&[("backend", "loop"), ("fsType", "xfs"), ("provisioning", "thin")])).unwrap();
        let thin_xfs = LoopSpec { fs: FsType::Xfs, provisioning: Provisioning::Thin, mkfs_options: vec![] };
        assert_eq!(layout, Layout::Loop(thin_xfs));
        assert!(parse_parameters(&params(&[("backend", "lvm")])).is_err());
        assert!(parse_parameters(&params(&[("backend", "dir"), ("fsType", "xfs")])).is_err());
        assert!(parse_parameters(&params(&[("backend", "loop"), ("fstype", "xfs")])).is_err());
        assert!(parse_parameters(&params(&[("backend", "loop"), ("fsType", "ntfs")])).is_err());
        assert!(parse_parameters(&params(&[("backend", "loop"), ("provisioning", "fat")])).is_err());
        assert!(parse_parameters(&params(&[("backend", "loop"), ("csi.storage.k8s.io/pvc/name", "x")])).is_ok());
    }

    #[test]
    fn mutable_parameters_are_provisioning_of_loop_volumes_only() {
        let loop_ = BackendKind::Loop;
        assert_eq!(parse_mutable_parameters(loop_, &params(&[])).unwrap(), None);
        assert_eq!(
            parse_mutable_parameters(loop_, &params(&[("provisioning", "thick")])).unwrap(),
            Some(Provisioning::Thick)
        );
        assert_eq!(
            parse_mutable_parameters(loop_, &params(&[("provisioning", "thin")])).unwrap(),
            Some(Provisioning::Thin)
        );
        let err = parse_mutable_parameters(loop_, &params(&[("provisioning", "fat")])).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        let err = parse_mutable_parameters(loop_, &params(&[("XXX_FakeKey", "x")])).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("provisioning")), "{err:?}");
        // Immutable StorageClass parameters are not mutable ones.
        assert!(parse_mutable_parameters(loop_, &params(&[("fsType", "xfs")])).is_err());
        assert_eq!(parse_mutable_parameters(BackendKind::Dir, &params(&[])).unwrap(), None);
        let err = parse_mutable_parameters(BackendKind::Dir, &params(&[("provisioning", "thick")])).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("none")), "{err:?}");
    }

    #[test]
    fn the_capability_filesystem_fills_in_and_must_agree() {
        let loop_thin = params(&[("backend", "loop"), ("provisioning", "thin")]);
        let none = BTreeMap::new();
        let fs_of = |layout| match layout {
            Layout::Loop(spec) => spec.fs,
            Layout::Dir => panic!("a loop volume"),
        };
        let layout = parse_layout(&loop_thin, &none, "xfs").unwrap();
        assert_eq!(fs_of(layout), FsType::Xfs, "the capability names the filesystem");
        let layout = parse_layout(&loop_thin, &none, "").unwrap();
        assert_eq!(fs_of(layout), FsType::Ext4, "ext4 when nothing names one");
        let ext4 = params(&[("backend", "loop"), ("fsType", "ext4")]);
        let err = parse_layout(&ext4, &none, "xfs").unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("differ")), "{err}");
        assert!(parse_layout(&ext4, &none, "ext4").is_ok());
        // A directory volume is a bind mount: the capability's filesystem says nothing about it.
        assert_eq!(parse_layout(&none, &none, "xfs").unwrap(), Layout::Dir);
    }

    #[test]
    fn mkfs_options_are_checked_against_the_filesystem_the_volume_gets() {
        let xfs_options = params(&[("backend", "loop"), ("mkfsOptions", "-i maxpct=5")]);
        let none = BTreeMap::new();
        assert!(parse_layout(&xfs_options, &none, "xfs").is_ok(), "xfs options for an xfs volume");
        assert!(parse_layout(&xfs_options, &none, "").is_err(), "xfs options for an ext4 volume");
    }

    #[test]
    fn mutable_parameters_win_over_the_storage_class() {
        let thin = params(&[("backend", "loop"), ("provisioning", "thin")]);
        let thick = params(&[("provisioning", "thick")]);
        assert!(parse_layout(&thin, &thick, "").unwrap().thick());
        assert!(parse_layout(&params(&[]), &thick, "").is_err(), "a dir volume has no mutable parameters");
    }
}
