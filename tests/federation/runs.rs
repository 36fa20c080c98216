//! Many runs under one CA (issue 15), driven through the library the CLI uses
//! (`cohort_server::runs`): a server that hosts submitted runs only, three clients connected once,
//! a run stopped mid-way while another waits, the waiting one run to the end, the stopped one
//! resumed from its last checkpoint to the end, each round recorded once per run.

use std::time::Duration;

use crate::support::*;
use cohort::server::pki::StatePaths;
use cohort::server::runs;
use cohort::server::serve::{ServeSetup, Server};
use cohort::server::store::{RoundRow, RunStatus, Store};
use tokio_util::sync::CancellationToken;

fn run_file(dir: &std::path::Path, name: &str, rounds: u64) -> std::path::PathBuf {
    std::fs::write(dir.join("model.toml"), spec().to_toml()).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "model = \"model.toml\"\n[federation]\nrounds = {rounds}\nclients_per_round = 3\nmin_clients = 3\n\
             round_timeout_secs = 20\n[federation.train]\nepochs = 1\nbatch_size = 8\nlr = 0.1\n"
        ),
    )
    .unwrap();
    path
}

fn status(state: &StatePaths, name: &str) -> RunStatus {
    Store::open_existing(&state.database()).unwrap().run(name).unwrap().unwrap().status
}

fn rounds(state: &StatePaths, name: &str) -> Vec<RoundRow> {
    let (records, _) = runs::records(state, Some(name)).unwrap();
    Store::open_existing(&records.database()).map(|s| s.rounds().unwrap()).unwrap_or_default()
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_submitted_stopped_and_resumed_while_the_server_serves() {
    let ca = Ca::new();
    let files = tempfile::tempdir().unwrap();
    // A server that hosts submitted runs only, and keeps serving after the last.
    let host = || ServeSetup {
        state: StatePaths::new(ca.dir.path()),
        identity: cohort::server::pki::server_identity(&ca.state).unwrap(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        run: None,
        keep_serving: true,
        events: None,
        metrics_listen: None,
    };
    let server = Server::bind(host()).unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    let clients = start_sized_clients(&ca, addr, &[(0, 40), (1, 40), (2, 40)]);
    // One server per state directory: a second is refused before it writes anything.
    let err = Server::bind(host()).err().expect("a second server on one state directory").to_string();
    assert!(err.contains("another cohort-server (pid") && err.contains("serves"), "{err}");

    let long = runs::submit(&ca.state, "long", &run_file(files.path(), "long", 400)).unwrap();
    assert_eq!((long.rounds, long.ahead), (400, 0));
    let next = runs::submit(&ca.state, "next", &run_file(files.path(), "next", 2)).unwrap();
    assert_eq!(next.ahead, 1, "behind `long`");
    // A name is one run's for good, and a run file is checked when it is submitted.
    let err = runs::submit(&ca.state, "long", &run_file(files.path(), "again", 2)).unwrap_err().to_string();
    assert!(err.contains("already a run named `long`"), "{err}");
    std::fs::write(files.path().join("bad.toml"), "model = \"model.toml\"\n[federation]\nrounds = 0\n").unwrap();
    let err = runs::submit(&ca.state, "bad", &files.path().join("bad.toml")).unwrap_err().to_string();
    assert!(err.contains("bad.toml") && err.contains("rounds"), "{err}");
    for name in ["../escape", "", ".hidden", "a/b"] {
        let err = runs::submit(&ca.state, name, &run_file(files.path(), "x", 1)).unwrap_err().to_string();
        assert!(err.contains("is not 1 to 64 letters"), "{name:?}: {err}");
    }
    assert!(!ca.dir.path().join("escape").exists() && !ca.dir.path().join("runs/bad").exists());

    // Stop `long` after two completed rounds; `next` starts, on the same connections.
    wait_for("two rounds of `long`", 120, || {
        rounds(&ca.state, "long").iter().filter(|r| r.status == "completed").count() >= 2
    })
    .await;
    runs::stop(&ca.state, "long").unwrap();
    wait_for("`long` to stop", 30, || {
        let s = status(&ca.state, "long");
        assert_ne!(s, RunStatus::Finished, "`long` ended before the stop: {:?}", rounds(&ca.state, "long").len());
        s == RunStatus::Stopped
    })
    .await;
    let before = rounds(&ca.state, "long");
    let done_before = before.iter().filter(|r| r.status == "completed").count();
    assert!(done_before < 400, "stopped before its end: {done_before}");
    wait_for("`next` to finish", 120, || status(&ca.state, "next") == RunStatus::Finished).await;
    let next_rounds: Vec<u64> = rounds(&ca.state, "next").iter().map(|r| r.round).collect();
    assert_eq!(next_rounds, [1, 2], "a run numbers its rounds from 1");

    // Resume `long`: it continues from its last checkpoint to its 400th completed round.
    runs::resume(&ca.state, "long").unwrap();
    wait_for("`long` to finish", 300, || status(&ca.state, "long") == RunStatus::Finished).await;
    let after = rounds(&ca.state, "long");
    let numbers: Vec<u64> = after.iter().map(|r| r.round).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "each round once, in order: {numbers:?}");
    assert_eq!(after.iter().filter(|r| r.status == "completed").count(), 400);
    let last_before = before.iter().map(|r| r.round).max().unwrap();
    assert!(
        after.iter().filter(|r| r.round <= last_before).zip(&before).all(|(a, b)| a.round == b.round),
        "the rounds before the stop are kept as they were"
    );
    assert!(!task.is_finished(), "a server that hosts runs keeps serving after the last");
    // One connection each served every run: no client reconnected between runs.
    let mut clients = clients;
    for (i, client) in clients.iter_mut().enumerate() {
        let mut connected = 0;
        while let Ok(event) = client.events.try_recv() {
            connected += usize::from(matches!(event, cohort::client::daemon::ClientEvent::Connected));
        }
        assert_eq!(connected, 1, "client-{i} connected {connected} times");
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
}

/// A submitted run keeps its own copy of its initial model: the operator's file may change or
/// go after `submit`, and the run (and a resume of it) still starts from what was submitted.
#[test]
fn a_submitted_run_keeps_its_initial_model() {
    let ca = Ca::new();
    let files = tempfile::tempdir().unwrap();
    let path = run_file(files.path(), "first", 2);
    let model = cohort::common::model::Model::new(&spec(), &candle_core::Device::Cpu, 9).unwrap();
    std::fs::write(files.path().join("init.safetensors"), model.to_safetensors().unwrap()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("initial_model = \"init.safetensors\"\n{text}")).unwrap();
    // The database a server's first start makes.
    drop(Store::open(&ca.state.database()).unwrap());
    runs::submit(&ca.state, "first", &path).unwrap();
    // The operator's file is overwritten with NaN, then removed.
    std::fs::write(files.path().join("init.safetensors"), b"NaN").unwrap();
    std::fs::remove_file(files.path().join("init.safetensors")).unwrap();

    let dir = ca.state.run("first").dir;
    let kept = cohort::server::config::RunConfig::load(&dir.join(cohort::server::config::RUN_FILE), "first").unwrap();
    let initial = kept.initial_model.expect("the run keeps its initial model");
    assert!(initial.starts_with(&dir), "{initial:?} is not in the run's directory");
    let flat = cohort::server::config::read_initial_model(&initial, "mnist", model.layout()).unwrap();
    assert_eq!(flat, model.flat().unwrap());

    // One that does not fit the model is refused at submit, naming the file.
    let wrong = cohort::common::model::Model::new(
        &cohort::common::model::ModelSpec::from_toml(cohort::common::specs::MNIST_2NN).unwrap(),
        &candle_core::Device::Cpu,
        1,
    )
    .unwrap();
    std::fs::write(files.path().join("init.safetensors"), wrong.to_safetensors().unwrap()).unwrap();
    let err = runs::submit(&ca.state, "second", &path).unwrap_err().to_string();
    assert!(err.contains("init.safetensors") && err.contains("every tensor"), "{err}");
}
