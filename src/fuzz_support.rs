//! Property checks shared by the fuzz targets in `fuzz/` and the corpus replay test.
//!
//! Each function feeds arbitrary bytes to one parser and asserts what every parser of this
//! crate promises: it returns a value or a typed error, and a value emits back to exactly the
//! bytes it was parsed from. A violated promise panics, which is how a fuzzer or a test reports
//! it; nothing in the engine calls these functions.

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

/// A chunk; the first input byte picks the chunk authentication (even: Merkle path, odd:
/// signature). A parsed chunk re-encodes, with its padding, to the input.
pub fn chunk(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let auth = if mode % 2 == 0 {
        ChunkAuth::MerklePath
    } else {
        ChunkAuth::Signature
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
