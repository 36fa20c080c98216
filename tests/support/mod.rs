//! Shared pieces of the loopback tests: a CA, a server and clients on 127.0.0.1, port 0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use cohort::client::config::Backoff;
use cohort::client::daemon::{self, ClientError, ClientEvent, ClientSetup, FaultHook, SharedLedger, TamperHook};
use cohort::common::data::Dataset;
use cohort::common::model::ModelSpec;
use cohort::common::session::ClientSession;
use cohort::common::strategy::StrategyConfig;
use cohort::common::train::TrainConfig;
use cohort::common::trainer::{HeadData, Trainer};
use cohort::common::wire::{RoundPlan, ServerMsg};
use cohort::io::Identity;
use cohort::server::config::{Collection, Federation, DEFAULT_RUN};
use cohort::server::pki::{self, StatePaths};
use cohort::server::serve::{RoundReport, RunSetup, ServeError, ServeSetup, Server};
use cohort::server::store::Enrolment;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SPEC: &str = "name = 'tiny'\ninput_shape = [4]\n[[trunk]]\nkind = 'linear'\nout = 8\n[[trunk]]\nkind = 'relu'\n[[heads]]\nname = 'y'\nclasses = 3\n";

pub fn spec() -> ModelSpec {
    ModelSpec::from_toml(SPEC).unwrap()
}

/// A seeded, learnable data set: the class is the index of the largest of the first 3 features.
pub fn dataset(n: usize, seed: u64) -> Dataset {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut features = Vec::with_capacity(n * 4);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let x: [f32; 4] = [rng.random(), rng.random(), rng.random(), rng.random()];
        let label = (0..3).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap() as u32;
        features.extend_from_slice(&x);
        labels.push(label);
    }
    Dataset::new(features, vec![4], labels, 3).unwrap()
}

pub fn federation(rounds: u64, clients: usize, min: usize) -> Federation {
    Federation {
        rounds,
        clients_per_round: clients,
        min_clients: min,
        start_after_clients: Some(clients),
        round_timeout_secs: 20.0,
        wait_for_clients_secs: 20.0,
        seed: 42,
        collection: Collection::Plain,
        secagg: Default::default(),
        train: TrainConfig { epochs: 2, batch_size: 8, lr: 0.1, momentum: 0.5, ..Default::default() },
        strategy: StrategyConfig::default(),
        dp: None,
        evaluate_every: None,
        max_consecutive_aborts: 5,
        backoff: Default::default(),
    }
}

/// The global model before round 1 and the plan of round 1 for a plain federation `fed`, made
/// by the coordinator itself (so tests never re-implement plan building).
pub fn first_plan(fed: &Federation) -> (Vec<f32>, RoundPlan) {
    use cohort::common::coordinator::{Coordinator, CoordinatorSetup, Output, Resume};
    let model = cohort::common::model::Model::new(&spec(), &Device::Cpu, fed.seed).unwrap();
    let initial = model.flat().unwrap();
    let mut fed = fed.clone();
    fed.collection = Collection::Plain;
    fed.dp = None;
    let setup = CoordinatorSetup {
        run: cohort::server::config::DEFAULT_RUN.into(),
        federation: fed.clone(),
        spec: spec(),
        segments: model.layout().segments().to_vec(),
        initial: initial.clone(),
        resume: Resume::default(),
        verifier: std::sync::Arc::new(NoVerifier),
        rng: Box::new(rand::rngs::StdRng::seed_from_u64(1)),
    };
    let now = std::time::Instant::now();
    let mut coordinator = Coordinator::new(setup, now).unwrap();
    for i in 0..fed.start_after_clients.unwrap_or(fed.min_clients).max(fed.min_clients) {
        coordinator.client_connected(&format!("client-{i}"), now);
    }
    coordinator.handle_timeout(now);
    let plan = std::iter::from_fn(|| coordinator.poll_output())
        .find_map(|o| match o {
            Output::Send(request) => match request.msg.as_ref() {
                ServerMsg::Plan(plan) => Some(plan.clone()),
                _ => None,
            },
            _ => None,
        })
        .expect("the first round's plan");
    (initial, plan)
}

/// Plain federations check no signatures.
struct NoVerifier;

impl cohort::common::secagg::PeerVerifier for NoVerifier {
    fn verify(&self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> Result<(), cohort::common::secagg::Rejection> {
        Err(cohort::common::secagg::Rejection::Signature("plain federations check no signatures".into()))
    }
    fn verify_signature(&self, _: &[u8], _: &[u8], _: &[u8]) -> Result<(), String> {
        Err("plain federations check no signatures".into())
    }
}

pub struct Ca {
    pub dir: tempfile::TempDir,
    pub state: StatePaths,
}

impl Ca {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path());
        pki::init(&state, "test", &["localhost".into()], None).unwrap();
        Self { dir, state }
    }

    /// A registered certificate for `id` (another one if `id` has some: renewal).
    pub fn client(&self, id: &str) -> Identity {
        Identity::from_bundle(pki::make_bundle(&self.state, id, pki::CLIENT_DAYS, Enrolment::Renew).unwrap().as_bytes())
            .unwrap()
    }
}

pub struct RunningServer {
    pub addr: SocketAddr,
    /// The Prometheus endpoint, when started with one.
    pub metrics: Option<SocketAddr>,
    pub reports: mpsc::UnboundedReceiver<RoundReport>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<Vec<RoundReport>, ServeError>>,
}

pub fn start_server(ca: &Ca, listen: SocketAddr, federation: Federation, test_data: Option<Dataset>) -> RunningServer {
    start_server_with_spec(ca, listen, federation, test_data, spec())
}

pub fn start_server_with_spec(
    ca: &Ca,
    listen: SocketAddr,
    federation: Federation,
    test_data: Option<Dataset>,
    spec: ModelSpec,
) -> RunningServer {
    start_server_with_metrics(ca, listen, federation, test_data, spec, None)
}

pub fn start_server_with_metrics(
    ca: &Ca,
    listen: SocketAddr,
    federation: Federation,
    test_data: Option<Dataset>,
    spec: ModelSpec,
    metrics_listen: Option<SocketAddr>,
) -> RunningServer {
    let (tx, reports) = mpsc::unbounded_channel();
    // A just-stopped server's socket can take a moment to be released: retry briefly.
    let mut attempts = 0;
    let server = loop {
        let bound = Server::bind(ServeSetup {
            state: StatePaths::new(ca.dir.path()),
            identity: pki::server_identity(&ca.state).unwrap(),
            listen,
            run: Some(RunSetup {
                name: DEFAULT_RUN.into(),
                spec: spec.clone(),
                federation: federation.clone(),
                test_data: test_data.clone(),
                head_tests: Vec::new(),
                initial_model: None,
            }),
            keep_serving: false,
            events: Some(tx.clone()),
            metrics_listen,
        });
        match bound {
            Ok(server) => break server,
            Err(e) if attempts < 50 && e.to_string().contains("in use") => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (addr, metrics) = (server.local_addr(), server.metrics_addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    RunningServer { addr, metrics, reports, shutdown, task }
}

pub struct RunningClient {
    pub events: mpsc::UnboundedReceiver<ClientEvent>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), ClientError>>,
}

/// Clients `client-I` with `dataset(N, I)` for each `(I, N)`.
pub fn start_sized_clients(ca: &Ca, addr: SocketAddr, sizes: &[(u64, usize)]) -> Vec<RunningClient> {
    sizes.iter().map(|&(i, n)| start_client(ca.client(&format!("client-{i}")), addr, dataset(n, i))).collect()
}

pub fn start_client(identity: Identity, addr: SocketAddr, data: Dataset) -> RunningClient {
    start_client_with(identity, addr, data, None)
}

pub fn start_client_with(
    identity: Identity,
    addr: SocketAddr,
    data: Dataset,
    fault: Option<FaultHook>,
) -> RunningClient {
    spawn_client(identity, addr, data, fault, None)
}

/// A client with its own privacy ledger.
pub fn start_private_client(
    identity: Identity,
    addr: SocketAddr,
    data: Dataset,
    ledger: SharedLedger,
) -> RunningClient {
    spawn_client(identity, addr, data, None, Some(ledger))
}

/// A client that rewrites its replies with `tamper` before sending them (a cheater).
pub fn start_cheating_client(identity: Identity, addr: SocketAddr, data: Dataset, tamper: TamperHook) -> RunningClient {
    let id = identity.subject().unwrap();
    let trainer = Trainer::new(id, Arc::new(data), Device::Cpu);
    spawn(identity, addr, trainer, None, None, None, Some(tamper))
}

/// A client labelling several heads, keeping its personal heads at `personal_path`.
pub fn start_multitask_client(
    identity: Identity,
    addr: SocketAddr,
    heads: Vec<HeadData>,
    personal_path: std::path::PathBuf,
) -> RunningClient {
    let id = identity.subject().unwrap();
    let trainer = Trainer::with_heads(id, heads, Device::Cpu);
    spawn(identity, addr, trainer, None, None, Some(personal_path), None)
}

fn spawn_client(
    identity: Identity,
    addr: SocketAddr,
    data: Dataset,
    fault: Option<FaultHook>,
    ledger: Option<SharedLedger>,
) -> RunningClient {
    let id = identity.subject().unwrap();
    spawn(identity, addr, Trainer::new(id, Arc::new(data), Device::Cpu), fault, ledger, None, None)
}

fn spawn(
    identity: Identity,
    addr: SocketAddr,
    trainer: Trainer,
    fault: Option<FaultHook>,
    ledger: Option<SharedLedger>,
    personal_path: Option<std::path::PathBuf>,
    tamper: Option<TamperHook>,
) -> RunningClient {
    let (tx, events) = mpsc::unbounded_channel();
    let keys = cohort::client::secure_keys(&identity).unwrap();
    let id = identity.subject().unwrap();
    let setup = ClientSetup {
        identity,
        server: addr,
        server_name: "localhost".into(),
        session: ClientSession::new(id).with_secure_keys(keys),
        trainer: Box::new(trainer),
        device_name: "cpu".into(),
        backoff: Backoff { initial_ms: 50, max_ms: 400 },
        train_gate: None,
        events: Some(tx),
        fault,
        tamper,
        ledger,
        endpoint: None,
        personal_path,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(daemon::run(setup, shutdown.clone()));
    RunningClient { events, shutdown, task }
}

impl RunningClient {
    /// Waits for an event that matches, failing the test after `secs`.
    pub async fn wait_for(&mut self, secs: u64, what: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
        tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                let e = self.events.recv().await.expect("client event stream ended");
                if what(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("timed out waiting for a client event")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Stops many clients at once.
    pub async fn stop_all(clients: Vec<RunningClient>) {
        for c in &clients {
            c.shutdown.cancel();
        }
        for c in clients {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.task).await;
        }
    }
}

pub async fn next_report(server: &mut RunningServer, secs: u64) -> RoundReport {
    tokio::time::timeout(Duration::from_secs(secs), server.reports.recv())
        .await
        .expect("timed out waiting for a round")
        .expect("server stopped")
}

/// Runs a federation to its end: `rounds` reports, each of a completed round with
/// `participants` updates; then the server stops by itself and the clients are stopped.
pub async fn run_to_end(
    mut server: RunningServer,
    clients: Vec<RunningClient>,
    rounds: usize,
    participants: usize,
) -> Vec<RoundReport> {
    let mut reports = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let report = next_report(&mut server, 60).await;
        assert!(report.completed && report.participants == participants, "{report:?}");
        reports.push(report);
    }
    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
    reports
}

/// Shows the federation's logs when `RUST_LOG` is set.
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    }
}
