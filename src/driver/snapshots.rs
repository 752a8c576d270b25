//! Snapshots of this node's volumes.

use std::sync::Arc;

use super::{Driver, timestamp};
use crate::error::{Error, Result};
use crate::ids::{Key, Kind, ObjectId, SnapshotId};
use crate::records::{Schema, SnapshotRecord};
use crate::store::Page;

impl Driver {
    // ----- Snapshots -----

    /// Takes a snapshot of a volume, or returns the one the same request made.
    pub fn create_snapshot(&self, key: Key, name: &str, source_id: &str) -> Result<Arc<SnapshotRecord>> {
        if let Some(existing) = self.existing_snapshot(&key, name, source_id, false)? {
            return Ok(existing);
        }
        let id = ObjectId { key, node: self.config.node_id.clone() }.to_string();
        self.cut_snapshot(key, name, source_id, id, false)
    }

    /// Takes a snapshot of a volume that is to be kept on another node too
    /// (VolumeSnapshotClass `protection: off-node`), or returns the one the
    /// same request made, whatever `copy_nodes` says now: the first attempt
    /// chose the other node and wrote it into the id, so retries converge on
    /// one copy. `copy_nodes` are the nodes the controller found with room,
    /// best first; the first whose node id fits in the snapshot id with this
    /// node's is chosen (none fitting is INVALID_ARGUMENT, naming the
    /// limit). The snapshot is recorded as awaiting its copy: not ready to
    /// use until [`Driver::confirm_snapshot_copy`].
    ///
    /// With `gone_copy_node`, a snapshot still awaiting its copy on that
    /// node (gone for good) gets another of `copy_nodes` in its id, keeping
    /// its cut: it was never ready, so no CO holds the old id.
    pub fn cut_protected_snapshot(
        &self,
        key: Key,
        name: &str,
        source_id: &str,
        copy_nodes: &[String],
        gone_copy_node: Option<&str>,
    ) -> Result<Arc<SnapshotRecord>> {
        if let Some(existing) = self.existing_snapshot(&key, name, source_id, true)? {
            let named = SnapshotId::parse(&existing.id).and_then(|id| id.copy);
            let stranded = existing.awaiting_copy && gone_copy_node.is_some() && named.as_deref() == gone_copy_node;
            if !stranded {
                return Ok(existing);
            }
            let others: Vec<String> =
                copy_nodes.iter().filter(|n| Some(n.as_str()) != gone_copy_node).cloned().collect();
            let id = self.off_node_id(key, name, source_id, &others)?;
            tracing::warn!(snapshot = %existing.id, now = %id, "the node named for the snapshot's copy is gone for good before it held one; naming another");
            return self.snapshots.put(key, SnapshotRecord { id: id.to_string(), ..(*existing).clone() });
        }
        let id = self.off_node_id(key, name, source_id, copy_nodes)?;
        let record = self.cut_snapshot(key, name, source_id, id.to_string(), true)?;
        // Recorded as awaiting its copy, not answered: the retry finds the
        // record and the copy goes on from it.
        crate::failpoint!("snapshot.awaiting");
        Ok(record)
    }

    /// The id of snapshot `key` of this node with its copy on the first of
    /// `copy_nodes` (other than this one) whose node id fits beside this one's.
    fn off_node_id(&self, key: Key, name: &str, source_id: &str, copy_nodes: &[String]) -> Result<SnapshotId> {
        let own = &self.config.node_id;
        let mut others = copy_nodes.iter().filter(|n| *n != own);
        let Some(best) = others.next() else {
            return Err(Error::ResourceExhausted(format!(
                "snapshot {name} is to be kept on another node too (protection: off-node), but no other node's agent \
                 answers with room for a copy of volume {source_id}; free space or add a node, or use a \
                 VolumeSnapshotClass without protection: off-node"
            )));
        };
        match SnapshotId::off_node(key, own, best) {
            Ok(id) => Ok(id),
            Err(too_long) => others.find_map(|n| SnapshotId::off_node(key, own, n).ok()).ok_or(too_long),
        }
    }

    /// Records that the other node holds the verified copy of a snapshot
    /// kept off node: from now on it is ready to use. Converges when retried.
    pub fn confirm_snapshot_copy(&self, key: Key, name: &str, source_id: &str) -> Result<Arc<SnapshotRecord>> {
        let Some(existing) = self.existing_snapshot(&key, name, source_id, true)? else {
            return Err(Error::NotFound(format!("snapshot {name} does not exist on this node (deleted meanwhile?)")));
        };
        if !existing.awaiting_copy {
            return Ok(existing);
        }
        let ready = SnapshotRecord { awaiting_copy: false, ..(*existing).clone() };
        self.snapshots.put(key, ready)
    }

    /// The snapshot a retry of the same request made, if there is one;
    /// ALREADY_EXISTS when the name was used for another volume's snapshot,
    /// or with the other protection.
    fn existing_snapshot(
        &self,
        key: &Key,
        name: &str,
        source_id: &str,
        off_node: bool,
    ) -> Result<Option<Arc<SnapshotRecord>>> {
        let Some(existing) = self.snapshots.get(key) else { return Ok(None) };
        if existing.source_volume_id != source_id || existing.name != name {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name} already exists for volume {}, not {source_id}",
                existing.source_volume_id
            )));
        }
        let kept_off_node = SnapshotId::parse(&existing.id).is_some_and(|id| id.copy.is_some());
        if kept_off_node != off_node {
            let (has, asked) = if kept_off_node { ("", "out") } else { ("out", "") };
            return Err(Error::AlreadyExists(format!(
                "snapshot {name} already exists with{has} a copy on another node, and this request asks for one \
                 with{asked}; a VolumeSnapshotClass's protection cannot change for a snapshot already taken"
            )));
        }
        Ok(Some(existing))
    }

    /// Cuts a snapshot of a volume and records it under `id`.
    fn cut_snapshot(
        &self,
        key: Key,
        name: &str,
        source_id: &str,
        id: String,
        awaiting_copy: bool,
    ) -> Result<Arc<SnapshotRecord>> {
        let volume_key = self.volume_key(source_id)?;
        let volume = self.volume(&volume_key)?;
        // The source must not change under the copy's feet: claim it too.
        let _source = self.claim(Kind::Volume, volume_key)?;
        self.backends.create_snapshot(&volume_key, &volume, &key, true)?;
        crate::failpoint!("snapshot.cut");
        let (created_secs, created_nanos) = timestamp();
        let record = SnapshotRecord {
            schema: Schema,
            id,
            name: name.to_owned(),
            source_volume_id: volume.id.clone(),
            backend: volume.layout.backend(),
            size_bytes: volume.capacity_bytes,
            restore_bytes: volume.restore_bytes(),
            created_secs,
            created_nanos,
            group_snapshot_id: None,
            awaiting_copy,
        };
        self.snapshots.put(key, record)
    }

    /// Deletes a snapshot; deleting one that does not exist succeeds. A
    /// member of a group snapshot goes only with its group (INVALID_ARGUMENT,
    /// as the spec asks), unless that group's record is gone.
    pub fn delete_snapshot(&self, key: Key) -> Result<()> {
        if let Some(snapshot) = self.snapshots.get(&key)
            && let Some(group) = &snapshot.group_snapshot_id
        {
            // This node's record of the group: the group's own on its
            // coordinator, this node's part of it elsewhere.
            let recorded =
                ObjectId::parse(group).and_then(|g| self.groups.get(&g.key)).is_some_and(|record| record.id == *group);
            if recorded {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {} is part of group snapshot {group} and cannot be deleted alone; delete the group \
                     snapshot instead",
                    snapshot.id
                )));
            }
            // Its group is gone (its record was removed by hand): without
            // this, nothing could ever delete the snapshot.
            tracing::warn!(snapshot = %snapshot.id, %group, "deleting a member of a group snapshot that no longer exists");
        }
        self.remove_snapshot(key)
    }

    /// Removes a snapshot's data, then its record, whatever group it is in.
    pub(super) fn remove_snapshot(&self, key: Key) -> Result<()> {
        let backend = self.snapshots.get(&key).map(|s| s.backend);
        self.backends.delete_snapshot(&key, backend)?;
        crate::failpoint!("snapshot.deleted");
        self.snapshots.remove(&key)
    }

    /// The snapshot's record, or NOT_FOUND.
    pub fn snapshot(&self, key: &Key) -> Result<Arc<SnapshotRecord>> {
        self.snapshots.get(key).ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))
    }

    /// One page of snapshots, optionally only those of one source volume.
    pub fn list_snapshots(&self, after: Option<Key>, max: usize, source: Option<&str>) -> Page<SnapshotRecord> {
        self.snapshots.page(after, max, |s| source.is_none_or(|id| s.source_volume_id == id))
    }
}
