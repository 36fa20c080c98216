//! Global class weights: before the first round (here: before every round), a secure-aggregation
//! round sums every client's label counts. The server's database and logs hold the population's histogram and never one
//! client's.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use cohort::common::data::Dataset;
use cohort::common::train::{ClassWeighting, CountScope};
use cohort::server::config::{Collection, SecAggConfig};
use cohort::server::store::Store;
use support::*;

/// Everything the server logs, at debug level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `counts[c]` examples of each class c, drawn from the seeded learnable set.
fn skewed(counts: [usize; 3], seed: u64) -> Dataset {
    let pool = dataset(4000, seed);
    let mut taken = [0usize; 3];
    let picked: Vec<usize> = (0..pool.len())
        .filter(|&i| {
            let c = pool.labels[i] as usize;
            taken[c] += 1;
            taken[c] <= counts[c]
        })
        .collect();
    pool.subset(&picked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_learns_only_the_population_histogram() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");

    let ca = Ca::new();
    let mut fed = federation(2, 3, 3);
    fed.collection = Collection::Secure;
    fed.secagg = SecAggConfig { degree: 2, threshold: 2, dropout_tolerance: 0.0, ..Default::default() };
    fed.train.loss.weighting = ClassWeighting::InverseFrequency;
    fed.train.loss.scope = CountScope::Global;
    fed.train.loss.recount_every = Some(1);
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed, None);
    let histograms = [[37, 5, 0], [3, 41, 11], [0, 9, 23]];
    let clients: Vec<RunningClient> = histograms
        .iter()
        .enumerate()
        .map(|(i, &h)| start_client(ca.client(&format!("client-{i}")), server.addr, skewed(h, i as u64)))
        .collect();
    for _ in 0..2 {
        let report = next_report(&mut server, 60).await;
        assert!(report.completed && report.participants == 3, "{report:?}");
    }
    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;

    let total = vec![40u64, 55, 34];
    let store = Store::open(&ca.state.database()).unwrap();
    assert_eq!(store.last_census().unwrap(), Some((2, total.clone())), "a census before each round");
    drop(store);

    // Neither the logs nor any byte of the server's state directory holds one client's counts.
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains(&format!("{total:?}")), "the population histogram is logged");
    let mut state_bytes = Vec::new();
    for entry in walk(ca.dir.path()) {
        state_bytes.extend(std::fs::read(entry).unwrap());
    }
    let state = String::from_utf8_lossy(&state_bytes);
    assert!(state.contains("[40,55,34]"), "the population histogram is stored");
    for h in histograms {
        for shown in [format!("{h:?}"), format!("{:?}", h.map(|c| c as u64)).replace(' ', "")] {
            assert!(!logs.contains(&shown), "a client's histogram {shown} appears in the server's logs");
            assert!(!state.contains(&shown), "a client's histogram {shown} appears in the server's state");
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
