//! The agent channel's TLS: mutual authentication rooted in the agent token,
//! with no certificate to make, ship or rotate by hand.
//!
//! Every process that holds the token derives the same certificate authority
//! from it ([`Token::derive_key`] → an Ed25519 key), and mints its own leaf
//! certificate signed by that authority, with a fresh key, at start-up and
//! again before it expires (`Leaf`). Both ends pin that one authority and
//! require the other's leaf: the agent serves only clients whose certificate
//! it signed, and the controller talks only to servers whose certificate it
//! signed, so the bearer token ([`crate::auth`]) is sent only after the
//! handshake proved the server holds the token too. A pod that reaches the
//! port without the token can neither read the token nor pass as either end.
//!
//! Leaves carry their [`Role`]: an agent's is for serving only (extended key
//! usage serverAuth, name `agent.loam.internal`), the controller's for calling
//! only (clientAuth, `controller.loam.internal`), so a leaf lifted from an
//! agent's server cannot call another agent. An agent that copies a volume
//! from another node calls that node's agent with a third leaf, a peer's
//! (clientAuth, `peer.loam.internal`). An agent reads the role of each
//! caller's leaf ([`Caller`]) and keeps it to its own calls
//! ([`crate::auth::RequireRole`]): the controller's to the node-local
//! Controller, GroupController and Copies.CreateVolumeFrom, a peer's to
//! Copies.Export. (A process holding the token can mint any; roles bound
//! what one leaked key can do.)
//!
//! A new token is a new authority: rotating the Secret rotates everything.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519, SerialNumber,
};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Uri;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::auth::Token;
use crate::error::{Error, Result};

/// What the token derives the authority's key for; changing it changes every
/// authority, so it is fixed forever.
const AUTHORITY_PURPOSE: &[u8] = b"loam agent channel CA v1";
/// How long a leaf is valid; it is re-minted well before, after [`RENEW_AFTER`].
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Age after which the next handshake gets a freshly minted leaf.
const RENEW_AFTER: Duration = Duration::from_secs(6 * 3600);
/// A leaf is valid from this long before it was minted, so a peer whose
/// clock is behind still accepts it.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// How long a connection may take to finish its handshake before it is
/// dropped, so stalled peers hold no task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The protocol gRPC speaks over the channel.
const ALPN_H2: &[u8] = b"h2";

/// Which end of the agent channel a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node agent: serves the channel.
    Agent,
    /// The routing controller: calls the agents.
    Controller,
    /// A node agent calling another: pulls the source of a copy.
    Peer,
}

impl Role {
    /// The DNS name its leaves carry; the controller checks an agent's.
    fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent.loam.internal",
            Role::Controller => "controller.loam.internal",
            Role::Peer => "peer.loam.internal",
        }
    }

    /// The one use its leaves are good for.
    fn usage(self) -> ExtendedKeyUsagePurpose {
        match self {
            Role::Agent => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Controller | Role::Peer => ExtendedKeyUsagePurpose::ClientAuth,
        }
    }
}

/// The certificate authority derived from the token: the same key, name and
/// certificate in every process that holds the token.
struct Authority {
    key: KeyPair,
    params: CertificateParams,
    cert: CertificateDer<'static>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authority(<derived from the agent token>)")
    }
}

impl Authority {
    fn derive(token: &Token) -> Result<Authority> {
        let key = KeyPair::try_from(ed25519_pkcs8(&token.derive_key(AUTHORITY_PURPOSE))).map_err(minting)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "Loam agent channel CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        let cert = params.self_signed(&key).map_err(minting)?.der().clone();
        Ok(Authority { key, params, cert })
    }

    /// The only certificate either end trusts.
    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).map_err(minting)?;
        Ok(Arc::new(roots))
    }

    /// A new leaf for `role` with a fresh key, valid from now (less the
    /// clock skew allowance) for [`LEAF_LIFETIME`].
    fn mint(&self, role: Role) -> Result<Arc<CertifiedKey>> {
        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(minting)?;
        let mut params = CertificateParams::new(vec![role.name().to_owned()]).map_err(minting)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, role.name());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![role.usage()];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + LEAF_LIFETIME;
        let cert = params.signed_by(&key, &Issuer::from_params(&self.params, &self.key)).map_err(minting)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = provider().key_provider.load_private_key(der).map_err(minting)?;
        Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
    }
}

/// An Ed25519 private key in PKCS#8 v1 (RFC 8410): a fixed prefix, then the seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] =
        [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    [&PREFIX[..], seed].concat()
}

fn minting(e: impl fmt::Display) -> Error {
    Error::Io {
        context: "setting up the agent channel's TLS certificates".into(),
        source: io::Error::other(e.to_string()),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This process's leaf for its role, re-minted on the first handshake after
/// [`RENEW_AFTER`]: a long-running process never presents an expired one.
#[derive(Debug)]
struct Leaf {
    authority: Arc<Authority>,
    role: Role,
    current: Mutex<(Instant, Arc<CertifiedKey>)>,
}

impl Leaf {
    fn new(authority: Arc<Authority>, role: Role) -> Result<Leaf> {
        let first = authority.mint(role)?;
        Ok(Leaf { authority, role, current: Mutex::new((Instant::now(), first)) })
    }

    fn get(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0.elapsed() >= RENEW_AFTER {
            match self.authority.mint(self.role) {
                Ok(fresh) => *current = (Instant::now(), fresh),
                // The old leaf is still valid for hours; the next handshake retries.
                Err(e) => tracing::error!(error = %e, "re-minting the agent channel certificate failed"),
            }
        }
        current.1.clone()
    }
}

impl ResolvesServerCert for Leaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for Leaf {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS server side for `role` (production: [`Role::Agent`]): presents a
/// leaf of that role, and completes a handshake only with a client whose
/// leaf the token's authority signed for calling.
pub fn server_config(token: &Token, role: Role) -> Result<Arc<ServerConfig>> {
    let authority = Arc::new(Authority::derive(token)?);
    let clients =
        WebPkiClientVerifier::builder_with_provider(authority.roots()?, provider()).build().map_err(minting)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(minting)?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(Arc::new(Leaf::new(authority, role)?));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS client side for `role` (production: [`Role::Controller`]):
/// presents a leaf of that role, and completes a handshake only with a
/// server whose leaf the token's authority signed for an agent.
pub fn client_config(token: &Token, role: Role) -> Result<Arc<ClientConfig>> {
    let authority = Arc::new(Authority::derive(token)?);
    let servers =
        WebPkiServerVerifier::builder_with_provider(authority.roots()?, provider()).build().map_err(minting)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(minting)?
        .with_webpki_verifier(servers)
        .with_client_cert_resolver(Arc::new(Leaf::new(authority, role)?));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Turns accepted connections into TLS connections, handshaking each on its
/// own task (a slow peer delays no one) within `HANDSHAKE_TIMEOUT`. Failed
/// handshakes are logged and dropped; accept errors pass through.
pub fn accept<S, IO>(connections: S, config: Arc<ServerConfig>) -> impl Stream<Item = io::Result<Tls<IO>>>
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: fmt::Debug,
{
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut connections = std::pin::pin!(connections);
        let mut handshakes = JoinSet::new();
        loop {
            let ready = tokio::select! {
                accepted = connections.next() => match accepted {
                    Some(Ok(io)) => {
                        handshakes.spawn(handshake(acceptor.clone(), io));
                        continue;
                    }
                    Some(Err(e)) => Err(e),
                    None => break,
                },
                // Match every outcome here: a pattern that failed to match
                // would disable this branch until the next connection came.
                Some(done) = handshakes.join_next() => match done {
                    Ok(Some(tls)) => Ok(tls),
                    Ok(None) | Err(_) => continue,
                },
                // The server stopped: drop what is still handshaking.
                () = tx.closed() => break,
            };
            if tx.send(ready).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake<IO>(acceptor: TlsAcceptor, io: IO) -> Option<Tls<IO>>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin,
    IO::ConnectInfo: fmt::Debug,
{
    let peer = io.connect_info();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            let role = client_role(&stream);
            Some(Tls(stream, role))
        }
        // A TCP probe (the kubelet's readiness check) connects and closes.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(?peer, "connection closed before its TLS handshake");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(?peer, error = %e, "refused a connection: its TLS handshake failed \
                           (only the Loam controller, holding the agent token, may connect)");
            None
        }
        Err(_) => {
            tracing::warn!(
                ?peer,
                "dropped a connection that did not finish its TLS handshake in {HANDSHAKE_TIMEOUT:?}"
            );
            None
        }
    }
}

/// An accepted connection after its handshake, and the role its caller's
/// certificate was minted for.
#[derive(Debug)]
pub struct Tls<IO>(TlsStream<IO>, Option<Role>);

/// Who a call on an accepted connection comes from: the connection below
/// (the peer's address) and the role of the caller's certificate, read by
/// [`caller_role`] to keep each caller to its own calls.
#[derive(Debug, Clone)]
pub struct Caller<C> {
    /// What the connection below reports (the peer's address).
    pub connection: C,
    /// The caller's role; `None` for a leaf of no known role.
    pub role: Option<Role>,
}

impl<IO: Connected> Connected for Tls<IO> {
    type ConnectInfo = Caller<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        Caller { connection: self.0.get_ref().0.connect_info(), role: self.1 }
    }
}

/// The role of the caller of `request` on an agent endpoint, as its
/// certificate says.
pub fn caller_role<T>(request: &tonic::Request<T>) -> Option<Role> {
    request.extensions().get::<Caller<TcpConnectInfo>>().and_then(|caller| caller.role)
}

/// The address of the caller of `request` on an agent endpoint, for logs.
pub fn caller_addr<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    request.extensions().get::<Caller<TcpConnectInfo>>().and_then(|caller| caller.connection.remote_addr())
}

/// The calling role the client's verified leaf was minted for (its name).
fn client_role<IO>(stream: &TlsStream<IO>) -> Option<Role> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    let leaf = webpki::EndEntityCert::try_from(leaf).ok()?;
    [Role::Controller, Role::Peer].into_iter().find(|role| {
        ServerName::try_from(role.name()).is_ok_and(|name| leaf.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Connects a tonic channel to an agent (`http://host:port`) over TLS: the
/// connection is handed to gRPC only once the agent proved its leaf, so
/// nothing (no token) is sent to a server that did not.
#[derive(Debug, Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
}

impl Connector {
    /// Connects with `config` ([`client_config`]).
    pub fn new(config: Arc<ClientConfig>) -> Self {
        Connector { config }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = TlsConnector::from(self.config.clone());
        Box::pin(async move {
            let addr = uri.authority().map(|a| a.as_str().to_owned()).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("agent address {uri} has no host:port"))
            })?;
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(connect(tls, tcp).await?))
        })
    }
}

/// The controller's side of the handshake on a connected stream: done only
/// once the agent proved a leaf of the token's authority.
pub async fn connect(tls: TlsConnector, tcp: TcpStream) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    // Agents are reached by IP; the name checked is the role's, which only
    // the token's authority signs.
    let agent = ServerName::try_from(Role::Agent.name()).map_err(io::Error::other)?;
    tls.connect(agent, tcp).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn token(text: &str) -> Token {
        Token::parse(text).unwrap()
    }

    /// Whether a client with `client` and a server with `server` get a byte
    /// across: in TLS 1.3 the server judges the client's certificate after
    /// the client thinks it is done, so only an answer proves both agreed.
    async fn talk(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> bool {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let serve = async move {
            let mut tls = TlsAcceptor::from(server).accept(far).await?;
            tls.write_all(b"!").await?;
            tls.flush().await
        };
        let call = async move {
            let name = ServerName::try_from(Role::Agent.name()).unwrap();
            let mut tls = TlsConnector::from(client).connect(name, near).await?;
            let mut answer = [0u8; 1];
            tls.read_exact(&mut answer).await.map(drop)
        };
        let (served, called) = tokio::join!(serve, call);
        served.is_ok() && called.is_ok()
    }

    #[tokio::test]
    async fn only_the_controller_and_an_agent_of_one_token_agree() {
        let ours = token("agent-channel-token-0123456789");
        let theirs = token("agent-channel-token-0123456780");
        let agent = server_config(&ours, Role::Agent).unwrap();
        let controller = client_config(&ours, Role::Controller).unwrap();
        assert!(talk(agent.clone(), controller.clone()).await, "the deployed pair must connect");

        // Another token is another authority, whichever end has it.
        assert!(!talk(agent.clone(), client_config(&theirs, Role::Controller).unwrap()).await);
        assert!(!talk(server_config(&theirs, Role::Agent).unwrap(), controller.clone()).await);
        // An agent's leaf cannot call as the controller, nor the controller's serve as an agent.
        assert!(!talk(agent, client_config(&ours, Role::Agent).unwrap()).await);
        assert!(!talk(server_config(&ours, Role::Controller).unwrap(), controller).await);
        // An agent pulling a copy from another calls it with a peer's leaf,
        // which cannot serve.
        assert!(talk(server_config(&ours, Role::Agent).unwrap(), client_config(&ours, Role::Peer).unwrap()).await);
        assert!(!talk(server_config(&ours, Role::Peer).unwrap(), client_config(&ours, Role::Peer).unwrap()).await);
        assert!(!talk(server_config(&ours, Role::Agent).unwrap(), client_config(&theirs, Role::Peer).unwrap()).await);
    }

    #[tokio::test]
    async fn a_failed_handshake_holds_up_no_other() {
        let ours = token("agent-channel-token-0123456789");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming =
            accept(tonic::transport::server::TcpIncoming::from(listener), server_config(&ours, Role::Agent).unwrap());
        let mut incoming = std::pin::pin!(incoming);
        // The controller connects but has not said hello yet...
        let controller = TcpStream::connect(addr).await.unwrap();
        // ...when a plain-text client's handshake fails.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let name = ServerName::try_from(Role::Agent.name()).unwrap();
        let connector = TlsConnector::from(client_config(&ours, Role::Controller).unwrap());
        let (connected, served) = tokio::join!(
            connector.connect(name, controller),
            tokio::time::timeout(Duration::from_secs(5), incoming.next())
        );
        connected.unwrap();
        assert!(matches!(served, Ok(Some(Ok(_)))), "the controller's connection is served");
    }

    #[test]
    fn leaves_are_renewed_before_they_expire() {
        let authority = Arc::new(Authority::derive(&token("agent-channel-token-0123456789")).unwrap());
        let leaf = Leaf::new(authority, Role::Agent).unwrap();
        let first = leaf.get();
        assert!(Arc::ptr_eq(&first, &leaf.get()), "a young leaf is kept");
        // Backdate it past the renewal age: the next handshake gets a new one.
        leaf.current.lock().unwrap().0 = Instant::now().checked_sub(RENEW_AFTER).unwrap();
        let renewed = leaf.get();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_ne!(first.cert[0], renewed.cert[0]);
        assert!(RENEW_AFTER < LEAF_LIFETIME / 2, "a leaf is renewed long before it expires");
    }
}
