//! The table of node agents (node id → address) and calls to them.
//!
//! The table is rebuilt from [`Discovery`] by asking every address for its
//! node id (Identity.GetPluginInfo's `node` manifest entry): when it is older
//! than the refresh interval, when a request names a node it lacks, and when
//! a call cannot reach the address it holds. Each call has a bounded time;
//! an agent that cannot be reached is UNAVAILABLE naming its node. Every
//! connection is TLS that proves the agent holds the token before the token
//! is sent ([`crate::tls`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::api::copies_client::CopiesClient;
use crate::api::groups_client::GroupsClient;
use crate::auth::{SendToken, Token};
use crate::csi;
use crate::csi::controller_client::ControllerClient;
use crate::csi::group_controller_client::GroupControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::error::{Error, Result};
use crate::ids::validate_node_id;
use crate::routing::discovery::Discovery;
use crate::tls::Connector;

/// A channel to one agent that sends the agent token.
type AgentChannel = InterceptedService<Channel, SendToken>;

/// A Controller client for one agent, sending the agent token.
pub type AgentClient = ControllerClient<AgentChannel>;

/// A GroupController client for one agent, sending the agent token.
pub type AgentGroupClient = GroupControllerClient<AgentChannel>;

/// A Copies client for one agent, sending the agent token.
pub type AgentCopiesClient = CopiesClient<AgentChannel>;

/// A Groups client for one agent, sending the agent token.
pub type AgentGroupsClient = GroupsClient<AgentChannel>;

/// How long the controller waits for agents.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to an agent, and asking it for its node id.
    pub connect: Duration,
    /// One forwarded call, from sending it to its answer.
    pub call: Duration,
    /// Age after which the table is rebuilt before it is used.
    pub refresh: Duration,
}

/// One reachable agent.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The node it serves.
    pub node: String,
    /// Where it listens.
    pub addr: SocketAddr,
    channel: Channel,
}

#[derive(Debug, Default)]
struct Table {
    agents: BTreeMap<String, Agent>,
    refreshed: Option<Instant>,
    generation: u64,
}

/// Every known agent, kept fresh.
#[derive(Debug)]
pub struct Agents {
    driver_name: String,
    discovery: Arc<dyn Discovery>,
    token: SendToken,
    tls: Connector,
    timeouts: Timeouts,
    table: RwLock<Table>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Agents {
    /// Agents of the driver `driver_name`, found through `discovery`, reached
    /// over TLS with `tls` ([`crate::tls::client_config`]).
    pub fn new(
        driver_name: String,
        discovery: Arc<dyn Discovery>,
        token: &Token,
        tls: Arc<rustls::ClientConfig>,
        timeouts: Timeouts,
    ) -> Self {
        Agents {
            driver_name,
            discovery,
            token: SendToken::new(token),
            tls: Connector::new(tls),
            timeouts,
            table: RwLock::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Looks at the agents every refresh interval, requests or not, so that
    /// `loam_agent_up` follows an agent that goes away or comes back even in
    /// a cluster that sends the controller nothing for a while (no capacity
    /// tracking, no volumes being made). Runs until the process ends.
    pub async fn watch(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.timeouts.refresh);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.all().await;
        }
    }

    /// Every reachable agent, ordered by node id.
    pub async fn all(&self) -> Vec<Agent> {
        let (generation, stale) = self.generation();
        if stale {
            self.refresh(generation).await;
        }
        self.read(|t| t.agents.values().cloned().collect())
    }

    /// The agent of `node`; UNAVAILABLE when none answers for it.
    pub async fn agent(&self, node: &str) -> Result<Agent> {
        let (generation, stale) = self.generation();
        if !stale && let Some(agent) = self.read(|t| t.agents.get(node).cloned()) {
            return Ok(agent);
        }
        self.refresh(generation).await;
        self.read(|t| t.agents.get(node).cloned()).ok_or_else(|| {
            Error::Unavailable(format!(
                "no Loam agent answers for node {node}: its loam-node pod is not running or not ready there"
            ))
        })
    }

    /// Calls `node`'s agent: `call` gets a client and a copy of `request`.
    ///
    /// When the agent cannot be reached, the table is refreshed and the call
    /// made once more if the node moved: every CSI call is idempotent.
    pub async fn call<R, T, F, Fut>(&self, node: &str, method: &'static str, request: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        F: Fn(AgentClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        self.forward(node, method, request, ControllerClient::new, call).await
    }

    /// [`Agents::call`] for the agent's GroupController.
    pub async fn call_group<R, T, F, Fut>(&self, node: &str, method: &'static str, request: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        F: Fn(AgentGroupClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        self.forward(node, method, request, GroupControllerClient::new, call).await
    }

    /// [`Agents::call`] for the agent's Copies.
    pub async fn call_copies<R, T, F, Fut>(&self, node: &str, method: &'static str, request: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        F: Fn(AgentCopiesClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        self.forward(node, method, request, CopiesClient::new, call).await
    }

    /// [`Agents::call`] for the agent's Groups.
    pub async fn call_groups<R, T, F, Fut>(&self, node: &str, method: &'static str, request: R, call: F) -> Result<T>
    where
        R: Clone + Send,
        F: Fn(AgentGroupsClient, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        self.forward(node, method, request, GroupsClient::new, call).await
    }

    /// Calls `node`'s agent with the client `client` makes of its channel.
    async fn forward<C, R, T, F, Fut>(
        &self,
        node: &str,
        method: &'static str,
        request: R,
        client: fn(AgentChannel) -> C,
        call: F,
    ) -> Result<T>
    where
        R: Clone + Send,
        F: Fn(C, R) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send,
    {
        let mut agent = self.agent(node).await?;
        loop {
            let (generation, _) = self.generation();
            let channel = InterceptedService::new(agent.channel.clone(), self.token.clone());
            let started = Instant::now();
            let answer = tokio::time::timeout(self.timeouts.call, call(client(channel), request.clone())).await;
            crate::metrics::global().forwarded(node, method, started.elapsed());
            let status = match answer {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if !unreachable(&status) => return Err(Error::Forwarded { status }),
                Ok(Err(status)) => status,
                Err(_) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "the agent of node {node} at {} did not answer {method} within {:?}; it may still finish, retry",
                        agent.addr, self.timeouts.call
                    )));
                }
            };
            self.refresh(generation).await;
            match self.read(|t| t.agents.get(node).cloned()) {
                Some(moved) if moved.addr != agent.addr => agent = moved,
                _ => {
                    return Err(Error::Unavailable(format!(
                        "the agent of node {node} at {} is unreachable: {}",
                        agent.addr,
                        status.message()
                    )));
                }
            }
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Table) -> T) -> T {
        f(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The table's generation, and whether it is due for a refresh.
    fn generation(&self) -> (u64, bool) {
        self.read(|t| (t.generation, t.refreshed.is_none_or(|at| at.elapsed() >= self.timeouts.refresh)))
    }

    /// Rebuilds the table unless another caller did since `seen`.
    async fn refresh(&self, seen: u64) {
        let _one_at_a_time = self.refreshing.lock().await;
        if self.read(|t| t.generation) != seen {
            return;
        }
        let known: BTreeMap<SocketAddr, Channel> =
            self.read(|t| t.agents.values().map(|a| (a.addr, a.channel.clone())).collect());
        let mut probes = JoinSet::new();
        for addr in self.discovery.addresses().await {
            // Reuse the channel to an address that still answers.
            let channel = known.get(&addr).cloned().map_or_else(|| self.channel(addr), Ok);
            let (token, name, wait) = (self.token.clone(), self.driver_name.clone(), self.timeouts.connect);
            probes.spawn(async move {
                let outcome = match channel {
                    Ok(channel) => probe(channel, token, &name, wait).await,
                    Err(e) => Err(e),
                };
                (addr, outcome)
            });
        }
        let mut agents = BTreeMap::new();
        while let Some(joined) = probes.join_next().await {
            let Ok((addr, outcome)) = joined else { continue };
            match outcome {
                Ok((node, channel)) => {
                    if let Some(other) = agents.get(&node).map(|a: &Agent| a.addr) {
                        tracing::warn!(%node, %addr, %other, "two agents claim one node; using the lower address");
                        if other < addr {
                            continue;
                        }
                    }
                    agents.insert(node.clone(), Agent { node, addr, channel });
                }
                Err(e) => tracing::warn!(%addr, error = %e, "agent does not answer"),
            }
        }
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        for (node, agent) in &agents {
            if table.agents.get(node).is_none_or(|old| old.addr != agent.addr) {
                tracing::info!(%node, addr = %agent.addr, "agent found");
            }
        }
        for node in table.agents.keys().filter(|n| !agents.contains_key(*n)) {
            tracing::info!(%node, "agent gone");
        }
        let gone = table.agents.keys().filter(|n| !agents.contains_key(*n)).map(String::as_str);
        crate::metrics::global().agents_refreshed(agents.keys().map(String::as_str), gone);
        table.agents = agents;
        table.refreshed = Some(Instant::now());
        table.generation += 1;
    }

    fn channel(&self, addr: SocketAddr) -> Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::InvalidArgument(format!("agent address {addr}: {e}")))?;
        Ok(endpoint.connect_timeout(self.timeouts.connect).connect_with_connector_lazy(self.tls.clone()))
    }
}

/// Whether a status means the agent was not reached, rather than its answer:
/// agents never answer UNAVAILABLE or UNKNOWN themselves, tonic does.
fn unreachable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown)
}

/// Asks the agent at `channel` which node it serves.
async fn probe(channel: Channel, token: SendToken, driver_name: &str, wait: Duration) -> Result<(String, Channel)> {
    let mut client = IdentityClient::with_interceptor(channel.clone(), token);
    let info = tokio::time::timeout(wait, client.get_plugin_info(csi::GetPluginInfoRequest {}))
        .await
        .map_err(|_| Error::DeadlineExceeded(format!("no answer within {wait:?}")))?
        .map_err(|status| Error::Forwarded { status })?
        .into_inner();
    if info.name != driver_name {
        return Err(Error::FailedPrecondition(format!("it serves driver {}, not {driver_name}", info.name)));
    }
    let node = info.manifest.get("node").cloned().unwrap_or_default();
    validate_node_id(&node)?;
    Ok((node, channel))
}
