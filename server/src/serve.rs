//! The server: it hosts the federation's runs, one after another (server.toml's first, then
//! those submitted with `cohort-server submit`, in order), keeping its endpoint, its clients'
//! connections and the CA between them. [`Server::bind`] takes the state directory's lock and
//! opens the endpoint; [`Server::run`] starts the accept loop, the revocation watch, metrics and
//! `live.json`, hosts the queued runs, and closes every connection with the reason clients act
//! on (the federation is finished, or the server is only stopping). Each run is driven by
//! `driver`: the event loop around the run's state machine
//! ([`cohort_common::coordinator::Coordinator`]), which makes no protocol decision.

mod driver;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use cohort_common::data::Dataset;
use cohort_common::model::{Model, ModelSpec};
use cohort_common::train::TrainError;
use cohort_common::wire::{self, ClientId};
use cohort_io::secagg_keys::CaVerifier;
use cohort_io::{files, unix_now, Identity, NetError};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use cohort_common::coordinator::RoundReport;

use crate::config::{Federation, RunConfig, RUN_FILE};
use crate::connections::{accept_loop, watch_revocations, Registry};
use crate::live::LiveStatus;
use crate::metrics::ServerMetrics;
use crate::pki::StatePaths;
use crate::store::{RunRow, RunStatus, Store, StoreError};

/// How often a running server looks for submitted runs and stop requests in cohort.db.
const RUN_POLL: Duration = Duration::from_secs(1);
/// How long a stopping server waits for its connections to drain (three probe timeouts each:
/// milliseconds on a LAN, a few seconds on a congested path) before it exits.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] files::FileError),
    #[error("model: {0}")]
    Model(#[from] cohort_common::model::ModelError),
    #[error("evaluation: {0}")]
    Train(#[from] TrainError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("only {connected} clients connected within {waited:.0} s, {needed} are needed; start more clients or lower federation.min_clients / start_after_clients")]
    NotEnoughClients { connected: usize, needed: usize, waited: f64 },
    /// `federation.max_consecutive_aborts` rounds in a row aborted: the message says why the
    /// last one did.
    #[error("{0}")]
    Aborts(String),
    #[error("checkpoint {path}: {problem}")]
    Checkpoint { path: String, problem: String },
    #[error("metrics_listen {addr}: {problem}; choose another address or leave metrics_listen out")]
    Metrics { addr: SocketAddr, problem: String },
}

/// Everything `serve` needs, already parsed.
pub struct ServeSetup {
    pub state: StatePaths,
    pub identity: Identity,
    pub listen: SocketAddr,
    /// The run server.toml describes, run first (`None`: submitted runs only).
    pub run: Option<RunSetup>,
    /// After the last run, wait for more (`true`), or end the federation: clients are told it
    /// is finished, and stop.
    pub keep_serving: bool,
    /// Receives a report after every round.
    pub events: Option<mpsc::UnboundedSender<RoundReport>>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// One run: a model, its federation settings and its test sets.
pub struct RunSetup {
    /// Its name ([`wire::check_run_name`]): plans carry it, and a submitted run's records are in
    /// `runs/NAME` under the state directory.
    pub name: String,
    pub spec: ModelSpec,
    pub federation: Federation,
    pub test_data: Option<Dataset>,
    /// Test sets of other heads, by head name (multi-task models).
    pub head_tests: Vec<(String, Dataset)>,
    /// The model file the run starts from (`initial_model`), instead of the spec's seeded
    /// initialisation; a resumed run starts from its checkpoint.
    pub initial_model: Option<std::path::PathBuf>,
}

impl RunSetup {
    /// A run as its config describes it, with its test set loaded.
    pub fn load(config: RunConfig) -> Result<Self, ServeError> {
        let test_data = config.test_data.as_ref().map(|d| d.load()).transpose()?;
        Ok(Self {
            name: config.name,
            spec: config.spec,
            federation: config.federation,
            test_data,
            head_tests: Vec::new(),
            initial_model: config.initial_model,
        })
    }

    /// Checks the run before it starts, and warns about what the operator should know.
    fn check(&self) -> Result<(), ServeError> {
        wire::check_run_name(&self.name).map_err(ServeError::Config)?;
        self.federation.check().map_err(ServeError::Config)?;
        self.federation.check_model(&self.spec).map_err(ServeError::Config)?;
        let has_test_set = self.test_data.is_some() || !self.head_tests.is_empty();
        crate::config::check_test_set(&self.spec, has_test_set).map_err(ServeError::Config)?;
        let params = Model::new(&self.spec, &Device::Cpu, 0)?.layout().total_len();
        for warning in
            [self.federation.noise_warning(params), self.federation.small_cohort_warning()].into_iter().flatten()
        {
            warn!(run = %self.name, "{warning}");
        }
        let first = self.spec.heads.first().map(|h| h.name.clone()).unwrap_or_default();
        let tests = self.test_data.iter().map(|d| (&first, d)).chain(self.head_tests.iter().map(|(h, d)| (h, d)));
        for (name, data) in tests {
            test_head(&self.spec, name, data)?;
        }
        Ok(())
    }
}

/// A bound server, ready to run its rounds.
pub struct Server {
    endpoint: quinn::Endpoint,
    setup: ServeSetup,
    store: Arc<Mutex<Store>>,
    registry: Arc<Registry>,
    metrics: Arc<ServerMetrics>,
    metrics_listener: Option<tokio::net::TcpListener>,
    /// Checks clients' adverts and confirmations against the CA, so cheaters are named.
    verifier: CaVerifier,
    /// This federation's id (kept in cohort.db), sent in every welcome.
    federation_id: String,
    /// The federation is over (every run done, and the server does not keep serving): clients
    /// are told so when the server closes, and stop.
    finished: std::sync::atomic::AtomicBool,
    /// What `cohort-server status` shows of the running server (`live.json`).
    live: Arc<Mutex<LiveStatus>>,
    /// `serve.lock` in the state directory, held while this server lives.
    _lock: std::fs::File,
}

/// Takes `serve.lock` in the state directory: one server per state directory. The lock is the
/// operating system's (released when the process ends, however it ends); the file holds the pid
/// for the message a second server gets.
fn lock_state(state: &StatePaths) -> Result<std::fs::File, ServeError> {
    let path = state.dir.join("serve.lock");
    let io = |source: std::io::Error| files::FileError::Io { path: path.display().to_string(), source };
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(ServeError::Config(format!(
                "another cohort-server (pid {}) serves {}; stop it first, or give this one another state directory",
                cohort_io::escape(holder.trim(), 20),
                state.dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e).into()),
    }
    use std::io::{Seek, Write};
    file.set_len(0).and_then(|_| file.rewind()).and_then(|_| write!(file, "{}", std::process::id())).map_err(io)?;
    Ok(file)
}

impl Server {
    /// Binds the QUIC endpoint (call inside a tokio runtime).
    pub fn bind(setup: ServeSetup) -> Result<Self, ServeError> {
        if let Some(run) = &setup.run {
            run.check()?;
        }
        // One server per state directory, and nothing written before it holds it and its
        // address: a second `serve` that fails must not requeue the first one's runs.
        let lock = lock_state(&setup.state)?;
        let endpoint = cohort_io::server_endpoint(&setup.identity, setup.listen)?;
        let store = Store::open(&setup.state.database())?;
        let requeued = store.requeue_interrupted_runs()?;
        if requeued > 0 {
            warn!(
                "{requeued} run(s) were running when the server last stopped: they resume from their last checkpoint"
            );
        }
        if let Some(run) = &setup.run {
            store.queue_config_run(&run.name, &run.spec.name, run.federation.rounds, unix_now())?;
        }
        let federation_id = store.federation_id(|| {
            let bytes: [u8; 16] = rand::rngs::StdRng::from_os_rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        })?;
        let verifier = CaVerifier::new(&setup.identity);
        let metrics_listener = match setup.metrics_listen {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|_| l))
                    .and_then(tokio::net::TcpListener::from_std)
                    .map_err(|e| ServeError::Metrics { addr, problem: e.to_string() })?,
            ),
            None => None,
        };
        Ok(Self {
            _lock: lock,
            endpoint,
            setup,
            store: Arc::new(Mutex::new(store)),
            registry: Arc::default(),
            metrics: Arc::default(),
            metrics_listener,
            verifier,
            federation_id,
            finished: Default::default(),
            live: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("a bound endpoint has an address")
    }

    /// Where the Prometheus endpoint listens, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Accepts clients and runs the configured rounds; returns the reports of the last
    /// 100 (every round went to `events` and is in cohort.db). Stops early, cleanly,
    /// when `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<Vec<RoundReport>, ServeError> {
        let accept_stop = shutdown.child_token();
        if let Some(listener) = self.metrics_listener.take() {
            let (metrics, registry) = (self.metrics.clone(), self.registry.clone());
            let render = Arc::new(move || metrics.render(registry.len()));
            tokio::spawn(crate::metrics::serve(listener, render, accept_stop.clone()));
        }
        let acceptor = tokio::spawn(accept_loop(
            self.endpoint.clone(),
            self.registry.clone(),
            self.store.clone(),
            Arc::from(self.federation_id.as_str()),
            accept_stop.clone(),
        ));
        tokio::spawn(watch_revocations(self.setup.state.database(), self.registry.clone(), accept_stop.clone()));
        {
            let mut live = self.live.lock().expect("live lock");
            live.listen = self.local_addr().to_string();
            live.metrics = self.metrics_addr().map(|a| a.to_string());
        }
        let live_writer = tokio::spawn(crate::live::keep_written(
            self.setup.state.live(),
            self.live.clone(),
            self.registry.clone(),
            accept_stop.clone(),
        ));
        let result = self.host(&shutdown).await;
        // Clients stop for good only when the federation is over; any other stop (a signal, an
        // error the operator fixes) is one they wait out, dialling again. Said before the
        // connection tasks end: dropping a connection's last handle closes it without a reason.
        // Each connection is closed through its own handle, which takes effect at once;
        // `Endpoint::close` only queues the close for the connections' driver tasks (a
        // connection dropped first said nothing), and covers those still in their handshake
        // and refuses new ones.
        let reason = match self.finished.load(Ordering::Relaxed) {
            true => wire::FINISHED_CLOSE_REASON.as_bytes(),
            false => b"server shutting down".as_slice(),
        };
        self.registry.close_all(wire::SHUTDOWN_CLOSE_CODE, reason);
        self.endpoint.close(wire::SHUTDOWN_CLOSE_CODE.into(), reason);
        accept_stop.cancel();
        let _ = acceptor.await;
        // (Again for any welcomed while the acceptor stopped.)
        self.registry.close_all(wire::SHUTDOWN_CLOSE_CODE, reason);
        self.registry.clients.lock().expect("registry lock").clear();
        // Until every connection has drained: in its closing period a connection sends the close
        // again to a client whose packets show that it missed the first one.
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
        let _ = live_writer.await;
        result
    }

    /// Runs the queued runs in order; then ends the federation, or waits for more runs.
    /// Returns the last run's reports. An error in server.toml's run stops the server (the
    /// operator fixes its file); a submitted run's marks that run failed and the next one starts.
    async fn host(&self, shutdown: &CancellationToken) -> Result<Vec<RoundReport>, ServeError> {
        let mut cheaters = BTreeSet::new();
        let mut reports = Vec::new();
        self.resume_metrics()?;
        loop {
            if shutdown.is_cancelled() {
                return Ok(reports);
            }
            let queued =
                self.store.lock().expect("store lock").runs()?.into_iter().find(|r| r.status == RunStatus::Queued);
            let Some(row) = queued else {
                if !self.setup.keep_serving {
                    self.finished.store(true, Ordering::Relaxed);
                    return Ok(reports);
                }
                self.set_live(None, None);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(reports),
                    _ = tokio::time::sleep(RUN_POLL) => continue,
                }
            };
            let from_config = row.dir.is_empty();
            let loaded = match (&self.setup.run, from_config) {
                (Some(run), true) if run.name == row.name => Ok(None),
                (_, true) => Err(ServeError::Config(format!(
                    "run `{}` was described by server.toml, which no longer has it; `cohort-server resume --run {}` \
                     after putting it back",
                    row.name, row.name
                ))),
                (_, false) => self.load_submitted(&row).map(Some),
            };
            let owned;
            let setup = match loaded {
                Ok(Some(run)) => {
                    owned = run;
                    &owned
                }
                Ok(None) => self.setup.run.as_ref().expect("matched above"),
                Err(e) => {
                    warn!(run = %row.name, "the run cannot start: {e}");
                    self.set_run_status(&row.name, RunStatus::Failed, &e.to_string())?;
                    continue;
                }
            };
            let paths = match from_config {
                true => self.setup.state.clone(),
                false => self.setup.state.run(&row.name),
            };
            // Unless the operator stopped it while it loaded.
            if !self.store.lock().expect("store lock").start_run(&row.name, unix_now())? {
                continue;
            }
            info!(run = %row.name, model = %setup.spec.name, rounds = setup.federation.rounds, "run starts");
            let stop = shutdown.child_token();
            match self.drive(setup, paths, shutdown, &stop, &mut cheaters).await {
                Ok((driver::RunEnd::Finished, last)) => {
                    reports = last;
                    info!(run = %row.name, "run finished");
                    self.set_run_status(&row.name, RunStatus::Finished, "")?;
                }
                Ok((driver::RunEnd::Interrupted, last)) if shutdown.is_cancelled() => {
                    // Left `running`: the next start queues it again, and it resumes.
                    return Ok(last);
                }
                Ok((driver::RunEnd::Interrupted, last)) => {
                    reports = last;
                    info!(run = %row.name, "run stopped by the operator; `cohort-server resume` queues it again");
                    self.set_run_status(&row.name, RunStatus::Stopped, "stopped by the operator")?;
                }
                Err(e) => {
                    self.set_run_status(&row.name, RunStatus::Failed, &e.to_string())?;
                    if from_config {
                        return Err(e);
                    }
                    warn!(run = %row.name, "the run failed: {e}; `cohort-server resume` queues it again");
                }
            }
        }
    }

    /// A submitted run, from the files `submit` wrote in its directory.
    fn load_submitted(&self, row: &RunRow) -> Result<RunSetup, ServeError> {
        let file = self.setup.state.run(&row.name).dir.join(RUN_FILE);
        let config = RunConfig::load(&file, &row.name)?;
        let run = RunSetup::load(config)?;
        run.check()?;
        Ok(run)
    }

    fn set_run_status(&self, name: &str, status: RunStatus, note: &str) -> Result<(), ServeError> {
        self.store.lock().expect("store lock").set_run_status(name, status, note, unix_now())?;
        Ok(())
    }

    /// The figures of earlier runs: a restart does not reset /metrics to round 0.
    fn resume_metrics(&self) -> Result<(), ServeError> {
        let runs = self.store.lock().expect("store lock").runs()?;
        let mut rows = Vec::new();
        let mut first_head = String::new();
        for run in runs.iter().filter(|r| r.started_at.is_some()) {
            let records = self.setup.state.records_of(&run.dir);
            if !records.database().is_file() {
                continue;
            }
            rows.extend(Store::open_existing(&records.database())?.rounds()?);
        }
        if runs.is_empty() {
            // A state directory from before runs were recorded.
            rows = self.store.lock().expect("store lock").rounds()?;
        }
        if let Some(run) = &self.setup.run {
            first_head = run.spec.heads.first().map_or(String::new(), |h| h.name.clone());
        }
        self.metrics.resume(&rows, &first_head);
        Ok(())
    }

    /// What a welcome says: the run in progress and its next round (both cleared between runs).
    fn set_welcome(&self, run: &str, next_round: u64) {
        let mut current = self.registry.run.lock().expect("registry lock");
        *current = run.to_string();
        self.registry.next_round.store(next_round, Ordering::Relaxed);
    }

    fn set_live(&self, run: Option<&str>, activity: Option<String>) {
        let mut live = self.live.lock().expect("live lock");
        live.run = run.map(str::to_string);
        live.activity = activity;
    }

    fn enrolled(&self) -> Result<Vec<ClientId>, ServeError> {
        let clients = self.store.lock().expect("store lock").clients()?;
        Ok(clients.into_iter().filter(|c| !c.revoked).map(|c| c.id).collect())
    }
}

/// Runs blocking work (files, SQLite, evaluation) off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ServeError::Config(format!("a blocking task failed: {e}")))
}

/// The index of head `name` in `spec`, whose test set `data` is: the head must exist and have
/// room for the data's classes.
pub(crate) fn test_head(spec: &ModelSpec, name: &str, data: &Dataset) -> Result<usize, ServeError> {
    let index = spec
        .head_index(name)
        .ok_or_else(|| ServeError::Config(format!("a test set names head `{name}`, which the model does not have")))?;
    let classes = spec.heads[index].classes;
    if data.classes > classes {
        return Err(ServeError::Config(format!(
            "the test set of head `{name}` has {} classes, the head has {classes}; fix test_data's classes or the \
             model spec",
            data.classes
        )));
    }
    Ok(index)
}
