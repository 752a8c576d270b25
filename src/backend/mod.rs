//! The storage engines behind volumes.
//!
//! A StorageClass picks one with its `backend` parameter. The set is closed
//! and known at compile time, so the driver matches on [`BackendKind`]
//! rather than holding trait objects.

pub mod dir;
pub mod loopback;

use std::collections::BTreeMap;

use crate::error::{Error, Result, quote};
use crate::kernel::blockfs::FsType;
use crate::kernel::mkfs_options::MkfsOptions;
pub use crate::records::{BackendKind, LoopSpec};

/// The StorageClass parameter that picks the backend.
pub const BACKEND_PARAM: &str = "backend";

/// Keys Kubernetes adds for itself (the sidecars: secrets, PVC names, fstype;
/// the kubelet: an inline volume's pod); never meant for the driver, so never refused.
pub const CO_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// The parameters each backend accepts, besides `backend`.
const LOOP_PARAMS: &[&str] = &["fsType", "provisioning", "mkfsOptions"];

/// Reads a CreateVolume's parameters: the backend and, for `loop`, the
/// image layout. Unknown keys are refused, so typos fail loudly.
pub fn parse_parameters(parameters: &BTreeMap<String, String>) -> Result<(BackendKind, Option<LoopSpec>)> {
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
        return Ok((kind, None));
    }
    let fs_type = parameters.get("fsType").map_or("ext4", String::as_str);
    let fs = FsType::parse(fs_type).ok_or_else(|| {
        Error::InvalidArgument(format!("fsType {} is not supported; use ext4 or xfs", quote(fs_type)))
    })?;
    let thick = match parameters.get("provisioning").map(String::as_str) {
        None | Some("thick") => true,
        Some("thin") => false,
        Some(other) => {
            return Err(Error::InvalidArgument(format!("provisioning {} must be \"thick\" or \"thin\"", quote(other))));
        }
    };
    let mkfs_options = match parameters.get("mkfsOptions") {
        Some(text) => {
            MkfsOptions::parse(fs, text).map_err(|why| Error::InvalidArgument(format!("mkfsOptions: {why}")))?
        }
        None => MkfsOptions::none(fs),
    };
    Ok((kind, Some(LoopSpec { fs_type: fs.name().to_owned(), thick, mkfs_options: mkfs_options.words() })))
}

/// The filesystem and mkfs options a `loop` volume is formatted with, read
/// back from its spec. Options a record holds but Loam no longer accepts
/// (written by an older version, or edited) are refused before mkfs runs.
pub fn filesystem_of(spec: &LoopSpec) -> Result<(FsType, MkfsOptions)> {
    let fs = FsType::parse(&spec.fs_type)
        .ok_or_else(|| Error::Damaged(format!("volume record names unknown fsType {:?}", spec.fs_type)))?;
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

/// Reads `mutable_parameters` for a volume on `kind`: whether it asks for a
/// thick (`Some(true)`) or thin image, or nothing (`None`). Any key the
/// backend cannot change is refused, naming the ones it can.
pub fn parse_mutable_parameters(kind: BackendKind, mutable: &BTreeMap<String, String>) -> Result<Option<bool>> {
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
    match mutable.get("provisioning").map(String::as_str) {
        None => Ok(None),
        Some("thick") => Ok(Some(true)),
        Some("thin") => Ok(Some(false)),
        Some(other) => Err(Error::InvalidArgument(format!(
            "mutable parameter provisioning {} must be \"thick\" or \"thin\"",
            quote(other)
        ))),
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
        assert_eq!(parse_parameters(&params(&[])).unwrap(), (BackendKind::Dir, None));
        let (kind, spec) =
            parse_parameters(&params(&[("backend", "loop"), ("fsType", "xfs"), ("provisioning", "thin")])).unwrap();
        assert_eq!(kind, BackendKind::Loop);
        assert_eq!(spec.unwrap(), LoopSpec { fs_type: "xfs".into(), thick: false, mkfs_options: vec![] });
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
        assert_eq!(parse_mutable_parameters(loop_, &params(&[("provisioning", "thick")])).unwrap(), Some(true));
        assert_eq!(parse_mutable_parameters(loop_, &params(&[("provisioning", "thin")])).unwrap(), Some(false));
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
}
