//! The client's side of a round, free of I/O: turn a [`RoundPlan`] into an [`Update`].
//!
//! A [`Participant`] owns the client's data and caches the model built from the last spec it
//! saw. [`Participant::handle_plan`] checks the plan (parse, don't validate: the spec is
//! parsed, the training config checked, the parameters sized), loads the global parameters,
//! trains locally and returns `local - global`. It blocks for the length of the training:
//! drivers call it on a blocking thread.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::Device;

use rand::CryptoRng;

use crate::data::Dataset;
use crate::dp;
use crate::model::{Model, ModelError, ModelSpec, Segment};
use crate::secagg::{self, AdvertSigner, PeerVerifier, SecAggClient, SecAggError};
use crate::train::{self, DeviceData, TrainConfig, TrainError};
use crate::wire::{ClientMsg, RoundPlan, SecurePlan, ServerMsg, Task, TensorBytes, Update, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The server sent a plan that cannot be followed.
    #[error("the round plan is invalid: {0}")]
    BadPlan(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
}

impl From<WireError> for ParticipantError {
    fn from(e: WireError) -> Self {
        ParticipantError::BadPlan(e.to_string())
    }
}

struct Local {
    spec_toml: String,
    model: Model,
    /// Each labelled data set on the device, with the index of the head it trains.
    data: Vec<(usize, DeviceData)>,
    /// Examples behind each segment of the layout (trunk first; 0 for heads not trained).
    segment_samples: Vec<u64>,
}

/// Labelled examples for one head of the model; `head: None` is the model's first head.
#[derive(Debug, Clone)]
pub struct HeadData {
    pub head: Option<String>,
    pub data: Arc<Dataset>,
}

/// The certificate key that signs this client's key adverts, and the check of its neighbours'.
#[derive(Clone)]
pub struct SecureKeys {
    pub signer: Arc<dyn AdvertSigner + Send + Sync>,
    pub verifier: Arc<dyn PeerVerifier + Send + Sync>,
}

/// Where the update of a secure round stands: keys are exchanged while the client trains.
enum Input {
    Training,
    Ready(Vec<u64>),
    Failed(String),
    /// The masked input has been sent.
    Masked,
}

/// A secure round in progress: the protocol state and the encoded update it will mask.
struct SecureRound {
    client: SecAggClient,
    input: Input,
}

/// The fewest inputs of a label census or a federated evaluation: a sum of one or two clients'
/// histograms is (nearly) each of them.
pub const MIN_COUNT_INPUTS: usize = 3;

/// The fewest inputs of a secure sum of updates by default: a sum of one is the update.
pub const MIN_TRAIN_INPUTS: usize = 2;

/// One client's training state. Shared between request handlers: training and the
/// secure-aggregation phases lock separate parts, so keys are exchanged while it trains.
pub struct Participant {
    id: String,
    tasks: Vec<HeadData>,
    device: Device,
    local: Mutex<Option<Local>>,
    keys: Option<SecureKeys>,
    secure: Mutex<Option<SecureRound>>,
    input_ready: Condvar,
    synthetic: bool,
    keep_model: bool,
    /// Parameters of personal heads by head name: trained here, never sent.
    personal: Mutex<BTreeMap<String, Vec<f32>>>,
    /// Held-out examples per head for federated evaluation (empty: evaluate on `tasks`).
    validation: Vec<HeadData>,
    /// The fewest clients a secure sum of this client's update may hold (the data owner's floor,
    /// whatever the server asks).
    min_sum_clients: usize,
    /// The last round of each kind of secure sum (by purpose) this client joined: it joins each
    /// at most once, and never an earlier one. Two sums of the same update (training is seeded
    /// by the plan) over overlapping cohorts would give it away by their difference.
    joined: Mutex<BTreeMap<String, u64>>,
}

impl Participant {
    pub fn new(id: impl Into<String>, data: Arc<Dataset>, device: Device) -> Self {
        Self::with_heads(id, vec![HeadData { head: None, data }], device)
    }

    /// A client that labels several heads, each with its own examples (multi-task training: the
    /// trunk learns from all of them, each head from its own).
    pub fn with_heads(id: impl Into<String>, tasks: Vec<HeadData>, device: Device) -> Self {
        Self {
            id: id.into(),
            tasks,
            device,
            local: Mutex::new(None),
            keys: None,
            secure: Mutex::new(None),
            input_ready: Condvar::new(),
            synthetic: false,
            keep_model: true,
            personal: Mutex::new(BTreeMap::new()),
            validation: Vec::new(),
            min_sum_clients: MIN_TRAIN_INPUTS,
            joined: Mutex::new(BTreeMap::new()),
        }
    }

    /// This client's updates go only into secure sums of at least `n` clients (at least 2; label
    /// counts and confusion matrices at least [`MIN_COUNT_INPUTS`] whatever `n`). A server may
    /// ask for less; the client then declines, saying why.
    pub fn with_min_sum_clients(mut self, n: usize) -> Self {
        self.min_sum_clients = n.max(MIN_TRAIN_INPUTS);
        self
    }

    /// Benchmarks of the protocol alone: answer plans with seeded random updates (normal, standard
    /// deviation 0.01) instead of training.
    pub fn with_synthetic_updates(mut self) -> Self {
        self.synthetic = true;
        self
    }

    /// Builds the model afresh for every plan instead of keeping it between rounds: for
    /// simulations of thousands of small clients, where the kept models would fill memory.
    pub fn without_model_cache(mut self) -> Self {
        self.keep_model = false;
        self
    }

    /// Restores personal heads saved by an earlier run (see [`Participant::personal_heads`]).
    pub fn with_personal_heads(self, heads: BTreeMap<String, Vec<f32>>) -> Self {
        *self.personal.lock().expect("personal lock") = heads;
        self
    }

    /// The parameters of this client's personal heads, by head name: they never leave the
    /// client; the driver keeps them across restarts.
    pub fn personal_heads(&self) -> BTreeMap<String, Vec<f32>> {
        self.personal.lock().expect("personal lock").clone()
    }

    /// Enables secure aggregation with these keys.
    pub fn with_secure_keys(mut self, keys: SecureKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    pub fn samples(&self) -> u64 {
        self.tasks.iter().map(|t| t.data.len() as u64).sum()
    }

    /// The flat parameters of the last trained model, if any.
    pub fn trained_params(&self) -> Option<Vec<f32>> {
        self.local.lock().expect("model lock").as_ref().and_then(|l| l.model.flat().ok())
    }

    /// One step of the secure session of `round`, with this client's keys; the session is
    /// forgotten afterwards when `ends` says so of the step's result.
    fn in_session<T>(
        &self,
        round: u64,
        ends: impl FnOnce(&Result<T, SecAggError>) -> bool,
        step: impl FnOnce(&mut SecAggClient, &SecureKeys) -> Result<T, SecAggError>,
    ) -> Result<T, ParticipantError> {
        let keys = self.secure_keys()?;
        let mut guard = self.secure.lock().expect("secure lock");
        let result = step(&mut secure_round(&mut guard, round)?.client, keys);
        if ends(&result) {
            *guard = None;
        }
        Ok(result?)
    }

    fn secure_keys(&self) -> Result<&SecureKeys, ParticipantError> {
        self.keys.as_ref().ok_or_else(|| ParticipantError::BadPlan("this client has no certificate key".into()))
    }

    /// Checks a secure plan before any key is made: the session is for this plan's round and
    /// task, the vector fits what this client will send, and with differential privacy the noise
    /// holds (the quantizer wraps instead of clamping it, and no sum of fewer inputs than the
    /// noise is calibrated to can be unmasked).
    fn check_secure_plan(&self, plan: &RoundPlan, secure: &SecurePlan) -> Result<(), ParticipantError> {
        let setup = &secure.setup;
        let bad = |m: String| Err(ParticipantError::BadPlan(m));
        if setup.round != plan.round || setup.purpose != plan.task.purpose() {
            return bad(format!(
                "the secure session is a `{}` sum of round {}, but the plan is a `{}` of round {}",
                setup.purpose,
                setup.round,
                plan.task.purpose(),
                plan.round
            ));
        }
        let params = plan.params.len();
        match plan.task {
            Task::CountLabels | Task::Evaluate => {
                let (what, len) = if plan.task == Task::CountLabels {
                    ("a label census sums", self.census_counts(plan)?.len())
                } else {
                    ("an evaluation sums", confusion_cells(plan)?)
                };
                if setup.vector_len != len || secure.dp.is_some() {
                    return bad(format!("{what} {len} counts; the plan's vector has {}", setup.vector_len));
                }
                let floor = MIN_COUNT_INPUTS.max(self.min_sum_clients);
                if setup.min_inputs < floor {
                    return bad(format!(
                        "the plan would unmask counts of as few as {} clients; this client sends counts only into sums \
                         of at least {floor}",
                        setup.min_inputs
                    ));
                }
            }
            Task::Train => {
                if secure.segments.iter().sum::<usize>() != params
                    || setup.vector_len != SecurePlan::vector_len(params, secure.segments.len(), secure.dp.is_some())
                {
                    return bad(format!(
                        "secure vector length {} does not fit {params} parameters in {} segments",
                        setup.vector_len,
                        secure.segments.len()
                    ));
                }
                if setup.min_inputs < self.min_sum_clients {
                    return bad(format!(
                        "the plan would unmask sums of as few as {} updates; this client sends its update only into \
                         sums of at least {} (min_sum_clients)",
                        setup.min_inputs, self.min_sum_clients
                    ));
                }
            }
        }
        if let Some(dp) = &secure.dp {
            dp.check().map_err(|e| ParticipantError::BadPlan(format!("differential privacy: {e}")))?;
            let quantizer = &setup.params.quantizer;
            let needed = dp.coordinate_range();
            if quantizer.clip < needed {
                return bad(format!(
                    "the quantizer range {} is narrower than the clipped, noised values need ({needed})",
                    quantizer.clip
                ));
            }
            if !quantizer.wrap {
                return bad(
                    "the quantizer of a private round clamps values, which would cut this client's noise".into()
                );
            }
            if setup.min_inputs < dp.min_survivors {
                return bad(format!(
                    "the noise is calibrated to sums of at least {} inputs, but the session would unmask sums of {}",
                    dp.min_survivors, setup.min_inputs
                ));
            }
        }
        Ok(())
    }

    /// Answers one server request. A plain plan trains and returns the update; a secure plan
    /// returns the client's nonce at once (call [`Participant::train_secure`] next, on a
    /// blocking thread); the secure phases follow. An error means the client declines the round.
    pub fn handle(&self, msg: &ServerMsg, rng: &mut impl CryptoRng) -> Result<ClientMsg, ParticipantError> {
        match msg {
            ServerMsg::Plan(plan) => match &plan.secure {
                None if plan.task != Task::Train => Err(ParticipantError::BadPlan(
                    "the server asks for label counts or confusion matrices outside secure aggregation; they \
                     reveal this client's data"
                        .into(),
                )),
                None => Ok(ClientMsg::Update(self.handle_plan(plan)?)),
                Some(secure) => {
                    if self.keys.is_none() {
                        return Err(ParticipantError::BadPlan(
                            "the round is secure but this client has no certificate key to sign with".into(),
                        ));
                    }
                    self.check_secure_plan(plan, secure)?;
                    {
                        let mut joined = self.joined.lock().expect("joined lock");
                        let purpose = secure.setup.purpose.clone();
                        if let Some(last) = joined.get(&purpose).filter(|last| plan.round <= **last) {
                            return Err(ParticipantError::BadPlan(format!(
                                "this client already joined the {purpose} sum of round {last}; it joins each round's sum \
                                 once (a second sum of the same update would give it away by difference)"
                            )));
                        }
                        joined.insert(purpose, plan.round);
                    }
                    let (client, nonce) = SecAggClient::join(&self.id, secure.setup.clone(), rng)?;
                    *self.secure.lock().expect("secure lock") = Some(SecureRound { client, input: Input::Training });
                    Ok(ClientMsg::Join { round: plan.round, nonce })
                }
            },
            ServerMsg::Joined { round, list } => self
                .in_session(*round, |_| false, |c, k| c.handle_joined(list, k.signer.as_ref(), rng))
                .map(|advert| ClientMsg::Advert { round: *round, advert }),
            ServerMsg::Adverts { round, adverts } => self
                .in_session(*round, |_| false, |c, k| c.handle_adverts(adverts, k.verifier.as_ref(), rng))
                .map(|keys| ClientMsg::Shares { round: *round, keys }),
            ServerMsg::Shares { round, shares } => {
                let mut guard = self.secure.lock().expect("secure lock");
                // The masked input needs the trained update: wait for it.
                loop {
                    let s = secure_round(&mut guard, *round)?;
                    match &s.input {
                        Input::Training => guard = self.input_ready.wait(guard).expect("secure lock"),
                        Input::Failed(why) => return Err(ParticipantError::BadPlan(format!("training failed: {why}"))),
                        Input::Ready(_) => break,
                        Input::Masked => {
                            return Err(ParticipantError::BadPlan(format!("round {round}: shares were already sent")))
                        }
                    }
                }
                let s = secure_round(&mut guard, *round)?;
                // The encoded update is needed once: free it now rather than at the unmask.
                let Input::Ready(input) = std::mem::replace(&mut s.input, Input::Masked) else {
                    unreachable!("checked above")
                };
                let signer = self.secure_keys()?.signer.clone();
                let input = s.client.handle_shares(shares, &input, signer.as_ref())?;
                Ok(ClientMsg::Masked { round: *round, input })
            }
            // A refused list ends the session; so does the unmask, whatever its outcome.
            ServerMsg::Survivors { round, list } => self
                .in_session(*round, Result::is_err, |c, k| c.handle_survivors(list, k.signer.as_ref()))
                .map(|signature| ClientMsg::Confirm { round: *round, signature }),
            ServerMsg::Unmask { round, request } => self
                .in_session(*round, |_| true, |c, k| c.handle_unmask(request, k.verifier.as_ref()))
                .map(|reply| ClientMsg::Unmask { round: *round, reply }),
            ServerMsg::Welcome { .. } | ServerMsg::Refused { .. } => {
                Err(ParticipantError::BadPlan(format!("unexpected request {msg:?}")))
            }
        }
    }

    /// Trains for a secure plan already answered with a key advert, and encodes the weighted
    /// update for masking. Blocks for the length of the training. Whatever happens (a panic in
    /// training included), the round's input ends `Ready` or `Failed`, so a request waiting for
    /// it is never left waiting.
    pub fn train_secure(&self, plan: &RoundPlan, rng: &mut impl CryptoRng) {
        let Some(secure) = &plan.secure else { return };
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match plan.task {
            Task::CountLabels => self.census_counts(plan).map(|counts| {
                let counts: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
                secure.setup.params.quantizer.encode(&counts, rng)
            }),
            Task::Evaluate => self.confusions(plan).map(|cells| {
                let cells: Vec<f32> = cells.iter().map(|&c| c as f32).collect();
                secure.setup.params.quantizer.encode(&cells, rng)
            }),
            Task::Train => self.train_and_encode(plan, secure, rng),
        }));
        let input = match encoded {
            Ok(Ok(v)) if v.len() == secure.setup.vector_len => Input::Ready(v),
            Ok(Ok(v)) => Input::Failed(format!(
                "the encoded update has {} values, the session sums {}",
                v.len(),
                secure.setup.vector_len
            )),
            Ok(Err(e)) => Input::Failed(e.to_string()),
            Err(_) => Input::Failed("training panicked".into()),
        };
        let mut guard = self.secure.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Only into the session of this very plan: a session of another purpose in the same
        // round (which replaced it) must never mask this plan's input.
        if let Some(s) = guard.as_mut().filter(|s| s.client.setup() == &secure.setup) {
            s.input = input;
        }
        self.input_ready.notify_all();
    }

    /// The encoded input waiting in the session in progress (tests).
    #[cfg(test)]
    fn pending_input(&self) -> Option<Vec<u64>> {
        match &self.secure.lock().expect("secure lock").as_ref()?.input {
            Input::Ready(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// Holds out every k-th example of each head's data (k = round(1 / fraction)) as this
    /// client's validation split for federated evaluation; without one, it evaluates on its
    /// training data.
    pub fn with_validation_fraction(mut self, fraction: f64) -> Self {
        if !(fraction > 0.0 && fraction < 1.0) {
            return self;
        }
        let k = ((1.0 / fraction).round() as usize).max(2);
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        for task in &self.tasks {
            let n = task.data.len();
            let held: Vec<usize> = (0..n).filter(|i| i % k == k - 1).collect();
            let kept: Vec<usize> = (0..n).filter(|i| i % k != k - 1).collect();
            if held.is_empty() || kept.is_empty() {
                train.push(task.clone());
                continue;
            }
            train.push(HeadData { head: task.head.clone(), data: Arc::new(task.data.subset(&kept)) });
            validation.push(HeadData { head: task.head.clone(), data: Arc::new(task.data.subset(&held)) });
        }
        self.tasks = train;
        self.validation = validation;
        self
    }

    /// Evaluates the plan's parameters (with this client's personal heads) on its validation data,
    /// or its training data without one: one confusion matrix per head of the model, in head
    /// order, flattened row by row; zeros for heads this client does not label.
    pub fn confusions(&self, plan: &RoundPlan) -> Result<Vec<u64>, ParticipantError> {
        let global = plan.params.to_f32()?;
        let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
        let evaluated = self.evaluate(&plan.model_spec, &global)?;
        let mut cells = Vec::new();
        for (head, (_, metrics)) in spec.heads.iter().zip(evaluated) {
            match metrics {
                Some(m) => cells.extend(m.confusion.into_iter().flatten()),
                None => cells.extend(std::iter::repeat_n(0, head.classes * head.classes)),
            }
        }
        Ok(cells)
    }

    /// Evaluates `params` of the model `model_spec` (with this client's personal heads) on its
    /// validation data, or its training data without one: each head of the model in order, with
    /// its metrics where this client labels it.
    pub fn evaluate(
        &self,
        model_spec: &str,
        params: &[f32],
    ) -> Result<Vec<(String, Option<train::Metrics>)>, ParticipantError> {
        let mut guard = self.local.lock().expect("model lock");
        let local = self.local_for(&mut guard, model_spec)?;
        if params.len() != local.model.layout().total_len() || params.iter().any(|v| !v.is_finite()) {
            return Err(ParticipantError::BadPlan("the parameters to evaluate do not fit the model".into()));
        }
        let mut params = params.to_vec();
        self.put_personal_heads(local.model.layout().segments(), &mut params);
        local.model.set_flat(&params)?;
        let sets = if self.validation.is_empty() { &self.tasks } else { &self.validation };
        let spec = local.model.spec().clone();
        let mut results = Vec::with_capacity(spec.heads.len());
        for (index, head) in spec.heads.iter().enumerate() {
            let mut confusion = vec![vec![0u64; head.classes]; head.classes];
            let (mut loss_sum, mut labelled) = (0.0, false);
            for task in sets.iter().filter(|t| t.head.as_deref().map_or(index == 0, |h| h == head.name)) {
                let data = DeviceData::new(&task.data, &local.model)?;
                let metrics = train::evaluate(&local.model, index, &data, 1000)?;
                for (row, add) in confusion.iter_mut().zip(&metrics.confusion) {
                    row.iter_mut().zip(add).for_each(|(c, a)| *c += a);
                }
                loss_sum += metrics.loss * metrics.examples as f64;
                labelled = true;
            }
            let metrics = labelled.then(|| train::Metrics::from_confusion(confusion, loss_sum));
            results.push((head.name.clone(), metrics));
        }
        if !self.keep_model {
            *guard = None;
        }
        Ok(results)
    }

    /// Writes this client's own values of its personal heads over `params` (the server's copy),
    /// for the personal ones among `segments` that it has.
    fn put_personal_heads(&self, segments: &[Segment], params: &mut [f32]) {
        let saved = self.personal.lock().expect("personal lock");
        for seg in segments.iter().filter(|s| s.personal) {
            if let Some(values) = saved.get(&seg.name).filter(|v| v.len() == seg.len) {
                params[seg.offset..seg.offset + seg.len].copy_from_slice(values);
            }
        }
    }

    /// This client's label counts for a census: one histogram per head the census counts
    /// ([`train::TrainConfig::census_heads`]), one after another; zeros for heads it does not label.
    fn census_counts(&self, plan: &RoundPlan) -> Result<Vec<u64>, ParticipantError> {
        let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
        let train = TrainConfig::try_from(&plan.train).map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
        let mut all = Vec::new();
        for head in train.census_heads(&spec) {
            let first = spec.heads.first().is_some_and(|h| h.name == head.name);
            let mut counts = vec![0u64; head.classes];
            for task in self.tasks.iter().filter(|t| t.head.as_deref().map_or(first, |h| h == head.name)) {
                for (total, n) in counts.iter_mut().zip(task.data.label_counts()) {
                    *total += n;
                }
            }
            all.extend(counts);
        }
        Ok(all)
    }

    fn train_and_encode(
        &self,
        plan: &RoundPlan,
        secure: &SecurePlan,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<u64>, ParticipantError> {
        self.handle_plan(plan).and_then(|update| {
            let delta = update.delta.to_f32()?;
            let quantizer = secure.setup.params.quantizer;
            let segment_samples = update.samples_per_segment(secure.segments.len());
            match &secure.dp {
                Some(dp) => {
                    // With DP every segment's sum divides by the public expected number of
                    // clients: no weights or counts are summed.
                    let (private, _) = dp::privatize(delta, &secure.segments, dp, rng)
                        .map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
                    Ok(quantizer.encode(&private, rng))
                }
                None => {
                    let weights: Vec<f32> =
                        segment_samples.iter().map(|&n| secagg::sample_weight(n, secure.sample_cap)).collect();
                    secagg::encode_weighted(&delta, &secure.segments, &weights, &quantizer, rng).ok_or_else(|| {
                        ParticipantError::BadPlan(format!(
                            "the plan's {} segments do not fit this model's {}",
                            secure.segments.len(),
                            segment_samples.len()
                        ))
                    })
                }
            }
        })
    }

    /// Whether the secure round `round` is still waiting for its training to finish.
    pub fn is_training(&self, round: u64) -> bool {
        matches!(&*self.secure.lock().expect("secure lock"), Some(s) if s.client.round() == round && matches!(s.input, Input::Training))
    }

    /// Forgets the secure round in progress (what a crash or restart loses).
    pub fn abandon_round(&self) {
        *self.secure.lock().expect("secure lock") = None;
        self.input_ready.notify_all();
    }

    /// Trains on the plan and returns the update.
    pub fn handle_plan(&self, plan: &RoundPlan) -> Result<Update, ParticipantError> {
        let started = Instant::now();
        let train = TrainConfig::try_from(&plan.train).map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
        train.check().map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
        let seed = plan.seed ^ fnv1a(self.id.as_bytes());
        let samples = self.samples();
        if self.synthetic {
            use rand::SeedableRng;
            use rand_distr::Distribution;
            let normal = rand_distr::Normal::new(0.0f32, 0.01).expect("valid normal");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let delta: Vec<f32> = (0..plan.params.len()).map(|_| normal.sample(&mut rng)).collect();
            return Ok(Update {
                round: plan.round,
                samples,
                delta: TensorBytes::from_f32(&delta),
                train_loss: 0.0,
                train_seconds: started.elapsed().as_secs_f32(),
                segment_samples: Vec::new(),
            });
        }
        let mut guard = self.local.lock().expect("model lock");
        let local = self.local_for(&mut guard, &plan.model_spec)?;
        let global = plan.params.to_f32()?;
        let expected = local.model.layout().total_len();
        if global.len() != expected {
            return Err(ParticipantError::BadPlan(format!(
                "{} parameters sent, the model has {expected}",
                global.len()
            )));
        }
        if global.iter().any(|v| !v.is_finite()) {
            return Err(ParticipantError::BadPlan("the global parameters contain non-finite values".into()));
        }
        // Personal heads continue from this client's own parameters, not the server's.
        let personal_segments: Vec<Segment> =
            local.model.layout().segments().iter().filter(|s| s.personal).cloned().collect();
        let mut start = global.clone();
        self.put_personal_heads(&personal_segments, &mut start);
        local.model.set_flat(&start)?;
        let heads: Vec<(usize, &DeviceData)> = local.data.iter().map(|(h, d)| (*h, d)).collect();
        let stats = train::train_heads(&local.model, &heads, &train, seed, plan.class_counts.as_deref())?;
        let mut delta = local.model.flat_delta(&start)?;
        let mut segment_samples = local.segment_samples.clone();
        {
            let mut saved = self.personal.lock().expect("personal lock");
            for seg in &personal_segments {
                let range = seg.offset..seg.offset + seg.len;
                let trained: Vec<f32> =
                    start[range.clone()].iter().zip(&delta[range.clone()]).map(|(s, d)| s + d).collect();
                saved.insert(seg.name.clone(), trained);
                // Never sent: zero values and zero weight, so the server leaves the head alone.
                delta[range].iter_mut().for_each(|d| *d = 0.0);
            }
        }
        for (i, seg) in local.model.layout().segments().iter().enumerate() {
            if seg.personal {
                segment_samples[i] = 0;
            }
        }
        if !self.keep_model {
            *guard = None;
        }
        Ok(Update {
            round: plan.round,
            samples,
            delta: TensorBytes::from_f32(&delta),
            train_loss: stats.mean_loss,
            train_seconds: started.elapsed().as_secs_f32(),
            segment_samples,
        })
    }

    fn local_for<'a>(&self, slot: &'a mut Option<Local>, spec_toml: &str) -> Result<&'a mut Local, ParticipantError> {
        if slot.as_ref().is_none_or(|l| l.spec_toml != spec_toml) {
            let spec = ModelSpec::from_toml(spec_toml).map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
            let model = Model::new(&spec, &self.device, 0)?;
            let mut data = Vec::with_capacity(self.tasks.len());
            let mut segment_samples = vec![0u64; spec.heads.len() + 1];
            for task in &self.tasks {
                let head = match &task.head {
                    None => 0,
                    Some(name) => spec.heads.iter().position(|h| &h.name == name).ok_or_else(|| {
                        let names: Vec<&str> = spec.heads.iter().map(|h| h.name.as_str()).collect();
                        ParticipantError::BadPlan(format!(
                            "this client labels head `{name}`; the model `{}` has heads {names:?}",
                            spec.name
                        ))
                    })?,
                };
                segment_samples[0] += task.data.len() as u64;
                segment_samples[head + 1] += task.data.len() as u64;
                data.push((head, DeviceData::new(&task.data, &model)?));
            }
            *slot = Some(Local { spec_toml: spec_toml.to_string(), model, data, segment_samples });
        }
        Ok(slot.as_mut().expect("just set"))
    }
}

fn secure_round(slot: &mut Option<SecureRound>, round: u64) -> Result<&mut SecureRound, ParticipantError> {
    match slot {
        Some(s) if s.client.round() == round => Ok(s),
        _ => Err(ParticipantError::BadPlan(format!("no secure round {round} in progress"))),
    }
}

/// The number of confusion counts an evaluation of the plan's model sends: the sum of each
/// head's classes squared.
pub fn confusion_cells(plan: &RoundPlan) -> Result<usize, ParticipantError> {
    let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| ParticipantError::BadPlan(e.to_string()))?;
    Ok(spec.heads.iter().map(|h| h.classes * h.classes).sum())
}

/// FNV-1a: a stable, dependency-free hash to derive per-client seeds.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::DpPlan;
    use crate::model::{vectors_from_safetensors, vectors_to_safetensors};
    use crate::secagg::quantize::Quantizer;

    fn plan(spec: &str, params: Vec<f32>) -> RoundPlan {
        RoundPlan {
            round: 3,
            model_spec: spec.into(),
            params: TensorBytes::from_f32(&params),
            train: (&TrainConfig { epochs: 1, batch_size: 2, lr: 0.1, ..Default::default() }).into(),
            seed: 1,
            deadline_ms: 1000,
            secure: None,
            task: Task::Train,
            class_counts: None,
        }
    }

    #[test]
    fn trains_and_returns_the_delta() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let data = Dataset::new(vec![1.0, 0.0, 0.0, 1.0], vec![2], vec![0, 1], 2).unwrap();
        let p = Participant::new("c1", Arc::new(data), Device::Cpu);
        let update = p.handle_plan(&plan(spec_toml, vec![0.0; 6])).unwrap();
        assert_eq!(update.round, 3);
        assert_eq!(update.samples, 2);
        let delta = update.delta.to_f32().unwrap();
        assert_eq!(delta.len(), 6);
        assert!(delta.iter().any(|d| *d != 0.0));
        let trained = p.trained_params().unwrap();
        assert_eq!(trained, delta, "from a zero model the delta is the trained model");
    }

    #[test]
    fn a_client_trains_the_heads_it_labels_and_leaves_the_others() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[trunk]]\nkind='linear'\nout=3\n\
                         [[heads]]\nname='a'\nclasses=2\n[[heads]]\nname='b'\nclasses=2\n[[heads]]\nname='c'\nclasses=3";
        let spec = ModelSpec::from_toml(spec_toml).unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let layout = model.layout().clone();
        let labelled = |labels: Vec<u32>| {
            let n = labels.len();
            Arc::new(Dataset::new((0..2 * n).map(|i| i as f32 / 10.0).collect(), vec![2], labels, 2).unwrap())
        };
        let p = Participant::with_heads(
            "c1",
            vec![
                HeadData { head: Some("b".into()), data: labelled(vec![0, 1, 1]) },
                HeadData { head: Some("a".into()), data: labelled(vec![1, 0]) },
            ],
            Device::Cpu,
        );
        let update = p.handle_plan(&plan(spec_toml, model.flat().unwrap())).unwrap();
        assert_eq!(update.samples, 5);
        assert_eq!(update.segment_samples, vec![5, 2, 3, 0], "trunk, a, b, c");
        let delta = update.delta.to_f32().unwrap();
        let moved = |i: usize| {
            let seg = &layout.segments()[i];
            delta[seg.offset..seg.offset + seg.len].iter().any(|d| *d != 0.0)
        };
        assert!(moved(0) && moved(1) && moved(2) && !moved(3), "head c is not trained");

        let stranger = Participant::with_heads(
            "c2",
            vec![HeadData { head: Some("z".into()), data: labelled(vec![0]) }],
            Device::Cpu,
        );
        let err = stranger.handle_plan(&plan(spec_toml, model.flat().unwrap())).unwrap_err().to_string();
        assert!(err.contains("`z`") && err.contains("\"a\""), "{err}");
    }

    #[test]
    fn personal_heads_stay_on_the_client_and_continue_from_its_own_values() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[trunk]]\nkind='linear'\nout=3\n\
                         [[heads]]\nname='a'\nclasses=2\n[[heads]]\nname='p'\nclasses=2\npersonal=true";
        let spec = ModelSpec::from_toml(spec_toml).unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let p_seg = model.layout().segments()[2].clone();
        let data = Arc::new(Dataset::new(vec![0.1, 0.9, 0.8, 0.2, 0.4, 0.4], vec![2], vec![0, 1, 1], 2).unwrap());
        let heads = |d: &Arc<Dataset>| {
            vec![
                HeadData { head: Some("a".into()), data: d.clone() },
                HeadData { head: Some("p".into()), data: d.clone() },
            ]
        };
        let client = Participant::with_heads("c1", heads(&data), Device::Cpu);
        let global = model.flat().unwrap();
        let update = client.handle_plan(&plan(spec_toml, global.clone())).unwrap();
        let delta = update.delta.to_f32().unwrap();
        assert!(
            delta[p_seg.offset..p_seg.offset + p_seg.len].iter().all(|d| *d == 0.0),
            "the personal head is not sent"
        );
        assert_eq!(update.segment_samples, vec![6, 3, 0]);
        let mine = client.personal_heads()["p"].clone();
        assert_ne!(mine, global[p_seg.offset..p_seg.offset + p_seg.len].to_vec(), "it trained");

        // The server's copy of the personal head is ignored: training goes on from the client's.
        let mut poisoned = global.clone();
        poisoned[p_seg.offset..p_seg.offset + p_seg.len].iter_mut().for_each(|v| *v = 50.0);
        client.handle_plan(&plan(spec_toml, poisoned.clone())).unwrap();
        assert!(client.personal_heads()["p"].iter().all(|v| v.abs() < 10.0));

        // After a restart, the saved values come back.
        let restarted = Participant::with_heads("c1", heads(&data), Device::Cpu)
            .with_personal_heads(BTreeMap::from([("p".to_string(), mine.clone())]));
        let fresh = Participant::with_heads("c1", heads(&data), Device::Cpu);
        restarted.handle_plan(&plan(spec_toml, poisoned.clone())).unwrap();
        fresh.handle_plan(&plan(spec_toml, poisoned)).unwrap();
        assert!(restarted.personal_heads()["p"].iter().all(|v| v.abs() < 10.0));
        assert!(fresh.personal_heads()["p"].iter().any(|v| v.abs() > 10.0), "without them it starts from the server's");

        let saved = restarted.personal_heads();
        assert_eq!(vectors_from_safetensors(&vectors_to_safetensors(&saved)).unwrap(), saved);
        assert!(vectors_from_safetensors(&vectors_to_safetensors(&saved)[..10]).is_err());
    }

    #[test]
    fn federated_evaluation_uses_the_held_out_examples_and_zeros_for_other_heads() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='a'\nclasses=2\n[[heads]]\nname='b'\nclasses=3";
        let spec = ModelSpec::from_toml(spec_toml).unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let data =
            Arc::new(Dataset::new((0..20).map(|i| i as f32 / 20.0).collect(), vec![2], [0, 1].repeat(5), 2).unwrap());
        let p = Participant::with_heads("c1", vec![HeadData { head: Some("a".into()), data }], Device::Cpu)
            .with_validation_fraction(0.2);
        assert_eq!(p.samples(), 8, "every fifth example is held out");
        let mut evaluation = plan(spec_toml, model.flat().unwrap());
        evaluation.task = Task::Evaluate;
        assert_eq!(confusion_cells(&evaluation).unwrap(), 4 + 9);
        let cells = p.confusions(&evaluation).unwrap();
        assert_eq!(cells.len(), 13);
        assert_eq!(cells[..4].iter().sum::<u64>(), 2, "the two held-out examples");
        assert!(cells[4..].iter().all(|c| *c == 0), "head b is not labelled here");
        let plain = Participant::with_heads(
            "c2",
            vec![HeadData {
                head: Some("a".into()),
                data: Arc::new(Dataset::new(vec![0.0; 6], vec![2], vec![0, 1, 1], 2).unwrap()),
            }],
            Device::Cpu,
        );
        assert_eq!(plain.confusions(&evaluation).unwrap()[..4].iter().sum::<u64>(), 3, "no split: the training data");
    }

    #[test]
    fn a_census_counts_the_labels_of_each_head_with_global_scope() {
        use crate::train::{CountScope, LossConfig};
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='a'\nclasses=2\n[[heads]]\nname='b'\nclasses=3";
        let labelled = |labels: Vec<u32>, classes| {
            let n = labels.len();
            Arc::new(Dataset::new(vec![0.5; 2 * n], vec![2], labels, classes).unwrap())
        };
        let p = Participant::with_heads(
            "c1",
            vec![
                HeadData { head: Some("b".into()), data: labelled(vec![2, 2, 0, 2], 3) },
                HeadData { head: Some("b".into()), data: labelled(vec![1], 3) },
            ],
            Device::Cpu,
        );
        let global = LossConfig { scope: CountScope::Global, ..Default::default() };
        let mut census = plan(spec_toml, Vec::new());
        census.task = Task::CountLabels;
        census.train.head_loss.insert("b".into(), (&global).into());
        assert_eq!(p.census_counts(&census).unwrap(), vec![1, 1, 3], "head b only, both of its data sets");
        census.train.loss = (&global).into();
        assert_eq!(p.census_counts(&census).unwrap(), vec![0, 0, 1, 1, 3], "head a (not labelled here), then b");
        census.train.loss = (&LossConfig::default()).into();
        census.train.head_loss.clear();
        assert!(p.census_counts(&census).unwrap().is_empty(), "no head has global scope");
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
        let p = Participant::new("c000", Arc::new(data), Device::Cpu).with_secure_keys(keys);
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
        assert!(matches!(p.handle(&ServerMsg::Plan(bad.clone()), &mut rng), Ok(ClientMsg::Join { .. })));
        p.train_secure(&bad, &mut rng);
        let shares = ServerMsg::Shares { round: 3, shares: Vec::new() };
        let err = p.handle(&shares, &mut rng).unwrap_err().to_string();
        assert!(err.contains("segments do not fit"), "{err}");

        let dp = DpPlan {
            clip: 1.0,
            per_segment: false,
            noise_multiplier: 1.0,
            count_noise: 1.0,
            min_survivors: 3,
            sampling_rate: 1.0,
            expected_clients: 3.0,
        };
        let mut private = secure_plan(vec![6], Some(dp));
        let s = &mut private.secure.as_mut().unwrap().setup;
        s.params = SecAggParams { quantizer: Quantizer { clip: 9.0, ..s.params.quantizer }, ..s.params.clone() };
        s.min_inputs = 3;
        let err = p.handle(&ServerMsg::Plan(private.clone()), &mut rng).unwrap_err().to_string();
        assert!(err.contains("clamps"), "{err}");
        let s = &mut private.secure.as_mut().unwrap().setup;
        s.params.quantizer.wrap = true;
        s.min_inputs = 2;
        let err = p.handle(&ServerMsg::Plan(private.clone()), &mut rng).unwrap_err().to_string();
        assert!(err.contains("at least 3 inputs"), "{err}");
        private.secure.as_mut().unwrap().setup.min_inputs = 3;
        private.round = 4;
        private.secure.as_mut().unwrap().setup.round = 4;
        assert!(p.handle(&ServerMsg::Plan(private.clone()), &mut rng).is_ok());
        // The same round's sum a second time (a difference of two sums gives the update away),
        // or an earlier one, is refused.
        let err = p.handle(&ServerMsg::Plan(private.clone()), &mut rng).unwrap_err().to_string();
        assert!(err.contains("already joined the train sum of round 4"), "{err}");
        let earlier = secure_plan(vec![6], None);
        assert!(p.handle(&ServerMsg::Plan(earlier), &mut rng).unwrap_err().to_string().contains("already joined"));
        // A census whose sum could hold two clients' counts.
        let mut census = secure_plan(vec![0], None);
        census.task = Task::CountLabels;
        let s = &mut census.secure.as_mut().unwrap().setup;
        s.purpose = "census".into();
        s.vector_len = 0;
        s.min_inputs = 2;
        let err = p.handle(&ServerMsg::Plan(census), &mut rng).unwrap_err().to_string();
        assert!(err.contains("at least 3"), "{err}");
        // A sum of one update (the update itself), and one below this data owner's floor.
        let mut alone = secure_plan(vec![6], None);
        alone.secure.as_mut().unwrap().setup.min_inputs = 1;
        let err = p.handle(&ServerMsg::Plan(alone), &mut rng).unwrap_err().to_string();
        assert!(err.contains("at least 2"), "{err}");
        let data = Dataset::new(vec![1.0, 0.0], vec![2], vec![0], 2).unwrap();
        let keys = SecureKeys { signer: Arc::new(TestSigner("c000".into())), verifier: Arc::new(TestPki) };
        let careful =
            Participant::new("c000", Arc::new(data), Device::Cpu).with_secure_keys(keys).with_min_sum_clients(3);
        let err = careful.handle(&ServerMsg::Plan(secure_plan(vec![6], None)), &mut rng).unwrap_err().to_string();
        assert!(err.contains("at least 3 (min_sum_clients)"), "{err}");
        // A session for another task than the plan's.
        let mut mislabelled = secure_plan(vec![6], None);
        mislabelled.secure.as_mut().unwrap().setup.purpose = "census".into();
        let err = p.handle(&ServerMsg::Plan(mislabelled), &mut rng).unwrap_err().to_string();
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
        let p = Participant::new("c000", Arc::new(data), Device::Cpu).with_synthetic_updates().with_secure_keys(keys);
        let mut rng = rand::rng();
        let joined = p.handle(&ServerMsg::Plan(train.clone()), &mut rng);
        assert!(matches!(joined, Ok(ClientMsg::Join { .. })), "{joined:?}");
        let joined = p.handle(&ServerMsg::Plan(census.clone()), &mut rng);
        assert!(matches!(joined, Ok(ClientMsg::Join { .. })), "{joined:?}");
        p.train_secure(&census, &mut rng);
        let counts = p.pending_input().unwrap();
        p.train_secure(&train, &mut rng);
        assert_eq!(p.pending_input().unwrap(), counts, "the census session keeps its own input");
        assert!(counts.iter().all(|c| *c == 0), "the census codes, at the server's scale");
    }

    #[test]
    fn refuses_bad_plans() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let data = Dataset::new(vec![1.0, 0.0], vec![2], vec![0], 2).unwrap();
        let p = Participant::new("c1", Arc::new(data), Device::Cpu);
        assert!(matches!(p.handle_plan(&plan(spec_toml, vec![0.0; 5])), Err(ParticipantError::BadPlan(_))));
        assert!(matches!(p.handle_plan(&plan(spec_toml, vec![f32::NAN; 6])), Err(ParticipantError::BadPlan(_))));
        assert!(matches!(p.handle_plan(&plan("nonsense", vec![0.0; 6])), Err(ParticipantError::BadPlan(_))));
        let wrong_shape = "name='t'\ninput_shape=[3]\n[[heads]]\nname='y'\nclasses=2";
        assert!(p.handle_plan(&plan(wrong_shape, vec![0.0; 8])).is_err());
    }
}
