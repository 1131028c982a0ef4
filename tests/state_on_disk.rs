//! A GCKS's state directory under damage, over real files and real resync sockets: an old
//! history message corrupted or deleted does not keep the GCKS from starting; it is reported
//! (an event, a counter, `/metrics`) and answered "not held" (TCP `NotHeld`, HTTP 421) so a
//! member asks its next endpoint; a deleted signing key beside a kept state is refused, never
//! replaced by a new key.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::engine::gcks::GcksBuilder;
use rekeycast::gcks::{Gcks, GcksConfig, GcksError, GcksEvent};
use rekeycast::io::resync_client::fetch_streaming;
use rekeycast::io::socket::MulticastConfig;
use rekeycast::keyfile::{KeyFileError, KeyOrigin, SIGNING_KEY_FILE};
use rekeycast::resync::store::MessageProblem;
use rekeycast::session::{ReceiverConfig, ReceiverSession};
use rekeycast_proto::endpoint::{
    FetchId, FetchRequest, FetchWhat, Fetched, ResyncEndpoint, ResyncProtocol,
};
use rekeycast_testkit::engine::{admit, rekey, wait_sent};
use rekeycast_testkit::{http, wait};

/// A multicast group and port for test `salt` of this process.
fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(91, salt)
}

fn config(group: SocketAddr, state: &Path) -> GcksConfig {
    let mut config = GcksConfig::loopback(group);
    config.state_dir = Some(state.to_path_buf());
    config.batch_interval = Duration::from_secs(3600);
    config.admission_delay = Duration::ZERO;
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config
}

fn message_path(state: &Path, seq: u64) -> PathBuf {
    state.join("messages").join(format!("{seq:020}.msg"))
}

#[test]
fn lost_history_messages_are_reported_and_answered_not_held() {
    let state = tempfile::tempdir().unwrap();
    let group = group(1);
    let key = SigningKey::from_bytes(&[3; 32]);

    // First life: message 1 admits two members, then five refreshes (messages 2..=6).
    let gcks = Gcks::start(config(group, state.path()), key.clone()).unwrap();
    let bundles = admit(&gcks, &[1, 2]);
    wait_sent(&gcks, 1);
    for _ in 0..5 {
        rekey(&gcks);
    }
    assert_eq!(gcks.stats().unwrap().seq, 6);
    gcks.shutdown().unwrap();

    // Message 2 gets a flipped byte, message 4 is deleted.
    let corrupt = message_path(state.path(), 2);
    let mut bytes = fs::read(&corrupt).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&corrupt, &bytes).unwrap();
    fs::remove_file(message_path(state.path(), 4)).unwrap();

    // Second life: it starts, and says what it lost.
    let gcks = Gcks::start(config(group, state.path()), key).unwrap();
    let stats = gcks.stats().unwrap();
    assert_eq!((stats.seq, stats.history_not_held), (6, 2));
    let mut lost = Vec::new();
    while lost.len() < 2 {
        lost.push(wait::event(
            gcks.events(),
            wait::PATIENCE,
            "a lost message reported",
            |event| match event {
                GcksEvent::HistoryLost { seq, path, problem } => {
                    Some((*seq, path.clone(), *problem))
                }
                _ => None,
            },
        ));
    }
    assert_eq!(
        lost,
        vec![
            (2, corrupt, MessageProblem::Checksum),
            (4, message_path(state.path(), 4), MessageProblem::Missing),
        ]
    );
    let (tcp, http_addr) = gcks.resync_addrs();
    let (tcp, http_addr) = (tcp.unwrap(), http_addr.unwrap());
    let (status, metrics) = http::get(http_addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(http::metric(&metrics, "rekeycast_history_not_held"), 2);

    // Resync: a stream stops "not held" at a lost message, after what it could serve.
    let bundle = &bundles[0];
    let group_id = bundle.rekey_sa.group_id;
    let leaf = ReceiverSession::new(bundle, ReceiverConfig::new(gcks.local_addr()))
        .unwrap()
        .order_key();
    for protocol in [ResyncProtocol::Tcp, ResyncProtocol::Http] {
        let addr = match protocol {
            ResyncProtocol::Tcp => tcp,
            _ => http_addr,
        };
        let fetch = |from_seq: u64| {
            let request = FetchRequest {
                id: FetchId(from_seq),
                group_id,
                endpoint: ResyncEndpoint { protocol, addr },
                what: FetchWhat::Items { from_seq, leaf },
                deadline: Instant::now() + Duration::from_secs(10),
                max_bytes: 1 << 24,
            };
            let mut items = Vec::new();
            fetch_streaming(None, &request, &mut |item| items.push(item));
            let terminal = items.pop().unwrap();
            (items, terminal)
        };
        for (from, served) in [(1, 1), (2, 0), (3, 1), (4, 0)] {
            let (items, terminal) = fetch(from);
            assert_eq!(
                (items.len(), terminal),
                (served, Fetched::NotHeld),
                "{protocol:?} from {from}"
            );
        }
        let (items, terminal) = fetch(5);
        assert_eq!((items.len(), terminal), (2, Fetched::End), "{protocol:?}");
        // What was served verifies: message 1 (3 can only follow 2, which is lost).
        let (items, _) = fetch(1);
        let Fetched::Item { manifest, chunk } = &items[0] else {
            panic!("{items:?}");
        };
        let mut session =
            ReceiverSession::new(bundle, ReceiverConfig::new(gcks.local_addr())).unwrap();
        session
            .handle_resync(Instant::now(), manifest, chunk)
            .unwrap();
        assert_eq!(session.next_seq(), 2);
    }

    // Per message over HTTP: 421 for a lost one, not 404 ("not sent yet").
    let manifest = |seq: u64| {
        http::get(
            http_addr,
            &format!("/v1/groups/{group_id}/rekeys/{seq}/manifest"),
        )
        .0
    };
    assert_eq!(manifest(2), 421);
    assert_eq!(manifest(4), 421);
    assert_eq!(manifest(3), 200);
    assert_eq!(manifest(7), 404);
    gcks.shutdown().unwrap();
}

#[test]
fn a_deleted_signing_key_beside_a_kept_state_is_refused_not_replaced() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("gcks");
    let group = group(2);
    let builder = || {
        GcksBuilder::new(MulticastConfig::loopback_v4(group))
            .configure(|c| *c = config(group, &dir))
    };

    // A first start generates the key file; the state grows beside it.
    let (gcks, origin) = builder().start_with_key_file().unwrap();
    assert_eq!(origin, KeyOrigin::Generated);
    admit(&gcks, &[1]);
    wait_sent(&gcks, 1);
    gcks.shutdown().unwrap();
    let (gcks, origin) = builder().start_with_key_file().unwrap();
    assert_eq!(origin, KeyOrigin::Loaded);
    assert_eq!(gcks.stats().unwrap().seq, 1);
    gcks.shutdown().unwrap();

    // The key file is deleted: no new key is made, and the error names the missing file.
    let key_path = dir.join(SIGNING_KEY_FILE);
    fs::remove_file(&key_path).unwrap();
    let error = builder().start_with_key_file().unwrap_err();
    assert!(
        matches!(&error, GcksError::KeyFile(KeyFileError::MissingKey { path, .. }) if *path == key_path),
        "{error}"
    );
    let text = rekeycast::report::Chain(&error).to_string();
    assert!(
        text.contains(&key_path.display().to_string()) && text.contains("missing"),
        "{text}"
    );
    assert!(!key_path.exists(), "no key was generated");

    // Started with another key, the state is refused as signed by another key, both named.
    let other = SigningKey::from_bytes(&[4; 32]);
    let error = Gcks::start(config(group, &dir), other).unwrap_err();
    let text = error.to_string();
    assert!(text.contains("not by the signing key given"), "{text}");
}
