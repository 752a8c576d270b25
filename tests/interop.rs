//! gRPC clients other than grpc-go on the Unix socket. Each names the socket
//! in `:authority` its own way, none of them a valid URI authority: grpc-java
//! and grpc-swift send the raw path, grpc C-core (Python, C++, Ruby, PHP) the
//! percent-encoded one. tonic's own client cannot send either (its URIs are
//! checked), so this test speaks HTTP/2 itself. The real C-core client runs
//! in scripts/interop.sh.

mod common;

use std::time::Duration;

use common::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// How the server answered one unary call.
enum Answer {
    /// Response headers and trailers (decoded), and the response message bytes.
    Replied { headers: Vec<(String, String)>, message: Vec<u8> },
    /// The stream was reset with this HTTP/2 error code.
    Reset(u32),
    /// The connection was closed with this HTTP/2 error code.
    GoAway(u32),
}

/// Calls `method` with an empty request message on stream 1, naming the
/// socket `authority`, and reads until the call ends.
async fn call(socket: &std::path::Path, authority: &str, method: &str) -> Answer {
    let mut conn = UnixStream::connect(socket).await.expect("connect");
    let mut encoder = loona_hpack::Encoder::new();
    let request: [(&[u8], &[u8]); 6] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", method.as_bytes()),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &encoder.encode(request)));
    // An empty protobuf message: not compressed, length 0.
    out.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    conn.write_all(&out).await.expect("send request");

    let mut decoder = loona_hpack::Decoder::new();
    let (mut headers, mut message) = (Vec::new(), Vec::new());
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.expect("read a frame header");
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.expect("read a frame payload");
        let code = || u32::from_be_bytes(payload[..4].try_into().unwrap());
        match kind {
            SETTINGS if flags & ACK == 0 => conn.write_all(&frame(SETTINGS, ACK, 0, &[])).await.expect("ack"),
            HEADERS => {
                assert_ne!(flags & END_HEADERS, 0, "the server splits no header block this small");
                for (n, v) in decoder.decode(&payload).expect("HPACK from the server") {
                    headers.push((String::from_utf8(n).unwrap(), String::from_utf8_lossy(&v).into_owned()));
                }
            }
            DATA => message.extend_from_slice(&payload),
            RST_STREAM => return Answer::Reset(code()),
            GOAWAY => return Answer::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            _ => {}
        }
        if flags & END_STREAM != 0 && (kind == HEADERS || kind == DATA) {
            return Answer::Replied { headers, message };
        }
    }
}

#[tokio::test]
async fn socket_paths_as_authority_are_served() {
    let h = Harness::start().await;
    let socket = h.dir.path().join("csi.sock");
    let raw = socket.to_str().unwrap().to_owned();
    let c_core = raw.trim_start_matches('/').replace('/', "%2F");
    for authority in [raw.as_str(), c_core.as_str(), "localhost"] {
        let answer =
            tokio::time::timeout(Duration::from_secs(60), call(&socket, authority, "/csi.v1.Identity/GetPluginInfo"))
                .await
                .expect("an answer within a minute");
        let (headers, message) = match answer {
            Answer::Replied { headers, message } => (headers, message),
            Answer::Reset(code) => panic!(":authority {authority:?}: stream reset, HTTP/2 error {code}"),
            Answer::GoAway(code) => panic!(":authority {authority:?}: connection closed, HTTP/2 error {code}"),
        };
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(header(":status"), Some("200"), "{authority:?}: {headers:?}");
        assert_eq!(header("grpc-status"), Some("0"), "{authority:?}: {headers:?}");
        let name = b"loam.csi.dev";
        assert!(message.windows(name.len()).any(|w| w == name), "{authority:?}: {message:?}");
    }
}
