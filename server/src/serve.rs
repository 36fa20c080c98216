//! The server driver: it hosts the federation's runs, one after another (server.toml's first,
//! then those submitted with `cohort-server submit`, in order), keeping its endpoint, its
//! clients' connections and the CA between them. For each run it drives the run's state
//! machine ([`cohort_common::coordinator::Coordinator`]) and moves what it asks for. It tells the
//! coordinator who is connected (from the [`Registry`] the connection tasks keep), sends each
//! request on a new stream of its client's connection and hands back the reply (or why none
//! came), keeps the coordinator's timer, writes checkpoints, records rounds and censuses in
//! cohort.db, evaluates the global model on the operator's test sets off the loop, and
//! publishes reports and metrics. It makes no protocol decision: who is sampled, what a plan
//! holds, when a phase ends, why a round aborted and when to stop are the coordinator's.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::Device;
use cohort_common::coordinator::{
    Checkpoint, Coordinator, CoordinatorSetup, Event, Output, Request, RequestId, StopReason,
};
use cohort_common::data::Dataset;
use cohort_common::model::{vectors_to_safetensors, Model, ModelSpec};
use cohort_common::train::TrainError;
use cohort_common::wire::{self, ClientId, ClientMsg, ServerMsg, Task};
use cohort_io::secagg_keys::CaVerifier;
use cohort_io::{files, recv_msg, Identity, NetError};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use cohort_common::coordinator::RoundReport;

use crate::config::{Collection, Federation, RunConfig, RUN_FILE};
use crate::connections::{accept_loop, watch_revocations, Registry};
use crate::live::LiveStatus;
use crate::metrics::ServerMetrics;
use crate::pki::StatePaths;
use crate::publish::{Finished, Publisher};
use crate::store::{RoundRow, RunRow, RunStatus, Store, StoreError};

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
        })
    }

    /// Checks the run before it starts, and warns about what the operator should know.
    fn check(&self) -> Result<(), ServeError> {
        wire::check_run_name(&self.name).map_err(ServeError::Config)?;
        self.federation.check().map_err(ServeError::Config)?;
        self.federation.check_model(&self.spec).map_err(ServeError::Config)?;
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

/// A run being driven: where its records are, and its database.
struct RunContext {
    paths: StatePaths,
    store: Arc<Mutex<Store>>,
}

/// How a run's drive ended without an error.
enum RunEnd {
    /// Every configured round completed, or the privacy budget is spent.
    Finished,
    /// The operator stopped the run, or the server is shutting down.
    Interrupted,
}

/// Seconds since the Unix epoch, as cohort.db records times.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
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

/// A reply, or why none came, for the coordinator.
type Reply = (RequestId, ClientId, Result<ClientMsg, String>);

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
                Ok((RunEnd::Finished, last)) => {
                    reports = last;
                    info!(run = %row.name, "run finished");
                    self.set_run_status(&row.name, RunStatus::Finished, "")?;
                }
                Ok((RunEnd::Interrupted, last)) if shutdown.is_cancelled() => {
                    // Left `running`: the next start queues it again, and it resumes.
                    return Ok(last);
                }
                Ok((RunEnd::Interrupted, last)) => {
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

    /// One run's event loop: replies first, then connections coming and going, then the timer.
    /// `end_run` ends the run early (the operator's `stop`, or `shutdown`).
    async fn drive(
        &self,
        run: &RunSetup,
        paths: StatePaths,
        shutdown: &CancellationToken,
        end_run: &CancellationToken,
        cheaters: &mut BTreeSet<ClientId>,
    ) -> Result<(RunEnd, Vec<RoundReport>), ServeError> {
        let fed = &run.federation;
        let store = match paths.dir == self.setup.state.dir {
            true => self.store.clone(),
            false => {
                std::fs::create_dir_all(&paths.dir)
                    .map_err(|source| files::FileError::Io { path: paths.dir.display().to_string(), source })?;
                Arc::new(Mutex::new(Store::open(&paths.database())?))
            }
        };
        let ctx = RunContext { paths, store };
        let model = Arc::new(Model::new(&run.spec, &Device::Cpu, fed.seed)?);
        let resume = crate::resume::resume(&ctx.store, run, &ctx.paths, &model)?;
        let setup = CoordinatorSetup {
            run: run.name.clone(),
            federation: fed.clone(),
            spec: run.spec.clone(),
            segments: model.layout().segments().to_vec(),
            initial: model.flat()?,
            resume,
            verifier: Arc::new(self.verifier.clone()),
            // Fresh OS randomness: nothing a client receives lets it redraw a private sample.
            rng: Box::new(rand::rngs::StdRng::from_os_rng()),
        };
        let mut coordinator = Coordinator::new(setup, Instant::now()).map_err(|e| ServeError::Config(e.to_string()))?;
        coordinator.exclude_cheaters(cheaters.iter().cloned());
        coordinator.set_enrolled(self.enrolled()?);
        // Together: a welcome names the run with that run's next round.
        self.set_welcome(&run.name, coordinator.next_round());
        let collection = match fed.collection {
            Collection::Plain => "plain (the server sees each update; for debugging and comparison only)",
            Collection::Secure => "secure (SecAgg+: the server learns only the sum of each cohort's updates)",
        };
        let params = model.layout().total_len();
        info!(addr = %self.local_addr(), run = %run.name, model = %run.spec.name, params, collection, "serving");
        if fed.collection == Collection::Plain {
            warn!("plain collection: the server sees every client's update; use it for debugging and comparison only");
        }
        let (publisher, published) = Publisher::start(run, self.setup.events.clone(), &ctx.store, &self.metrics)?;
        let (reply_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
        let mut requests = JoinSet::new();
        let mut encoded: Option<(Arc<ServerMsg>, Arc<Vec<u8>>)> = None;
        let mut told: BTreeSet<ClientId> = BTreeSet::new();
        let changed = self.registry.changed.notified();
        tokio::pin!(changed);
        let mut stop_poll = tokio::time::interval(RUN_POLL);
        let stopped = loop {
            changed.as_mut().enable();
            let now = Instant::now();
            let connected: BTreeSet<ClientId> = self.registry.ids().into_iter().collect();
            for gone in told.difference(&connected) {
                coordinator.client_disconnected(gone);
            }
            if connected.difference(&told).next().is_some() {
                // A newly enrolled client may be among them: the population of private rounds.
                coordinator.set_enrolled(self.enrolled()?);
            }
            for new in connected.difference(&told) {
                coordinator.client_connected(new, now);
            }
            told = connected;
            let mut stop = None;
            while let Some(output) = coordinator.poll_output() {
                match output {
                    Output::Send(request) => self.send(request, &mut encoded, &mut requests, &reply_tx),
                    Output::Event(Event::Stopped(reason)) => stop = Some(reason),
                    Output::Event(event) => {
                        // Left out of the runs that follow too, while this server runs.
                        if let Event::Cheater { client, .. } = &event {
                            cheaters.insert(client.clone());
                        }
                        self.act(&ctx, event, &model, &publisher, &mut coordinator).await?
                    }
                }
            }
            self.registry.next_round.store(coordinator.next_round(), Ordering::Relaxed);
            self.set_live(Some(&run.name), Some(coordinator.activity().to_string()));
            if let Some(reason) = stop {
                break Some(reason);
            }
            let timer = coordinator.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = end_run.cancelled() => break None,
                Some((request, from, reply)) = replies.recv() => {
                    coordinator.handle_reply(request, &from, reply, Instant::now());
                }
                _ = &mut changed => changed.set(self.registry.changed.notified()),
                _ = sleep_until(timer) => coordinator.handle_timeout(Instant::now()),
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
                _ = stop_poll.tick() => {
                    let store = self.store.clone();
                    let name = run.name.clone();
                    let row = blocking(move || store.lock().expect("store lock").run(&name)).await??;
                    if row.is_some_and(|r| r.stop_requested) {
                        end_run.cancel();
                    }
                }
            }
        };
        requests.shutdown().await;
        drop(publisher);
        let reports = published.await.map_err(|e| ServeError::Config(format!("the report task failed: {e}")))??;
        self.set_live(None, None);
        self.set_welcome("", 0);
        match stopped {
            None => {
                match shutdown.is_cancelled() {
                    true => info!(
                        run = %run.name,
                        "shutdown requested: a round in progress is abandoned and not recorded; it reruns after a \
                         restart"
                    ),
                    false => {
                        info!(run = %run.name, "stop requested: a round in progress is abandoned and not recorded")
                    }
                }
                Ok((RunEnd::Interrupted, reports))
            }
            Some(StopReason::Finished { rounds }) => {
                info!(run = %run.name, rounds, "every configured round is complete");
                Ok((RunEnd::Finished, reports))
            }
            Some(reason @ StopReason::Budget { .. }) => {
                warn!(run = %run.name, "{reason}");
                Ok((RunEnd::Finished, reports))
            }
            Some(StopReason::TooManyAborts { .. }) => {
                let reason = stopped.expect("matched").to_string();
                warn!("{reason}");
                Err(ServeError::Aborts(reason))
            }
            Some(StopReason::NotEnoughClients { connected, needed, waited_secs }) => {
                Err(ServeError::NotEnoughClients { connected, needed, waited: waited_secs })
            }
        }
    }

    /// Sends a request on a new stream of its client's connection; the reply (or why none came)
    /// goes back to the loop. Clients that get one message share one encoding of it.
    fn send(
        &self,
        request: Request,
        encoded: &mut Option<(Arc<ServerMsg>, Arc<Vec<u8>>)>,
        requests: &mut JoinSet<()>,
        replies: &mpsc::UnboundedSender<Reply>,
    ) {
        let Request { id, to, msg, reply_cap, deadline } = request;
        let frame = match encoded.as_ref().filter(|(m, _)| Arc::ptr_eq(m, &msg)) {
            Some((_, frame)) => Ok(frame.clone()),
            None => wire::encode(msg.as_ref()).map(Arc::new),
        };
        let frame = match frame {
            Ok(frame) => {
                *encoded = Some((msg, frame.clone()));
                frame
            }
            Err(e) => {
                let _ = replies.send((id, to, Err(format!("the request could not be encoded: {e}"))));
                return;
            }
        };
        let Some(conn) = self.registry.connection(&to) else {
            let _ = replies.send((id, to, Err("disconnected".into())));
            return;
        };
        let replies = replies.clone();
        // A little past the coordinator's deadline: by then it has stopped waiting.
        let give_up = tokio::time::Instant::from_std(deadline) + Duration::from_secs(1);
        requests.spawn(async move {
            let reply = match tokio::time::timeout_at(give_up, ask(&conn, &frame, reply_cap)).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("missed the deadline".into()),
            };
            let _ = replies.send((id, to, reply));
        });
    }

    /// Carries out what the coordinator reports: logs, records, checkpoints.
    async fn act(
        &self,
        ctx: &RunContext,
        event: Event,
        model: &Arc<Model>,
        publisher: &mpsc::UnboundedSender<Finished>,
        coordinator: &mut Coordinator,
    ) -> Result<(), ServeError> {
        match event {
            Event::RoundStarted { round, task, cohort, sampling_rate, noise_multiplier, too_few_probability } => {
                debug!(round, task = task.purpose(), ?cohort, "round starts");
                // Write-ahead for private rounds: the sample and the charges are stored before
                // any plan goes out, so a crash mid-round loses no accounting.
                if let (Task::Train, Some(z)) = (task, noise_multiplier) {
                    let store = ctx.store.clone();
                    let row = RoundRow::started(round, unix_now(), cohort.len(), sampling_rate, z, too_few_probability);
                    blocking(move || store.lock().expect("store lock").record_round(&row, &[], &[], &cohort)).await??;
                }
            }
            Event::Declined { round, task, client, reason } => {
                self.metrics.declined(&client);
                warn!(round, %client, task = task.purpose(), "the site declined: {reason}");
            }
            Event::BackingOff { client, failures, for_secs, last } => warn!(
                %client,
                "{failures} sessions in a row failed (the last: {last}); the site is not sampled for {for_secs:.0} s. \
                 Check the site's log"
            ),
            Event::Cheater { round, client, what } => warn!(
                round,
                %client,
                "client caught cheating in secure aggregation ({what}); it is sampled no more while this server runs: \
                 check the site, and revoke its certificate (`cohort-server revoke`) if it was compromised"
            ),
            Event::Notice { round, client: Some(client), text } => warn!(round, %client, "{text}"),
            Event::Notice { round, client: None, text } => warn!(round, "{text}"),
            Event::CensusDone { round, clients, counts } => {
                let store = ctx.store.clone();
                let recorded = counts.clone();
                blocking(move || store.lock().expect("store lock").record_census(round, clients, &recorded)).await??;
                info!(round, clients, ?counts, "label census: the population's label counts");
            }
            Event::CensusFailed { round, reason } => warn!(
                round,
                "label census failed ({reason}); clients weigh classes by their own counts until the next one"
            ),
            Event::RoundFinished { report, checkpoint } => {
                let started_at = unix_now() - report.seconds as i64;
                let relative = match &checkpoint {
                    Some(checkpoint) => Some(self.write_checkpoint(ctx, report.round, checkpoint, model).await?),
                    None => {
                        warn!(round = report.round, "{}", report.note);
                        None
                    }
                };
                // Recorded before evaluation: a crash during evaluation loses no round.
                self.record(ctx, &report, started_at, relative).await?;
                coordinator.set_enrolled(self.enrolled()?);
                let params = checkpoint.map(|c| c.params);
                let _ = publisher.send(Finished { report: *report, params });
            }
            Event::Stopped(_) => {}
        }
        Ok(())
    }

    /// Writes the global model (and the server optimizer's state) of a completed round.
    async fn write_checkpoint(
        &self,
        ctx: &RunContext,
        round: u64,
        checkpoint: &Checkpoint,
        model: &Arc<Model>,
    ) -> Result<String, ServeError> {
        model.set_flat(&checkpoint.params)?;
        let (state, model, optimizer) = (ctx.paths.clone(), model.clone(), checkpoint.optimizer.clone());
        // Serialising and syncing a large model takes a while: off the runtime.
        blocking(move || -> Result<(), ServeError> {
            if !optimizer.is_empty() {
                files::write_atomic(&state.optimizer_checkpoint(round), &vectors_to_safetensors(&optimizer))?;
            }
            files::write_atomic(&state.checkpoint(round), &model.to_safetensors()?)?;
            Ok(())
        })
        .await??;
        Ok(format!("checkpoints/round-{round:06}.safetensors"))
    }

    /// Records a round in the database, off the runtime (SQLite syncs every commit).
    async fn record(
        &self,
        ctx: &RunContext,
        r: &RoundReport,
        started_at: i64,
        checkpoint: Option<String>,
    ) -> Result<(), ServeError> {
        let row = RoundRow::from_report(r, started_at, checkpoint);
        let (store, participants) = (ctx.store.clone(), r.participant_ids.clone());
        let dropped = r.dropped.clone();
        // Private participations were charged when the round started (`Event::RoundStarted`).
        blocking(move || store.lock().expect("store lock").record_round(&row, &participants, &dropped, &[])).await??;
        Ok(())
    }
}

/// Sleeps until the coordinator's timer, or for ever without one.
async fn sleep_until(timer: Option<tokio::time::Instant>) {
    match timer {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs blocking work (files, SQLite, evaluation) off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ServeError::Config(format!("a blocking task failed: {e}")))
}

/// Sends the request on a new stream and waits for the answer.
async fn ask(conn: &quinn::Connection, frame: &[u8], cap: usize) -> Result<ClientMsg, NetError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(cohort_io::classify)?;
    send.write_all(frame).await.map_err(|e| NetError::Stream(e.to_string()))?;
    let _ = send.finish();
    recv_msg(&mut recv, cap).await
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
