//! One in-flight operation per volume or snapshot.
//!
//! The CSI spec lets a plugin answer ABORTED when an operation on the same
//! object is already pending, and the sidecars retry. Holding a lock per key
//! (instead of one lock for the whole driver) lets unrelated volumes proceed in
//! parallel while no two operations ever race on one volume's files or record.
//! Staging and target paths are claimed the same way, so two volumes never
//! race each other onto one path (or one inside the other).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::ids::{Key, Kind};

/// The set of objects with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<(u8, Key)>>>,
}

/// Proof that the holder is the only operation on one object; released on drop.
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<(u8, Key)>>>,
    slot: (u8, Key),
}

impl InFlight {
    /// Claims the object, or fails with ABORTED when another operation holds it.
    pub fn try_claim(&self, kind: Kind, key: Key) -> Result<Guard> {
        let slot = (kind as u8, key);
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(slot) {
            return Err(Error::Aborted(format!(
                "an operation on {} {key} is already in progress; retry when it finishes",
                kind.label()
            )));
        }
        Ok(Guard { busy: self.busy.clone(), slot })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.slot);
    }
}

/// The staging and target paths a node operation is mounting at.
#[derive(Debug, Default, Clone)]
pub struct PathsInFlight {
    busy: Arc<Mutex<Vec<PathBuf>>>,
}

/// Proof that no other operation mounts at, inside or around a path; released on drop.
#[derive(Debug)]
pub struct PathGuard {
    busy: Arc<Mutex<Vec<PathBuf>>>,
    path: PathBuf,
}

impl PathsInFlight {
    /// Claims `path`, or fails with ABORTED when another operation holds it,
    /// a path inside it or a path around it: each would pass the other's
    /// check of the records before either wrote its own.
    pub fn try_claim(&self, path: &Path) -> Result<PathGuard> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = busy.iter().find(|held| held.starts_with(path) || path.starts_with(held)) {
            return Err(Error::Aborted(format!(
                "another volume is being staged or published at {}; retry when it finishes",
                held.display()
            )));
        }
        busy.push(path.to_owned());
        Ok(PathGuard { busy: self.busy.clone(), path: path.to_owned() })
    }
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(index) = busy.iter().position(|held| *held == self.path) {
            busy.swap_remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_second_claim_is_aborted_until_the_first_is_released() {
        let inflight = InFlight::default();
        let key = Key::for_name(Kind::Volume, "a");
        let first = inflight.try_claim(Kind::Volume, key).unwrap();
        let err = inflight.try_claim(Kind::Volume, key).unwrap_err();
        assert_eq!(err.code(), Code::Aborted);
        // Another object, and the same key in the other namespace, are free.
        let _other = inflight.try_claim(Kind::Volume, Key::for_name(Kind::Volume, "b")).unwrap();
        let _snap = inflight.try_claim(Kind::Snapshot, key).unwrap();
        drop(first);
        inflight.try_claim(Kind::Volume, key).unwrap();
    }

    #[test]
    fn a_path_is_claimed_with_everything_inside_and_around_it() {
        let paths = PathsInFlight::default();
        let staging = paths.try_claim(Path::new("/k/plugins/vol-a/globalmount")).unwrap();
        for clash in ["/k/plugins/vol-a/globalmount", "/k/plugins/vol-a/globalmount/x", "/k/plugins/vol-a"] {
            assert_eq!(paths.try_claim(Path::new(clash)).unwrap_err().code(), Code::Aborted, "{clash}");
        }
        // A sibling, even one sharing the name as a prefix, is free.
        let _sibling = paths.try_claim(Path::new("/k/plugins/vol-a/globalmount2")).unwrap();
        drop(staging);
        paths.try_claim(Path::new("/k/plugins/vol-a/globalmount")).unwrap();
    }
}
