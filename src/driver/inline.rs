//! Inline volumes (CSI calls them ephemeral): a pod's `csi` volume, which the kubelet only
//! ever publishes and unpublishes (no CreateVolume, ControllerPublish or
//! NodeStage). The first NodePublish makes the volume, stages it under the
//! root and publishes it; the NodeUnpublish that leaves it published nowhere
//! unstages and deletes it. Each step is the persistent volume's own, so
//! both kinds converge the same way after a failure or a crash.

use std::collections::BTreeMap;
use std::path::Path;

use super::{CapacityRange, Driver, InlineVolume, NewVolume};
use crate::error::Result;
use crate::ids::{Key, Kind, ObjectId};
use crate::kernel::mountinfo;
use crate::records::{Capability, InlineOrigin};

/// Put before the kubelet's volume id to name an inline volume's key. The
/// NUL puts those names where no CreateVolume name can be (names never hold
/// one), so an inline volume never shares a key with a persistent volume.
const INLINE_NAME_PREFIX: &str = "ephemeral\0";

impl Driver {
    /// The key of the inline volume the kubelet calls `id`; `None` when `id`
    /// is a Loam volume id, which only ever names a volume the CO created.
    pub fn inline_key(&self, id: &str) -> Option<Key> {
        key_of_inline(id)
    }

    /// Makes, stages and publishes an inline volume at `target`, finishing
    /// whatever an earlier attempt left. A failure removes the volume again
    /// unless it was already published at `target`: after an error that is
    /// final to it the kubelet never calls NodeUnpublish, so anything left
    /// would stay forever.
    pub fn inline_publish(
        &self,
        key: Key,
        volume: InlineVolume,
        target: &Path,
        read_only: bool,
        capability: Capability,
    ) -> Result<()> {
        let in_use = self.volumes.get(&key).is_some_and(|r| r.publications.contains_key(target));
        let made_and_published = move || {
            let new = NewVolume {
                name: volume.origin.volume_id.clone(),
                capacity: CapacityRange { required: volume.size.unwrap_or(0), limit: 0 },
                capabilities: vec![capability.clone()],
                parameters: volume.parameters,
                mutable_parameters: BTreeMap::new(),
                layout: volume.layout,
                source: None,
                allowed_nodes: None,
            };
            let record = self.create_volume_as(key, new, Some(volume.origin))?;
            crate::failpoint!("inline.created");
            let staging = self.backends.inline_staging(&key, &record.layout, &self.config.root);
            self.node_stage(key, &staging, capability.clone())?;
            self.node_publish(key, &staging, target, read_only, capability)
        };
        let published = made_and_published();
        if published.is_err()
            && !in_use
            && let Err(e) = self.inline_unpublish(key, target)
        {
            tracing::error!(%key, target = %target.display(), "cannot remove an inline volume whose publish failed: {e}");
        }
        published
    }

    /// Unpublishes an inline volume from `target`; once it is published
    /// nowhere, unstages it and deletes it and its record. An id with no
    /// record succeeds, after clearing what a crash before the record was
    /// written could have left.
    pub fn inline_unpublish(&self, key: Key, target: &Path) -> Result<()> {
        self.unpublish_target(key, self.volumes.get(&key), target)?;
        let Some(record) = self.volumes.get(&key) else {
            return self.delete_volume(key);
        };
        if !record.publications.is_empty() {
            return Ok(());
        }
        if let Some(stage) = &record.stage {
            self.node_unstage(key, &stage.path)?;
        }
        self.backends.remove_inline_staging(&key, &record.layout, &self.config.root)?;
        self.delete_volume(key)
    }

    /// Logs the inline volumes that no target shows: left by a crash in the
    /// middle of a publish or by a reboot, which the kubelet finishes (it
    /// publishes again, or unpublishes once the pod is gone), or by a pod the
    /// kubelet forgot. Only the kubelet knows which, so they are reported,
    /// never deleted on a guess. A report only: it never stops the start.
    pub(super) fn report_unpublished_inline(&self) {
        let mounts = match self.kernel.mounts() {
            Ok(mounts) => mounts,
            Err(e) => {
                tracing::warn!("cannot read the mount table to look for unmounted inline volumes: {e}");
                return;
            }
        };
        self.volumes.for_each(|_, record| {
            let Some(InlineOrigin { volume_id, pod_namespace, pod_name, pod_uid }) = &record.inline else { return };
            if record.publications.keys().any(|t| mountinfo::find_mount_point(&mounts, t).is_some()) {
                return;
            }
            let targets: Vec<_> = record.publications.keys().map(|t| t.display().to_string()).collect();
            tracing::warn!(
                volume = %volume_id,
                pod = %format!("{pod_namespace}/{pod_name}"),
                %pod_uid,
                ?targets,
                "inline volume is not mounted at any target: the kubelet publishes it again or, once its pod is gone, \
                 unpublishes it; if the pod is gone and it stays, remove it with `loam ctl node-unpublish` at each \
                 target (any path when none is listed)"
            );
        });
    }
}

/// See [`Driver::inline_key`].
fn key_of_inline(id: &str) -> Option<Key> {
    match ObjectId::parse(id) {
        Some(_) => None,
        None => Some(Key::for_name(Kind::Volume, &format!("{INLINE_NAME_PREFIX}{id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::validate_name;
    use crate::records::VolumeRecord;

    #[test]
    fn inline_keys_are_stable_and_apart_from_every_persistent_key() {
        let id = "csi-0123abcd";
        let key = key_of_inline(id).unwrap();
        assert_eq!(key_of_inline(id), Some(key), "a retry lands on the same volume");
        assert_ne!(key_of_inline("csi-0123abce"), Some(key));
        // The same text as a CreateVolume name gives another key, and the
        // name the key is made of is one CreateVolume refuses.
        assert_ne!(Key::for_name(Kind::Volume, id), key);
        assert!(validate_name("volume", &format!("{INLINE_NAME_PREFIX}{id}")).is_err());
        // Loam's own ids never name an inline volume.
        assert_eq!(key_of_inline(&ObjectId::for_name(Kind::Volume, "pvc-1", "n").to_string()), None);
    }

    #[test]
    fn records_from_before_inline_volumes_load_and_stay_as_they_were() {
        let old = r#"{"id":"k@n","name":"pvc-1","capacity_bytes":4096,"backend":"dir"}"#;
        let record: VolumeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.inline, None);
        assert_eq!(serde_json::to_string(&record).unwrap(), old.replacen('{', r#"{"schema":1,"#, 1));
        let origin = InlineOrigin { volume_id: "csi-1".into(), pod_uid: "u".into(), ..Default::default() };
        let inline = VolumeRecord { inline: Some(origin.clone()), ..record };
        let text = serde_json::to_string(&inline).unwrap();
        assert!(text.ends_with(r#""ephemeral":{"volume_id":"csi-1","pod_uid":"u"}}"#), "{text}");
        assert_eq!(serde_json::from_str::<VolumeRecord>(&text).unwrap().inline, Some(origin));
    }
}
