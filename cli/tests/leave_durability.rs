//! An acknowledged leave survives a crash: `rekeycast server` runs as a child process, an admin
//! client joins and removes members at random, and the server is killed with SIGKILL at random
//! points of the stream (often inside the batch interval right after a leave was acknowledged).
//! After the last restart every acknowledged leave is applied: the member is out of the key
//! tree, and its keys (replayed from its registration bundle through every message it was sent)
//! open no message built after the leave.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::auth::mac::MacKey;
use rekeycast::gsa::RekeySa;
use rekeycast::lkh::{Key, KeyRng, MemberId, RegistrationBundle};
use rekeycast::resync::store::StateStore;
use rekeycast::session::{ReceiverConfig, ReceiverSession, SenderConfig, SenderSession};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_rekeycast");
const HISTORY: usize = 1024;

/// The server child; killed and reaped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    state: PathBuf,
}

fn setup(dir: &Path, seed: u64) -> Setup {
    let pid = std::process::id();
    let salt = seed as u16;
    let group = format!(
        "239.82.{}.{}:{}",
        salt,
        pid as u8,
        21_000 + (pid % 10_000) as u16 + salt * 3
    );
    let feedback = format!("127.0.0.1:{}", 33_000 + (pid % 10_000) as u16 + salt * 3);
    let state = dir.join("state");
    let socket = dir.join("admin.sock");
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "admin_socket = \"{}\"\n[log]\nfilter = \"warn\"\n\
             [gcks]\nbind = \"{feedback}\"\nstate_dir = \"{}\"\nbatch_interval_ms = 400\n\
             [gcks.multicast]\ngroup = \"{group}\"\ninterface = \"127.0.0.1\"\nloopback = true\n\
             [gcks.sender]\nhistory = {HISTORY}\nrepair_window = 8\n",
            socket.display(),
            state.display()
        ),
    )
    .unwrap();
    Setup {
        dir: dir.to_path_buf(),
        config,
        socket,
        state,
    }
}

fn request(socket: &Path, request: &Value) -> Option<Value> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

fn start(setup: &Setup, life: usize) -> Server {
    let log = std::fs::File::create(setup.dir.join(format!("server-{life}.log"))).unwrap();
    let child = Command::new(BIN)
        .args(["server", "--config", setup.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let server = Server(child);
    // A killed server leaves its socket file behind: wait for an answer, not for the file.
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(&setup.socket, &json!({"op": "status"})).is_none() {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn kill(mut server: Server) {
    server.0.kill().unwrap();
    server.0.wait().unwrap();
}

fn status_seq(socket: &Path) -> u64 {
    let status = request(socket, &json!({"op": "status"})).unwrap();
    status["seq"].as_u64().unwrap()
}

/// The registration bundle the server wrote (its JSON bundle file format).
fn read_bundle(path: &Path) -> RegistrationBundle {
    let file: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let unhex = |text: &str| -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    };
    RegistrationBundle {
        member: MemberId(file["member"].as_u64().unwrap()),
        leaf: file["leaf"].as_u64().unwrap() as u32,
        leaf_version: file["leaf_version"].as_u64().unwrap() as u32,
        leaf_key: Key::from_bytes(unhex(file["leaf_key"].as_str().unwrap())),
        rekey_sa: serde_json::from_value::<RekeySa>(file["rekey_sa"].clone()).unwrap(),
        first_seq: file["first_seq"].as_u64().unwrap(),
        mac_key: MacKey::from_bytes(unhex(file["mac_key"].as_str().unwrap())),
        directory: Default::default(),
    }
}

/// An acknowledged leave: the member, and the latest message before it was asked for.
struct AckedLeave {
    member: u64,
    seq_before: u64,
}

/// One seed's stream: three lives of the server, each killed at a random point.
fn run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path(), seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut next_id = 1u64;
    let mut current: Vec<u64> = Vec::new();
    let mut bundles: Vec<(u64, PathBuf)> = Vec::new();
    let mut acked: Vec<AckedLeave> = Vec::new();
    for life in 0..3 {
        let server = start(&setup, life);
        if life == 0 {
            // A leave of a member that never joined is refused, not silently "ok".
            let answer =
                request(&setup.socket, &json!({"op": "leave", "member": 999_999})).unwrap();
            assert_eq!(answer["ok"], false, "{answer}");
        }
        let ops = rng.gen_range(3..8);
        for _ in 0..ops {
            if current.len() < 2 || rng.gen_bool(0.5) {
                let id = next_id;
                next_id += 1;
                let path = setup.dir.join(format!("bundle-{id}.json"));
                let answer = request(
                    &setup.socket,
                    &json!({"op": "join", "member": id, "bundle_path": path}),
                )
                .unwrap();
                assert_eq!(answer["ok"], true, "join {id}: {answer}");
                current.push(id);
                bundles.push((id, path));
            } else {
                let id = current.swap_remove(rng.gen_range(0..current.len()));
                let seq_before = status_seq(&setup.socket);
                let answer = request(&setup.socket, &json!({"op": "leave", "member": id})).unwrap();
                assert_eq!(answer["ok"], true, "leave {id}: {answer}");
                acked.push(AckedLeave {
                    member: id,
                    seq_before,
                });
            }
        }
        // A last leave, then SIGKILL at once or a little later: mostly inside the batch
        // interval, before the batch that applies it.
        if !current.is_empty() {
            let id = current.swap_remove(rng.gen_range(0..current.len()));
            let seq_before = status_seq(&setup.socket);
            let answer = request(&setup.socket, &json!({"op": "leave", "member": id})).unwrap();
            assert_eq!(answer["ok"], true, "leave {id}: {answer}");
            acked.push(AckedLeave {
                member: id,
                seq_before,
            });
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        kill(server);
    }
    // The last life: every pending change applied, then one more message past them.
    let server = start(&setup, 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = request(&setup.socket, &json!({"op": "status"})).unwrap();
        if status["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "changes still pending: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = status_seq(&setup.socket);
    request(&setup.socket, &json!({"op": "rekey"})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_seq(&setup.socket) <= before {
        assert!(Instant::now() < deadline, "the last rekey was not built");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(server);

    // What the state directory holds: the tree and every message.
    let (_, restored) =
        StateStore::open(&setup.state, HISTORY, KeyRng::seeded_for_simulation(1)).unwrap();
    let restored = restored.unwrap();
    let latest = restored.tree.seq();
    let now = Instant::now();
    let sender_config = SenderConfig {
        history: HISTORY,
        repair_window: 8,
        ..SenderConfig::default()
    };
    let sa = restored.tree.rekey_sa();
    let mut sender = SenderSession::new(sender_config, sa.group_id, sa.spi, now).unwrap();
    for stored in &restored.messages {
        sender
            .restore_message(now, stored.to_prepared().unwrap())
            .unwrap();
    }
    let feedback: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for leave in &acked {
        assert!(
            restored.tree.leaf_of(MemberId(leave.member)).is_none(),
            "seed {seed}: member {} left (acknowledged after message {}) but is in the tree at \
             message {latest}",
            leave.member,
            leave.seq_before
        );
        let path = &bundles
            .iter()
            .find(|(id, _)| *id == leave.member)
            .unwrap()
            .1;
        let bundle = read_bundle(path);
        let mut receiver = ReceiverSession::new(&bundle, ReceiverConfig::new(feedback)).unwrap();
        let mut opened = bundle.first_seq - 1;
        for seq in bundle.first_seq..=latest {
            let Ok(item) = sender.resync_item(seq, receiver.order_key()) else {
                break;
            };
            if receiver
                .handle_resync(now, item.manifest, item.chunk)
                .is_err()
            {
                break;
            }
            opened = seq;
        }
        // A batch being built when the leave came may still carry the member's keys; the next
        // one applies the leave.
        assert!(
            opened <= leave.seq_before + 1,
            "seed {seed}: member {} opened message {opened}, its leave was acknowledged after \
             message {}",
            leave.member,
            leave.seq_before
        );
    }
    assert!(!acked.is_empty());
}

#[test]
fn acknowledged_leaves_survive_sigkill_at_random_points() {
    for seed in 0..5 {
        run(seed);
    }
}
