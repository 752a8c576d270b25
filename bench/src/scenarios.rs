//! The control-path scenarios, each driving a driver through its CSI RPCs
//! from `concurrency` workers that share one connection.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use loam::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use loam::csi::*;
use serde::{Deserialize, Serialize};

use crate::client::{Clients, request};
use crate::stats::{Recorder, RpcSummary};

/// One measurement: a scenario at one concurrency and one pre-existing count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Scenario name: `create-delete`, `node-cycle`, `snapshot`.
    pub scenario: String,
    /// Volumes that existed before it started.
    pub existing: usize,
    /// Workers issuing calls at once.
    pub concurrency: usize,
    /// Complete cycles done (a cycle is every RPC of the scenario once).
    pub cycles: usize,
    /// Wall time, in seconds.
    pub seconds: f64,
    /// Cycles per second.
    pub cycles_per_s: f64,
    /// Per-RPC latencies and errors.
    pub rpcs: BTreeMap<String, RpcSummary>,
}

/// What every volume of the bench is created with.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Requested capacity in bytes.
    pub bytes: i64,
    /// StorageClass parameters.
    pub parameters: HashMap<String, String>,
}

impl VolumeSpec {
    fn request(&self, name: String) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name,
            capacity_range: Some(CapacityRange { required_bytes: self.bytes, limit_bytes: 0 }),
            volume_capabilities: vec![capability()],
            parameters: self.parameters.clone(),
            ..Default::default()
        }
    }
}

/// A single-node-writer filesystem capability.
fn capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: access_mode::Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// Times one RPC call into `rec`; the response when it succeeded.
macro_rules! timed {
    ($rec:expr, $name:literal, $call:expr) => {{
        let begun = Instant::now();
        let result = $call.await;
        $rec.record($name, begun.elapsed(), result.as_ref().map(drop).map_err(|s| s.code()));
        result.map(|r| r.into_inner())
    }};
}

/// Runs `work(worker, clients, recorder)` on `concurrency` workers and times the lot.
async fn run_workers<F, Fut>(clients: &Clients, concurrency: usize, work: F) -> anyhow::Result<(Recorder, Duration)>
where
    F: Fn(usize, Clients, Recorder) -> Fut,
    Fut: Future<Output = anyhow::Result<Recorder>> + Send + 'static,
{
    let begun = Instant::now();
    let tasks: Vec<_> = (0..concurrency).map(|w| tokio::spawn(work(w, clients.clone(), Recorder::default()))).collect();
    let mut all = Recorder::default();
    for task in tasks {
        all.merge(task.await??);
    }
    Ok((all, begun.elapsed()))
}

fn measurement(
    scenario: &str,
    existing: usize,
    concurrency: usize,
    cycles: usize,
    rec: Recorder,
    wall: Duration,
) -> Measurement {
    Measurement {
        scenario: scenario.into(),
        existing,
        concurrency,
        cycles,
        seconds: wall.as_secs_f64(),
        cycles_per_s: cycles as f64 / wall.as_secs_f64().max(1e-9),
        rpcs: rec.summarize(wall),
    }
}

/// Creates volumes `bench-pre-{from..to}` on 16 workers; returns the time taken.
pub async fn precreate(clients: &Clients, spec: &VolumeSpec, from: usize, to: usize) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(from));
    let spec = Arc::new(spec.clone());
    let (rec, wall) = run_workers(clients, 16, |_, mut c, mut rec| {
        let (next, spec) = (next.clone(), spec.clone());
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok(rec);
                }
                timed!(
                    rec,
                    "CreateVolume",
                    c.controller.create_volume(request(spec.request(format!("bench-pre-{i}"))))
                )?;
            }
        }
    })
    .await?;
    check_clean(&rec, "pre-creating volumes")?;
    Ok(wall)
}

/// `cycles` CreateVolume + DeleteVolume pairs of fresh volumes, split over the workers.
pub async fn create_delete(
    clients: &Clients,
    spec: &VolumeSpec,
    tag: &str,
    existing: usize,
    concurrency: usize,
    cycles: usize,
) -> anyhow::Result<Measurement> {
    let spec = Arc::new(spec.clone());
    let (rec, wall) = run_workers(clients, concurrency, |w, mut c, mut rec| {
        let spec = spec.clone();
        let name = format!("bench-cd-{tag}-{existing}-{concurrency}-{w}");
        let mine = share(cycles, concurrency, w);
        async move {
            for i in 0..mine {
                let created = timed!(
                    rec,
                    "CreateVolume",
                    c.controller.create_volume(request(spec.request(format!("{name}-{i}"))))
                );
                let Ok(Some(volume)) = created.map(|r| r.volume) else { continue };
                let delete = DeleteVolumeRequest { volume_id: volume.volume_id, ..Default::default() };
                let _ = timed!(rec, "DeleteVolume", c.controller.delete_volume(request(delete)));
            }
            Ok(rec)
        }
    })
    .await?;
    Ok(measurement("create-delete", existing, concurrency, cycles, rec, wall))
}

/// Stage, publish, unpublish and unstage each of `volumes` once, split over
/// the workers; staging and target directories live under `work`.
pub async fn node_cycle(
    clients: &Clients,
    volumes: &[String],
    work: &Path,
    existing: usize,
    concurrency: usize,
) -> anyhow::Result<Measurement> {
    let queue = Arc::new(volumes.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let work = work.to_owned();
    let (rec, wall) = run_workers(clients, concurrency, |_, mut c, mut rec| {
        let (queue, next, work) = (queue.clone(), next.clone(), work.clone());
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = queue.get(i) else { return Ok(rec) };
                let (staging, target) = (work.join(format!("staging/{i}")), work.join(format!("target/{i}")));
                // A CO makes the staging directory and the target's parent.
                std::fs::create_dir_all(&staging)?;
                std::fs::create_dir_all(target.parent().context("target parent")?)?;
                node_one(&mut c, &mut rec, id, &staging, &target).await;
                // Whatever the driver left behind, so the next run starts clean.
                let _ = std::fs::remove_dir(&target);
                let _ = std::fs::remove_dir(&staging);
            }
        }
    })
    .await?;
    Ok(measurement("node-cycle", existing, concurrency, volumes.len(), rec, wall))
}

async fn node_one(c: &mut Clients, rec: &mut Recorder, id: &str, staging: &Path, target: &Path) {
    let staging = path_str(staging);
    let target = path_str(target);
    let stage = NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.clone(),
        volume_capability: Some(capability()),
        ..Default::default()
    };
    if timed!(rec, "NodeStageVolume", c.node.node_stage_volume(request(stage))).is_err() {
        return;
    }
    let publish = NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(capability()),
        ..Default::default()
    };
    if timed!(rec, "NodePublishVolume", c.node.node_publish_volume(request(publish))).is_ok() {
        let unpublish = NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target };
        let _ = timed!(rec, "NodeUnpublishVolume", c.node.node_unpublish_volume(request(unpublish)));
    }
    let unstage = NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging };
    let _ = timed!(rec, "NodeUnstageVolume", c.node.node_unstage_volume(request(unstage)));
}

/// Creates `count` volumes for the node scenario; returns their ids.
pub async fn create_named(
    clients: &Clients,
    spec: &VolumeSpec,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut c = clients.clone();
    let mut rec = Recorder::default();
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let created =
            timed!(rec, "CreateVolume", c.controller.create_volume(request(spec.request(format!("{prefix}-{i}")))));
        ids.push(created.with_context(|| format!("creating {prefix}-{i}"))?.volume.context("no volume")?.volume_id);
    }
    Ok(ids)
}

/// Deletes the given volumes.
pub async fn delete_all(clients: &Clients, ids: &[String]) -> anyhow::Result<()> {
    let mut c = clients.clone();
    for id in ids {
        c.controller
            .delete_volume(request(DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }))
            .await
            .with_context(|| format!("deleting {id}"))?;
    }
    Ok(())
}

/// `cycles` CreateSnapshot + DeleteSnapshot pairs of one small volume, one at a time.
pub async fn snapshot(clients: &Clients, spec: &VolumeSpec, tag: &str, cycles: usize) -> anyhow::Result<Measurement> {
    let ids = create_named(clients, spec, &format!("bench-snap-src-{tag}"), 1).await?;
    let source = ids[0].clone();
    let (rec, wall) = run_workers(clients, 1, |_, mut c, mut rec| {
        let (source, tag) = (source.clone(), tag.to_owned());
        async move {
            for i in 0..cycles {
                let create = CreateSnapshotRequest {
                    name: format!("bench-snap-{tag}-{i}"),
                    source_volume_id: source.clone(),
                    ..Default::default()
                };
                let created = timed!(rec, "CreateSnapshot", c.controller.create_snapshot(request(create)));
                let Ok(Some(snap)) = created.map(|r| r.snapshot) else { continue };
                let delete = DeleteSnapshotRequest { snapshot_id: snap.snapshot_id, ..Default::default() };
                let _ = timed!(rec, "DeleteSnapshot", c.controller.delete_snapshot(request(delete)));
            }
            Ok(rec)
        }
    })
    .await?;
    delete_all(clients, &ids).await?;
    Ok(measurement("snapshot", 0, 1, cycles, rec, wall))
}

/// What listing every volume took.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Listing {
    /// Volumes listed.
    pub entries: usize,
    /// ListVolumes calls made: 1 for a driver that answers in one response.
    pub calls: usize,
    /// Wall time of the whole listing, in milliseconds.
    pub ms: f64,
    /// Bytes of the largest response, as encoded on the wire.
    pub largest_response_bytes: usize,
}

/// Lists every volume as a CO does: ListVolumes without `max_entries`,
/// following `next_token` for as long as the driver hands one out.
pub async fn list_all(clients: &Clients) -> anyhow::Result<Listing> {
    use prost::Message;
    let mut c = clients.controller.clone();
    let (mut entries, mut calls, mut largest) = (0, 0, 0);
    let mut token = String::new();
    let started = Instant::now();
    loop {
        let req = ListVolumesRequest { max_entries: 0, starting_token: token };
        let page = c.list_volumes(request(req)).await.context("ListVolumes")?.into_inner();
        calls += 1;
        entries += page.entries.len();
        largest = largest.max(page.encoded_len());
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    Ok(Listing { entries, calls, ms: started.elapsed().as_secs_f64() * 1e3, largest_response_bytes: largest })
}

/// Worker `w`'s share of `total` items split over `workers`.
fn share(total: usize, workers: usize, w: usize) -> usize {
    total / workers + usize::from(w < total % workers)
}

fn check_clean(rec: &Recorder, what: &str) -> anyhow::Result<()> {
    match rec.failures() {
        0 => Ok(()),
        n => bail!("{n} calls failed while {what}"),
    }
}

fn path_str(path: &Path) -> String {
    PathBuf::from(path).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up() {
        for (total, workers) in [(10, 3), (16, 16), (5, 16), (1000, 16)] {
            assert_eq!((0..workers).map(|w| share(total, workers, w)).sum::<usize>(), total);
        }
    }
}
