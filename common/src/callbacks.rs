//! Training the data owner brings: the session's jobs answered by callbacks (`fit`, `evaluate`,
//! `label_counts`) instead of candle, for clients whose model is a PyTorch module, NumPy code or
//! anything else (the Python package `cohort` is the one caller today).
//!
//! [`CallbackTrainer`] is a [`JobRunner`](crate::trainer::JobRunner) like
//! [`Trainer`](crate::trainer::Trainer): the daemon runs it the same way, and everything after
//! the job (clipping, noise, quantization, masking, the ledger) is the session's, exactly as for a
//! candle client. What it owns is the translation both ways, and it trusts nothing the callbacks
//! return (parse, don't validate):
//!
//! - in: the plan's flat parameters cut into named tensors by the model's [`ParamLayout`] (with
//!   this client's own values of its personal heads), and the round's [`RoundSettings`];
//! - out: the tensors the callback returned, checked name by name against the layout (every one
//!   present, none unknown, each shape exact, every value finite), turned into `local - global`
//!   with personal heads kept here and zeroed in the update, heads this client does not label
//!   zeroed too; confusion matrices and label counts checked for size and assembled in the
//!   model's head order.
//!
//! ```
//! use std::collections::BTreeMap;
//! use cohort_common::callbacks::{Callbacks, CallbackTrainer, Fitted, NamedTensor, RoundSettings};
//!
//! /// Moves every parameter by +1 and says it saw 10 examples.
//! struct PlusOne;
//! impl Callbacks for PlusOne {
//!     fn fit(&mut self, params: Vec<NamedTensor>, _: &RoundSettings) -> Result<Fitted, String> {
//!         let tensors = params.into_iter().map(|mut t| { t.values.iter_mut().for_each(|v| *v += 1.0); t }).collect();
//!         Ok(Fitted { tensors, is_delta: false, examples: 10, loss: None })
//!     }
//!     fn evaluate(&mut self, _: Vec<NamedTensor>, _: &RoundSettings) -> Result<BTreeMap<String, Vec<u64>>, String> {
//!         Err("no evaluation here".into())
//!     }
//!     fn label_counts(&mut self, _: &RoundSettings) -> Result<BTreeMap<String, Vec<u64>>, String> {
//!         Err("no census here".into())
//!     }
//! }
//! let trainer = CallbackTrainer::new("site-1", PlusOne, Vec::new());
//! # let _ = trainer;
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;

use crate::model::{HeadSpec, Model, ModelSpec, ParamLayout};
use crate::session::{Job, JobKind, JobOutput};
use crate::train::TrainConfig;
use crate::trainer::{fnv1a, JobRunner, TrainerError};
use crate::wire::{RoundPlan, TensorBytes, Update};

/// One named tensor of the model: its shape and values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A head of the model, as the callbacks see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadInfo {
    pub name: String,
    pub classes: usize,
    /// A personal head never leaves this client: the callbacks get its own values back.
    pub personal: bool,
    /// Whether this client labels (and so trains and evaluates) this head.
    pub labelled: bool,
}

/// What the callbacks are told about the round: what to train and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSettings {
    pub round: u64,
    /// The run the round belongs to.
    pub run: String,
    /// The model spec's `name`.
    pub model: String,
    /// This client's seed for the round (shuffling, dropout): the plan's seed mixed with its id.
    pub seed: u64,
    pub heads: Vec<HeadInfo>,
    /// The server's `[federation.train]`: epochs, batch size, learning rate, momentum, weight
    /// decay and the loss options.
    pub train: TrainConfig,
    /// The population's label counts from the last census, for heads that weigh classes by them.
    pub class_counts: Option<Vec<u64>>,
    /// Milliseconds the client has, from the plan, to answer.
    pub deadline_ms: u64,
}

/// What `fit` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// Every tensor of the model (personal heads included), by name.
    pub tensors: Vec<NamedTensor>,
    /// `tensors` are `local - global` rather than the local parameters.
    pub is_delta: bool,
    /// How many examples the training saw: the weight of this update in the average.
    pub examples: u64,
    /// The mean training loss, if the callback reports one.
    pub loss: Option<f64>,
}

/// The data owner's own training and evaluation. Each call blocks for as long as it works; the
/// error is the reason, in words, that the client declines the round with.
pub trait Callbacks: Send {
    /// Trains from `params` (the global model, with this client's personal heads).
    fn fit(&mut self, params: Vec<NamedTensor>, settings: &RoundSettings) -> Result<Fitted, String>;
    /// Evaluates `params` on held-out data: a confusion matrix (true class by row, predicted by
    /// column, flattened row by row) for each head it labels, by head name.
    fn evaluate(
        &mut self,
        params: Vec<NamedTensor>,
        settings: &RoundSettings,
    ) -> Result<BTreeMap<String, Vec<u64>>, String>;
    /// This client's label counts for a census, by head name.
    fn label_counts(&mut self, settings: &RoundSettings) -> Result<BTreeMap<String, Vec<u64>>, String>;
}

/// The layout of the last spec seen, kept while the spec does not change.
struct Known {
    spec_toml: String,
    spec: ModelSpec,
    layout: ParamLayout,
}

/// Runs the session's jobs on [`Callbacks`].
pub struct CallbackTrainer<C> {
    id: String,
    callbacks: C,
    /// The heads this client labels, by name; empty: the model's first head.
    labels: Vec<String>,
    known: Option<Arc<Known>>,
    personal: BTreeMap<String, Vec<f32>>,
    samples: u64,
}

impl<C: Callbacks> CallbackTrainer<C> {
    /// A client `id` (which seeds its rounds) that labels the heads `labels` (empty: the first).
    pub fn new(id: impl Into<String>, callbacks: C, labels: Vec<String>) -> Self {
        Self { id: id.into(), callbacks, labels, known: None, personal: BTreeMap::new(), samples: 0 }
    }

    /// Restores personal heads kept by an earlier run.
    pub fn with_personal_heads(mut self, heads: BTreeMap<String, Vec<f32>>) -> Self {
        self.personal = heads;
        self
    }

    /// The examples this client says it holds before its first training (its hello).
    pub fn with_samples(mut self, samples: u64) -> Self {
        self.samples = samples;
        self
    }

    fn known(&mut self, spec_toml: &str) -> Result<Arc<Known>, TrainerError> {
        if self.known.as_ref().is_none_or(|k| k.spec_toml != spec_toml) {
            let spec = ModelSpec::from_toml(spec_toml).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
            for label in &self.labels {
                if spec.head_index(label).is_none() {
                    let names: Vec<&str> = spec.heads.iter().map(|h| h.name.as_str()).collect();
                    return Err(TrainerError::BadPlan(format!(
                        "this client labels head `{label}`; the model `{}` has heads {names:?}",
                        spec.name
                    )));
                }
            }
            let layout = layout_of(&spec)?;
            self.known = Some(Arc::new(Known { spec_toml: spec_toml.to_string(), spec, layout }));
        }
        Ok(self.known.clone().expect("just set"))
    }

    fn labels_head(&self, spec: &ModelSpec, index: usize) -> bool {
        match self.labels.is_empty() {
            true => index == 0,
            false => self.labels.iter().any(|l| l == &spec.heads[index].name),
        }
    }

    fn settings(&self, plan: &RoundPlan, spec: &ModelSpec) -> Result<RoundSettings, TrainerError> {
        let train = TrainConfig::try_from(&plan.train).map_err(|e| TrainerError::BadPlan(e.to_string()))?;
        let heads = (spec.heads.iter().enumerate())
            .map(|(i, h)| HeadInfo {
                name: h.name.clone(),
                classes: h.classes,
                personal: h.personal,
                labelled: self.labels_head(spec, i),
            })
            .collect();
        Ok(RoundSettings {
            round: plan.round,
            run: plan.run.clone(),
            model: spec.name.clone(),
            seed: plan.seed ^ fnv1a(self.id.as_bytes()),
            heads,
            train,
            class_counts: plan.class_counts.clone(),
            deadline_ms: plan.deadline_ms,
        })
    }

    /// The plan's parameters with this client's personal heads written over the server's copy.
    fn start(&self, plan: &RoundPlan, layout: &ParamLayout) -> Result<Vec<f32>, TrainerError> {
        let mut params = plan.params.to_f32()?;
        if params.len() != layout.total_len() {
            return Err(TrainerError::BadPlan(format!(
                "{} parameters sent, the model has {}",
                params.len(),
                layout.total_len()
            )));
        }
        if params.iter().any(|v| !v.is_finite()) {
            return Err(TrainerError::BadPlan("the global parameters contain non-finite values".into()));
        }
        for seg in layout.segments().iter().filter(|s| s.personal) {
            if let Some(own) = self.personal.get(&seg.name).filter(|v| v.len() == seg.len) {
                params[seg.offset..seg.offset + seg.len].copy_from_slice(own);
            }
        }
        Ok(params)
    }

    fn train(&mut self, plan: &RoundPlan) -> Result<Update, TrainerError> {
        let known = self.known(&plan.model_spec)?;
        let (spec, layout) = (&known.spec, &known.layout);
        let settings = self.settings(plan, spec)?;
        settings.train.check().map_err(|e| TrainerError::BadPlan(e.to_string()))?;
        let start = self.start(plan, layout)?;
        let fitted = self.callbacks.fit(split(layout, &start), &settings).map_err(TrainerError::Callback)?;
        let returned = join(layout, fitted.tensors).map_err(|e| TrainerError::Callback(format!("fit returned {e}")))?;
        let mut delta: Vec<f32> = match fitted.is_delta {
            true => returned,
            false => returned.iter().zip(&start).map(|(l, g)| l - g).collect(),
        };
        // Finite values can still overflow as a difference (or as start + delta below): the
        // quantizer would encode an infinity as nothing while its weight still counted.
        if let Some(at) = delta.iter().zip(&start).position(|(d, s)| !(d.is_finite() && (s + d).is_finite())) {
            return Err(TrainerError::Callback(format!(
                "fit returned parameters that differ from the global model by more than a float32 holds (at flat \
                 index {at})"
            )));
        }
        // Segment 0 is the trunk, then one per head in spec order (`ParamLayout`).
        let mut segment_samples = vec![fitted.examples; layout.segments().len()];
        for (i, seg) in layout.segments().iter().enumerate().skip(1) {
            let range = seg.offset..seg.offset + seg.len;
            if seg.personal && self.labels_head(spec, i - 1) {
                let trained = start[range.clone()].iter().zip(&delta[range.clone()]).map(|(s, d)| s + d).collect();
                self.personal.insert(seg.name.clone(), trained);
            }
            if seg.personal || !self.labels_head(spec, i - 1) {
                // Never sent (personal) or not trained here: zero values and zero weight.
                delta[range].iter_mut().for_each(|d| *d = 0.0);
                segment_samples[i] = 0;
            }
        }
        self.samples = fitted.examples;
        Ok(Update {
            round: plan.round,
            samples: fitted.examples,
            delta: TensorBytes::from_f32(&delta),
            train_loss: fitted.loss.map(|l| l as f32).filter(|l| l.is_finite()).unwrap_or(0.0),
            train_seconds: 0.0,
            segment_samples,
        })
    }

    fn evaluate(&mut self, plan: &RoundPlan) -> Result<Vec<u64>, TrainerError> {
        let known = self.known(&plan.model_spec)?;
        let settings = self.settings(plan, &known.spec)?;
        let params = split(&known.layout, &self.start(plan, &known.layout)?);
        let matrices = self.callbacks.evaluate(params, &settings).map_err(TrainerError::Callback)?;
        let heads: Vec<&HeadSpec> = known.spec.heads.iter().collect();
        self.per_head(&known.spec, &heads, matrices, |classes| classes * classes, "evaluate")
    }

    fn count_labels(&mut self, plan: &RoundPlan) -> Result<Vec<u64>, TrainerError> {
        let known = self.known(&plan.model_spec)?;
        let settings = self.settings(plan, &known.spec)?;
        let counts = self.callbacks.label_counts(&settings).map_err(TrainerError::Callback)?;
        // Only the heads the census counts, in model order.
        let heads = settings.train.census_heads(&known.spec);
        self.per_head(&known.spec, &heads, counts, |classes| classes, "label_counts")
    }

    /// The callback's values per head (by name) checked and laid out for `heads`, zeros for
    /// those it left out; `size` is how many values a head of `classes` classes has. Values for
    /// a head this client does not label are refused, as a native client sends none.
    fn per_head(
        &self,
        spec: &ModelSpec,
        heads: &[&HeadSpec],
        mut by_head: BTreeMap<String, Vec<u64>>,
        size: impl Fn(usize) -> usize,
        what: &str,
    ) -> Result<Vec<u64>, TrainerError> {
        let labelled: Vec<&str> = (spec.heads.iter().enumerate())
            .filter(|(i, _)| self.labels_head(spec, *i))
            .map(|(_, h)| h.name.as_str())
            .collect();
        if let Some(other) = by_head.keys().find(|name| !labelled.contains(&name.as_str())) {
            return Err(TrainerError::Callback(format!(
                "{what} returned head `{}`, which this client does not label (it labels {labelled:?})",
                crate::peer::escape(other, 80)
            )));
        }
        let mut out = Vec::new();
        for head in heads {
            let n = size(head.classes);
            match by_head.remove(&head.name) {
                Some(values) if values.len() == n => out.extend(values),
                Some(values) => {
                    return Err(TrainerError::Callback(format!(
                        "{what} returned {} values for head `{}`, which has {} classes: {n} values",
                        values.len(),
                        head.name,
                        head.classes
                    )))
                }
                None => out.extend(std::iter::repeat_n(0, n)),
            }
        }
        Ok(out)
    }
}

impl<C: Callbacks> JobRunner for CallbackTrainer<C> {
    fn run(&mut self, job: &Job) -> Result<JobOutput, TrainerError> {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.kind {
            JobKind::Train => self.train(&job.plan).map(JobOutput::Update),
            JobKind::CountLabels => self.count_labels(&job.plan).map(JobOutput::Counts),
            JobKind::Evaluate => self.evaluate(&job.plan).map(JobOutput::Counts),
        }));
        done.unwrap_or(Err(TrainerError::Panicked))
    }

    fn samples(&self) -> u64 {
        self.samples
    }

    fn personal_heads(&self) -> &BTreeMap<String, Vec<f32>> {
        &self.personal
    }
}

/// The flat layout of a model spec: the named tensors in the order the wire carries them.
pub fn layout_of(spec: &ModelSpec) -> Result<ParamLayout, TrainerError> {
    Ok(Model::new(spec, &Device::Cpu, 0)?.layout().clone())
}

/// Cuts flat parameters into the layout's named tensors.
pub fn split(layout: &ParamLayout, flat: &[f32]) -> Vec<NamedTensor> {
    (layout.entries().iter())
        .map(|e| NamedTensor {
            name: e.name.clone(),
            shape: e.shape.clone(),
            values: flat[e.offset..e.offset + e.len].to_vec(),
        })
        .collect()
}

/// Named tensors back into flat parameters: every tensor of the layout exactly once, each of its
/// shape, every value finite.
pub fn join(layout: &ParamLayout, tensors: Vec<NamedTensor>) -> Result<Vec<f32>, String> {
    let index: HashMap<&str, usize> =
        (layout.entries().iter().enumerate()).map(|(i, e)| (e.name.as_str(), i)).collect();
    let mut flat = vec![0f32; layout.total_len()];
    let mut seen = vec![false; layout.entries().len()];
    for tensor in tensors {
        let Some(&at) = index.get(tensor.name.as_str()) else {
            return Err(format!(
                "a tensor `{}` that the model does not have (its tensors: {})",
                crate::peer::escape(&tensor.name, 80),
                some_names(layout.entries().iter().map(|e| e.name.as_str()))
            ));
        };
        let entry = &layout.entries()[at];
        if std::mem::replace(&mut seen[at], true) {
            return Err(format!("tensor `{}` twice", entry.name));
        }
        if tensor.shape != entry.shape || tensor.values.len() != entry.len {
            let shape = match tensor.shape.len() {
                0..=8 => format!("{:?}", tensor.shape),
                rank => format!("of rank {rank}"),
            };
            return Err(format!(
                "tensor `{}` with shape {shape} ({} values); the model's is {:?}",
                entry.name,
                tensor.values.len(),
                entry.shape
            ));
        }
        if let Some(at) = tensor.values.iter().position(|v| !v.is_finite()) {
            return Err(format!("a non-finite value in tensor `{}` (at flat index {at})", entry.name));
        }
        flat[entry.offset..entry.offset + entry.len].copy_from_slice(&tensor.values);
    }
    let missing = (layout.entries().iter().zip(&seen)).filter(|(_, s)| !**s).map(|(e, _)| e.name.as_str());
    if seen.iter().any(|s| !s) {
        return Err(format!(
            "no tensor {} (every tensor of the model is needed, unchanged ones too)",
            some_names(missing)
        ));
    }
    Ok(flat)
}

/// Names for an error: the first ten and how many more.
fn some_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.len() {
        0..=10 => format!("{names:?}"),
        n => format!("{:?} and {} more", &names[..10], n - 10),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::train::{CountScope, LossConfig};
    use crate::trainer::tests::plan;
    use crate::wire::Task;

    /// A trunk and three heads: `shared` and the personal `mine` are labelled here, `other` is not.
    const SPEC: &str = "name = 'three'\ninput_shape = [2]\n[[trunk]]\nkind = 'linear'\nout = 2\n\
                        [[heads]]\nname = 'shared'\nclasses = 2\n\
                        [[heads]]\nname = 'mine'\nclasses = 2\npersonal = true\n\
                        [[heads]]\nname = 'other'\nclasses = 3\n";

    type Mutation = Box<dyn Fn(&mut Fitted) + Send>;

    /// Adds `step` to every parameter it gets, then lets `mutate` spoil the result; records what
    /// it was given. `evaluate` and `label_counts` return what they are set to.
    struct Scripted {
        step: f32,
        mutate: Option<Mutation>,
        given: Arc<Mutex<Vec<Vec<NamedTensor>>>>,
        answer: BTreeMap<String, Vec<u64>>,
        panics: bool,
    }

    impl Scripted {
        fn new(step: f32) -> Self {
            Self { step, mutate: None, given: Default::default(), answer: BTreeMap::new(), panics: false }
        }
    }

    impl Callbacks for Scripted {
        fn fit(&mut self, params: Vec<NamedTensor>, _: &RoundSettings) -> Result<Fitted, String> {
            assert!(!self.panics, "a bug in the data owner's code");
            self.given.lock().unwrap().push(params.clone());
            let tensors = params
                .into_iter()
                .map(|mut t| {
                    t.values.iter_mut().for_each(|v| *v += self.step);
                    t
                })
                .collect();
            let mut fitted = Fitted { tensors, is_delta: false, examples: 40, loss: Some(0.5) };
            if let Some(mutate) = &self.mutate {
                mutate(&mut fitted);
            }
            Ok(fitted)
        }
        fn evaluate(&mut self, _: Vec<NamedTensor>, _: &RoundSettings) -> Result<BTreeMap<String, Vec<u64>>, String> {
            Ok(self.answer.clone())
        }
        fn label_counts(&mut self, _: &RoundSettings) -> Result<BTreeMap<String, Vec<u64>>, String> {
            Ok(self.answer.clone())
        }
    }

    fn layout() -> ParamLayout {
        layout_of(&ModelSpec::from_toml(SPEC).unwrap()).unwrap()
    }

    fn client(callbacks: Scripted) -> CallbackTrainer<Scripted> {
        CallbackTrainer::new("site-1", callbacks, vec!["shared".into(), "mine".into()])
    }

    fn segment<'a>(layout: &ParamLayout, values: &'a [f32], name: &str) -> &'a [f32] {
        let seg = layout.segments().iter().find(|s| s.name == name).unwrap();
        &values[seg.offset..seg.offset + seg.len]
    }

    #[test]
    fn fitted_parameters_become_the_update_and_personal_and_unlabelled_heads_stay_home() {
        let layout = layout();
        let n = layout.total_len();
        let mut site = client(Scripted::new(1.0));
        let update = site.train(&plan(SPEC, vec![0.5; n])).unwrap();
        let delta = update.delta.to_f32().unwrap();
        assert!(segment(&layout, &delta, "trunk").iter().all(|d| (*d - 1.0).abs() < 1e-6));
        assert!(segment(&layout, &delta, "shared").iter().all(|d| (*d - 1.0).abs() < 1e-6));
        // Trained here and kept here: the server gets zeros with zero weight.
        assert!(segment(&layout, &delta, "mine").iter().all(|d| *d == 0.0));
        assert!(segment(&layout, &delta, "other").iter().all(|d| *d == 0.0));
        assert_eq!((update.samples, update.segment_samples.clone()), (40, vec![40, 40, 0, 0]));
        let kept = &site.personal_heads()["mine"];
        assert!(kept.iter().all(|v| (*v - 1.5).abs() < 1e-6), "{kept:?}");

        // The next round's fit starts the personal head from this client's own values, not the
        // server's.
        site.train(&plan(SPEC, vec![-3.0; n])).unwrap();
        let given = site.callbacks.given.lock().unwrap();
        let mine: Vec<&NamedTensor> = given[1].iter().filter(|t| t.name.starts_with("heads.mine.")).collect();
        assert!(mine.iter().all(|t| t.values.iter().all(|v| (*v - 1.5).abs() < 1e-6)));
        let shared: Vec<&NamedTensor> = given[1].iter().filter(|t| t.name.starts_with("heads.shared.")).collect();
        assert!(shared.iter().all(|t| t.values.iter().all(|v| *v == -3.0)));
    }

    #[test]
    fn a_delta_is_taken_as_the_update() {
        let n = layout().total_len();
        let mut callbacks = Scripted::new(0.25);
        callbacks.mutate = Some(Box::new(|f| f.is_delta = true));
        let update = client(callbacks).train(&plan(SPEC, vec![7.0; n])).unwrap();
        let trunk = segment(&layout(), &update.delta.to_f32().unwrap(), "trunk").to_vec();
        // The returned tensors (global + 0.25) are the delta itself.
        assert!(trunk.iter().all(|d| (*d - 7.25).abs() < 1e-5), "{trunk:?}");
    }

    /// Whatever `fit` hands back is checked against the layout; each spoilt answer is refused with
    /// words that name what is wrong.
    #[test]
    fn whatever_fit_returns_is_checked_against_the_layout() {
        let n = layout().total_len();
        let cases: Vec<(&str, Mutation)> = vec![
            ("no tensor", Box::new(|f| drop(f.tensors.pop()))),
            ("does not have", Box::new(|f| f.tensors[0].name = "trunk.99.weight".into())),
            ("twice", Box::new(|f| f.tensors[1] = f.tensors[0].clone())),
            (
                "with shape",
                Box::new(|f| {
                    f.tensors[0].values.push(1.0);
                }),
            ),
            (
                "with shape",
                Box::new(|f| {
                    f.tensors[0].shape.reverse();
                    f.tensors[0].shape.push(1);
                }),
            ),
            ("non-finite", Box::new(|f| f.tensors[2].values[0] = f32::NAN)),
            ("non-finite", Box::new(|f| f.tensors[2].values[0] = f32::INFINITY)),
            // Finite, but 3e38 - (-3e38) is not: the difference from the global model overflows.
            ("more than a float32 holds", Box::new(|f| f.tensors[2].values[0] = 3e38)),
            (
                "more than a float32 holds",
                Box::new(|f| {
                    f.is_delta = true;
                    f.tensors[2].values[0] = 3e38;
                }),
            ),
        ];
        for (words, mutation) in cases {
            let mut callbacks = Scripted::new(1.0);
            callbacks.mutate = Some(mutation);
            match client(callbacks).train(&plan(SPEC, vec![-3e38; n])) {
                Err(TrainerError::Callback(why)) => assert!(why.contains(words), "{words}: {why}"),
                other => panic!("{words}: {other:?}"),
            }
        }
    }

    #[test]
    fn evaluation_and_census_answers_are_checked_and_laid_out_in_head_order() {
        let n = layout().total_len();
        let mut evaluate = plan(SPEC, vec![0.0; n]);
        evaluate.task = Task::Evaluate;
        let mut callbacks = Scripted::new(0.0);
        callbacks.answer =
            BTreeMap::from([("mine".to_string(), vec![1, 2, 3, 4]), ("shared".into(), vec![5, 6, 7, 8])]);
        let mut site = client(callbacks);
        // Head order, zeros for `other` (3 x 3).
        let cells = site.evaluate(&evaluate).unwrap();
        assert_eq!(cells, [vec![5, 6, 7, 8, 1, 2, 3, 4], vec![0; 9]].concat());

        for (answer, words) in [
            (BTreeMap::from([("shared".to_string(), vec![1, 2, 3])]), "3 values for head `shared`"),
            (BTreeMap::from([("nope\u{1b}[31m".to_string(), vec![1])]), "does not label"),
            // A head of the model this client does not label: a native client sends zeros there.
            (BTreeMap::from([("other".to_string(), vec![9; 9])]), "head `other`, which this client does not label"),
        ] {
            site.callbacks.answer = answer;
            match site.evaluate(&evaluate) {
                Err(TrainerError::Callback(why)) => {
                    assert!(why.contains(words), "{why}");
                    assert!(!why.contains('\u{1b}'), "a raw escape in {why:?}");
                }
                other => panic!("{other:?}"),
            }
        }

        // A census counts only the heads whose loss says `scope = "global"`: `shared` and `other`
        // here; this client labels `shared` only, so `other` counts zeros.
        let mut census = plan(SPEC, vec![0.0; n]);
        census.task = Task::CountLabels;
        let global = LossConfig { scope: CountScope::Global, ..Default::default() };
        let head_loss = BTreeMap::from([("shared".into(), global), ("other".into(), global)]);
        census.train = (&TrainConfig { head_loss, ..Default::default() }).into();
        site.callbacks.answer = BTreeMap::from([("shared".to_string(), vec![4, 5]), ("mine".into(), vec![1, 1])]);
        assert_eq!(site.count_labels(&census).unwrap(), vec![4, 5, 0, 0, 0]);
        site.callbacks.answer = BTreeMap::from([("other".to_string(), vec![4, 5, 6])]);
        let refused = site.count_labels(&census);
        assert!(
            matches!(refused, Err(TrainerError::Callback(ref why)) if why.contains("does not label")),
            "{refused:?}"
        );
    }

    #[test]
    fn a_panic_in_the_callbacks_loses_the_job_not_the_client() {
        let n = layout().total_len();
        let mut callbacks = Scripted::new(1.0);
        callbacks.panics = true;
        let mut site = client(callbacks);
        let job = |plan| Job { id: 1, kind: JobKind::Train, request: 1, secure: false, plan: Arc::new(plan) };
        assert!(matches!(site.run(&job(plan(SPEC, vec![0.0; n]))), Err(TrainerError::Panicked)));
        site.callbacks.panics = false;
        assert!(site.run(&job(plan(SPEC, vec![0.0; n]))).is_ok());
    }

    #[test]
    fn plans_the_client_cannot_follow_are_refused_before_the_callbacks_run() {
        let n = layout().total_len();
        let mut site = client(Scripted::new(1.0));
        let short = site.train(&plan(SPEC, vec![0.0; n - 1]));
        assert!(matches!(short, Err(TrainerError::BadPlan(ref why)) if why.contains("parameters sent")), "{short:?}");
        let mut poisoned = vec![0.0; n];
        poisoned[3] = f32::NAN;
        assert!(matches!(site.train(&plan(SPEC, poisoned)), Err(TrainerError::BadPlan(_))));
        let mut stranger = CallbackTrainer::new("site-2", Scripted::new(1.0), vec!["absent".into()]);
        let refused = stranger.train(&plan(SPEC, vec![0.0; n]));
        assert!(matches!(refused, Err(TrainerError::BadPlan(ref why)) if why.contains("`absent`")), "{refused:?}");
        assert!(site.callbacks.given.lock().unwrap().is_empty() && stranger.callbacks.given.lock().unwrap().is_empty());
    }
}
