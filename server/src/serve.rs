//! The server driver: a QUIC endpoint, the registry of connected clients, and the loop that
//! feeds each round's state machine ([`cohort_common::round::Round`]) with what arrives.
//! Everything the round decides lives in `cohort-common`; this module moves bytes, keeps time,
//! writes checkpoints and records rounds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::Device;
use cohort_common::data::Dataset;
use cohort_common::dp::{self, ServerAccount};
use cohort_common::model::{vectors_from_safetensors, vectors_to_safetensors, Model, ModelSpec};
use cohort_common::round::{
    cohort_seed, plan_seed, poisson_cohort, select_cohort, Aggregate, Collector, PlainCollector, Poll, Round,
    RoundError, RoundOutcome,
};
use cohort_common::secagg::{weighted_mean_from_sum, SecAggError, SecAggServer, SecAggSetup, Unmasked};
use cohort_common::strategy::Strategy;
use cohort_common::train::{evaluate, per_class, DeviceData, Metrics};
use cohort_common::wire::{self, ClientId, ClientMsg, RoundPlan, SecurePlan, ServerMsg, Task, TensorBytes};
use cohort_io::secagg_keys::CaVerifier;
use cohort_io::{escape, files, recv_msg, Identity, NetError};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Collection, DpConfig, Federation};
use crate::metrics::ServerMetrics;
use crate::pki::StatePaths;
use crate::connections::{accept_loop, watch_revocations, Registry};
use crate::store::{HeadMetrics, RoundRow, Store, StoreError};
use cohort_common::secagg::quantize::Quantizer;

/// The value of a secure step's outcome; a shutdown (`None`) or a failed round (`Some(Err)`)
/// returns from the calling step at once, as it is.
macro_rules! settled {
    ($outcome:expr) => {
        match $outcome {
            Some(Ok(value)) => value,
            Some(Err(e)) => return Ok(Some(Err(e))),
            None => return Ok(None),
        }
    };
}
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
    Train(#[from] cohort_common::train::TrainError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("only {connected} clients connected within {waited:.0} s, {needed} are needed; start more clients or lower federation.min_clients / start_after_clients")]
    NotEnoughClients { connected: usize, needed: usize, waited: f64 },
    #[error("checkpoint {path}: {problem}")]
    Checkpoint { path: String, problem: String },
    #[error("metrics_listen {addr}: {problem}; choose another address or leave metrics_listen out")]
    Metrics { addr: SocketAddr, problem: String },
}

/// What one round did; sent to observers and returned at the end.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u64,
    pub completed: bool,
    pub cohort: usize,
    pub participants: usize,
    pub dropped: Vec<(ClientId, String)>,
    pub seconds: f64,
    pub train_loss: Option<f64>,
    pub test: Option<Metrics>,
    /// Seconds the evaluation on the test set took (it overlaps the next round).
    pub eval_seconds: Option<f64>,
    /// Metrics of the other heads on their test sets (multi-task models).
    pub head_tests: Vec<(String, Metrics)>,
    /// Federated evaluation: each head's metrics from the securely summed confusion matrices of
    /// the round's participants (no loss: only counts are summed).
    pub federated: Vec<(String, Metrics)>,
    pub note: String,
    /// Epsilon spent after this round (DP with noise only) against anyone who sees only the
    /// models, amplified by sampling, at `delta`.
    pub epsilon: Option<f64>,
    /// Epsilon spent against the server, which knows every sample: the largest any one client
    /// has spent from its own private rounds (unamplified), at `delta`.
    pub epsilon_server: Option<f64>,
    /// The delta both epsilons hold at: the configured one plus what too-small samples add.
    pub delta: Option<f64>,
    /// Clients caught cheating in this round's secure aggregation, with what they did. Their
    /// bad shares were not used, and they are sampled no more while this server runs.
    pub cheaters: Vec<(ClientId, String)>,
    /// The clip norm of this round (DP only) and the noisy count of updates it did not clip.
    pub clip: Option<f64>,
    pub unclipped: Option<f64>,
}

/// A saved round whose evaluation may still run.
struct PendingReport {
    report: RoundReport,
    evaluation: Option<tokio::task::JoinHandle<Result<Evaluated, cohort_common::train::TrainError>>>,
}

/// The metrics of one evaluation of the global model.
struct Evaluated {
    /// The first head on `test_data`.
    first: Option<Metrics>,
    /// The other heads on their test sets.
    heads: Vec<(String, Metrics)>,
    seconds: f64,
}

/// Everything `serve` needs, already parsed.
pub struct ServeSetup {
    pub state: StatePaths,
    pub identity: Identity,
    pub listen: SocketAddr,
    pub spec: ModelSpec,
    pub federation: Federation,
    pub test_data: Option<Dataset>,
    /// Test sets of other heads, by head name (multi-task models).
    pub head_tests: Vec<(String, Dataset)>,
    /// Receives a report after every round.
    pub events: Option<mpsc::UnboundedSender<RoundReport>>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}


/// The server's differential-privacy state: its account (`dp::ServerAccount`, resumed from the
/// database) and the clip norm of the next round.
struct Privacy {
    config: DpConfig,
    account: ServerAccount,
    clip: f64,
    warned_too_few: bool,
}

impl Privacy {
    fn resume(config: &DpConfig, rows: &[RoundRow], participations: Vec<(ClientId, f64, u64)>) -> Self {
        let mut account = ServerAccount::new(config.delta);
        let mut clip = config.clip;
        for row in rows {
            if let (Some(q), Some(z)) = (row.sampling_rate, row.noise_multiplier) {
                account.record_round(q, z, row.too_few_probability.unwrap_or(0.0), []);
            }
            if let (Some(c), Some(unclipped)) = (row.clip, row.unclipped) {
                clip = config.next_clip(c, unclipped);
            }
        }
        for (client, z, rounds) in participations {
            account.add_participations(&client, z, rounds);
        }
        Self { config: config.clone(), account, clip, warned_too_few: false }
    }

    /// Whether rounds are noised, so that they are sampled Poisson-wise and accounted.
    fn noised(&self) -> bool {
        self.config.noise_multiplier > 0.0
    }
}

/// How a round's cohort was drawn.
struct Draw {
    /// Sampled and connected: they get the plan.
    cohort: Vec<ClientId>,
    /// Sampled but not connected (Poisson sampling draws from every enrolled client).
    offline: Vec<ClientId>,
    /// The sampling rate, for DP rounds.
    sampling_rate: Option<f64>,
    /// DP rounds: the chance that the sample was too small (the round skipped).
    too_few: Option<f64>,
    /// What every private sum is divided by: q times the population (the cohort without DP
    /// sampling).
    expected_clients: f64,
}

pub(crate) fn unix_now() -> i64 {
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
    /// Clients caught cheating: not sampled again while this server runs.
    excluded: Mutex<BTreeSet<ClientId>>,
}

/// The largest label count one client may contribute to a census, per class.
const CENSUS_MAX_COUNT: f64 = (1u64 << 24) as f64;

/// Round reports kept in memory (and returned by [`Server::run`]); every round is in cohort.db.
const REPORTS_KEPT: usize = 100;

impl Server {
    /// Binds the QUIC endpoint (call inside a tokio runtime).
    pub fn bind(setup: ServeSetup) -> Result<Self, ServeError> {
        setup.federation.check().map_err(ServeError::Config)?;
        setup.federation.check_model(&setup.spec).map_err(ServeError::Config)?;
        let first = setup.spec.heads.first().map(|h| h.name.clone()).unwrap_or_default();
        let tests = setup.test_data.iter().map(|d| (&first, d)).chain(setup.head_tests.iter().map(|(h, d)| (h, d)));
        for (name, data) in tests {
            test_head(&setup.spec, name, data)?;
        }
        let store = Store::open(&setup.state.database())?;
        let federation_id = store.federation_id(|| {
            let bytes: [u8; 16] = rand::rngs::StdRng::from_os_rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        })?;
        let verifier = CaVerifier::new(&setup.identity);
        let endpoint = cohort_io::server_endpoint(&setup.identity, setup.listen)?;
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
            endpoint,
            setup,
            store: Arc::new(Mutex::new(store)),
            registry: Arc::default(),
            metrics: Arc::default(),
            metrics_listener,
            verifier,
            federation_id,
            excluded: Mutex::default(),
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
            let render = Arc::new(move || metrics.render(registry.clients.lock().expect("registry lock").len()));
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
        let result = self.run_rounds(&shutdown).await;
        accept_stop.cancel();
        let _ = acceptor.await;
        self.registry.clients.lock().expect("registry lock").clear();
        self.endpoint.close(0u32.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        result
    }

    async fn run_rounds(&self, shutdown: &CancellationToken) -> Result<Vec<RoundReport>, ServeError> {
        let fed = &self.setup.federation;
        let model = Arc::new(Model::new(&self.setup.spec, &Device::Cpu, fed.seed)?);
        let param_len = model.layout().total_len();
        let segments: Vec<usize> = model.layout().segments().iter().map(|s| s.len).collect();
        // Personal heads' ranges: a private round zeroes them (only noise arrives there).
        let personal: Vec<std::ops::Range<usize>> =
            model.layout().segments().iter().filter(|s| s.personal).map(|s| s.offset..s.offset + s.len).collect();
        let mut strategy = fed.strategy.build(param_len).map_err(|e| ServeError::Config(e.to_string()))?;
        let (last_round, done) = self.store.lock().expect("store lock").resume_point()?;
        if let Some((round, checkpoint)) = &done {
            let path = self.setup.state.dir.join(checkpoint);
            let bytes = std::fs::read(&path)
                .map_err(|e| ServeError::Checkpoint { path: path.display().to_string(), problem: e.to_string() })?;
            model
                .load_safetensors(&bytes)
                .map_err(|e| ServeError::Checkpoint { path: path.display().to_string(), problem: e.to_string() })?;
            info!(round, checkpoint = %path.display(), "resuming from the last completed round");
            self.resume_optimizer(&mut strategy, *round)?;
        }
        let mut privacy = match &fed.dp {
            Some(config) => {
                let store = self.store.lock().expect("store lock");
                Some(Privacy::resume(config, &store.rounds()?, store.dp_participations()?))
            }
            None => None,
        };
        self.registry.next_round.store(last_round + 1, Ordering::Relaxed);
        let global_counts = !fed.train.census_heads(&self.setup.spec).is_empty();
        let mut census = if global_counts { self.store.lock().expect("store lock").last_census()? } else { None };
        let test_data = match &self.setup.test_data {
            Some(d) => Some(Arc::new(DeviceData::new(d, &model)?)),
            None => None,
        };
        let mut head_tests = Vec::new();
        for (name, data) in &self.setup.head_tests {
            let head = test_head(&self.setup.spec, name, data)?;
            head_tests.push((head, name.clone(), Arc::new(DeviceData::new(data, &model)?)));
        }
        let head_tests = Arc::new(head_tests);
        let mut global = model.flat()?;
        let spec_toml = self.setup.spec.to_toml();
        let mut reports = Vec::new();
        let mut pending: Option<PendingReport> = None;
        if last_round >= fed.rounds {
            info!(rounds = fed.rounds, "every configured round is already recorded; nothing to do");
            return Ok(reports);
        }
        let collection = match fed.collection {
            Collection::Plain => "plain (the server sees each update; for debugging and comparison only)",
            Collection::Secure => "secure (SecAgg+: the server learns only the sum of each cohort's updates)",
        };
        info!(addr = %self.local_addr(), model = %self.setup.spec.name, params = param_len, collection, "serving");
        if fed.collection == Collection::Plain {
            warn!("plain collection: the server sees every client's update; use it for debugging and comparison only");
        }

        let first_wait = fed.start_after_clients.unwrap_or(fed.min_clients).max(fed.min_clients);
        let timeout = Duration::from_secs_f64(fed.wait_for_clients_secs);
        let have = self.registry.wait_for(first_wait, timeout, shutdown).await;
        if shutdown.is_cancelled() {
            return Ok(reports);
        }
        if have < first_wait {
            return Err(ServeError::NotEnoughClients {
                connected: have,
                needed: first_wait,
                waited: fed.wait_for_clients_secs,
            });
        }

        for round_no in last_round + 1..=fed.rounds {
            let have = self.registry.wait_for(fed.min_clients, timeout, shutdown).await;
            if shutdown.is_cancelled() {
                break;
            }
            if have < fed.min_clients {
                return Err(ServeError::NotEnoughClients {
                    connected: have,
                    needed: fed.min_clients,
                    waited: fed.wait_for_clients_secs,
                });
            }
            let due = match (&census, fed.train.recount_every(&self.setup.spec)) {
                (None, _) => true,
                (Some((at, _)), Some(every)) => round_no >= at + every,
                (Some(_), None) => false,
            };
            if global_counts && due {
                let spec_toml = spec_toml.clone();
                match self.label_census(round_no, spec_toml, shutdown, &mut pending, &mut reports).await? {
                    Some(Ok(counts)) => census = Some((round_no, counts)),
                    Some(Err(e)) => warn!(
                        round = round_no,
                        "label census failed ({e}); clients weigh classes by their own counts until the next one"
                    ),
                    None => break,
                }
            }
            let started = Instant::now();
            let started_at = unix_now();
            let excluded = self.excluded.lock().expect("excluded lock").clone();
            let draw = match privacy.as_mut().filter(|p| p.noised()) {
                Some(p) => {
                    let enrolled = self.store.lock().expect("store lock").clients()?;
                    let population: Vec<ClientId> = enrolled.into_iter().filter(|c| !c.revoked).map(|c| c.id).collect();
                    let q = (fed.clients_per_round as f64 / population.len().max(1) as f64).min(1.0);
                    let epsilon = p.account.epsilon_after(q, p.config.noise_multiplier);
                    if let Some(budget) = p.config.epsilon_budget.filter(|b| epsilon > *b) {
                        warn!(
                            round = round_no,
                            "stopping before round {round_no}: it would take epsilon to {epsilon:.3}, past the budget \
                             of {budget} (delta {}); {} rounds ran. Raise federation.dp.epsilon_budget or the noise \
                             multiplier to train further",
                            p.config.delta,
                            round_no - 1
                        );
                        break;
                    }
                    if p.config.delta * population.len() as f64 >= 1.0 {
                        warn!(
                            "federation.dp.delta = {} is not below 1 / {} enrolled clients: the guarantee is weak",
                            p.config.delta,
                            population.len()
                        );
                    }
                    // A round is skipped when too few sampled clients are online: that depends
                    // on the sample, so its chance is added to delta (computed before sampling).
                    let online = population
                        .iter()
                        .filter(|id| self.registry.connection(id).is_some() && !excluded.contains(*id))
                        .count();
                    let too_few = dp::too_few_probability(online, q, fed.min_clients);
                    if too_few > p.config.delta / fed.rounds as f64 && !p.warned_too_few {
                        p.warned_too_few = true;
                        warn!(
                            round = round_no,
                            "a sample of {online} online clients at q = {q:.4} falls below min_clients = {} with \
                             probability {too_few:.2e} per round, which adds to delta; lower federation.min_clients \
                             (or enrol more clients) to make it negligible",
                            fed.min_clients
                        );
                    }
                    // Fresh OS randomness: nothing a client receives lets it redraw the sample.
                    let mut os = rand::rngs::StdRng::from_os_rng();
                    let (cohort, offline): (Vec<ClientId>, Vec<ClientId>) = poisson_cohort(&population, q, &mut os)
                        .into_iter()
                        .partition(|id| self.registry.connection(id).is_some() && !excluded.contains(id));
                    let expected_clients = q * population.len() as f64;
                    Draw { cohort, offline, sampling_rate: Some(q), too_few: Some(too_few), expected_clients }
                }
                None => {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cohort_seed(fed.seed, round_no));
                    let eligible: Vec<ClientId> =
                        self.registry.ids().into_iter().filter(|id| !excluded.contains(id)).collect();
                    let cohort = select_cohort(&eligible, fed.clients_per_round, &mut rng);
                    let expected_clients = cohort.len() as f64;
                    Draw { cohort, offline: Vec::new(), sampling_rate: None, too_few: None, expected_clients }
                }
            };
            self.registry.next_round.store(round_no + 1, Ordering::Relaxed);
            let cohort = draw.cohort;
            let mut plan = RoundPlan {
                round: round_no,
                model_spec: spec_toml.clone(),
                params: TensorBytes::from_f32(&global),
                train: (&fed.train).into(),
                seed: plan_seed(fed.seed, round_no),
                deadline_ms: (fed.round_timeout_secs * 1000.0) as u64,
                secure: None,
                task: Task::Train,
                class_counts: census.as_ref().map(|(_, counts)| counts.clone()),
            };
            debug!(round = round_no, cohort = ?cohort, "round starts");
            let collected = match fed.collection {
                _ if cohort.len() < fed.min_clients => {
                    // Too few sampled clients online: no plans go out, so no privacy is spent.
                    if let Some(p) = pending.take() {
                        self.finish_report(p, &mut reports).await?;
                    }
                    Some(Err(RoundError::TooFew { round: round_no, got: cohort.len(), min: fed.min_clients }))
                }
                Collection::Plain => {
                    self.collect_plain(plan, &cohort, started, &segments, shutdown, &mut pending, &mut reports).await?
                }
                Collection::Secure => {
                    let dp = privacy.as_ref().map(|p| {
                        let q = draw.sampling_rate.unwrap_or(1.0);
                        p.config.plan(p.clip, fed.clients_per_round, fed.min_clients, q, draw.expected_clients)
                    });
                    let range = dp.as_ref().map_or(fed.secagg.clip, |d| d.coordinate_range());
                    let vector_len = SecurePlan::vector_len(param_len, segments.len(), dp.is_some());
                    let min_inputs = fed.min_clients.max(2).min(cohort.len());
                    let mut setup = self.session_setup(round_no, Task::Train, &cohort, vector_len, range, min_inputs);
                    // Private rounds wrap out-of-range values instead of clamping: no noise is cut.
                    setup.params.quantizer.wrap = dp.is_some();
                    plan.secure = Some(Box::new(SecurePlan {
                        setup,
                        sample_cap: fed.secagg.sample_cap,
                        segments: segments.clone(),
                        dp,
                    }));
                    self.collect_secure(plan, &cohort, &personal, shutdown, &mut pending, &mut reports).await?
                }
            };
            let Some(collected_outcome) = collected else {
                info!(
                    round = round_no,
                    "shutdown requested: the round is abandoned and not recorded; it reruns after a restart"
                );
                break;
            };
            let cohort_size = cohort.len() + draw.offline.len();
            let collected = started.elapsed();
            let plans_sent = cohort.len() >= fed.min_clients;
            // Every round that drew a sample is accounted, whatever its outcome: a skipped round
            // depends on the sample, and the server cannot prove it did not look at a sum. The
            // clients sent plans are charged a participation each (the epsilon against the server).
            let (sampling_rate, noise_multiplier, epsilon, epsilon_server, delta) =
                match (privacy.as_mut(), draw.sampling_rate) {
                    (Some(p), Some(q)) => {
                        let z = p.config.noise_multiplier;
                        let charged = if plans_sent { &cohort[..] } else { &[] };
                        p.account.record_round(q, z, draw.too_few.unwrap_or(0.0), charged);
                        let account = &p.account;
                        (
                            Some(q),
                            Some(z),
                            Some(account.epsilon()),
                            Some(account.epsilon_against_server()),
                            Some(account.delta()),
                        )
                    }
                    _ => (None, None, None, None, None),
                };
            let charged: &[ClientId] = if plans_sent && noise_multiplier.is_some() { &cohort } else { &[] };
            let spent =
                PrivacySpent { sampling_rate, noise_multiplier, epsilon_server, too_few_probability: draw.too_few };
            match collected_outcome {
                Ok(mut outcome) => {
                    outcome.dropped.extend(draw.offline.iter().map(|id| (id.clone(), "offline when sampled".into())));
                    let clip = privacy.as_ref().map(|p| p.clip);
                    if let (Some(p), Some(unclipped)) = (privacy.as_mut(), outcome.unclipped) {
                        p.clip = p.config.next_clip(p.clip, unclipped);
                    }
                    strategy
                        .apply(&mut global, &outcome.aggregate.mean_delta)
                        .map_err(|e| ServeError::Config(e.to_string()))?;
                    model.set_flat(&global)?;
                    let relative = format!("checkpoints/round-{round_no:06}.safetensors");
                    // Serialising and syncing a large model takes a while: off the runtime.
                    let (state, checkpointed, optimizer) = (self.setup.state.clone(), model.clone(), strategy.state());
                    tokio::task::spawn_blocking(move || -> Result<(), ServeError> {
                        if !optimizer.is_empty() {
                            let bytes = vectors_to_safetensors(&optimizer);
                            files::write_atomic(&state.optimizer_checkpoint(round_no), &bytes)?;
                        }
                        files::write_atomic(&state.checkpoint(round_no), &checkpointed.to_safetensors()?)?;
                        Ok(())
                    })
                    .await
                    .map_err(|e| ServeError::Config(format!("checkpoint task failed: {e}")))??;
                    let federated = match fed.evaluate_every.filter(|every| round_no % every == 0) {
                        Some(_) => {
                            let evaluated = self
                                .federated_evaluation(
                                    round_no,
                                    &outcome.reported,
                                    &global,
                                    spec_toml.clone(),
                                    shutdown,
                                    &mut pending,
                                    &mut reports,
                                )
                                .await?;
                            match evaluated {
                                Some(Ok(metrics)) => metrics,
                                Some(Err(e)) => {
                                    warn!(round = round_no, "federated evaluation failed: {e}");
                                    Vec::new()
                                }
                                None => Vec::new(),
                            }
                        }
                        None => Vec::new(),
                    };
                    let report = RoundReport {
                        round: round_no,
                        completed: true,
                        cohort: cohort_size,
                        participants: outcome.reported.len(),
                        dropped: outcome.dropped,
                        seconds: started.elapsed().as_secs_f64(),
                        train_loss: outcome.mean_train_loss.map(f64::from),
                        test: None,
                        eval_seconds: None,
                        head_tests: Vec::new(),
                        federated,
                        note: String::new(),
                        epsilon,
                        epsilon_server,
                        delta,
                        cheaters: outcome.cheaters,
                        clip,
                        unclipped: outcome.unclipped,
                    };
                    // Recorded before evaluation: a crash during evaluation loses no round.
                    self.record(&report, started_at, Some(relative), &outcome.reported, &spent, charged).await?;
                    debug!(
                        round = round_no,
                        collect_s = collected.as_secs_f64(),
                        total_s = report.seconds,
                        "round saved"
                    );
                    // Evaluation overlaps the next round's training; it is joined before that
                    // round changes the model.
                    let evaluation = (test_data.is_some() || !head_tests.is_empty()).then(|| {
                        let (model, data, head_tests) = (model.clone(), test_data.clone(), head_tests.clone());
                        tokio::task::spawn_blocking(move || {
                            let t = Instant::now();
                            let first = data.map(|d| evaluate(&model, 0, &d, 1000)).transpose()?;
                            let heads = head_tests
                                .iter()
                                .map(|(head, name, d)| Ok((name.clone(), evaluate(&model, *head, d, 1000)?)))
                                .collect::<Result<Vec<_>, cohort_common::train::TrainError>>()?;
                            Ok(Evaluated { first, heads, seconds: t.elapsed().as_secs_f64() })
                        })
                    });
                    pending = Some(PendingReport { report, evaluation });
                }
                Err(e) => {
                    warn!(round = round_no, "round aborted: {e}");
                    let report = RoundReport {
                        round: round_no,
                        completed: false,
                        cohort: cohort_size,
                        participants: 0,
                        dropped: Vec::new(),
                        seconds: started.elapsed().as_secs_f64(),
                        train_loss: None,
                        test: None,
                        eval_seconds: None,
                        head_tests: Vec::new(),
                        federated: Vec::new(),
                        note: e.to_string(),
                        epsilon,
                        epsilon_server,
                        delta,
                        cheaters: Vec::new(),
                        clip: None,
                        unclipped: None,
                    };
                    self.record(&report, started_at, None, &[], &spent, charged).await?;
                    self.publish(report, &mut reports);
                }
            }
        }
        if let Some(p) = pending.take() {
            self.finish_report(p, &mut reports).await?;
        }
        Ok(reports)
    }

    /// Plain collection: every member answers the plan with its update. `None` when shut down.
    #[allow(clippy::too_many_arguments)]
    async fn collect_plain(
        &self,
        plan: RoundPlan,
        cohort: &[ClientId],
        started: Instant,
        segments: &[usize],
        shutdown: &CancellationToken,
        pending: &mut Option<PendingReport>,
        reports: &mut Vec<RoundReport>,
    ) -> Result<Option<Result<RoundOutcome, RoundError>>, ServeError> {
        let fed = &self.setup.federation;
        let round_no = plan.round;
        let frame = Arc::new(wire::encode(&ServerMsg::Plan(plan)).map_err(NetError::from)?);
        let param_len: usize = segments.iter().sum();
        let collector: Box<dyn Collector> = Box::new(PlainCollector::new(segments));
        let timeout = Duration::from_secs_f64(fed.round_timeout_secs);
        let mut round = Round::new(round_no, cohort.to_vec(), started, timeout, segments, fed.min_clients, collector);
        let deadline = tokio::time::Instant::from_std(round.deadline());
        let mut exchange = self.start_exchange(
            cohort.iter().map(|id| (id.clone(), frame.clone())),
            deadline,
            param_len * 4 + (1 << 20),
        );
        for (id, why) in exchange.unreachable.drain(..) {
            round.handle_dropout(&id, why);
        }
        if let Some(p) = pending.take() {
            self.finish_report(p, reports).await?;
        }
        while let Poll::Collecting { .. } = round.poll(Instant::now()) {
            match exchange.next(shutdown).await {
                Next::Reply(id, Ok(ClientMsg::Update(update))) => {
                    if let Err(e) = round.handle_update(&id, update) {
                        warn!(round = round_no, "{e}");
                    }
                }
                Next::Reply(id, Ok(decline @ ClientMsg::Decline { .. })) => {
                    round.handle_dropout(&id, describe(Ok(decline), "an update"))
                }
                Next::Reply(id, Ok(other)) => {
                    warn!(round = round_no, client = %id, "protocol violation: expected an update, got {}", other.kind());
                    round.handle_dropout(&id, "protocol violation");
                }
                Next::Reply(id, Err(e)) => {
                    let why = escape(&e.to_string(), 300);
                    info!(round = round_no, client = %id, "dropped: {why}");
                    round.handle_dropout(&id, why);
                }
                Next::Deadline => break,
                Next::Shutdown => return Ok(None),
            }
        }
        Ok(Some(round.finish()))
    }

    /// Puts back the server optimizer's state saved with round `round`'s checkpoint. A missing
    /// file (an older state directory) or one for another strategy (the operator changed it)
    /// restarts the optimizer from zero, with a warning; a damaged one is an error.
    fn resume_optimizer(&self, strategy: &mut Strategy, round: u64) -> Result<(), ServeError> {
        if strategy.state().is_empty() {
            return Ok(());
        }
        let path = self.setup.state.optimizer_checkpoint(round);
        if !path.exists() {
            warn!(round, "no saved state of the server optimizer for round {round}; it starts from zero");
            return Ok(());
        }
        let damaged = |problem: String| ServeError::Checkpoint {
            path: path.display().to_string(),
            problem: format!("{problem}; remove the file to restart the server optimizer from zero"),
        };
        let bytes = std::fs::read(&path).map_err(|e| damaged(e.to_string()))?;
        let state = vectors_from_safetensors(&bytes).map_err(|e| damaged(e.to_string()))?;
        match strategy.restore(&state) {
            Ok(()) => info!(round, "the server optimizer continues from its saved state"),
            Err(e) => warn!(round, "{e}: the server optimizer starts from zero"),
        }
        Ok(())
    }

    /// The label census before round `round`: every connected client's label counts of the heads
    /// whose loss has `scope = "global"` (one histogram after another), summed through secure
    /// aggregation. Only the sum is seen, logged and stored.
    async fn label_census(
        &self,
        round: u64,
        spec_toml: String,
        shutdown: &CancellationToken,
        pending: &mut Option<PendingReport>,
        reports: &mut Vec<RoundReport>,
    ) -> Result<Option<Result<Vec<u64>, RoundError>>, ServeError> {
        let heads = self.setup.federation.train.census_heads(&self.setup.spec);
        let classes = heads.iter().map(|h| h.classes).sum();
        let heads: Vec<&str> = heads.iter().map(|h| h.name.as_str()).collect();
        let mut cohort = self.registry.ids();
        cohort.sort();
        let (counts, survivors) = settled!(
            self.secure_counts(
                round,
                &cohort,
                Task::CountLabels,
                TensorBytes::default(),
                spec_toml,
                classes,
                shutdown,
                pending,
                reports,
            )
            .await?
        );
        self.store.lock().expect("store lock").record_census(round, survivors, &counts)?;
        info!(round, clients = survivors, ?heads, ?counts, "label census: the population's label counts");
        Ok(Some(Ok(counts)))
    }

    /// Federated evaluation of `params` by `cohort`: each client's confusion matrices (one per
    /// head) summed through secure aggregation; only the sums are seen.
    #[allow(clippy::too_many_arguments)]
    async fn federated_evaluation(
        &self,
        round: u64,
        cohort: &[ClientId],
        params: &[f32],
        spec_toml: String,
        shutdown: &CancellationToken,
        pending: &mut Option<PendingReport>,
        reports: &mut Vec<RoundReport>,
    ) -> Result<Option<Result<Vec<(String, Metrics)>, RoundError>>, ServeError> {
        let heads: Vec<(String, usize)> = self.setup.spec.heads.iter().map(|h| (h.name.clone(), h.classes)).collect();
        let cells: usize = heads.iter().map(|(_, k)| k * k).sum();
        let (counts, _) = settled!(
            self.secure_counts(
                round,
                cohort,
                Task::Evaluate,
                TensorBytes::from_f32(params),
                spec_toml,
                cells,
                shutdown,
                pending,
                reports,
            )
            .await?
        );
        let mut start = 0;
        let metrics = heads
            .iter()
            .map(|(name, k)| {
                let confusion = counts[start..start + k * k].chunks(*k).map(|row| row.to_vec()).collect();
                start += k * k;
                (name.clone(), Metrics::from_confusion(confusion, 0.0))
            })
            .collect();
        Ok(Some(Ok(metrics)))
    }

    /// A secure sum of whole counts (a label census, confusion matrices): `len` counts per
    /// client, exact (scale 1, 64-bit modulus, up to 2^24 each), never of fewer than
    /// `max(3, min_clients)` clients. Returns the sums and how many clients they hold.
    #[allow(clippy::too_many_arguments)]
    async fn secure_counts(
        &self,
        round: u64,
        cohort: &[ClientId],
        task: Task,
        params: TensorBytes,
        spec_toml: String,
        len: usize,
        shutdown: &CancellationToken,
        pending: &mut Option<PendingReport>,
        reports: &mut Vec<RoundReport>,
    ) -> Result<Option<Result<(Vec<u64>, usize), RoundError>>, ServeError> {
        let fed = &self.setup.federation;
        let min_inputs = fed.min_clients.max(cohort_common::participant::MIN_COUNT_INPUTS);
        if cohort.len() < min_inputs {
            let reason = format!("{} clients are connected; a sum of counts needs at least {min_inputs}", cohort.len());
            return Ok(Some(Err(RoundError::Aborted { round, reason })));
        }
        let mut setup = self.session_setup(round, task, cohort, len, 1.0, min_inputs);
        setup.params.quantizer = Quantizer { bits: 64, clip: CENSUS_MAX_COUNT, scale: 1.0, wrap: false };
        let quantizer = setup.params.quantizer;
        let plan = RoundPlan {
            round,
            model_spec: spec_toml,
            params,
            train: (&fed.train).into(),
            seed: plan_seed(fed.seed, round),
            deadline_ms: (fed.round_timeout_secs * 1000.0) as u64,
            secure: Some(Box::new(SecurePlan {
                setup,
                sample_cap: fed.secagg.sample_cap,
                segments: vec![len],
                dp: None,
            })),
            task,
            class_counts: None,
        };
        let summed = settled!(self.secure_sum(plan, cohort, shutdown, pending, reports).await?);
        let counts = quantizer
            .decode_sum(&summed.sum, summed.survivors.len())
            .iter()
            .map(|c| c.round().max(0.0) as u64)
            .collect();
        Ok(Some(Ok((counts, summed.survivors.len()))))
    }

    /// Secure collection: the six SecAgg+ phases, each a request and answer per client.
    #[allow(clippy::too_many_arguments)]
    async fn collect_secure(
        &self,
        plan: RoundPlan,
        cohort: &[ClientId],
        personal: &[std::ops::Range<usize>],
        shutdown: &CancellationToken,
        pending: &mut Option<PendingReport>,
        reports: &mut Vec<RoundReport>,
    ) -> Result<Option<Result<RoundOutcome, RoundError>>, ServeError> {
        let round = plan.round;
        let secure = plan.secure.clone().expect("a secure plan");
        let quantizer = secure.setup.params.quantizer;
        let abort = |why: String| Ok(Some(Err(RoundError::Aborted { round, reason: why })));
        let summed = settled!(self.secure_sum(plan, cohort, shutdown, pending, reports).await?);
        let SecureSum { sum, survivors, dropped, cheaters } = summed;
        let (mean_delta, total_weight, unclipped) = match &secure.dp {
            Some(dp) => {
                // Every segment divides by the public expected number of clients: no count of
                // contributors (per head or in all) is ever decoded.
                let decoded = quantizer.decode_sum(&sum, survivors.len());
                let Some((mut mean, unclipped)) = dp::mean_from_sum(&decoded, &secure.segments, dp.expected_clients)
                else {
                    return abort("the secure sum does not fit the DP layout".into());
                };
                // Personal heads never leave the clients: what arrived there is noise alone.
                for segment in personal {
                    mean[segment.clone()].iter_mut().for_each(|v| *v = 0.0);
                }
                (mean, dp.expected_clients, Some(unclipped))
            }
            None => {
                let Some((mean, totals)) = weighted_mean_from_sum(&sum, survivors.len(), &secure.segments, &quantizer)
                else {
                    return abort("the survivors' total weight is zero".into());
                };
                (mean, totals.first().copied().unwrap_or(0.0), None)
            }
        };
        Ok(Some(Ok(RoundOutcome {
            round,
            aggregate: Aggregate { mean_delta, total_weight, contributors: survivors.len() },
            reported: survivors,
            dropped: dropped.into_iter().collect(),
            mean_train_loss: None,
            unclipped,
            cheaters,
        })))
    }

    /// Names the clients caught cheating in a secure session, and leaves them out of every
    /// later round this server runs.
    fn exclude_cheaters(&self, round: u64, cheaters: &[(ClientId, String)]) {
        let mut excluded = self.excluded.lock().expect("excluded lock");
        for (id, what) in cheaters {
            if excluded.insert(id.clone()) {
                let (id, what) = (escape(id, 64), escape(what, 300));
                warn!(
                    round,
                    client = %id,
                    "client caught cheating in secure aggregation ({what}); it is sampled no more while this server \
                     runs: check the site, and revoke its certificate (`cohort-server revoke`) if it was compromised"
                );
            }
        }
    }

    /// The six SecAgg+ phases of a secure plan: the sum of the survivors' masked vectors (still
    /// quantized), who survived, why the others dropped, and who cheated. `None` when shut down.
    async fn secure_sum(
        &self,
        plan: RoundPlan,
        cohort: &[ClientId],
        shutdown: &CancellationToken,
        pending: &mut Option<PendingReport>,
        reports: &mut Vec<RoundReport>,
    ) -> Result<Option<Result<SecureSum, RoundError>>, ServeError> {
        let fed = &self.setup.federation;
        let round = plan.round;
        let secure = plan.secure.clone().expect("a secure plan");
        let mut dropped: BTreeMap<ClientId, String> = BTreeMap::new();
        let abort = |why: String| Ok(Some(Err(RoundError::Aborted { round, reason: why })));
        let masked_cap = secure.setup.vector_len * 8 + (1 << 20);
        let mut server = match SecAggServer::new(secure.setup.clone()) {
            Ok(s) => s,
            Err(e) => return abort(e.to_string()),
        };
        let verifier = &self.verifier;
        let phase_timeout = Duration::from_secs_f64(fed.secagg.phase_timeout_secs);
        let small_cap = 4 << 20;

        // Phase 0: plans out, nonces back at once: the clients train while keys are exchanged.
        let t_start = Instant::now();
        let round_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(fed.round_timeout_secs);
        let frame = Arc::new(wire::encode(&ServerMsg::Plan(plan)).map_err(NetError::from)?);
        let deadline = (tokio::time::Instant::now() + phase_timeout).min(round_deadline);
        let mut exchange =
            self.start_exchange(cohort.iter().map(|id| (id.clone(), frame.clone())), deadline, small_cap);
        dropped.extend(exchange.unreachable.drain(..));
        if let Some(p) = pending.take() {
            self.finish_report(p, reports).await?;
        }
        let replies = exchange.collect_all(shutdown).await;
        let Some(replies) = replies else { return Ok(None) };
        feed(replies, &mut dropped, "a nonce", |id, msg| match msg {
            ClientMsg::Join { round: r, nonce } if r == round => Ok(server.handle_join(id, nonce)),
            other => Err(Box::new(other)),
        });
        let joined = match server.close_joins() {
            Ok(list) => list,
            Err(e) => return abort(e.to_string()),
        };

        // Phase 1: the join list out (the same for all), signed adverts back.
        let frame = Arc::new(wire::encode(&ServerMsg::Joined { round, list: joined.clone() }).map_err(NetError::from)?);
        let frames = joined.joined.iter().map(|j| (j.client.clone(), frame.clone())).collect();
        let Some(replies) = self.phase(frames, phase_timeout, small_cap, shutdown, &mut dropped).await else {
            return Ok(None);
        };
        feed(replies, &mut dropped, "a key advert", |id, msg| match msg {
            ClientMsg::Advert { round: r, advert } if r == round => Ok(server.handle_advert(id, advert, verifier)),
            other => Err(Box::new(other)),
        });
        let t_adverts = Instant::now();
        // Ends a phase: its result, or the round aborted (and whoever cheated so far left out).
        macro_rules! closed {
            ($closing:expr) => {
                match $closing {
                    Ok(value) => value,
                    Err(e) => {
                        self.exclude_cheaters(round, &server.cheaters());
                        return abort(e.to_string());
                    }
                }
            };
        }
        let adverts = closed!(server.close_adverts());

        // Phase 2: neighbours' adverts out, sealed shares back.
        let frames = encode_each(adverts, |adverts| ServerMsg::Adverts { round, adverts })?;
        let Some(replies) = self.phase(frames, phase_timeout, small_cap, shutdown, &mut dropped).await else {
            return Ok(None);
        };
        feed(replies, &mut dropped, "sealed shares", |id, msg| match msg {
            ClientMsg::Shares { round: r, keys } if r == round => Ok(server.handle_shares(id, keys)),
            other => Err(Box::new(other)),
        });
        for (client, refused) in server.refusals() {
            let (client, refused) = (escape(&client, 64), escape(&refused, 64));
            warn!(round, %client, "refused the key advert of `{refused}` (bad signature or certificate)");
        }
        let t_shares = Instant::now();
        let inbox = closed!(server.close_shares());

        // Phase 3: shares out, masked inputs back once each client has trained (summed as they
        // arrive), by the round's deadline.
        let frames = encode_each(inbox, |shares| ServerMsg::Shares { round, shares })?;
        let until_deadline = round_deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(replies) = self.phase(frames, until_deadline, masked_cap, shutdown, &mut dropped).await else {
            return Ok(None);
        };
        feed(replies, &mut dropped, "a masked input", |id, msg| match msg {
            ClientMsg::Masked { round: r, input } if r == round => Ok(server.handle_masked(id, input, verifier)),
            other => Err(Box::new(other)),
        });
        for (holder, dealer) in server.complaints() {
            let (holder, dealer) = (escape(&holder, 64), escape(&dealer, 64));
            warn!(round, client = %holder, "the shares `{dealer}` sealed for it do not open or match their commitments");
        }
        let t_masked = Instant::now();
        let list = closed!(server.close_masked());

        // Phase 4: the survivor list out (the same for all), confirmations back.
        let frame =
            Arc::new(wire::encode(&ServerMsg::Survivors { round, list: list.clone() }).map_err(NetError::from)?);
        let frames = list.survivors.iter().map(|id| (id.clone(), frame.clone())).collect();
        let Some(replies) = self.phase(frames, phase_timeout, small_cap, shutdown, &mut dropped).await else {
            return Ok(None);
        };
        feed(replies, &mut dropped, "a confirmation", |id, msg| match msg {
            ClientMsg::Confirm { round: r, signature } if r == round => {
                Ok(server.handle_confirmation(id, signature, verifier))
            }
            other => Err(Box::new(other)),
        });
        let t_confirmed = Instant::now();
        let requests = closed!(server.close_confirmations());

        // Phase 5: each survivor its neighbours' confirmations, shares back.
        let frames = encode_each(requests, |request| ServerMsg::Unmask { round, request })?;
        let Some(replies) = self.phase(frames, phase_timeout, small_cap, shutdown, &mut dropped).await else {
            return Ok(None);
        };
        for (id, reply) in replies {
            match reply {
                Ok(ClientMsg::Unmask { round: r, reply }) if r == round => {
                    if let Err(e) = server.handle_unmask(&id, reply) {
                        warn!(round, client = %escape(&id, 64), "unmask reply refused: {}", escape(&e.to_string(), 300));
                    }
                }
                other => {
                    warn!(round, client = %escape(&id, 64), "no unmask reply: {}", describe(other, "an unmask reply"))
                }
            }
        }
        let t_unmask = Instant::now();
        let Unmasked { sum, survivors, cheaters } = closed!(server.finish());
        self.exclude_cheaters(round, &cheaters);
        debug!(
            round,
            advertise_s = (t_adverts - t_start).as_secs_f64(),
            share_keys_s = (t_shares - t_adverts).as_secs_f64(),
            masked_input_s = (t_masked - t_shares).as_secs_f64(),
            consistency_s = (t_confirmed - t_masked).as_secs_f64(),
            unmask_s = (t_unmask - t_confirmed).as_secs_f64(),
            finish_s = t_unmask.elapsed().as_secs_f64(),
            "secure aggregation phases"
        );
        if survivors.len() < fed.min_clients {
            return Ok(Some(Err(RoundError::TooFew { round, got: survivors.len(), min: fed.min_clients })));
        }
        for id in &survivors {
            dropped.remove(id);
        }
        for id in cohort {
            if !survivors.contains(id) && !dropped.contains_key(id) {
                dropped.insert(id.clone(), "dropped during secure aggregation".into());
            }
        }
        Ok(Some(Ok(SecureSum { sum, survivors, dropped, cheaters })))
    }

    /// One secure-aggregation phase: sends each frame and waits for every answer or the timeout.
    async fn phase(
        &self,
        frames: Vec<Addressed>,
        timeout: Duration,
        cap: usize,
        shutdown: &CancellationToken,
        dropped: &mut BTreeMap<ClientId, String>,
    ) -> Option<Vec<(ClientId, Result<ClientMsg, NetError>)>> {
        let mut exchange = self.start_exchange(frames.into_iter(), tokio::time::Instant::now() + timeout, cap);
        dropped.extend(exchange.unreachable.drain(..));
        exchange.collect_all(shutdown).await
    }

    /// Sends each client its frame on a new stream and reads one answer each, until `deadline`.
    fn start_exchange(
        &self,
        frames: impl Iterator<Item = Addressed>,
        deadline: tokio::time::Instant,
        cap: usize,
    ) -> Exchange {
        let (tx, rx) = mpsc::channel(64);
        let mut tasks = JoinSet::new();
        let mut unreachable = Vec::new();
        let mut expected = 0;
        for (id, frame) in frames {
            let Some(conn) = self.registry.connection(&id) else {
                unreachable.push((id, "disconnected".to_string()));
                continue;
            };
            expected += 1;
            let tx = tx.clone();
            tasks.spawn(async move {
                let answer = tokio::time::timeout_at(deadline, ask(&conn, &frame, cap))
                    .await
                    .unwrap_or_else(|_| Err(NetError::Stream("missed the round deadline".into())));
                let _ = tx.send((id, answer)).await;
            });
        }
        Exchange { rx, _tasks: tasks, deadline, expected, unreachable }
    }

    /// Waits for a round's evaluation, records its metrics and publishes the report.
    async fn finish_report(&self, pending: PendingReport, reports: &mut Vec<RoundReport>) -> Result<(), ServeError> {
        let mut report = pending.report;
        if let Some(evaluation) = pending.evaluation {
            let evaluated =
                evaluation.await.map_err(|e| ServeError::Config(format!("evaluation task failed: {e}")))??;
            let first_head = self.setup.spec.heads.first().map(|h| h.name.clone()).unwrap_or_default();
            let heads: Vec<HeadMetrics> = evaluated
                .first
                .iter()
                .map(|m| (first_head.clone(), m))
                .chain(evaluated.heads.iter().map(|(h, m)| (h.clone(), m)))
                .map(|(head, metrics)| HeadMetrics { head, metrics: metrics.clone() })
                .collect();
            let (store, round, first) = (self.store.clone(), report.round, evaluated.first.clone());
            tokio::task::spawn_blocking(move || {
                store.lock().expect("store lock").set_test_metrics(round, first.as_ref(), &heads)
            })
            .await
            .map_err(|e| ServeError::Config(format!("database task failed: {e}")))??;
            report.test = evaluated.first;
            report.head_tests = evaluated.heads;
            report.eval_seconds = Some(evaluated.seconds);
        }
        self.publish(report, reports);
        Ok(())
    }

    fn publish(&self, report: RoundReport, reports: &mut Vec<RoundReport>) {
        match &report.test {
            Some(m) => info!(
                round = report.round,
                participants = report.participants,
                seconds = format!("{:.3}", report.seconds),
                accuracy = format!("{:.4}", m.accuracy),
                balanced_accuracy = format!("{:.4}", m.balanced_accuracy),
                macro_f1 = format!("{:.4}", m.macro_f1),
                recall = %per_class(&m.per_class_recall),
                loss = format!("{:.4}", m.loss),
                "round complete"
            ),
            None => info!(
                round = report.round,
                completed = report.completed,
                participants = report.participants,
                "round finished"
            ),
        }
        let first_head = self.setup.spec.heads.first().map_or("", |h| h.name.as_str());
        self.metrics.record(&report, first_head);
        if let Some(events) = &self.setup.events {
            let _ = events.send(report.clone());
        }
        if reports.len() == REPORTS_KEPT {
            reports.remove(0);
        }
        reports.push(report);
    }

    /// Records a round in the database, off the runtime (SQLite syncs every commit).
    async fn record(
        &self,
        r: &RoundReport,
        started_at: i64,
        checkpoint: Option<String>,
        participants: &[ClientId],
        spent: &PrivacySpent,
        charged: &[ClientId],
    ) -> Result<(), ServeError> {
        let row = RoundRow {
            round: r.round,
            started_at,
            seconds: r.seconds,
            status: if r.completed { "completed" } else { "aborted" }.into(),
            cohort: r.cohort,
            participants: r.participants,
            dropped: r.dropped.len(),
            train_loss: r.train_loss,
            test_accuracy: r.test.as_ref().map(|m| m.accuracy),
            test_loss: r.test.as_ref().map(|m| m.loss),
            balanced_accuracy: r.test.as_ref().map(|m| m.balanced_accuracy),
            macro_f1: r.test.as_ref().map(|m| m.macro_f1),
            checkpoint,
            note: r.note.clone(),
            sampling_rate: spent.sampling_rate,
            noise_multiplier: spent.noise_multiplier,
            epsilon: r.epsilon,
            epsilon_server: spent.epsilon_server,
            too_few_probability: spent.too_few_probability,
            clip: r.clip,
            unclipped: r.unclipped,
            head_tests: Vec::new(),
            federated: r
                .federated
                .iter()
                .map(|(head, metrics)| HeadMetrics { head: head.clone(), metrics: metrics.clone() })
                .collect(),
        };
        let (store, participants, charged) = (self.store.clone(), participants.to_vec(), charged.to_vec());
        tokio::task::spawn_blocking(move || {
            store.lock().expect("store lock").record_round(&row, &participants, &charged)
        })
        .await
        .map_err(|e| ServeError::Config(format!("database task failed: {e}")))??;
        Ok(())
    }

    /// The setup of one secure session: what it sums and the fewest inputs the clients may
    /// unmask. (The clients' nonces make each session fresh and seed its graph.)
    #[allow(clippy::too_many_arguments)]
    fn session_setup(
        &self,
        round: u64,
        task: Task,
        cohort: &[ClientId],
        vector_len: usize,
        range: f64,
        min_inputs: usize,
    ) -> SecAggSetup {
        let mut setup = self.setup.federation.secagg.setup(round, cohort.to_vec(), vector_len, range);
        setup.purpose = task.purpose().into();
        setup.min_inputs = min_inputs;
        setup
    }
}

/// What a round spent of privacy, as recorded.
struct PrivacySpent {
    sampling_rate: Option<f64>,
    noise_multiplier: Option<f64>,
    epsilon_server: Option<f64>,
    too_few_probability: Option<f64>,
}

/// The index of head `name` in `spec`, whose test set `data` is: the head must exist and have
/// room for the data's classes.
fn test_head(spec: &ModelSpec, name: &str, data: &Dataset) -> Result<usize, ServeError> {
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

/// Requests in flight to a set of clients.
struct Exchange {
    rx: mpsc::Receiver<(ClientId, Result<ClientMsg, NetError>)>,
    /// Dropping the set aborts requests still waiting.
    _tasks: JoinSet<()>,
    deadline: tokio::time::Instant,
    expected: usize,
    unreachable: Vec<(ClientId, String)>,
}

enum Next {
    Reply(ClientId, Result<ClientMsg, NetError>),
    Deadline,
    Shutdown,
}

impl Exchange {
    async fn next(&mut self, shutdown: &CancellationToken) -> Next {
        if self.expected == 0 {
            return Next::Deadline;
        }
        tokio::select! {
            reply = self.rx.recv() => match reply {
                Some((id, r)) => { self.expected -= 1; Next::Reply(id, r) }
                None => Next::Deadline,
            },
            _ = tokio::time::sleep_until(self.deadline) => Next::Deadline,
            _ = shutdown.cancelled() => Next::Shutdown,
        }
    }

    /// Every answer (errors included) that arrives by the deadline; `None` on shutdown.
    async fn collect_all(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<Vec<(ClientId, Result<ClientMsg, NetError>)>> {
        let mut replies = Vec::new();
        loop {
            match self.next(shutdown).await {
                Next::Reply(id, r) => replies.push((id, r)),
                Next::Deadline => return Some(replies),
                Next::Shutdown => return None,
            }
        }
    }
}

/// What secure aggregation hands back: the quantized sum, who is in it, and who cheated.
struct SecureSum {
    sum: Vec<u64>,
    survivors: Vec<ClientId>,
    dropped: BTreeMap<ClientId, String>,
    cheaters: Vec<(ClientId, String)>,
}

/// A frame and the client it is for.
type Addressed = (ClientId, Arc<Vec<u8>>);

/// Encodes one message per client.
fn encode_each<T>(
    payloads: BTreeMap<ClientId, T>,
    message: impl Fn(T) -> ServerMsg,
) -> Result<Vec<Addressed>, NetError> {
    payloads.into_iter().map(|(id, p)| Ok((id, Arc::new(wire::encode(&message(p))?)))).collect()
}

/// Hands each expected reply to `accept` (which returns `Err(msg)` for an unexpected one); a
/// client whose reply is missing, unexpected or refused is recorded as dropped, with the reason.
fn feed(
    replies: Vec<(ClientId, Result<ClientMsg, NetError>)>,
    dropped: &mut BTreeMap<ClientId, String>,
    wanted: &str,
    mut accept: impl FnMut(&str, ClientMsg) -> Result<Result<(), SecAggError>, Box<ClientMsg>>,
) {
    for (id, reply) in replies {
        let why = match reply.map(|msg| accept(&id, msg)) {
            Ok(Ok(Ok(()))) => continue,
            Ok(Ok(Err(refused))) => escape(&refused.to_string(), 300),
            Ok(Err(other)) => describe(Ok(*other), wanted),
            Err(e) => escape(&e.to_string(), 300),
        };
        dropped.insert(id, why);
    }
}

/// Why a reply is not the one wanted, for the logs and the round's record: what the client
/// wrote is escaped and capped.
fn describe(reply: Result<ClientMsg, NetError>, wanted: &str) -> String {
    match reply {
        Ok(ClientMsg::Decline { reason, .. }) => format!("declined: {}", escape(&reason, 300)),
        Ok(other) => format!("protocol violation: expected {wanted}, got {}", other.kind()),
        Err(e) => escape(&e.to_string(), 300),
    }
}

/// Sends the plan on a new stream and waits for the answer.
async fn ask(conn: &quinn::Connection, frame: &[u8], cap: usize) -> Result<ClientMsg, NetError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(cohort_io::classify)?;
    send.write_all(frame).await.map_err(|e| NetError::Stream(e.to_string()))?;
    let _ = send.finish();
    recv_msg(&mut recv, cap).await
}
