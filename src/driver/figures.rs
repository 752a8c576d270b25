//! What a node agent's metrics report about its root and volumes, read from
//! the driver at each scrape: cheap reads only (a statvfs, the records, the
//! loop devices in sysfs, the usage the background measurement last found),
//! never a tree walk on the scrape's path.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Driver;
use crate::backend::Backends;
use crate::metrics::{NodeFigures, NodeSource, VolumeFigures};

/// A node agent's [`NodeSource`]: its driver, and whether each volume gets
/// its own series (`--metrics-per-volume`; off for nodes with very many).
#[derive(Debug)]
pub struct NodeMetrics {
    driver: Arc<Driver>,
    per_volume: bool,
}

impl NodeMetrics {
    /// Reports `driver`'s figures, each volume's too when `per_volume`.
    pub fn new(driver: Arc<Driver>, per_volume: bool) -> NodeMetrics {
        NodeMetrics { driver, per_volume }
    }
}

impl NodeSource for NodeMetrics {
    fn node_figures(&self) -> Option<NodeFigures> {
        let driver = &self.driver;
        let root = match driver.root_usage() {
            Ok(root) => root,
            Err(e) => {
                tracing::warn!("metrics: {e}");
                return None;
            }
        };
        let measured = driver.measured_usage();
        let mut counts: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
        let mut per_volume = Vec::new();
        driver.volumes.for_each(|key, record| {
            let enforcement = Backends::enforcement_name(&record.layout, record.enforcement.as_ref());
            *counts.entry((record.layout.backend().name(), enforcement)).or_default() += 1;
            if self.per_volume {
                per_volume.push(VolumeFigures {
                    name: record.name.clone(),
                    id: record.id.clone(),
                    capacity_bytes: record.capacity_bytes,
                    used_bytes: measured.get(key).copied(),
                });
            }
        });
        let loop_devices_without_direct_io = driver.backends.loop_devices_without_direct_io().unwrap_or_else(|e| {
            tracing::warn!("metrics: {e}");
            0
        });
        Some(NodeFigures {
            root_size_bytes: root.total_bytes,
            root_available_bytes: root.available_bytes,
            promised_bytes: driver.promised(),
            volumes: counts.into_iter().collect(),
            loop_devices_without_direct_io,
            copies_in_flight: driver.copies.in_flight(),
            per_volume,
        })
    }
}
