//! The write-order consistency rule of group snapshots: which sets of
//! volumes can be cut at one point in time. One rule for the node that cuts
//! a group of its own volumes ([`crate::driver`]) and for the controller
//! that coordinates a group across nodes ([`crate::routing`]).
//!
//! The spec asks a group snapshot to be write-order consistent or to fail:
//! every member as of one instant of the stream of writes to all of them.
//! Each member is held still in one of four ways ([`Hold`]). Every frozen
//! member is frozen before any member is cut and thawed after every member
//! is, so at most one member may be live: while its point-in-time snapshot
//! is taken every other member is frozen or quiet. Two live members would be
//! cut at two instants, and a copied member is not cut at any one instant,
//! so either is refused with FAILED_PRECONDITION naming the volumes. A group
//! of one copied volume is allowed: it promises what CreateSnapshot of that
//! volume does.

use crate::error::{Error, Result};

/// How a source volume is held still while its group is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Not in use through Loam: nothing writes it.
    Quiet,
    /// A filesystem frozen around the cut.
    Frozen,
    /// In use and cannot be frozen; its own snapshot is point in time.
    Live,
    /// In use, cannot be frozen, and its snapshot is a copy: not point in time.
    Copied,
}

/// Refuses a group that cannot be cut write-order consistent (see the
/// module's rule); `members` are (volume id, how it is held).
pub fn check(members: &[(&str, Hold)]) -> Result<()> {
    let named = |keep: fn(Hold) -> bool| -> Vec<&str> {
        members.iter().filter(|(_, hold)| keep(*hold)).map(|(id, _)| *id).collect()
    };
    let live = named(|hold| matches!(hold, Hold::Live | Hold::Copied));
    if live.len() > 1 {
        return Err(Error::FailedPrecondition(format!(
            "volumes {} are in use and cannot be frozen, so they cannot be snapshotted at one point in time; loop \
             volumes staged as a filesystem are frozen for the cut, while dir and raw block volumes cannot be: \
             stop writing all but one of them (unpublish and unstage), or use loop filesystem volumes",
            live.join(", ")
        )));
    }
    let copied = named(|hold| hold == Hold::Copied);
    if members.len() > 1
        && let Some(id) = copied.first()
    {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is in use and its snapshot is a file-by-file copy (a dir volume on a root that is not \
             btrfs, or a raw block image on a filesystem without reflinks), which is not point in time; stop \
             writing it (unpublish and unstage) to snapshot it with others"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_member_may_be_live_and_a_copy_only_alone() {
        let ok = |members: &[(&str, Hold)]| check(members).is_ok();
        assert!(ok(&[("a", Hold::Live), ("b", Hold::Frozen), ("c", Hold::Quiet)]));
        assert!(ok(&[("a", Hold::Copied)]));
        assert!(!ok(&[("a", Hold::Copied), ("b", Hold::Quiet)]));
        let err = check(&[("a", Hold::Live), ("b", Hold::Frozen), ("c", Hold::Live)]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("volumes a, c are in use"), "{err}");
        let err = check(&[("a", Hold::Copied), ("b", Hold::Frozen)]).unwrap_err();
        assert!(err.to_string().contains("volume a is in use and its snapshot is a file-by-file copy"), "{err}");
    }
}
