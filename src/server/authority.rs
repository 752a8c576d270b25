//! Lets gRPC clients other than grpc-go reach the Unix socket: their
//! `:authority` for a socket path is not a valid URI authority, and the
//! HTTP/2 layer (h2, under tonic and hyper) resets every such request with
//! PROTOCOL_ERROR before any handler runs (hyperium/h2#487, open, and no
//! option to relax it in h2 0.4.20, hyper 1.12 or tonic 0.14).
//!
//! grpc C-core (Python, C++, Ruby, PHP) sends the percent-encoded path
//! (`tmp%2Fcsi.sock`), grpc-java and grpc-swift the raw one (`/run/csi.sock`).
//! On a Unix socket the authority names nothing (there are no virtual hosts),
//! so [`FixAuthority`] sits between the accepted connection and h2 and
//! replaces an invalid `:authority` with `localhost`, the value grpc-go sends.
//!
//! Doing that means rewriting HPACK-compressed header blocks: every header
//! block the client sends is decoded, with the client's dynamic table tracked
//! across blocks (so it must see all of them), and re-encoded as literals
//! without indexing, so h2's decoder table stays empty and can never disagree
//! with ours. Padding is dropped, priority fields and END_STREAM are kept,
//! and a block split over CONTINUATION frames is reassembled and re-split at
//! 16,384 bytes, the frame size every HTTP/2 peer accepts. Every other frame
//! passes through untouched, byte for byte, as it arrives.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4), passed through as is.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
/// Frame types (RFC 9113 §6) and the flags of a HEADERS frame.
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;
/// The largest frame payload every HTTP/2 endpoint must accept.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The HPACK table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE's default);
/// a client asking for more is refused by h2 too.
const HEADER_TABLE_SIZE: usize = 4_096;
/// A header block larger than this closes the connection; it is far above
/// what h2 accepts (16 KiB of headers), so h2 still refuses everything between.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// What an invalid `:authority` becomes.
const LOCALHOST: &[u8] = b"localhost";

/// An accepted connection whose inbound header blocks carry a valid
/// `:authority` (or none), whatever the client sent.
#[derive(Debug)]
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to h2, and how many of them it has.
    ready: Vec<u8>,
    handed: usize,
}

impl<S> FixAuthority<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> Self {
        FixAuthority { inner, rewriter: Rewriter::new(), ready: Vec::new(), handed: 0 }
    }
}

impl<S: Connected> Connected for FixAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.handed < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.handed);
                buf.put_slice(&this.ready[this.handed..this.handed + n]);
                this.handed += n;
                return Poll::Ready(Ok(()));
            }
            this.ready.clear();
            this.handed = 0;
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.rewriter.feed(read.filled(), &mut this.ready)?,
                other => return other,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the inbound byte stream is.
#[derive(Debug)]
enum Position {
    /// Inside the connection preface, this many bytes in.
    Preface(usize),
    /// At a frame boundary (or inside a frame header, buffered in `pending`).
    FrameStart,
    /// Inside a frame that passes through untouched; this many payload bytes left.
    PassThrough(usize),
}

/// A header block whose HEADERS frame has arrived but whose END_HEADERS has not.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
}

/// The inbound half of the rewrite, without I/O: bytes in, bytes for h2 out.
struct Rewriter {
    position: Position,
    /// A frame header, or a whole HEADERS/CONTINUATION frame, not yet complete.
    pending: Vec<u8>,
    block: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter").field("position", &self.position).field("block", &self.block).finish()
    }
}

/// The connection is not HTTP/2 that h2 would accept either; closing it is
/// what h2 would do.
fn broken(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 client sent {}", what.into()))
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter { position: Position::Preface(0), pending: Vec::new(), block: None, decoder }
    }

    /// Consumes `input`, appending what h2 should read to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        while !input.is_empty() {
            match self.position {
                Position::Preface(seen) => {
                    let n = (PREFACE_LEN - seen).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.position =
                        if seen + n == PREFACE_LEN { Position::FrameStart } else { Position::Preface(seen + n) };
                }
                Position::PassThrough(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.position = if n == left { Position::FrameStart } else { Position::PassThrough(left - n) };
                }
                Position::FrameStart => {
                    // Buffer the frame header, then (for header frames) the payload.
                    let want = self.frame_bytes_wanted()?;
                    let n = (want - self.pending.len()).min(input.len());
                    self.pending.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    // A complete header may reveal a payload still to buffer.
                    if self.pending.len() == self.frame_bytes_wanted()? {
                        self.frame_complete(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How many bytes of the current frame must be buffered before it can be
    /// handled: its header, and the whole of a HEADERS or CONTINUATION frame.
    fn frame_bytes_wanted(&self) -> io::Result<usize> {
        if self.pending.len() < FRAME_HEADER_LEN {
            return Ok(FRAME_HEADER_LEN);
        }
        let (len, kind) = (frame_len(&self.pending), self.pending[3]);
        if kind == HEADERS || kind == CONTINUATION {
            let buffered = self.block.as_ref().map_or(0, |b| b.fragment.len());
            if buffered + len > MAX_HEADER_BLOCK {
                return Err(broken(format!("a header block over {MAX_HEADER_BLOCK} bytes")));
            }
            Ok(FRAME_HEADER_LEN + len)
        } else {
            Ok(FRAME_HEADER_LEN)
        }
    }

    /// Handles a frame whose header (and, for header frames, payload) is in
    /// `pending`.
    fn frame_complete(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let header: [u8; FRAME_HEADER_LEN] = self.pending[..FRAME_HEADER_LEN].try_into().expect("frame header");
        let (len, kind, flags) = (frame_len(&header), header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        if let Some(open) = &self.block
            && (kind != CONTINUATION || stream != open.stream)
        {
            return Err(broken(format!("a frame of type {kind} inside the header block of stream {}", open.stream)));
        }
        match kind {
            HEADERS => {
                let payload = &self.pending[FRAME_HEADER_LEN..];
                let (priority, fragment) = headers_payload(payload, flags)?;
                self.block = Some(OpenBlock {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                });
            }
            CONTINUATION => {
                let Some(open) = &mut self.block else {
                    return Err(broken("a CONTINUATION frame outside a header block"));
                };
                open.fragment.extend_from_slice(&self.pending[FRAME_HEADER_LEN..]);
            }
            _ => {
                out.extend_from_slice(&header);
                self.pending.clear();
                self.position = if len == 0 { Position::FrameStart } else { Position::PassThrough(len) };
                return Ok(());
            }
        }
        self.pending.clear();
        if flags & END_HEADERS != 0 {
            let open = self.block.take().expect("a header block is open");
            self.emit(open, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block and writes it out again as HEADERS
    /// and CONTINUATION frames, with a valid `:authority`.
    fn emit(&mut self, open: OpenBlock, out: &mut Vec<u8>) -> io::Result<()> {
        let mut block = Vec::with_capacity(open.fragment.len() + 64);
        self.decoder
            .decode_with_cb(&open.fragment, |name, value| {
                let value = if &*name == b":authority" && !valid_authority(&value) { LOCALHOST } else { &value };
                encode_literal(&name, value, &mut block);
            })
            .map_err(|e| broken(format!("a header block HPACK cannot decode: {e:?}")))?;
        let mut first = Vec::with_capacity(PRIORITY_LEN);
        let mut flags = if open.end_stream { END_STREAM } else { 0 };
        if let Some(priority) = open.priority {
            first.extend_from_slice(&priority);
            flags |= PRIORITY;
        }
        let mut rest: &[u8] = &block;
        let mut kind = HEADERS;
        loop {
            let room = MIN_MAX_FRAME_SIZE - first.len();
            let (chunk, after) = rest.split_at(room.min(rest.len()));
            let end = if after.is_empty() { END_HEADERS } else { 0 };
            write_frame_header(out, first.len() + chunk.len(), kind, flags | end, open.stream);
            out.extend_from_slice(&first);
            out.extend_from_slice(chunk);
            if after.is_empty() {
                return Ok(());
            }
            (rest, kind, flags) = (after, CONTINUATION, 0);
            first.clear();
        }
    }
}

/// Whether h2 accepts `value` as an `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A frame's payload length, from its 9-byte header.
fn frame_len(header: &[u8]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// Splits a HEADERS payload into its priority fields and its header block
/// fragment, without the padding.
fn headers_payload(payload: &[u8], flags: u8) -> io::Result<(Option<[u8; PRIORITY_LEN]>, &[u8])> {
    let mut body = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&pad, after) = body.split_first().ok_or_else(|| broken("a PADDED HEADERS frame without a pad length"))?;
        (padding, body) = (usize::from(pad), after);
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if body.len() < PRIORITY_LEN {
            return Err(broken("a HEADERS frame too short for its priority fields"));
        }
        let (fields, after) = body.split_at(PRIORITY_LEN);
        (priority, body) = (Some(fields.try_into().expect("five bytes")), after);
    }
    if padding > body.len() {
        return Err(broken("a HEADERS frame with more padding than payload"));
    }
    Ok((priority, &body[..body.len() - padding]))
}

/// Writes a 9-byte frame header.
fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).expect("frame length below 2^24").to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// HPACK "literal header field without indexing, new name", strings not
/// Huffman-coded (RFC 7541 §6.2.2): it never touches the dynamic table.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_string(name, out);
    encode_string(value, out);
}

/// An HPACK string literal: its length as a 7-bit-prefix integer, then the bytes.
fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    // Every byte pushed holds a value below 0x80: the low byte is all of it.
    let low = |n: usize| n.to_le_bytes()[0];
    let mut len = bytes.len();
    if len < 0x7f {
        out.push(low(len));
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push(low(len & 0x7f) | 0x80);
            len >>= 7;
        }
        out.push(low(len));
    }
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    /// Splits what the rewriter produced into frames (after the preface).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        bytes = &bytes[PREFACE_LEN..];
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len = frame_len(bytes);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            frames.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        frames
    }

    /// Feeds `input` in pieces of `step` bytes.
    fn rewrite(input: &[u8], step: usize) -> Vec<u8> {
        let (mut rewriter, mut out) = (Rewriter::new(), Vec::new());
        for piece in input.chunks(step) {
            rewriter.feed(piece, &mut out).unwrap();
        }
        out
    }

    fn decode(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> Vec<(String, String)> {
        let headers = decoder.decode(block).unwrap();
        headers.into_iter().map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())).collect()
    }

    fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Identity/Probe".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
        ]
    }

    #[test]
    fn socket_path_authorities_become_localhost_and_valid_ones_stay() {
        // Two requests from one encoder: the second refers to the first's
        // dynamic table entries, so the decoder state must carry over.
        let mut encoder = loona_hpack::Encoder::new();
        let first = encoder.encode(request("tmp%2Fcsi.sock").iter().map(|(n, v)| (&n[..], &v[..])));
        let second = encoder.encode(request("/run/csi.sock").iter().map(|(n, v)| (&n[..], &v[..])));
        let third = encoder.encode(request("csi.example:443").iter().map(|(n, v)| (&n[..], &v[..])));
        let data = frame(0x0, 0x1, 1, b"\0\0\0\0\0");
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(&data);
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &third));
        for step in [1, 7, input.len()] {
            let out = frames(&rewrite(&input, step));
            assert_eq!(out.len(), 4);
            assert_eq!((out[1].0, out[1].1, out[1].2, &out[1].3[..]), (0x0, 0x1, 1, &data[9..]));
            let mut decoder = loona_hpack::Decoder::new();
            let authorities: Vec<_> = [&out[0], &out[2], &out[3]]
                .iter()
                .map(|f| {
                    let headers = decode(&mut decoder, &f.3);
                    assert_eq!(headers[2], (":path".into(), "/csi.v1.Identity/Probe".into()));
                    headers.into_iter().find(|(n, _)| n == ":authority").unwrap().1
                })
                .collect();
            assert_eq!(authorities, ["localhost", "localhost", "csi.example:443"]);
            assert_eq!((out[0].1, out[2].1), (END_HEADERS, END_HEADERS | END_STREAM));
        }
    }

    #[test]
    fn padding_priority_and_continuation_frames_are_understood() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut headers = request("/run/csi.sock");
        // A header too large for one frame, so the rewritten block is split too.
        headers.push((b"x-big", vec![b'a'; 40_000]));
        let block = encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut payload = vec![3u8];
        payload.extend([0x80, 0, 0, 0, 15]);
        payload.extend(a);
        payload.extend([0u8; 3]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 7, &payload));
        input.extend(frame(CONTINUATION, 0, 7, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 7, c));
        let out = frames(&rewrite(&input, 1000));
        assert!(out.len() >= 3, "a 40 kB block needs continuation frames");
        assert_eq!(out[0].0, HEADERS);
        assert_eq!(out[0].1, PRIORITY | END_STREAM);
        assert_eq!(&out[0].3[..PRIORITY_LEN], &[0x80, 0, 0, 0, 15]);
        assert!(out[1..].iter().all(|f| f.0 == CONTINUATION && f.2 == 7));
        assert!(out.iter().all(|f| f.3.len() <= MIN_MAX_FRAME_SIZE));
        assert_eq!(out.last().unwrap().1, END_HEADERS);
        let mut joined = out[0].3[PRIORITY_LEN..].to_vec();
        out[1..].iter().for_each(|f| joined.extend(&f.3));
        let decoded = decode(&mut loona_hpack::Decoder::new(), &joined);
        assert_eq!(decoded[3], (":authority".into(), "localhost".into()));
        assert_eq!(decoded[5].1.len(), 40_000);
    }

    #[test]
    fn broken_framing_closes_the_connection() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(request("x").iter().map(|(n, v)| (&n[..], &v[..])));
        let cases = [
            // A frame of another stream inside an open header block.
            [frame(HEADERS, 0, 1, &block), frame(CONTINUATION, END_HEADERS, 3, &[])].concat(),
            // A CONTINUATION with no HEADERS before it.
            frame(CONTINUATION, END_HEADERS, 1, &block),
            // More padding than payload.
            frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2]),
            // Not HPACK.
            frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ];
        for case in cases {
            let mut rewriter = Rewriter::new();
            let input = [PREFACE, &case[..]].concat();
            assert!(rewriter.feed(&input, &mut Vec::new()).is_err(), "{case:?}");
        }
    }

    #[test]
    fn long_strings_get_multi_byte_lengths() {
        for len in [0, 126, 127, 128, 300, 20_000] {
            let mut block = Vec::new();
            encode_literal(b"k", &vec![b'v'; len], &mut block);
            let decoded = loona_hpack::Decoder::new().decode(&block).unwrap();
            assert_eq!(decoded, [(b"k".to_vec(), vec![b'v'; len])]);
        }
    }
}
