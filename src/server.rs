//! The gRPC servers: a private Unix socket with the services of a mode, and
//! a node agent's TCP endpoint, behind mutual TLS and the agent token.
//!
//! [`bind`] makes the socket unreachable to anyone else until it is ready:
//! it is bound inside a fresh 0700 directory, set to 0600, and only then
//! renamed to the endpoint path. [`run`] and [`run_agent`] take bound
//! listeners (so tests bind their own) and serve until `shutdown` resolves,
//! then let in-flight RPCs finish.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::InterceptorLayer;
use tonic::transport::Server;

use crate::api::copies_server::CopiesServer;
use crate::api::groups_server::GroupsServer;
use crate::auth::{RequireRole, RequireToken, Token};
use crate::csi::controller_server::ControllerServer;
use crate::csi::group_controller_server::GroupControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::driver::{Driver, PROMISES_REFRESH};
use crate::routing::agents::Agents;
use crate::routing::cluster::GoneNodes;
use crate::routing::peer::Peers;
use crate::rpc::controller::ControllerService;
use crate::rpc::copies::CopiesService;
pub use crate::rpc::copies::CopySettings;
use crate::rpc::group::GroupControllerService;
use crate::rpc::group_parts::GroupPartsService;
use crate::rpc::identity::IdentityService;
use crate::rpc::node::NodeService;
use crate::rpc::routed::RoutedController;
use crate::tls::Role;

mod authority;
pub mod limits;

use authority::FixAuthority;
use limits::Admitted;

/// Binds a Unix socket at `path` that only this user can connect to.
///
/// An existing socket is replaced only when nothing listens on it; any other
/// file there is an error, never deleted.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process is serving {}; stop it first", path.display()),
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; remove it or pick another endpoint", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)?;
    let private = parent.join(format!(".loam-bind-{}", std::process::id()));
    let _ = fs::remove_dir_all(&private);
    fs::create_dir(&private)?;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700))?;
    let staged = private.join("csi.sock");
    let result = UnixListener::bind(&staged).and_then(|listener| {
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = fs::remove_dir(&private);
    result
}

/// What a process serves on its CSI socket, by mode.
#[derive(Debug)]
pub enum Services {
    /// `--mode all`: Identity, Controller, GroupController and Node over the
    /// local driver.
    All(Arc<Driver>),
    /// `--mode node`: Identity and Node for the kubelet; the Controller half
    /// is on the agent endpoint ([`run_agent`]).
    Node(Arc<Driver>),
    /// `--mode controller`: Identity and a Controller and GroupController
    /// routed to the agents.
    Controller {
        /// The name GetPluginInfo reports.
        driver_name: String,
        /// The node agents requests are routed to.
        agents: Arc<Agents>,
        /// How the controller learns that an unreachable node is gone for
        /// good; `None` outside a cluster.
        gone_nodes: Option<Arc<GoneNodes>>,
    },
}

/// Serves `services` on `listener` until `shutdown` resolves, then waits for
/// in-flight RPCs to finish.
pub async fn run(
    listener: UnixListener,
    services: Services,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // Clients other than grpc-go name the socket path as `:authority`.
    let incoming = UnixListenerStream::new(listener).map(|accepted| accepted.map(FixAuthority::new));
    let refresher = match &services {
        Services::All(driver) | Services::Node(driver) => Some(tokio::spawn(refresh_promises(driver.clone()))),
        Services::Controller { .. } => None,
    };
    let server = match services {
        Services::All(driver) => Server::builder()
            .add_service(IdentityServer::new(IdentityService::new(driver.clone())))
            .add_service(ControllerServer::new(ControllerService::new(driver.clone())))
            .add_service(GroupControllerServer::new(GroupControllerService::new(driver.clone())))
            .add_service(NodeServer::new(NodeService::new(driver))),
        Services::Node(driver) => Server::builder()
            .add_service(IdentityServer::new(IdentityService::new(driver.clone())))
            .add_service(NodeServer::new(NodeService::new(driver))),
        Services::Controller { driver_name, agents, gone_nodes } => {
            let routed = RoutedController::new(agents, gone_nodes);
            Server::builder()
                .add_service(IdentityServer::new(IdentityService::router(driver_name)))
                .add_service(ControllerServer::new(routed.clone()))
                .add_service(GroupControllerServer::new(routed))
        }
    };
    let served = server.serve_with_incoming_shutdown(incoming, shutdown).await;
    if let Some(refresher) = refresher {
        refresher.abort();
    }
    served
}

/// Measures what volumes were promised every [`PROMISES_REFRESH`], so no
/// request ever walks every volume to answer how much room is left.
async fn refresh_promises(driver: Arc<Driver>) {
    let mut tick = tokio::time::interval(PROMISES_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and Driver::open has just measured.
    tick.tick().await;
    loop {
        tick.tick().await;
        let driver = driver.clone();
        match tokio::task::spawn_blocking(move || driver.refresh_promises()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "measuring the capacity promised to volumes failed"),
            Err(e) => tracing::warn!(error = %e, "measuring the capacity promised to volumes panicked"),
        }
    }
}

/// Serves a node agent's endpoint on `incoming` (a TCP listener within
/// [`limits::Limits`]): Identity and the node-local Controller and
/// GroupController for the routing controller, Loam's Groups (parts of group
/// snapshots across nodes) for it, and Loam's Copies for it and for other
/// agents, never Node, over TLS with `tls`
/// ([`crate::tls::server_config`]: only clients with a controller or peer
/// certificate complete the handshake), and only to callers that present
/// `token`. Copies from other nodes are pulled over TLS with `peer_tls`
/// ([`crate::tls::client_config`] for a peer), as `copies` says.
pub async fn run_agent(
    incoming: Admitted,
    driver: Arc<Driver>,
    token: Token,
    (tls, peer_tls): (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>),
    copies: CopySettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = crate::tls::accept(incoming, tls);
    let peers = Peers::new(&token, peer_tls);
    let controller = RequireRole(Role::Controller);
    Server::builder()
        .layer(InterceptorLayer::new(RequireToken::new(token)))
        .add_service(IdentityServer::new(IdentityService::new(driver.clone())))
        .add_service(ControllerServer::with_interceptor(ControllerService::new(driver.clone()), controller))
        .add_service(GroupControllerServer::with_interceptor(GroupControllerService::new(driver.clone()), controller))
        .add_service(GroupsServer::with_interceptor(GroupPartsService::new(driver.clone()), controller))
        .add_service(CopiesServer::new(CopiesService::new(driver, peers, copies)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_are_private_and_never_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let listener = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live socket is not replaced.
        assert_eq!(bind(&path).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        // A stale one is.
        let _again = bind(&path).unwrap();
        // A regular file is never deleted.
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"x");
    }
}
