//! Durable records, one small file per volume or snapshot.
//!
//! A [`Table`] keeps every record of one kind in memory, sorted by key (so
//! lookups are cheap and pagination tokens are stable) and held as the
//! compact JSON that is also on disk (a node with 10,000 volumes keeps a few
//! MiB, not the tens that parsed records would take), and persists each
//! change by replacing that record's file alone: write a temporary file, fsync
//! it, rename it over the old one, fsync the directory ([`crate::durable`],
//! which shares those flushes among concurrent changes). No operation rewrites
//! other records, and a crash leaves either the old or the new record whole.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::durable;
use crate::error::{Error, IoContext, Result};
use crate::ids::Key;

const SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = ".json.tmp";

/// All records of one kind, in memory and on disk.
#[derive(Debug)]
pub struct Table<R> {
    dir: PathBuf,
    rows: RwLock<BTreeMap<Key, Box<[u8]>>>,
    damaged: RwLock<BTreeMap<Key, String>>,
    row: std::marker::PhantomData<fn() -> R>,
}

/// One page of a table.
#[derive(Debug)]
pub struct Page<R> {
    /// The records on this page, in key order.
    pub rows: Vec<Arc<R>>,
    /// Where the next page starts, when there is one.
    pub next: Option<Key>,
}

impl<R: Serialize + DeserializeOwned> Table<R> {
    /// Opens (creating if needed) the table stored in `dir` and loads it.
    ///
    /// A record that cannot be parsed is kept aside as damaged rather than
    /// failing start-up: the rest of the node stays usable and the damaged
    /// volume reports an abnormal condition naming the file.
    pub fn open(dir: &Path) -> Result<Table<R>> {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let mut rows = BTreeMap::new();
        let mut damaged = BTreeMap::new();
        for entry in fs::read_dir(dir).context(|| format!("listing {}", dir.display()))? {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_SUFFIX) {
                // A write that crashed before its rename: never acknowledged.
                let path = entry.path();
                fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
                continue;
            }
            let Some(key) = name.strip_suffix(SUFFIX).and_then(Key::parse) else {
                continue;
            };
            let path = entry.path();
            let loaded = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<R>(&bytes).map(|_| bytes).map_err(|e| e.to_string()));
            match loaded {
                Ok(bytes) => {
                    rows.insert(key, bytes.into_boxed_slice());
                }
                Err(why) => {
                    let reason = format!(
                        "record {} is damaged ({why}); restore it from a backup or remove it and the volume's data",
                        path.display()
                    );
                    tracing::error!(%reason, "damaged record");
                    damaged.insert(key, reason);
                }
            }
        }
        Ok(Table {
            dir: dir.to_owned(),
            rows: RwLock::new(rows),
            damaged: RwLock::new(damaged),
            row: std::marker::PhantomData,
        })
    }

    /// The record stored under `key`.
    pub fn get(&self, key: &Key) -> Option<Arc<R>> {
        self.rows.read().unwrap_or_else(PoisonError::into_inner).get(key).and_then(|bytes| parse(bytes))
    }

    /// Why the record under `key` could not be loaded, if it could not.
    pub fn damaged(&self, key: &Key) -> Option<String> {
        self.damaged.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Durably stores `row` under `key`, replacing what was there.
    pub fn put(&self, key: Key, row: R) -> Result<Arc<R>> {
        let bytes = serde_json::to_vec(&row).map_err(|e| Error::Damaged(format!("cannot encode record {key}: {e}")))?;
        let path = self.path(&key);
        let tmp = self.dir.join(format!("{key}{TMP_SUFFIX}"));
        write_durably(&tmp, &path, &bytes).context(|| format!("writing {}", path.display()))?;
        self.rows.write().unwrap_or_else(PoisonError::into_inner).insert(key, bytes.into_boxed_slice());
        let row = Arc::new(row);
        self.damaged.write().unwrap_or_else(PoisonError::into_inner).remove(&key);
        Ok(row)
    }

    /// Durably removes the record under `key`; removing a missing one succeeds.
    pub fn remove(&self, key: &Key) -> Result<()> {
        let path = self.path(key);
        durable::remove(&path).context(|| format!("removing {}", path.display()))?;
        self.rows.write().unwrap_or_else(PoisonError::into_inner).remove(key);
        self.damaged.write().unwrap_or_else(PoisonError::into_inner).remove(key);
        Ok(())
    }

    /// Up to `max` records (0: all) after `after` that satisfy `keep`.
    pub fn page(&self, after: Option<Key>, max: usize, keep: impl Fn(&R) -> bool) -> Page<R> {
        use std::ops::Bound::{Excluded, Unbounded};
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        let start = after.map_or(Unbounded, Excluded);
        let mut matching = rows
            .range((start, Unbounded))
            .filter_map(|(key, bytes)| parse(bytes).map(|row| (key, row)))
            .filter(|(_, row)| keep(row));
        let limit = if max == 0 { usize::MAX } else { max };
        let mut page = Vec::new();
        let mut last = None;
        for (key, row) in matching.by_ref().take(limit) {
            page.push(row);
            last = Some(*key);
        }
        let next = if matching.next().is_some() { last } else { None };
        Page { rows: page, next }
    }

    /// Calls `f` on every record, in key order.
    pub fn for_each(&self, mut f: impl FnMut(&Key, &R)) {
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        for (key, bytes) in rows.iter() {
            if let Some(row) = parse::<R>(bytes) {
                f(key, &row);
            }
        }
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{key}{SUFFIX}"))
    }
}

/// A stored row; it was parsed once when loaded or written, so this cannot
/// fail unless the code's record type changed under a running process.
fn parse<R: DeserializeOwned>(bytes: &[u8]) -> Option<Arc<R>> {
    serde_json::from_slice(bytes).ok().map(Arc::new)
}

/// Writes `bytes` to `tmp` and renames it over `path`; a failure (a full
/// root, most often) removes `tmp`, so it holds no space until the next start.
fn write_durably(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let written = File::create(tmp).and_then(|mut f| f.write_all(bytes)).and_then(|()| durable::replace(tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    fn key(i: u32) -> Key {
        Key::for_name(Kind::Volume, &i.to_string())
    }

    #[test]
    fn records_survive_reopen_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let table = Table::<String>::open(dir.path()).unwrap();
        table.put(key(1), "one".into()).unwrap();
        table.put(key(2), "two".into()).unwrap();
        table.put(key(1), "uno".into()).unwrap();
        table.remove(&key(2)).unwrap();
        table.remove(&key(3)).unwrap();

        let reopened = Table::<String>::open(dir.path()).unwrap();
        assert_eq!(reopened.get(&key(1)).as_deref().map(String::as_str), Some("uno"));
        assert!(reopened.get(&key(2)).is_none());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn damaged_records_are_set_aside_and_leftover_temp_files_dropped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(format!("{}{SUFFIX}", key(1))), b"{not json").unwrap();
        fs::write(dir.path().join(format!("{}{TMP_SUFFIX}", key(2))), b"\"half\"").unwrap();
        let table = Table::<String>::open(dir.path()).unwrap();
        assert!(table.get(&key(1)).is_none());
        assert!(table.damaged(&key(1)).unwrap().contains("damaged"));
        assert!(!dir.path().join(format!("{}{TMP_SUFFIX}", key(2))).exists());
        // Writing the record again repairs it.
        table.put(key(1), "fixed".into()).unwrap();
        assert!(table.damaged(&key(1)).is_none());
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let table = Table::<String>::open(dir.path()).unwrap();
        // The rename cannot replace a non-empty directory: the write fails
        // after its temp file was written, as on a root that is full.
        let blocker = dir.path().join(format!("{}{SUFFIX}", key(1)));
        fs::create_dir_all(blocker.join("occupied")).unwrap();
        assert!(table.put(key(1), "lost".into()).is_err());
        assert!(!dir.path().join(format!("{}{TMP_SUFFIX}", key(1))).exists(), "the temp file was left behind");
        assert!(table.get(&key(1)).is_none());
    }

    #[test]
    fn pages_are_stable_under_inserts_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let table = Table::<u32>::open(dir.path()).unwrap();
        for i in 0..10 {
            table.put(key(i), i).unwrap();
        }
        let odd = table.page(None, 0, |r| r % 2 == 1);
        assert_eq!(odd.rows.len(), 5);
        assert!(odd.next.is_none());
        let first = table.page(None, 4, |_| true);
        assert_eq!(first.rows.len(), 4);
        let next = first.next.unwrap();
        // Removing a record already returned does not shift the next page.
        table.remove(&key(*first.rows[0])).unwrap();
        let mut seen: Vec<u32> = first.rows.iter().map(|r| **r).collect();
        let mut after = Some(next);
        while let Some(token) = after {
            let page = table.page(Some(token), 4, |_| true);
            seen.extend(page.rows.iter().map(|r| **r));
            after = page.next;
        }
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
