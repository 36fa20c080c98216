//! The server's whole federation as a sans-IO state machine, in the style of quinn-proto.
//!
//! A [`Coordinator`] owns every protocol decision of the server: who is sampled (and who is
//! left out: cheaters, sites backing off after failing again and again), the plans, plain and
//! secure rounds with all their phases and deadlines, the label census, federated evaluation,
//! dropouts and their reasons, decoding the sums, differential-privacy accounting, the budget
//! stop, the strategy step, and when to stop. Time ([`Instant`]) and randomness come in; out
//! come [`Output`]s: requests to send (each answered by one reply, matched by [`RequestId`])
//! and [`Event`]s for the driver to act on (write a checkpoint and record a round, record a
//! census, log a decline, stop). The driver (`cohort-server`'s event loop, or the socket-free
//! harness in the tests) moves bytes, files and timers and decides nothing:
//!
//! ```text
//! loop {
//!     while let Some(output) = coordinator.poll_output() { send it / record it }
//!     select (replies first) {
//!         reply from a client       => coordinator.handle_reply(request, from, reply, now),
//!         a client (dis)connected   => coordinator.client_connected(id, now) / client_disconnected(id),
//!         coordinator.poll_timeout() => coordinator.handle_timeout(now),
//!     }
//! }
//! ```
//!
//! Rounds are numbered by attempt: an aborted round keeps its number (the clients bind secure
//! sessions and their privacy ledgers to it) but does not count toward `federation.rounds`;
//! `federation.max_consecutive_aborts` in a row stop the federation with the last one's reason.

pub mod config;
mod secure;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{CryptoRng, SeedableRng};
use serde::Serialize;

use crate::dp::{self, ServerAccount};
use crate::model::{ModelSpec, Segment};
use crate::round::{
    cohort_seed, plan_seed, poisson_cohort, run_seed, select_cohort, Aggregate, ClientStatus, Collector,
    PlainCollector, Poll, Round, RoundError,
};
use crate::secagg::quantize::Quantizer;
use crate::secagg::{weighted_mean_from_sum, PeerVerifier, SecAggSetup, MIN_COUNT_INPUTS};
use crate::strategy::Strategy;
use crate::train::Metrics;
use crate::wire::{self, escape, ClientId, ClientMsg, RoundPlan, SecurePlan, ServerMsg, Task, TensorBytes};

use config::{Collection, DpConfig, Federation};
use secure::{Failed, SecureSum, Summed};

/// Identifies one request, so its reply is matched to it (and a late reply to an earlier
/// request is recognised as such).
pub type RequestId = u64;

/// The largest label count one client may contribute to a census, per class.
pub const CENSUS_MAX_COUNT: f64 = (1u64 << 24) as f64;

/// One message for one client; its reply (or why none came) goes back through
/// [`Coordinator::handle_reply`] with the same `id`.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: RequestId,
    pub to: ClientId,
    /// Shared by every client that gets the same message (a plan is the whole model).
    pub msg: Arc<ServerMsg>,
    /// The largest reply the driver may read.
    pub reply_cap: usize,
    /// After this the coordinator no longer waits for the reply; the driver may give up.
    pub deadline: Instant,
}

/// Why the federation stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// Every configured round completed.
    Finished { rounds: u64 },
    /// The next round would take epsilon past the budget.
    Budget { epsilon: f64, budget: f64, delta: f64, completed: u64 },
    /// `max_consecutive_aborts` rounds in a row aborted.
    TooManyAborts { aborts: u64, last: String },
    /// Too few clients connected within `wait_for_clients_secs`.
    NotEnoughClients { connected: usize, needed: usize, waited_secs: f64 },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Finished { rounds } => write!(f, "all {rounds} rounds completed"),
            StopReason::Budget { epsilon, budget, delta, completed } => write!(
                f,
                "stopping: the next round would take epsilon to {epsilon:.3}, past the budget of {budget} (delta \
                 {delta}); {completed} rounds completed. Raise federation.dp.epsilon_budget or the noise multiplier \
                 to train further"
            ),
            StopReason::TooManyAborts { aborts, last } => write!(
                f,
                "stopping: {aborts} rounds in a row aborted (federation.max_consecutive_aborts); the last: {last}"
            ),
            StopReason::NotEnoughClients { connected, needed, waited_secs } => write!(
                f,
                "only {connected} clients connected within {waited_secs:.0} s, {needed} are needed; start more \
                 clients or lower federation.min_clients / start_after_clients"
            ),
        }
    }
}

/// What one round did: for logs, observers, metrics and the database.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RoundReport {
    pub round: u64,
    pub completed: bool,
    /// Sampled clients (with those offline when sampled).
    pub cohort: usize,
    pub participants: usize,
    /// Cohort members that did not take part, with why.
    pub dropped: Vec<(ClientId, String)>,
    /// Cohort members that declined, with their reasons (also in `dropped`).
    pub declined: Vec<(ClientId, String)>,
    pub seconds: f64,
    pub train_loss: Option<f64>,
    /// The first head on the operator's test set (filled in by the driver).
    pub test: Option<Metrics>,
    /// Seconds the evaluation on the test set took (filled in by the driver).
    pub eval_seconds: Option<f64>,
    /// Metrics of the other heads on their test sets (filled in by the driver).
    pub head_tests: Vec<(String, Metrics)>,
    /// Federated evaluation: each head's metrics from the securely summed confusion matrices of
    /// the round's participants (no loss: only counts are summed).
    pub federated: Vec<(String, Metrics)>,
    /// Why the round aborted, in plain words naming the sites; empty when it completed.
    pub note: String,
    /// Epsilon spent after this round (DP with noise only) against anyone who sees only the
    /// models, amplified by sampling, at `delta`.
    pub epsilon: Option<f64>,
    /// Epsilon against the server, which knows every sample: the most any one client has spent.
    pub epsilon_server: Option<f64>,
    /// The delta both epsilons hold at: the configured one plus what too-small samples add.
    pub delta: Option<f64>,
    /// Clients caught cheating in this round's secure aggregation, with what they did.
    pub cheaters: Vec<(ClientId, String)>,
    /// The clip norm of this round (DP only) and the noisy fraction of updates it did not clip.
    pub clip: Option<f64>,
    pub unclipped: Option<f64>,
    /// DP rounds: the sampling rate, the noise multiplier and the chance of a too-small sample.
    pub sampling_rate: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub too_few_probability: Option<f64>,
    /// The clients that took part (completed rounds).
    pub participant_ids: Vec<ClientId>,
    /// The clients charged a private participation (sent a plan of a noised round).
    pub charged: Vec<ClientId>,
}

/// The global model after a completed round, to write before the round is recorded.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub params: Arc<Vec<f32>>,
    /// The server optimizer's state (empty for FedAvg).
    pub optimizer: BTreeMap<String, Vec<f32>>,
}

/// What the driver is told.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session's plans are about to go out (they follow this event in the output queue). For
    /// a differentially private round this is the write-ahead record: the driver stores the
    /// round's sample and charges `cohort` before sending anything, so a crash mid-round loses no
    /// accounting (and the round number is not reused).
    RoundStarted {
        round: u64,
        task: Task,
        cohort: Vec<ClientId>,
        sampling_rate: Option<f64>,
        noise_multiplier: Option<f64>,
        too_few_probability: Option<f64>,
    },
    /// A site said it will not take part (its reason escaped and capped).
    Declined { round: u64, task: Task, client: ClientId, reason: String },
    /// A site failed `failures` sessions in a row and is not sampled for `for_secs`.
    BackingOff { client: ClientId, failures: u32, for_secs: f64, last: String },
    /// A site was caught cheating in secure aggregation: not sampled again while this runs.
    Cheater { round: u64, client: ClientId, what: String },
    /// Something an operator should see (a refused advert, a weak privacy setting).
    Notice { round: u64, client: Option<ClientId>, text: String },
    /// The label census before `round` summed the population's label counts.
    CensusDone { round: u64, clients: usize, counts: Vec<u64> },
    /// The census failed; clients weigh classes by their own counts until the next one.
    CensusFailed { round: u64, reason: String },
    /// A round ended (completed with its new model, or aborted): write the checkpoint, then
    /// record the report.
    RoundFinished { report: Box<RoundReport>, checkpoint: Option<Checkpoint> },
    /// Nothing more will happen.
    Stopped(StopReason),
}

/// Either a request to send or an event.
#[derive(Debug, Clone)]
pub enum Output {
    Send(Request),
    Event(Event),
}

/// Where outputs queue up until the driver polls them.
#[derive(Default)]
pub(crate) struct Outbox {
    queue: VecDeque<Output>,
    next_request: RequestId,
}

impl Outbox {
    pub(crate) fn send(&mut self, to: &str, msg: Arc<ServerMsg>, reply_cap: usize, deadline: Instant) -> RequestId {
        self.next_request += 1;
        let id = self.next_request;
        self.queue.push_back(Output::Send(Request { id, to: to.to_string(), msg, reply_cap, deadline }));
        id
    }

    pub(crate) fn event(&mut self, event: Event) {
        self.queue.push_back(Output::Event(event));
    }

    pub(crate) fn declined(&mut self, round: u64, task: Task, client: &str, reason: &str) {
        self.event(Event::Declined { round, task, client: client.to_string(), reason: reason.to_string() });
    }

    pub(crate) fn notice(&mut self, round: u64, client: Option<&str>, text: String) {
        self.event(Event::Notice { round, client: client.map(str::to_string), text });
    }
}

/// What the server remembers of earlier runs (from its database and checkpoint files).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// The highest round number recorded (completed or aborted).
    pub last_round: u64,
    /// Rounds completed so far.
    pub completed: u64,
    /// The global parameters of the last completed round.
    pub params: Option<Vec<f32>>,
    /// The server optimizer's state saved with them.
    pub optimizer: Option<BTreeMap<String, Vec<f32>>>,
    /// Every recorded round's privacy figures, in order.
    pub privacy: Vec<PrivacyRow>,
    /// Private participations per client: (client, noise multiplier, rounds).
    pub participations: Vec<(ClientId, f64, u64)>,
    /// The last label census: (round, counts).
    pub census: Option<(u64, Vec<u64>)>,
}

/// The privacy figures of one recorded round.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PrivacyRow {
    pub sampling_rate: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub too_few_probability: Option<f64>,
    pub clip: Option<f64>,
    pub unclipped: Option<f64>,
}

/// Everything a coordinator starts from.
pub struct CoordinatorSetup {
    /// The run's name ([`wire::check_run_name`]), sent in every plan.
    pub run: String,
    pub federation: Federation,
    pub spec: ModelSpec,
    /// The model's segments (trunk, then heads), from its layout.
    pub segments: Vec<Segment>,
    /// The initial global parameters (used unless `resume` has some).
    pub initial: Vec<f32>,
    pub resume: Resume,
    /// Checks clients' adverts and confirmations against the CA, so cheaters are named.
    pub verifier: Arc<dyn PeerVerifier + Send + Sync>,
    /// Randomness for differentially private sampling: it must come from the OS in a server
    /// (nobody may redraw a sample); tests pass a seeded generator.
    pub rng: Box<dyn CryptoRng + Send>,
}

/// What the federation is doing ([`Coordinator::activity`]), for the operator's `status`.
#[derive(Debug, Clone, PartialEq)]
pub enum Activity {
    /// Waiting until `needed` eligible clients are connected.
    Waiting {
        needed: usize,
        eligible: usize,
    },
    /// The next round starts shortly.
    BetweenRounds {
        next_round: u64,
    },
    /// The label census before `round`, waiting for `phase`.
    Census {
        round: u64,
        phase: &'static str,
    },
    /// Round `round` of a cohort of `cohort` clients, waiting for `phase`.
    Training {
        round: u64,
        cohort: usize,
        phase: &'static str,
    },
    /// Round `round` is summed; its federated evaluation runs.
    Evaluating {
        round: u64,
    },
    Stopped,
}

impl std::fmt::Display for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activity::Waiting { needed, eligible } => {
                write!(f, "waiting for clients ({eligible} eligible connected, {needed} needed)")
            }
            Activity::BetweenRounds { next_round } => write!(f, "round {next_round} starts shortly"),
            Activity::Census { round, phase } => write!(f, "label census before round {round}, waiting for {phase}"),
            Activity::Training { round, cohort, phase } => {
                write!(f, "round {round}, {cohort} clients sampled, waiting for {phase}")
            }
            Activity::Evaluating { round } => write!(f, "round {round}: federated evaluation"),
            Activity::Stopped => write!(f, "stopped"),
        }
    }
}

/// Local misuse: a setup that cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoordinatorError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("the saved server state does not fit this model: {0}")]
    Resume(String),
}

/// The server's differential-privacy state: its account and the clip norm of the next round.
struct Privacy {
    config: DpConfig,
    account: ServerAccount,
    clip: f64,
    /// Each weak-setting warning is given once per run.
    warned_too_few: bool,
    warned_delta: bool,
}

impl Privacy {
    fn resume(config: &DpConfig, rows: &[PrivacyRow], participations: &[(ClientId, f64, u64)]) -> Self {
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
            account.add_participations(client, *z, *rounds);
        }
        Self { config: config.clone(), account, clip, warned_too_few: false, warned_delta: false }
    }

    fn noised(&self) -> bool {
        self.config.noise_multiplier > 0.0
    }
}

/// How a round's cohort was drawn.
struct Draw {
    /// Sampled and reachable: they get the plan.
    cohort: Vec<ClientId>,
    /// Sampled but offline, backing off or excluded (Poisson sampling draws from every enrolled
    /// client).
    offline: Vec<(ClientId, String)>,
    sampling_rate: Option<f64>,
    too_few: Option<f64>,
    /// What every private sum is divided by.
    expected_clients: f64,
}

/// A site's record of failures.
#[derive(Debug, Clone, Default)]
struct Standing {
    failures: u32,
    /// Not sampled before this.
    until: Option<Instant>,
}

/// A training round in progress.
struct TrainRound {
    number: u64,
    started: Instant,
    draw: Draw,
    collecting: Collecting,
}

enum Collecting {
    Plain { round: Round, waiting: BTreeMap<ClientId, RequestId> },
    Secure { sum: Box<SecureSum>, secure: Box<SecurePlan> },
}

/// A completed round waiting for its federated evaluation.
struct Evaluating {
    report: Box<RoundReport>,
    checkpoint: Checkpoint,
    sum: SecureSum,
}

enum State {
    /// Waiting for enough eligible clients; the federation stops at `give_up` (if set).
    Waiting {
        needed: usize,
        give_up: Option<Instant>,
        started: Instant,
    },
    /// The next round (or its census) starts at the next timeout.
    Next,
    /// The label census before round `round`.
    Census {
        round: u64,
        sum: Box<SecureSum>,
    },
    Training(Box<TrainRound>),
    Evaluating(Box<Evaluating>),
    Stopped,
}

/// The federation's state machine. See the module documentation.
pub struct Coordinator {
    run: String,
    /// The run's seed ([`run_seed`]): plans and non-private cohorts derive from it.
    seed: u64,
    fed: Federation,
    spec: ModelSpec,
    spec_toml: String,
    segments: Vec<usize>,
    /// Personal heads' ranges: a private round zeroes them (only noise arrives there).
    personal: Vec<Range<usize>>,
    strategy: Strategy,
    global: Arc<Vec<f32>>,
    verifier: Arc<dyn PeerVerifier + Send + Sync>,
    rng: Box<dyn CryptoRng + Send>,
    online: BTreeSet<ClientId>,
    /// Enrolled, unrevoked clients: the population DP rounds sample from.
    enrolled: Vec<ClientId>,
    standing: BTreeMap<ClientId, Standing>,
    /// Caught cheating: not sampled again while this coordinator runs.
    cheaters: BTreeSet<ClientId>,
    privacy: Option<Privacy>,
    census: Option<(u64, Vec<u64>)>,
    /// The last round number used (rounds are numbered by attempt).
    last_round: u64,
    completed: u64,
    aborts_in_a_row: u64,
    state: State,
    /// When the state machine wants [`Coordinator::handle_timeout`].
    timer: Option<Instant>,
    out: Outbox,
    /// The round whose census was last tried (it is tried once per round, however it ends).
    census_tried_for: u64,
}

impl Coordinator {
    /// Leaves out clients caught cheating before this coordinator ran (in an earlier run of the
    /// same server): they are not sampled again while the server runs.
    pub fn exclude_cheaters(&mut self, cheaters: impl IntoIterator<Item = ClientId>) {
        self.cheaters.extend(cheaters);
    }

    /// What the federation is doing now, for the operator's `status`.
    pub fn activity(&self) -> Activity {
        match &self.state {
            State::Waiting { needed, .. } => Activity::Waiting { needed: *needed, eligible: self.online.len() },
            State::Next => Activity::BetweenRounds { next_round: self.last_round + 1 },
            State::Census { round, sum } => Activity::Census { round: *round, phase: sum.phase().wanted() },
            State::Training(t) => Activity::Training {
                round: t.number,
                cohort: t.draw.cohort.len(),
                phase: match &t.collecting {
                    Collecting::Plain { .. } => "updates",
                    Collecting::Secure { sum, .. } => sum.phase().wanted(),
                },
            },
            State::Evaluating(e) => Activity::Evaluating { round: e.report.round },
            State::Stopped => Activity::Stopped,
        }
    }

    /// Checks the setup; the federation starts by waiting for its first clients.
    pub fn new(setup: CoordinatorSetup, now: Instant) -> Result<Self, CoordinatorError> {
        let CoordinatorSetup { run, federation: fed, spec, segments, initial, resume, verifier, rng } = setup;
        wire::check_run_name(&run).map_err(CoordinatorError::Config)?;
        fed.check().map_err(CoordinatorError::Config)?;
        fed.check_model(&spec).map_err(CoordinatorError::Config)?;
        let param_len: usize = segments.iter().map(|s| s.len).sum();
        let mut strategy = fed.strategy.build(param_len).map_err(|e| CoordinatorError::Config(e.to_string()))?;
        let global = resume.params.clone().unwrap_or(initial);
        if global.len() != param_len {
            return Err(CoordinatorError::Resume(format!(
                "{} parameters saved, the model has {param_len}",
                global.len()
            )));
        }
        // A saved state for another strategy (the operator changed it) restarts the optimizer.
        let restored = resume.optimizer.as_ref().map(|state| strategy.restore(state));
        let privacy = fed.dp.as_ref().map(|c| Privacy::resume(c, &resume.privacy, &resume.participations));
        let census = if fed.train.census_heads(&spec).is_empty() { None } else { resume.census.clone() };
        let needed = fed.start_after_clients.unwrap_or(fed.min_clients).max(min_cohort(&fed));
        let give_up = now + Duration::from_secs_f64(fed.wait_for_clients_secs);
        let done = resume.completed >= fed.rounds;
        let mut coordinator = Self {
            seed: run_seed(fed.seed, &run),
            run,
            spec_toml: spec.to_toml(),
            personal: segments.iter().filter(|s| s.personal).map(|s| s.offset..s.offset + s.len).collect(),
            segments: segments.iter().map(|s| s.len).collect(),
            spec,
            strategy,
            global: Arc::new(global),
            verifier,
            rng,
            online: BTreeSet::new(),
            enrolled: Vec::new(),
            standing: BTreeMap::new(),
            cheaters: BTreeSet::new(),
            privacy,
            census,
            last_round: resume.last_round,
            completed: resume.completed,
            aborts_in_a_row: 0,
            state: State::Waiting { needed, give_up: Some(give_up), started: now },
            timer: Some(give_up),
            out: Outbox::default(),
            census_tried_for: 0,
            fed,
        };
        if let Some(Err(e)) = restored {
            coordinator.out.notice(resume.last_round, None, format!("{e}: the server optimizer starts from zero"));
        }
        if done {
            coordinator.stop(StopReason::Finished { rounds: coordinator.fed.rounds });
        }
        Ok(coordinator)
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.queue.pop_front()
    }

    /// When to call [`Coordinator::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Stopped => None,
            State::Census { sum, .. } => Some(sum.deadline()),
            State::Evaluating(e) => Some(e.sum.deadline()),
            State::Training(t) => Some(match &t.collecting {
                Collecting::Plain { round, .. } => round.deadline(),
                Collecting::Secure { sum, .. } => sum.deadline(),
            }),
            State::Waiting { .. } | State::Next => self.timer,
        }
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.state, State::Stopped)
    }

    /// The first round a client connecting now can be sampled for.
    pub fn next_round(&self) -> u64 {
        self.last_round + 1
    }

    /// Rounds completed so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// The global parameters.
    pub fn global(&self) -> &Arc<Vec<f32>> {
        &self.global
    }

    /// The enrolled, unrevoked clients (differentially private rounds sample from them).
    pub fn set_enrolled(&mut self, mut enrolled: Vec<ClientId>) {
        enrolled.sort();
        enrolled.dedup();
        self.enrolled = enrolled;
    }

    /// A client was welcomed.
    pub fn client_connected(&mut self, id: &str, now: Instant) {
        self.online.insert(id.to_string());
        // Not at once: clients connecting in a burst are all there when the round is drawn.
        if matches!(self.state, State::Waiting { .. }) {
            self.timer = Some(self.timer.map_or(now, |t| t.min(now)));
        }
    }

    /// A client's connection ended (its requests in flight fail on their own).
    pub fn client_disconnected(&mut self, id: &str) {
        self.online.remove(id);
    }

    /// The reply to `request` from `from`, or why none came (`Err`: the connection failed, the
    /// stream broke, the reply was malformed); the reason is escaped here before any use.
    pub fn handle_reply(&mut self, request: RequestId, from: &str, reply: Result<ClientMsg, String>, now: Instant) {
        let reply = reply.map_err(|e| escape(&e, 300));
        let verifier = self.verifier.clone();
        match &mut self.state {
            State::Census { round, sum } => {
                let round = *round;
                if let Some(done) = sum.handle_reply(request, from, reply, now, verifier.as_ref(), &mut self.out) {
                    self.census_finished(round, done, now);
                }
            }
            State::Evaluating(e) => {
                if let Some(done) = e.sum.handle_reply(request, from, reply, now, verifier.as_ref(), &mut self.out) {
                    self.evaluation_finished(done, now);
                }
            }
            State::Training(t) => {
                let number = t.number;
                let done = match &mut t.collecting {
                    Collecting::Plain { round, waiting } => {
                        if waiting.get(from) != Some(&request) {
                            return;
                        }
                        waiting.remove(from);
                        match reply {
                            Ok(ClientMsg::Update(update)) => {
                                if let Err(e) = round.handle_update(from, update) {
                                    self.out.notice(number, Some(from), e.to_string());
                                }
                            }
                            Ok(ClientMsg::Decline { reason, .. }) => {
                                let reason = escape(&reason, 300);
                                self.out.declined(number, Task::Train, from, &reason);
                                round.handle_dropout(from, decline_dropout(&reason));
                            }
                            Ok(other) => round.handle_dropout(
                                from,
                                format!("protocol violation: expected an update, got {}", other.kind()),
                            ),
                            Err(why) => round.handle_dropout(from, why),
                        }
                        // Only the last answer ends the round here; the deadline ends it in
                        // `handle_timeout`, after every reply that had already arrived.
                        waiting.is_empty().then_some(None)
                    }
                    Collecting::Secure { sum, .. } => {
                        sum.handle_reply(request, from, reply, now, verifier.as_ref(), &mut self.out).map(Some)
                    }
                };
                if let Some(done) = done {
                    self.training_finished(done, now);
                }
            }
            State::Waiting { .. } | State::Next | State::Stopped => {}
        }
    }

    /// Time passed: deadlines, waits and the start of the next round.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Census { round, sum } => {
                let round = *round;
                if let Some(done) = sum.handle_timeout(now, &mut self.out) {
                    self.census_finished(round, done, now);
                }
            }
            State::Evaluating(e) => {
                if let Some(done) = e.sum.handle_timeout(now, &mut self.out) {
                    self.evaluation_finished(done, now);
                }
            }
            State::Training(t) => {
                let done = match &mut t.collecting {
                    Collecting::Plain { round, .. } => (round.poll(now) == Poll::Ready).then_some(None),
                    Collecting::Secure { sum, .. } => sum.handle_timeout(now, &mut self.out).map(Some),
                };
                if let Some(done) = done {
                    self.training_finished(done, now);
                }
            }
            State::Waiting { .. } | State::Next => {
                if self.timer.is_some_and(|t| now >= t) {
                    self.timer = None;
                    self.try_start(now);
                }
            }
            State::Stopped => {}
        }
    }

    fn stop(&mut self, reason: StopReason) {
        self.state = State::Stopped;
        self.timer = None;
        self.out.event(Event::Stopped(reason));
    }

    /// Whether `id` may be sampled at `now`.
    fn eligible(&self, id: &str, now: Instant) -> bool {
        !self.cheaters.contains(id) && self.standing.get(id).and_then(|s| s.until).is_none_or(|until| now >= until)
    }

    fn eligible_online(&self, now: Instant) -> Vec<ClientId> {
        self.online.iter().filter(|id| self.eligible(id, now)).cloned().collect()
    }

    /// Starts the next round (or its census) if enough clients are eligible; otherwise waits.
    fn try_start(&mut self, now: Instant) {
        if self.completed >= self.fed.rounds {
            return self.stop(StopReason::Finished { rounds: self.fed.rounds });
        }
        let (needed, give_up, started) = match &self.state {
            State::Waiting { needed, give_up, started } => (*needed, *give_up, *started),
            _ => (min_cohort(&self.fed), None, now),
        };
        let eligible = self.eligible_online(now);
        if eligible.len() < needed {
            // Connected sites that are backing off come back by themselves: wait for the first
            // of them without giving up. Too few connected: wait for more, up to the limit.
            let backing_off = self
                .online
                .iter()
                .filter(|id| !self.cheaters.contains(*id))
                .filter_map(|id| self.standing.get(id).and_then(|s| s.until).filter(|until| *until > now))
                .min();
            let connected = self.online.iter().filter(|id| !self.cheaters.contains(*id)).count();
            let give_up = if connected >= needed {
                None
            } else {
                Some(give_up.unwrap_or(now + Duration::from_secs_f64(self.fed.wait_for_clients_secs)))
            };
            if let Some(limit) = give_up.filter(|limit| now >= *limit) {
                return self.stop(StopReason::NotEnoughClients {
                    connected: eligible.len(),
                    needed,
                    waited_secs: limit.saturating_duration_since(started).as_secs_f64(),
                });
            }
            self.timer = [give_up, backing_off].into_iter().flatten().min();
            self.state = State::Waiting { needed, give_up, started };
            return;
        }
        let round = self.last_round + 1;
        let global_counts = !self.fed.train.census_heads(&self.spec).is_empty();
        let due = match (&self.census, self.fed.train.recount_every(&self.spec)) {
            (None, _) => true,
            (Some((at, _)), Some(every)) => round >= at + every,
            (Some(_), None) => false,
        };
        if global_counts && due && self.census_tried_for != round {
            self.census_tried_for = round;
            self.start_census(round, eligible, now);
            return;
        }
        self.start_round(round, now);
    }

    /// The label census before `round`: every eligible client's label counts of the heads
    /// whose loss has `scope = "global"`, summed securely. Only the sum is seen.
    fn start_census(&mut self, round: u64, cohort: Vec<ClientId>, now: Instant) {
        let classes = self.fed.train.census_heads(&self.spec).iter().map(|h| h.classes).sum();
        match self.start_counts(round, Task::CountLabels, cohort, TensorBytes::default(), classes, now) {
            Ok(sum) => self.state = State::Census { round, sum: Box::new(sum) },
            Err(reason) => {
                self.out.event(Event::CensusFailed { round, reason });
                self.start_round(round, now);
            }
        }
    }

    fn census_finished(&mut self, round: u64, done: Result<Summed, Failed>, now: Instant) {
        match done {
            Ok(summed) => {
                let counts = self.decode_counts(&summed);
                self.settle(&summed.survivors, &summed.dropped, &summed.cheaters, round, now);
                self.out.event(Event::CensusDone { round, clients: summed.survivors.len(), counts: counts.clone() });
                self.census = Some((round, counts));
            }
            Err(failed) => {
                self.settle(&[], &failed.dropped, &failed.cheaters, round, now);
                self.out.event(Event::CensusFailed { round, reason: failed.note });
            }
        }
        self.start_round(round, now);
    }

    fn decode_counts(&self, summed: &Summed) -> Vec<u64> {
        count_quantizer()
            .decode_sum(&summed.sum, summed.survivors.len())
            .iter()
            .map(|c| c.round().max(0.0) as u64)
            .collect()
    }

    /// A secure sum of whole counts (a census, confusion matrices): `len` counts per client,
    /// exact (scale 1, 64-bit modulus, up to 2^24 each), never of fewer than
    /// `max(3, min_clients)` clients.
    fn start_counts(
        &mut self,
        round: u64,
        task: Task,
        cohort: Vec<ClientId>,
        params: TensorBytes,
        len: usize,
        now: Instant,
    ) -> Result<SecureSum, String> {
        let min_inputs = self.fed.min_clients.max(MIN_COUNT_INPUTS);
        if cohort.len() < min_inputs {
            return Err(format!("{} sites can take part; a sum of counts needs at least {min_inputs}", cohort.len()));
        }
        let mut setup = self.session_setup(round, task, &cohort, len, 1.0, min_inputs);
        setup.params.quantizer = count_quantizer();
        let plan = RoundPlan {
            round,
            run: self.run.clone(),
            model_spec: self.spec_toml.clone(),
            params,
            train: (&self.fed.train).into(),
            seed: plan_seed(self.seed, round),
            deadline_ms: (self.fed.round_timeout_secs * 1000.0) as u64,
            secure: Some(Box::new(SecurePlan {
                setup,
                sample_cap: self.fed.secagg.sample_cap,
                segments: vec![len],
                dp: None,
            })),
            task,
            class_counts: None,
        };
        self.out.event(Event::RoundStarted {
            round,
            task,
            cohort: cohort.clone(),
            sampling_rate: None,
            noise_multiplier: None,
            too_few_probability: None,
        });
        self.secure_sum(plan, cohort, min_inputs, now).map_err(|f| f.note)
    }

    fn secure_sum(
        &mut self,
        plan: RoundPlan,
        cohort: Vec<ClientId>,
        min_survivors: usize,
        now: Instant,
    ) -> Result<SecureSum, Failed> {
        SecureSum::start(
            plan,
            cohort,
            now,
            Duration::from_secs_f64(self.fed.secagg.phase_timeout_secs),
            Duration::from_secs_f64(self.fed.round_timeout_secs),
            min_survivors,
            &mut self.out,
        )
    }

    /// The setup of one secure session: what it sums and the fewest inputs the clients may
    /// unmask. (The clients' nonces make each session fresh and seed its graph.)
    fn session_setup(
        &self,
        round: u64,
        task: Task,
        cohort: &[ClientId],
        vector_len: usize,
        range: f64,
        min_inputs: usize,
    ) -> SecAggSetup {
        let mut setup = self.fed.secagg.setup(round, cohort.to_vec(), vector_len, range);
        setup.purpose = task.purpose().into();
        setup.min_inputs = min_inputs;
        setup
    }

    /// Draws the cohort of round `round`.
    fn draw(&mut self, round: u64, now: Instant) -> Result<Draw, StopReason> {
        let fed = &self.fed;
        let eligible_online: Vec<ClientId> = self.eligible_online(now);
        let Some(p) = self.privacy.as_mut().filter(|p| p.noised()) else {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cohort_seed(self.seed, round));
            let cohort = select_cohort(&eligible_online, fed.clients_per_round, &mut rng);
            let expected_clients = cohort.len() as f64;
            return Ok(Draw { cohort, offline: Vec::new(), sampling_rate: None, too_few: None, expected_clients });
        };
        // Differential privacy: Poisson sampling from every enrolled client, so that the
        // accountant's amplification holds.
        // Every connected client was admitted, so it is enrolled even if the driver's list is
        // older than its enrolment.
        let population: Vec<ClientId> =
            self.enrolled.iter().chain(&self.online).cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let q = (fed.clients_per_round as f64 / population.len().max(1) as f64).min(1.0);
        let epsilon = p.account.epsilon_after(q, p.config.noise_multiplier);
        if let Some(budget) = p.config.epsilon_budget.filter(|b| epsilon > *b) {
            return Err(StopReason::Budget { epsilon, budget, delta: p.config.delta, completed: self.completed });
        }
        if p.config.delta * population.len() as f64 >= 1.0 && !p.warned_delta {
            p.warned_delta = true;
            self.out.notice(
                round,
                None,
                format!(
                    "federation.dp.delta = {} is not below 1 / {} enrolled clients: the guarantee is weak",
                    p.config.delta,
                    population.len()
                ),
            );
        }
        // A round is skipped when too few sampled clients can take part: that depends on the
        // sample, so its chance is added to delta (computed before sampling).
        let reachable = population.iter().filter(|id| eligible_online.contains(id)).count();
        let too_few = dp::too_few_probability(reachable, q, min_cohort(fed));
        if too_few > p.config.delta / fed.rounds as f64 && !p.warned_too_few {
            p.warned_too_few = true;
            self.out.notice(
                round,
                None,
                format!(
                    "a sample of {reachable} reachable clients at q = {q:.4} falls below min_clients = {} with \
                     probability {too_few:.2e} per round, which adds to delta; lower federation.min_clients (or \
                     enrol more clients) to make it negligible",
                    fed.min_clients
                ),
            );
        }
        let mut cohort = Vec::new();
        let mut offline = Vec::new();
        for id in poisson_cohort(&population, q, &mut self.rng) {
            if eligible_online.contains(&id) {
                cohort.push(id);
            } else {
                let why = if self.cheaters.contains(&id) {
                    "left out: caught cheating"
                } else if self.online.contains(&id) {
                    "left out: backing off after failing again and again"
                } else {
                    "offline when sampled"
                };
                offline.push((id, why.to_string()));
            }
        }
        Ok(Draw {
            cohort,
            offline,
            sampling_rate: Some(q),
            too_few: Some(too_few),
            expected_clients: q * population.len() as f64,
        })
    }

    fn start_round(&mut self, round: u64, now: Instant) {
        self.last_round = round;
        let draw = match self.draw(round, now) {
            Ok(draw) => draw,
            Err(stop) => return self.stop(stop),
        };
        let fed = &self.fed;
        let param_len: usize = self.segments.iter().sum();
        let mut plan = RoundPlan {
            round,
            run: self.run.clone(),
            model_spec: self.spec_toml.clone(),
            params: TensorBytes::from_f32(&self.global),
            train: (&fed.train).into(),
            seed: plan_seed(self.seed, round),
            deadline_ms: (fed.round_timeout_secs * 1000.0) as u64,
            secure: None,
            task: Task::Train,
            class_counts: self.census.as_ref().map(|(_, counts)| counts.clone()),
        };
        let cohort = draw.cohort.clone();
        if cohort.len() < min_cohort(fed) {
            // Too few sampled clients can take part: no plans go out, so no privacy is spent
            // but the round's sample.
            let note = format!(
                "{} sampled sites can take part, {} are needed{}",
                cohort.len(),
                min_cohort(fed),
                describe_left_out(&draw.offline)
            );
            return self.abort(round, now, &draw, note, BTreeMap::new(), Vec::new(), false, now);
        }
        let started = Event::RoundStarted {
            round,
            task: Task::Train,
            cohort: cohort.clone(),
            sampling_rate: draw.sampling_rate,
            noise_multiplier: draw.sampling_rate.and(self.privacy.as_ref().map(|p| p.config.noise_multiplier)),
            too_few_probability: draw.too_few,
        };
        let timeout = Duration::from_secs_f64(fed.round_timeout_secs);
        let collecting = match fed.collection {
            Collection::Plain => {
                self.out.event(started);
                let collector: Box<dyn Collector> = Box::new(PlainCollector::new(&self.segments));
                let round_state =
                    Round::new(round, cohort.clone(), now, timeout, &self.segments, fed.min_clients, collector);
                let msg = Arc::new(ServerMsg::Plan(plan));
                let cap = param_len * 4 + (1 << 20);
                let waiting =
                    cohort.iter().map(|id| (id.clone(), self.out.send(id, msg.clone(), cap, now + timeout))).collect();
                Collecting::Plain { round: round_state, waiting }
            }
            Collection::Secure => {
                let dp = self.privacy.as_ref().map(|p| {
                    let q = draw.sampling_rate.unwrap_or(1.0);
                    p.config.plan(p.clip, fed.clients_per_round, fed.min_clients, q, draw.expected_clients)
                });
                let range = dp.as_ref().map_or(fed.secagg.clip, |d| d.coordinate_range());
                let vector_len = SecurePlan::vector_len(param_len, self.segments.len(), dp.is_some());
                let min_inputs = fed.min_clients.max(fed.min_secure_sum()).min(cohort.len());
                let mut setup = self.session_setup(round, Task::Train, &cohort, vector_len, range, min_inputs);
                // Private rounds wrap out-of-range values instead of clamping: no noise is cut.
                setup.params.quantizer.wrap = dp.is_some();
                let secure = Box::new(SecurePlan {
                    setup,
                    sample_cap: fed.secagg.sample_cap,
                    segments: self.segments.clone(),
                    dp,
                });
                // Checked before any plan goes out: a round whose session cannot start sends none
                // (and charges nobody).
                if let Err(e) = secure.setup.check() {
                    let note = format!("the secure session cannot start: {e}");
                    return self.abort(round, now, &draw, note, BTreeMap::new(), Vec::new(), false, now);
                }
                plan.secure = Some(secure.clone());
                self.out.event(started);
                let min_survivors = fed.min_clients;
                match self.secure_sum(plan, cohort, min_survivors, now) {
                    Ok(sum) => Collecting::Secure { sum: Box::new(sum), secure },
                    // Unreachable after the check above: no plan went out.
                    Err(failed) => {
                        return self.abort(round, now, &draw, failed.note, failed.dropped, failed.cheaters, false, now);
                    }
                }
            }
        };
        self.state = State::Training(Box::new(TrainRound { number: round, started: now, draw, collecting }));
    }

    fn training_finished(&mut self, done: Option<Result<Summed, Failed>>, now: Instant) {
        let State::Training(train) = std::mem::replace(&mut self.state, State::Next) else {
            unreachable!("called from the training state")
        };
        let TrainRound { number: round, started, draw, collecting } = *train;
        let outcome = match (collecting, done) {
            (Collecting::Plain { round: state, .. }, _) => {
                let timeout = self.fed.round_timeout_secs;
                let mut dropped = BTreeMap::new();
                for id in state.cohort() {
                    match state.status(id) {
                        Some(ClientStatus::Dropped(why)) => dropped.insert(id.clone(), why.clone()),
                        Some(ClientStatus::Waiting) => {
                            dropped.insert(id.clone(), format!("missed the {timeout:.0} s deadline for an update"))
                        }
                        _ => None,
                    };
                }
                let cohort = state.cohort().count();
                match state.finish() {
                    Ok(o) => Ok((o.aggregate, o.reported, dropped, o.mean_train_loss, None, Vec::new())),
                    Err(RoundError::TooFew { got, min, .. }) => {
                        let note = format!("{got} of {cohort} sites sent a usable update, {min} are needed");
                        Err((with_sites(note, &dropped), dropped, Vec::new()))
                    }
                    Err(e) => Err((with_sites(e.to_string(), &dropped), dropped, Vec::new())),
                }
            }
            (Collecting::Secure { secure, .. }, Some(Ok(summed))) => match self.decode_update(&secure, &summed) {
                Ok((aggregate, unclipped)) => {
                    Ok((aggregate, summed.survivors, summed.dropped, None, unclipped, summed.cheaters))
                }
                Err(note) => Err((note, summed.dropped, summed.cheaters)),
            },
            (Collecting::Secure { .. }, Some(Err(failed))) => Err((failed.note, failed.dropped, failed.cheaters)),
            (Collecting::Secure { .. }, None) => unreachable!("a secure round ends with its sum"),
        };
        let (aggregate, participants, dropped, loss, unclipped, cheaters) = match outcome {
            Ok(o) => o,
            Err((note, dropped, cheaters)) => {
                return self.abort(round, started, &draw, note, dropped, cheaters, true, now)
            }
        };
        // The step first: if it fails, the round aborts having been settled and accounted once.
        let mut global = self.global.as_ref().clone();
        if let Err(e) = self.strategy.apply(&mut global, &aggregate.mean_delta) {
            let note = format!("the server optimizer cannot apply the sum: {e}");
            return self.abort(round, started, &draw, note, dropped, cheaters, true, now);
        }
        self.settle(&participants, &dropped, &cheaters, round, now);
        let (privacy, charged) = self.account(&draw, true);
        let clip = self.privacy.as_ref().map(|p| p.clip);
        if let (Some(p), Some(unclipped)) = (self.privacy.as_mut(), unclipped) {
            p.clip = p.config.next_clip(p.clip, unclipped);
        }
        self.global = Arc::new(global);
        self.completed += 1;
        self.aborts_in_a_row = 0;
        let mut all_dropped: Vec<(ClientId, String)> = dropped.into_iter().collect();
        all_dropped.extend(draw.offline.iter().cloned());
        let report = Box::new(RoundReport {
            round,
            completed: true,
            cohort: draw.cohort.len() + draw.offline.len(),
            participants: participants.len(),
            declined: declined_of(&all_dropped),
            dropped: all_dropped,
            seconds: now.saturating_duration_since(started).as_secs_f64(),
            train_loss: loss.map(f64::from),
            test: None,
            eval_seconds: None,
            head_tests: Vec::new(),
            federated: Vec::new(),
            note: String::new(),
            epsilon: privacy.epsilon,
            epsilon_server: privacy.epsilon_server,
            delta: privacy.delta,
            cheaters,
            clip,
            unclipped,
            sampling_rate: draw.sampling_rate,
            noise_multiplier: privacy.noise_multiplier,
            too_few_probability: draw.too_few,
            participant_ids: participants.clone(),
            charged,
        });
        let checkpoint = Checkpoint { params: self.global.clone(), optimizer: self.strategy.state() };
        let evaluate = self.fed.evaluate_every.is_some_and(|every| self.completed.is_multiple_of(every));
        if evaluate {
            let cells: usize = self.spec.heads.iter().map(|h| h.classes * h.classes).sum();
            let params = TensorBytes::from_f32(&self.global);
            match self.start_counts(round, Task::Evaluate, participants, params, cells, now) {
                Ok(sum) => {
                    self.state = State::Evaluating(Box::new(Evaluating { report, checkpoint, sum }));
                    return;
                }
                Err(reason) => self.out.notice(round, None, format!("federated evaluation skipped: {reason}")),
            }
        }
        self.finish_round(report, Some(checkpoint), now);
    }

    fn evaluation_finished(&mut self, done: Result<Summed, Failed>, now: Instant) {
        let State::Evaluating(e) = std::mem::replace(&mut self.state, State::Next) else {
            unreachable!("called from the evaluation state")
        };
        let Evaluating { mut report, checkpoint, .. } = *e;
        match done {
            Ok(summed) => {
                self.settle(&summed.survivors, &summed.dropped, &summed.cheaters, report.round, now);
                let counts = self.decode_counts(&summed);
                let mut start = 0;
                report.federated = self
                    .spec
                    .heads
                    .iter()
                    .map(|h| {
                        let k = h.classes;
                        let confusion = counts[start..start + k * k].chunks(k.max(1)).map(|row| row.to_vec()).collect();
                        start += k * k;
                        (h.name.clone(), Metrics::from_confusion(confusion, 0.0))
                    })
                    .collect();
            }
            Err(failed) => {
                self.settle(&[], &failed.dropped, &failed.cheaters, report.round, now);
                self.out.notice(report.round, None, format!("federated evaluation failed: {}", failed.note));
            }
        }
        self.finish_round(report, Some(checkpoint), now);
    }

    fn finish_round(&mut self, report: Box<RoundReport>, checkpoint: Option<Checkpoint>, now: Instant) {
        self.out.event(Event::RoundFinished { report, checkpoint });
        self.state = State::Next;
        self.timer = Some(now);
        if self.completed >= self.fed.rounds {
            self.stop(StopReason::Finished { rounds: self.fed.rounds });
        }
    }

    /// Ends a round without a new model, in plain words.
    #[allow(clippy::too_many_arguments)]
    fn abort(
        &mut self,
        round: u64,
        started: Instant,
        draw: &Draw,
        note: String,
        dropped: BTreeMap<ClientId, String>,
        cheaters: Vec<(ClientId, String)>,
        plans_sent: bool,
        now: Instant,
    ) {
        self.settle(&[], &dropped, &cheaters, round, now);
        let (privacy, charged) = self.account(draw, plans_sent);
        let note = format!("round {round} aborted: {note}. The global model is unchanged");
        let mut all_dropped: Vec<(ClientId, String)> = dropped.into_iter().collect();
        all_dropped.extend(draw.offline.iter().cloned());
        let report = Box::new(RoundReport {
            round,
            completed: false,
            cohort: draw.cohort.len() + draw.offline.len(),
            declined: declined_of(&all_dropped),
            dropped: all_dropped,
            seconds: now.saturating_duration_since(started).as_secs_f64(),
            note: note.clone(),
            epsilon: privacy.epsilon,
            epsilon_server: privacy.epsilon_server,
            delta: privacy.delta,
            cheaters,
            sampling_rate: draw.sampling_rate,
            noise_multiplier: privacy.noise_multiplier,
            too_few_probability: draw.too_few,
            charged,
            // No participants, loss, metrics or clip: nothing was summed.
            ..RoundReport::default()
        });
        self.aborts_in_a_row += 1;
        self.finish_round(report, None, now);
        if self.aborts_in_a_row >= self.fed.max_consecutive_aborts && !self.is_stopped() {
            self.stop(StopReason::TooManyAborts { aborts: self.aborts_in_a_row, last: note });
        }
    }

    /// Every round that drew a DP sample is accounted, whatever its outcome: a skipped round
    /// depends on the sample, and the server cannot prove it did not look at a sum. The
    /// clients sent plans are charged a participation each (the epsilon against the server).
    fn account(&mut self, draw: &Draw, plans_sent: bool) -> (Spent, Vec<ClientId>) {
        let (Some(p), Some(q)) = (self.privacy.as_mut(), draw.sampling_rate) else {
            return (Spent::default(), Vec::new());
        };
        let z = p.config.noise_multiplier;
        let charged: Vec<ClientId> = if plans_sent { draw.cohort.clone() } else { Vec::new() };
        p.account.record_round(q, z, draw.too_few.unwrap_or(0.0), &charged);
        let spent = Spent {
            noise_multiplier: Some(z),
            epsilon: Some(p.account.epsilon()),
            epsilon_server: Some(p.account.epsilon_against_server()),
            delta: Some(p.account.delta()),
        };
        (spent, charged)
    }

    /// Decodes a secure round's sum into the mean update.
    fn decode_update(&self, secure: &SecurePlan, summed: &Summed) -> Result<(Aggregate, Option<f64>), String> {
        let quantizer = secure.setup.params.quantizer;
        let contributors = summed.survivors.len();
        match &secure.dp {
            Some(dp) => {
                // Every segment divides by the public expected number of clients: no count of
                // contributors (per head or in all) is ever decoded.
                let decoded = quantizer.decode_sum(&summed.sum, contributors);
                let (mut mean, unclipped) = dp::mean_from_sum(&decoded, &secure.segments, dp.expected_clients)
                    .ok_or("the secure sum does not fit the DP layout")?;
                // Personal heads never leave the clients: what arrived there is noise alone.
                for segment in &self.personal {
                    mean[segment.clone()].iter_mut().for_each(|v| *v = 0.0);
                }
                Ok((Aggregate { mean_delta: mean, total_weight: dp.expected_clients, contributors }, Some(unclipped)))
            }
            None => {
                let (mean, totals) = weighted_mean_from_sum(&summed.sum, contributors, &secure.segments, &quantizer)
                    .ok_or("the survivors' total weight is zero")?;
                let total_weight = totals.first().copied().unwrap_or(0.0);
                Ok((Aggregate { mean_delta: mean, total_weight, contributors }, None))
            }
        }
    }

    /// After a session: participants' records clear; each failure counts, and a site failing
    /// again and again backs off; cheaters are left out from now on.
    fn settle(
        &mut self,
        participants: &[ClientId],
        dropped: &BTreeMap<ClientId, String>,
        cheaters: &[(ClientId, String)],
        round: u64,
        now: Instant,
    ) {
        for id in participants {
            self.standing.remove(id);
        }
        for (id, what) in cheaters {
            if self.cheaters.insert(id.clone()) {
                self.out.event(Event::Cheater { round, client: id.clone(), what: escape(what, 300) });
            }
        }
        for (id, why) in dropped {
            if self.cheaters.contains(id) {
                continue;
            }
            let standing = self.standing.entry(id.clone()).or_default();
            standing.failures = standing.failures.saturating_add(1);
            let wait = self.fed.backoff.exclusion(standing.failures);
            if !wait.is_zero() {
                standing.until = Some(now + wait);
                self.out.event(Event::BackingOff {
                    client: id.clone(),
                    failures: standing.failures,
                    for_secs: wait.as_secs_f64(),
                    last: why.clone(),
                });
            }
        }
    }
}

/// What a round spent of privacy.
#[derive(Default)]
struct Spent {
    noise_multiplier: Option<f64>,
    epsilon: Option<f64>,
    epsilon_server: Option<f64>,
    delta: Option<f64>,
}

/// The fewest sites a round starts with: `min_clients`, and for secure collection at least
/// [`MIN_TRAIN_INPUTS`] (a secure sum of one is the update, and no session takes one).
fn min_cohort(fed: &Federation) -> usize {
    match fed.collection {
        Collection::Secure => fed.min_clients.max(fed.min_secure_sum()),
        Collection::Plain => fed.min_clients,
    }
}

/// The quantizer of sums of counts: exact whole numbers up to 2^24 each.
fn count_quantizer() -> Quantizer {
    Quantizer { bits: 64, clip: CENSUS_MAX_COUNT, scale: 1.0, wrap: false }
}

/// How a decline reads among a round's dropouts (`RoundReport::dropped`, the dropouts table):
/// "declined: " and the site's escaped reason. [`declined_reason`] reads it back.
pub fn decline_dropout(reason: &str) -> String {
    format!("{DECLINED}{reason}")
}

/// The site's reason, when a dropout's reason is a decline ([`decline_dropout`]).
pub fn declined_reason(dropout: &str) -> Option<&str> {
    dropout.strip_prefix(DECLINED)
}

const DECLINED: &str = "declined: ";

/// The sites that declined, from the reasons of those dropped.
fn declined_of(dropped: &[(ClientId, String)]) -> Vec<(ClientId, String)> {
    dropped.iter().filter_map(|(id, why)| declined_reason(why).map(|reason| (id.clone(), reason.to_string()))).collect()
}

/// `what`, then each site that did not take part and why.
fn with_sites(what: String, dropped: &BTreeMap<ClientId, String>) -> String {
    if dropped.is_empty() {
        return what;
    }
    let sites: Vec<String> = dropped.iter().map(|(id, why)| format!("{id} {why}")).collect();
    format!("{what}. {}", sites.join("; "))
}

/// "; hospital-b offline when sampled, ..." for the notes of rounds that could not start.
fn describe_left_out(offline: &[(ClientId, String)]) -> String {
    if offline.is_empty() {
        return String::new();
    }
    let sites: Vec<String> = offline.iter().map(|(id, why)| format!("{id} {why}")).collect();
    format!(" ({})", sites.join("; "))
}

#[cfg(test)]
mod tests;
