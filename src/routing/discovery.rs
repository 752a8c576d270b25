//! Where the node agents listen: `host:port` targets resolved through DNS.
//!
//! In Kubernetes the target is the agents' headless Service, whose name
//! resolves to one A or AAAA record per ready DaemonSet pod, so the
//! controller finds every agent without talking to the API server. Targets
//! are resolved afresh on every refresh: a pod that comes back on a new IP
//! is found again.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// A source of agent addresses; the seam tests use to move an agent.
pub trait Discovery: Send + Sync + fmt::Debug {
    /// Every address an agent may listen on now, without duplicates.
    fn addresses(&self) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send + '_>>;
}

/// Agents found by resolving `host:port` targets (`--agents` entries or the
/// `--agents-service` name) to all their addresses.
#[derive(Debug, Clone)]
pub struct Resolver {
    targets: Vec<String>,
}

impl Resolver {
    /// Resolves each of `targets` (`host:port`) on every refresh.
    pub fn new(targets: Vec<String>) -> Self {
        Resolver { targets }
    }
}

impl Discovery for Resolver {
    fn addresses(&self) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send + '_>> {
        Box::pin(async move {
            let mut found = BTreeSet::new();
            for target in &self.targets {
                match tokio::net::lookup_host(target.as_str()).await {
                    Ok(addrs) => found.extend(addrs),
                    // A Service with no ready pod has no records: not fatal.
                    Err(e) => tracing::warn!(%target, error = %e, "cannot resolve agents"),
                }
            }
            found.into_iter().collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn targets_resolve_to_deduplicated_addresses() {
        let resolver = Resolver::new(vec!["127.0.0.1:9820".into(), "127.0.0.1:9820".into(), "[::1]:9821".into()]);
        let addrs = resolver.addresses().await;
        assert_eq!(addrs, vec!["127.0.0.1:9820".parse().unwrap(), "[::1]:9821".parse().unwrap()]);
        // A target without a port cannot resolve; it is skipped, not fatal.
        assert!(Resolver::new(vec!["missing-port".into()]).addresses().await.is_empty());
    }
}
