//! Hostile peers over real QUIC on loopback, while honest clients of the same federation keep
//! completing rounds: garbage and random frames on the hello stream, a frame header claiming
//! u32::MAX, hellos whose string claims 250 MB, slow frames, parked streams, a pre-hello flood,
//! 4 MB declines and 4 MB messages of the wrong kind round after round, duplicate identities,
//! certificates with odd subjects, and hellos of other protocol versions.
//!
//! Each test names the protection it guards and asserts something that fails without it. What
//! the server logs is captured (one subscriber for the whole binary) so that the tests can check
//! that a peer's strings reach the log escaped and that decoding stopped where it should.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cohort::client::daemon::ClientEvent;
use cohort::common::coordinator::declined_reason;
use cohort::common::secagg::{SealedShares, SharedKeys};
use cohort::common::wire::{self, ClientMsg, ServerMsg, TensorBytes, Update, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use cohort::io::{client_config, recv_msg, recv_payload, send_msg, unix_now, CertificateFacts, Identity, NetError};
use cohort::server::config::{Collection, SecAggConfig};
use cohort::server::pki;
use cohort::server::serve::RoundReport;
use cohort::server::store::{Enrolment, Store};
use rand::{Rng, SeedableRng};
use support::*;
use tokio::task::JoinSet;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A reason with a forged log line and a terminal escape, padded to `len` bytes.
fn poisoned_reason(len: usize) -> String {
    let mut reason = String::from("no\nround complete round=999 participants=1000\u{1b}[2J\u{7}");
    reason.push_str(&"x".repeat(len - reason.len()));
    reason
}

/// Everything the server (and the honest clients) log in this test binary, without colours.
fn captured_logs() -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: OnceLock<Sink> = OnceLock::new();
    let sink = LOGS.get_or_init(|| {
        let sink = Sink::default();
        let writer = sink.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        sink
    });
    String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned()
}

/// No raw control character, no forged line: what a peer wrote reached the log escaped.
fn assert_logs_are_clean() {
    let logs = captured_logs();
    assert!(!logs.contains('\u{1b}') && !logs.contains('\u{7}'), "a raw control character reached the log");
    let forged: Vec<&str> = logs.lines().filter(|l| l.starts_with("round complete")).collect();
    assert!(forged.is_empty(), "a peer forged log lines: {forged:?}");
}

/// A client endpoint for raw peers.
fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(localhost()).unwrap()
}

async fn dial(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    endpoint.connect_with(client_config(identity).unwrap(), addr, "localhost").unwrap().await
}

/// Says hello on a new stream; the server's answer.
async fn hello(conn: &quinn::Connection, device: &str) -> Result<ServerMsg, NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send_msg(&mut send, &ClientMsg::Hello { device: device.into(), samples: 10 }).await?;
    let _ = send.finish();
    recv_msg(&mut recv, 64 << 10).await
}

/// How long the server took to close `conn` (`None`: still open after `secs`).
async fn closed_within(conn: &quinn::Connection, secs: u64) -> Option<Duration> {
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(secs), conn.closed()).await.ok().map(|_| start.elapsed())
}

/// What a hostile peer answers to each request of the server (`None`: no answer).
type Replier = Arc<dyn Fn(&ServerMsg) -> Option<ClientMsg> + Send + Sync>;

/// Answers every request the server sends on `conn` with `reply`, until the connection ends.
async fn answer_requests(conn: quinn::Connection, reply: Replier) {
    let mut tasks = JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let reply = reply.clone();
        tasks.spawn(async move {
            let Ok(request) = recv_msg::<ServerMsg>(&mut recv, MAX_FRAME_BYTES).await else { return };
            if let Some(answer) = reply(&request) {
                let _ = send_msg(&mut send, &answer).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
            }
        });
    }
}

/// A registered raw peer, welcomed, answering every request with `reply`.
async fn hostile_peer(ca: &Ca, id: &str, addr: SocketAddr, reply: Replier) -> tokio::task::JoinHandle<()> {
    let conn = dial(&endpoint(), &ca.client(id), addr).await.unwrap();
    assert!(matches!(hello(&conn, "hostile").await.unwrap(), ServerMsg::Welcome { .. }));
    tokio::spawn(answer_requests(conn, reply))
}

/// About 4 MB of sealed shares, a message of the wrong kind for any request but the adverts.
fn big_shares(round: u64) -> ClientMsg {
    let share = SealedShares {
        from: "x\nround complete round=999\u{1b}[2J".into(),
        to: "y".into(),
        ciphertext: vec![0x1b; 4_000_000],
        seed_commitment: [0; 32],
        key_commitment: [0; 32],
    };
    ClientMsg::Shares { round, keys: SharedKeys { sealed: vec![share], refused: vec!["z\u{1b}".into()] } }
}

/// About 4 MB of update where the secure protocol expects something else.
fn big_update(round: u64) -> ClientMsg {
    ClientMsg::Update(Update {
        round,
        samples: 1,
        delta: TensorBytes::from_f32(&vec![1.0; 1_000_000]),
        train_loss: 0.0,
        train_seconds: 0.0,
        segment_samples: Vec::new(),
    })
}

/// bincode's variable-length integer (as common/tests/decode_allocation.rs builds it).
fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [vec![251], (n as u16).to_le_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![252], (n as u32).to_le_bytes().to_vec()].concat(),
        _ => [vec![253], n.to_le_bytes().to_vec()].concat(),
    }
}

/// A whole frame around `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    [(payload.len() as u32).to_be_bytes().to_vec(), payload.to_vec()].concat()
}

/// A hello (variant 0) whose device string claims 250 MB in an 11-byte payload.
fn length_bomb() -> Vec<u8> {
    let body = [varint(0), varint(250_000_000), b"abc".to_vec()].concat();
    frame(&[PROTOCOL_VERSION.to_be_bytes().to_vec(), body].concat())
}

/// Opens the hello stream, writes `bytes` (and finishes the stream if `finish`); returns how long
/// the server took from then to close the connection, and whether it welcomed the peer.
async fn first_words(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> (Option<Duration>, bool) {
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let answer = tokio::time::timeout(Duration::from_secs(15), recv_msg::<ServerMsg>(&mut recv, 64 << 10)).await;
    let welcomed = matches!(answer, Ok(Ok(ServerMsg::Welcome { .. })));
    (closed_within(conn, 15).await.map(|_| started.elapsed()), welcomed)
}

/// Reports until `n` have arrived; each must be a completed round.
async fn completed_rounds(server: &mut RunningServer, n: usize, secs: u64) -> Vec<RoundReport> {
    let mut reports = Vec::new();
    for _ in 0..n {
        let report = next_report(server, secs).await;
        assert!(report.completed, "an honest round failed: {report:?}");
        reports.push(report);
    }
    reports
}

/// Garbage, random frames, a u32::MAX header, 250 MB length claims and an escaping device string
/// on the hello stream; a hello sent a byte per 100 ms; a welcomed peer that answers each plan a
/// byte per 100 ms. Guards: the hello frame cap (a u32::MAX header is refused at once instead of
/// waiting for 4 GB until the hello deadline), bincode's limit set from the payload's own length
/// (the server's error says the length claim exceeds what arrived; without it the claim is
/// allocated and decoding fails only at the end of the input), the hello deadline (the slow hello
/// is cut off after 10 s instead of taking 100 s), the round deadline (the slow answerer is
/// dropped), and the escaping of the hello's device string in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_length_bombs_and_slow_frames_are_dropped_alone() {
    captured_logs();
    let ca = Ca::new();
    let rounds = 8;
    let mut fed = federation(rounds, 10, 2);
    // The hostile peers are sampled every round, however often they fail (no backoff), so
    // every round meets them.
    fed.backoff.after_failures = u32::MAX;
    fed.start_after_clients = Some(3);
    fed.round_timeout_secs = 2.0;
    let mut server = start_server(&ca, localhost(), fed, None);
    let addr = server.addr;

    // A welcomed peer that answers each plan with a 1 kB frame, a byte per 100 ms.
    let slow_answer = {
        let conn = dial(&endpoint(), &ca.client("slow-answerer"), addr).await.unwrap();
        assert!(matches!(hello(&conn, "slow").await.unwrap(), ServerMsg::Welcome { .. }));
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let _ = recv_msg::<ServerMsg>(&mut recv, MAX_FRAME_BYTES).await;
                    let answer = ClientMsg::Decline { round: 0, reason: "s".repeat(1000) };
                    for byte in cohort::common::wire::encode(&answer).unwrap() {
                        if send.write_all(&[byte]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
        })
    };
    let clients: Vec<RunningClient> =
        (1..=2).map(|i| start_client(ca.client(&format!("honest-{i}")), addr, dataset(40, i))).collect();

    // A hello a byte per 100 ms: 1,000 bytes announced would take 100 s.
    // (An identity of its own: a newer connection of an identity in its hello closes the older.)
    let rogue = ca.client("rogue");
    let slow_hello = {
        let slow = ca.client("slow-hello");
        tokio::spawn(async move {
            let conn = dial(&endpoint(), &slow, addr).await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let started = Instant::now();
            let mut bytes = frame(&vec![b'a'; 1000]).into_iter();
            let dribble = async {
                for byte in bytes.by_ref() {
                    if send.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(25), dribble).await;
            (closed_within(&conn, 1).await, started.elapsed(), bytes.len())
        })
    };

    // Garbage and random frames, each on a fresh connection with a registered certificate.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let peers = endpoint();
    for i in 0..30 {
        let bytes: Vec<u8> = match i % 3 {
            0 => (0..rng.random_range(1..4096)).map(|_| rng.random()).collect(),
            1 => frame(&(0..rng.random_range(0..2000)).map(|_| rng.random()).collect::<Vec<u8>>()),
            _ => {
                let body: Vec<u8> = (0..rng.random_range(0..200)).map(|_| rng.random()).collect();
                frame(&[PROTOCOL_VERSION.to_be_bytes().to_vec(), body].concat())
            }
        };
        let conn = dial(&peers, &rogue, addr).await.unwrap();
        let (closed, welcomed) = first_words(&conn, &bytes, true).await;
        assert!(!welcomed, "garbage {i} was welcomed");
        assert!(closed.is_some(), "garbage {i}: the connection stayed open");
    }
    // A header claiming u32::MAX, the stream left open: refused at once, not at the deadline.
    let conn = dial(&peers, &rogue, addr).await.unwrap();
    let (closed, welcomed) = first_words(&conn, &[u32::MAX.to_be_bytes().to_vec(), vec![0; 100]].concat(), false).await;
    assert!(!welcomed);
    let closed = closed.expect("the u32::MAX header left the connection open");
    assert!(closed < Duration::from_secs(5), "a u32::MAX header was read until the hello deadline ({closed:?})");
    // Hellos whose device string claims 250 MB.
    for _ in 0..5 {
        let conn = dial(&peers, &rogue, addr).await.unwrap();
        let (closed, welcomed) = first_words(&conn, &length_bomb(), false).await;
        assert!(!welcomed && closed.is_some_and(|c| c < Duration::from_secs(5)), "{closed:?}");
    }
    // A hello whose device string forges a log line and clears the terminal is welcomed, and
    // logged escaped.
    let conn = dial(&peers, &rogue, addr).await.unwrap();
    let evil = "evil\nround complete round=999 participants=1000\u{1b}[2J";
    assert!(matches!(hello(&conn, evil).await.unwrap(), ServerMsg::Welcome { .. }));
    conn.close(0u32.into(), b"bye");

    // The slow hello is cut off by the hello deadline while the server still runs.
    let (closed, took, unsent) = slow_hello.await.unwrap();
    assert!(closed.is_some() && unsent > 0, "the slow hello was not cut off ({took:?}, {unsent} bytes unsent)");
    assert!(took < Duration::from_secs(15), "the slow hello held its connection {took:?}");
    assert!(!server.task.is_finished(), "the server stopped before the slow hello was cut off");

    let reports = completed_rounds(&mut server, rounds as usize, 60).await;
    for report in &reports {
        assert_eq!(report.participants, 2, "{report:?}");
        let slow = report.dropped.iter().find(|(id, _)| id == "slow-answerer");
        assert!(slow.is_some_and(|(_, why)| why.contains("deadline")), "{:?}", report.dropped);
        assert!(report.seconds < 2.0 + 2.0, "the round deadline held: {}", report.seconds);
    }
    server.task.await.unwrap().unwrap();
    slow_answer.abort();
    RunningClient::stop_all(clients).await;

    let logs = captured_logs();
    assert!(
        logs.contains("claims more than the 9 bytes that arrived"),
        "a 250 MB length claim was not refused by the payload-sized limit"
    );
    assert!(logs.contains(r"evil\nround complete round=999 participants=1000\u{1b}[2J"), "device not logged escaped");
    assert_logs_are_clean();
}

/// What a peer could open and park on a server.
#[derive(Debug, Default)]
struct Parked {
    welcomed: bool,
    /// Streams beyond the hello's that could be opened, before and after the welcome.
    extra_streams: usize,
    /// Bytes written on them that the transport accepted (the server never reads them).
    extra_bytes: usize,
    /// Bytes accepted on the hello stream after the hello (the server reads no more of it).
    after_hello: usize,
}

/// Writes up to `max` bytes on `send`, each write given `patience`; the bytes accepted before
/// the writes stall or fail.
async fn write_until_stalled(send: &mut quinn::SendStream, max: usize, patience: Duration) -> usize {
    let chunk = vec![0x55u8; 64 << 10];
    let mut written = 0;
    while written < max {
        match tokio::time::timeout(patience, send.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            _ => break,
        }
    }
    written
}

/// Tries to open and fill extra streams before and after the hello, and to keep writing on the
/// hello stream after it.
async fn park(conn: &quinn::Connection) -> Parked {
    let patience = Duration::from_millis(1500);
    let mut parked = Parked::default();
    let mut extra = Vec::new();
    let (mut hello_send, mut hello_recv) = conn.open_bi().await.unwrap();
    for stage in 0..2 {
        if stage == 1 {
            send_msg(&mut hello_send, &ClientMsg::Hello { device: "parker".into(), samples: 1 }).await.unwrap();
            let answer = recv_msg::<ServerMsg>(&mut hello_recv, 64 << 10).await;
            parked.welcomed = matches!(answer, Ok(ServerMsg::Welcome { .. }));
            parked.after_hello = write_until_stalled(&mut hello_send, 8 << 20, patience).await;
        }
        if let Ok(Ok(mut send)) = tokio::time::timeout(patience, conn.open_uni()).await {
            parked.extra_streams += 1;
            parked.extra_bytes += write_until_stalled(&mut send, 4 << 20, patience).await;
            extra.push(send);
        }
        if let Ok(Ok((mut send, recv))) = tokio::time::timeout(patience, conn.open_bi()).await {
            parked.extra_streams += 1;
            parked.extra_bytes += write_until_stalled(&mut send, 4 << 20, patience).await;
            extra.push(send);
            drop(recv);
        }
    }
    parked
}

/// A stand-in for a server without transport limits: the same TLS, quinn's default transport
/// (100 + 100 streams a peer may open, large windows), a welcome for every hello, and nothing read
/// after it. It shows that the probe below detects parking where it is possible.
fn unlimited_server(ca: &Ca) -> SocketAddr {
    let identity = pki::server_identity(&ca.state).unwrap();
    let mut config = cohort::io::server_config(&identity).unwrap();
    config.transport_config(Arc::new(quinn::TransportConfig::default()));
    let endpoint = quinn::Endpoint::server(config, localhost()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                let Ok(ClientMsg::Hello { .. }) = recv_msg::<ClientMsg>(&mut recv, 64 << 10).await else { return };
                let welcome = ServerMsg::Welcome {
                    client_id: "x".into(),
                    server_name: "unlimited".into(),
                    next_round: 1,
                    federation: "x".into(),
                    run: String::new(),
                };
                let _ = send_msg(&mut send, &welcome).await;
                conn.closed().await;
                drop((send, recv));
            });
        }
    });
    addr
}

/// Parked streams. Guards the server's transport limits: a client may open one bidirectional
/// stream (its hello) and no unidirectional one, no more after its welcome, and the hello stream
/// is not read past the hello. Against a server with quinn's defaults the same probe opens
/// streams and parks megabytes (checked here too, so the probe is known to see parking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_hello_cannot_be_opened_or_filled() {
    captured_logs();
    let ca = Ca::new();
    let mut server = start_server(&ca, localhost(), federation(1, 2, 2), None);
    let parker = dial(&endpoint(), &ca.client("parker"), server.addr).await.unwrap();
    let parked = park(&parker).await;
    parker.close(0u32.into(), b"done");
    eprintln!("cohort server: {parked:?}");
    assert!(parked.welcomed, "{parked:?}");
    assert_eq!((parked.extra_streams, parked.extra_bytes), (0, 0), "a client opened and filled streams: {parked:?}");
    assert!(parked.after_hello < 1 << 20, "the hello stream took {} bytes after the hello", parked.after_hello);

    // The federation goes on.
    let clients: Vec<RunningClient> =
        (1..=2).map(|i| start_client(ca.client(&format!("honest-{i}")), server.addr, dataset(40, i))).collect();
    let report = next_report(&mut server, 60).await;
    assert!(report.completed, "{report:?}");
    server.shutdown.cancel();
    let _ = server.task.await;
    RunningClient::stop_all(clients).await;

    let control = dial(&endpoint(), &ca.client("parker-2"), unlimited_server(&ca)).await.unwrap();
    let unlimited = park(&control).await;
    eprintln!("server without limits: {unlimited:?}");
    assert!(
        unlimited.welcomed && unlimited.extra_streams == 4 && unlimited.extra_bytes > 1 << 20,
        "the probe did not see parking on a server without limits: {unlimited:?}"
    );
}

/// A pre-hello flood: 100 connections (of 100 enrolled identities) that complete TLS and never
/// say hello. Guards the cap on
/// connections in their handshake or hello (64: the rest are refused at once; without it all 100
/// are accepted and each holds its buffers) and the hello deadline (each is closed by the server
/// within about 10 s). Honest clients keep completing rounds, and a new honest client gets in
/// (retrying while the cap is full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_hello_flood_is_capped_and_honest_clients_still_get_in() {
    captured_logs();
    let ca = Ca::new();
    let mut fed = federation(10_000, 3, 2);
    fed.start_after_clients = Some(2);
    let mut server = start_server(&ca, localhost(), fed, None);
    let addr = server.addr;
    let clients: Vec<RunningClient> =
        (1..=2).map(|i| start_client(ca.client(&format!("honest-{i}")), addr, dataset(2000, i))).collect();
    next_report(&mut server, 60).await;

    // 100 enrolled identities (one identity holds one slot: a newer connection in its hello
    // closes the older; see the next test).
    let configs: Vec<_> = (0..100).map(|i| client_config(&ca.client(&format!("flooder-{i}"))).unwrap()).collect();
    let peers = endpoint();
    let flood_started = Instant::now();
    let mut flood = JoinSet::new();
    for config in configs {
        let connecting = peers.connect_with(config, addr, "localhost").unwrap();
        flood.spawn(async move {
            match connecting.await {
                Ok(conn) => Some(closed_within(&conn, 30).await),
                Err(_) => None,
            }
        });
    }
    // A newcomer dials while the flood holds the cap.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut newcomer = start_client(ca.client("newcomer"), addr, dataset(2000, 3));

    let (mut accepted, mut refused, mut slowest) = (0, 0, Duration::ZERO);
    while let Some(outcome) = flood.join_next().await {
        match outcome.unwrap() {
            Some(closed) => {
                accepted += 1;
                let closed = closed.expect("the server left a silent connection open for 30 s");
                slowest = slowest.max(closed);
            }
            None => refused += 1,
        }
    }
    let flood_lasted = flood_started.elapsed();
    eprintln!(
        "flood: {accepted} accepted, {refused} refused, slowest closed after {slowest:?}, lasted {flood_lasted:?}"
    );
    assert!(accepted <= 64 && refused >= 36, "{accepted} accepted, {refused} refused: the cap did not hold");
    assert!(slowest < Duration::from_secs(20), "a silent connection was held {slowest:?}");

    // Rounds went on during the flood, and the newcomer got in and takes part.
    let mut during = 0;
    while let Ok(report) = server.reports.try_recv() {
        assert!(report.completed, "{report:?}");
        during += 1;
    }
    eprintln!("{during} rounds completed during the flood");
    assert!(during >= 2, "only {during} rounds completed in the {flood_lasted:?} of the flood");
    newcomer.wait_for(30, |e| *e == ClientEvent::Connected).await;
    let joined = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let report = next_report(&mut server, 60).await;
            assert!(report.completed, "{report:?}");
            if report.participants == 3 {
                return report;
            }
        }
    })
    .await
    .expect("the newcomer never took part in a round");
    assert_eq!(joined.cohort, 3);
    server.shutdown.cancel();
    let _ = server.task.await;
    newcomer.stop().await;
    RunningClient::stop_all(clients).await;
    assert!(captured_logs().contains("connections are in their handshake or hello: refusing new ones"));
}

/// One enrolled identity that keeps re-opening 100 connections which never say hello cannot hold
/// the server's cap of connections in their hello (64, shared by everybody): a newer connection
/// of an identity closes its older one still in its hello, so a new honest client gets in within
/// a few seconds. Guards the one-per-identity rule for connections in their hello: without it the
/// newcomer waited 10-30 s on loopback, refused until it won a race against the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_flood_from_one_identity_does_not_lock_newcomers_out() {
    captured_logs();
    let ca = Ca::new();
    let mut fed = federation(10_000, 2, 1);
    fed.start_after_clients = Some(1);
    let server = start_server(&ca, localhost(), fed, None);
    let addr = server.addr;
    let peers = endpoint();
    let config = client_config(&ca.client("flooder")).unwrap();
    let mut flood = JoinSet::new();
    for _ in 0..100 {
        let (peers, config) = (peers.clone(), config.clone());
        flood.spawn(async move {
            loop {
                if let Ok(conn) = peers.connect_with(config.clone(), addr, "localhost").unwrap().await {
                    conn.closed().await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut newcomer = start_client(ca.client("newcomer"), addr, dataset(40, 1));
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        while newcomer.events.recv().await.is_some_and(|e| e != ClientEvent::Connected) {}
    })
    .await;
    let waited = started.elapsed();
    flood.abort_all();
    server.shutdown.cancel();
    let _ = server.task.await;
    newcomer.stop().await;
    assert!(connected.is_ok() && waited < Duration::from_secs(5), "the newcomer waited {waited:?} for a slot");
}

/// Registered clients that answer every secure-aggregation request with a 4 MB decline whose
/// reason forges a log line and carries escapes, or with about 4 MB of the wrong kind (sealed
/// shares or an update where a nonce is expected; a join, then a 4 MB decline or update where a
/// key advert is expected), round after round. Guards: wrong-phase messages described by kind,
/// not content (the reason stays short and names no payload), peer reasons escaped and capped
/// at 300 characters (the dropped reasons stay a few hundred characters, without control
/// characters), and the log stays clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_declines_and_wrong_phase_messages_round_after_round() {
    captured_logs();
    let ca = Ca::new();
    let rounds = 4;
    let mut fed = federation(rounds, 10, 3);
    // The hostile peers are sampled every round, however often they fail (no backoff), so
    // every round meets them.
    fed.backoff.after_failures = u32::MAX;
    fed.collection = Collection::Secure;
    // A complete graph of 10 with t = 5: every honest client keeps 5 honest neighbours when the
    // four hostile ones drop.
    fed.secagg = SecAggConfig { degree: 9, threshold: Some(5), dropout_tolerance: Some(0.4), ..Default::default() };
    fed.secagg.phase_timeout_secs = 10.0;
    fed.round_timeout_secs = 30.0;
    let mut server = start_server(&ca, localhost(), fed, None);
    let addr = server.addr;

    let reason = Arc::new(poisoned_reason(4_000_000));
    let decline: Replier = {
        let reason = reason.clone();
        Arc::new(move |request| {
            Some(ClientMsg::Decline { round: request.request_round().unwrap_or(0), reason: reason.to_string() })
        })
    };
    let shares: Replier = Arc::new(|request| Some(big_shares(request.request_round().unwrap_or(0))));
    let update: Replier = Arc::new(|request| Some(big_update(request.request_round().unwrap_or(0))));
    // Joins with a fresh nonce, then answers the next phase with `then`.
    let join_then = |then: Replier| -> Replier {
        Arc::new(move |request| match request {
            ServerMsg::Plan(plan) => Some(ClientMsg::Join { round: plan.round, nonce: rand::random() }),
            other => then(other),
        })
    };
    // The joiner answers the key-advert request with a decline in odd rounds, an update in even.
    let joiner_then: Replier = {
        let decline = decline.clone();
        Arc::new(move |request| match request.request_round().unwrap_or(0) % 2 {
            1 => decline(request),
            _ => Some(big_update(request.request_round().unwrap_or(0))),
        })
    };
    let hostile = [
        hostile_peer(&ca, "decliner", addr, decline).await,
        hostile_peer(&ca, "wrong-shares", addr, shares).await,
        hostile_peer(&ca, "wrong-update", addr, update).await,
        hostile_peer(&ca, "joiner", addr, join_then(joiner_then)).await,
    ];
    let clients: Vec<RunningClient> =
        (1..=6).map(|i| start_client(ca.client(&format!("honest-{i}")), addr, dataset(40, i))).collect();

    let reports = completed_rounds(&mut server, rounds as usize, 120).await;
    for report in &reports {
        assert_eq!((report.cohort, report.participants), (10, 6), "{report:?}");
        let why = |id: &str| {
            let (_, why) = report.dropped.iter().find(|(d, _)| d == id).unwrap_or_else(|| panic!("{report:?}"));
            assert!(why.chars().count() <= 400, "{id}: a reason of {} characters was kept", why.chars().count());
            assert!(!why.chars().any(char::is_control), "{id}: raw control characters in {why:?}");
            why.clone()
        };
        let declined = why("decliner");
        let reason = declined_reason(&declined).unwrap_or_default();
        assert!(reason.starts_with("no\\nround complete round=999"), "{declined}");
        assert!(declined.contains("\\u{1b}[2J"), "{declined}");
        let joiner = why("joiner");
        if report.round % 2 == 1 {
            assert_eq!(joiner, declined);
        } else {
            assert_eq!(joiner, "protocol violation: expected a key advert, got an update");
        }
        for (id, kind) in [("wrong-shares", "shares"), ("wrong-update", "an update")] {
            let reason = why(id);
            assert!(reason.contains("protocol violation") && reason.contains(kind), "{id}: {reason}");
            assert!(reason.len() < 120, "{id}: the wrong-phase message's content was kept: {reason}");
        }
    }
    server.task.await.unwrap().unwrap();
    hostile.iter().for_each(|h| h.abort());
    RunningClient::stop_all(clients).await;
    assert_logs_are_clean();
}

/// 105 plain rounds with a client that declines every plan with a 900 kB reason (under the plain
/// rounds' cap, so it is decoded). Guards the bound on round reports kept in memory:
/// `Server::run` returns (and keeps) the last 100 only; every round is still in cohort.db.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_history_in_memory_is_bounded() {
    captured_logs();
    let ca = Ca::new();
    let mut fed = federation(105, 2, 1);
    // The hostile peers are sampled every round, however often they fail (no backoff), so
    // every round meets them.
    fed.backoff.after_failures = u32::MAX;
    fed.train.epochs = 1;
    let mut server = start_server(&ca, localhost(), fed, None);
    let reason = Arc::new(poisoned_reason(900_000));
    let decliner = hostile_peer(
        &ca,
        "decliner",
        server.addr,
        Arc::new(move |request| {
            Some(ClientMsg::Decline { round: request.request_round().unwrap_or(0), reason: reason.to_string() })
        }),
    )
    .await;
    let client = start_client(ca.client("honest"), server.addr, dataset(16, 1));
    let reports = completed_rounds(&mut server, 105, 60).await;
    for report in &reports {
        let (_, why) = report.dropped.iter().find(|(id, _)| id == "decliner").expect("the decliner was sampled");
        assert!(declined_reason(why).is_some_and(|r| r.starts_with("no\\nround complete")), "{why}");
        assert!(why.len() <= 400 && !why.chars().any(char::is_control), "{why:?}");
    }
    let kept = server.task.await.unwrap().unwrap();
    assert_eq!(kept.len(), 100, "the server kept {} round reports in memory", kept.len());
    assert_eq!((kept[0].round, kept[99].round), (6, 105));
    decliner.abort();
    client.stop().await;
    assert_eq!(Store::open(&ca.state.database()).unwrap().rounds().unwrap().len(), 105, "cohort.db has every round");
}

/// Two connections with the same client id. Guards the one connection per identity: the newer
/// replaces the older (closed with a reason), a duplicate is never sampled twice, and the
/// federation goes on while the two take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_identity_replaces_the_older_connection() {
    captured_logs();
    let ca = Ca::new();
    let rounds = 30;
    let mut fed = federation(rounds, 3, 1);
    fed.start_after_clients = Some(2);
    fed.round_timeout_secs = 5.0;
    let mut server = start_server(&ca, localhost(), fed, None);
    let twin = ca.client("twin");

    let older = dial(&endpoint(), &twin, server.addr).await.unwrap();
    assert!(matches!(hello(&older, "older").await.unwrap(), ServerMsg::Welcome { .. }));
    let mut newer = start_client(twin.clone(), server.addr, dataset(1000, 1));
    newer.wait_for(20, |e| *e == ClientEvent::Connected).await;
    let why = match tokio::time::timeout(Duration::from_secs(5), older.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => String::from_utf8_lossy(&close.reason).into_owned(),
        other => panic!("the older connection was not closed: {other:?}"),
    };
    assert!(why.contains("replaced by a newer connection"), "{why}");

    let honest = start_client(ca.client("honest"), server.addr, dataset(1000, 2));
    let first = next_report(&mut server, 60).await;
    assert!(first.completed && first.cohort == 2 && first.participants == 2, "{first:?}");

    // A third connection with the id takes over; the daemon comes back and takes over again.
    let third = dial(&endpoint(), &twin, server.addr).await.unwrap();
    assert!(matches!(hello(&third, "third").await.unwrap(), ServerMsg::Welcome { .. }));
    newer.wait_for(20, |e| matches!(e, ClientEvent::Disconnected { .. })).await;
    newer.wait_for(20, |e| *e == ClientEvent::Connected).await;
    assert!(closed_within(&third, 5).await.is_some(), "the third connection was not replaced");
    for _ in 1..rounds {
        let report = next_report(&mut server, 60).await;
        assert!(report.completed && report.cohort <= 2, "{report:?}");
    }
    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(vec![newer, honest]).await;
}

/// An identity the CA signs directly with `common_name` (none at all: `None`), bypassing the id
/// rule that `enroll` applies; registered in cohort.db when `register`, as if enrolled.
fn signed_by_the_ca(ca: &Ca, common_name: Option<&str>, register: bool) -> Identity {
    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca.state.ca_key()).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(ca.state.ca_cert()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = common_name {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = unix_now();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x3f) | 0x40;
    params.serial_number = Some(serial.to_vec().into());
    let cert = params.signed_by(&key, &issuer).unwrap();
    if register {
        let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
        let facts = CertificateFacts {
            client: common_name.unwrap_or_default().to_string(),
            key_hash: format!("not-a-hash-{hex}"),
            serial: hex,
            not_before: now - 86_400,
            not_after: now + 86_400,
        };
        Store::open(&ca.state.database()).unwrap().register_certificate(&facts, now, Enrolment::Renew).unwrap();
    }
    Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), ca_pem.as_bytes()).unwrap()
}

/// Certificates the CA signed with an empty, a 10 kB, a newline-forging and an escaping CN, and
/// with none; and a well-named certificate that is not registered. Guards the id check at every
/// connection (the odd subjects are registered in cohort.db here, so that only that check stands
/// between them and a welcome) and admission of registered certificates only: each is refused
/// with a short, escaped reason and never seen by the server; an honest client then runs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_subjects_and_unregistered_certificates_are_refused() {
    captured_logs();
    let ca = Ca::new();
    let mut fed = federation(1, 2, 1);
    fed.start_after_clients = Some(1);
    let mut server = start_server(&ca, localhost(), fed, None);
    let long = "x".repeat(10_000);
    let odd: [(Option<&str>, &str); 5] = [
        (Some(""), "client id"),
        (Some(&long), "client id"),
        (Some("a\nround complete round=999"), "client id"),
        (Some("b\u{1b}[2J\u{7}"), "client id"),
        (None, "no common name"),
    ];
    let peers = endpoint();
    for (cn, expected) in odd {
        let identity = signed_by_the_ca(&ca, cn, true);
        let conn = dial(&peers, &identity, server.addr).await.unwrap();
        match hello(&conn, "odd").await {
            Ok(ServerMsg::Refused { reason }) => {
                assert!(reason.contains(expected), "{reason}");
                assert!(reason.len() < 600 && !reason.chars().any(char::is_control), "{reason:?}");
            }
            other => panic!("a certificate with CN {:?} got {other:?}", cn.map(|c| &c[..c.len().min(40)])),
        }
        assert!(closed_within(&conn, 5).await.is_some(), "the connection stayed open");
    }
    let stranger = signed_by_the_ca(&ca, Some("not-enrolled"), false);
    let conn = dial(&peers, &stranger, server.addr).await.unwrap();
    match hello(&conn, "stranger").await {
        Ok(ServerMsg::Refused { reason }) => assert!(reason.contains("is not registered"), "{reason}"),
        other => panic!("an unregistered certificate got {other:?}"),
    }

    let honest = start_client(ca.client("honest"), server.addr, dataset(40, 1));
    let report = next_report(&mut server, 60).await;
    assert!(report.completed && report.cohort == 1 && report.participants == 1, "{report:?}");
    server.task.await.unwrap().unwrap();
    honest.stop().await;
    let clients = Store::open(&ca.state.database()).unwrap().clients().unwrap();
    let seen: Vec<&str> = clients.iter().filter(|c| c.last_seen.is_some()).map(|c| c.id.as_str()).collect();
    assert_eq!(seen, vec!["honest"], "only the honest client was ever welcomed");
    assert!(!clients.iter().any(|c| c.id == "not-enrolled"));
    assert_logs_are_clean();
}

/// Raw clients that say hello in another protocol version: an older one (2) and a newer one.
/// Guards the frozen hello and refusal (docs/protocol.md): the server reads a hello of any
/// version and answers one of another version with a refusal encoded in the client's own
/// version, which names both versions and what to install, then closes the connection; an
/// honest client of this version still completes its round. Without them the server failed to
/// decode the hello and closed the connection without a word the client could read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_another_protocol_version_gets_a_refusal_in_that_version() {
    captured_logs();
    let ca = Ca::new();
    let mut fed = federation(1, 1, 1);
    fed.start_after_clients = Some(1);
    let mut server = start_server(&ca, localhost(), fed, None);
    let peers = endpoint();
    let other = ca.client("other-version");
    for version in [2, PROTOCOL_VERSION + 1] {
        let conn = dial(&peers, &other, server.addr).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // The hello as a client of `version` frames it (its body is frozen: the same in all).
        let mut frame = wire::encode(&ClientMsg::Hello { device: "cpu".into(), samples: 10 }).unwrap();
        frame[4..6].copy_from_slice(&version.to_be_bytes());
        send.write_all(&frame).await.unwrap();
        let _ = send.finish();
        let payload = tokio::time::timeout(Duration::from_secs(10), recv_payload(&mut recv, 64 << 10))
            .await
            .expect("no answer to a hello of another version")
            .unwrap_or_else(|e| panic!("version {version}: the server answered nothing readable: {e}"));
        let (answered_in, reason) = wire::decode_refusal(&payload).unwrap();
        assert_eq!(answered_in, version, "the refusal is not in the client's version");
        let expected = format!("this client speaks Cohort protocol {version}, the server speaks {PROTOCOL_VERSION}: ");
        assert!(reason.starts_with(&expected), "{reason}");
        assert!(
            reason.contains(&format!("install a cohort-client that speaks protocol {PROTOCOL_VERSION}")),
            "{reason}"
        );
        assert!(closed_within(&conn, 5).await.is_some(), "version {version}: the connection stayed open");
    }
    let honest = start_client(ca.client("honest"), server.addr, dataset(40, 1));
    let report = next_report(&mut server, 60).await;
    assert!(report.completed && report.participants == 1, "{report:?}");
    server.task.await.unwrap().unwrap();
    honest.stop().await;
    assert!(captured_logs().contains("refusing client `other-version`: this client speaks Cohort protocol 2"));
    assert_logs_are_clean();
}
