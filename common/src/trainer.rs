//! The client's computation for a round, with candle: the blocking half of the client that
//! [`ClientSession`](crate::session::ClientSession) leaves to its driver.
//!
//! A [`Trainer`] owns the client's data (per head), its validation split, the model built from
//! the last spec it saw, and its personal heads. [`Trainer::run`] runs one
//! [`Job`](crate::session::Job): it trains on the plan (parse, don't validate: the spec is
//! parsed, the training config checked, the parameters sized) and returns `local - global`,
//! counts labels for a census, or evaluates. It blocks for the length of the work: drivers call
//! it on a blocking thread, one job at a time (`&mut self`; no locks).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use crate::data::Dataset;
use crate::model::{Model, ModelError, ModelSpec, Segment};
use crate::session::{confusion_cells, Job, JobKind, JobOutput};
use crate::train::{self, DeviceData, TrainConfig, TrainError, TrainProgress};
use crate::wire::{RoundPlan, TensorBytes, Update, WireError};

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The server sent a plan that cannot be followed with this client's data or model.
    #[error("the round plan is invalid: {0}")]
    BadPlan(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A bug in training (or candle): the job is lost, the trainer goes on with a fresh model.
    #[error("training panicked")]
    Panicked,
    /// The data owner's own training ([`crate::callbacks`]) failed or returned what the model
    /// cannot take; the reason is theirs, in words.
    #[error("{0}")]
    Callback(String),
}

/// What runs the session's jobs on a client: [`Trainer`] with candle, or
/// [`CallbackTrainer`](crate::callbacks::CallbackTrainer) with the data owner's own code. The
/// driver calls it on a blocking thread, one job at a time.
pub trait JobRunner: Send {
    /// Runs one job; whatever happens (a panic included) it returns.
    fn run(&mut self, job: &Job) -> Result<JobOutput, TrainerError>;
    /// The examples this client holds, as far as it knows (its hello tells the server).
    fn samples(&self) -> u64;
    /// The parameters of its personal heads, by head name: never sent; the driver keeps them
    /// across restarts after each training job.
    fn personal_heads(&self) -> &BTreeMap<String, Vec<f32>>;
}

impl JobRunner for Trainer {
    fn run(&mut self, job: &Job) -> Result<JobOutput, TrainerError> {
        Trainer::run(self, job)
    }
    fn samples(&self) -> u64 {
        Trainer::samples(self)
    }
    fn personal_heads(&self) -> &BTreeMap<String, Vec<f32>> {
        Trainer::personal_heads(self)
    }
}

impl From<WireError> for TrainerError {
    fn from(e: WireError) -> Self {
        TrainerError::BadPlan(e.to_string())
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

/// The personal heads one training trained, by name.
type Trained = Vec<(String, Vec<f32>)>;

/// Labelled examples for one head of the model; `head: None` is the model's first head.
#[derive(Debug, Clone)]
pub struct HeadData {
    pub head: Option<String>,
    pub data: Arc<Dataset>,
}

/// One client's data and model.
pub struct Trainer {
    id: String,
    tasks: Vec<HeadData>,
    device: Device,
    local: Option<Local>,
    synthetic: bool,
    keep_model: bool,
    /// Parameters of personal heads by head name: trained here, never sent.
    personal: BTreeMap<String, Vec<f32>>,
    /// Held-out examples per head for federated evaluation (empty: evaluate on `tasks`).
    validation: Vec<HeadData>,
    /// Told how far each training job has got (the data owner's progress display).
    progress: Option<ProgressObserver>,
}

/// A progress display: told the round and where its training stands after every step.
pub type ProgressObserver = Arc<dyn Fn(u64, TrainProgress) + Send + Sync>;

impl Trainer {
    pub fn new(id: impl Into<String>, data: Arc<Dataset>, device: Device) -> Self {
        Self::with_heads(id, vec![HeadData { head: None, data }], device)
    }

    /// A client that labels several heads, each with its own examples (multi-task training: the
    /// trunk learns from all of them, each head from its own). `id` seeds its training.
    pub fn with_heads(id: impl Into<String>, tasks: Vec<HeadData>, device: Device) -> Self {
        Self {
            id: id.into(),
            tasks,
            device,
            local: None,
            synthetic: false,
            keep_model: true,
            personal: BTreeMap::new(),
            validation: Vec::new(),
            progress: None,
        }
    }

    /// Tells `observer` how far each round's training has got, after every step.
    pub fn with_progress(mut self, observer: ProgressObserver) -> Self {
        self.progress = Some(observer);
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

    /// Restores personal heads saved by an earlier run (see [`Trainer::personal_heads`]).
    pub fn with_personal_heads(mut self, heads: BTreeMap<String, Vec<f32>>) -> Self {
        self.personal = heads;
        self
    }

    /// The parameters of this client's personal heads, by head name: they never leave the
    /// client; the driver keeps them across restarts (after each training job).
    pub fn personal_heads(&self) -> &BTreeMap<String, Vec<f32>> {
        &self.personal
    }

    pub fn samples(&self) -> u64 {
        self.tasks.iter().map(|t| t.data.len() as u64).sum()
    }

    /// The flat parameters of the last trained model, if any.
    pub fn trained_params(&self) -> Option<Vec<f32>> {
        self.local.as_ref().and_then(|l| l.model.flat().ok())
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

    /// Runs one job. Whatever happens (a panic in training included) it returns, so the session
    /// waiting for the result is never left waiting; after a panic the model is built afresh.
    pub fn run(&mut self, job: &Job) -> Result<JobOutput, TrainerError> {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.kind {
            JobKind::Train => self.train(&job.plan).map(JobOutput::Update),
            JobKind::CountLabels => self.census_counts(&job.plan).map(JobOutput::Counts),
            JobKind::Evaluate => self.confusions(&job.plan).map(JobOutput::Counts),
        }));
        done.unwrap_or_else(|_| {
            self.local = None;
            Err(TrainerError::Panicked)
        })
    }

    /// Evaluates the plan's parameters (with this client's personal heads) on its validation data,
    /// or its training data without one: one confusion matrix per head of the model, in head
    /// order, flattened row by row; zeros for heads this client does not label.
    pub fn confusions(&mut self, plan: &RoundPlan) -> Result<Vec<u64>, TrainerError> {
        let global = plan.params.to_f32()?;
        let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
        let evaluated = self.evaluate(&plan.model_spec, &global)?;
        let mut cells = Vec::new();
        for (head, (_, metrics)) in spec.heads.iter().zip(evaluated) {
            match metrics {
                Some(m) => cells.extend(m.confusion.into_iter().flatten()),
                None => cells.extend(std::iter::repeat_n(0, head.classes * head.classes)),
            }
        }
        debug_assert_eq!(confusion_cells(plan).ok(), Some(cells.len()));
        Ok(cells)
    }

    /// Evaluates `params` of the model `model_spec` (with this client's personal heads) on its
    /// validation data, or its training data without one: each head of the model in order, with
    /// its metrics where this client labels it.
    pub fn evaluate(
        &mut self,
        model_spec: &str,
        params: &[f32],
    ) -> Result<Vec<(String, Option<train::Metrics>)>, TrainerError> {
        let mut slot = self.local.take();
        let result = self.evaluate_in(&mut slot, model_spec, params);
        if self.keep_model {
            self.local = slot;
        }
        result
    }

    fn evaluate_in(
        &self,
        slot: &mut Option<Local>,
        model_spec: &str,
        params: &[f32],
    ) -> Result<Vec<(String, Option<train::Metrics>)>, TrainerError> {
        let local = self.local_for(slot, model_spec)?;
        if params.len() != local.model.layout().total_len() || params.iter().any(|v| !v.is_finite()) {
            return Err(TrainerError::BadPlan("the parameters to evaluate do not fit the model".into()));
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
        Ok(results)
    }

    /// Writes this client's own values of its personal heads over `params` (the server's copy),
    /// for the personal ones among `segments` that it has.
    fn put_personal_heads(&self, segments: &[Segment], params: &mut [f32]) {
        for seg in segments.iter().filter(|s| s.personal) {
            if let Some(values) = self.personal.get(&seg.name).filter(|v| v.len() == seg.len) {
                params[seg.offset..seg.offset + seg.len].copy_from_slice(values);
            }
        }
    }

    /// This client's label counts for a census: one histogram per head the census counts
    /// ([`train::TrainConfig::census_heads`]), one after another; zeros for heads it does not label.
    pub fn census_counts(&self, plan: &RoundPlan) -> Result<Vec<u64>, TrainerError> {
        let spec = ModelSpec::from_toml(&plan.model_spec).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
        let train = TrainConfig::try_from(&plan.train).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
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

    /// Trains on the plan and returns the update (personal heads zeroed: they stay here).
    pub fn train(&mut self, plan: &RoundPlan) -> Result<Update, TrainerError> {
        let started = Instant::now();
        let train = TrainConfig::try_from(&plan.train).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
        train.check().map_err(|e| TrainerError::BadPlan(e.to_string()))?;
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
        let mut slot = self.local.take();
        let result = self.train_in(&mut slot, plan, &train, seed);
        if self.keep_model {
            self.local = slot;
        }
        let (mut update, personal) = result?;
        self.personal.extend(personal);
        update.samples = samples;
        update.train_seconds = started.elapsed().as_secs_f32();
        Ok(update)
    }

    /// The training itself, in the model `slot`: the update and the personal heads trained.
    fn train_in(
        &self,
        slot: &mut Option<Local>,
        plan: &RoundPlan,
        train: &TrainConfig,
        seed: u64,
    ) -> Result<(Update, Trained), TrainerError> {
        let local = self.local_for(slot, &plan.model_spec)?;
        let global = plan.params.to_f32()?;
        let expected = local.model.layout().total_len();
        if global.len() != expected {
            return Err(TrainerError::BadPlan(format!("{} parameters sent, the model has {expected}", global.len())));
        }
        if global.iter().any(|v| !v.is_finite()) {
            return Err(TrainerError::BadPlan("the global parameters contain non-finite values".into()));
        }
        // Personal heads continue from this client's own parameters, not the server's.
        let personal_segments: Vec<Segment> =
            local.model.layout().segments().iter().filter(|s| s.personal).cloned().collect();
        let mut start = global;
        self.put_personal_heads(&personal_segments, &mut start);
        local.model.set_flat(&start)?;
        let heads: Vec<(usize, &DeviceData)> = local.data.iter().map(|(h, d)| (*h, d)).collect();
        let round = plan.round;
        let observe = self.progress.as_ref().map(|p| move |at: TrainProgress| p(round, at));
        let observe = observe.as_ref().map(|o| o as &(dyn Fn(TrainProgress) + Sync));
        let stats =
            train::train_heads_observed(&local.model, &heads, train, seed, plan.class_counts.as_deref(), observe)?;
        let mut delta = local.model.flat_delta(&start)?;
        let mut segment_samples = local.segment_samples.clone();
        let mut personal = Vec::with_capacity(personal_segments.len());
        for seg in &personal_segments {
            let range = seg.offset..seg.offset + seg.len;
            let trained: Vec<f32> =
                start[range.clone()].iter().zip(&delta[range.clone()]).map(|(s, d)| s + d).collect();
            personal.push((seg.name.clone(), trained));
            // Never sent: zero values and zero weight, so the server leaves the head alone.
            delta[range].iter_mut().for_each(|d| *d = 0.0);
        }
        for (i, seg) in local.model.layout().segments().iter().enumerate() {
            if seg.personal {
                segment_samples[i] = 0;
            }
        }
        let update = Update {
            round: plan.round,
            samples: 0,
            delta: TensorBytes::from_f32(&delta),
            train_loss: stats.mean_loss,
            train_seconds: 0.0,
            segment_samples,
        };
        Ok((update, personal))
    }

    fn local_for<'a>(&self, slot: &'a mut Option<Local>, spec_toml: &str) -> Result<&'a mut Local, TrainerError> {
        if slot.as_ref().is_none_or(|l| l.spec_toml != spec_toml) {
            let spec = ModelSpec::from_toml(spec_toml).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
            // Candle needs layers: a model of declared parameters is trained by code that knows them.
            spec.check_runnable()?;
            let model = Model::new(&spec, &self.device, 0)?;
            let mut data = Vec::with_capacity(self.tasks.len());
            let mut segment_samples = vec![0u64; spec.heads.len() + 1];
            for task in &self.tasks {
                let head = match &task.head {
                    None => 0,
                    Some(name) => spec.heads.iter().position(|h| &h.name == name).ok_or_else(|| {
                        let names: Vec<&str> = spec.heads.iter().map(|h| h.name.as_str()).collect();
                        TrainerError::BadPlan(format!(
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

/// FNV-1a: a stable, dependency-free hash to derive per-client seeds.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{vectors_from_safetensors, vectors_to_safetensors};
    use crate::wire::Task;

    /// A plain plan of round 3 for `spec` with `params` (the session's tests use it too).
    pub(crate) fn plan(spec: &str, params: Vec<f32>) -> RoundPlan {
        RoundPlan {
            round: 3,
            run: "trial".into(),
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

    /// The progress display is told every step of a round, numbered to the total over every
    /// epoch and phase (FedRep's heads-then-trunk schedule included).
    #[test]
    fn progress_is_reported_for_every_step_of_every_phase() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let data = Dataset::new(vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5], vec![2], vec![0, 1, 0], 2).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut p = Trainer::new("c1", Arc::new(data), Device::Cpu)
            .with_progress(Arc::new(move |round, at| log.lock().unwrap().push((round, at.step, at.steps))));
        let mut plan = plan(spec_toml, vec![0.0; 6]);
        plan.train =
            (&TrainConfig { epochs: 2, head_epochs: Some(1), batch_size: 2, lr: 0.1, ..Default::default() }).into();
        p.train(&plan).unwrap();
        // 3 examples in batches of 2: 2 steps per epoch, 1 head epoch + 2 trunk epochs.
        let expected: Vec<(u64, usize, usize)> = (1..=6).map(|step| (3, step, 6)).collect();
        assert_eq!(*seen.lock().unwrap(), expected);
    }

    #[test]
    fn trains_and_returns_the_delta() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let data = Dataset::new(vec![1.0, 0.0, 0.0, 1.0], vec![2], vec![0, 1], 2).unwrap();
        let mut p = Trainer::new("c1", Arc::new(data), Device::Cpu);
        let update = p.train(&plan(spec_toml, vec![0.0; 6])).unwrap();
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
        let mut p = Trainer::with_heads(
            "c1",
            vec![
                HeadData { head: Some("b".into()), data: labelled(vec![0, 1, 1]) },
                HeadData { head: Some("a".into()), data: labelled(vec![1, 0]) },
            ],
            Device::Cpu,
        );
        let update = p.train(&plan(spec_toml, model.flat().unwrap())).unwrap();
        assert_eq!(update.samples, 5);
        assert_eq!(update.segment_samples, vec![5, 2, 3, 0], "trunk, a, b, c");
        let delta = update.delta.to_f32().unwrap();
        let moved = |i: usize| {
            let seg = &layout.segments()[i];
            delta[seg.offset..seg.offset + seg.len].iter().any(|d| *d != 0.0)
        };
        assert!(moved(0) && moved(1) && moved(2) && !moved(3), "head c is not trained");

        let mut stranger =
            Trainer::with_heads("c2", vec![HeadData { head: Some("z".into()), data: labelled(vec![0]) }], Device::Cpu);
        let err = stranger.train(&plan(spec_toml, model.flat().unwrap())).unwrap_err().to_string();
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
        let mut client = Trainer::with_heads("c1", heads(&data), Device::Cpu);
        let global = model.flat().unwrap();
        let update = client.train(&plan(spec_toml, global.clone())).unwrap();
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
        client.train(&plan(spec_toml, poisoned.clone())).unwrap();
        assert!(client.personal_heads()["p"].iter().all(|v| v.abs() < 10.0));

        // After a restart, the saved values come back.
        let mut restarted = Trainer::with_heads("c1", heads(&data), Device::Cpu)
            .with_personal_heads(BTreeMap::from([("p".to_string(), mine.clone())]));
        let mut fresh = Trainer::with_heads("c1", heads(&data), Device::Cpu);
        restarted.train(&plan(spec_toml, poisoned.clone())).unwrap();
        fresh.train(&plan(spec_toml, poisoned)).unwrap();
        assert!(restarted.personal_heads()["p"].iter().all(|v| v.abs() < 10.0));
        assert!(fresh.personal_heads()["p"].iter().any(|v| v.abs() > 10.0), "without them it starts from the server's");

        let saved = restarted.personal_heads().clone();
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
        let mut p = Trainer::with_heads("c1", vec![HeadData { head: Some("a".into()), data }], Device::Cpu)
            .with_validation_fraction(0.2);
        assert_eq!(p.samples(), 8, "every fifth example is held out");
        let mut evaluation = plan(spec_toml, model.flat().unwrap());
        evaluation.task = Task::Evaluate;
        assert_eq!(confusion_cells(&evaluation).unwrap(), 4 + 9);
        let cells = p.confusions(&evaluation).unwrap();
        assert_eq!(cells.len(), 13);
        assert_eq!(cells[..4].iter().sum::<u64>(), 2, "the two held-out examples");
        assert!(cells[4..].iter().all(|c| *c == 0), "head b is not labelled here");
        let mut plain = Trainer::with_heads(
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
        let p = Trainer::with_heads(
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

    #[test]
    fn refuses_bad_plans() {
        let spec_toml = "name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let data = Dataset::new(vec![1.0, 0.0], vec![2], vec![0], 2).unwrap();
        let mut p = Trainer::new("c1", Arc::new(data), Device::Cpu);
        assert!(matches!(p.train(&plan(spec_toml, vec![0.0; 5])), Err(TrainerError::BadPlan(_))));
        assert!(matches!(p.train(&plan(spec_toml, vec![f32::NAN; 6])), Err(TrainerError::BadPlan(_))));
        assert!(matches!(p.train(&plan("nonsense", vec![0.0; 6])), Err(TrainerError::BadPlan(_))));
        let wrong_shape = "name='t'\ninput_shape=[3]\n[[heads]]\nname='y'\nclasses=2";
        assert!(p.train(&plan(wrong_shape, vec![0.0; 8])).is_err());
        // A model of declared parameters: candle cannot run it, and the reason says who can.
        let declared = "name='d'\n[[parameters]]\nname='w'\nshape=[2]\n[[heads]]\nname='y'\nclasses=2";
        let refused = p.train(&plan(declared, vec![0.0; 2])).unwrap_err().to_string();
        assert!(refused.contains("declares its parameters only") && refused.contains("Python"), "{refused}");
    }
}
