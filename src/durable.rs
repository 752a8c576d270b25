//! Durable file changes with group commit.
//!
//! Making a change durable costs a few flushes to the disk (the new file's
//! data, then its directory); done one operation at a time they dominate the
//! cost of every RPC. Here concurrent changes share them, as a database's
//! group commit does: the first caller to find no flush in progress becomes
//! the leader and makes everything queued so far durable in one batch (each
//! new file's data, then every rename and removal, then each directory once),
//! while later callers queue for the next batch. Nobody returns before their
//! own change is durable, and a lone caller pays what it would have alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Atomically and durably replaces `path` with `tmp`, a file in the same
/// directory that the caller has written (but need not have synced).
pub fn replace(tmp: &Path, path: &Path) -> io::Result<()> {
    GROUP.submit(Job::Replace { tmp: tmp.to_owned(), path: path.to_owned() })
}

/// Durably removes the file at `path`; a missing file is already removed.
pub fn remove(path: &Path) -> io::Result<()> {
    GROUP.submit(Job::Remove { path: path.to_owned() })
}

/// Makes the entries of `dir` (names created, renamed or removed in it)
/// durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    GROUP.submit(Job::SyncDir { dir: dir.to_owned() })
}

/// Flushes everything written to the filesystem holding `path` (`syncfs`):
/// for copies of whole trees, where syncing file by file would cost more.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    nix::unistd::syncfs(File::open(path)?).map_err(io::Error::from)
}

/// One change waiting to be made durable.
#[derive(Debug)]
enum Job {
    Replace { tmp: PathBuf, path: PathBuf },
    Remove { path: PathBuf },
    SyncDir { dir: PathBuf },
}

impl Job {
    /// The directory whose entries the job changes.
    fn dir(&self) -> PathBuf {
        let parent = |p: &Path| p.parent().unwrap_or(Path::new("/")).to_owned();
        match self {
            Job::Replace { path, .. } | Job::Remove { path } => parent(path),
            Job::SyncDir { dir } => dir.clone(),
        }
    }
}

static GROUP: Group = Group::new();

/// The queue of changes and the batch results waiting to be collected.
struct Group {
    state: Mutex<State>,
    done: Condvar,
}

struct State {
    next_id: u64,
    queue: Vec<(u64, Job)>,
    results: BTreeMap<u64, io::Result<()>>,
    leading: bool,
}

impl Group {
    const fn new() -> Group {
        Group {
            state: Mutex::new(State { next_id: 0, queue: Vec::new(), results: BTreeMap::new(), leading: false }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push((id, job));
        loop {
            if let Some(result) = state.results.remove(&id) {
                return result;
            }
            if state.leading {
                state = self.done.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead one batch: everything queued so far, ours included. The
            // lock is not held across I/O, so others keep queueing.
            state.leading = true;
            let batch = std::mem::take(&mut state.queue);
            drop(state);
            let results = run_batch(&batch);
            state = self.lock();
            for ((id, _), result) in batch.into_iter().zip(results) {
                state.results.insert(id, result);
            }
            state.leading = false;
            self.done.notify_all();
        }
    }
}

/// Makes a batch durable; one result per job, in order.
fn run_batch(jobs: &[(u64, Job)]) -> Vec<io::Result<()>> {
    let mut results: Vec<io::Result<()>> = jobs.iter().map(|_| Ok(())).collect();
    // New files' data first, so a name never points at unwritten data.
    for ((_, job), result) in jobs.iter().zip(&mut results) {
        if let Job::Replace { tmp, .. } = job {
            *result = File::open(tmp).and_then(|f| f.sync_all());
        }
    }
    for ((_, job), result) in jobs.iter().zip(&mut results) {
        if result.is_err() {
            continue;
        }
        *result = match job {
            Job::Replace { tmp, path } => fs::rename(tmp, path),
            Job::Remove { path } => match fs::remove_file(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
            Job::SyncDir { .. } => Ok(()),
        };
    }
    // Then each directory once, however many of its entries changed.
    let dirs: BTreeSet<PathBuf> =
        jobs.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|((_, j), _)| j.dir()).collect();
    let failed: HashMap<PathBuf, io::Error> = dirs
        .into_iter()
        .filter_map(|dir| File::open(&dir).and_then(|d| d.sync_all()).err().map(|e| (dir, e)))
        .collect();
    for ((_, job), result) in jobs.iter().zip(&mut results) {
        if result.is_ok()
            && let Some(e) = failed.get(&job.dir())
        {
            *result = Err(io::Error::new(e.kind(), format!("syncing {}: {e}", job.dir().display())));
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_changes_all_land_and_each_caller_gets_its_own_result() {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let (tmp, path) = (dir.path().join(format!(".{i}.tmp")), dir.path().join(i.to_string()));
                    fs::write(&tmp, i.to_string()).unwrap();
                    replace(&tmp, &path).unwrap();
                    if i % 2 == 0 {
                        remove(&path).unwrap();
                    }
                    // A missing temporary file fails only its own change.
                    let err = replace(&dir.path().join(format!(".missing-{i}")), &dir.path().join("never"));
                    assert_eq!(err.unwrap_err().kind(), io::ErrorKind::NotFound);
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let mut left: Vec<u32> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, (0..32).filter(|i| i % 2 == 1).collect::<Vec<_>>());
        for i in left {
            assert_eq!(fs::read_to_string(dir.path().join(i.to_string())).unwrap(), i.to_string());
        }
        sync_dir(dir.path()).unwrap();
        remove(&dir.path().join("absent")).unwrap();
    }
}
