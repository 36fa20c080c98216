//! Runs a scenario: a CA and certificates in a temporary directory, one server and N client
//! daemons in this process over real QUIC on 127.0.0.1, the data partitioned as the scenario
//! says; a per-round table, `report.json` and an accuracy plot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_client::config::Backoff;
use cohort_client::daemon::{self, ClientSetup, FaultHook, Step};
use cohort_common::data::Dataset;
use cohort_common::secagg::Phase;
use cohort_common::session::ClientSession;
use cohort_common::trainer::{HeadData, Trainer};
use cohort_io::files::DataSource;
use cohort_server::pki::{self, StatePaths};
use cohort_server::serve::{RoundReport, RunSetup, ServeSetup, Server};
use cohort_server::store::Enrolment;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::bundled::{self, DataSearch};
use crate::scenario::Scenario;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("data: {0}")]
    Data(String),
    #[error("setting up the federation: {0}")]
    Setup(String),
    #[error("server: {0}")]
    Server(#[from] cohort_server::serve::ServeError),
    #[error("writing the report to {path}: {problem}")]
    Report { path: String, problem: String },
}

/// Overrides and outputs of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub seed: Option<u64>,
    pub rounds: Option<u64>,
    /// Folder with the data sets (default: searched, see [`data_dir_for`]).
    pub data_dir: Option<PathBuf>,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Print the per-round table to stdout.
    pub table: bool,
    /// Multi-task scenarios: run only the clients of this head's task (the head trained by its
    /// own clients alone).
    pub only_task: Option<String>,
}

/// One round in the simulator's JSON report and table: a compact view of the coordinator's
/// [`RoundReport`] (the one record of a round), made by `From`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundSummary {
    pub round: u64,
    pub completed: bool,
    pub participants: usize,
    pub dropped: usize,
    pub seconds: f64,
    pub train_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub balanced_accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    /// Recall of each class of the first head on the test set.
    pub per_class_recall: Option<Vec<f64>>,
    /// Test accuracy of every head (multi-task models), by name.
    pub head_accuracy: Vec<(String, f64)>,
    /// Federated evaluation: each head's accuracy and balanced accuracy on the clients' own
    /// validation data, from the securely summed confusion matrices.
    pub federated: Vec<(String, f64, f64)>,
    /// Epsilon spent after the round (DP scenarios) against anyone who sees only the models
    /// (amplified by sampling) and against the server (the most any client spent), the round's
    /// clip norm, and the noisy fraction of updates it did not clip.
    pub epsilon: Option<f64>,
    pub epsilon_server: Option<f64>,
    pub clip: Option<f64>,
    pub unclipped: Option<f64>,
    /// Clients caught cheating in the round's secure aggregation.
    pub cheaters: usize,
}

impl From<&RoundReport> for RoundSummary {
    fn from(r: &RoundReport) -> Self {
        RoundSummary {
            round: r.round,
            completed: r.completed,
            participants: r.participants,
            dropped: r.dropped.len(),
            seconds: r.seconds,
            train_loss: r.train_loss,
            test_accuracy: r.test.as_ref().map(|m| m.accuracy),
            test_loss: r.test.as_ref().map(|m| m.loss),
            balanced_accuracy: r.test.as_ref().map(|m| m.balanced_accuracy),
            macro_f1: r.test.as_ref().map(|m| m.macro_f1),
            per_class_recall: r.test.as_ref().map(|m| m.per_class_recall.clone()),
            head_accuracy: r.head_tests.iter().map(|(h, m)| (h.clone(), m.accuracy)).collect(),
            federated: r.federated.iter().map(|(h, m)| (h.clone(), m.accuracy, m.balanced_accuracy)).collect(),
            epsilon: r.epsilon,
            epsilon_server: r.epsilon_server,
            clip: r.clip,
            unclipped: r.unclipped,
            cheaters: r.cheaters.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub seed: u64,
    pub model_params: usize,
    pub train_examples: usize,
    pub test_examples: usize,
    pub rounds: Vec<RoundSummary>,
    pub final_accuracy: Option<f64>,
    pub best_accuracy: Option<f64>,
    /// First round whose test accuracy reached `target_accuracy`.
    pub target_reached_at: Option<u64>,
    pub median_round_seconds: f64,
    pub wall_seconds: f64,
    /// Epsilon spent in all (DP scenarios) against anyone who sees only the models, and against
    /// the server, at `delta`.
    pub epsilon: Option<f64>,
    pub epsilon_server: Option<f64>,
    /// The configured delta plus what too-small samples add.
    pub delta: Option<f64>,
    /// The device the simulated clients trained on, in words.
    pub device: String,
    /// Each personal head's largest change in the server's last checkpoint against the initial
    /// model: 0 when no client ever sent it.
    pub personal_heads_moved: Vec<(String, f64)>,
    /// The global model after the last completed round (safetensors, the spec in its metadata),
    /// checked as the server's `export` checks it; written to `--out` as `model.safetensors`.
    #[serde(skip)]
    pub final_model: Option<Vec<u8>>,
}

/// Simulated clients train in parallel, one per core; candle's own threads inside each
/// training then only contend (`cargo bench -p cohort-scenarios --bench train_steps`: one 2NN
/// client at batch 10 runs 929 steps/s with candle's threads, 1,550 with one). Sets
/// `RAYON_NUM_THREADS=1` unless the user chose a value.
/// Call at the start of `main`, before other threads exist.
pub fn one_thread_per_client() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

/// Simulated clients sharing one QUIC endpoint (one UDP socket).
const CLIENTS_PER_ENDPOINT: usize = 50;

/// Above this many clients, each rebuilds its model every round instead of keeping it.
const KEEP_MODELS_UP_TO: usize = 1000;

/// The data folder that holds MNIST, searched as [`DataSearch::from_environment`] says
/// (`COHORT_DATA`, beside the executable, system-wide, the source tree); the source tree's
/// `scenarios/data` when none does.
pub fn default_data_dir() -> PathBuf {
    DataSearch::from_environment(None).find(&bundled::MNIST).unwrap_or_else(|_| bundled::compiled_in_data_dir())
}

/// The data folder for a scenario's `data.dataset`: `explicit` (`--data`) or else the first
/// place of [`DataSearch::from_environment`] that has it; the error names every place looked.
pub fn data_dir_for(dataset: &str, explicit: Option<&Path>) -> Result<PathBuf, RunError> {
    match bundled::DataSet::named(dataset) {
        Some(set) => DataSearch::from_environment(explicit).find(&set).map_err(RunError::Data),
        None => Ok(explicit.map_or_else(bundled::compiled_in_data_dir, Path::to_path_buf)),
    }
}

fn load_mnist(dir: &Path, train: bool) -> Result<Dataset, RunError> {
    let (img, lbl) = if train {
        ("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz")
    } else {
        ("t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz")
    };
    let mnist = dir.join("mnist");
    DataSource::Idx { images: mnist.join(img), labels: mnist.join(lbl), classes: 10 }
        .load()
        .map_err(|e| RunError::Data(format!("{e} (set --data or COHORT_DATA to the folder holding mnist/)")))
}

/// Wine Quality (red): 11 features, quality 3..8 as classes 0..5.
fn load_winequality(dir: &Path) -> Result<Dataset, RunError> {
    DataSource::Csv {
        path: dir.join("winequality").join("winequality-red.csv.gz"),
        options: cohort_common::data::CsvOptions {
            label_column: "quality".into(),
            label_values: Some((3..=8).collect()),
            classes: None,
            delimiter: None,
        },
    }
    .load()
    .map_err(|e| RunError::Data(format!("{e} (set --data or COHORT_DATA to the folder holding winequality/)")))
}

/// Splits off `fraction` of each class (at least one example of a class with two or more) as
/// a test set, seeded: (train, test).
fn stratified_split(data: &Dataset, fraction: f64, rng: &mut impl Rng) -> (Dataset, Dataset) {
    use rand::seq::SliceRandom;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for class in 0..data.classes as u32 {
        let mut members: Vec<usize> = (0..data.len()).filter(|&i| data.labels[i] == class).collect();
        members.shuffle(rng);
        let held = if members.len() >= 2 { ((members.len() as f64 * fraction).round() as usize).max(1) } else { 0 };
        test.extend_from_slice(&members[..held]);
        train.extend_from_slice(&members[held..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (data.subset(&train), data.subset(&test))
}

/// Keeps `n_0 * ratio^(-c / (K - 1))` examples of class c (the first ones), where n_0 is the
/// size of class 0.
fn long_tailed(data: &Dataset, ratio: f64) -> Dataset {
    let k = data.classes.max(2);
    let head = data.labels.iter().filter(|&&l| l == 0).count() as f64;
    let mut kept = vec![0usize; data.classes];
    let keep: Vec<usize> =
        (0..data.classes).map(|c| (head * ratio.powf(-(c as f64) / (k - 1) as f64)).round() as usize).collect();
    let indices: Vec<usize> = (0..data.len())
        .filter(|&i| {
            let c = data.labels[i] as usize;
            kept[c] += 1;
            kept[c] <= keep[c]
        })
        .collect();
    data.subset(&indices)
}

fn first(data: Dataset, n: Option<usize>) -> Dataset {
    match n {
        Some(n) if n < data.len() => data.subset(&(0..n).collect::<Vec<_>>()),
        _ => data,
    }
}

/// Runs the scenario to its last round.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> Result<Report, RunError> {
    let wall = Instant::now();
    let mut federation = scenario.federation.clone();
    if let Some(seed) = options.seed {
        federation.seed = seed;
    }
    if let Some(rounds) = options.rounds {
        federation.rounds = rounds;
    }
    // The clients that run: all, or with --only-task those of one task (with the data they have
    // in the full scenario).
    let mut active = 0..scenario.clients;
    if let Some(head) = &options.only_task {
        let index =
            scenario.tasks.iter().position(|t| &t.head == head).ok_or_else(|| {
                RunError::Setup(format!("--only-task {head}: the scenario has no task for that head"))
            })?;
        let start: usize = scenario.tasks[..index].iter().map(|t| t.clients).sum();
        active = start..start + scenario.tasks[index].clients;
        federation.clients_per_round = federation.clients_per_round.min(active.len());
        federation.min_clients = federation.min_clients.min(federation.clients_per_round);
    }
    federation.start_after_clients = Some(active.len());
    let seed = federation.seed;
    let spec = scenario.model_spec().map_err(|e| RunError::Setup(e.to_string()))?;
    let synthetic = scenario.data.dataset == "synthetic";
    let (train, test, parts) = if synthetic {
        let classes = spec.heads[0].classes;
        let width: usize = spec.input_shape.iter().product();
        let n = scenario.data.synthetic_examples.max(1);
        let one = Dataset::new(vec![0.0; n * width], spec.input_shape.clone(), vec![0; n], classes)
            .map_err(|e| RunError::Data(e.to_string()))?;
        let parts = vec![(0..n).collect::<Vec<_>>(); scenario.clients];
        (one, None, parts)
    } else {
        let data_dir = data_dir_for(&scenario.data.dataset, options.data_dir.as_deref())?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (train, test) = if scenario.data.dataset == "winequality" {
            stratified_split(&load_winequality(&data_dir)?, scenario.data.test_fraction, &mut rng)
        } else {
            (load_mnist(&data_dir, true)?, load_mnist(&data_dir, false)?)
        };
        let train = match scenario.data.longtail_ratio {
            Some(ratio) => long_tailed(&train, ratio),
            None => train,
        };
        let train = first(train, scenario.data.train_examples);
        let test = first(test, scenario.data.test_examples);
        let parts = scenario
            .partition
            .split(&train.labels, train.classes, scenario.clients, &mut rng)
            .map_err(|e| RunError::Data(e.to_string()))?;
        (train, Some(test), parts)
    };
    // Multi-task: which head each client labels, and each head's test set.
    let task_of = |client: usize| {
        let mut first = 0;
        scenario.tasks.iter().find(|t| {
            first += t.clients;
            client < first
        })
    };
    let head_classes: Vec<(String, usize)> = spec.heads.iter().map(|h| (h.name.clone(), h.classes)).collect();
    let labelled = |data: &Dataset, task: &crate::scenario::TaskChoice| -> Result<Dataset, RunError> {
        let classes = head_classes.iter().find(|(h, _)| *h == task.head).map_or(data.classes, |(_, c)| *c);
        match &task.map {
            Some(map) => data.map_labels(map, classes).map_err(|e| RunError::Data(e.to_string())),
            None => Ok(data.clone()),
        }
    };
    let mut test = test;
    let mut head_tests = Vec::new();
    if let (Some(full), false) = (&test, scenario.tasks.is_empty()) {
        let first_head = &head_classes[0].0;
        let mut first_test = None;
        let only = options.only_task.as_ref();
        for task in scenario.tasks.iter().filter(|t| only.is_none_or(|h| *h == t.head)) {
            let mapped = labelled(full, task)?;
            if &task.head == first_head {
                first_test = Some(mapped);
            } else {
                head_tests.push((task.head.clone(), mapped));
            }
        }
        test = first_test;
    }
    let (device, device_name) =
        cohort_client::device::select(&scenario.device).map_err(|e| RunError::Setup(e.to_string()))?;
    tracing::info!(device = %device_name, clients = scenario.clients, "simulated clients train on {device_name}");

    let dir = tempfile::tempdir().map_err(|e| RunError::Setup(e.to_string()))?;
    let state = StatePaths::new(dir.path());
    pki::init(&state, &scenario.name, &["localhost".into()], None).map_err(|e| RunError::Setup(e.to_string()))?;
    let (events_tx, mut events) = mpsc::unbounded_channel::<RoundReport>();
    let initial_model = cohort_common::model::Model::new(&spec, &candle_core::Device::Cpu, federation.seed)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let model_params = initial_model.layout().total_len();
    let server = Server::bind(ServeSetup {
        identity: pki::server_identity(&state).map_err(|e| RunError::Setup(e.to_string()))?,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        run: Some(RunSetup {
            name: scenario.name.clone(),
            spec,
            federation: federation.clone(),
            test_data: test.clone(),
            head_tests: head_tests.clone(),
            initial_model: None,
        }),
        keep_serving: false,
        events: Some(events_tx),
        state: StatePaths::new(dir.path()),
        metrics_listen: None,
    })?;
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let server_task = tokio::spawn(server.run(shutdown.clone()));

    // One training at a time per core: more only thrashes the caches.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gate = Arc::new(Semaphore::new(cores));
    let clients_stop = CancellationToken::new();
    let crashes = (scenario.faults.dropout_fraction > 0.0)
        .then(|| Crashes::new(scenario.faults.dropout_fraction, federation.clients_per_round, seed));
    let mut clients = Vec::with_capacity(scenario.clients);
    let mut endpoint = None;
    let mut verifier: Option<Arc<dyn cohort_common::secagg::PeerVerifier + Send + Sync>> = None;
    for (i, part) in parts.iter().enumerate().filter(|(i, _)| active.contains(i)) {
        // Each endpoint holds megabytes of receive buffers: clients share one per group.
        if (i - active.start) % CLIENTS_PER_ENDPOINT == 0 {
            endpoint = Some(cohort_io::client_endpoint(false).map_err(|e| RunError::Setup(e.to_string()))?);
        }
        let id = format!("client-{i:04}");
        let bundle = pki::make_bundle(&state, &id, pki::CLIENT_DAYS, Enrolment::New)
            .map_err(|e| RunError::Setup(e.to_string()))?;
        let identity =
            cohort_io::Identity::from_bundle(bundle.as_bytes()).map_err(|e| RunError::Setup(e.to_string()))?;
        let mut keys = cohort_client::secure_keys(&identity).map_err(|e| RunError::Setup(e.to_string()))?;
        // Simulated clients trust one CA: one verifier remembers every certificate it checked.
        keys.verifier = verifier.get_or_insert_with(|| keys.verifier.clone()).clone();
        let setup = ClientSetup {
            identity,
            server: addr,
            server_name: "localhost".into(),
            session: ClientSession::new(id.clone()).with_secure_keys(keys),
            trainer: {
                let mut p = match task_of(i) {
                    None => Trainer::new(id, Arc::new(train.subset(part)), device.clone()),
                    Some(task) => {
                        let kept = task.examples_per_client.map_or(part.len(), |n| n.min(part.len()));
                        let data = labelled(&train.subset(&part[..kept]), task)?;
                        let head = HeadData { head: Some(task.head.clone()), data: Arc::new(data) };
                        Trainer::with_heads(id, vec![head], device.clone())
                    }
                }
                .with_validation_fraction(scenario.data.validation_fraction);
                if synthetic {
                    p = p.with_synthetic_updates();
                }
                // Thousands of small clients: rebuilding the model each round is cheaper than
                // keeping one per client in memory.
                if scenario.clients > KEEP_MODELS_UP_TO {
                    p = p.without_model_cache();
                }
                Box::new(p)
            },
            device_name: device_name.clone(),
            backoff: Backoff { initial_ms: 50, max_ms: 1000 },
            train_gate: Some(gate.clone()),
            events: None,
            fault: crashes.clone().map(|c| c.hook(i as u64)),
            tamper: None,
            ledger: None,
            endpoint: endpoint.clone(),
            personal_path: None,
        };
        clients.push(tokio::spawn(daemon::run(setup, clients_stop.clone())));
    }

    let progress = (options.progress && console_is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(federation.rounds);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let print = |line: String| match &progress {
        Some(bar) => bar.println(line),
        None => println!("{line}"),
    };
    let private = federation.dp.is_some();
    if options.table {
        let dp_columns = if private {
            format!(" {:>8} {:>8} {:>8} {:>9}", "eps.mdl", "eps.srv", "clip", "unclipped")
        } else {
            String::new()
        };
        print(format!(
            "{:>6} {:>13} {:>8} {:>10} {:>9} {:>9}{dp_columns}",
            "round", "participants", "seconds", "accuracy", "loss", "bal.acc"
        ));
    }
    let mut rounds = Vec::new();
    let mut last_delta = None;
    while let Some(r) = events.recv().await {
        let row = RoundSummary::from(&r);
        if let Some(delta) = r.delta {
            last_delta = Some(delta);
        }
        if options.table {
            let f = |v: Option<f64>, pct: bool| {
                v.map_or("-".to_string(), |v| if pct { format!("{:.2}%", v * 100.0) } else { format!("{v:.4}") })
            };
            let dp_columns = if private {
                let g = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
                format!(
                    " {:>8} {:>8} {:>8} {:>9}",
                    g(row.epsilon),
                    g(row.epsilon_server),
                    g(row.clip),
                    g(row.unclipped)
                )
            } else {
                String::new()
            };
            print(format!(
                "{:>6} {:>13} {:>8.3} {:>10} {:>9} {:>9}{dp_columns}",
                row.round,
                format!("{}/{}", row.participants, r.cohort),
                row.seconds,
                f(row.test_accuracy, true),
                f(row.test_loss, false),
                f(row.balanced_accuracy, true)
            ));
        }
        if let Some(bar) = &progress {
            bar.set_position(row.round);
            if let Some(a) = row.test_accuracy {
                bar.set_message(format!("accuracy {:.2}%", a * 100.0));
            }
        }
        rounds.push(row);
    }
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    let served = server_task.await.map_err(|e| RunError::Setup(format!("server task: {e}")));
    clients_stop.cancel();
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
    }
    served??;

    let last_completed = rounds.iter().rev().find(|r| r.completed).map(|r| r.round);
    // Read now: the server's state directory is temporary.
    let final_model = match last_completed {
        Some(round) => {
            let name = format!("checkpoints/round-{round:06}.safetensors");
            let (bytes, _) = cohort_server::resume::read_checkpoint(&state, &name, None)
                .map_err(|e| RunError::Setup(format!("the final model: {e}")))?;
            Some(bytes)
        }
        None => None,
    };
    let personal_heads_moved = match last_completed {
        Some(round) => personal_heads_moved(&initial_model, &state.checkpoint(round))?,
        None => Vec::new(),
    };
    let accuracies: Vec<(u64, f64)> = rounds.iter().filter_map(|r| r.test_accuracy.map(|a| (r.round, a))).collect();
    let mut seconds: Vec<f64> = rounds.iter().map(|r| r.seconds).collect();
    seconds.sort_by(f64::total_cmp);
    Ok(Report {
        seed,
        model_params,
        train_examples: train.len(),
        test_examples: test.as_ref().map_or(0, Dataset::len),
        final_accuracy: accuracies.last().map(|a| a.1),
        best_accuracy: accuracies.iter().map(|a| a.1).max_by(f64::total_cmp),
        target_reached_at: scenario.target_accuracy.and_then(|t| accuracies.iter().find(|a| a.1 >= t).map(|a| a.0)),
        median_round_seconds: if seconds.is_empty() { 0.0 } else { seconds[seconds.len() / 2] },
        wall_seconds: wall.elapsed().as_secs_f64(),
        epsilon: rounds.iter().rev().find_map(|r| r.epsilon),
        epsilon_server: rounds.iter().rev().find_map(|r| r.epsilon_server),
        delta: last_delta,
        device: device_name,
        personal_heads_moved,
        final_model,
        rounds,
        scenario: Scenario { federation, ..scenario.clone() },
    })
}

/// How far each personal head of the checkpoint at `path` is from `initial`'s (largest change).
fn personal_heads_moved(initial: &cohort_common::model::Model, path: &Path) -> Result<Vec<(String, f64)>, RunError> {
    let layout = initial.layout();
    if !layout.segments().iter().any(|s| s.personal) {
        return Ok(Vec::new());
    }
    let read = |e: String| RunError::Setup(format!("the server's checkpoint {}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| read(e.to_string()))?;
    let last = cohort_common::model::flat_from_safetensors(layout, &bytes).map_err(|e| read(e.to_string()))?;
    let first = initial.flat().map_err(|e| read(e.to_string()))?;
    Ok(layout
        .segments()
        .iter()
        .filter(|s| s.personal)
        .map(|s| {
            let range = s.offset..s.offset + s.len;
            let moved = first[range.clone()].iter().zip(&last[range]).map(|(a, b)| (a - b).abs() as f64);
            (s.name.clone(), moved.fold(0.0, f64::max))
        })
        .collect())
}

/// One round's crash bookkeeping: clients seen, clients doomed, each decided client's fate.
#[derive(Default)]
struct RoundCrashes {
    seen: usize,
    doomed: usize,
    fates: HashMap<u64, Option<Step>>,
}

/// Chooses, in every round, exactly `floor(fraction x cohort)` clients to crash, each at a
/// random step; a client is decided on the first time it reports in a round.
#[derive(Clone)]
struct Crashes {
    quota: usize,
    cohort: usize,
    seed: u64,
    /// Crash bookkeeping by round.
    state: Arc<std::sync::Mutex<HashMap<u64, RoundCrashes>>>,
}

impl Crashes {
    fn new(fraction: f64, cohort: usize, seed: u64) -> Self {
        Self { quota: (fraction * cohort as f64).floor() as usize, cohort, seed, state: Arc::default() }
    }

    fn hook(&self, client: u64) -> FaultHook {
        let this = self.clone();
        Arc::new(move |round, step| {
            let mut state = this.state.lock().expect("crash state");
            let RoundCrashes { seen, doomed, fates } = state.entry(round).or_default();
            let fate = *fates.entry(client).or_insert_with(|| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(this.seed ^ round.rotate_left(32) ^ client);
                let left = this.cohort.saturating_sub(*seen).max(1);
                *seen += 1;
                let need = this.quota.saturating_sub(*doomed);
                if need > 0 && rng.random_range(0..left) < need {
                    *doomed += 1;
                    let steps = [
                        Step::Secure(Phase::Advertise),
                        Step::Secure(Phase::ShareKeys),
                        Step::Secure(Phase::MaskedInput),
                        Step::Secure(Phase::Unmask),
                        Step::Update,
                    ];
                    Some(steps[rng.random_range(0..4)])
                } else {
                    None
                }
            });
            // In a plain round the only step is the update.
            fate.is_some_and(|f| f == step || (step == Step::Update && f != Step::Update))
        })
    }
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(counts: &[usize]) -> Dataset {
        let labels: Vec<u32> = counts.iter().enumerate().flat_map(|(c, &n)| std::iter::repeat_n(c as u32, n)).collect();
        let n = labels.len();
        Dataset::new((0..n).map(|i| i as f32).collect(), vec![1], labels, counts.len()).unwrap()
    }

    #[test]
    fn the_stratified_split_holds_out_each_class_in_proportion() {
        let data = labelled(&[10, 53, 681, 1]);
        let (train, test) = stratified_split(&data, 0.2, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        assert_eq!(test.label_counts(), vec![2, 11, 136, 0]);
        assert_eq!(train.label_counts(), vec![8, 42, 545, 1]);
        let mut all: Vec<f32> = train.features.iter().chain(&test.features).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, data.features, "every example lands on exactly one side");
    }

    #[test]
    fn long_tailed_classes_decay_to_the_ratio() {
        let data = labelled(&[1000, 1000, 1000]);
        assert_eq!(long_tailed(&data, 100.0).label_counts(), vec![1000, 100, 10]);
    }
}
