//! The storage engines behind volumes.
//!
//! A StorageClass picks one with its `backend` parameter. The set is closed
//! and known at compile time, so the driver matches on [`BackendKind`]
//! rather than holding trait objects.

pub mod dir;

use std::collections::BTreeMap;

use crate::error::{Error, Result};
pub use crate::records::BackendKind;

/// The StorageClass parameter that picks the backend.
pub const BACKEND_PARAM: &str = "backend";

/// Reads the backend a CreateVolume asks for; `dir` when it names none.
pub fn kind_from_parameters(parameters: &BTreeMap<String, String>) -> Result<BackendKind> {
    match parameters.get(BACKEND_PARAM).map(String::as_str) {
        None | Some("dir") => Ok(BackendKind::Dir),
        Some(other) => Err(Error::InvalidArgument(format!(
            "parameter {BACKEND_PARAM}={other:?} is not a backend this driver has; use \"dir\""
        ))),
    }
}

/// Checks that every parameter is one Loam knows, so typos fail loudly.
pub fn check_parameters(parameters: &BTreeMap<String, String>) -> Result<BackendKind> {
    let kind = kind_from_parameters(parameters)?;
    for key in parameters.keys() {
        // The external-provisioner passes its own `csi.storage.k8s.io/*` keys
        // through only when asked to; they are never meant for the driver.
        if key != BACKEND_PARAM && !key.starts_with("csi.storage.k8s.io/") {
            return Err(Error::InvalidArgument(format!(
                "unknown StorageClass parameter {key:?}; the dir backend takes only \"{BACKEND_PARAM}\""
            )));
        }
    }
    Ok(kind)
}
