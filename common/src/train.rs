//! Local training and evaluation on candle.
//!
//! [`train`] runs SGD (learning rate, momentum, weight decay) for E epochs with batch size B
//! over a seeded shuffle; the loss is cross-entropy (optionally class-weighted). [`evaluate`]
//! computes the loss and the [`Metrics`] that show imbalance honestly: accuracy next to balanced
//! accuracy, macro-F1, per-class recall and the confusion matrix.
//!
//! Both are blocking and CPU- or GPU-heavy: async callers run them on a blocking thread
//! (`tokio::task::spawn_blocking`), never on the runtime.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::model::{Model, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training configuration: {0}")]
    Config(String),
    #[error("the data do not fit the model: {0}")]
    Data(String),
    #[error("training diverged: the loss became {0}; lower the learning rate")]
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
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { epochs: 1, batch_size: 10, lr: 0.05, momentum: 0.0, weight_decay: 0.0 }
    }
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
        Ok(())
    }
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
        Ok(Self { features, labels, len: data.len(), classes: data.classes })
    }

    fn batch(&self, indices: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(indices, indices.len(), device)?;
        Ok((self.features.index_select(&idx, 0)?, self.labels.index_select(&idx, 0)?))
    }
}

/// Cross-entropy with optional per-class weights: PyTorch's `weight=` with mean reduction
/// (sum of weighted losses divided by the sum of the weights of the batch's targets).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, class_weights: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    match class_weights {
        None => picked.mean_all()?.neg(),
        Some(w) => {
            let wt = w.index_select(targets, 0)?;
            (picked * &wt)?.sum_all()?.neg()?.broadcast_div(&wt.sum_all()?)
        }
    }
}

/// SGD with momentum and weight decay (PyTorch's formulation).
struct Sgd {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<Option<Tensor>>,
}

impl Sgd {
    fn step(&mut self, vars: &[Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (var, velocity) in vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
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
        Ok(())
    }
}

/// Trains head `head` of `model` (and the trunk) on `data` in place.
pub fn train(model: &Model, head: usize, data: &DeviceData, config: &TrainConfig, seed: u64) -> Result<TrainStats> {
    config.check()?;
    let spec_head =
        model.spec().heads.get(head).ok_or_else(|| TrainError::Data(format!("the model has no head number {head}")))?;
    if data.classes > spec_head.classes {
        return Err(TrainError::Data(format!(
            "the data have {} classes, head `{}` has {}",
            data.classes, spec_head.name, spec_head.classes
        )));
    }
    if data.len == 0 {
        return Err(TrainError::Data("no training examples".into()));
    }
    let vars = model.vars();
    let mut sgd = Sgd {
        lr: config.lr,
        momentum: config.momentum,
        weight_decay: config.weight_decay,
        velocity: vec![None; vars.len()],
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..data.len as u32).collect();
    let (mut steps, mut loss_sum, mut examples) = (0usize, 0f64, 0usize);
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(config.batch_size) {
            let (x, y) = data.batch(chunk, model.device())?;
            let logits = model.forward_head(&x, head, true)?;
            let loss = cross_entropy(&logits, &y, None)?;
            let grads = loss.backward()?;
            sgd.step(vars, &grads)?;
            let l = loss.to_scalar::<f32>()?;
            if !l.is_finite() {
                return Err(TrainError::Diverged(l));
            }
            loss_sum += l as f64 * chunk.len() as f64;
            examples += chunk.len();
            steps += 1;
        }
    }
    Ok(TrainStats { steps, examples, mean_loss: (loss_sum / examples as f64) as f32 })
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
    let classes = model
        .spec()
        .heads
        .get(head)
        .ok_or_else(|| TrainError::Data(format!("the model has no head number {head}")))?
        .classes;
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0f64;
    let mut start = 0;
    while start < data.len {
        let len = batch_size.max(1).min(data.len - start);
        let x = data.features.narrow(0, start, len)?;
        let y = data.labels.narrow(0, start, len)?;
        let logits = model.forward_head(&x, head, false)?;
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
        let cfg = TrainConfig { epochs: 20, batch_size: 10, lr: 0.1, momentum: 0.9, weight_decay: 1e-4 };
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
        ] {
            assert!(cfg.check().is_err(), "{cfg:?}");
        }
    }
}
