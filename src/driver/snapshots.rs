//! Snapshots of this node's volumes.

use std::sync::Arc;

use super::{Driver, timestamp};
use crate::error::{Error, Result};
use crate::ids::{Key, Kind, ObjectId};
use crate::records::{Schema, SnapshotRecord};
use crate::store::Page;

impl Driver {
    // ----- Snapshots -----

    /// Takes a snapshot of a volume, or returns the one the same request made.
    pub fn create_snapshot(&self, key: Key, name: &str, source_id: &str) -> Result<Arc<SnapshotRecord>> {
        if let Some(existing) = self.snapshots.get(&key) {
            if existing.source_volume_id == source_id && existing.name == name {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {name} already exists for volume {}, not {source_id}",
                existing.source_volume_id
            )));
        }
        let volume_key = self.volume_key(source_id)?;
        let volume = self.volume(&volume_key)?;
        // The source must not change under the copy's feet: claim it too.
        let _source = self.claim(Kind::Volume, volume_key)?;
        self.backends.create_snapshot(&volume_key, &volume, &key, true)?;
        crate::failpoint!("snapshot.cut");
        let (created_secs, created_nanos) = timestamp();
        let record = SnapshotRecord {
            schema: Schema,
            id: ObjectId { key, node: self.config.node_id.clone() }.to_string(),
            name: name.to_owned(),
            source_volume_id: volume.id.clone(),
            backend: volume.layout.backend(),
            size_bytes: volume.capacity_bytes,
            created_secs,
            created_nanos,
            group_snapshot_id: None,
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
            let recorded = self.group_snapshot_key(group).is_ok_and(|g| self.groups.get(&g).is_some());
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
