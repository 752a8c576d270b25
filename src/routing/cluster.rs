//! What the cluster says about nodes the controller cannot reach: whether
//! the Node object still exists. A node whose object is deleted is gone for
//! good (an administrator removed it, or the cloud deleted the machine), and
//! so are the volumes and snapshots that lived on its disks: after a grace
//! period, deleting them and detaching them succeed instead of failing
//! UNAVAILABLE forever, so PersistentVolumes with reclaim policy Delete,
//! VolumeSnapshotContents and VolumeAttachments do not hang.
//!
//! The grace period counts from when this controller first found the Node
//! missing (a restarted controller starts counting again: it errs on waiting
//! longer). A node that is only unreachable, or whose object exists, keeps
//! its volumes: nothing is given up while the cluster still knows the node.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::routing::kube::KubeApi;

/// Where the cluster keeps its Node objects.
pub trait NodeRegistry: Send + Sync + fmt::Debug {
    /// Whether the Node named `node` exists; `None` when the registry cannot
    /// say (unreachable, refused): then nothing is given up.
    fn exists<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'a>>;
}

/// Nodes gone for good, as the controller judges them.
#[derive(Debug)]
pub struct GoneNodes {
    registry: Arc<dyn NodeRegistry>,
    grace: Duration,
    missing_since: Mutex<HashMap<String, Instant>>,
}

/// What the controller concluded about an unreachable node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The Node object was missing for longer than the grace period.
    Gone(Duration),
    /// The Node object is missing, but not for long enough yet.
    Missing {
        /// How much longer until it counts as gone.
        left: Duration,
    },
    /// The Node exists, or the cluster cannot say.
    Known,
}

impl GoneNodes {
    /// Judges nodes by `registry`, a node counting as gone once its object
    /// was missing for `grace`.
    pub fn new(registry: Arc<dyn NodeRegistry>, grace: Duration) -> GoneNodes {
        GoneNodes { registry, grace, missing_since: Mutex::new(HashMap::new()) }
    }

    /// Asks the cluster about `node` now.
    pub async fn verdict(&self, node: &str) -> Verdict {
        let exists = self.registry.exists(node).await;
        let mut missing = self.missing_since.lock().unwrap_or_else(PoisonError::into_inner);
        match exists {
            Some(false) => {
                let since = *missing.entry(node.to_owned()).or_insert_with(Instant::now);
                match self.grace.checked_sub(since.elapsed()) {
                    Some(left) if !left.is_zero() => Verdict::Missing { left },
                    _ => Verdict::Gone(since.elapsed()),
                }
            }
            Some(true) => {
                missing.remove(node);
                Verdict::Known
            }
            None => Verdict::Known,
        }
    }
}

impl NodeRegistry for KubeApi {
    fn exists<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'a>> {
        Box::pin(async move {
            // Node names are DNS subdomains (validated as node ids): nothing to escape.
            crate::ids::validate_node_id(node).ok()?;
            match self.call(http::Method::GET, &format!("/api/v1/nodes/{node}"), None).await {
                Ok((200, _)) => Some(true),
                Ok((404, _)) => Some(false),
                Ok((status, _)) => {
                    tracing::warn!(%node, status, "the Kubernetes API did not say whether the node exists; check the controller's RBAC (get nodes)");
                    None
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot ask the Kubernetes API whether the node exists");
                    None
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::kube::fake;

    #[tokio::test]
    async fn the_kubernetes_api_says_which_nodes_exist() {
        let dir = tempfile::tempdir().unwrap();
        let answers = fake::Answers::default();
        answers.lock().unwrap().insert("GET /api/v1/nodes/alive".into(), (200, serde_json::json!({})));
        let port = fake::serve(dir.path(), answers, fake::Calls::default()).await;
        let api = KubeApi::at("127.0.0.1".into(), port, dir.path()).unwrap();
        assert_eq!(api.exists("alive").await, Some(true));
        assert_eq!(api.exists("deleted").await, Some(false));
        assert_eq!(api.exists("../namespaces").await, None, "not a node name: not asked");
        // A token the API refuses gives nothing up.
        std::fs::write(dir.path().join("token"), "stale\n").unwrap();
        assert_eq!(api.exists("deleted").await, None);
    }

    #[derive(Debug)]
    struct Registry(Mutex<Option<bool>>);

    impl NodeRegistry for Registry {
        fn exists<'a>(&'a self, _: &'a str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'a>> {
            let answer = *self.0.lock().unwrap();
            Box::pin(async move { answer })
        }
    }

    #[tokio::test]
    async fn a_node_is_gone_only_once_its_object_was_missing_for_the_grace_period() {
        let registry = Arc::new(Registry(Mutex::new(Some(false))));
        let nodes = GoneNodes::new(registry.clone(), Duration::from_millis(200));
        assert!(matches!(nodes.verdict("n").await, Verdict::Missing { .. }));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(nodes.verdict("n").await, Verdict::Gone(_)));
        // It came back: the count starts again when it is missing next.
        *registry.0.lock().unwrap() = Some(true);
        assert_eq!(nodes.verdict("n").await, Verdict::Known);
        *registry.0.lock().unwrap() = Some(false);
        assert!(matches!(nodes.verdict("n").await, Verdict::Missing { .. }));
        // An API that cannot answer gives nothing up.
        *registry.0.lock().unwrap() = None;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(nodes.verdict("n").await, Verdict::Known);
    }
}
