//! Global class weights: before the first round (here: before every round), a secure-aggregation
//! round sums every client's label counts. The server's database and logs hold the population's histogram and never one
//! client's.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use cohort::common::data::Dataset;
use cohort::common::model::ModelSpec;
use cohort::common::train::{ClassWeighting, CountScope, LossConfig};
use cohort::common::trainer::HeadData;
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
    fed.secagg = SecAggConfig { degree: 2, threshold: Some(2), dropout_tolerance: Some(0.0), ..Default::default() };
    fed.train.loss.weighting = ClassWeighting::InverseFrequency;
    fed.train.loss.scope = CountScope::Global;
    fed.train.loss.recount_every = Some(1);
    let server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed, None);
    let histograms = [[37, 5, 0], [3, 41, 11], [0, 9, 23]];
    let clients: Vec<RunningClient> = histograms
        .iter()
        .enumerate()
        .map(|(i, &h)| start_client(ca.client(&format!("client-{i}")), server.addr, skewed(h, i as u64)))
        .collect();
    run_to_end(server, clients, 2, 3).await;

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

/// Two heads, only the second weighed by the population: the census sums that head's
/// histograms alone, over every client that labels it (zeros from the one that does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_census_counts_each_head_with_global_scope() {
    let ca = Ca::new();
    let spec = ModelSpec::from_toml(&format!("{SPEC}[[heads]]\nname = 'odd'\nclasses = 2\n")).unwrap();
    let mut fed = federation(1, 3, 3);
    fed.collection = Collection::Secure;
    fed.secagg = SecAggConfig { degree: 2, threshold: Some(2), dropout_tolerance: Some(0.0), ..Default::default() };
    let global =
        LossConfig { weighting: ClassWeighting::InverseFrequency, scope: CountScope::Global, ..Default::default() };
    fed.train.head_loss.insert("odd".into(), global);
    let server = start_server_with_spec(&ca, "127.0.0.1:0".parse().unwrap(), fed, None, spec);
    // Head `odd`: whether the label is odd, over the first `n` examples.
    let odd = |data: &Dataset, n: usize| {
        let labels: Vec<u32> = data.labels[..n].iter().map(|l| l % 2).collect();
        Arc::new(Dataset::new(data.features[..4 * n].to_vec(), vec![4], labels, 2).unwrap())
    };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut expected = [0u64; 2];
    let clients: Vec<RunningClient> = (0..3u64)
        .map(|i| {
            let data = dataset(40, i);
            let mut heads = vec![HeadData { head: Some("y".into()), data: Arc::new(data.clone()) }];
            if i > 0 {
                let labelled = odd(&data, 10 * i as usize);
                for (total, n) in expected.iter_mut().zip(labelled.label_counts()) {
                    *total += n;
                }
                heads.push(HeadData { head: Some("odd".into()), data: labelled });
            }
            let path = dirs[i as usize].path().join("personal-heads.safetensors");
            start_multitask_client(ca.client(&format!("client-{i}")), server.addr, heads, path)
        })
        .collect();
    run_to_end(server, clients, 1, 3).await;
    let store = Store::open(&ca.state.database()).unwrap();
    assert_eq!(store.last_census().unwrap(), Some((1, expected.to_vec())), "head `odd` alone");
    assert_eq!(expected.iter().sum::<u64>(), 30);
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
