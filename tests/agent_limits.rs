//! The agent's TCP endpoint against callers that hold connections without
//! using them: a real `loam serve --mode node` process, driven from outside.
//! Nothing here asserts how fast anything is; every wait has a generous bound.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use loam::auth::{SendToken, Token};
use loam::csi;
use loam::csi::identity_client::IdentityClient;
use loam::tls::{self, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

const TOKEN: &str = "agent-limits-test-token-0123456789";
/// Bound on any single wait: far above what each step takes.
const PATIENCE: Duration = Duration::from_secs(60);

/// A `loam serve --mode node` process, killed and reaped on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Agent {
    /// Starts an agent on 127.0.0.1 with `flags`; `nofile` caps its
    /// descriptors (soft and hard), as a tight container would.
    async fn start(flags: &[&str], nofile: Option<u64>) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token"), TOKEN).expect("token file");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_loam"));
        command
            .args(["serve", "--mode=node", "--node-id=limits-node", "--agent-listen=127.0.0.1:0"])
            .arg(format!("--endpoint=unix://{}", dir.path().join("csi.sock").display()))
            .arg(format!("--root={}", dir.path().join("root").display()))
            .arg(format!("--agent-token-file={}", dir.path().join("token").display()))
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(limit) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = command.spawn().expect("start loam serve");
        let mut agent = Agent { child, dir, addr: SocketAddr::from(([0, 0, 0, 0], 0)) };
        agent.addr = agent.wait_for_listening().await;
        agent
    }

    /// Reads the agent's address from its log once both endpoints are up.
    async fn wait_for_listening(&mut self) -> SocketAddr {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            let addr = log.lines().find(|l| l.contains("agent endpoint listening")).and_then(|line| {
                let start = line.find("addr=")? + "addr=".len();
                line[start..].split_whitespace().next()?.parse().ok()
            });
            if let Some(addr) = addr
                && self.socket().exists()
            {
                return addr;
            }
            if let Some(status) = self.child.try_wait().expect("poll loam serve") {
                panic!("loam serve exited ({status}):\n{log}");
            }
            assert!(tokio::time::Instant::now() < deadline, "loam serve did not come up:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Probe over the kubelet's Unix socket, on a fresh connection.
async fn probe_unix(socket: &Path) -> Result<(), String> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    IdentityClient::new(channel).probe(csi::ProbeRequest {}).await.map(drop).map_err(|e| e.to_string())
}

/// A TCP connection to the agent from `source` (an address on the loopback
/// network, so tests can play several peers).
async fn connect_from(agent: SocketAddr, source: [u8; 4]) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(agent).await
}

/// A connection to the agent from `source` that completed the TLS handshake
/// as the controller does.
async fn tls_from(agent: SocketAddr, source: [u8; 4]) -> std::io::Result<TlsStream<TcpStream>> {
    let config = tls::client_config(&Token::parse(TOKEN).unwrap(), Role::Controller).map_err(std::io::Error::other)?;
    tls::connect(TlsConnector::from(config), connect_from(agent, source).await?).await
}

/// A channel to the agent whose connections come from `source`.
async fn agent_channel(agent: SocketAddr, source: [u8; 4]) -> Result<Channel, String> {
    Endpoint::try_from("http://agent.test:1")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| async move {
            Ok::<_, std::io::Error>(TokioIo::new(tls_from(agent, source).await?))
        }))
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// An authenticated Probe to the agent from `source`.
async fn probe_agent(agent: SocketAddr, source: [u8; 4]) -> Result<(), String> {
    let channel = agent_channel(agent, source).await?;
    let token = Token::parse(TOKEN).unwrap();
    let mut identity = IdentityClient::with_interceptor(channel, SendToken::new(&token));
    identity.probe(csi::ProbeRequest {}).await.map(drop).map_err(|e| e.to_string())
}

/// Retries `probe` until it succeeds or [`PATIENCE`] runs out.
async fn eventually<F: Future<Output = Result<(), String>>>(what: &str, mut probe: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), probe()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) if tokio::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) if tokio::time::Instant::now() > deadline => panic!("{what}: no answer"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until the server has closed `conn` (reads return end of file or a
/// reset), reading and dropping whatever it sent before.
async fn closed_by_server(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.is_ok()
}

/// Lets this test process hold many sockets (both ends of each live here).
fn raise_own_descriptor_limit() {
    loam::server::limits::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
}

#[tokio::test]
async fn idle_connections_cannot_starve_the_kubelet_socket_and_are_closed() {
    raise_own_descriptor_limit();
    // A 1024-descriptor container; each address may take every connection,
    // so only the total (kept below the descriptor limit) protects the node.
    let flags = ["--agent-max-connections-per-peer=100000", "--agent-handshake-timeout=3"];
    let agent = Agent::start(&flags, Some(1024)).await;
    let mut idle = Vec::new();
    for _ in 0..1100 {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(agent.addr)).await {
            Ok(Ok(conn)) => idle.push(conn),
            _ => break,
        }
    }
    assert!(idle.len() > 1000, "only {} connections could be opened", idle.len());

    // The kubelet's socket still answers, while every idle connection is held.
    let probed = tokio::time::timeout(PATIENCE, probe_unix(&agent.socket())).await;
    assert!(matches!(probed, Ok(Ok(()))), "Probe on the CSI socket: {probed:?}\n{}", agent.log());

    // None of them ever sends a request: the server closes every one.
    for (i, conn) in idle.iter_mut().enumerate() {
        assert!(closed_by_server(conn).await, "idle connection {i} is still open");
    }
    drop(idle);
    eventually("an authenticated agent call after the idle connections closed", || {
        probe_agent(agent.addr, [127, 0, 0, 1])
    })
    .await;
    assert!(agent.log().contains("agent connections refused"), "refusals are logged:\n{}", agent.log());
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let flags = ["--agent-max-connections-per-peer=4", "--agent-handshake-timeout=600"];
    let agent = Agent::start(&flags, None).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(agent.addr).await.expect("connect"));
    }
    // The fifth from the same address is closed at once (the handshake
    // timeout is ten minutes, so nothing else closes it).
    let mut fifth = TcpStream::connect(agent.addr).await.expect("connect");
    assert!(closed_by_server(&mut fifth).await, "a fifth connection from one address stays open");
    // Another address is served meanwhile.
    eventually("an agent call from another address", || probe_agent(agent.addr, [127, 0, 0, 2])).await;
    // Closed connections give their places back.
    drop(held);
    eventually("an agent call once the address's connections closed", || probe_agent(agent.addr, [127, 0, 0, 1])).await;
}

#[tokio::test]
async fn slow_handshakes_and_silent_connections_are_closed() {
    let flags = ["--agent-handshake-timeout=2", "--agent-idle-timeout=3"];
    let agent = Agent::start(&flags, None).await;

    // A slowloris: a TLS handshake record a byte at a time, never a whole
    // ClientHello.
    let mut slow = TcpStream::connect(agent.addr).await.expect("connect");
    let trickle = async {
        for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc].iter().chain([0u8].iter().cycle()) {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    assert!(tokio::time::timeout(PATIENCE, trickle).await.is_ok(), "a trickling connection stays open");

    // A client that completed its TLS and HTTP/2 handshakes and its first
    // request's headers, and then says nothing more.
    let mut quiet = tls_from(agent.addr, [127, 0, 0, 1]).await.expect("TLS handshake");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS
    // HEADERS on stream 1, END_HEADERS, no END_STREAM: `:method: POST`,
    // `:scheme: http`, `:path: /` (static table entries 3, 6 and 4).
    hello.extend([0, 0, 3, 0x1, 0x4, 0, 0, 0, 1, 0x83, 0x86, 0x84]);
    quiet.write_all(&hello).await.expect("handshake");
    assert!(closed_by_server(&mut quiet).await, "a silent connection stays open");

    // Clients that keep talking are served throughout.
    probe_agent(agent.addr, [127, 0, 0, 1]).await.expect("an authenticated call");
}
