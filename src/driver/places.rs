//! Where volumes are staged and published on this node, by path: the index a
//! stage or publish consults to refuse another volume's path, so that check
//! costs a few map lookups instead of decoding every record.
//!
//! It is derived from the records: built when the driver opens and kept in
//! step by every record write of the driver ([`super::Driver::put_volume`]).
//! A path being staged or published at is also claimed meanwhile
//! ([`crate::guard::PathsInFlight`]), so the index only has to be right once
//! an operation's record is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::ids::Key;
use crate::records::VolumeRecord;

/// Staging and target paths in use, and the volume using each.
#[derive(Debug, Default)]
pub(super) struct Places {
    by_path: Mutex<BTreeMap<PathBuf, Key>>,
}

/// The paths a record says its volume is staged or published at.
fn paths_of(record: &VolumeRecord) -> impl Iterator<Item = &PathBuf> {
    record.stage.iter().map(|s| &s.path).chain(record.publications.keys())
}

impl Places {
    /// Replaces what `key` was recorded at (`old`) with what it is recorded
    /// at now (`new`; `None` once the volume is gone).
    pub(super) fn update(&self, key: Key, old: Option<&VolumeRecord>, new: Option<&VolumeRecord>) {
        let mut by_path = self.by_path.lock().unwrap_or_else(PoisonError::into_inner);
        for path in old.into_iter().flat_map(paths_of) {
            if by_path.get(path) == Some(&key) {
                by_path.remove(path);
            }
        }
        for path in new.into_iter().flat_map(paths_of) {
            by_path.insert(path.clone(), key);
        }
    }

    /// A volume other than `key` staged or published at `path`, inside it or
    /// around it, and the path it uses there.
    pub(super) fn clash(&self, key: &Key, path: &Path) -> Option<(Key, PathBuf)> {
        let by_path = self.by_path.lock().unwrap_or_else(PoisonError::into_inner);
        // Paths order by their components, so `path` and everything inside
        // it sort together, right from `path` on.
        let inside = by_path.range(path.to_path_buf()..).take_while(|(used, _)| used.starts_with(path));
        let around = path.ancestors().skip(1).filter_map(|up| by_path.get_key_value(up));
        inside.chain(around).find(|(_, other)| *other != key).map(|(used, other)| (*other, used.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;
    use crate::records::{AccessMode, Capability, Publication, Stage};

    fn record(stage: Option<&str>, targets: &[&str]) -> VolumeRecord {
        let capability = Capability {
            access_mode: AccessMode::SingleNodeWriter,
            block: false,
            fs_type: String::new(),
            mount_flags: Vec::new(),
        };
        let text = r#"{"id":"v@n","name":"v","capacity_bytes":1,"backend":"dir"}"#;
        let mut record: VolumeRecord = serde_json::from_str(text).expect("record");
        record.stage = stage.map(|p| Stage { path: p.into(), capability: capability.clone() });
        for target in targets {
            record.publications.insert(target.into(), Publication { read_only: false, capability: capability.clone() });
        }
        record
    }

    #[test]
    fn paths_of_other_volumes_clash_at_inside_and_around_and_follow_the_records() {
        let places = Places::default();
        let (a, b) = (Key::for_name(Kind::Volume, "a"), Key::for_name(Kind::Volume, "b"));
        let staged = record(Some("/k/stage/a"), &["/k/pods/1/a"]);
        places.update(a, None, Some(&staged));
        let clash = |path: &str| places.clash(&b, Path::new(path)).map(|(k, p)| (k, p.display().to_string()));
        assert_eq!(clash("/k/stage/a"), Some((a, "/k/stage/a".into())), "the same path");
        assert_eq!(clash("/k/stage"), Some((a, "/k/stage/a".into())), "around it");
        assert_eq!(clash("/k/pods/1/a/sub"), Some((a, "/k/pods/1/a".into())), "inside it");
        assert_eq!(clash("/k/stage/a2"), None, "a sibling whose name starts the same");
        assert_eq!(clash("/k/stage/b"), None);
        assert_eq!(places.clash(&a, Path::new("/k/stage/a")), None, "a volume never clashes with itself");
        // Unpublished, then deleted: its paths are free again.
        let unpublished = record(Some("/k/stage/a"), &[]);
        places.update(a, Some(&staged), Some(&unpublished));
        assert_eq!(clash("/k/pods/1/a"), None);
        assert!(clash("/k/stage/a").is_some());
        places.update(a, Some(&unpublished), None);
        assert_eq!(clash("/k"), None);
    }
}
