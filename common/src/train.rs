//! Local training and evaluation on candle.
//!
//! [`train_heads`] runs SGD (learning rate, momentum, weight decay) for E epochs with batch size
//! B over a seeded shuffle, on the trunk and every head the client labels at once (the sum of
//! the heads' losses), or in FedRep's order (`head_epochs`: heads first, then the trunk). Each
//! head's loss is cross-entropy with its own [`LossConfig`] (class weights, focal term or logit
//! adjustment, from the client's or the population's label counts). [`evaluate`] computes the
//! loss and the [`Metrics`] that show imbalance honestly: accuracy next to balanced accuracy,
//! macro-F1, per-class recall and the confusion matrix.
//!
//! Both are blocking and CPU- or GPU-heavy: async callers run them on a blocking thread
//! (`tokio::task::spawn_blocking`), never on the runtime.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::kernels::Workspace;
use crate::model::{HeadSpec, Model, ModelError, ModelSpec, Pass};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training configuration: {0}")]
    Config(String),
    #[error("the data do not fit the model: {0}")]
    Data(String),
    #[error(
        "training diverged: the loss became {0}. Likely causes: a learning rate too high for this data \
         (federation.train.lr), or, in a private federation, noise too large for the cohort (see the server's \
         warning about federation.dp.noise_multiplier and clients_per_round)"
    )]
    Diverged(f32),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, TrainError>;

fn default_batch() -> usize {
    10
}
fn default_epochs() -> usize {
    1
}
fn default_lr() -> f64 {
    0.05
}

/// Local training hyper-parameters, sent to clients in every round plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// How the loss treats imbalanced classes, for every head without its own `head_loss`.
    #[serde(default)]
    pub loss: LossConfig,
    /// `[federation.train.head_loss.NAME]`: head NAME's own loss options, instead of `loss`.
    #[serde(default)]
    pub head_loss: BTreeMap<String, LossConfig>,
    /// FedRep's schedule (Collins et al. 2021): each round first trains only the heads for
    /// `head_epochs` epochs, the trunk frozen, then only the trunk for `epochs` epochs, the heads
    /// frozen. Absent: trunk and heads train together for `epochs`.
    #[serde(default)]
    pub head_epochs: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 10,
            lr: 0.05,
            momentum: 0.0,
            weight_decay: 0.0,
            loss: LossConfig::default(),
            head_loss: BTreeMap::new(),
            head_epochs: None,
        }
    }
}

/// How the classes of a loss are weighed against imbalance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeighting {
    #[default]
    None,
    /// w_c = n / (K n_c): each present class weighs as much in total.
    InverseFrequency,
    /// Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta^n_c), the inverse of the
    /// "effective number" of examples.
    EffectiveNumber,
}

fn beta() -> f64 {
    0.999
}

/// `[federation.train.loss]`: class weights, the focal term, or logit adjustment. Weights come
/// from the training client's own label counts. The defaults train plain cross-entropy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    #[serde(default)]
    pub weighting: ClassWeighting,
    /// beta of `effective_number`.
    #[serde(default = "beta")]
    pub beta: f64,
    /// gamma of the focal term (Lin et al. 2017; 2 is their default): (1 - p)^gamma scales
    /// each example's loss. Absent: no focal term.
    #[serde(default)]
    pub focal_gamma: Option<f64>,
    /// tau of logit adjustment (Menon et al. 2021; 1 is their default): the loss sees
    /// `logits + tau log(prior)`, predictions the raw logits. An alternative to class weights.
    #[serde(default)]
    pub logit_adjustment: Option<f64>,
    /// Whose label counts the weights (or the prior) come from.
    #[serde(default)]
    pub scope: CountScope,
    /// With `scope = "global"`: count the population's labels again every this many rounds
    /// (absent: once, before the first round).
    #[serde(default)]
    pub recount_every: Option<u64>,
}

/// Where class weights come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountScope {
    /// Each client's own label counts.
    #[default]
    Local,
    /// The population's, summed by a secure-aggregation round (no one learns another client's).
    Global,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            weighting: ClassWeighting::None,
            beta: beta(),
            focal_gamma: None,
            logit_adjustment: None,
            scope: CountScope::Local,
            recount_every: None,
        }
    }
}

impl LossConfig {
    /// Checks the ranges; `place` names the table in messages (`loss`, `head_loss.digit`).
    pub fn check(&self, place: &str) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !(0.0..1.0).contains(&self.beta) {
            return bad(format!("{place}.beta = {} must be in [0, 1)", self.beta));
        }
        if let Some(g) = self.focal_gamma.filter(|g| !(g.is_finite() && *g >= 0.0)) {
            return bad(format!("{place}.focal_gamma = {g} must be zero or positive"));
        }
        if let Some(t) = self.logit_adjustment {
            if !(t.is_finite() && t >= 0.0) {
                return bad(format!("{place}.logit_adjustment = {t} must be zero or positive"));
            }
            if self.weighting != ClassWeighting::None {
                return bad(format!(
                    "{place}.logit_adjustment is an alternative to class weights: set {place}.weighting = \"none\""
                ));
            }
        }
        if self.recount_every == Some(0) {
            return bad(format!("{place}.recount_every must be at least 1"));
        }
        Ok(())
    }
}

/// Per-class loss weights from label counts. Classes with no examples get weight 0 (never NaN);
/// the weights of the present classes sum to their number, so the loss keeps its scale.
pub fn class_weights(counts: &[u64], weighting: ClassWeighting, beta: f64) -> Vec<f32> {
    let present = counts.iter().filter(|&&n| n > 0).count();
    if present == 0 {
        return vec![0.0; counts.len()];
    }
    let raw: Vec<f64> = counts
        .iter()
        .map(|&n| match (weighting, n) {
            (_, 0) => 0.0,
            (ClassWeighting::None, _) => 1.0,
            (ClassWeighting::InverseFrequency, n) => 1.0 / n as f64,
            (ClassWeighting::EffectiveNumber, n) => (1.0 - beta) / (1.0 - beta.powf(n as f64)),
        })
        .collect();
    let scale = present as f64 / raw.iter().sum::<f64>();
    raw.iter().map(|w| (w * scale) as f32).collect()
}

/// `tau log(prior)` per class, from label counts; a class with no examples counts as one so
/// the shift stays finite.
pub fn logit_shift(counts: &[u64], tau: f64) -> Vec<f32> {
    let n: u64 = counts.iter().map(|&c| c.max(1)).sum();
    counts.iter().map(|&c| (tau * (c.max(1) as f64 / n as f64).ln()) as f32).collect()
}

impl TrainConfig {
    /// Checks the ranges; `place` names where the values came from.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.epochs == 0 || self.epochs > 10_000 {
            return bad(format!("epochs = {} must be in 1..=10000", self.epochs));
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return bad(format!("batch_size = {} must be in 1..=1048576", self.batch_size));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr = {} must be > 0", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum = {} must be in [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay = {} must be >= 0", self.weight_decay));
        }
        if let Some(h) = self.head_epochs.filter(|h| *h == 0 || *h > 10_000) {
            return bad(format!(
                "head_epochs = {h} must be in 1..=10000 (leave it out to train trunk and heads together)"
            ));
        }
        self.loss.check("loss")?;
        for (head, loss) in &self.head_loss {
            loss.check(&format!("head_loss.{head}"))?;
        }
        Ok(())
    }

    /// Checks that every `head_loss` names a head of `spec`.
    pub fn check_heads(&self, spec: &ModelSpec) -> Result<()> {
        match self.head_loss.keys().find(|name| spec.head_index(name).is_none()) {
            Some(name) => Err(TrainError::Config(format!(
                "head_loss.{name}: the model `{}` has no head `{name}`; its heads are {}",
                spec.name,
                spec.heads.iter().map(|h| format!("`{}`", h.name)).collect::<Vec<_>>().join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// The loss options of head `name`.
    pub fn loss_for(&self, name: &str) -> &LossConfig {
        self.head_loss.get(name).unwrap_or(&self.loss)
    }

    /// The heads whose class weights come from the population (`scope = "global"`), with their
    /// classes, in the model's order: what a label census counts, one histogram after another.
    pub fn census_heads<'s>(&self, spec: &'s ModelSpec) -> Vec<&'s HeadSpec> {
        spec.heads.iter().filter(|h| self.loss_for(&h.name).scope == CountScope::Global).collect()
    }

    /// How often the label census is repeated: the shortest `recount_every` of the heads it counts.
    pub fn recount_every(&self, spec: &ModelSpec) -> Option<u64> {
        self.census_heads(spec).iter().filter_map(|h| self.loss_for(&h.name).recount_every).min()
    }
}

/// The population's label counts of head `head` in a census vector over `census_heads`.
pub fn census_slice<'c>(census: &'c [u64], heads: &[&HeadSpec], head: &str) -> Option<&'c [u64]> {
    let mut start = 0;
    for h in heads {
        if h.name == head {
            return census.get(start..start + h.classes);
        }
        start += h.classes;
    }
    None
}

/// What a local training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStats {
    pub steps: usize,
    pub examples: usize,
    pub mean_loss: f32,
}

/// A data set placed on a device as tensors, ready for batching.
pub struct DeviceData {
    features: Tensor,
    labels: Tensor,
    len: usize,
    classes: usize,
    /// Examples per class (for class weights).
    counts: Vec<u64>,
}

impl DeviceData {
    pub fn new(data: &Dataset, model: &Model) -> Result<Self> {
        let spec = &model.spec().input_shape;
        if &data.feature_shape != spec {
            return Err(TrainError::Data(format!(
                "examples have shape {:?}, the model `{}` expects {:?}",
                data.feature_shape,
                model.spec().name,
                spec
            )));
        }
        let mut shape = vec![data.len()];
        shape.extend_from_slice(&data.feature_shape);
        let features = Tensor::from_slice(&data.features, shape.as_slice(), model.device())?;
        let labels = Tensor::from_slice(&data.labels, data.len(), model.device())?;
        let mut counts = vec![0u64; data.classes];
        for &l in &data.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        Ok(Self { features, labels, len: data.len(), classes: data.classes, counts })
    }

    fn batch(&self, indices: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(indices, indices.len(), device)?;
        Ok((self.features.index_select(&idx, 0)?, self.labels.index_select(&idx, 0)?))
    }
}

/// Cross-entropy with optional per-class weights: PyTorch's `weight=` with mean reduction
/// (sum of weighted losses divided by the sum of the weights of the batch's targets).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, class_weights: Option<&Tensor>) -> candle_core::Result<Tensor> {
    imbalanced_loss(logits, targets, class_weights, None, None)
}

/// Cross-entropy with the options of [`LossConfig`]: per-class weights (weighted mean as in
/// [`cross_entropy`]), the focal term `(1 - p)^gamma`, and a per-class shift added to the logits
/// (logit adjustment).
pub fn imbalanced_loss(
    logits: &Tensor,
    targets: &Tensor,
    class_weights: Option<&Tensor>,
    focal_gamma: Option<f64>,
    logit_shift: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let focal = focal_gamma.is_some_and(|gamma| gamma > 0.0);
    if logits.device().is_cpu() && !focal && logit_shift.is_none() {
        // One pass over the logits instead of eight candle ops, forward and backward.
        return crate::kernels::cross_entropy(logits, targets, class_weights);
    }
    let logits = match logit_shift {
        Some(shift) => logits.broadcast_add(shift)?,
        None => logits.clone(),
    };
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let per_example = match focal_gamma {
        Some(gamma) if gamma > 0.0 => {
            let modulation = (1.0 - picked.exp()?)?.clamp(0.0, 1.0)?.powf(gamma)?;
            (picked * modulation)?
        }
        _ => picked,
    };
    match class_weights {
        None => per_example.mean_all()?.neg(),
        Some(w) => {
            let wt = w.index_select(targets, 0)?;
            // A batch of weightless classes only: divide by one rather than zero.
            let total = wt.sum_all()?.maximum(1e-12)?;
            (per_example * &wt)?.sum_all()?.neg()?.broadcast_div(&total)
        }
    }
}

/// SGD with momentum and weight decay (PyTorch's formulation).
struct Sgd {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<Velocity>,
}

/// A variable's momentum: on the CPU a plain buffer the kernel updates in place (empty before
/// the first step), on a GPU a tensor.
enum Velocity {
    Host(Vec<f32>),
    Device(Option<Tensor>),
}

impl Sgd {
    /// Steps the variables `vars[trainable]`; the others stay as they are. On the CPU a
    /// variable's gradient is in `workspace` (written there by the kernels), in `grads` (from
    /// candle's own ops), or, should a variable meet both, their sum.
    fn step(
        &mut self,
        vars: &[Var],
        trainable: Range<usize>,
        grads: &candle_core::backprop::GradStore,
        workspace: Option<&Workspace>,
    ) -> Result<()> {
        for (var, velocity) in vars[trainable.clone()].iter().zip(self.velocity[trainable].iter_mut()) {
            let from_candle = grads.get(var.as_tensor());
            match velocity {
                Velocity::Host(velocity) => {
                    let (lr, momentum, weight_decay) = (self.lr, self.momentum, self.weight_decay);
                    let mut update =
                        |grad: &[f32]| crate::kernels::sgd_step(var, grad, velocity, lr, momentum, weight_decay);
                    let from_candle = from_candle.map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose()?;
                    let kept = workspace.and_then(|w| {
                        w.take_gradient(var.as_tensor(), |kept| match &from_candle {
                            Some(more) => update(&kept.iter().zip(more).map(|(a, b)| a + b).collect::<Vec<_>>()),
                            None => update(kept),
                        })
                    });
                    match (kept, from_candle) {
                        (Some(done), _) => done?,
                        (None, Some(grad)) => update(&grad)?,
                        (None, None) => {}
                    }
                }
                Velocity::Device(velocity) => {
                    let Some(grad) = from_candle else { continue };
                    let mut g = grad.clone();
                    if self.weight_decay > 0.0 {
                        g = (g + (var.as_tensor() * self.weight_decay)?)?;
                    }
                    if self.momentum > 0.0 {
                        let v = match velocity.take() {
                            Some(v) => ((v * self.momentum)? + g)?,
                            None => g,
                        };
                        g = v.clone();
                        *velocity = Some(v);
                    }
                    var.set(&(var.as_tensor() - (g * self.lr)?)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Trains head `head` of `model` (and the trunk) on `data` in place.
pub fn train(model: &Model, head: usize, data: &DeviceData, config: &TrainConfig, seed: u64) -> Result<TrainStats> {
    train_heads(model, &[(head, data)], config, seed, None)
}

/// One head's part of a training run: its data, its loss options, its shuffled order.
struct HeadTask<'a> {
    head: usize,
    data: &'a DeviceData,
    loss_weight: f64,
    weights: Option<Tensor>,
    focal_gamma: Option<f64>,
    shift: Option<Tensor>,
    order: Vec<u32>,
}

impl<'a> HeadTask<'a> {
    /// `census`: the population's counts of [`TrainConfig::census_heads`]; this head's part
    /// replaces its own counts when its loss has `scope = "global"`.
    fn new(
        model: &Model,
        head: usize,
        data: &'a DeviceData,
        config: &TrainConfig,
        census: Option<&[u64]>,
    ) -> Result<Self> {
        let spec = model.spec();
        let spec_head =
            spec.heads.get(head).ok_or_else(|| TrainError::Data(format!("the model has no head number {head}")))?;
        let loss = config.loss_for(&spec_head.name);
        if data.classes > spec_head.classes {
            return Err(TrainError::Data(format!(
                "the data have {} classes, head `{}` has {}",
                data.classes, spec_head.name, spec_head.classes
            )));
        }
        if data.len == 0 {
            return Err(TrainError::Data(format!("no training examples for head `{}`", spec_head.name)));
        }
        let population = census
            .filter(|_| loss.scope == CountScope::Global)
            .and_then(|c| census_slice(c, &config.census_heads(spec), &spec_head.name));
        let counts = population.unwrap_or(&data.counts[..]);
        let weights = match loss.weighting {
            ClassWeighting::None => None,
            w => {
                let mut weights = class_weights(counts, w, loss.beta);
                weights.resize(spec_head.classes, 0.0);
                Some(Tensor::from_slice(&weights, weights.len(), model.device())?)
            }
        };
        let shift = match loss.logit_adjustment {
            Some(tau) => {
                let mut shift = logit_shift(counts, tau);
                shift.resize(spec_head.classes, 0.0);
                Some(Tensor::from_slice(&shift, shift.len(), model.device())?)
            }
            None => None,
        };
        let order = (0..data.len as u32).collect();
        Ok(Self {
            head,
            data,
            loss_weight: spec_head.loss_weight as f64,
            weights,
            focal_gamma: loss.focal_gamma,
            shift,
            order,
        })
    }

    /// The `step`-th batch of this epoch; a head with fewer batches than the epoch has steps
    /// starts its own again.
    fn batch(&self, step: usize, batch_size: usize) -> &[u32] {
        let batches = self.order.len().div_ceil(batch_size);
        let start = (step % batches) * batch_size;
        &self.order[start..(start + batch_size).min(self.order.len())]
    }
}

/// Which parameters a stretch of epochs trains.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Together,
    /// FedRep's first part: the heads, on the frozen trunk's features.
    HeadsOnly,
    /// FedRep's second part: the trunk under frozen heads.
    TrunkOnly,
}

/// Trains the trunk and several heads at once, each on its own labelled data: every step takes a
/// batch of each head's data and descends the sum of their losses, weighted by the heads'
/// `loss_weight`. An epoch has as many steps as the largest head needs; smaller ones cycle.
/// Heads not listed get no gradient and stay as they are. `census` (the population's label
/// counts of [`TrainConfig::census_heads`], one after another) replaces a head's own counts
/// when its loss asks for `scope = "global"`. With `head_epochs`, FedRep's schedule: heads
/// first, then the trunk.
pub fn train_heads(
    model: &Model,
    heads: &[(usize, &DeviceData)],
    config: &TrainConfig,
    seed: u64,
    census: Option<&[u64]>,
) -> Result<TrainStats> {
    train_heads_observed(model, heads, config, seed, census, None)
}

/// Where a training run stands: `step` of `steps` optimizer steps done (every epoch of every
/// phase counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainProgress {
    pub step: usize,
    pub steps: usize,
}

/// [`train_heads`], telling `progress` after every step (for a data owner's progress display;
/// the observer should be cheap: it runs on the training thread).
pub fn train_heads_observed(
    model: &Model,
    heads: &[(usize, &DeviceData)],
    config: &TrainConfig,
    seed: u64,
    census: Option<&[u64]>,
    progress: Option<&(dyn Fn(TrainProgress) + Sync)>,
) -> Result<TrainStats> {
    train_run(model, heads, config, seed, census, progress, model.device().is_cpu())
}

/// [`train_heads_observed`]; with `keep_gradients`, the CPU kernels keep the parameters'
/// gradients in a [`Workspace`] rather than candle's `GradStore` (the tests compare the two).
fn train_run(
    model: &Model,
    heads: &[(usize, &DeviceData)],
    config: &TrainConfig,
    seed: u64,
    census: Option<&[u64]>,
    progress: Option<&(dyn Fn(TrainProgress) + Sync)>,
    keep_gradients: bool,
) -> Result<TrainStats> {
    config.check()?;
    if heads.is_empty() {
        return Err(TrainError::Data("no head to train".into()));
    }
    let mut tasks = heads
        .iter()
        .map(|&(head, data)| HeadTask::new(model, head, data, config, census))
        .collect::<Result<Vec<_>>>()?;
    let vars = model.vars();
    let trunk_vars = model.trunk_var_count();
    let mut sgd = Sgd {
        lr: config.lr,
        momentum: config.momentum,
        weight_decay: config.weight_decay,
        velocity: vars
            .iter()
            .map(|v| if v.device().is_cpu() { Velocity::Host(Vec::new()) } else { Velocity::Device(None) })
            .collect(),
    };
    // On the CPU the kernels keep the parameters' gradients and their scratch buffers here
    // between steps.
    let workspace = keep_gradients.then(|| Arc::new(Workspace::new()));
    let pass = Pass::Train(workspace.as_ref());
    let phases = match config.head_epochs {
        Some(h) => vec![(Phase::HeadsOnly, h), (Phase::TrunkOnly, config.epochs)],
        None => vec![(Phase::Together, config.epochs)],
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let steps_per_epoch = tasks.iter().map(|t| t.order.len().div_ceil(config.batch_size)).max().unwrap_or(0);
    let total_steps = steps_per_epoch * phases.iter().map(|(_, epochs)| *epochs).sum::<usize>();
    let (mut steps, mut examples) = (0usize, 0usize);
    // The loss is summed on the device and read once an epoch: reading it every step would stall
    // a GPU on a copy to the host.
    let mut loss_sum = Tensor::zeros((), DType::F32, model.device())?;
    let mut mean_loss = 0f32;
    for (phase, epochs) in phases {
        let trainable = match phase {
            Phase::Together => 0..vars.len(),
            Phase::HeadsOnly => trunk_vars..vars.len(),
            Phase::TrunkOnly => 0..trunk_vars,
        };
        for _ in 0..epochs {
            for task in &mut tasks {
                task.order.shuffle(&mut rng);
            }
            for step in 0..steps_per_epoch {
                if let Some(w) = &workspace {
                    w.forget_gradients();
                }
                let mut total: Option<Tensor> = None;
                let mut seen = 0;
                for task in &tasks {
                    let chunk = task.batch(step, config.batch_size);
                    let (x, y) = task.data.batch(chunk, model.device())?;
                    let logits = if phase == Phase::HeadsOnly {
                        // No gradient through the frozen trunk.
                        let features = model.forward_trunk(&x, pass)?.detach();
                        model.forward_head_from(&features, task.head, pass)?
                    } else {
                        model.forward_head(&x, task.head, pass)?
                    };
                    let mut loss =
                        imbalanced_loss(&logits, &y, task.weights.as_ref(), task.focal_gamma, task.shift.as_ref())?;
                    if task.loss_weight != 1.0 {
                        loss = (loss * task.loss_weight)?;
                    }
                    total = Some(match total {
                        Some(t) => (t + loss)?,
                        None => loss,
                    });
                    seen += chunk.len();
                }
                let total = total.expect("at least one head");
                let grads = total.backward()?;
                sgd.step(vars, trainable.clone(), &grads, workspace.as_deref())?;
                loss_sum = (loss_sum + (total.detach() * seen as f64)?)?;
                examples += seen;
                steps += 1;
                if let Some(progress) = progress {
                    progress(TrainProgress { step: steps, steps: total_steps });
                }
            }
            mean_loss = loss_sum.to_scalar::<f32>()? / examples as f32;
            if !mean_loss.is_finite() {
                return Err(TrainError::Diverged(mean_loss));
            }
        }
    }
    Ok(TrainStats { steps, examples, mean_loss })
}

/// Per-class recall for people: `[0.98 0.97 ...]`.
pub fn per_class(recall: &[f64]) -> String {
    let values: Vec<String> = recall.iter().map(|r| format!("{r:.2}")).collect();
    format!("[{}]", values.join(" "))
}

/// Evaluation results of one head on one data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
    /// Mean recall over the classes that occur in the data.
    pub balanced_accuracy: f64,
    /// Mean F1 over the classes that occur in the data or the predictions.
    pub macro_f1: f64,
    /// Recall of each class (`NaN`-free: 0 for classes with no examples).
    pub per_class_recall: Vec<f64>,
    /// `confusion[truth][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

impl Metrics {
    /// Metrics from a confusion matrix and a summed loss.
    pub fn from_confusion(confusion: Vec<Vec<u64>>, loss_sum: f64) -> Self {
        let k = confusion.len();
        let n: u64 = confusion.iter().flatten().sum();
        let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();
        let support: Vec<u64> = confusion.iter().map(|row| row.iter().sum()).collect();
        let predicted: Vec<u64> = (0..k).map(|j| confusion.iter().map(|row| row[j]).sum()).collect();
        let per_class_recall: Vec<f64> =
            (0..k).map(|i| if support[i] == 0 { 0.0 } else { confusion[i][i] as f64 / support[i] as f64 }).collect();
        let present: Vec<usize> = (0..k).filter(|&i| support[i] > 0).collect();
        let balanced_accuracy = if present.is_empty() {
            0.0
        } else {
            present.iter().map(|&i| per_class_recall[i]).sum::<f64>() / present.len() as f64
        };
        let f1_classes: Vec<usize> = (0..k).filter(|&i| support[i] > 0 || predicted[i] > 0).collect();
        let macro_f1 = if f1_classes.is_empty() {
            0.0
        } else {
            f1_classes
                .iter()
                .map(|&i| {
                    let tp = confusion[i][i] as f64;
                    let denom = (support[i] + predicted[i]) as f64;
                    if denom == 0.0 {
                        0.0
                    } else {
                        2.0 * tp / denom
                    }
                })
                .sum::<f64>()
                / f1_classes.len() as f64
        };
        Metrics {
            examples: n,
            loss: if n == 0 { 0.0 } else { loss_sum / n as f64 },
            accuracy: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
            balanced_accuracy,
            macro_f1,
            per_class_recall,
            confusion,
        }
    }
}

/// Evaluates head `head` on `data` in batches of `batch_size`.
pub fn evaluate(model: &Model, head: usize, data: &DeviceData, batch_size: usize) -> Result<Metrics> {
    let spec_head =
        model.spec().heads.get(head).ok_or_else(|| TrainError::Data(format!("the model has no head number {head}")))?;
    let classes = spec_head.classes;
    if data.classes > classes {
        return Err(TrainError::Data(format!(
            "the data have {} classes, head `{}` has {classes}; map the labels onto the head's classes",
            data.classes, spec_head.name
        )));
    }
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0f64;
    let mut start = 0;
    while start < data.len {
        let len = batch_size.max(1).min(data.len - start);
        let x = data.features.narrow(0, start, len)?;
        let y = data.labels.narrow(0, start, len)?;
        let logits = model.forward_head(&x, head, Pass::Evaluate)?;
        loss_sum += cross_entropy(&logits, &y, None)?.to_scalar::<f32>()? as f64 * len as f64;
        let predicted = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let truth = y.to_vec1::<u32>()?;
        for (t, p) in truth.iter().zip(&predicted) {
            confusion[*t as usize][*p as usize] += 1;
        }
        start += len;
    }
    Ok(Metrics::from_confusion(confusion, loss_sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;

    #[test]
    fn evaluating_data_with_more_classes_than_the_head_is_an_error() {
        let spec = ModelSpec::from_toml("name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2").unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let data = Dataset::new(vec![0.1, 0.2, 0.3, 0.4], vec![2], vec![0, 4], 5).unwrap();
        let err = evaluate(&model, 0, &DeviceData::new(&data, &model).unwrap(), 8).unwrap_err().to_string();
        assert!(err.contains("5 classes") && err.contains("`y` has 2"), "{err}");
    }

    #[test]
    fn metrics_from_a_hand_made_confusion_matrix() {
        // truth 0: 8 right, 2 as class 1; truth 1: 1 right, 1 as class 0; class 2 absent.
        let m = Metrics::from_confusion(vec![vec![8, 2, 0], vec![1, 1, 0], vec![0, 0, 0]], 6.0);
        assert_eq!(m.examples, 12);
        assert!((m.accuracy - 9.0 / 12.0).abs() < 1e-12);
        assert!((m.balanced_accuracy - (0.8 + 0.5) / 2.0).abs() < 1e-12);
        let f1_0 = 2.0 * 8.0 / (10.0 + 9.0);
        let f1_1 = 2.0 * 1.0 / (2.0 + 3.0);
        assert!((m.macro_f1 - (f1_0 + f1_1) / 2.0).abs() < 1e-12);
        assert_eq!(m.per_class_recall, vec![0.8, 0.5, 0.0]);
        assert!((m.loss - 0.5).abs() < 1e-12);
    }

    #[test]
    fn weighted_cross_entropy_matches_pytorch_definition() {
        let logits = Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 3.0], &Device::Cpu).unwrap();
        let l0 = -(2f32.exp() / (2f32.exp() + 1.0)).ln();
        let l1 = -(1f32.exp() / (1f32.exp() + 1.0)).ln();
        let plain = cross_entropy(&logits, &targets, None).unwrap().to_scalar::<f32>().unwrap();
        assert!((plain - (l0 + l1) / 2.0).abs() < 1e-6);
        let weighted = cross_entropy(&logits, &targets, Some(&w)).unwrap().to_scalar::<f32>().unwrap();
        assert!((weighted - (l0 + 3.0 * l1) / 4.0).abs() < 1e-6);
    }

    #[test]
    fn training_learns_a_separable_problem() {
        let spec = ModelSpec::from_toml("name='t'\ninput_shape=[2]\n[[trunk]]\nkind='linear'\nout=8\n[[trunk]]\nkind='relu'\n[[heads]]\nname='y'\nclasses=2").unwrap();
        let model = Model::new(&spec, &Device::Cpu, 5).unwrap();
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let x = (i as f32 / 100.0) - 1.0;
            features.extend_from_slice(&[x, 0.5]);
            labels.push(u32::from(x > 0.0));
        }
        let ds = Dataset::new(features, vec![2], labels, 2).unwrap();
        let dd = DeviceData::new(&ds, &model).unwrap();
        let before = evaluate(&model, 0, &dd, 64).unwrap();
        let cfg = TrainConfig {
            epochs: 20,
            batch_size: 10,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            ..Default::default()
        };
        let stats = train(&model, 0, &dd, &cfg, 1).unwrap();
        assert_eq!(stats.steps, 20 * 20);
        let after = evaluate(&model, 0, &dd, 64).unwrap();
        assert!(after.accuracy > 0.95, "accuracy {}", after.accuracy);
        assert!(after.loss < before.loss);
    }

    #[test]
    fn bad_configs_are_refused() {
        for cfg in [
            TrainConfig { epochs: 0, ..Default::default() },
            TrainConfig { lr: f64::NAN, ..Default::default() },
            TrainConfig { momentum: 1.5, ..Default::default() },
            TrainConfig { batch_size: 0, ..Default::default() },
            TrainConfig { loss: LossConfig { beta: 1.0, ..Default::default() }, ..Default::default() },
            TrainConfig { loss: LossConfig { focal_gamma: Some(-1.0), ..Default::default() }, ..Default::default() },
            TrainConfig {
                loss: LossConfig {
                    weighting: ClassWeighting::InverseFrequency,
                    logit_adjustment: Some(1.0),
                    ..Default::default()
                },
                ..Default::default()
            },
            TrainConfig { head_epochs: Some(0), ..Default::default() },
        ] {
            assert!(cfg.check().is_err(), "{cfg:?}");
        }
        let mut cfg = TrainConfig::default();
        cfg.head_loss.insert("digit".into(), LossConfig { beta: 1.0, ..Default::default() });
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("head_loss.digit.beta = 1"), "{err}");
        let spec = two_heads();
        cfg.head_loss = BTreeMap::from([("colour".into(), LossConfig::default())]);
        let err = cfg.check_heads(&spec).unwrap_err().to_string();
        assert!(err.contains("head_loss.colour") && err.contains("`a`, `b`"), "{err}");
    }

    /// A trunk and two heads over two features.
    fn two_heads() -> ModelSpec {
        ModelSpec::from_toml(
            "name='t'\ninput_shape=[2]\n[[trunk]]\nkind='linear'\nout=4\n[[trunk]]\nkind='relu'\n\
             [[heads]]\nname='a'\nclasses=2\n[[heads]]\nname='b'\nclasses=3",
        )
        .unwrap()
    }

    /// `n` examples over two features with labels `label(i)`.
    fn examples(n: usize, classes: usize, label: impl Fn(usize) -> u32) -> Dataset {
        let features = (0..n).flat_map(|i| [(i as f32 / n as f32) - 0.5, ((i * 7) % 5) as f32 / 5.0]).collect();
        Dataset::new(features, vec![2], (0..n).map(label).collect(), classes).unwrap()
    }

    #[test]
    fn each_head_has_its_own_loss_options() {
        let spec = two_heads();
        let a = examples(30, 2, |i| u32::from(i % 2 == 0));
        let b = examples(40, 3, |i| if i % 10 == 0 { 2 } else { (i % 2) as u32 });
        let trained = |cfg: &TrainConfig, census: Option<&[u64]>| {
            let model = Model::new(&spec, &Device::Cpu, 5).unwrap();
            let (da, db) = (DeviceData::new(&a, &model).unwrap(), DeviceData::new(&b, &model).unwrap());
            train_heads(&model, &[(0, &da), (1, &db)], cfg, 1, census).unwrap();
            model.flat().unwrap()
        };
        let inverse = LossConfig { weighting: ClassWeighting::InverseFrequency, ..Default::default() };
        let plain = TrainConfig { epochs: 2, batch_size: 8, lr: 0.1, ..Default::default() };
        // `b` weighted, `a` plain: said either way round, the same training.
        let b_weighted = TrainConfig { head_loss: BTreeMap::from([("b".into(), inverse)]), ..plain.clone() };
        let a_plain = TrainConfig {
            loss: inverse,
            head_loss: BTreeMap::from([("a".into(), LossConfig::default())]),
            ..plain.clone()
        };
        assert_eq!(trained(&b_weighted, None), trained(&a_plain, None));
        assert_ne!(trained(&b_weighted, None), trained(&plain, None));
        // Only `b` has global scope: the census holds its 3 counts alone, and its own counts as
        // the population give the local weights.
        let b_global = TrainConfig {
            head_loss: BTreeMap::from([("b".into(), LossConfig { scope: CountScope::Global, ..inverse })]),
            ..plain.clone()
        };
        let heads = b_global.census_heads(&spec);
        assert_eq!(heads.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(census_slice(&[1, 2, 3], &heads, "b"), Some(&[1u64, 2, 3][..]));
        assert_eq!(census_slice(&[1, 2, 3], &heads, "a"), None);
        assert_eq!(trained(&b_global, Some(&b.label_counts())), trained(&b_weighted, None));
        assert_eq!(trained(&b_global, Some(&[100, 100, 100])), trained(&plain, None));
        // Both heads global: the census is `a`'s histogram, then `b`'s.
        let both = TrainConfig { loss: LossConfig { scope: CountScope::Global, ..inverse }, ..plain.clone() };
        assert_eq!(both.census_heads(&spec).len(), 2);
        let mut census = a.label_counts();
        census.extend(b.label_counts());
        assert_eq!(trained(&both, Some(&census)), trained(&TrainConfig { loss: inverse, ..plain.clone() }, None));
    }

    #[test]
    fn gradients_kept_in_the_workspace_train_exactly_as_candles_gradstore() {
        // A convolution (ReLU and pooling fused in) and dense layers in the trunk, two heads so
        // the trunk is used twice a step (its gradients must be summed over both), momentum and
        // weight decay (the velocity kept across steps), and FedRep's phases (the frozen part's
        // gradients must be dropped, not carried into the next step).
        let spec = ModelSpec::from_toml(
            "name='c'\ninput_shape=[1,6,6]\n[[trunk]]\nkind='conv2d'\nout_channels=3\nkernel=3\npadding=1\n\
             [[trunk]]\nkind='relu'\n[[trunk]]\nkind='max_pool2d'\nsize=2\n[[trunk]]\nkind='flatten'\n\
             [[trunk]]\nkind='linear'\nout=8\n[[trunk]]\nkind='relu'\n\
             [[heads]]\nname='a'\nclasses=2\n[[heads]]\nname='b'\nclasses=3",
        )
        .unwrap();
        let images = |n: usize, classes: usize, salt: usize| {
            let features = (0..n * 36).map(|i| ((i * 37 + salt) % 23) as f32 / 23.0 - 0.4).collect();
            let labels = (0..n).map(|i| ((i * 5 + salt) % classes) as u32).collect();
            Dataset::new(features, vec![1, 6, 6], labels, classes).unwrap()
        };
        let (a, b) = (images(24, 2, 1), images(30, 3, 2));
        for head_epochs in [None, Some(1)] {
            let config = TrainConfig {
                epochs: 2,
                head_epochs,
                batch_size: 7,
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 0.01,
                ..Default::default()
            };
            let trained = |keep: bool| {
                let model = Model::new(&spec, &Device::Cpu, 3).unwrap();
                let (da, db) = (DeviceData::new(&a, &model).unwrap(), DeviceData::new(&b, &model).unwrap());
                let stats = train_run(&model, &[(0, &da), (1, &db)], &config, 4, None, None, keep).unwrap();
                (model.flat().unwrap(), stats.mean_loss)
            };
            let ((kept, kept_loss), (reference, reference_loss)) = (trained(true), trained(false));
            let start = Model::new(&spec, &Device::Cpu, 3).unwrap().flat().unwrap();
            let moved = start.iter().zip(&reference).map(|(s, r)| (s - r).abs()).fold(0f32, f32::max);
            assert!(moved > 1e-2, "the reference training barely moved ({moved})");
            let worst = kept.iter().zip(&reference).map(|(k, r)| (k - r).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5, "FedRep {head_epochs:?}: parameters differ by {worst}");
            assert!((kept_loss - reference_loss).abs() <= 1e-5, "losses {kept_loss} and {reference_loss}");
        }
    }

    #[test]
    fn fedrep_trains_the_heads_on_the_frozen_trunk_then_the_trunk_under_frozen_heads() {
        let spec = two_heads();
        let b = examples(40, 3, |i| (i % 3) as u32);
        let fedrep = |trunk_epochs: usize| {
            let model = Model::new(&spec, &Device::Cpu, 5).unwrap();
            let data = DeviceData::new(&b, &model).unwrap();
            let cfg = TrainConfig {
                epochs: trunk_epochs,
                head_epochs: Some(3),
                batch_size: 8,
                lr: 0.2,
                ..Default::default()
            };
            let stats = train_heads(&model, &[(1, &data)], &cfg, 9, None).unwrap();
            assert_eq!(stats.steps, (3 + trunk_epochs) * 5);
            model
        };
        let initial = Model::new(&spec, &Device::Cpu, 5).unwrap();
        let (one, two) = (fedrep(1), fedrep(2));
        let segment = |m: &Model, name: &str| {
            let seg = m.layout().segments().iter().find(|s| s.name == name).unwrap().clone();
            m.flat().unwrap()[seg.offset..seg.offset + seg.len].to_vec()
        };
        // The trunk epochs leave the heads alone: one or two of them, the same heads.
        assert_eq!(segment(&one, "b"), segment(&two, "b"));
        assert_ne!(segment(&one, "b"), segment(&initial, "b"));
        assert_ne!(segment(&one, "trunk"), segment(&two, "trunk"));
        assert_ne!(segment(&one, "trunk"), segment(&initial, "trunk"));
        assert_eq!(segment(&one, "a"), segment(&initial, "a"));
        // The head epochs train on the initial trunk's features: the same as training a
        // trunk-less model on those features.
        let x = Tensor::from_slice(&b.features, (40, 2), &Device::Cpu).unwrap();
        let features =
            initial.forward_trunk(&x, Pass::Evaluate).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let probe_spec = ModelSpec::from_toml("name='p'\ninput_shape=[4]\n[[heads]]\nname='b'\nclasses=3").unwrap();
        let probe = Model::new(&probe_spec, &Device::Cpu, 0).unwrap();
        probe.set_flat(&segment(&initial, "b")).unwrap();
        let on_features = Dataset::new(features, vec![4], b.labels.clone(), 3).unwrap();
        let data = DeviceData::new(&on_features, &probe).unwrap();
        let cfg = TrainConfig { epochs: 3, batch_size: 8, lr: 0.2, ..Default::default() };
        train_heads(&probe, &[(0, &data)], &cfg, 9, None).unwrap();
        let probed = probe.flat().unwrap();
        let max_diff = probed.iter().zip(segment(&one, "b")).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-5, "the head epochs differ from a probe on frozen features by {max_diff}");
    }

    fn close(a: &[f32], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-5)
    }

    #[test]
    fn class_weights_match_hand_computed_values() {
        // Counts 10, 30, 0, 60: three present classes, so the weights sum to 3.
        let counts = [10, 30, 0, 60];
        // Inverse frequency: 1/10, 1/30, 1/60 scaled by 3 / (0.1 + 0.0333 + 0.01667) = 20.
        let inv = class_weights(&counts, ClassWeighting::InverseFrequency, 0.999);
        assert!(close(&inv, &[2.0, 2.0 / 3.0, 0.0, 1.0 / 3.0]), "{inv:?}");
        // Effective number with beta = 0.9: (1 - 0.9) / (1 - 0.9^n) = 0.15353, 0.10443, -, 0.10018;
        // scaled by 3 / 0.35814 to sum to 3: 1.2861, 0.8747, 0, 0.8392.
        let raw = [0.1 / (1.0 - 0.9f64.powi(10)), 0.1 / (1.0 - 0.9f64.powi(30)), 0.0, 0.1 / (1.0 - 0.9f64.powi(60))];
        let scale = 3.0 / raw.iter().sum::<f64>();
        let eff = class_weights(&counts, ClassWeighting::EffectiveNumber, 0.9);
        assert!(close(&eff, &raw.map(|r| r * scale)), "{eff:?}");
        assert!((eff[0] as f64 - 1.2861).abs() < 1e-3, "{eff:?}");
        assert!(close(&class_weights(&counts, ClassWeighting::None, 0.9), &[1.0, 1.0, 0.0, 1.0]));
        assert!(class_weights(&[0, 0], ClassWeighting::InverseFrequency, 0.9).iter().all(|w| *w == 0.0));
        let shift = logit_shift(&[1, 3, 0], 1.0);
        assert!(close(&shift, &[(0.2f64).ln(), (0.6f64).ln(), (0.2f64).ln()]), "{shift:?}");
    }

    #[test]
    fn focal_loss_matches_a_hand_computed_value() {
        let logits = Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 0], &Device::Cpu).unwrap();
        // p = softmax: 0.880797 for the first example, 0.268941 for the second.
        let (p1, p2) = (0.880797f64, 0.268941f64);
        let focal = |p: f64| -(1.0 - p).powi(2) * p.ln();
        let got = imbalanced_loss(&logits, &targets, None, Some(2.0), None).unwrap().to_scalar::<f32>().unwrap();
        let want = (focal(p1) + focal(p2)) / 2.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        // gamma = 0 is cross-entropy.
        let ce = imbalanced_loss(&logits, &targets, None, Some(0.0), None).unwrap().to_scalar::<f32>().unwrap();
        assert!((ce as f64 + (p1.ln() + p2.ln()) / 2.0).abs() < 1e-5);
        // Weighted focal: the second example weighs 3.
        let w = Tensor::new(&[1.0f32, 3.0], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let got = imbalanced_loss(&logits, &targets, Some(&w), Some(2.0), None).unwrap().to_scalar::<f32>().unwrap();
        let want = (focal(p1) + 3.0 * focal(1.0 - p2)) / 4.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        // A batch of weightless classes gives 0, not NaN.
        let zero = Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
        let got = imbalanced_loss(&logits, &targets, Some(&zero), None, None).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(got, 0.0);
    }

    #[test]
    fn global_scope_weighs_by_the_population_counts() {
        let spec = ModelSpec::from_toml("name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2").unwrap();
        let features: Vec<f32> = (0..40).flat_map(|i| [i as f32 / 40.0, 1.0]).collect();
        let labels: Vec<u32> = (0..40).map(|i| u32::from(i % 8 == 0)).collect();
        let ds = Dataset::new(features, vec![2], labels, 2).unwrap();
        let trained = |loss: LossConfig, population: Option<&[u64]>| {
            let model = Model::new(&spec, &Device::Cpu, 5).unwrap();
            let dd = DeviceData::new(&ds, &model).unwrap();
            let cfg = TrainConfig { epochs: 2, batch_size: 8, lr: 0.1, loss, ..Default::default() };
            train_heads(&model, &[(0, &dd)], &cfg, 1, population).unwrap();
            model.flat().unwrap()
        };
        let inverse = LossConfig { weighting: ClassWeighting::InverseFrequency, ..Default::default() };
        let global = LossConfig { scope: CountScope::Global, ..inverse };
        // A balanced population gives every class weight 1: plain cross-entropy.
        assert_eq!(trained(global, Some(&[500, 500])), trained(LossConfig::default(), None));
        // The client's own counts as the population: the local weights.
        assert_eq!(trained(global, Some(&[35, 5])), trained(inverse, None));
        assert_ne!(trained(global, Some(&[500, 500])), trained(inverse, None));
        // Without a census yet, or with local scope, the client's own counts.
        assert_eq!(trained(global, None), trained(inverse, None));
        assert_eq!(trained(inverse, Some(&[500, 500])), trained(inverse, None));
    }

    #[test]
    fn class_weights_lift_the_rare_class() {
        // 190 examples of class 0 and 10 of class 1, separable along the first feature.
        let spec = ModelSpec::from_toml("name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2").unwrap();
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let rare = i % 20 == 0;
            let x = if rare { 0.3 + (i as f32) / 2000.0 } else { -0.3 + (i as f32) / 1000.0 - 0.1 };
            features.extend_from_slice(&[x, 1.0]);
            labels.push(u32::from(rare));
        }
        let ds = Dataset::new(features, vec![2], labels, 2).unwrap();
        let recall_of_rare = |loss: LossConfig| {
            let model = Model::new(&spec, &Device::Cpu, 5).unwrap();
            let dd = DeviceData::new(&ds, &model).unwrap();
            let cfg = TrainConfig { epochs: 3, batch_size: 20, lr: 0.1, loss, ..Default::default() };
            train(&model, 0, &dd, &cfg, 1).unwrap();
            evaluate(&model, 0, &dd, 64).unwrap().per_class_recall[1]
        };
        let plain = recall_of_rare(LossConfig::default());
        let weighted = recall_of_rare(LossConfig { weighting: ClassWeighting::InverseFrequency, ..Default::default() });
        let adjusted = recall_of_rare(LossConfig { logit_adjustment: Some(1.0), ..Default::default() });
        assert!(
            weighted > plain && adjusted > plain,
            "rare-class recall: plain {plain}, weighted {weighted}, adjusted {adjusted}"
        );
    }
}
