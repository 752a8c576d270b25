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
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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

/// The Kubernetes API as seen from a pod: its Service address, the pod's
/// service account token (read at each call: bound tokens rotate) and the
/// cluster's CA.
pub struct KubernetesNodes {
    host: String,
    port: u16,
    token: PathBuf,
    tls: TlsConnector,
}

impl fmt::Debug for KubernetesNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesNodes").field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

/// Where a pod finds its service account's files.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long one question to the API may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);

impl KubernetesNodes {
    /// The API of the cluster this pod runs in; `None` outside a pod (no
    /// `KUBERNETES_SERVICE_HOST`, no service account), with the reason.
    pub fn in_cluster() -> Result<KubernetesNodes, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| "KUBERNETES_SERVICE_HOST is not set")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let port = port.parse().map_err(|_| format!("KUBERNETES_SERVICE_PORT {port:?} is not a port"))?;
        KubernetesNodes::at(host, port, Path::new(SERVICE_ACCOUNT))
    }

    /// The API at `host`:`port`, with the service account files (`token`,
    /// `ca.crt`) in `dir`.
    pub fn at(host: String, port: u16, dir: &Path) -> Result<KubernetesNodes, String> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = dir.join("ca.crt");
        for cert in CertificateDer::pem_file_iter(&ca).map_err(|e| format!("reading {}: {e}", ca.display()))? {
            let cert = cert.map_err(|e| format!("reading {}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(KubernetesNodes { host, port, token: dir.join("token"), tls: TlsConnector::from(Arc::new(config)) })
    }

    async fn get_node(&self, node: &str) -> Result<u16, String> {
        let token =
            std::fs::read_to_string(&self.token).map_err(|e| format!("reading {}: {e}", self.token.display()))?;
        let name = match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| e.to_string())?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        // Node names are DNS subdomains (validated as node ids): nothing to escape.
        let request = http::Request::get(format!("/api/v1/nodes/{node}"))
            .header(http::header::HOST, &self.host)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }
}

impl NodeRegistry for KubernetesNodes {
    fn exists<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'a>> {
        Box::pin(async move {
            if crate::ids::validate_node_id(node).is_err() {
                return None;
            }
            match tokio::time::timeout(API_TIMEOUT, self.get_node(node)).await {
                Ok(Ok(200)) => Some(true),
                Ok(Ok(404)) => Some(false),
                Ok(Ok(status)) => {
                    tracing::warn!(%node, status, "the Kubernetes API did not say whether the node exists; check the controller's RBAC (get nodes)");
                    None
                }
                Ok(Err(e)) => {
                    tracing::warn!(%node, error = %e, "cannot ask the Kubernetes API whether the node exists");
                    None
                }
                Err(_) => {
                    tracing::warn!(%node, "the Kubernetes API did not answer whether the node exists in {API_TIMEOUT:?}");
                    None
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An API server on loopback that knows only the node `alive`, and
    /// answers only the bearer token `secret`.
    async fn api_server(dir: &Path) -> u16 {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD.encode(cert.cert.der());
        std::fs::write(dir.join("ca.crt"), format!("-----BEGIN CERTIFICATE-----\n{der}\n-----END CERTIFICATE-----\n"))
            .unwrap();
        std::fs::write(dir.join("token"), "secret\n").unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut request = vec![0u8; 4096];
                let n = tls.read(&mut request).await.unwrap();
                let request = String::from_utf8_lossy(&request[..n]).into_owned();
                let status = if !request.contains("authorization: Bearer secret\r\n") {
                    "401 Unauthorized"
                } else if request.starts_with("GET /api/v1/nodes/alive ") {
                    "200 OK"
                } else {
                    "404 Not Found"
                };
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}");
                tls.write_all(answer.as_bytes()).await.unwrap();
                tls.shutdown().await.unwrap();
            }
        });
        port
    }

    #[tokio::test]
    async fn the_kubernetes_api_says_which_nodes_exist() {
        let dir = tempfile::tempdir().unwrap();
        let port = api_server(dir.path()).await;
        let api = KubernetesNodes::at("127.0.0.1".into(), port, dir.path()).unwrap();
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
