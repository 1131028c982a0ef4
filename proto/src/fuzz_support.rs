//! Property checks shared by the fuzz targets in `fuzz/` and the corpus replay test.
//!
//! Each function feeds arbitrary bytes to one parser and asserts what every parser of this
//! crate promises: it returns a value or a typed error, and a value emits back to exactly the
//! bytes it was parsed from. A violated promise panics, which is how a fuzzer or a test reports
//! it; nothing in the engine calls these functions.

use std::time::{Duration, Instant};

use crate::resync::http::HttpConnection;
use crate::resync::limits::{Limits, Refusal};
use crate::resync::tcp::TcpConnection;
use crate::resync::{Lookup, ResyncSource};
use crate::session::chunk::{encode_authenticated, finish, SignedChunk};
use crate::session::manifest::{ChunkAuth, SignedManifest};
use crate::wire::{
    self, frame::FrameRepr, heartbeat::HeartbeatRepr, nack::NackRepr, probe::ProbeReplyRepr,
    symbol::SymbolRepr, DatagramRepr,
};

/// A property check over one input.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name: the name of each target's folder under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("datagram", datagram),
    ("symbol", symbol),
    ("nack", nack),
    ("heartbeat", heartbeat),
    ("probe_reply", probe_reply),
    ("tcp_frame", tcp_frame),
    ("manifest", manifest),
    ("chunk", chunk),
    ("http_request", http_request),
    ("tcp_connection", tcp_connection),
];

fn assert_emits_input(what: &str, input: &[u8], emitted: Result<usize, wire::Error>, buf: &[u8]) {
    match emitted {
        Ok(len) => assert_eq!(&buf[..len], input, "{what}: emit differs from parsed input"),
        Err(error) => panic!("{what}: a parsed value failed to emit: {error}"),
    }
}

/// A whole datagram: [`DatagramRepr::parse`] then `emit`.
pub fn datagram(data: &[u8]) {
    if let Ok(repr) = DatagramRepr::parse(data) {
        let mut buf = vec![0u8; repr.buffer_len()];
        let emitted = repr.emit(&mut buf);
        assert_emits_input("datagram", data, emitted, &buf);
    }
}

/// A symbol body.
pub fn symbol(data: &[u8]) {
    if let Ok(repr) = SymbolRepr::parse(data) {
        let mut buf = vec![0u8; repr.buffer_len()];
        let emitted = repr.emit(&mut buf).map(|()| repr.buffer_len());
        assert_emits_input("symbol", data, emitted, &buf);
    }
}

/// A NACK body; the first input byte is the header's flags.
pub fn nack(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if let Ok(repr) = NackRepr::parse(flags, body) {
        assert_eq!(repr.flags(), flags, "nack: flags differ");
        let mut buf = vec![0u8; NackRepr::BUFFER_LEN];
        let emitted = repr.emit(&mut buf).map(|()| NackRepr::BUFFER_LEN);
        assert_emits_input("nack", body, emitted, &buf);
    }
}

/// A heartbeat body; the first input byte is the header's flags.
pub fn heartbeat(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if let Ok(repr) = HeartbeatRepr::parse(flags, body) {
        assert_eq!(repr.flags(), flags, "heartbeat: flags differ");
        let mut buf = vec![0u8; repr.buffer_len()];
        let emitted = repr.emit(&mut buf).map(|()| repr.buffer_len());
        assert_emits_input("heartbeat", body, emitted, &buf);
    }
}

/// A probe reply body.
pub fn probe_reply(data: &[u8]) {
    if let Ok(repr) = ProbeReplyRepr::parse(data) {
        let mut buf = vec![0u8; ProbeReplyRepr::BUFFER_LEN];
        let emitted = repr.emit(&mut buf).map(|()| ProbeReplyRepr::BUFFER_LEN);
        assert_emits_input("probe reply", data, emitted, &buf);
    }
}

/// A TCP resync frame: [`FrameRepr::peek_len`] must agree with [`FrameRepr::parse`].
pub fn tcp_frame(data: &[u8]) {
    let peeked = FrameRepr::peek_len(data);
    if let Ok(repr) = FrameRepr::parse(data) {
        assert_eq!(
            peeked,
            Ok(Some(data.len())),
            "tcp frame: peek_len disagrees"
        );
        let mut buf = vec![0u8; repr.buffer_len()];
        let emitted = repr.emit(&mut buf);
        assert_emits_input("tcp frame", data, emitted, &buf);
    }
}

/// A signed manifest: the parsed contents re-encode to the signed bytes, and those plus the
/// signature are the input.
pub fn manifest(data: &[u8]) {
    if let Ok(signed) = SignedManifest::parse(data) {
        match signed.manifest.signed_bytes() {
            Ok(bytes) => {
                assert_eq!(bytes, signed.signed, "manifest: re-encoding differs");
                let mut whole = bytes;
                whole.extend_from_slice(&signed.signature);
                assert_eq!(whole, data, "manifest: bytes differ");
            }
            Err(error) => panic!("manifest: a parsed manifest failed to encode: {error}"),
        }
    }
}

/// A chunk; the first input byte picks the chunk authentication (modulo 3: Merkle path,
/// signature, group signature). A parsed chunk re-encodes, with its padding, to the input.
pub fn chunk(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let auth = match mode % 3 {
        0 => ChunkAuth::MerklePath,
        1 => ChunkAuth::Signature,
        _ => ChunkAuth::GroupSignature,
    };
    if let Ok(parsed) = SignedChunk::parse(bytes, auth) {
        let encoded = encode_authenticated(&parsed.header, parsed.payload)
            .and_then(|authenticated| finish(authenticated, &parsed.authenticator, bytes.len()));
        match encoded {
            Ok(encoded) => assert_eq!(encoded, bytes, "chunk: re-encoding differs"),
            Err(error) => panic!("chunk: a parsed chunk failed to encode: {error}"),
        }
    }
}

/// The HTTP resync endpoint: arbitrary bytes, fed to one [`HttpConnection`] in pieces, never
/// panic and only ever produce whole HTTP/1.1 responses ([`parse_http_responses`]).
///
/// The first input byte steers the run: bits 0-3 the piece size (1 to 16 bytes), bit 4 whether
/// the output is drained after every piece, bit 5 a refusal at the end, bit 6 a header
/// timeout, bit 7 an idle timeout. The rest is what the client sent.
pub fn http_request(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_request_bytes: 512,
        max_headers: 8,
        max_requests_per_connection: 64,
        ..Limits::default()
    };
    let metrics = || "# TYPE rekeycast_fuzz counter\nrekeycast_fuzz 1\n".to_string();
    // Any instant will do as the origin: the time goes on only as the code advances it.
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let mut connection = HttpConnection::new(now, &limits);
    let mut written = Vec::new();
    let mut drain = |connection: &mut HttpConnection, now: Instant| {
        for _ in 0..10_000 {
            written.extend_from_slice(connection.output());
            let len = connection.output().len();
            connection.consume_output(len);
            if !connection.has_more_to_send() {
                return;
            }
            connection.handle_input(now, &[], &FuzzSource, &metrics);
        }
        panic!("http request: a resync stream does not end");
    };
    for piece in input.chunks(usize::from(control & 0x0F) + 1) {
        now += Duration::from_millis(1);
        connection.handle_input(now, piece, &FuzzSource, &metrics);
        if control & 0x10 != 0 {
            drain(&mut connection, now);
        }
    }
    if control & 0x20 != 0 {
        connection.refuse(Refusal::RateLimited);
    }
    drain(&mut connection, now);
    if control & 0x40 != 0 {
        connection.handle_timeout(now + limits.header_timeout);
        drain(&mut connection, now);
    }
    if control & 0x80 != 0 {
        connection.handle_timeout(now + limits.idle_timeout);
        drain(&mut connection, now);
    }
    if let Err(error) = parse_http_responses(&written) {
        panic!(
            "http request: malformed output ({error}): {:?}",
            String::from_utf8_lossy(&written)
        );
    }
}

/// The TCP resync endpoint: arbitrary bytes, fed to one [`TcpConnection`] in pieces, never
/// panic and only ever produce whole response frames (each parses with [`FrameRepr::parse`]
/// and is not a request), with every resync stream generated to its end.
///
/// The first input byte steers the run as for [`http_request`], with a small output cap
/// (bit 4 clear: 4 KiB, so streams are generated in several steps; set: the default).
pub fn tcp_connection(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_request_bytes: 256,
        max_requests_per_connection: 64,
        max_output_bytes: if control & 0x10 == 0 {
            4096
        } else {
            Limits::default().max_output_bytes
        },
        ..Limits::default()
    };
    let metrics = String::new;
    // Any instant will do as the origin: the time goes on only as the code advances it.
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let mut connection = TcpConnection::new(now, &limits);
    let mut written = Vec::new();
    let mut drain = |connection: &mut TcpConnection, now: Instant| {
        for _ in 0..10_000 {
            written.extend_from_slice(connection.output());
            let len = connection.output().len();
            connection.consume_output(len);
            if !connection.has_more_to_send() {
                return;
            }
            connection.handle_input(now, &[], &FuzzSource, &metrics);
        }
        panic!("tcp connection: a stream does not end");
    };
    for piece in input.chunks(usize::from(control & 0x0F) + 1) {
        now += Duration::from_millis(1);
        connection.handle_input(now, piece, &FuzzSource, &metrics);
        drain(&mut connection, now);
    }
    if control & 0x20 != 0 {
        connection.refuse(Refusal::Overloaded);
    }
    if control & 0x40 != 0 {
        now += limits.header_timeout;
        connection.handle_timeout(now);
    }
    if control & 0x80 != 0 {
        now += limits.idle_timeout;
        connection.handle_timeout(now);
    }
    drain(&mut connection, now);
    let mut rest = written.as_slice();
    while !rest.is_empty() {
        let len = match FrameRepr::peek_len(rest) {
            Ok(Some(len)) if len <= rest.len() => len,
            other => panic!("tcp connection: output is not whole frames: {other:?}"),
        };
        match FrameRepr::parse(&rest[..len]) {
            Ok(FrameRepr::ResyncRequest { .. } | FrameRepr::StateRequest { .. }) => {
                panic!("tcp connection: a request frame in the output")
            }
            Ok(_) => {}
            Err(error) => panic!("tcp connection: a frame that does not parse: {error}"),
        }
        rest = &rest[len..];
    }
}

/// One response parsed by [`parse_http_responses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for the answer to a HEAD request).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits what an endpoint wrote into HTTP/1.1 responses, each of which must start with
/// `HTTP/1.1 `, parse whole and carry a `Content-Length` whose body follows, or a chunked body
/// that is whole, or (the last one, with `Connection: close`) a body up to the end. The answer to a
/// HEAD request carries the length of a body it does not send: where the bytes after a head
/// are the next response (or nothing), the body is taken to be absent. The bodies this crate
/// serves in tests never start with `HTTP/1.1 `.
pub fn parse_http_responses(bytes: &[u8]) -> Result<Vec<HttpResponse>, String> {
    let mut responses = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if !rest.starts_with(b"HTTP/1.1 ") {
            return Err(format!(
                "response {} does not start with HTTP/1.1",
                responses.len()
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            other => return Err(format!("response {}: {other:?}", responses.len())),
        };
        let status = response.code.ok_or("no status code")?;
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let content_length = header("content-length")
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|error| format!("Content-Length: {error}"))
            })
            .transpose()?;
        rest = &rest[head_len..];
        let head_only = rest.is_empty() || rest.starts_with(b"HTTP/1.1 ");
        let body = match (chunked, content_length) {
            _ if head_only => Vec::new(),
            (true, None) => {
                let (body, len) = dechunk(rest)
                    .map_err(|error| format!("response {}: {error}", responses.len()))?;
                rest = &rest[len..];
                body
            }
            (false, Some(length)) => {
                let body = rest
                    .get(..length)
                    .ok_or_else(|| format!("response {}: body truncated", responses.len()))?;
                rest = &rest[length..];
                body.to_vec()
            }
            // Delimited by the close of the connection: only the last response may be.
            (false, None) if header("connection") == Some("close") => {
                let body = rest.to_vec();
                rest = &[];
                body
            }
            _ => return Err("no Content-Length, chunked body or close".to_string()),
        };
        responses.push(HttpResponse {
            status,
            headers,
            body,
        });
    }
    Ok(responses)
}

/// Decodes a chunked body (RFC 9112 7.1, without extensions or trailers) at the start of
/// `bytes`: the body and the length it took.
fn dechunk(bytes: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let line_end = bytes[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line truncated")?;
        let size = std::str::from_utf8(&bytes[pos..pos + line_end])
            .ok()
            .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|text| usize::from_str_radix(text, 16).ok())
            .ok_or("bad chunk size")?;
        pos += line_end + 2;
        let data = bytes.get(pos..pos + size).ok_or("chunk truncated")?;
        body.extend_from_slice(data);
        pos += size;
        if bytes.get(pos..pos + 2) != Some(b"\r\n".as_slice()) {
            return Err("chunk not followed by CRLF".to_string());
        }
        pos += 2;
        if size == 0 {
            return Ok((body, pos));
        }
    }
}

/// Messages 5 to 7 of group 1, with a chunk for leaves 0 to 3.
struct FuzzSource;

impl ResyncSource for FuzzSource {
    fn group_id(&self) -> u32 {
        1
    }

    fn latest(&self) -> Option<(u64, &[u8])> {
        Some((7, b"manifest-7"))
    }

    fn oldest(&self) -> Option<u64> {
        Some(5)
    }

    fn manifest(&self, seq: u64) -> Lookup<&[u8]> {
        match seq {
            0..=4 => Lookup::BeyondHistory { oldest: 5 },
            5 => Lookup::Found(b"manifest-5"),
            6 => Lookup::Found(b"manifest-6"),
            7 => Lookup::Found(b"manifest-7"),
            _ => Lookup::NotYetSent { latest: 7 },
        }
    }

    fn chunk(&self, seq: u64, leaf: u32) -> Lookup<&[u8]> {
        match self.manifest(seq) {
            Lookup::Found(_) if leaf < 4 => Lookup::Found(b"chunk"),
            Lookup::Found(_) => Lookup::NotFound,
            other => other,
        }
    }
}
