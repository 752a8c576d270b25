//! The agent channel as an attacker on the pod network meets it: an agent
//! talks only to the controller's certificate, and the controller sends the
//! agent token only to a server whose certificate the token's authority signed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loam::auth::{SendToken, Token};
use loam::config::{Config, QuotaMode};
use loam::csi;
use loam::csi::controller_client::ControllerClient;
use loam::csi::identity_server::IdentityServer;
use loam::driver::Driver;
use loam::kernel::FakeKernel;
use loam::routing::agents::{Agents, Timeouts};
use loam::routing::discovery::Discovery;
use loam::rpc::identity::IdentityService;
use loam::server::limits::{Admitted, Limits};
use loam::tls::{self, Role};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::InterceptorLayer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request};

const TOKEN: &str = "agent-tls-test-token-0123456789";
const OTHER_TOKEN: &str = "agent-tls-test-token-0123456780";

fn token(text: &str) -> Token {
    Token::parse(text).unwrap()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Stops a server task when dropped, even when the test fails.
struct Stop(Option<oneshot::Sender<()>>);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.take().map(|tx| tx.send(()));
    }
}

/// A real node agent on a loopback port, serving as the deployment does.
async fn agent() -> (SocketAddr, tempfile::TempDir, Stop) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        driver_name: "loam.csi.dev".into(),
        node_id: "node-a".into(),
        root: dir.path().canonicalize().unwrap().join("root"),
        max_volumes_per_node: 0,
        quota: QuotaMode::Auto,
    };
    let driver = Arc::new(Driver::open(config, Arc::new(FakeKernel::new())).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tls::server_config(&token(TOKEN), Role::Agent).unwrap();
    let (tx, rx) = oneshot::channel();
    let incoming = Admitted::new(listener, Limits::default());
    let peer_tls = tls::client_config(&token(TOKEN), Role::Peer).unwrap();
    let copies = loam::server::CopySettings::default();
    tokio::spawn(loam::server::run_agent(incoming, driver, token(TOKEN), (tls, peer_tls), copies, async {
        let _ = rx.await;
    }));
    (addr, dir, Stop(Some(tx)))
}

/// Trusts any server certificate: the attacker's client, which wants the
/// handshake to get as far as the agent lets it.
#[derive(Debug)]
struct TrustAnything;

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate and key its holder made up, for `name`.
fn self_signed(name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    (made.cert.der().clone(), key)
}

/// Calls the agent at `addr` with the right token over TLS as `config` says;
/// the code it gets, or None when the call went through.
async fn call_with_token(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Option<Code> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect_with_connector_lazy(tls::Connector::new(config));
    call(channel).await
}

/// Whether a call failed in the transport (tonic's UNAVAILABLE or UNKNOWN),
/// never reaching a handler: what a refused handshake looks like.
fn refused(answer: Option<Code>) -> bool {
    matches!(answer, Some(Code::Unavailable | Code::Unknown))
}

async fn call(channel: tonic::transport::Channel) -> Option<Code> {
    let mut client = ControllerClient::with_interceptor(channel, SendToken::new(&token(TOKEN)));
    let answer = client.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {});
    match tokio::time::timeout(Duration::from_secs(10), answer).await.expect("the agent answers or hangs up") {
        Ok(_) => None,
        Err(status) => Some(status.code()),
    }
}

#[tokio::test]
async fn the_agent_serves_only_clients_with_a_controller_certificate() {
    let (addr, _dir, _stop) = agent().await;
    // The deployed controller gets through.
    assert_eq!(call_with_token(addr, tls::client_config(&token(TOKEN), Role::Controller).unwrap()).await, None);

    // Plain text, even with the token.
    let plain = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    assert!(refused(call(plain).await), "a plain-text client");

    let attacker = || {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustAnything))
    };
    let mut anonymous = attacker().with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    assert!(refused(call_with_token(addr, Arc::new(anonymous)).await), "no client certificate");

    let (cert, key) = self_signed("controller.loam.internal");
    let mut forged = attacker().with_client_auth_cert(vec![cert], key).unwrap();
    forged.alpn_protocols = vec![b"h2".to_vec()];
    assert!(refused(call_with_token(addr, Arc::new(forged)).await), "a self-made certificate");

    let other = tls::client_config(&token(OTHER_TOKEN), Role::Controller).unwrap();
    assert!(refused(call_with_token(addr, other).await), "another token's controller");
    // A leaf lifted from an agent cannot call as the controller.
    let as_agent = tls::client_config(&token(TOKEN), Role::Agent).unwrap();
    assert!(refused(call_with_token(addr, as_agent).await), "an agent's certificate");
}

/// Where the controller looks for agents: one fixed address.
#[derive(Debug)]
struct At(SocketAddr);

impl Discovery for At {
    fn addresses(&self) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send + '_>> {
        let addr = self.0;
        Box::pin(async move { vec![addr] })
    }
}

/// A server posing as an agent that keeps every `authorization` header it
/// receives; plain text when `tls` is None.
async fn impostor(tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Arc<Mutex<Vec<String>>>, Stop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    let capture = move |request: Request<()>| {
        if let Some(value) = request.metadata().get("authorization") {
            keep.lock().unwrap().push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
        Ok(request)
    };
    let server = Server::builder()
        .layer(InterceptorLayer::new(capture))
        .add_service(IdentityServer::new(IdentityService::router("loam.csi.dev".into())));
    let (tx, rx) = oneshot::channel();
    let stopped = async {
        let _ = rx.await;
    };
    let incoming = TcpIncoming::from(listener);
    match tls {
        None => drop(tokio::spawn(server.serve_with_incoming_shutdown(incoming, stopped))),
        Some(tls) => drop(tokio::spawn(server.serve_with_incoming_shutdown(tls::accept(incoming, tls), stopped))),
    }
    (addr, seen, Stop(Some(tx)))
}

/// What `impostor` got when the controller looked for agents there.
async fn token_sent_to(tls: Option<Arc<rustls::ServerConfig>>) -> Vec<String> {
    let (addr, seen, _stop) = impostor(tls).await;
    let timeouts =
        Timeouts { connect: Duration::from_secs(2), call: Duration::from_secs(5), refresh: Duration::from_secs(30) };
    let client = tls::client_config(&token(TOKEN), Role::Controller).unwrap();
    let agents = Agents::new("loam.csi.dev".into(), Arc::new(At(addr)), &token(TOKEN), client, timeouts);
    let err = agents.agent("node-a").await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), Code::Unavailable);
    seen.lock().unwrap().clone()
}

#[tokio::test]
async fn the_controller_sends_its_token_only_to_an_agent_of_its_authority() {
    let mut made_up = {
        let (cert, key) = self_signed("agent.loam.internal");
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap()
    };
    made_up.alpn_protocols = vec![b"h2".to_vec()];
    let cases = [
        ("plain text", None),
        ("a self-made certificate", Some(Arc::new(made_up))),
        ("another token's agent", Some(tls::server_config(&token(OTHER_TOKEN), Role::Agent).unwrap())),
        // A leaf lifted from the controller cannot serve as an agent.
        ("the controller's certificate", Some(tls::server_config(&token(TOKEN), Role::Controller).unwrap())),
    ];
    for (what, tls) in cases {
        assert_eq!(token_sent_to(tls).await, Vec::<String>::new(), "{what}");
    }
    // The impostor would have seen it had it held the token: the check above can fail.
    let genuine = tls::server_config(&token(TOKEN), Role::Agent).unwrap();
    assert_eq!(token_sent_to(Some(genuine)).await, [format!("Bearer {TOKEN}")]);
}
