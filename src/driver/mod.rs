//! The node's volume manager: what each CSI operation means for Loam's records,
//! its backend and the mount table.
//!
//! Every method here is blocking and expects the caller to hold the
//! [`Guard`] of the object it changes; the RPC layer takes it and runs the
//! method on a blocking thread. Each method converges when retried after a
//! failure or a crash: it compares the record and the mount table with what
//! was asked and does only what is missing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::backend::Backends;
use crate::backend::loopback::Orphan;
use crate::config::{Config, TOPOLOGY_NODE_KEY};
use crate::error::{Error, IoContext, Result};
use crate::guard::{Guard, InFlight, PathsInFlight};
use crate::ids::{Key, Kind, ObjectId, SnapshotId};
use crate::kernel::Kernel;
use crate::kernel::mount::MountFlags;
use crate::kernel::usage::{FsUsage, fs_usage};
use crate::records::{Capability, ContentSource, GroupSnapshotRecord, Layout, SnapshotRecord, VolumeRecord};
use crate::store::Table;

mod copies;
mod figures;
mod group_parts;
mod groups;
mod inline;
mod node;
mod places;
mod snapshots;
mod volumes;

pub use copies::{Export, Incoming, Progress, SnapshotCopy};
pub use figures::NodeMetrics;
pub use group_parts::{HeldPart, PartPlan, Prepared};
pub use groups::{GroupSnapshot, Stillness};
// What the backends report about a volume, part of the driver's answers.
pub use crate::backend::{Condition, VolumeStats, parse_layout, transfer};

/// Capacity of a volume whose request names none.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// How often the bytes promised to volumes are measured again.
pub const PROMISES_REFRESH: Duration = Duration::from_secs(10);
/// Capacities are rounded up to a multiple of this.
pub const CAPACITY_ALIGN: u64 = 4096;

/// A CSI capacity range, in bytes; 0 means "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// The least capacity acceptable.
    pub required: u64,
    /// The most capacity acceptable.
    pub limit: u64,
}

impl CapacityRange {
    /// Whether `capacity` satisfies the range.
    pub fn admits(&self, capacity: u64) -> bool {
        capacity >= self.required && (self.limit == 0 || capacity <= self.limit)
    }

    /// The capacity to give: the request rounded up to [`CAPACITY_ALIGN`]
    /// (never down), at least `floor`, within the limit.
    pub fn choose(&self, floor: u64) -> Result<u64> {
        let want = match (self.required, self.limit) {
            (0, 0) => DEFAULT_CAPACITY,
            (0, limit) => DEFAULT_CAPACITY.min(limit),
            (required, _) => required,
        }
        .max(floor);
        let rounded = want
            .checked_next_multiple_of(CAPACITY_ALIGN)
            .ok_or_else(|| Error::OutOfRange(format!("capacity {want} is too large")))?;
        match self.limit {
            0 => Ok(rounded),
            limit if rounded <= limit => Ok(rounded),
            limit if want <= limit => Ok(limit),
            limit => Err(Error::OutOfRange(format!("the volume needs {want} bytes but the limit is {limit} bytes"))),
        }
    }
}

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// The CSI name.
    pub name: String,
    /// The capacity range asked for.
    pub capacity: CapacityRange,
    /// The capabilities it must support.
    pub capabilities: Vec<Capability>,
    /// The StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// The VolumeAttributesClass parameters, already applied to `layout`.
    pub mutable_parameters: BTreeMap<String, String>,
    /// The backend the parameters pick and how it lays the volume out.
    pub layout: Layout,
    /// Content to start from.
    pub source: Option<ContentSource>,
    /// Nodes the volume may live on, when the CO restricts it.
    pub allowed_nodes: Option<Vec<String>>,
}

/// A validated inline volume: what a pod's `csi` volume asks for.
#[derive(Debug, Clone)]
pub struct InlineVolume {
    /// Its size in bytes; [`DEFAULT_CAPACITY`] when the pod names none.
    pub size: Option<u64>,
    /// The StorageClass parameters among its attributes.
    pub parameters: BTreeMap<String, String>,
    /// The backend the parameters pick and how it lays the volume out.
    pub layout: Layout,
    /// The kubelet's id for it and the pod it is for.
    pub origin: crate::records::InlineOrigin,
}

impl Driver {
    /// Writes a volume's record, keeping the index of the paths volumes use
    /// in step with it.
    fn put_volume(&self, key: Key, record: VolumeRecord) -> Result<Arc<VolumeRecord>> {
        let old = self.volumes.get(&key);
        let new = self.volumes.put(key, record)?;
        self.places.update(key, old.as_deref(), Some(&new));
        Ok(new)
    }

    /// Removes a volume's record and its paths from the index.
    fn remove_volume(&self, key: &Key) -> Result<()> {
        let old = self.volumes.get(key);
        self.volumes.remove(key)?;
        self.places.update(*key, old.as_deref(), None);
        Ok(())
    }
}

/// Now, as the seconds and nanoseconds a record keeps and CSI reports.
fn timestamp() -> (i64, i32) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (i64::try_from(now.as_secs()).unwrap_or(i64::MAX), i32::try_from(now.subsec_nanos()).unwrap_or(0))
}

/// Refuses mount flags Loam cannot apply, at the request (a stage or publish
/// would fail with them later).
pub fn check_mount_flags(flags: &[String]) -> Result<()> {
    MountFlags::parse(flags).map(drop).map_err(Error::InvalidArgument)
}

/// The volume manager of one node.
#[derive(Debug)]
pub struct Driver {
    config: Config,
    volumes: Table<VolumeRecord>,
    snapshots: Table<SnapshotRecord>,
    groups: Table<GroupSnapshotRecord>,
    backends: Backends,
    kernel: Arc<dyn Kernel>,
    inflight: InFlight,
    /// Staging and target paths being mounted at (see [`PathsInFlight`]).
    paths: PathsInFlight,
    /// Staging and target paths the records hold, by path.
    places: places::Places,
    /// Bytes promised to volumes but not written yet, as last measured plus
    /// what was promised since.
    promises: Mutex<u64>,
    /// What each volume used at the last measurement of the promises (for
    /// metrics: measuring an unenforced directory walks its tree).
    measured: Mutex<Arc<BTreeMap<Key, u64>>>,
    /// Copies from other nodes being received.
    copies: copies::Copies,
    /// How many volumes are attached (ControllerPublish) to this node, or
    /// are being attached: a slot is taken before the record is written and
    /// given back if the write fails, so the lock is never held across I/O.
    attached: Mutex<u32>,
}

impl Driver {
    /// Opens the driver's root: loads every record and prepares the backend.
    pub fn open(config: Config, kernel: Arc<dyn Kernel>) -> Result<Driver> {
        let root = &config.root;
        fs::create_dir_all(root).context(|| format!("creating root {}", root.display()))?;
        // The root holds every volume: keep other users out of it.
        fs::set_permissions(root, fs::Permissions::from_mode(0o711))
            .context(|| format!("setting permissions of {}", root.display()))?;
        let volumes: Table<VolumeRecord> = Table::open(&root.join("meta/volumes"))?;
        let snapshots = Table::open(&root.join("meta/snapshots"))?;
        let groups = Table::open(&root.join("meta/groups"))?;
        let backends = Backends::open(root, config.quota, kernel.clone())?;
        volumes.for_each(|key, record| {
            if let Err(e) = backends.adopt(key, record) {
                tracing::error!(volume = %record.id, "cannot restore the volume's limit: {e}");
            }
        });
        let driver = Driver {
            config,
            volumes,
            snapshots,
            groups,
            backends,
            kernel,
            inflight: InFlight::default(),
            paths: PathsInFlight::default(),
            places: places::Places::default(),
            promises: Mutex::new(0),
            measured: Mutex::default(),
            copies: copies::Copies::default(),
            attached: Mutex::new(0),
        };
        driver.volumes.for_each(|key, record| driver.places.update(*key, None, Some(record)));
        driver.detach_orphans();
        driver.thaw_stages();
        driver.roll_back_incomplete_groups();
        driver.remove_leftover_cuts()?;
        driver.remove_unfinished_copies()?;
        driver.refresh_promises()?;
        driver.report_unpublished_inline();
        let mut attached = 0u32;
        driver.volumes.for_each(|_, r| attached += u32::from(r.attachment.is_some()));
        *driver.attached.lock().unwrap_or_else(PoisonError::into_inner) = attached;
        Ok(driver)
    }

    /// Detaches loop devices of volumes that are not staged: leftovers of a
    /// crash between attaching and recording a stage. Like every repair at
    /// start-up, a failure is logged and skipped: one volume never keeps
    /// the node from serving the others.
    fn detach_orphans(&self) {
        let staged = |key: &Key| self.volumes.get(key).is_some_and(|r| r.stage.is_some());
        let orphans = match self.backends.detach_orphans(staged) {
            Ok(orphans) => orphans,
            Err(e) => {
                tracing::warn!("cannot look for loop devices a crash left attached: {e}; they stay until restart");
                return;
            }
        };
        for (device, fate) in orphans {
            let (dev, image) = (device.device.display(), device.backing_file.display());
            match fate {
                Orphan::Detached => {
                    tracing::warn!(device = %dev, image = %image, "detached the loop device of a volume that is not staged")
                }
                Orphan::KeptMounted => tracing::warn!(
                    device = %dev,
                    image = %image,
                    "kept the loop device of a volume that is not staged because it is mounted: a stage was cut \
                     short, and its retry adopts it"
                ),
                Orphan::Failed(e) => tracing::warn!(
                    device = %dev,
                    image = %image,
                    "cannot detach the loop device of a volume that is not staged: {e}; find what holds it \
                     (findmnt, fuser) and detach it with losetup -d"
                ),
            }
        }
    }

    /// Thaws every staged loop filesystem a driver killed during a snapshot
    /// left frozen (a freeze outlives the process that made it). Only a
    /// recorded stage is ever frozen, so these are all there can be.
    fn thaw_stages(&self) {
        let mut staged = Vec::new();
        self.volumes.for_each(|key, record| {
            if record.stage.is_some() {
                staged.push(*key);
            }
        });
        for key in staged {
            let Some(record) = self.volumes.get(&key) else { continue };
            let (id, path) = (&record.id, record.stage.as_ref().map(|s| s.path.clone()).unwrap_or_default());
            match self.backends.thaw_stage(&key, &record) {
                Ok(true) => {
                    tracing::warn!(volume = %id, path = %path.display(), "thawed a filesystem a crash left frozen")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    volume = %id,
                    path = %path.display(),
                    "cannot thaw the volume's filesystem: {e}; its pods' writes may hang until `fsfreeze -u` is run on it"
                ),
            }
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Why directory volumes on this root are not enforced, when they are not.
    pub fn unenforced_reason(&self) -> Option<&str> {
        self.backends.unenforced_reason()
    }

    /// Claims a volume, snapshot or group snapshot for one operation
    /// (ABORTED if busy).
    pub fn claim(&self, kind: Kind, key: Key) -> Result<Guard> {
        self.inflight.try_claim(kind, key)
    }

    /// Reads a volume id from a request; NOT_FOUND when it is not this node's,
    /// or names an inline volume (reachable only by the kubelet's id).
    pub fn volume_key(&self, id: &str) -> Result<Key> {
        let key = self.own_key("volume", id)?;
        if self.volumes.get(&key).is_some_and(|r| r.inline.is_some()) {
            return Err(Error::NotFound(format!(
                "volume {id} is a pod's inline volume, which only the kubelet's NodePublish and NodeUnpublish manage"
            )));
        }
        Ok(key)
    }

    /// Reads a snapshot id from a request; NOT_FOUND when this node holds
    /// no copy of it (a snapshot kept off node has two holders, either of
    /// which answers for its own copy), or holds another snapshot under its
    /// key: the same key with other nodes is not this snapshot, and must
    /// never delete it.
    pub fn snapshot_key(&self, id: &str) -> Result<Key> {
        let own = &self.config.node_id;
        match SnapshotId::parse(id) {
            Some(parsed) if parsed.is_held_by(own) => match self.snapshots.get(&parsed.key) {
                Some(held) if held.id != id => Err(Error::NotFound(format!(
                    "snapshot {id} does not exist; this node holds {} under its key",
                    held.id
                ))),
                _ => Ok(parsed.key),
            },
            Some(parsed) => Err(Error::NotFound(format!(
                "snapshot {id} belongs to node {}, not to this node ({own})",
                parsed.holders().collect::<Vec<_>>().join(" and ")
            ))),
            None => Err(Error::NotFound(format!("snapshot {id} does not exist (not an id Loam made)"))),
        }
    }

    /// Reads a group snapshot id from a request; NOT_FOUND when it is not
    /// this node's.
    pub fn group_snapshot_key(&self, id: &str) -> Result<Key> {
        self.own_key("group snapshot", id)
    }

    fn own_key(&self, what: &str, id: &str) -> Result<Key> {
        match ObjectId::parse(id) {
            Some(parsed) if parsed.node == self.config.node_id => Ok(parsed.key),
            Some(parsed) => Err(Error::NotFound(format!(
                "{what} {id} belongs to node {}, not to this node ({})",
                parsed.node, self.config.node_id
            ))),
            None => Err(Error::NotFound(format!("{what} {id} does not exist (not an id Loam made)"))),
        }
    }

    /// The key a new volume called `name` gets.
    pub fn key_for(&self, kind: Kind, name: &str) -> Key {
        Key::for_name(kind, name)
    }

    /// Whether the root is usable: its filesystem answers.
    pub fn ready(&self) -> Result<()> {
        self.root_usage().map(drop)
    }

    fn root_usage(&self) -> Result<FsUsage> {
        fs_usage(&self.config.root).context(|| format!("reading usage of {}", self.config.root.display()))
    }
}

/// A driver of node `n` over `root` on the fake kernel, quotas off: for the
/// driver's unit tests.
#[cfg(test)]
fn test_driver(root: &std::path::Path) -> Driver {
    test_driver_on(root, "n")
}

/// [`test_driver`] of node `node`: for tests of two nodes.
#[cfg(test)]
fn test_driver_on(root: &std::path::Path, node: &str) -> Driver {
    let config = Config {
        driver_name: "loam.csi.dev".into(),
        node_id: node.into(),
        root: root.to_owned(),
        max_volumes_per_node: 0,
        quota: crate::config::QuotaMode::Off,
    };
    Driver::open(config, Arc::new(crate::kernel::FakeKernel::new())).unwrap()
}

/// A new 1 MiB `dir` volume called `name` on `driver`; its id.
#[cfg(test)]
fn test_dir_volume(driver: &Driver, name: &str) -> String {
    let request = NewVolume {
        name: name.into(),
        capacity: CapacityRange { required: 1 << 20, limit: 0 },
        capabilities: Vec::new(),
        parameters: BTreeMap::new(),
        mutable_parameters: BTreeMap::new(),
        layout: crate::records::Layout::Dir,
        source: None,
        allowed_nodes: None,
    };
    driver.create_volume(Key::for_name(Kind::Volume, name), request).unwrap().id.clone()
}

/// The topology segment of this node.
pub fn topology(node_id: &str) -> std::collections::HashMap<String, String> {
    [(TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())].into()
}
