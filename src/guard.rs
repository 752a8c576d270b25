//! One in-flight operation per volume or snapshot.
//!
//! The CSI spec lets a plugin answer ABORTED when an operation on the same
//! object is already pending, and the sidecars retry. Holding a lock per key
//! (instead of one lock for the whole driver) lets unrelated volumes proceed in
//! parallel while no two operations ever race on one volume's files or record.

use std::collections::HashSet;
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
}
