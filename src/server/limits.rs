//! Bounds on the agent's TCP endpoint, so that whoever can reach its port
//! (any pod, before authenticating) cannot take the node's descriptors or
//! starve the kubelet's Unix socket.
//!
//! [`Admitted`] accepts TCP connections and admits at most
//! [`Limits::max_connections`] at once, and [`Limits::max_per_peer`] from one
//! IP address; others are closed at once (logged at most every
//! [`REFUSAL_LOG_EVERY`]). Each admitted connection is a [`Guarded`] stream:
//! it is closed when its peer has not sent the HTTP/2 preface and a complete
//! first header block within [`Limits::handshake_timeout`] (a silent socket,
//! or a slowloris trickling bytes), and when no byte has moved either way for
//! [`Limits::idle_timeout`]. Accept errors (EMFILE included) never end the
//! server: they are logged and retried after a pause.
//!
//! [`raise_nofile_limit`] lifts the soft descriptor limit to the hard one at
//! start-up, and [`Limits::reserving_descriptors`] keeps the TCP side below
//! it by [`RESERVED_DESCRIPTORS`], so the Unix socket, the store and the loop
//! devices always have descriptors left.
//!
//! The handshake deadline reads HTTP/2 framing when the stream is plain, and
//! TLS record headers when it is TLS terminated further in (tonic's own TLS):
//! then a request is the first application data after the client's Finished.
//! Wrapped inside a TLS layer instead, it sees plain HTTP/2 again.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Descriptors kept for everything but agent connections: the kubelet's
/// socket and its clients, records, images, loop devices, mkfs pipes.
pub const RESERVED_DESCRIPTORS: u64 = 256;
/// At most one warning per this long about refused connections or accept errors.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long accepting pauses after an error such as EMFILE, which would
/// otherwise repeat at once.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How many connections the agent endpoint holds and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_per_peer: usize,
    /// Time from accept to the peer's first complete request headers.
    pub handshake_timeout: Duration,
    /// Time with no byte read or written before a connection is closed; must
    /// exceed the longest call (the controller's `--agent-timeout`).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_per_peer: 32,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl Limits {
    /// These limits with `max_connections` lowered, if need be, to leave
    /// [`RESERVED_DESCRIPTORS`] of `nofile` (the soft RLIMIT_NOFILE) free.
    pub fn reserving_descriptors(self, nofile: u64) -> Limits {
        let room = usize::try_from(nofile.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX).max(1);
        if self.max_connections > room {
            tracing::warn!(
                configured = self.max_connections,
                allowed = room,
                nofile,
                "the agent endpoint's connection limit leaves too few descriptors; lowered (raise the hard \
                 RLIMIT_NOFILE, e.g. LimitNOFILE= or the container runtime's ulimit, to allow more)"
            );
        }
        Limits { max_connections: self.max_connections.min(room), ..self }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Who holds how many connections.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// A warning that is written at most every [`REFUSAL_LOG_EVERY`], saying how
/// many times it happened in between.
#[derive(Debug, Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// Whether to log now, and how many occurrences this log stands for.
    fn occurred(&mut self) -> Option<u64> {
        self.suppressed += 1;
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The agent's accepted connections, within [`Limits`]; a stream for
/// tonic's `serve_with_incoming`. It never yields an error.
#[derive(Debug)]
pub struct Admitted {
    listener: TcpListener,
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
    refusals: RateLimited,
    accept_errors: RateLimited,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Admitted {
    /// Admits connections accepted on `listener` within `limits`.
    pub fn new(listener: TcpListener, limits: Limits) -> Self {
        Admitted {
            listener,
            limits,
            counts: Arc::default(),
            refusals: RateLimited::default(),
            accept_errors: RateLimited::default(),
            pause: None,
        }
    }

    /// Counts a connection from `peer` in, unless that would exceed a limit.
    fn admit(&self, peer: IpAddr) -> Result<Permit, &'static str> {
        let mut counts = self.counts.lock().expect("connection counts");
        if counts.total >= self.limits.max_connections {
            return Err("the agent endpoint's connection limit");
        }
        let from_peer = counts.per_peer.entry(peer).or_default();
        if *from_peer >= self.limits.max_per_peer {
            return Err("the per-address connection limit");
        }
        *from_peer += 1;
        counts.total += 1;
        Ok(Permit { peer, counts: self.counts.clone() })
    }
}

impl Stream for Admitted {
    type Item = io::Result<Guarded<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = &mut this.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            let (stream, addr) = match std::task::ready!(this.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                Err(e) => {
                    if let Some(times) = this.accept_errors.occurred() {
                        tracing::warn!(error = %e, times, "accepting on the agent endpoint failed; retrying");
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                    continue;
                }
            };
            let peer = addr.ip().to_canonical();
            match this.admit(peer) {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(Some(Ok(Guarded::new(stream, permit, this.limits))));
                }
                Err(limit) => {
                    if let Some(times) = this.refusals.occurred() {
                        tracing::warn!(%peer, times, limit, "agent connections refused: over {limit}");
                    }
                    drop(stream);
                }
            }
        }
    }
}

/// One admitted connection's place in the counts, given back when it closes.
#[derive(Debug)]
struct Permit {
    peer: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.total -= 1;
        if let Some(n) = counts.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

/// An admitted connection that closes itself when its peer is too slow to
/// start or goes quiet.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    _permit: Permit,
    idle_timeout: Duration,
    /// Until the first request's headers are in: how far the peer got.
    handshake: Option<Handshake>,
    /// When the connection is closed: the handshake deadline, then the idle one.
    deadline: Pin<Box<Sleep>>,
}

impl<S> Guarded<S> {
    fn new(inner: S, permit: Permit, limits: Limits) -> Self {
        Guarded {
            inner,
            _permit: permit,
            idle_timeout: limits.idle_timeout,
            handshake: Some(Handshake::default()),
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
        }
    }

    /// Moves the idle deadline, once the handshake is done.
    fn active(&mut self) {
        if self.handshake.is_none() {
            self.deadline.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
        }
    }

    /// Fails once the current deadline has passed.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(()) if self.handshake.is_some() => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "agent connection closed: no complete request headers within the handshake timeout",
            )),
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::TimedOut, "agent connection closed: idle")),
        }
    }
}

impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.check_deadline(cx)?;
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            if let Some(handshake) = &mut this.handshake
                && handshake.feed(read)
            {
                this.handshake = None;
            }
            this.active();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.check_deadline(cx)?;
        let written = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if written > 0 {
            this.active();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
/// TLS record types (RFC 8446 §5.1) and the record header's length.
const CHANGE_CIPHER_SPEC: u8 = 20;
const TLS_HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const RECORD_HEADER_LEN: usize = 5;

/// How far a client is into its handshake, told by its first byte: plain
/// HTTP/2, or TLS (when TLS is terminated inside the server, after this
/// guard, it sees only records).
#[derive(Debug, Default)]
enum Handshake {
    #[default]
    Unknown,
    Http2(Http2Handshake),
    Tls(TlsHandshake),
}

impl Handshake {
    /// Takes bytes the peer sent; true once it has made a request.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        if let (Handshake::Unknown, Some(&first)) = (&*self, bytes.first()) {
            *self = if first == TLS_HANDSHAKE {
                Handshake::Tls(TlsHandshake::default())
            } else {
                Handshake::Http2(Http2Handshake::default())
            };
        }
        match self {
            Handshake::Unknown => false,
            Handshake::Http2(h) => h.feed(bytes),
            Handshake::Tls(t) => t.feed(bytes),
        }
    }
}

/// Plain HTTP/2: the preface, then frames until the first header block ends
/// (HEADERS or CONTINUATION with END_HEADERS). A wrong preface is left for h2
/// to refuse.
#[derive(Debug, Default)]
struct Http2Handshake {
    preface_seen: usize,
    /// The current frame's header, while incomplete.
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come, and whether the
    /// frame ends a header block.
    payload_left: usize,
    ends_block: bool,
}

impl Http2Handshake {
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.preface_seen < PREFACE.len() {
                let n = (PREFACE.len() - self.preface_seen).min(bytes.len());
                self.preface_seen += n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER_LEN - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.header.len() < FRAME_HEADER_LEN {
                    return false;
                }
                let h = std::mem::take(&mut self.header);
                self.payload_left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.ends_block = (h[3] == HEADERS || h[3] == CONTINUATION) && h[4] & END_HEADERS != 0;
            }
            if self.ends_block && self.payload_left == 0 && self.header.is_empty() {
                return true;
            }
        }
        false
    }
}

/// TLS, whose content is not readable here: done once a whole
/// application-data record has come after the client's Finished, i.e. the
/// TLS handshake is over and the client has sent data (the HTTP/2 preface).
/// The client's Finished is the first application-data record in TLS 1.3,
/// and the handshake record after ChangeCipherSpec in TLS 1.2.
#[derive(Debug, Default)]
struct TlsHandshake {
    header: Vec<u8>,
    payload_left: usize,
    record_type: u8,
    cipher_changed: bool,
    finished: bool,
}

impl TlsHandshake {
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.header.len() < RECORD_HEADER_LEN {
                let n = (RECORD_HEADER_LEN - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.header.len() < RECORD_HEADER_LEN {
                    return false;
                }
                self.record_type = self.header[0];
                self.payload_left = usize::from(self.header[3]) << 8 | usize::from(self.header[4]);
            }
            let n = self.payload_left.min(bytes.len());
            self.payload_left -= n;
            bytes = &bytes[n..];
            if self.payload_left == 0 {
                self.header.clear();
                match self.record_type {
                    CHANGE_CIPHER_SPEC => self.cipher_changed = true,
                    TLS_HANDSHAKE if self.cipher_changed => self.finished = true,
                    APPLICATION_DATA if self.finished => return true,
                    APPLICATION_DATA => self.finished = true,
                    _ => {}
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        [&[len[1], len[2], len[3], kind, flags, 0, 0, 0, 1][..], payload].concat()
    }

    #[test]
    fn the_handshake_ends_with_the_first_complete_header_block() {
        let settings = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]);
        let open = frame(HEADERS, 0, &[1, 2, 3]);
        let end = frame(CONTINUATION, END_HEADERS, &[4, 5]);
        let whole = [PREFACE, &settings, &open, &end].concat();
        for step in [1, 2, 9, 10, whole.len()] {
            let mut handshake = Handshake::default();
            let done: Vec<bool> = whole.chunks(step).map(|piece| handshake.feed(piece)).collect();
            assert_eq!(done.iter().filter(|d| **d).count(), 1, "step {step}");
            assert!(done.last().unwrap(), "step {step}: done only with the last byte");
        }
        // Everything but the last byte: not done.
        assert!(!Handshake::default().feed(&whole[..whole.len() - 1]));
        // An empty HEADERS frame with END_HEADERS completes too.
        assert!(Handshake::default().feed(&[PREFACE, &frame(HEADERS, END_HEADERS, &[])].concat()));
        // Frames other than header blocks never do.
        let pings: Vec<u8> = (0..100).flat_map(|_| frame(0x6, 0, &[0; 8])).collect();
        assert!(!Handshake::default().feed(&[PREFACE, &pings].concat()));
    }

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let len = u16::try_from(len).unwrap().to_be_bytes();
        [&[kind, 3, 3, len[0], len[1]][..], &vec![0xaa; usize::from(u16::from_be_bytes(len))]].concat()
    }

    #[test]
    fn under_tls_the_handshake_ends_with_data_after_finished() {
        let hello = record(TLS_HANDSHAKE, 300);
        let ccs = record(CHANGE_CIPHER_SPEC, 1);
        // TLS 1.3 (with and without the compatibility ChangeCipherSpec): Finished
        // travels as application data, the request after it.
        let tls13 = [&hello[..], &ccs, &record(APPLICATION_DATA, 53), &record(APPLICATION_DATA, 120)].concat();
        let tls13_bare = [&hello[..], &record(APPLICATION_DATA, 53), &record(APPLICATION_DATA, 120)].concat();
        // TLS 1.2: Finished is the handshake record after ChangeCipherSpec.
        let tls12 =
            [&hello[..], &record(TLS_HANDSHAKE, 70), &ccs, &record(TLS_HANDSHAKE, 40), &record(APPLICATION_DATA, 90)]
                .concat();
        for whole in [tls13, tls13_bare, tls12] {
            for step in [1, 4, 5, 6, whole.len()] {
                let mut handshake = Handshake::default();
                let done: Vec<bool> = whole.chunks(step).map(|piece| handshake.feed(piece)).collect();
                assert!(*done.last().unwrap() && done.iter().filter(|d| **d).count() == 1, "step {step}");
            }
            assert!(!Handshake::default().feed(&whole[..whole.len() - 1]));
        }
        // A client that stops after Finished has made no request.
        assert!(!Handshake::default().feed(&[&hello[..], &ccs, &record(APPLICATION_DATA, 53)].concat()));
    }

    #[test]
    fn caps_count_per_address_and_in_total_and_are_given_back() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let limits = Limits { max_connections: 3, max_per_peer: 2, ..Limits::default() };
            let admitted = Admitted::new(listener, limits);
            let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
            let a1 = admitted.admit(a).unwrap();
            let _a2 = admitted.admit(a).unwrap();
            assert!(admitted.admit(a).is_err(), "a third from one address");
            let _b1 = admitted.admit(b).unwrap();
            assert!(admitted.admit("10.0.0.3".parse().unwrap()).is_err(), "a fourth in total");
            drop(a1);
            let _a3 = admitted.admit(a).unwrap();
            // IPv4-mapped IPv6 is the same peer.
            let mapped: IpAddr = "::ffff:10.0.0.1".parse::<IpAddr>().unwrap().to_canonical();
            assert_eq!(mapped, a);
        });
    }

    #[test]
    fn descriptors_are_reserved() {
        let limits = Limits { max_connections: 10_000, ..Limits::default() };
        assert_eq!(
            limits.reserving_descriptors(1024).max_connections,
            1024 - usize::try_from(RESERVED_DESCRIPTORS).unwrap()
        );
        assert_eq!(limits.reserving_descriptors(1 << 20).max_connections, 10_000);
        assert_eq!(limits.reserving_descriptors(10).max_connections, 1);
    }
}
