//! This node's part of a group snapshot whose volumes live on several nodes.
//!
//! The controller steps every node of the group through one session
//! ([`HeldPart`]), the coordinator (the node its id names) first, each step
//! answered by every node before the next is sent to any:
//!
//! 1. **prepare** ([`HeldPart::prepare`]): claim the group, its members and
//!    this node's source volumes; classify them; freeze the freezable ones.
//!    The controller checks the whole group against [`crate::write_order`].
//! 2. **cut**: record the intent (the part's record, incomplete), then cut
//!    every member while every node's members are still.
//! 3. **record**: thaw, then record the members.
//! 4. **commit**: mark the part complete, the coordinator's first: its
//!    complete record is the group's existence, the commit point.
//!
//! A session that ends early (the controller went away, a step failed, the
//! next step did not come in time) thaws at once and rolls the part back,
//! except a part of another coordinator that is already recorded: the
//! coordinator may have committed, so that part is in doubt until the
//! controller settles it from the coordinator's record ([`Driver::settle_part`]
//! or [`Driver::delete_part`]). Start-up rolls back an incomplete record
//! this node coordinates and keeps a part in doubt.

use std::sync::Arc;

use super::groups::{Cut, FrozenSet, GroupSnapshot, Member, holds, thaw};
use super::{Driver, timestamp};
use crate::error::{Error, Result};
use crate::guard::Guard;
use crate::ids::{Key, Kind, ObjectId, same_ids};
use crate::records::{GroupSnapshotRecord, Schema, SnapshotRecord};
use crate::write_order::Hold;

/// A cut across nodes, as the controller asked it of this node.
#[derive(Debug, Clone)]
pub struct PartPlan {
    /// The group's id: its key and its coordinator.
    pub group: ObjectId,
    /// The CSI request's name.
    pub name: String,
    /// Every source volume of the group, on every node, in request order.
    pub sources: Vec<String>,
}

/// What prepare found.
#[derive(Debug)]
pub enum Prepared {
    /// The coordinator holds the complete group this request made already.
    Made,
    /// This node's part, claimed and held still for the cut.
    Held(Box<HeldPart>),
}

/// Where a held part is: what ending the session now must undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Claimed and frozen; nothing written.
    Held,
    /// The intent is recorded and the members may be cut.
    Cut,
    /// The members are recorded: in doubt on a part of another coordinator.
    Recorded,
    /// Complete.
    Committed,
}

/// This node's part of a cut across nodes, between steps: it holds the
/// claims and the frozen filesystems (dropping it thaws and releases them;
/// [`HeldPart::end`] also undoes what was written).
#[derive(Debug)]
pub struct HeldPart {
    driver: Arc<Driver>,
    plan: PartPlan,
    members: Vec<Member>,
    frozen: FrozenSet,
    record: GroupSnapshotRecord,
    cut: Cut,
    phase: Phase,
    _claims: Vec<Guard>,
}

impl HeldPart {
    /// Step 1: claims the group and this node's members, settles what an
    /// earlier attempt of the same name left, classifies and freezes.
    pub fn prepare(driver: Arc<Driver>, plan: PartPlan) -> Result<Prepared> {
        let own = driver.config.node_id.clone();
        let key = plan.group.key;
        let coordinator = plan.group.node == own;
        let mut volumes = Vec::new();
        for id in &plan.sources {
            let parsed = ObjectId::parse(id)
                .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist (not an id Loam made)")))?;
            if parsed.node == own {
                volumes.push(driver.group_source_key(id)?);
            }
        }
        if volumes.is_empty() && !coordinator {
            return Err(Error::InvalidArgument(format!(
                "group snapshot {}: none of its source volumes is on this node ({own})",
                plan.group
            )));
        }
        let claims = driver.claim_group(key, &volumes)?;
        let id = plan.group.to_string();
        if let Some(existing) = driver.groups.get(&key) {
            if existing.id != id {
                return Err(Error::AlreadyExists(format!(
                    "a group snapshot called {} exists as {} (or is being made), not as {id}: it was asked of other \
                     volumes; delete it first",
                    plan.name, existing.id
                )));
            }
            if coordinator && existing.complete {
                if existing.name == plan.name && same_ids(&plan.sources, &existing.source_volume_ids) {
                    return Ok(Prepared::Made);
                }
                return Err(Error::AlreadyExists(format!(
                    "group snapshot {} already exists of volumes {}, not of the volumes this request names",
                    plan.name,
                    existing.source_volume_ids.join(", ")
                )));
            }
            // The coordinator's session holds the group's claim there and
            // found it incomplete or missing: whatever this node keeps of an
            // earlier attempt never became a group.
            tracing::warn!(group = %id, "rolling back an earlier attempt's part before cutting anew");
            driver.roll_back(&key, &existing)?;
        }
        let members = volumes.into_iter().map(|volume| driver.member(&key, volume)).collect::<Result<Vec<_>>>()?;
        let record = part_record(&plan, &own, coordinator, &members)?;
        let frozen = driver.freeze(&members)?;
        crate::failpoint!("group.part.frozen");
        Ok(Prepared::Held(Box::new(HeldPart {
            driver,
            plan,
            members,
            frozen,
            record,
            cut: Cut::default(),
            phase: Phase::Held,
            _claims: claims,
        })))
    }

    /// How each of this node's members is held, for the controller's check.
    pub fn holds(&self) -> Vec<(String, Hold)> {
        holds(&self.members).into_iter().map(|(id, hold)| (id.to_owned(), hold)).collect()
    }

    /// Step 2: records the intent, then cuts every member.
    pub fn cut(&mut self) -> Result<()> {
        self.expect(Phase::Held, "cut")?;
        let key = self.plan.group.key;
        self.driver.groups.put(key, self.record.clone())?;
        self.phase = Phase::Cut;
        crate::failpoint!("group.part.intent");
        self.cut = self.driver.cut_members(&self.members)?;
        crate::failpoint!("group.part.cut");
        Ok(())
    }

    /// Step 3: thaws, then records the members.
    pub fn record(&mut self) -> Result<Vec<Arc<SnapshotRecord>>> {
        self.expect(Phase::Cut, "record")?;
        let thawed = thaw(&self.record, std::mem::take(&mut self.frozen));
        self.cut.log(&self.record, self.members.len(), thawed);
        let recorded = self.driver.record_members(&self.record, &self.members, self.cut.at)?;
        self.phase = Phase::Recorded;
        crate::failpoint!("group.part.recorded");
        Ok(recorded)
    }

    /// Step 4: marks the part complete; on the coordinator this makes the
    /// group.
    pub fn commit(&mut self) -> Result<()> {
        self.expect(Phase::Recorded, "commit")?;
        (self.record.created_secs, self.record.created_nanos) = self.cut.at;
        self.record.complete = true;
        self.driver.groups.put(self.plan.group.key, self.record.clone())?;
        self.phase = Phase::Committed;
        Ok(())
    }

    /// Ends the session: thaws, and rolls back what it wrote unless the part
    /// is complete, or is another coordinator's and recorded (in doubt).
    pub fn end(mut self) {
        thaw(&self.record, std::mem::take(&mut self.frozen));
        let coordinator = self.driver.coordinates(&self.record);
        let keep = match self.phase {
            Phase::Held => return,
            Phase::Committed => true,
            Phase::Recorded => !coordinator,
            Phase::Cut => false,
        };
        if keep {
            if self.phase == Phase::Recorded {
                tracing::warn!(
                    group = %self.record.id,
                    "the controller went away after this part was recorded; it stays in doubt until the controller \
                     settles it from the coordinator's record"
                );
            }
            return;
        }
        tracing::warn!(group = %self.record.id, "rolling back this node's part of an unfinished group snapshot");
        if let Err(e) = self.driver.roll_back(&self.plan.group.key, &self.record) {
            tracing::error!(
                group = %self.record.id,
                error = %e,
                "cannot roll back this node's part of an unfinished group snapshot; the next attempt or start will"
            );
        }
    }

    fn expect(&self, phase: Phase, step: &str) -> Result<()> {
        if self.phase == phase {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "group snapshot {}: step {step} comes after {phase:?}, and this part is at {:?}",
            self.record.id, self.phase
        )))
    }
}

/// The record of this node's part: on the coordinator every member of the
/// group (so its record is the group), elsewhere this node's members.
fn part_record(plan: &PartPlan, own: &str, coordinator: bool, members: &[Member]) -> Result<GroupSnapshotRecord> {
    let (source_volume_ids, snapshot_ids) = if coordinator {
        let mut snapshot_ids = Vec::with_capacity(plan.sources.len());
        for id in &plan.sources {
            let volume = ObjectId::parse(id)
                .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist (not an id Loam made)")))?;
            snapshot_ids
                .push(ObjectId { key: Key::group_member(&plan.group.key, &volume.key), node: volume.node }.to_string());
        }
        (plan.sources.clone(), snapshot_ids)
    } else {
        let snapshot_ids =
            members.iter().map(|m| ObjectId { key: m.snapshot, node: own.to_owned() }.to_string()).collect();
        (members.iter().map(|m| m.volume.id.clone()).collect(), snapshot_ids)
    };
    let (created_secs, created_nanos) = timestamp();
    Ok(GroupSnapshotRecord {
        schema: Schema,
        id: plan.group.to_string(),
        name: plan.name.clone(),
        source_volume_ids,
        snapshot_ids,
        created_secs,
        created_nanos,
        complete: false,
    })
}

impl Driver {
    /// This node's part of group `id` (its record and the members it
    /// holds); NOT_FOUND when it has none.
    pub fn group_part(&self, id: &ObjectId) -> Result<GroupSnapshot> {
        let record = self.groups.get(&id.key).filter(|r| r.id == id.to_string()).ok_or_else(|| {
            match self.groups.damaged(&id.key) {
                Some(reason) => Error::Damaged(reason),
                None => Error::NotFound(format!("this node holds no part of group snapshot {id}")),
            }
        })?;
        Ok(self.with_members(record))
    }

    /// Marks this node's part of group `id` complete: the controller read
    /// the coordinator's complete record. Never on the coordinator, whose
    /// record only its own session completes.
    pub fn settle_part(&self, id: &ObjectId) -> Result<GroupSnapshot> {
        let _claim = self.claim(Kind::GroupSnapshot, id.key)?;
        let part = self.group_part(id)?;
        if part.record.complete {
            return Ok(part);
        }
        if self.coordinates(&part.record) {
            return Err(Error::FailedPrecondition(format!(
                "group snapshot {id} is coordinated by this node, whose record is incomplete: it is not made"
            )));
        }
        let mut record = (*part.record).clone();
        record.complete = true;
        tracing::info!(group = %id, "settled this node's part: its coordinator holds the complete group");
        Ok(self.with_members(self.groups.put(id.key, record)?))
    }

    /// Removes this node's part of group `id`, its members first; succeeds
    /// when there is none (or only another group's under the same name).
    pub fn delete_part(&self, id: &ObjectId) -> Result<()> {
        let _claim = self.claim(Kind::GroupSnapshot, id.key)?;
        let Some(record) = self.groups.get(&id.key).filter(|r| r.id == id.to_string()) else {
            return Ok(());
        };
        let mut claims = Vec::with_capacity(record.snapshot_ids.len());
        for member in &record.snapshot_ids {
            if let Some(parsed) = ObjectId::parse(member).filter(|p| p.node == self.config.node_id) {
                claims.push(self.claim(Kind::Snapshot, parsed.key)?);
            }
        }
        self.roll_back(&id.key, &record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{test_dir_volume, test_driver_on};

    /// Two nodes' drivers, each with one volume; the group's plan names
    /// both, coordinated by `a`.
    struct TwoNodes {
        _roots: (tempfile::TempDir, tempfile::TempDir),
        a: Arc<Driver>,
        b: Arc<Driver>,
        plan: PartPlan,
    }

    fn two_nodes() -> TwoNodes {
        let roots = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Arc::new(test_driver_on(roots.0.path(), "a"));
        let b = Arc::new(test_driver_on(roots.1.path(), "b"));
        let sources = vec![test_dir_volume(&b, "on-b"), test_dir_volume(&a, "on-a")];
        let group = ObjectId::for_name(Kind::GroupSnapshot, "g", "a");
        TwoNodes { _roots: roots, a, b, plan: PartPlan { group, name: "g".into(), sources } }
    }

    fn held(driver: &Arc<Driver>, plan: &PartPlan) -> HeldPart {
        match HeldPart::prepare(driver.clone(), plan.clone()).unwrap() {
            Prepared::Held(part) => *part,
            Prepared::Made => panic!("the group is not made yet"),
        }
    }

    /// Steps both parts as the controller does, up to and including `last`.
    fn step_both(parts: &mut [&mut HeldPart], last: Phase) {
        for part in parts.iter_mut() {
            part.cut().unwrap();
        }
        if last == Phase::Cut {
            return;
        }
        for part in parts.iter_mut() {
            part.record().unwrap();
        }
        if last == Phase::Recorded {
            return;
        }
        for part in parts.iter_mut() {
            part.commit().unwrap();
        }
    }

    fn members_held(driver: &Driver) -> usize {
        let mut n = 0;
        driver.snapshots.for_each(|_, _| n += 1);
        n
    }

    #[test]
    fn a_group_across_two_nodes_is_one_group_whose_record_lives_on_its_coordinator() {
        let t = two_nodes();
        let (mut on_a, mut on_b) = (held(&t.a, &t.plan), held(&t.b, &t.plan));
        assert_eq!(on_a.holds().len(), 1);
        assert_eq!(on_b.holds()[0].1, Hold::Quiet);
        step_both(&mut [&mut on_a, &mut on_b], Phase::Committed);
        on_a.end();
        on_b.end();

        let coordinator = t.a.group_part(&t.plan.group).unwrap();
        assert!(coordinator.record.complete);
        assert_eq!(coordinator.record.source_volume_ids, t.plan.sources, "every member, in request order");
        assert!(
            coordinator.record.snapshot_ids[0].ends_with("@b") && coordinator.record.snapshot_ids[1].ends_with("@a")
        );
        assert_eq!(coordinator.members.len(), 1, "a node holds only its own members");
        let part = t.b.group_part(&t.plan.group).unwrap();
        assert!(part.record.complete);
        assert_eq!(part.record.snapshot_ids, coordinator.record.snapshot_ids[..1]);
        assert_eq!(part.members[0].group_snapshot_id.as_deref(), Some(t.plan.group.to_string().as_str()));

        // The same request again: the coordinator answers at once.
        assert!(matches!(HeldPart::prepare(t.a.clone(), t.plan.clone()).unwrap(), Prepared::Made));
        // The same name of other volumes is another group.
        let other = PartPlan { sources: t.plan.sources[1..].to_vec(), ..t.plan.clone() };
        let err = HeldPart::prepare(t.a.clone(), other).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);

        t.b.delete_part(&t.plan.group).unwrap();
        t.a.delete_part(&t.plan.group).unwrap();
        assert_eq!((members_held(&t.a), members_held(&t.b)), (0, 0));
        assert_eq!(t.a.group_part(&t.plan.group).unwrap_err().code(), tonic::Code::NotFound);
        t.a.delete_part(&t.plan.group).unwrap();
    }

    #[test]
    fn a_cut_that_ends_before_its_parts_are_recorded_leaves_nothing_on_any_node() {
        let t = two_nodes();
        let (mut on_a, mut on_b) = (held(&t.a, &t.plan), held(&t.b, &t.plan));
        step_both(&mut [&mut on_a, &mut on_b], Phase::Cut);
        assert_eq!((members_held(&t.a), members_held(&t.b)), (0, 0), "members are recorded only after the thaw");
        on_a.end();
        on_b.end();
        for driver in [&t.a, &t.b] {
            assert_eq!(driver.group_part(&t.plan.group).unwrap_err().code(), tonic::Code::NotFound);
            assert_eq!(std::fs::read_dir(driver.config.root.join("snapshots")).unwrap().count(), 0);
        }
        // And the claims went with the parts: a new attempt proceeds.
        let (mut on_a, mut on_b) = (held(&t.a, &t.plan), held(&t.b, &t.plan));
        step_both(&mut [&mut on_a, &mut on_b], Phase::Committed);
    }

    #[test]
    fn a_recorded_part_outlives_its_session_in_doubt_until_settled_and_a_restart_keeps_it() {
        let t = two_nodes();
        let (mut on_a, mut on_b) = (held(&t.a, &t.plan), held(&t.b, &t.plan));
        step_both(&mut [&mut on_a, &mut on_b], Phase::Recorded);
        // The controller commits the coordinator, then goes away.
        on_a.commit().unwrap();
        on_a.end();
        on_b.end();
        let part = t.b.group_part(&t.plan.group).unwrap();
        assert!(!part.record.complete);
        assert_eq!(part.members.len(), 1, "an in-doubt part keeps its members");

        // A restart rolls back only what this node coordinates.
        let root_b = t.b.config.root.clone();
        let TwoNodes { a, b, plan, _roots } = t;
        drop(b);
        let b = Arc::new(test_driver_on(&root_b, "b"));
        assert!(!b.group_part(&plan.group).unwrap().record.complete);
        assert!(b.settle_part(&plan.group).unwrap().record.complete);
        assert!(b.settle_part(&plan.group).unwrap().record.complete, "settling twice is settling once");
        // The coordinator's own record is completed by its session only.
        let mut incomplete = (*a.group_part(&plan.group).unwrap().record).clone();
        incomplete.complete = false;
        a.groups.put(plan.group.key, incomplete).unwrap();
        assert_eq!(a.settle_part(&plan.group).unwrap_err().code(), tonic::Code::FailedPrecondition);
        drop(a);
        let a = Arc::new(test_driver_on(_roots.0.path(), "a"));
        assert_eq!(a.group_part(&plan.group).unwrap_err().code(), tonic::Code::NotFound, "rolled back at start");
        assert_eq!(members_held(&a), 0);
    }

    #[test]
    fn a_new_attempt_rolls_back_what_an_earlier_one_left_on_a_node() {
        let t = two_nodes();
        let (mut on_a, mut on_b) = (held(&t.a, &t.plan), held(&t.b, &t.plan));
        step_both(&mut [&mut on_a, &mut on_b], Phase::Recorded);
        // The controller went away before the commit: the coordinator
        // rolls back, the other node is left in doubt.
        on_a.end();
        on_b.end();
        assert!(t.b.group_part(&t.plan.group).is_ok());
        // The retry finds the coordinator without the group, so the other
        // node's part never became one.
        let (mut on_a, mut on_b) = (held(&t.a, &t.plan), held(&t.b, &t.plan));
        step_both(&mut [&mut on_a, &mut on_b], Phase::Committed);
        on_a.end();
        on_b.end();
        assert!(t.b.group_part(&t.plan.group).unwrap().record.complete);
        assert_eq!(members_held(&t.b), 1);
        // A part of the same name coordinated elsewhere is another group.
        let elsewhere = PartPlan { group: ObjectId::for_name(Kind::GroupSnapshot, "g", "c"), ..t.plan.clone() };
        assert_eq!(HeldPart::prepare(t.b.clone(), elsewhere).unwrap_err().code(), tonic::Code::AlreadyExists);
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let t = two_nodes();
        let mut on_b = held(&t.b, &t.plan);
        assert_eq!(on_b.record().unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(on_b.commit().unwrap_err().code(), tonic::Code::InvalidArgument);
        on_b.cut().unwrap();
        assert_eq!(on_b.cut().unwrap_err().code(), tonic::Code::InvalidArgument);
        on_b.end();
        assert_eq!(members_held(&t.b), 0);
    }
}
