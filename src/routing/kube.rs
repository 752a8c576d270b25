//! The Kubernetes API as a pod sees it: its Service address, the pod's
//! service account token (read at each call: bound tokens rotate) and the
//! cluster's CA. Only what the controller asks: JSON in and out, one
//! connection per call (calls are rare: a node judged, a sweep a minute).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where a pod finds its service account's files.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long one call to the API may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: a list of every PersistentVolume of a big
/// cluster fits.
const MAX_ANSWER_BYTES: usize = 256 << 20;

/// A client of the cluster's API.
pub struct KubeApi {
    host: String,
    port: u16,
    token: PathBuf,
    tls: TlsConnector,
}

impl fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeApi").field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

impl KubeApi {
    /// The API of the cluster this pod runs in; the reason when this is not
    /// a pod (no `KUBERNETES_SERVICE_HOST`, no service account).
    pub fn in_cluster() -> Result<KubeApi, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| "KUBERNETES_SERVICE_HOST is not set")?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let port = port.parse().map_err(|_| format!("KUBERNETES_SERVICE_PORT {port:?} is not a port"))?;
        KubeApi::at(host, port, Path::new(SERVICE_ACCOUNT))
    }

    /// The API at `host`:`port`, with the service account files (`token`,
    /// `ca.crt`) in `dir`.
    pub fn at(host: String, port: u16, dir: &Path) -> Result<KubeApi, String> {
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
        Ok(KubeApi { host, port, token: dir.join("token"), tls: TlsConnector::from(Arc::new(config)) })
    }

    /// Calls `method` on `path` (with a JSON `body`); the status and the
    /// JSON answer (`Null` when it is not JSON).
    pub async fn call(&self, method: http::Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        match tokio::time::timeout(API_TIMEOUT, self.exchange(method, path, body)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {API_TIMEOUT:?}")),
        }
    }

    async fn exchange(&self, method: http::Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
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
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        // Every PATCH here is a JSON merge patch (RFC 7396): the fields it
        // names replace the object's, `null` removes one.
        let content_type =
            if method == http::Method::PATCH { "application/merge-patch+json" } else { "application/json" };
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(payload))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }
}

/// The object an event is about.
#[derive(Debug, Clone, Copy)]
pub struct Involved<'a> {
    /// Its kind, e.g. `PersistentVolumeClaim`.
    pub kind: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its uid, so the event follows this object and not a namesake.
    pub uid: &'a str,
}

/// Whether an event reports something normal or something to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Progress.
    Normal,
    /// Something an operator should read.
    Warning,
}

/// A core/v1 Event about `involved`, from the controller, for
/// `POST /api/v1/namespaces/<namespace>/events`.
pub fn event(involved: Involved<'_>, kind: EventType, reason: &str, message: &str) -> Value {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": format!("{}.loam-{}-", involved.name, reason.to_ascii_lowercase()),
            "namespace": involved.namespace,
        },
        "involvedObject": {
            "apiVersion": "v1",
            "kind": involved.kind,
            "namespace": involved.namespace,
            "name": involved.name,
            "uid": involved.uid,
        },
        "reason": reason,
        "message": message,
        "type": match kind { EventType::Normal => "Normal", EventType::Warning => "Warning" },
        "source": { "component": "loam-controller" },
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    })
}

/// A fake API server for tests: answers through a handler, only to the
/// bearer token `secret`.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers by `METHOD path` (the query string included).
    pub(crate) type Answers = Arc<Mutex<BTreeMap<String, (u16, Value)>>>;
    /// Every call as `METHOD path` and its body.
    pub(crate) type Calls = Arc<Mutex<Vec<(String, Value)>>>;
    /// Answers one call (`METHOD path`, its JSON body or `Null`).
    pub(crate) type Handler = Arc<dyn Fn(&str, &Value) -> (u16, Value) + Send + Sync>;

    /// Starts a server that answers each `METHOD path` from `answers` (404
    /// otherwise) and records every call in `calls`; writes `ca.crt` and
    /// `token` into `dir`; its port.
    pub(crate) async fn serve(dir: &Path, answers: Answers, calls: Calls) -> u16 {
        serve_with(
            dir,
            Arc::new(move |call: &str, body: &Value| {
                calls.lock().unwrap().push((call.to_owned(), body.clone()));
                answers.lock().unwrap().get(call).cloned().unwrap_or((404, Value::Null))
            }),
        )
        .await
    }

    /// Starts a server that answers through `handler`; writes `ca.crt` and
    /// `token` into `dir`; its port.
    pub(crate) async fn serve_with(dir: &Path, handler: Handler) -> u16 {
        use base64::Engine as _;
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
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
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                let (head, body) = loop {
                    let n = tls.read(&mut buf).await.unwrap();
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length || n == 0 {
                            break (text[..end].to_owned(), request[end + 4..].to_vec());
                        }
                    }
                };
                let line = head.lines().next().unwrap_or_default();
                let call = line.rsplit_once(' ').map_or(line, |(call, _)| call).to_owned();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (status, answer) = if !head.contains("authorization: Bearer secret\r\n") {
                    (401, Value::Null)
                } else {
                    handler(&call, &body)
                };
                let answer = answer.to_string();
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                tls.write_all(reply.as_bytes()).await.unwrap();
                let _ = tls.shutdown().await;
            }
        });
        port
    }
}
