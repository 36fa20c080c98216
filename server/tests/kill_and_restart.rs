//! No lost work (issue 15): a multi-process federation of the real binaries (one
//! `cohort-server`, three `cohort-client` daemons), the server killed with SIGKILL in the middle
//! of a secure, differentially private round, then started again.
//!
//! What must hold, and is checked:
//! - every configured round completes exactly once in cohort.db, numbered in order;
//! - the round the kill interrupted is recorded as interrupted (its number is not reused), and
//!   its sample stays accounted: the privacy account after the restart includes it;
//! - the run resumed from the checkpoint of the last round completed before the kill, and every
//!   completed round's checkpoint is a whole, finite model;
//! - the daemons rode through the crash (they were never restarted; the rounds after it need all
//!   three) and exit 0.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cohort_server::pki::StatePaths;
use cohort_server::resume::read_checkpoint;
use cohort_server::store::{RoundRow, Store};

const CLIENTS: [&str; 3] = ["site-a", "site-b", "site-c"];
/// Rounds take milliseconds here: enough of them that the kill lands in one.
const ROUNDS: u64 = 40;

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cohort-server"))
}

/// `cohort-client`, built beside `cohort-server` by `cargo test --workspace` (the client
/// package has integration tests too, so cargo builds its binary before any test runs).
fn client_bin() -> PathBuf {
    let bin = server_bin().with_file_name("cohort-client");
    assert!(
        bin.exists(),
        "{} is not built: run the workspace's tests (`cargo test --workspace`), or `cargo build -p cohort-client` first",
        bin.display()
    );
    bin
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A separable two-class problem: 2,000 rows of four features per site.
fn write_data(path: &Path, site: usize) {
    let mut text = String::from("a,b,c,d,label\n");
    for i in 0..2000 {
        let label = (i + site) % 2;
        let x = |k: usize| ((i * 7 + k * 13 + site * 5) % 17) as f32 / 17.0 + label as f32;
        text.push_str(&format!("{},{},{},{},{label}\n", x(0), x(1), x(2), x(3)));
    }
    std::fs::write(path, text).unwrap();
}

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rounds(state: &StatePaths) -> Vec<RoundRow> {
    Store::open_existing(&state.database()).and_then(|s| s.rounds()).unwrap_or_default()
}

#[test]
fn a_server_killed_mid_round_loses_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let state = StatePaths::new(dir.path().join("server"));
    run(Command::new(server_bin()).args(["init", "--name", "crash", "--san", "localhost", "--state"]).arg(&state.dir));
    let port = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    std::fs::write(
        state.dir.join("model.toml"),
        "name = \"crash-logreg\"\ninput_shape = [4]\n[[heads]]\nname = \"y\"\nclasses = 2\n",
    )
    .unwrap();
    let server_toml = state.dir.join("server.toml");
    std::fs::write(
        &server_toml,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmodel = \"model.toml\"\n[federation]\nrounds = {ROUNDS}\n\
             clients_per_round = 3\nmin_clients = 3\nround_timeout_secs = 60\nwait_for_clients_secs = 120\n\
             collection = \"secure\"\n[federation.secagg]\ndegree = 2\nthreshold = 2\ndropout_tolerance = 0.0\n\
             [federation.dp]\nclip = 1.0\nnoise_multiplier = 0.5\n"
        ),
    )
    .unwrap();
    let mut daemons = Daemons(Vec::new());
    for (i, id) in CLIENTS.iter().enumerate() {
        let site = dir.path().join(id);
        std::fs::create_dir_all(&site).unwrap();
        let bundle = site.join("bundle.pem");
        run(Command::new(server_bin())
            .args(["enroll", "--client-id", id, "--state"])
            .arg(&state.dir)
            .arg("--bundle")
            .arg(&bundle));
        write_data(&site.join("data.csv"), i);
        std::fs::write(
            site.join("client.toml"),
            format!(
                "server = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\ndevice = \"cpu\"\n\
                 [identity]\nbundle = \"bundle.pem\"\n[data]\nformat = \"csv\"\npath = \"data.csv\"\n\
                 label_column = \"label\"\nclasses = 2\n[reconnect]\ninitial_ms = 100\nmax_ms = 500\n"
            ),
        )
        .unwrap();
    }
    let serve = |log: &str| {
        Command::new(server_bin())
            .args(["serve", "--state"])
            .arg(&state.dir)
            .arg("--config")
            .arg(&server_toml)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut server = serve("server-1.log");
    for id in CLIENTS {
        let site = dir.path().join(id);
        daemons.0.push(
            Command::new(client_bin())
                .args(["run", "--config"])
                .arg(site.join("client.toml"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(site.join("daemon.log")).unwrap())
                .spawn()
                .unwrap(),
        );
    }

    // Kill the server the moment round 3 has started: its sample and charges are written
    // ahead, the plans are on their way, nothing of it is summed.
    let logs = || {
        let tail = |p: PathBuf| {
            std::fs::read_to_string(&p).unwrap_or_default().lines().rev().take(15).collect::<Vec<_>>().join("\n")
        };
        format!(
            "server:\n{}\nsite-a:\n{}",
            tail(dir.path().join("server-1.log")),
            tail(dir.path().join("site-a/daemon.log"))
        )
    };
    // Kill the server the moment a round from the third on has started: its sample and charges
    // are written ahead, the plans are on their way, nothing of it is summed.
    let start = Instant::now();
    let killed_round = loop {
        if let Some(r) = rounds(&state).iter().find(|r| r.round >= 3 && r.status == "started") {
            break r.round;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no round from the third on was caught in progress\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    let before = rounds(&state);
    let completed_before: Vec<u64> = before.iter().filter(|r| r.status == "completed").map(|r| r.round).collect();
    assert_eq!(completed_before, (1..killed_round).collect::<Vec<_>>(), "{before:?}");
    let charged_before = Store::open_existing(&state.database()).unwrap().dp_participations().unwrap();

    // Start it again; the daemons were never restarted.
    let mut server = serve("server-2.log");
    let status = {
        let start = Instant::now();
        loop {
            if let Some(status) = server.try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < Duration::from_secs(300), "the restarted server did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let log = std::fs::read_to_string(dir.path().join("server-2.log")).unwrap();
    assert!(status.success(), "the restarted server failed:\n{log}");

    let rows = rounds(&state);
    let numbers: Vec<u64> = rows.iter().map(|r| r.round).collect();
    let mut unique = numbers.clone();
    unique.dedup();
    assert_eq!(numbers, unique, "each round number once: {numbers:?}");
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order: {numbers:?}");
    let completed: Vec<&RoundRow> = rows.iter().filter(|r| r.status == "completed").collect();
    assert_eq!(completed.len() as u64, ROUNDS, "every configured round completed once: {rows:?}");
    let killed = rows.iter().find(|r| r.round == killed_round).unwrap();
    assert_eq!(killed.status, "interrupted", "{killed:?}");
    assert!(!rows.iter().any(|r| r.status == "started"), "no round left half-recorded: {rows:?}");

    // The interrupted round's sample stays charged: every client was sampled (q = 1) in every
    // round up to the killed one, and the account only grows.
    let charged_after = Store::open_existing(&state.database()).unwrap().dp_participations().unwrap();
    for (client, z, n) in &charged_before {
        let after = charged_after.iter().find(|(c, zz, _)| c == client && zz == z).map(|r| r.2).unwrap_or(0);
        assert!(after >= *n, "{client}: {n} charged before the restart, {after} after");
        assert!(*n >= killed_round, "{client}: the interrupted round {killed_round} is charged ({n} rounds)");
    }
    let epsilons: Vec<f64> = rows.iter().filter_map(|r| r.epsilon).collect();
    assert!(epsilons.windows(2).all(|w| w[0] <= w[1]), "epsilon never goes back: {epsilons:?}");

    // It resumed from the checkpoint of the round before the killed one, and every completed
    // round's model is whole and finite.
    let resumed = log.lines().find(|l| l.contains("resuming from the last completed round")).unwrap_or_default();
    assert!(resumed.contains(&format!(" round={} ", killed_round - 1)), "the restart resumed: {resumed:?}\n{log}");
    for row in &completed {
        let checkpoint = row.checkpoint.as_deref().expect("a completed round has a checkpoint");
        let (_, params) = read_checkpoint(&state, checkpoint, None).unwrap();
        assert!(params.iter().all(|v| v.is_finite()));
    }

    // The daemons rode through the crash (rounds 4 and 5 needed all three) and stop by
    // themselves now the federation is finished; one that missed the finished close (a race left
    // open in issue 15's notes) is stopped as its operator would stop it. Either way, exit 0.
    for (child, id) in daemons.0.iter_mut().zip(CLIENTS) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(dir.path().join(id).join("daemon.log")).unwrap();
        assert!(status.success(), "{id} exited with {status}:\n{log}");
        assert!(!log.contains("panicked"), "{id}:\n{log}");
    }
}
