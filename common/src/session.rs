//! The client's side of a round as a sans-IO state machine, in the style of quinn-proto: server
//! requests and job results in, [`Action`]s out.
//!
//! A [`ClientSession`] owns every decision a client makes in a round: the checks of a plan (a
//! secure session that fits the plan, the data owner's floor on the size of a sum, no label
//! counts or confusion matrices outside secure aggregation, each kind of sum joined at most once
//! per round), the privacy ledger's admission, the SecAgg+ client sessions, which input goes into
//! which session, and every decline with its reason. It does no I/O and no training: no candle,
//! no locks, no clock. The driver (`cohort-client`'s daemon, or the socket-free federation
//! harness in the coordinator's tests) moves bytes and files and runs the jobs on a
//! `trainer::Trainer` (named, not linked: the trainer depends on this module, not the reverse):
//!
//! ```text
//! loop {
//!     while let Some(action) = session.poll_action() {
//!         Reply { to, msg }          => send msg on the stream of request `to`
//!         Run(job)                   => run it (trainer.run(&job), blocking: off the event loop)
//!         SaveLedger { ledger, .. }  => write it durably, then poll on (or ledger_not_saved)
//!     }
//!     select {
//!         request `to` arrives  => session.handle(to, msg, rng),
//!         job `id` finished     => session.job_done(id, result, rng),
//!     }
//! }
//! ```
//!
//! **Ordering.** The driver performs actions in the order it polls them, and a
//! [`Action::SaveLedger`] is durable before the driver polls the next action: the reply that
//! follows it (a key advert, or a decline past the budget) depends on the spending it records,
//! and a client that answered before recording could spend its budget twice after a crash. If
//! the ledger cannot be written, the driver calls [`ClientSession::ledger_not_saved`], which
//! withdraws the reply and the job still queued behind it and declines the round instead.
//!
//! **Replies.** Every request given to [`ClientSession::handle`] gets exactly one
//! [`Action::Reply`] (a request that is no request, such as a `Welcome`, is an error instead).
//! A reply may come later: a plain plan is answered with the update when its training job is
//! done, and a masked-input request that arrives while the round's input is still being
//! computed is parked and answered when the job result comes in; no thread waits for it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rand::CryptoRng;
use zeroize::Zeroizing;

use crate::dp::{self, LedgerRefusal, PrivacyLedger};
use crate::model::ModelSpec;
use crate::secagg::{self, AdvertSigner, PeerVerifier, SealedShares, SecAggClient, SecAggError};
use crate::secagg::{MIN_COUNT_INPUTS, MIN_TRAIN_INPUTS};
use crate::train::TrainConfig;
use crate::wire::{self, escape, ClientMsg, RoundPlan, SecurePlan, ServerMsg, Task, Update};

/// The driver's handle for one request (a stream): the reply to it names the same token. Tokens
/// must not be reused while a reply to them may still come.
pub type Token = u64;

/// Identifies one job; its result comes back through [`ClientSession::job_done`] with the same id.
pub type JobId = u64;

/// What went wrong, in two families: the server's (a plan this client cannot or will not follow,
/// a secure-aggregation message that does not check out, a request that is no request) and the
/// driver's (a result for a job that is not running). A decline's reason is the error's text.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The server sent a plan that cannot be followed, or one this client declines.
    #[error("the round plan is invalid: {0}")]
    BadPlan(#[from] PlanRefusal),
    /// A secure-aggregation message from the server (or a neighbour) did not check out.
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    /// The privacy ledger declines the round.
    #[error(transparent)]
    Budget(#[from] LedgerRefusal),
    /// The data owner's policy declines the run ([`RunPolicy`]).
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    /// This client's own computation for the round failed.
    #[error("training failed: {0}")]
    Job(String),
    /// The server sent something that is not a request on a request stream (already escaped).
    #[error("unexpected request {0}")]
    NotARequest(String),
    /// The driver misused the session (a bug in the driver, not the server's doing).
    #[error("client session misused: {0}")]
    Misuse(String),
}

/// Why this client refuses a plan (each is the server's doing: it is declined with this text).
/// Strings in it that the server chose are escaped and capped.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PlanRefusal {
    #[error("{0}")]
    Run(String),
    #[error("the model spec does not parse: {0}")]
    Spec(String),
    #[error("the training terms: {0}")]
    Terms(String),
    #[error(
        "the server asks for label counts or confusion matrices outside secure aggregation; they reveal this \
         client's data"
    )]
    CountsInTheClear,
    #[error("the round is secure but this client has no certificate key to sign with")]
    NoKey,
    #[error("the secure session is a `{session}` sum of round {session_round}, but the plan is a `{plan}` of round {plan_round}")]
    SessionMismatch { session: String, session_round: u64, plan: &'static str, plan_round: u64 },
    #[error("{what} {len} counts; the plan's vector has {vector_len}")]
    CountLength { what: &'static str, len: usize, vector_len: usize },
    #[error("secure vector length {vector_len} does not fit {params} parameters in {segments} segments")]
    VectorLength { vector_len: usize, params: usize, segments: usize },
    #[error(
        "the plan would unmask counts of as few as {min_inputs} clients; this client sends counts only into sums \
         of at least {floor}"
    )]
    CountSumTooSmall { min_inputs: usize, floor: usize },
    #[error(
        "the plan would unmask sums of as few as {min_inputs} updates; this client sends its update only into \
         sums of at least {floor} (min_sum_clients)"
    )]
    UpdateSumTooSmall { min_inputs: usize, floor: usize },
    #[error("differential privacy: {0}")]
    Dp(#[from] dp::DpError),
    #[error("the quantizer range {clip} is narrower than the clipped, noised values need ({needed})")]
    QuantizerRange { clip: f64, needed: f64 },
    #[error("the quantizer of a private round clamps values, which would cut this client's noise")]
    QuantizerClamps,
    #[error("the noise is calibrated to sums of at least {calibrated} inputs, but the session would unmask sums of {min_inputs}")]
    NoiseCalibration { calibrated: usize, min_inputs: usize },
    #[error(
        "this client already joined the {purpose} sum of round {round}; it joins each round's sum once (a second \
         sum of the same update would give it away by difference)"
    )]
    AlreadyJoined { purpose: String, round: u64 },
    #[error(
        "the plan asks for the same computation (model, parameters, seed and settings) as the sum this client \
         joined in run `{run}`, round {round}; a second sum of the same update over another cohort would give it \
         away by difference"
    )]
    SameInput { run: String, round: u64 },
    #[error("round {0}: shares were already sent")]
    SharesAlreadySent(u64),
    #[error("no secure round {0} in progress")]
    NoSecureRound(u64),
}

/// Which runs a data owner takes part in (`[policy]` in client.toml). A federation hosts many
/// runs under one CA; the server decides what runs, and each site decides what it joins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunPolicy {
    /// The model names (a model spec's `name`) this site trains; `None`: any.
    pub models: Option<Vec<String>>,
    /// The most epsilon one run may spend of this site's budget; `None`: the whole budget.
    pub max_epsilon_per_run: Option<f64>,
}

/// Why the data owner's policy declines a plan (not the server's fault: it may run what it likes).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("run `{run}` trains model `{model}`, which this site's policy.models ({accepted}) does not list")]
    Model { run: String, model: String, accepted: String },
}

impl RunPolicy {
    /// Whether the plan's run is one this site takes part in (the per-run epsilon is the
    /// ledger's to check, when it admits the round).
    pub fn check(&self, plan: &RoundPlan) -> Result<(), PolicyRefusal> {
        let Some(models) = &self.models else { return Ok(()) };
        let model = ModelSpec::from_toml(&plan.model_spec).map(|s| s.name).unwrap_or_default();
        if models.contains(&model) {
            return Ok(());
        }
        Err(PolicyRefusal::Model {
            run: escape(&plan.run, 64),
            model: escape(&model, 64),
            accepted: models.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
        })
    }
}

impl SessionError {
    /// Whether the server (or a peer) is to blame, rather than this client or its driver.
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, SessionError::BadPlan(_) | SessionError::SecAgg(_) | SessionError::NotARequest(_))
    }
}

/// The certificate key that signs this client's key adverts, and the check of its neighbours'.
#[derive(Clone)]
pub struct SecureKeys {
    pub signer: Arc<dyn AdvertSigner + Send + Sync>,
    pub verifier: Arc<dyn PeerVerifier + Send + Sync>,
}

/// What a job computes (the trainer runs all of them the same way, secure round or not: masking
/// the result is the session's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Train on the plan and return the update ([`JobOutput::Update`]).
    Train,
    /// Count this client's labels for a census ([`JobOutput::Counts`]).
    CountLabels,
    /// Evaluate the plan's parameters: confusion matrices ([`JobOutput::Counts`]).
    Evaluate,
}

/// Work for the trainer: blocking, so the driver runs it off its event loop.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    /// The request (the plan) that started it.
    pub request: Token,
    /// Whether its result goes into a secure sum (encoded and masked) rather than out as is.
    pub secure: bool,
    pub plan: Arc<RoundPlan>,
}

/// What a job returns.
#[derive(Debug, Clone)]
pub enum JobOutput {
    Update(Update),
    /// Label counts or confusion cells, in the order the plan's model gives them.
    Counts(Vec<u64>),
}

/// A job's result; the error is the reason, in words (it becomes the decline's reason).
pub type JobResult = Result<JobOutput, String>;

/// What the driver must do next, in the order polled (see the module's ordering rule).
#[derive(Debug)]
pub enum Action {
    /// Send `msg` as the reply to request `to`.
    Reply { to: Token, msg: ClientMsg },
    /// Run a job and hand its result to [`ClientSession::job_done`].
    Run(Job),
    /// Write the privacy ledger durably before polling the next action (the reply to request
    /// `before` depends on it); if that fails, call [`ClientSession::ledger_not_saved`].
    SaveLedger { ledger: PrivacyLedger, round: u64, before: Token },
}

/// Where the input of a secure round stands: keys are exchanged while its job runs.
enum Input {
    Computing,
    /// The encoded input, zeroized when dropped (it is this client's update).
    Ready(Zeroizing<Vec<u64>>),
    Failed(String),
    /// The masked input has been sent.
    Masked,
}

/// A secure round in progress: the protocol state, the plan, the job that computes its input
/// (only that job's result goes into this session) and a masked-input request waiting for it.
struct SecureRound {
    client: SecAggClient,
    plan: Arc<RoundPlan>,
    job: JobId,
    input: Input,
    parked: Option<(Token, Vec<SealedShares>)>,
}

/// Who waits for a job's result.
enum Waiting {
    /// A plain plan: the update is the reply to `to`.
    Plain { to: Token, round: u64 },
    /// A secure round's input (the session whose `job` matches).
    Secure,
}

/// One client's protocol state across rounds and connections.
pub struct ClientSession {
    id: String,
    keys: Option<SecureKeys>,
    /// The fewest clients a secure sum of this client's update may hold (the data owner's floor,
    /// whatever the server asks).
    min_sum_clients: usize,
    /// The last round of each kind of secure sum (by purpose) this client joined: it joins each
    /// at most once, and never an earlier one. Two sums of the same update (training is seeded
    /// by the plan) over overlapping cohorts would give it away by their difference.
    /// Keyed by run, then purpose: each run numbers its rounds from 1.
    joined: BTreeMap<(String, String), u64>,
    /// What each secure sum this client joined asked it to compute ([`input_fingerprint`]),
    /// with the sum's run and round, oldest first: the same computation in another run's sum
    /// is refused, whatever the run and round are called.
    summed: VecDeque<([u8; 32], String, u64)>,
    /// Which runs, models and per-run spending this data owner accepts.
    policy: RunPolicy,
    secure: Option<SecureRound>,
    ledger: Option<PrivacyLedger>,
    /// The federation the ledger charges (see [`dp::federation_key`]) and the first round of
    /// the current connection: set by [`ClientSession::connected`].
    federation: String,
    joined_at: u64,
    /// The run in progress when this connection was welcomed (`joined_at` is its round).
    welcome_run: String,
    jobs: BTreeMap<JobId, Waiting>,
    next_job: JobId,
    actions: VecDeque<Action>,
}

impl ClientSession {
    /// A session for the client `id` (its certificate's subject: the id the server's cohorts name).
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            keys: None,
            min_sum_clients: MIN_TRAIN_INPUTS,
            joined: BTreeMap::new(),
            summed: VecDeque::new(),
            policy: RunPolicy::default(),
            secure: None,
            ledger: None,
            federation: String::new(),
            joined_at: 0,
            welcome_run: String::new(),
            jobs: BTreeMap::new(),
            next_job: 0,
            actions: VecDeque::new(),
        }
    }

    /// Enables secure aggregation with these keys.
    pub fn with_secure_keys(mut self, keys: SecureKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    /// This client's updates go only into secure sums of at least `n` clients (at least 2; label
    /// counts and confusion matrices at least [`MIN_COUNT_INPUTS`] whatever `n`). A server may
    /// ask for less; the client then declines, saying why.
    pub fn with_min_sum_clients(mut self, n: usize) -> Self {
        self.min_sum_clients = n.max(MIN_TRAIN_INPUTS);
        self
    }

    /// A client with a privacy budget: it takes part only in private rounds, and only while this
    /// ledger admits them (each admission is saved before the reply; see the module's ordering).
    pub fn with_ledger(mut self, ledger: PrivacyLedger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The data owner's policy on runs ([`RunPolicy`]): plans outside it are declined.
    pub fn with_policy(mut self, policy: RunPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The privacy ledger as this session has charged it, if the client has one.
    pub fn ledger(&self) -> Option<&PrivacyLedger> {
        self.ledger.as_ref()
    }

    /// A new connection: `federation` is the key the ledger charges ([`dp::federation_key`]),
    /// `next_round` the server's next round (the ledger charges sampled rounds from there).
    /// `run` the run in progress (empty if none), whose round `next_round` is.
    pub fn connected(&mut self, next_round: u64, federation: String, run: String) {
        self.joined_at = next_round;
        self.federation = federation;
        self.welcome_run = run;
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Takes one server request. Its reply is queued now, or later (a plan's update when its
    /// training is done; a masked input when the round's input is ready). An error means the
    /// message is no request: nothing is queued for it.
    pub fn handle(&mut self, to: Token, msg: ServerMsg, rng: &mut impl CryptoRng) -> Result<(), SessionError> {
        let Some(round) = msg.request_round() else {
            return Err(SessionError::NotARequest(escape(&format!("{msg:?}"), 200)));
        };
        let reply = match msg {
            ServerMsg::Plan(plan) => self.plan(to, plan, rng),
            ServerMsg::Joined { round, list } => self
                .in_session(round, |_| false, |c, k| c.handle_joined(&list, k.signer.as_ref(), rng))
                .map(|advert| Some(ClientMsg::Advert { round, advert })),
            ServerMsg::Adverts { round, adverts } => self
                .in_session(round, |_| false, |c, k| c.handle_adverts(&adverts, k.verifier.as_ref(), rng))
                .map(|keys| Some(ClientMsg::Shares { round, keys })),
            ServerMsg::Shares { round, shares } => self.shares(to, round, shares),
            // A refused list ends the session; so does the unmask, whatever its outcome.
            ServerMsg::Survivors { round, list } => self
                .in_session(round, Result::is_err, |c, k| c.handle_survivors(&list, k.signer.as_ref()))
                .map(|signature| Some(ClientMsg::Confirm { round, signature })),
            ServerMsg::Unmask { round, request } => self
                .in_session(round, |_| true, |c, k| c.handle_unmask(&request, k.verifier.as_ref()))
                .map(|reply| Some(ClientMsg::Unmask { round, reply })),
            ServerMsg::Welcome { .. } | ServerMsg::Refused { .. } => unreachable!("refused above"),
        };
        match reply {
            Ok(Some(msg)) => self.actions.push_back(Action::Reply { to, msg }),
            Ok(None) => {}
            Err(e) => self.decline(to, round, &e),
        }
        Ok(())
    }

    /// Takes the result of job `id`. A plain plan's update goes out as the reply; a secure
    /// round's result is encoded (with differential privacy where the plan says so) into its own
    /// plan's session only, and a parked masked-input request is answered. A result for a session
    /// that was replaced or abandoned goes nowhere. An error means `id` is no running job.
    pub fn job_done(&mut self, id: JobId, result: JobResult, rng: &mut impl CryptoRng) -> Result<(), SessionError> {
        let Some(waiting) = self.jobs.remove(&id) else {
            return Err(SessionError::Misuse(format!("job {id} is not running (finished twice, or never started)")));
        };
        match waiting {
            Waiting::Plain { to, round } => {
                let reply = match result {
                    Ok(JobOutput::Update(update)) => Ok(ClientMsg::Update(update)),
                    Ok(JobOutput::Counts(_)) => Err(SessionError::Job("the training job returned counts".into())),
                    Err(why) => Err(SessionError::Job(why)),
                };
                match reply {
                    Ok(msg) => self.actions.push_back(Action::Reply { to, msg }),
                    Err(e) => self.decline(to, round, &e),
                }
            }
            Waiting::Secure => {
                // Only into the session of this very plan: a session of another purpose in the
                // same round (which replaced it) must never mask this plan's input.
                let Some(s) = self.secure.as_mut().filter(|s| s.job == id) else { return Ok(()) };
                s.input = match result.and_then(|output| encode_input(&s.plan, output, rng)) {
                    Ok(v) => Input::Ready(Zeroizing::new(v)),
                    Err(why) => Input::Failed(why),
                };
                if let Some((to, shares)) = s.parked.take() {
                    let round = s.client.round();
                    match self.mask(round, &shares) {
                        Ok(msg) => self.actions.push_back(Action::Reply { to, msg }),
                        Err(e) => self.decline(to, round, &e),
                    }
                }
            }
        }
        Ok(())
    }

    /// The driver could not write the ledger of the [`Action::SaveLedger`] of `round` `before`: the reply and
    /// the job queued behind it are withdrawn and the round is declined (the spending stays
    /// charged in memory: the client errs on the side of its budget).
    pub fn ledger_not_saved(&mut self, round: u64, before: Token, why: &str) {
        let mut withdrawn = Vec::new();
        self.actions.retain(|a| match a {
            Action::Reply { to, .. } if *to == before => false,
            Action::Run(job) if job.request == before => {
                withdrawn.push(job.id);
                false
            }
            _ => true,
        });
        for id in withdrawn {
            self.jobs.remove(&id);
            if self.secure.as_ref().is_some_and(|s| s.job == id) {
                self.secure = None;
            }
        }
        let reason =
            format!("cannot record the privacy ledger ({why}); this client takes part in no round it has not recorded");
        self.actions.push_back(Action::Reply { to: before, msg: ClientMsg::Decline { round, reason } });
    }

    /// Forgets the secure round in progress (what a crash or restart loses); a masked-input
    /// request waiting in it is declined.
    pub fn abandon_round(&mut self) {
        if let Some(s) = self.secure.take() {
            if let Some((to, _)) = s.parked {
                let reason = format!("this client abandoned secure round {}", s.client.round());
                self.actions
                    .push_back(Action::Reply { to, msg: ClientMsg::Decline { round: s.client.round(), reason } });
            }
        }
    }

    /// Whether the secure round `round` is still waiting for its input.
    pub fn is_computing(&self, round: u64) -> bool {
        self.secure.as_ref().is_some_and(|s| s.client.round() == round && matches!(s.input, Input::Computing))
    }

    fn decline(&mut self, to: Token, round: u64, e: &SessionError) {
        self.actions.push_back(Action::Reply { to, msg: ClientMsg::Decline { round, reason: e.to_string() } });
    }

    fn start_job(&mut self, request: Token, plan: Arc<RoundPlan>, waiting: Waiting) -> JobId {
        let id = self.next_job;
        self.next_job += 1;
        let kind = match plan.task {
            Task::Train => JobKind::Train,
            Task::CountLabels => JobKind::CountLabels,
            Task::Evaluate => JobKind::Evaluate,
        };
        let secure = matches!(waiting, Waiting::Secure);
        self.jobs.insert(id, waiting);
        self.actions.push_back(Action::Run(Job { id, kind, request, secure, plan }));
        id
    }

    /// A plan: checked, admitted by the ledger, then a job (plain) or a secure session and a
    /// job (secure). Returns the reply when there is one now (a secure round's nonce).
    fn plan(
        &mut self,
        to: Token,
        plan: RoundPlan,
        rng: &mut impl CryptoRng,
    ) -> Result<Option<ClientMsg>, SessionError> {
        check_plan(&plan)?;
        self.policy.check(&plan)?;
        let round = plan.round;
        let Some(secure) = plan.secure.as_deref() else {
            if plan.task != Task::Train {
                return Err(PlanRefusal::CountsInTheClear.into());
            }
            self.admit(to, &plan)?;
            self.start_job(to, Arc::new(plan), Waiting::Plain { to, round });
            return Ok(None);
        };
        if self.keys.is_none() {
            return Err(PlanRefusal::NoKey.into());
        }
        self.check_secure_plan(&plan, secure)?;
        let sum = (plan.run.clone(), secure.setup.purpose.clone());
        if let Some(last) = self.joined.get(&sum).filter(|last| round <= **last) {
            return Err(PlanRefusal::AlreadyJoined { purpose: escape(&sum.1, 32), round: *last }.into());
        }
        let fingerprint = input_fingerprint(&plan);
        if let Some((_, run, round)) = self.summed.iter().find(|(f, ..)| *f == fingerprint) {
            return Err(PlanRefusal::SameInput { run: escape(run, 64), round: *round }.into());
        }
        // Keys first (nothing charged if the setup is refused), then the ledger.
        let (client, nonce) = SecAggClient::join(&self.id, secure.setup.clone(), rng)?;
        self.admit(to, &plan)?;
        // A server that names a new run every round would grow this without end: past the cap,
        // only the current run's sums are kept (a replay of an older run's computation is still
        // refused by `summed`).
        if !self.joined.contains_key(&sum) && self.joined.len() >= MAX_REMEMBERED_SUMS {
            self.joined.retain(|(run, _), _| *run == sum.0);
        }
        self.joined.insert(sum, round);
        if self.summed.len() == MAX_REMEMBERED_SUMS {
            self.summed.pop_front();
        }
        self.summed.push_back((fingerprint, plan.run.clone(), round));
        let plan = Arc::new(plan);
        let job = self.start_job(to, plan.clone(), Waiting::Secure);
        let replaced = self.secure.replace(SecureRound { client, plan, job, input: Input::Computing, parked: None });
        // A request parked in the session replaced is answered, never left waiting.
        if let Some((waiting, old_round)) = replaced.and_then(|old| Some((old.parked?.0, old.client.round()))) {
            let reason = format!("the secure session of round {old_round} was replaced by a later plan");
            self.actions.push_back(Action::Reply { to: waiting, msg: ClientMsg::Decline { round: old_round, reason } });
        }
        Ok(Some(ClientMsg::Join { round, nonce }))
    }

    /// The privacy ledger's decision on a plan, saved before the reply (see the module docs).
    fn admit(&mut self, to: Token, plan: &RoundPlan) -> Result<(), SessionError> {
        let Some(ledger) = self.ledger.as_mut() else { return Ok(()) };
        let Some(dp) = plan.secure.as_ref().and_then(|s| s.dp) else {
            return Err(LedgerRefusal::NoNoise { round: plan.round }.into());
        };
        // Each run is an account of its own (its rounds start at 1); a run that started after
        // this connection was welcomed had this client in its population from its first round.
        let key = dp::run_key(&self.federation, &plan.run);
        let joined_at = if plan.run == self.welcome_run { self.joined_at } else { 1 };
        let decision = ledger.admit_within(&key, plan.round, joined_at, &dp, self.policy.max_epsilon_per_run);
        // Saved whatever the decision: a refusal past the budget marks the ledger exhausted.
        self.actions.push_back(Action::SaveLedger { ledger: ledger.clone(), round: plan.round, before: to });
        decision.map(|_| ()).map_err(SessionError::from)
    }

    /// A masked-input request: answered now if the input is ready, parked while it is computed.
    fn shares(&mut self, to: Token, round: u64, shares: Vec<SealedShares>) -> Result<Option<ClientMsg>, SessionError> {
        let s = secure_round(&mut self.secure, round)?;
        if matches!(s.input, Input::Computing) {
            // A later request for the same round (a reconnection) supersedes the parked one.
            if let Some((older, _)) = s.parked.replace((to, shares)) {
                let reason = format!("round {round}: a later masked-input request supersedes this one");
                self.actions.push_back(Action::Reply { to: older, msg: ClientMsg::Decline { round, reason } });
            }
            return Ok(None);
        }
        self.mask(round, &shares).map(Some)
    }

    /// Masks the ready input of `round` with the sealed shares.
    fn mask(&mut self, round: u64, shares: &[SealedShares]) -> Result<ClientMsg, SessionError> {
        let keys = self.keys.as_ref().ok_or_else(no_keys)?;
        let s = secure_round(&mut self.secure, round)?;
        // The encoded input is needed once: free it now rather than at the unmask.
        let input = match std::mem::replace(&mut s.input, Input::Masked) {
            Input::Ready(input) => input,
            Input::Failed(why) => {
                s.input = Input::Failed(why.clone());
                return Err(SessionError::Job(why));
            }
            Input::Masked => return Err(PlanRefusal::SharesAlreadySent(round).into()),
            Input::Computing => unreachable!("parked by the caller"),
        };
        let input = s.client.handle_shares(shares, &input, keys.signer.as_ref())?;
        Ok(ClientMsg::Masked { round, input })
    }

    /// One step of the secure session of `round`, with this client's keys; the session is
    /// forgotten afterwards when `ends` says so of the step's result.
    fn in_session<T>(
        &mut self,
        round: u64,
        ends: impl FnOnce(&Result<T, SecAggError>) -> bool,
        step: impl FnOnce(&mut SecAggClient, &SecureKeys) -> Result<T, SecAggError>,
    ) -> Result<T, SessionError> {
        let keys = self.keys.as_ref().ok_or_else(no_keys)?;
        let result = step(&mut secure_round(&mut self.secure, round)?.client, keys);
        if ends(&result) {
            self.secure = None;
        }
        Ok(result?)
    }

    /// Checks a secure plan before any key is made: the session is for this plan's round and
    /// task, the vector fits what this client will send, and with differential privacy the noise
    /// holds (the quantizer wraps instead of clamping it, and no sum of fewer inputs than the
    /// noise is calibrated to can be unmasked).
    fn check_secure_plan(&self, plan: &RoundPlan, secure: &SecurePlan) -> Result<(), SessionError> {
        let setup = &secure.setup;
        let bad = |refusal: PlanRefusal| Err(SessionError::BadPlan(refusal));
        if setup.round != plan.round || setup.purpose != plan.task.purpose() {
            return bad(PlanRefusal::SessionMismatch {
                session: escape(&setup.purpose, 32),
                session_round: setup.round,
                plan: plan.task.purpose(),
                plan_round: plan.round,
            });
        }
        let params = plan.params.len();
        match plan.task {
            Task::CountLabels | Task::Evaluate => {
                let (what, len) = if plan.task == Task::CountLabels {
                    ("a label census sums", census_len(plan)?)
                } else {
                    ("an evaluation sums", confusion_cells(plan)?)
                };
                if setup.vector_len != len || secure.dp.is_some() {
                    return bad(PlanRefusal::CountLength { what, len, vector_len: setup.vector_len });
                }
                let floor = MIN_COUNT_INPUTS.max(self.min_sum_clients);
                if setup.min_inputs < floor {
                    return bad(PlanRefusal::CountSumTooSmall { min_inputs: setup.min_inputs, floor });
                }
            }
            Task::Train => {
                if secure.segments.iter().sum::<usize>() != params
                    || setup.vector_len != SecurePlan::vector_len(params, secure.segments.len(), secure.dp.is_some())
                {
                    return bad(PlanRefusal::VectorLength {
                        vector_len: setup.vector_len,
                        params,
                        segments: secure.segments.len(),
                    });
                }
                if setup.min_inputs < self.min_sum_clients {
                    return bad(PlanRefusal::UpdateSumTooSmall {
                        min_inputs: setup.min_inputs,
                        floor: self.min_sum_clients,
                    });
                }
            }
        }
        if let Some(dp) = &secure.dp {
            dp.check().map_err(PlanRefusal::Dp)?;
            let quantizer = &setup.params.quantizer;
            let needed = dp.coordinate_range();
            if quantizer.clip < needed {
                return bad(PlanRefusal::QuantizerRange { clip: quantizer.clip, needed });
            }
            if !quantizer.wrap {
                return bad(PlanRefusal::QuantizerClamps);
            }
            if setup.min_inputs < dp.min_survivors {
                return bad(PlanRefusal::NoiseCalibration {
                    calibrated: dp.min_survivors,
                    min_inputs: setup.min_inputs,
                });
            }
        }
        Ok(())
    }

    /// The encoded input waiting in the session in progress (tests).
    #[cfg(test)]
    fn pending_input(&self) -> Option<Vec<u64>> {
        match &self.secure.as_ref()?.input {
            Input::Ready(v) => Some(v.to_vec()),
            _ => None,
        }
    }
}

fn no_keys() -> SessionError {
    PlanRefusal::NoKey.into()
}

fn secure_round(slot: &mut Option<SecureRound>, round: u64) -> Result<&mut SecureRound, SessionError> {
    match slot {
        Some(s) if s.client.round() == round => Ok(s),
        _ => Err(PlanRefusal::NoSecureRound(round).into()),
    }
}

/// How many secure sums' inputs a session remembers ([`ClientSession`]'s `summed`): a 32-byte
/// digest, the run's name (at most 64 bytes) and the round each, under 8 MiB in all; a server
/// would have to run this many rounds to make one forgotten.
pub const MAX_REMEMBERED_SUMS: usize = 65_536;

/// What a plan asks this client to compute, whatever its run, round, deadline and session: a
/// digest of the task, the model spec, the global parameters, the seed, the training terms and
/// the label counts. Two plans with the same fingerprint make the same input.
fn input_fingerprint(plan: &RoundPlan) -> [u8; 32] {
    let mut same = plan.clone();
    (same.round, same.run, same.deadline_ms, same.secure) = (0, String::new(), 0, None);
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    match wire::encode(&ServerMsg::Plan(same)) {
        Ok(bytes) => context.update(&bytes),
        // A plan that arrived was decoded from a frame, so it encodes; were it not, every such
        // plan shares one digest (refusing more, never less).
        Err(_) => context.update(b"unencodable"),
    }
    context.finish().as_ref().try_into().expect("32 bytes")
}

/// What every plan must parse to before a job is started for it (parse, don't validate): the
/// model spec, and for training and a census the training terms (checked for training).
fn check_plan(plan: &RoundPlan) -> Result<(), SessionError> {
    wire::check_run_name(&plan.run).map_err(PlanRefusal::Run)?;
    ModelSpec::from_toml(&plan.model_spec).map_err(|e| PlanRefusal::Spec(e.to_string()))?;
    if plan.task != Task::Evaluate {
        let train = TrainConfig::try_from(&plan.train).map_err(|e| PlanRefusal::Terms(e.to_string()))?;
        if plan.task == Task::Train {
            train.check().map_err(|e| PlanRefusal::Terms(e.to_string()))?;
        }
    }
    Ok(())
}

/// The number of label counts a census of the plan sends: the classes of each head it counts
/// ([`TrainConfig::census_heads`]).
fn census_len(plan: &RoundPlan) -> Result<usize, SessionError> {
    let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| PlanRefusal::Spec(e.to_string()))?;
    let train = TrainConfig::try_from(&plan.train).map_err(|e| PlanRefusal::Terms(e.to_string()))?;
    Ok(train.census_heads(&spec).iter().map(|h| h.classes).sum())
}

/// The number of confusion counts an evaluation of the plan's model sends: the sum of each
/// head's classes squared.
pub fn confusion_cells(plan: &RoundPlan) -> Result<usize, SessionError> {
    let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| PlanRefusal::Spec(e.to_string()))?;
    Ok(spec.heads.iter().map(|h| h.classes * h.classes).sum())
}

/// Encodes a job's output for the secure sum of `plan`: an update weighted per segment (or, with
/// differential privacy, clipped and noised), or counts, quantized; the error is the reason.
fn encode_input(plan: &RoundPlan, output: JobOutput, rng: &mut impl CryptoRng) -> Result<Vec<u64>, String> {
    let secure = plan.secure.as_deref().ok_or("the plan is not secure")?;
    let quantizer = secure.setup.params.quantizer;
    let encoded = match (plan.task, output) {
        (Task::Train, JobOutput::Update(update)) => {
            let delta = Zeroizing::new(update.delta.to_f32().map_err(|e| e.to_string())?);
            let segment_samples = update.samples_per_segment(secure.segments.len());
            match &secure.dp {
                Some(dp) => {
                    // With DP every segment's sum divides by the public expected number of
                    // clients: no weights or counts are summed.
                    let (private, _) =
                        dp::privatize(delta.to_vec(), &secure.segments, dp, rng).map_err(|e| e.to_string())?;
                    quantizer.encode(&Zeroizing::new(private), rng)
                }
                None => {
                    let weights: Vec<f32> =
                        segment_samples.iter().map(|&n| secagg::sample_weight(n, secure.sample_cap)).collect();
                    secagg::encode_weighted(&delta, &secure.segments, &weights, &quantizer, rng).ok_or_else(|| {
                        format!(
                            "the plan's {} segments do not fit this model's {}",
                            secure.segments.len(),
                            segment_samples.len()
                        )
                    })?
                }
            }
        }
        (Task::CountLabels | Task::Evaluate, JobOutput::Counts(counts)) => {
            let counts: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
            quantizer.encode(&counts, rng)
        }
        (task, JobOutput::Update(_)) => return Err(format!("the job returned an update for a {task:?} plan")),
        (task, JobOutput::Counts(_)) => return Err(format!("the job returned counts for a {task:?} plan")),
    };
    if encoded.len() != secure.setup.vector_len {
        return Err(format!(
            "the encoded update has {} values, the session sums {}",
            encoded.len(),
            secure.setup.vector_len
        ));
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::dp::{Accounting, DpPlan};
    use crate::secagg::harness::{setup, TestPki, TestSigner};
    use crate::secagg::quantize::Quantizer;
    use crate::trainer::tests::plan;
    use crate::trainer::Trainer;
    use candle_core::Device;

    /// A session and its trainer, driven as the daemon drives them: each request gets a fresh
    /// token, replies are collected by token, jobs wait until the test runs them, ledger saves
    /// are recorded in order with the replies.
    struct Client {
        session: ClientSession,
        trainer: Trainer,
        next: Token,
        jobs: Vec<Job>,
        replies: BTreeMap<Token, ClientMsg>,
        /// Every action polled, in order, as words: `save 4`, `reply 2`, `run 1`.
        log: Vec<String>,
    }

    impl Client {
        fn new(session: ClientSession, trainer: Trainer) -> Self {
            Self { session, trainer, next: 0, jobs: Vec::new(), replies: BTreeMap::new(), log: Vec::new() }
        }

        fn pump(&mut self) {
            while let Some(action) = self.session.poll_action() {
                match action {
                    Action::Reply { to, msg } => {
                        self.log.push(format!("reply {to}"));
                        assert!(self.replies.insert(to, msg).is_none(), "one reply per request");
                    }
                    Action::Run(job) => {
                        self.log.push(format!("run {}", job.request));
                        self.jobs.push(job);
                    }
                    Action::SaveLedger { round, before, .. } => self.log.push(format!("save {round} before {before}")),
                }
            }
        }

        /// Sends a request; returns its token.
        fn send(&mut self, msg: ServerMsg, rng: &mut impl CryptoRng) -> Token {
            let to = self.next;
            self.next += 1;
            self.session.handle(to, msg, rng).expect("a request");
            self.pump();
            to
        }

        /// The reply to `to`, a decline as its reason.
        fn reply(&mut self, to: Token) -> Option<Result<ClientMsg, String>> {
            self.replies.remove(&to).map(|msg| match msg {
                ClientMsg::Decline { reason, .. } => Err(reason),
                other => Ok(other),
            })
        }

        /// Sends a request that is answered at once.
        fn ask(&mut self, msg: ServerMsg, rng: &mut impl CryptoRng) -> Result<ClientMsg, String> {
            let to = self.send(msg, rng);
            self.reply(to).expect("a reply at once")
        }

        fn finish(&mut self, job: Job, rng: &mut impl CryptoRng) {
            let result = self.trainer.run(&job).map_err(|e| e.to_string());
            self.session.job_done(job.id, result, rng).expect("a running job");
            self.pump();
        }

        fn run_jobs(&mut self, rng: &mut impl CryptoRng) {
            for job in std::mem::take(&mut self.jobs) {
                self.finish(job, rng);
            }
        }

        fn run_job(&mut self, kind: JobKind, rng: &mut impl CryptoRng) {
            let i = self.jobs.iter().position(|j| j.kind == kind).expect("such a job waits");
            let job = self.jobs.remove(i);
            self.finish(job, rng);
        }
    }

    const SPEC: &str = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";

    fn client(session: ClientSession) -> Client {
        let data = Dataset::new(vec![1.0, 0.0, 0.0, 1.0], vec![2], vec![0, 1], 2).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        Client::new(session.with_secure_keys(keys), Trainer::new("c000", Arc::new(data), Device::Cpu))
    }

    /// A secure train plan of `round` for the cohort c000..c002 that this client follows;
    /// `segments` other than `[0, 6]` do not fit the model (an empty trunk, then the head).
    fn secure_train(round: u64, segments: Vec<usize>) -> RoundPlan {
        let mut s = setup(3, 2, 2, 0, round);
        s.vector_len = SecurePlan::vector_len(6, segments.len(), false);
        s.min_inputs = 2;
        let mut p = plan(SPEC, vec![0.0; 6]);
        p.round = round;
        // A server's plan seed follows the round (`round::plan_seed`): each round is another
        // computation.
        p.seed = round;
        p.secure = Some(Box::new(SecurePlan { setup: s, sample_cap: 10, segments, dp: None }));
        p
    }

    fn dp_plan() -> DpPlan {
        DpPlan {
            clip: 1.0,
            per_segment: false,
            noise_multiplier: 1.0,
            count_noise: 1.0,
            min_survivors: 3,
            sampling_rate: 1.0,
            expected_clients: 3.0,
        }
    }

    /// A private secure train plan of `round` that every check passes.
    fn private_train(round: u64) -> RoundPlan {
        let mut p = secure_train(round, vec![0, 6]);
        let secure = p.secure.as_mut().unwrap();
        secure.dp = Some(dp_plan());
        secure.setup.vector_len = SecurePlan::vector_len(6, 2, true);
        secure.setup.params.quantizer = Quantizer { bits: 32, clip: 9.0, scale: 1000.0, wrap: true };
        secure.setup.min_inputs = 3;
        p
    }

    /// A masked-input request that arrives while the round's input is computed is parked (no
    /// thread waits for it) and answered when the job result comes in: with the job's failure,
    /// or, once the input is ready, from the session (here refusing shares that never came).
    /// A later request supersedes a parked one, and abandoning the round answers it.
    #[test]
    fn a_masked_input_request_waits_for_its_job_result_not_a_thread() {
        let mut rng = rand::rng();
        let mut p = client(ClientSession::new("c000"));
        assert!(matches!(p.ask(ServerMsg::Plan(secure_train(3, vec![3, 2, 1])), &mut rng), Ok(ClientMsg::Join { .. })));
        let first = p.send(ServerMsg::Shares { round: 3, shares: Vec::new() }, &mut rng);
        assert!(p.reply(first).is_none() && p.session.is_computing(3), "parked");
        let second = p.send(ServerMsg::Shares { round: 3, shares: Vec::new() }, &mut rng);
        assert!(p.reply(first).unwrap().unwrap_err().contains("supersedes"));
        assert!(p.reply(second).is_none(), "the later one waits");
        p.run_jobs(&mut rng);
        let err = p.reply(second).expect("answered by the job result").unwrap_err();
        assert!(err.contains("segments do not fit"), "{err}");

        // An input that is ready: the parked request gets the session's answer.
        assert!(matches!(p.ask(ServerMsg::Plan(secure_train(4, vec![0, 6])), &mut rng), Ok(ClientMsg::Join { .. })));
        let parked = p.send(ServerMsg::Shares { round: 4, shares: Vec::new() }, &mut rng);
        assert!(p.reply(parked).is_none());
        p.run_jobs(&mut rng);
        let err = p.reply(parked).expect("answered by the job result").unwrap_err();
        assert!(err.contains("secure aggregation"), "{err}");

        // Abandoned with a request parked: it is declined, not left waiting.
        assert!(matches!(p.ask(ServerMsg::Plan(secure_train(5, vec![0, 6])), &mut rng), Ok(ClientMsg::Join { .. })));
        let parked = p.send(ServerMsg::Shares { round: 5, shares: Vec::new() }, &mut rng);
        p.session.abandon_round();
        p.pump();
        assert!(p.reply(parked).unwrap().unwrap_err().contains("abandoned secure round 5"));
        p.run_jobs(&mut rng);
        assert!(p.replies.is_empty(), "the abandoned round's input goes nowhere");
    }

    /// The privacy ledger's admission: a client with a budget declines plain rounds, takes part
    /// in private ones while the budget allows and then declines them with the reason; every
    /// decision of the ledger is saved before the reply that depends on it.
    #[test]
    fn the_ledger_declines_past_its_budget_and_is_saved_before_the_reply() {
        let mut rng = rand::rng();
        let ledger = PrivacyLedger::new(5.0, 1e-5, Accounting::Participations).unwrap();
        let mut p = client(ClientSession::new("c000").with_ledger(ledger));
        p.session.connected(1, "ca:ab/federation:cd".into(), "trial".into());

        let to = p.send(ServerMsg::Plan(plan(SPEC, vec![0.0; 6])), &mut rng);
        let err = p.reply(to).unwrap().unwrap_err();
        assert!(err.contains("not differentially private"), "{err}");
        assert!(p.jobs.is_empty() && !p.log.iter().any(|l| l.starts_with("save")), "{:?}", p.log);

        let declined = (2..1000)
            .find_map(|round| {
                p.log.clear();
                let to = p.send(ServerMsg::Plan(private_train(round)), &mut rng);
                assert_eq!(p.log[0], format!("save {round} before {to}"), "saved first");
                assert!(p.log.contains(&format!("reply {to}")));
                p.reply(to).unwrap().err().map(|reason| (round, reason))
            })
            .expect("the budget runs out");
        let (round, reason) = declined;
        assert!(
            reason.contains(&format!("round {round} would take")) && reason.contains("past its budget"),
            "{reason}"
        );
        assert!(p.session.ledger().unwrap().exhausted);
        let to = p.send(ServerMsg::Plan(private_train(round + 1)), &mut rng);
        assert!(p.reply(to).unwrap().unwrap_err().contains("is spent"));
        assert_eq!(p.session.ledger().unwrap().rounds_charged(), round - 2);
    }

    /// Runs (issue 15): each run numbers its rounds from 1, so the one-sum-per-round rule and the
    /// ledger count per run. Attack: a server that replays a round of the same run is still
    /// refused; a plan with a run name that is no name is refused before anything is charged.
    #[test]
    fn each_run_counts_its_own_rounds_and_a_replay_within_one_is_refused() {
        let mut rng = rand::rng();
        let ledger = PrivacyLedger::new(50.0, 1e-5, Accounting::Participations).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        let mut p = client(ClientSession::new("c000").with_secure_keys(keys).with_ledger(ledger));
        p.session.connected(5, "ca:ab/federation:cd".into(), "first".into());
        let mut first = private_train(5);
        first.run = "first".into();
        assert!(matches!(p.ask(ServerMsg::Plan(first.clone()), &mut rng), Ok(ClientMsg::Join { .. })));
        let err = p.ask(ServerMsg::Plan(first.clone()), &mut rng).unwrap_err();
        assert!(err.contains("already joined the train sum of round 5"), "{err}");
        // Review finding: the same computation (model, parameters, seed, settings) in another run
        // is the same update; a second sum of it over another cohort would give it away.
        let mut replay = first;
        (replay.run, replay.round) = ("second".into(), 1);
        replay.secure.as_mut().unwrap().setup.round = 1;
        let err = p.ask(ServerMsg::Plan(replay.clone()), &mut rng).unwrap_err();
        assert!(err.contains("same computation") && err.contains("run `first`, round 5"), "{err}");
        // The next run starts at round 1: a sum of its own, and an account of its own, charged
        // from its first round (this client was connected when it started).
        let mut second = replay;
        second.seed = 2;
        assert!(matches!(p.ask(ServerMsg::Plan(second), &mut rng), Ok(ClientMsg::Join { .. })));
        let ledger = p.session.ledger().unwrap();
        let keys: Vec<&str> = ledger.spent.iter().map(|s| s.federation.as_str()).collect();
        assert_eq!(keys, ["ca:ab/federation:cd/run:first", "ca:ab/federation:cd/run:second"]);
        assert_eq!(ledger.rounds_charged(), 2);
        for bad in ["", "../x", ".hidden", "a\nb", &"r".repeat(65)] {
            let mut plan = private_train(2);
            plan.run = bad.into();
            let err = p.ask(ServerMsg::Plan(plan), &mut rng).unwrap_err();
            assert!(err.contains("is not 1 to 64 letters"), "{bad:?}: {err}");
        }
        assert_eq!(p.session.ledger().unwrap().rounds_charged(), 2, "refused plans charge nothing");
    }

    /// The data owner's policy (issue 15): runs of models it does not list are declined, saying
    /// why, with nothing charged; a run that would pass the per-run epsilon cap is declined while
    /// another run still takes part. Without the cap, the same plan would be admitted.
    #[test]
    fn the_site_policy_declines_other_models_and_runs_past_their_cap() {
        let mut rng = rand::rng();
        let session = |policy: RunPolicy| {
            let ledger = PrivacyLedger::new(50.0, 1e-5, Accounting::Participations).unwrap();
            let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
            let mut p =
                client(ClientSession::new("c000").with_secure_keys(keys).with_ledger(ledger).with_policy(policy));
            p.session.connected(1, "ca:ab/federation:cd".into(), String::new());
            p
        };
        let mut p = session(RunPolicy { models: Some(vec!["mnist-2nn".into()]), max_epsilon_per_run: None });
        let err = p.ask(ServerMsg::Plan(private_train(1)), &mut rng).unwrap_err();
        assert!(err.contains("trains model `t`, which this site's policy.models (`mnist-2nn`) does not list"), "{err}");
        assert_eq!(p.session.ledger().unwrap().rounds_charged(), 0);
        let mut p = session(RunPolicy { models: Some(vec!["t".into()]), max_epsilon_per_run: None });
        assert!(p.ask(ServerMsg::Plan(private_train(1)), &mut rng).is_ok(), "a listed model is accepted");

        // One round at z = 1 costs about 4.3 (delta 1e-5); a cap of 6 admits one round per run.
        let capped = RunPolicy { models: None, max_epsilon_per_run: Some(6.0) };
        let mut p = session(capped);
        let round = |run: &str, n: u64| {
            let mut plan = private_train(n);
            plan.run = run.into();
            plan.seed = crate::round::plan_seed(crate::round::run_seed(0, run), n);
            ServerMsg::Plan(plan)
        };
        assert!(p.ask(round("a", 1), &mut rng).is_ok());
        let err = p.ask(round("a", 2), &mut rng).unwrap_err();
        assert!(err.contains("past its limit per run of 6"), "{err}");
        assert!(p.ask(round("b", 1), &mut rng).is_ok(), "another run still takes part");
        let mut uncapped = session(RunPolicy::default());
        assert!(uncapped.ask(round("a", 1), &mut rng).is_ok());
        assert!(uncapped.ask(round("a", 2), &mut rng).is_ok(), "without the cap the second round is admitted");
    }

    /// A ledger the driver cannot write: the round's key advert and job are withdrawn, and the
    /// round is declined saying why.
    #[test]
    fn a_ledger_that_cannot_be_saved_declines_the_round() {
        let mut rng = rand::rng();
        let ledger = PrivacyLedger::new(50.0, 1e-5, Accounting::Participations).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        let mut session = ClientSession::new("c000").with_secure_keys(keys).with_ledger(ledger);
        session.handle(7, ServerMsg::Plan(private_train(3)), &mut rng).unwrap();
        let Some(Action::SaveLedger { round: 3, before: 7, .. }) = session.poll_action() else { panic!("save first") };
        session.ledger_not_saved(3, 7, "disk full");
        let Some(Action::Reply { to: 7, msg: ClientMsg::Decline { round: 3, reason } }) = session.poll_action() else {
            panic!("a decline")
        };
        assert!(reason.contains("cannot record the privacy ledger (disk full)"), "{reason}");
        assert!(session.poll_action().is_none(), "no job and no key advert");
        session.handle(8, ServerMsg::Shares { round: 3, shares: Vec::new() }, &mut rng).unwrap();
        let Some(Action::Reply { msg: ClientMsg::Decline { reason, .. }, .. }) = session.poll_action() else {
            panic!("a decline")
        };
        assert!(reason.contains("no secure round 3"), "{reason}");
    }

    /// Declines say why; what is no request, and a driver's misuse, are errors of their own.
    #[test]
    fn declines_carry_their_reasons_and_misuse_is_told_apart() {
        let mut rng = rand::rng();
        let mut p = client(ClientSession::new("c000"));
        let err = p.ask(ServerMsg::Shares { round: 9, shares: Vec::new() }, &mut rng).unwrap_err();
        assert!(err.contains("no secure round 9 in progress"), "{err}");
        let mut census = plan(SPEC, Vec::new());
        census.task = Task::CountLabels;
        assert!(p.ask(ServerMsg::Plan(census), &mut rng).unwrap_err().contains("outside secure aggregation"));
        let err = p.ask(ServerMsg::Plan(plan("nonsense", vec![0.0; 6])), &mut rng).unwrap_err();
        assert!(err.contains("the round plan is invalid"), "{err}");
        // A plain plan the trainer cannot follow: declined when the job ends, with its reason.
        let to = p.send(ServerMsg::Plan(plan(SPEC, vec![0.0; 5])), &mut rng);
        assert!(p.reply(to).is_none());
        p.run_jobs(&mut rng);
        let err = p.reply(to).unwrap().unwrap_err();
        assert!(err.contains("5 parameters sent, the model has 6"), "{err}");
        let to = p.send(ServerMsg::Plan(plan(SPEC, vec![0.0; 6])), &mut rng);
        p.run_jobs(&mut rng);
        assert!(matches!(p.reply(to), Some(Ok(ClientMsg::Update(_)))));

        let mut keyless = ClientSession::new("c000");
        keyless.handle(1, ServerMsg::Plan(secure_train(3, vec![6])), &mut rng).unwrap();
        let Some(Action::Reply { to: 1, msg: ClientMsg::Decline { reason, .. } }) = keyless.poll_action() else {
            panic!("a decline")
        };
        assert!(reason.contains("no certificate key"), "{reason}");

        let hello = ServerMsg::Refused { reason: "go\naway".into() };
        let err = p.session.handle(50, hello, &mut rng).unwrap_err();
        assert!(err.is_peer_fault() && err.to_string().contains(r"go\naway"), "{err}");
        assert!(p.session.poll_action().is_none(), "nothing to reply to");
        let err = p.session.job_done(99, Err("?".into()), &mut rng).unwrap_err();
        assert!(!err.is_peer_fault() && err.to_string().contains("job 99 is not running"), "{err}");
    }

    /// A server that sends segment lengths that do not fit the model (v1: a panic on the
    /// training thread, and the masked-input request waiting for ever), a private plan whose
    /// quantizer would clamp the noise, or one that would unmask fewer inputs than the noise is
    /// calibrated to: each is refused with a reason.
    #[test]
    fn secure_plans_that_cannot_be_followed_are_refused_not_waited_on() {
        use crate::secagg::harness::{setup, TestPki, TestSigner};
        use crate::secagg::SecAggParams;
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let data = Dataset::new(vec![1.0, 0.0, 0.0, 1.0], vec![2], vec![0, 1], 2).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        let mut p = Client::new(
            ClientSession::new("c000").with_secure_keys(keys),
            Trainer::new("c000", Arc::new(data), Device::Cpu),
        );
        let secure_plan = |segments: Vec<usize>, dp: Option<DpPlan>| {
            let mut s = setup(3, 2, 2, 0, 3);
            s.vector_len = SecurePlan::vector_len(6, segments.len(), dp.is_some());
            s.min_inputs = 2;
            let mut plan = plan(spec_toml, vec![0.0; 6]);
            plan.secure = Some(Box::new(SecurePlan { setup: s, sample_cap: 10, segments, dp }));
            plan
        };
        let mut rng = rand::rng();
        // Three segments where the model has two (an empty trunk and the head): the nonce goes
        // out, training fails, and the masked-input request gets the reason at once.
        let bad = secure_plan(vec![3, 2, 1], None);
        assert!(matches!(p.ask(ServerMsg::Plan(bad.clone()), &mut rng), Ok(ClientMsg::Join { .. })));
        p.run_jobs(&mut rng);
        let shares = ServerMsg::Shares { round: 3, shares: Vec::new() };
        let err = p.ask(shares, &mut rng).unwrap_err();
        assert!(err.contains("segments do not fit"), "{err}");

        let mut private = secure_plan(vec![6], Some(dp_plan()));
        let s = &mut private.secure.as_mut().unwrap().setup;
        s.params = SecAggParams { quantizer: Quantizer { clip: 9.0, ..s.params.quantizer }, ..s.params.clone() };
        s.min_inputs = 3;
        let err = p.ask(ServerMsg::Plan(private.clone()), &mut rng).unwrap_err();
        assert!(err.contains("clamps"), "{err}");
        let s = &mut private.secure.as_mut().unwrap().setup;
        s.params.quantizer.wrap = true;
        s.min_inputs = 2;
        let err = p.ask(ServerMsg::Plan(private.clone()), &mut rng).unwrap_err();
        assert!(err.contains("at least 3 inputs"), "{err}");
        private.secure.as_mut().unwrap().setup.min_inputs = 3;
        private.round = 4;
        private.secure.as_mut().unwrap().setup.round = 4;
        // The plan of round 3 was joined (and failed): the same computation again is refused
        // even with noise added; the next round's plan is another computation.
        let err = p.ask(ServerMsg::Plan(private.clone()), &mut rng).unwrap_err();
        assert!(err.contains("same computation"), "{err}");
        private.seed = 4;
        assert!(p.ask(ServerMsg::Plan(private.clone()), &mut rng).is_ok());
        // The same round's sum a second time (a difference of two sums gives the update away),
        // or an earlier one, is refused.
        let err = p.ask(ServerMsg::Plan(private.clone()), &mut rng).unwrap_err();
        assert!(err.contains("already joined the train sum of round 4"), "{err}");
        let earlier = secure_plan(vec![6], None);
        assert!(p.ask(ServerMsg::Plan(earlier), &mut rng).unwrap_err().to_string().contains("already joined"));
        // A census whose sum could hold two clients' counts.
        let mut census = secure_plan(vec![0], None);
        census.task = Task::CountLabels;
        let s = &mut census.secure.as_mut().unwrap().setup;
        s.purpose = "census".into();
        s.vector_len = 0;
        s.min_inputs = 2;
        let err = p.ask(ServerMsg::Plan(census), &mut rng).unwrap_err();
        assert!(err.contains("at least 3"), "{err}");
        // A sum of one update (the update itself), and one below this data owner's floor.
        let mut alone = secure_plan(vec![6], None);
        alone.secure.as_mut().unwrap().setup.min_inputs = 1;
        let err = p.ask(ServerMsg::Plan(alone), &mut rng).unwrap_err();
        assert!(err.contains("at least 2"), "{err}");
        let data = Dataset::new(vec![1.0, 0.0], vec![2], vec![0], 2).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        let mut careful = Client::new(
            ClientSession::new("c000").with_secure_keys(keys).with_min_sum_clients(3),
            Trainer::new("c000", Arc::new(data), Device::Cpu),
        );
        let err = careful.ask(ServerMsg::Plan(secure_plan(vec![6], None)), &mut rng).unwrap_err();
        assert!(err.contains("at least 3 (min_sum_clients)"), "{err}");
        // A session for another task than the plan's.
        let mut mislabelled = secure_plan(vec![6], None);
        mislabelled.secure.as_mut().unwrap().setup.purpose = "census".into();
        let err = p.ask(ServerMsg::Plan(mislabelled), &mut rng).unwrap_err();
        assert!(err.contains("`census` sum"), "{err}");
    }

    /// Attack (found by a third review): a train plan and a label census of the same round. The
    /// census session replaced the train session, and the training thread wrote the update into
    /// whatever session of that round was there: the census, whose quantizer the server chose
    /// to zero everybody else's counts, would then unmask this one client's update. Each input
    /// now goes into its own plan's session only.
    #[test]
    fn an_update_never_goes_into_another_session_of_its_round() {
        use crate::secagg::harness::{TestPki, TestSigner};
        use crate::secagg::{SecAggParams, SecAggSetup};
        use crate::train::{CountScope, LossConfig};
        let cohort: Vec<String> = (0..3).map(|i| format!("c{i:03}")).collect();
        let setup = |purpose: &str, scale: f64, min_inputs: usize| SecAggSetup {
            round: 3,
            purpose: purpose.into(),
            params: SecAggParams {
                threshold: 2,
                degree: 2,
                dropout_tolerance: 0.0,
                quantizer: Quantizer { bits: 32, clip: 1.0, scale, wrap: false },
            },
            cohort: cohort.clone(),
            vector_len: 7,
            min_inputs,
        };
        let secure = |mut p: RoundPlan, task: Task, setup: SecAggSetup, segments: Vec<usize>| {
            p.task = task;
            p.train.loss = (&LossConfig { scope: CountScope::Global, ..Default::default() }).into();
            p.secure = Some(Box::new(SecurePlan { setup, sample_cap: 10, segments, dp: None }));
            p
        };
        let train_spec = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let census_spec = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=7";
        let train = secure(plan(train_spec, vec![0.0; 6]), Task::Train, setup("train", 1e6, 2), vec![6]);
        let census = secure(plan(census_spec, Vec::new()), Task::CountLabels, setup("census", 1e-9, 3), vec![7]);
        let data = Dataset::new(vec![1.0, 0.0, 0.0, 1.0], vec![2], vec![0, 1], 2).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        let mut p = Client::new(
            ClientSession::new("c000").with_secure_keys(keys),
            Trainer::new("c000", Arc::new(data), Device::Cpu).with_synthetic_updates(),
        );
        let mut rng = rand::rng();
        let joined = p.ask(ServerMsg::Plan(train.clone()), &mut rng);
        assert!(matches!(joined, Ok(ClientMsg::Join { .. })), "{joined:?}");
        let joined = p.ask(ServerMsg::Plan(census.clone()), &mut rng);
        assert!(matches!(joined, Ok(ClientMsg::Join { .. })), "{joined:?}");
        // The census finishes first; the training of the replaced train session after it.
        p.run_job(JobKind::CountLabels, &mut rng);
        let counts = p.session.pending_input().unwrap();
        p.run_job(JobKind::Train, &mut rng);
        assert_eq!(p.session.pending_input().unwrap(), counts, "the census session keeps its own input");
        assert!(counts.iter().all(|c| *c == 0), "the census codes, at the server's scale");
    }
}
