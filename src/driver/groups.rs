//! Volume group snapshots: several volumes of this node cut at one point in
//! time, then kept and deleted as one.
//!
//! # Write-order consistency
//!
//! Before cutting, each source volume is classified ([`Stillness`]), and the
//! group is cut only if [`crate::write_order`] allows it:
//!
//! - **quiet**: neither staged (or its stage did not survive a reboot) nor
//!   published, so nothing writes it through Loam;
//! - **freezable**: a `loop` volume staged as a filesystem, which `FIFREEZE`
//!   holds still through its staging mount;
//! - **live**: anything else in use (a `dir` volume, a raw block `loop`
//!   volume), whose own snapshot is still point in time: a btrfs snapshot of
//!   its subvolume, or a reflink of its image;
//! - **copied**: in use, and its snapshot is a file-by-file or byte copy (a
//!   `dir` volume that is not a btrfs subvolume, a raw block image on a
//!   filesystem without reflinks), which is not point in time even alone.
//!
//! Every freezable member is frozen, then every member is cut, then all are
//! thawed. A group whose volumes live on several nodes is cut the same way,
//! each node's part in step with the others ([`super::group_parts`]).
//!
//! # Crashes
//!
//! The group's record is written with `complete: false` before anything is
//! cut, and with `complete: true` after every member is cut and recorded.
//! A failure in between rolls back (members deleted, record removed); what a
//! crash or a failed rollback leaves is rolled back by the next attempt of
//! the same name or the next start.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Driver, timestamp};
use crate::backend::Backends;
use crate::error::{Error, IoContext, Result};
use crate::guard::Guard;
use crate::ids::{Key, Kind, ObjectId, same_ids};
use crate::kernel::{Frozen, Kernel};
use crate::records::{GroupSnapshotRecord, Schema, SnapshotRecord, VolumeRecord};
use crate::write_order::{self, Hold};

/// How a source volume is held still while its group is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stillness {
    /// Not in use through Loam: nothing writes it.
    Quiet,
    /// A filesystem mounted at this staging path, frozen around the cut.
    Freezable(PathBuf),
    /// In use and cannot be frozen; its own snapshot is point in time.
    Live,
    /// In use, cannot be frozen, and its snapshot is a copy: not point in time.
    Copied,
}

impl Stillness {
    /// Classifies a volume: `stage_live` says whether its recorded stage is
    /// still in the kernel, `atomic` whether its backend snapshots it at one
    /// instant (asked only for volumes in use that cannot be frozen).
    pub fn of(record: &VolumeRecord, stage_live: bool, atomic: impl FnOnce() -> Result<bool>) -> Result<Stillness> {
        let stage = record.stage.as_ref().filter(|_| stage_live);
        if stage.is_none() && record.publications.is_empty() {
            return Ok(Stillness::Quiet);
        }
        match Backends::freezable(record).filter(|_| stage.is_some()) {
            Some(path) => Ok(Stillness::Freezable(path.to_owned())),
            None if atomic()? => Ok(Stillness::Live),
            None => Ok(Stillness::Copied),
        }
    }

    /// How the write-order rule sees it.
    pub fn hold(&self) -> Hold {
        match self {
            Stillness::Quiet => Hold::Quiet,
            Stillness::Freezable(_) => Hold::Frozen,
            Stillness::Live => Hold::Live,
            Stillness::Copied => Hold::Copied,
        }
    }
}

/// Filesystems frozen for a cut, thawed when dropped.
pub(super) type FrozenSet = Vec<Frozen<Arc<dyn Kernel>>>;

/// How each member is held, as the write-order rule reads them.
pub(super) fn holds(members: &[Member]) -> Vec<(&str, Hold)> {
    members.iter().map(|m| (m.volume.id.as_str(), m.stillness.hold())).collect()
}

/// Thaws what was frozen for `group`'s cut; a filesystem that does not thaw
/// is logged (writes to it hang; start-up thaws it too). Returns how many
/// were frozen.
pub(super) fn thaw(group: &GroupSnapshotRecord, frozen: FrozenSet) -> usize {
    let count = frozen.len();
    for guard in frozen {
        if let Err(e) = guard.thaw() {
            tracing::error!(group = %group.id, error = %e, "a frozen member did not thaw; writes to it hang");
        }
    }
    count
}

/// A cut made: its instant, and how long cutting every member took.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cut {
    pub(super) at: (i64, i32),
    micros: u64,
}

impl Cut {
    /// Logs the cut of `members` members of `group`, `thawed` of them frozen
    /// for it and thawed since.
    pub(super) fn log(&self, group: &GroupSnapshotRecord, members: usize, thawed: usize) {
        tracing::info!(group = %group.id, members, thawed, micros = self.micros, "group snapshot cut");
    }
}

/// A group snapshot's record and the records of its members that exist.
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    /// The group's record.
    pub record: Arc<GroupSnapshotRecord>,
    /// Its members' records, in the record's order; missing ones left out.
    pub members: Vec<Arc<SnapshotRecord>>,
}

impl GroupSnapshot {
    /// Whether every member can be restored: all cut, none missing since.
    pub fn ready(&self) -> bool {
        self.record.complete && self.members.len() == self.record.snapshot_ids.len()
    }
}

/// One source volume of a group being cut.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) key: Key,
    pub(super) volume: Arc<VolumeRecord>,
    pub(super) snapshot: Key,
    pub(super) stillness: Stillness,
}

impl Driver {
    // ----- Group snapshots -----

    /// Reads a source volume id of a group snapshot: INVALID_ARGUMENT when it
    /// is not one of this node's, since each node cuts its own volumes (the
    /// controller steps the nodes of a group across nodes).
    pub fn group_source_key(&self, id: &str) -> Result<Key> {
        self.volume_key(id).map_err(|e| match e {
            Error::NotFound(why) => Error::InvalidArgument(format!(
                "{why}; a node cuts group snapshots of its own volumes, and the controller those of several nodes'"
            )),
            other => other,
        })
    }

    /// Claims everything a CreateVolumeGroupSnapshot touches: the group, each
    /// member snapshot and each source volume. Every claim is a try, so
    /// overlapping groups get ABORTED rather than waiting on each other.
    pub fn claim_group(&self, key: Key, volumes: &[Key]) -> Result<Vec<Guard>> {
        let mut guards = vec![self.claim(Kind::GroupSnapshot, key)?];
        for volume in volumes {
            guards.push(self.claim(Kind::Snapshot, Key::group_member(&key, volume))?);
            guards.push(self.claim(Kind::Volume, *volume)?);
        }
        Ok(guards)
    }

    /// Cuts a snapshot of every source volume at one point in time, or
    /// returns the group the same request made. The caller holds the claims
    /// of [`Driver::claim_group`].
    pub fn create_group_snapshot(&self, key: Key, name: &str, sources: &[String]) -> Result<GroupSnapshot> {
        if let Some(existing) = self.groups.get(&key) {
            if existing.complete {
                if existing.name == name && same_ids(sources, &existing.source_volume_ids) {
                    return Ok(self.with_members(existing));
                }
                return Err(Error::AlreadyExists(format!(
                    "group snapshot {name} already exists of volumes {}, not of the volumes this request names",
                    existing.source_volume_ids.join(", ")
                )));
            }
            tracing::warn!(group = %existing.id, "rolling back an incomplete group snapshot before making it anew");
            self.roll_back(&key, &existing)?;
        }
        let members =
            sources.iter().map(|id| self.member(&key, self.group_source_key(id)?)).collect::<Result<Vec<_>>>()?;
        write_order::check(&holds(&members))?;
        let node = &self.config.node_id;
        let (created_secs, created_nanos) = timestamp();
        let mut record = GroupSnapshotRecord {
            schema: Schema,
            id: ObjectId { key, node: node.clone() }.to_string(),
            name: name.to_owned(),
            source_volume_ids: members.iter().map(|m| m.volume.id.clone()).collect(),
            snapshot_ids: members
                .iter()
                .map(|m| ObjectId { key: m.snapshot, node: node.clone() }.to_string())
                .collect(),
            created_secs,
            created_nanos,
            complete: false,
        };
        self.groups.put(key, record.clone())?;
        crate::failpoint!("group.intent");
        let finished = self.cut(&record, &members).and_then(|(secs, nanos)| {
            record.created_secs = secs;
            record.created_nanos = nanos;
            record.complete = true;
            self.groups.put(key, record.clone())
        });
        match finished {
            Ok(record) => Ok(self.with_members(record)),
            Err(e) => {
                if let Err(undo) = self.roll_back(&key, &record) {
                    tracing::error!(
                        group = %record.id,
                        error = %undo,
                        cause = %e,
                        "cannot roll back a failed group snapshot; the next attempt or start will"
                    );
                }
                Err(e)
            }
        }
    }

    /// The source volume `volume` of group `group`, classified for the cut.
    pub(super) fn member(&self, group: &Key, volume: Key) -> Result<Member> {
        let record = self.volume(&volume)?;
        let stillness = self.stillness(&volume, &record)?;
        Ok(Member { key: volume, volume: record, snapshot: Key::group_member(group, &volume), stillness })
    }

    /// How `volume` can be held still for the cut.
    pub(super) fn stillness(&self, key: &Key, volume: &VolumeRecord) -> Result<Stillness> {
        let stage_live = match &volume.stage {
            Some(stage) => self.stage_is_live(volume, key, stage)?,
            None => false,
        };
        Stillness::of(volume, stage_live, || self.backends.snapshots_atomically(key, &volume.layout))
    }

    /// Freezes the freezable members, cuts every member, thaws, then records
    /// the members; returns the instant of the cut.
    fn cut(&self, group: &GroupSnapshotRecord, members: &[Member]) -> Result<(i64, i32)> {
        let frozen = self.freeze(members)?;
        crate::failpoint!("group.frozen");
        let cut = self.cut_members(members)?;
        crate::failpoint!("group.cut");
        // Records wait until after the thaw: their fsyncs need no frozen pod.
        let thawed = thaw(group, frozen);
        cut.log(group, members.len(), thawed);
        self.record_members(group, members, cut.at)?;
        Ok(cut.at)
    }

    /// Freezes every freezable member; dropping the set thaws them.
    pub(super) fn freeze(&self, members: &[Member]) -> Result<FrozenSet> {
        let mut frozen = Vec::new();
        for member in members {
            if let Stillness::Freezable(path) = &member.stillness {
                frozen.push(Frozen::new(self.kernel.clone(), path).context(|| format!("freezing {}", path.display()))?);
            }
        }
        Ok(frozen)
    }

    /// Cuts every member (frozen or quiet already, or live with a
    /// point-in-time snapshot: never frozen a second time here).
    pub(super) fn cut_members(&self, members: &[Member]) -> Result<Cut> {
        let started = std::time::Instant::now();
        let at = timestamp();
        for member in members {
            self.backends.create_snapshot(&member.key, &member.volume, &member.snapshot, false)?;
        }
        Ok(Cut { at, micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX) })
    }

    /// Records every member as a snapshot of group `group` cut at `cut_at`.
    pub(super) fn record_members(
        &self,
        group: &GroupSnapshotRecord,
        members: &[Member],
        (secs, nanos): (i64, i32),
    ) -> Result<Vec<Arc<SnapshotRecord>>> {
        let mut recorded = Vec::with_capacity(members.len());
        for member in members {
            let record = SnapshotRecord {
                schema: Schema,
                id: ObjectId { key: member.snapshot, node: self.config.node_id.clone() }.to_string(),
                name: group.name.clone(),
                source_volume_id: member.volume.id.clone(),
                backend: member.volume.layout.backend(),
                size_bytes: member.volume.capacity_bytes,
                restore_bytes: member.volume.restore_bytes(),
                created_secs: secs,
                created_nanos: nanos,
                group_snapshot_id: Some(group.id.clone()),
                awaiting_copy: false,
            };
            recorded.push(self.snapshots.put(member.snapshot, record)?);
        }
        Ok(recorded)
    }

    /// Deletes a group snapshot and its members; deleting one that does not
    /// exist succeeds. `snapshot_ids`, when given, must be its members.
    pub fn delete_group_snapshot(&self, key: Key, snapshot_ids: &[String]) -> Result<()> {
        let Some(record) = self.groups.get(&key) else {
            if let Some(reason) = self.groups.damaged(&key) {
                // Its members cannot be known; they stay as snapshots of
                // their own, which ListSnapshots shows and DeleteSnapshot takes.
                tracing::warn!(%reason, "removing a damaged group snapshot record");
                return self.groups.remove(&key);
            }
            return Ok(());
        };
        check_listed(&record, snapshot_ids)?;
        // Held until the members are gone, so no other call sees them half removed.
        let mut claims = Vec::with_capacity(record.snapshot_ids.len());
        for id in &record.snapshot_ids {
            if let Some(parsed) = ObjectId::parse(id) {
                claims.push(self.claim(Kind::Snapshot, parsed.key)?);
            }
        }
        self.roll_back(&key, &record)
    }

    /// The group snapshot with its members, or NOT_FOUND. `snapshot_ids`,
    /// when given, must be its members.
    pub fn group_snapshot(&self, key: &Key, snapshot_ids: &[String]) -> Result<GroupSnapshot> {
        let record = self.groups.get(key).ok_or_else(|| match self.groups.damaged(key) {
            Some(reason) => Error::Damaged(reason),
            None => Error::NotFound(format!("group snapshot {key} does not exist")),
        })?;
        check_listed(&record, snapshot_ids)?;
        Ok(self.with_members(record))
    }

    /// Whether this node coordinates `record`'s group (its id names this
    /// node): true of every group cut on one node.
    pub(super) fn coordinates(&self, record: &GroupSnapshotRecord) -> bool {
        ObjectId::parse(&record.id).is_some_and(|id| id.node == self.config.node_id)
    }

    pub(super) fn with_members(&self, record: Arc<GroupSnapshotRecord>) -> GroupSnapshot {
        let members = record
            .snapshot_ids
            .iter()
            .filter_map(|id| ObjectId::parse(id).and_then(|parsed| self.snapshots.get(&parsed.key)))
            .collect();
        GroupSnapshot { record, members }
    }

    /// Removes every member this node holds (data, then record), then the
    /// group's record: so a crash part-way leaves a record naming what is
    /// left to remove. Members of other nodes are theirs to remove.
    pub(super) fn roll_back(&self, key: &Key, record: &GroupSnapshotRecord) -> Result<()> {
        for id in &record.snapshot_ids {
            if let Some(parsed) = ObjectId::parse(id).filter(|p| p.node == self.config.node_id) {
                self.remove_snapshot(parsed.key)?;
            }
        }
        self.groups.remove(key)
    }

    /// Rolls back what crashes left incomplete; one that cannot be is logged
    /// and kept for the next attempt, and never stops the node from serving.
    pub(super) fn roll_back_incomplete_groups(&self) {
        let mut incomplete = Vec::new();
        self.groups.for_each(|key, record| {
            if !record.complete {
                incomplete.push((*key, record.clone()));
            }
        });
        for (key, record) in incomplete {
            if !self.coordinates(&record) {
                // Its coordinator may have made the group complete: only the
                // controller, which reads that node's record, settles it.
                tracing::warn!(
                    group = %record.id,
                    name = %record.name,
                    "this node's part of a group snapshot across nodes is in doubt; the next CreateVolumeGroupSnapshot, \
                     GetVolumeGroupSnapshot or DeleteVolumeGroupSnapshot naming it settles it"
                );
                continue;
            }
            tracing::warn!(group = %record.id, name = %record.name, "rolling back a group snapshot a crash left incomplete");
            if let Err(e) = self.roll_back(&key, &record) {
                tracing::error!(group = %record.id, error = %e, "cannot roll back an incomplete group snapshot");
            }
        }
    }
}

/// Refuses a `snapshot_ids` list that is given and is not the group's members.
fn check_listed(record: &GroupSnapshotRecord, snapshot_ids: &[String]) -> Result<()> {
    if snapshot_ids.is_empty() || same_ids(snapshot_ids, &record.snapshot_ids) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "group snapshot {} is made of snapshots {}, not of the snapshot ids this request names",
        record.id,
        record.snapshot_ids.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;

    use super::*;
    use crate::driver::{test_dir_volume, test_driver};
    use crate::kernel::blockfs::FsType;
    use crate::records::{AccessMode, Capability, Layout, LoopSpec, Provisioning, Publication, Stage, VolumeRecord};

    #[derive(Clone, Copy)]
    enum Backend {
        Dir,
        Loop,
    }

    fn volume(backend: Backend, stage: Option<bool>, published: bool) -> VolumeRecord {
        let capability = |block| Capability {
            access_mode: AccessMode::SingleNodeWriter,
            block,
            fs_type: String::new(),
            mount_flags: Vec::new(),
        };
        let layout = match backend {
            Backend::Dir => Layout::Dir,
            Backend::Loop => {
                Layout::Loop(LoopSpec { fs: FsType::Ext4, provisioning: Provisioning::Thin, mkfs_options: Vec::new() })
            }
        };
        VolumeRecord {
            schema: Schema,
            id: "v".into(),
            name: "v".into(),
            capacity_bytes: 1 << 20,
            requested_bytes: None,
            layout,
            parameters: BTreeMap::new(),
            mutable_parameters: BTreeMap::new(),
            source: None,
            attachment: None,
            stage: stage.map(|block| Stage { path: "/staging".into(), capability: capability(block) }),
            publications: if published {
                [("/target".into(), Publication { read_only: false, capability: capability(false) })].into()
            } else {
                BTreeMap::new()
            },
            enforcement: None,
            formatting: None,
            inline: None,
        }
    }

    fn classify(record: &VolumeRecord, live: bool, atomic: bool) -> Stillness {
        Stillness::of(record, live, || Ok(atomic)).unwrap()
    }

    #[test]
    fn volumes_are_classified_by_how_they_can_be_held_still() {
        use Backend::{Dir, Loop};
        // Unused, or staged before a reboot that took the mount: quiet.
        assert_eq!(classify(&volume(Dir, None, false), false, false), Stillness::Quiet);
        assert_eq!(classify(&volume(Loop, Some(false), false), false, false), Stillness::Quiet);
        // A loop filesystem is frozen through its staging mount.
        assert_eq!(classify(&volume(Loop, Some(false), true), true, false), Stillness::Freezable("/staging".into()));
        // Raw block and dir volumes in use cannot be frozen.
        assert_eq!(classify(&volume(Loop, Some(true), true), true, true), Stillness::Live);
        assert_eq!(classify(&volume(Loop, Some(true), false), true, false), Stillness::Copied);
        assert_eq!(classify(&volume(Dir, Some(false), true), true, true), Stillness::Live);
        assert_eq!(classify(&volume(Dir, Some(false), false), true, false), Stillness::Copied);
        // Published though the stage is gone: in use, and nothing to freeze.
        assert_eq!(classify(&volume(Loop, Some(false), true), false, true), Stillness::Live);
    }

    #[test]
    fn an_incomplete_group_is_rolled_back_by_a_retry_and_by_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let driver = test_driver(root.path());
        let sources = vec![test_dir_volume(&driver, "a"), test_dir_volume(&driver, "b")];
        let key = Key::for_name(Kind::GroupSnapshot, "g");
        let made = driver.create_group_snapshot(key, "g", &sources).unwrap();
        assert!(made.ready());
        let members: Vec<Key> = made.members.iter().map(|m| ObjectId::parse(&m.id).unwrap().key).collect();

        // As if the attempt had crashed after its intent, with one member cut
        // and another attempt on other volumes coming in under the same name.
        let mut intent = (*made.record).clone();
        intent.complete = false;
        driver.groups.put(key, intent.clone()).unwrap();
        driver.remove_snapshot(members[1]).unwrap();
        let again = driver.create_group_snapshot(key, "g", &sources[..1]).unwrap();
        assert!(again.ready());
        assert_eq!(again.record.source_volume_ids, sources[..1]);
        assert!(driver.snapshots.get(&members[1]).is_none(), "the rolled back member came back");

        // A crash after the intent is rolled back when the driver opens.
        driver.groups.put(key, intent).unwrap();
        drop(driver);
        let driver = test_driver(root.path());
        assert!(driver.groups.get(&key).is_none());
        assert!(members.iter().all(|m| driver.snapshots.get(m).is_none()));
        assert_eq!(fs::read_dir(root.path().join("snapshots")).unwrap().count(), 0);
    }
}
