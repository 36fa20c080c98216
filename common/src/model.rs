//! Model specifications, their candle implementation and the flat parameter layout.
//!
//! A [`ModelSpec`] is read from TOML: a shared trunk of layers and one or more named heads.
//! [`ModelSpec::from_toml`] checks the whole spec by inferring every layer's shape, so a
//! `ModelSpec` that exists is one that builds. [`Model`] builds it on candle through a
//! `VarBuilder`, and [`ParamLayout`] flattens the named tensors into segments (the trunk, then
//! each head in spec order), sorted by name inside a segment: candle's `VarMap` is a HashMap,
//! so its own order is never used.
//!
//! ```
//! use cohort_common::model::{Model, ModelSpec};
//! let spec = ModelSpec::from_toml(r#"
//!     name = "tiny"
//!     input_shape = [4]
//!     [[trunk]]
//!     kind = "linear"
//!     out = 3
//!     [[heads]]
//!     name = "label"
//!     classes = 2
//! "#).unwrap();
//! let model = Model::new(&spec, &candle_core::Device::Cpu, 7).unwrap();
//! assert_eq!(model.layout().total_len(), 4 * 3 + 3 + 3 * 2 + 2);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarBuilder, VarMap};

use crate::kernels;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model spec is not valid TOML: {0}")]
    Toml(String),
    #[error("model spec, {place}: {problem}")]
    Invalid { place: String, problem: String },
    #[error("parameters do not fit the model: {0}")]
    Mismatch(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// A model of declared parameters asked to compute: nothing here knows its layers.
    #[error(
        "the model `{0}` declares its parameters only (no layers), so it cannot be run here: clients train and \
         evaluate it with their own code (the Python package `cohort`), and the server uses federated evaluation"
    )]
    NotRunnable(String),
}

type Result<T> = std::result::Result<T, ModelError>;

/// One layer of a trunk or head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    Linear {
        out: usize,
    },
    Conv2d {
        out_channels: usize,
        kernel: usize,
        #[serde(default)]
        padding: usize,
        #[serde(default = "one")]
        stride: usize,
    },
    MaxPool2d {
        size: usize,
    },
    Relu,
    Flatten,
    Dropout {
        p: f32,
    },
    /// `(x - mean) / std` with fixed constants (no parameters): input standardisation that
    /// travels with the model, so every client preprocesses alike. One number for every value,
    /// or one per feature of a flat input (tabular data: `mean = [7.9, 0.53, ...]`).
    Normalize {
        mean: Stat,
        std: Stat,
    },
}

/// A constant of `normalize`: one for all values, or one per feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stat {
    One(f32),
    PerFeature(Vec<f32>),
}

impl Stat {
    fn values(&self) -> &[f32] {
        match self {
            Stat::One(v) => std::slice::from_ref(v),
            Stat::PerFeature(v) => v,
        }
    }
}

fn one() -> usize {
    1
}

fn unit_weight() -> f32 {
    1.0
}

/// A named task head: optional hidden layers, then a linear layer onto `classes` logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    pub name: String,
    pub classes: usize,
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    #[serde(default = "unit_weight")]
    pub loss_weight: f32,
    /// A personal head never leaves the client.
    #[serde(default)]
    pub personal: bool,
    /// A model of declared parameters ([`ModelSpec::parameters`]): this head's tensors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<TensorSpec>,
}

/// One named tensor of a model that declares its parameters instead of layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The name everything uses: the wire layout, checkpoints, exports and the data owner's code
    /// (a PyTorch `state_dict` key, say).
    pub name: String,
    pub shape: Vec<usize>,
    /// How the server starts it (when no initial model file is given).
    #[serde(default, skip_serializing_if = "is_uniform")]
    pub init: TensorInit,
}

/// How a declared tensor starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorInit {
    /// Uniform in +-1/sqrt(fan_in), fan_in the product of every dimension after the first (a
    /// vector's own length): PyTorch's default for weights.
    #[default]
    Uniform,
    Zeros,
    /// Ones: the scale of a normalisation layer.
    Ones,
}

fn is_uniform(init: &TensorInit) -> bool {
    *init == TensorInit::Uniform
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// Shape of one example, without the batch dimension: `[784]` or `[1, 28, 28]` (a model of
    /// declared parameters may leave it out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_shape: Vec<usize>,
    #[serde(default)]
    pub trunk: Vec<LayerSpec>,
    pub heads: Vec<HeadSpec>,
    /// Instead of layers, the model's shared tensors by name and shape (the heads' in each
    /// head's `parameters`): a model the server aggregates, checkpoints and exports without
    /// knowing its layers, trained by clients that bring their own code (the Python package).
    /// Neither the server's test set nor candle clients can run it; federated evaluation can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<TensorSpec>,
}

impl ModelSpec {
    /// Parses and checks a spec: every layer must accept the shape the previous one makes.
    pub fn from_toml(text: &str) -> Result<Self> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| ModelError::Toml(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a ModelSpec always serialises")
    }

    pub fn head_index(&self, name: &str) -> Option<usize> {
        self.heads.iter().position(|h| h.name == name)
    }

    /// Whether the model declares its parameters (by name and shape) instead of layers.
    pub fn declares_parameters(&self) -> bool {
        !self.parameters.is_empty() || self.heads.iter().any(|h| !h.parameters.is_empty())
    }

    /// Refuses to run a model of declared parameters: nothing here knows its layers.
    pub fn check_runnable(&self) -> Result<()> {
        match self.declares_parameters() {
            true => Err(ModelError::NotRunnable(self.name.clone())),
            false => Ok(()),
        }
    }

    fn check_declared(&self) -> Result<()> {
        let invalid = |place: &str, problem: String| ModelError::Invalid { place: place.into(), problem };
        if !self.trunk.is_empty() || self.heads.iter().any(|h| !h.layers.is_empty()) {
            return Err(invalid(
                "parameters",
                "a model declares its parameters or has layers, not both: move the layers' tensors into `parameters`, \
                 or drop `parameters`"
                    .into(),
            ));
        }
        if self.heads.is_empty() {
            return Err(invalid("heads", "a model needs at least one head".into()));
        }
        let declared = self.parameters.len() + self.heads.iter().map(|h| h.parameters.len()).sum::<usize>();
        if declared > MAX_DECLARED_TENSORS {
            return Err(invalid(
                "parameters",
                format!("{declared} tensors declared; a model has at most {MAX_DECLARED_TENSORS} (one variable each)"),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut total = 0usize;
        let mut cells = 0usize;
        let mut seen = std::collections::HashSet::new();
        let groups = std::iter::once(("parameters".to_string(), &self.parameters)).chain(
            self.heads.iter().enumerate().map(|(i, h)| (format!("heads[{i}] ({}) parameters", h.name), &h.parameters)),
        );
        for (place, tensors) in groups {
            for (j, tensor) in tensors.iter().enumerate() {
                let place = format!("{place}[{j}]");
                let valid = |c: char| c.is_ascii_alphanumeric() || "_.-/".contains(c);
                if tensor.name.is_empty() || tensor.name.len() > 200 || !tensor.name.chars().all(valid) {
                    return Err(invalid(
                        &place,
                        "name must be 1 to 200 ASCII letters, digits, '_', '.', '-' or '/'".into(),
                    ));
                }
                // safetensors reserves `__metadata__`; checkpoints and exports would fail on it.
                if tensor.name.starts_with("__") {
                    return Err(invalid(&place, format!("`{}`: names starting with `__` are reserved", tensor.name)));
                }
                if tensor.shape.len() > MAX_RANK {
                    return Err(invalid(&place, format!("rank {} (at most {MAX_RANK})", tensor.shape.len())));
                }
                if !names.insert(&tensor.name) {
                    return Err(invalid(&place, format!("`{}` is declared twice", tensor.name)));
                }
                let len = tensor.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if tensor.shape.is_empty() || tensor.shape.contains(&0) {
                    return Err(invalid(
                        &place,
                        format!("shape {:?} must be non-empty with no zero dimension", tensor.shape),
                    ));
                }
                total = len
                    .and_then(|n| total.checked_add(n))
                    .filter(|t| *t <= MAX_PARAMETERS)
                    .ok_or_else(|| invalid(&place, format!("the model would exceed {MAX_PARAMETERS} parameters")))?;
            }
        }
        for (i, head) in self.heads.iter().enumerate() {
            let place = format!("heads[{i}] ({})", head.name);
            check_head(&place, head, &mut seen)?;
            count_cells(&place, head, &mut cells)?;
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.declares_parameters() {
            return self.check_declared();
        }
        let invalid = |place: &str, problem: String| ModelError::Invalid { place: place.into(), problem };
        if self.input_shape.is_empty() || self.input_shape.contains(&0) {
            return Err(invalid(
                "input_shape",
                format!("{:?} must be non-empty with no zero dimension", self.input_shape),
            ));
        }
        if self.heads.is_empty() {
            return Err(invalid("heads", "a model needs at least one head".into()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut params = 0usize;
        let mut cells = 0usize;
        let trunk_out = infer_shapes_counting(&self.input_shape, &self.trunk, "trunk", &mut params)?;
        for (i, head) in self.heads.iter().enumerate() {
            let place = format!("heads[{i}] ({})", head.name);
            check_head(&place, head, &mut seen)?;
            let out = infer_shapes_counting(&trunk_out, &head.layers, &place, &mut params)?;
            if out.len() != 1 {
                return Err(invalid(
                    &place,
                    format!(
                        "the head's input has shape {out:?}; add a `flatten` layer so the output layer gets a vector"
                    ),
                ));
            }
            // The output layer onto the classes, which `Model::new` adds: its parameters count too.
            let output = LayerSpec::Linear { out: head.classes };
            infer_shapes_counting(&out, std::slice::from_ref(&output), &format!("{place} output"), &mut params)?;
            count_cells(&place, head, &mut cells)?;
        }
        Ok(())
    }
}

/// What every head must be, whatever the model: a valid unique name, at least 2 classes and a
/// finite loss weight.
fn check_head<'s>(place: &str, head: &'s HeadSpec, seen: &mut std::collections::HashSet<&'s String>) -> Result<()> {
    let invalid = |problem: String| ModelError::Invalid { place: place.into(), problem };
    if head.name.is_empty() || !head.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(invalid("name must be non-empty ASCII letters, digits, '_' or '-'".into()));
    }
    if !seen.insert(&head.name) {
        return Err(invalid("duplicate head name".into()));
    }
    if head.classes < 2 {
        return Err(invalid(format!("classes = {} (a head needs at least 2)", head.classes)));
    }
    if !(head.loss_weight.is_finite() && head.loss_weight >= 0.0) {
        return Err(invalid(format!("loss_weight = {} must be finite and >= 0", head.loss_weight)));
    }
    Ok(())
}

/// Adds a head's confusion matrix to `cells`, refusing heads whose matrices would not fit a
/// federated evaluation.
fn count_cells(place: &str, head: &HeadSpec, cells: &mut usize) -> Result<()> {
    let invalid = |problem: String| ModelError::Invalid { place: place.into(), problem };
    *cells = cells.saturating_add(head.classes.saturating_mul(head.classes));
    if *cells > MAX_CONFUSION_CELLS {
        return Err(invalid(format!(
            "the heads' confusion matrices (classes squared, summed over the heads) would hold more than \
             {MAX_CONFUSION_CELLS} cells; a federated evaluation builds and sums them"
        )));
    }
    Ok(())
}

/// The most tensors a model of declared parameters may have (one candle variable each).
pub const MAX_DECLARED_TENSORS: usize = 4096;

/// The highest rank of a declared tensor.
pub const MAX_RANK: usize = 8;

/// The largest model a spec may describe: its parameters must fit in one wire frame.
pub const MAX_PARAMETERS: usize = crate::wire::MAX_FRAME_BYTES / 4 - (1 << 16);

/// The most cells the confusion matrices of a model's heads may hold together (the sum of each
/// head's classes squared): a federated evaluation builds them on every client and sums them
/// securely, 128 MiB of counts at most (4,096 classes for a single head).
pub const MAX_CONFUSION_CELLS: usize = 1 << 24;

/// Parameters a layer adds for a given input shape (weights and biases).
fn layer_parameters(shape: &[usize], layer: &LayerSpec) -> usize {
    match layer {
        LayerSpec::Linear { out } => shape.first().map_or(0, |i| i.saturating_mul(*out).saturating_add(*out)),
        LayerSpec::Conv2d { out_channels, kernel, .. } => shape.first().map_or(0, |c| {
            c.saturating_mul(kernel.saturating_mul(*kernel)).saturating_mul(*out_channels).saturating_add(*out_channels)
        }),
        _ => 0,
    }
}

fn infer_shapes(input: &[usize], layers: &[LayerSpec], place: &str) -> Result<Vec<usize>> {
    infer_shapes_counting(input, layers, place, &mut 0)
}

fn infer_shapes_counting(input: &[usize], layers: &[LayerSpec], place: &str, params: &mut usize) -> Result<Vec<usize>> {
    let mut shape = input.to_vec();
    for (i, layer) in layers.iter().enumerate() {
        let err = |problem: String| ModelError::Invalid { place: format!("{place} layer {i} ({layer:?})"), problem };
        *params = params.saturating_add(layer_parameters(&shape, layer));
        if *params > MAX_PARAMETERS {
            return Err(err(format!("the model would exceed {MAX_PARAMETERS} parameters")));
        }
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 28) {
            return Err(err(format!("activations of shape {shape:?} are too large")));
        }
        shape = match layer {
            LayerSpec::Linear { out } => {
                if shape.len() != 1 {
                    return Err(err(format!("linear needs a vector input, got shape {shape:?}; add `flatten` first")));
                }
                if *out == 0 {
                    return Err(err("out must be > 0".into()));
                }
                vec![*out]
            }
            LayerSpec::Conv2d { out_channels, kernel, padding, stride } => {
                if shape.len() != 3 {
                    return Err(err(format!("conv2d needs a [channels, height, width] input, got {shape:?}")));
                }
                if *out_channels == 0 || *kernel == 0 || *stride == 0 {
                    return Err(err("out_channels, kernel and stride must be > 0".into()));
                }
                let padded = |side: usize| padding.checked_mul(2).and_then(|p| p.checked_add(side));
                let (Some(h), Some(w)) = (padded(shape[1]), padded(shape[2])) else {
                    return Err(err(format!("padding = {padding} is too large")));
                };
                if h < *kernel || w < *kernel {
                    return Err(err(format!("kernel {kernel} is larger than the padded input {h}x{w}")));
                }
                vec![*out_channels, (h - kernel) / stride + 1, (w - kernel) / stride + 1]
            }
            LayerSpec::MaxPool2d { size } => {
                if shape.len() != 3 || *size == 0 || shape[1] < *size || shape[2] < *size {
                    return Err(err(format!("max_pool2d of size {size} does not fit input {shape:?}")));
                }
                vec![shape[0], shape[1] / size, shape[2] / size]
            }
            LayerSpec::Relu => shape,
            LayerSpec::Normalize { mean, std } => {
                let (m, s) = (mean.values(), std.values());
                if m.iter().chain(s).any(|v| !v.is_finite()) || s.iter().any(|v| *v <= 0.0) {
                    return Err(err(format!("mean = {mean:?} and std = {std:?} must be finite, std > 0")));
                }
                for values in [m, s] {
                    if values.len() != 1 && (shape.len() != 1 || values.len() != shape[0]) {
                        return Err(err(format!(
                            "normalize has {} values per constant; a list needs a flat input with one per feature \
                             (the input here is {shape:?})",
                            values.len()
                        )));
                    }
                }
                shape
            }
            LayerSpec::Flatten => vec![shape.iter().product()],
            LayerSpec::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    return Err(err(format!("p = {p} must be in [0, 1)")));
                }
                shape
            }
        };
    }
    Ok(shape)
}

/// One named tensor in the flat layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Fan-in of the layer the tensor belongs to (for initialisation).
    pub fan_in: usize,
}

/// A contiguous run of the flat vector: the trunk or one head.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    pub personal: bool,
}

/// How named tensors map onto one flat vector: segments in spec order (trunk first), tensors
/// sorted by name inside each segment.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    segments: Vec<Segment>,
}

impl ParamLayout {
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
    pub fn total_len(&self) -> usize {
        self.entries.last().map_or(0, |e| e.offset + e.len)
    }
    pub fn entry(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

enum Layer {
    Linear(candle_nn::Linear),
    Conv2d(candle_nn::Conv2d),
    MaxPool2d(usize),
    Relu,
    Flatten,
    Dropout(f32),
    Affine {
        mul: f64,
        add: f64,
    },
    /// Per-feature `x * scale + shift`.
    Standardize {
        scale: Tensor,
        shift: Tensor,
    },
}

impl Layer {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Layer::Linear(l) => l.forward(x),
            Layer::Conv2d(c) => c.forward(x),
            Layer::MaxPool2d(s) if train => crate::kernels::max_pool2d_by_reshape(x, *s),
            Layer::MaxPool2d(s) => x.max_pool2d(*s),
            Layer::Relu => x.relu(),
            Layer::Flatten => x.flatten_from(1),
            Layer::Dropout(p) if train && *p > 0.0 => candle_nn::ops::dropout(x, *p),
            Layer::Dropout(_) => Ok(x.clone()),
            Layer::Affine { mul, add } => x.affine(*mul, *add),
            Layer::Standardize { scale, shift } => x.broadcast_mul(scale)?.broadcast_add(shift),
        }
    }
}

/// What a forward pass is for.
#[derive(Debug, Clone, Copy)]
pub enum Pass<'w> {
    /// Inference: dropout off.
    Evaluate,
    /// A training step's forward pass (dropout on). On the CPU, with a workspace, the kernels
    /// keep the parameters' gradients and their buffers there (see [`kernels::Workspace`]); a
    /// backward pass then leaves the parameters' gradients out of candle's `GradStore`.
    Train(Option<&'w Arc<kernels::Workspace>>),
}

impl Pass<'_> {
    fn training(self) -> bool {
        matches!(self, Pass::Train(_))
    }

    fn workspace(&self) -> Option<&Arc<kernels::Workspace>> {
        match self {
            Pass::Train(w) => *w,
            Pass::Evaluate => None,
        }
    }
}

/// Runs `layers` on `x`. On the CPU, dense and convolution layers, each with the ReLU that
/// follows it (and a convolution with the max pooling after that), and max pooling run on
/// [`crate::kernels`] (candle's own ops compute gradients the training does not need, and its
/// convolution backward is slow); a GPU keeps candle's ops.
fn forward_layers(layers: &[Layer], x: &Tensor, pass: Pass) -> candle_core::Result<Tensor> {
    let cpu = x.device().is_cpu();
    let mut h = x.clone();
    let mut i = 0;
    while let Some(layer) = layers.get(i) {
        let kernel = if cpu { on_kernels(&layers[i..], &h, pass)? } else { None };
        let (out, covered) = match kernel {
            Some(done) => done,
            None => (layer.forward(&h, pass.training())?, 1),
        };
        h = out;
        i += covered;
    }
    Ok(h)
}

/// `layers[0]` on the CPU kernels, with what follows it and the kernel fuses (a ReLU; for a
/// convolution, then max pooling): the output and how many layers that covered; `None` where
/// the kernels do not apply.
fn on_kernels(layers: &[Layer], x: &Tensor, pass: Pass) -> candle_core::Result<Option<(Tensor, usize)>> {
    let relu = matches!(layers.get(1), Some(Layer::Relu));
    let after_relu = usize::from(relu);
    let workspace = pass.workspace();
    Ok(match &layers[0] {
        Layer::Linear(l) => match l.bias() {
            Some(bias) if x.rank() == 2 => {
                Some((kernels::dense(x, l.weight(), bias, relu, workspace)?, 1 + after_relu))
            }
            _ => None,
        },
        Layer::Conv2d(c) => match c.bias() {
            Some(bias) if c.config().dilation == 1 && c.config().groups == 1 => {
                let pool = match layers.get(1 + after_relu) {
                    Some(Layer::MaxPool2d(size)) => Some(*size),
                    _ => None,
                };
                let shape = kernels::ConvShape { padding: c.config().padding, stride: c.config().stride, relu, pool };
                let covered = 1 + after_relu + usize::from(pool.is_some());
                Some((kernels::conv2d(x, c.weight(), bias, shape, workspace)?, covered))
            }
            _ => None,
        },
        Layer::MaxPool2d(size) => Some((kernels::max_pool2d(x, *size)?, 1)),
        _ => None,
    })
}

/// A [`ModelSpec`] built on candle.
pub struct Model {
    spec: ModelSpec,
    varmap: VarMap,
    trunk: Vec<Layer>,
    heads: Vec<Vec<Layer>>,
    layout: ParamLayout,
    /// Vars in layout order.
    vars: Vec<Var>,
    device: Device,
}

struct Builder<'a> {
    vb: VarBuilder<'a>,
    fan_in: HashMap<String, usize>,
}

impl Builder<'_> {
    fn build(&mut self, input: &[usize], layers: &[LayerSpec], prefix: &str) -> Result<(Vec<Layer>, Vec<usize>)> {
        let mut shape = input.to_vec();
        let mut built = Vec::with_capacity(layers.len());
        for (i, spec) in layers.iter().enumerate() {
            let name = format!("{prefix}.{i:02}");
            let next = infer_shapes(&shape, std::slice::from_ref(spec), prefix)?;
            let layer = match spec {
                LayerSpec::Linear { out } => {
                    self.fan_in.insert(name.clone(), shape[0]);
                    Layer::Linear(candle_nn::linear(shape[0], *out, self.vb.pp(&name))?)
                }
                LayerSpec::Conv2d { out_channels, kernel, padding, stride } => {
                    self.fan_in.insert(name.clone(), shape[0] * kernel * kernel);
                    let cfg = candle_nn::Conv2dConfig { padding: *padding, stride: *stride, ..Default::default() };
                    Layer::Conv2d(candle_nn::conv2d(shape[0], *out_channels, *kernel, cfg, self.vb.pp(&name))?)
                }
                LayerSpec::MaxPool2d { size } => Layer::MaxPool2d(*size),
                LayerSpec::Relu => Layer::Relu,
                LayerSpec::Flatten => Layer::Flatten,
                LayerSpec::Dropout { p } => Layer::Dropout(*p),
                LayerSpec::Normalize { mean: Stat::One(mean), std: Stat::One(std) } => {
                    Layer::Affine { mul: 1.0 / *std as f64, add: -(*mean as f64) / *std as f64 }
                }
                LayerSpec::Normalize { mean, std } => {
                    let width = shape[0];
                    let per = |s: &Stat, i: usize| s.values().get(i).copied().unwrap_or(s.values()[0]);
                    let scale: Vec<f32> = (0..width).map(|i| 1.0 / per(std, i)).collect();
                    let shift: Vec<f32> = (0..width).map(|i| -per(mean, i) / per(std, i)).collect();
                    Layer::Standardize {
                        scale: Tensor::from_slice(&scale, width, self.vb.device())?,
                        shift: Tensor::from_slice(&shift, width, self.vb.device())?,
                    }
                }
            };
            built.push(layer);
            shape = next;
        }
        Ok((built, shape))
    }
}

impl Model {
    /// Builds the model and initialises it deterministically from `seed` (uniform in
    /// +-1/sqrt(fan_in), PyTorch's default for linear and conv layers).
    pub fn new(spec: &ModelSpec, device: &Device, seed: u64) -> Result<Self> {
        if spec.declares_parameters() {
            return Self::declared(spec, device, seed);
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let mut builder = Builder { vb, fan_in: HashMap::new() };
        let (trunk, trunk_out) = builder.build(&spec.input_shape, &spec.trunk, "trunk")?;
        let mut heads = Vec::with_capacity(spec.heads.len());
        for head in &spec.heads {
            let prefix = format!("heads.{}", head.name);
            let mut layers = head.layers.clone();
            layers.push(LayerSpec::Linear { out: head.classes });
            let (built, _) = builder.build(&trunk_out, &layers, &prefix)?;
            heads.push(built);
        }

        let all: HashMap<String, Var> = varmap.data().lock().expect("varmap lock").clone();
        let mut segment_names: Vec<(String, String, bool)> = vec![("trunk".into(), "trunk.".into(), false)];
        segment_names.extend(spec.heads.iter().map(|h| (h.name.clone(), format!("heads.{}.", h.name), h.personal)));
        let mut entries = Vec::new();
        let mut segments = Vec::new();
        let mut vars = Vec::new();
        let mut offset = 0;
        for (segment, prefix, personal) in segment_names {
            let mut names: Vec<&String> = all.keys().filter(|n| n.starts_with(&prefix)).collect();
            names.sort();
            let start = offset;
            for name in names {
                let var = &all[name];
                let shape = var.as_tensor().dims().to_vec();
                let len = shape.iter().product();
                let layer = name.rsplit_once('.').map_or(name.as_str(), |(l, _)| l);
                let fan_in = builder.fan_in.get(layer).copied().unwrap_or(1);
                entries.push(ParamEntry { name: name.clone(), shape, offset, len, fan_in });
                vars.push(var.clone());
                offset += len;
            }
            segments.push(Segment { name: segment, offset: start, len: offset - start, personal });
        }
        let model = Model {
            spec: spec.clone(),
            varmap,
            trunk,
            heads,
            layout: ParamLayout { entries, segments },
            vars,
            device: device.clone(),
        };
        model.init_params(seed)?;
        Ok(model)
    }

    /// A model of declared parameters: its tensors, laid out like a layer model's (the trunk,
    /// then each head, sorted by name inside each), under their declared names; no layers.
    fn declared(spec: &ModelSpec, device: &Device, seed: u64) -> Result<Self> {
        let varmap = VarMap::new();
        let groups = std::iter::once(("trunk".to_string(), false, &spec.parameters))
            .chain(spec.heads.iter().map(|h| (h.name.clone(), h.personal, &h.parameters)));
        let (mut entries, mut segments, mut vars, mut offset) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for (segment, personal, tensors) in groups {
            let mut sorted: Vec<&TensorSpec> = tensors.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            let start = offset;
            for tensor in sorted {
                let len = tensor.shape.iter().product();
                let fan_in = match tensor.shape.as_slice() {
                    [only] => *only,
                    [_, rest @ ..] => rest.iter().product(),
                    [] => 1,
                };
                let var = Var::zeros(tensor.shape.as_slice(), DType::F32, device)?;
                varmap.data().lock().expect("varmap lock").insert(tensor.name.clone(), var.clone());
                entries.push(ParamEntry {
                    name: tensor.name.clone(),
                    shape: tensor.shape.clone(),
                    offset,
                    len,
                    fan_in,
                });
                vars.push(var);
                offset += len;
            }
            segments.push(Segment { name: segment, offset: start, len: offset - start, personal });
        }
        let model = Model {
            spec: spec.clone(),
            varmap,
            trunk: Vec::new(),
            heads: spec.heads.iter().map(|_| Vec::new()).collect(),
            layout: ParamLayout { entries, segments },
            vars,
            device: device.clone(),
        };
        model.init_params(seed)?;
        Ok(model)
    }

    fn init_params(&self, seed: u64) -> Result<()> {
        let declared: HashMap<&str, TensorInit> = (self.spec.parameters.iter())
            .chain(self.spec.heads.iter().flat_map(|h| &h.parameters))
            .map(|t| (t.name.as_str(), t.init))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut flat = Vec::with_capacity(self.layout.total_len());
        for e in &self.layout.entries {
            match declared.get(e.name.as_str()).copied().unwrap_or_default() {
                TensorInit::Uniform => {
                    let bound = 1.0 / (e.fan_in as f32).sqrt();
                    flat.extend((0..e.len).map(|_| rng.random_range(-bound..bound)));
                }
                TensorInit::Zeros => flat.extend(std::iter::repeat_n(0.0, e.len)),
                TensorInit::Ones => flat.extend(std::iter::repeat_n(1.0, e.len)),
            }
        }
        self.set_flat(&flat)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Trainable variables in layout order.
    /// The trainable tensors in layout order: the trunk's first ([`Model::trunk_var_count`]).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }
    /// How many of [`Model::vars`] belong to the trunk.
    pub fn trunk_var_count(&self) -> usize {
        self.layout.entries.iter().take_while(|e| e.name.starts_with("trunk.")).count()
    }
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Logits of one head for a batch `x` of shape `[batch, input_shape...]`.
    pub fn forward_head(&self, x: &Tensor, head: usize, pass: Pass) -> Result<Tensor> {
        let features = self.forward_trunk(x, pass)?;
        self.forward_head_from(&features, head, pass)
    }

    pub fn forward_trunk(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        self.spec.check_runnable()?;
        Ok(forward_layers(&self.trunk, x, pass)?)
    }

    pub fn forward_head_from(&self, features: &Tensor, head: usize, pass: Pass) -> Result<Tensor> {
        self.spec.check_runnable()?;
        let layers = self.heads.get(head).ok_or_else(|| ModelError::Mismatch(format!("no head number {head}")))?;
        Ok(forward_layers(layers, features, pass)?)
    }

    /// All parameters as one flat tensor on the model's device, in layout order.
    pub fn flat_tensor(&self) -> Result<Tensor> {
        let parts: Vec<Tensor> =
            self.vars.iter().map(|v| v.as_tensor().flatten_all()).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// All parameters copied to the host, in layout order.
    pub fn flat(&self) -> Result<Vec<f32>> {
        Ok(self.flat_tensor()?.to_vec1::<f32>()?)
    }

    /// `parameters - base`, computed on the model's device; only the difference crosses to the
    /// host.
    pub fn flat_delta(&self, base: &[f32]) -> Result<Vec<f32>> {
        if base.len() != self.layout.total_len() {
            return Err(ModelError::Mismatch(format!(
                "got {} values, the model has {} parameters",
                base.len(),
                self.layout.total_len()
            )));
        }
        let base = Tensor::from_slice(base, base.len(), &self.device)?;
        Ok((self.flat_tensor()? - base)?.to_vec1::<f32>()?)
    }

    /// Overwrites every parameter from a flat vector in layout order.
    pub fn set_flat(&self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.layout.total_len() {
            return Err(ModelError::Mismatch(format!(
                "got {} values, the model has {} parameters",
                flat.len(),
                self.layout.total_len()
            )));
        }
        for (entry, var) in self.layout.entries.iter().zip(&self.vars) {
            let t = Tensor::from_slice(
                &flat[entry.offset..entry.offset + entry.len],
                entry.shape.as_slice(),
                &self.device,
            )?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The parameters as a safetensors file, one tensor per layout entry, with the model spec
    /// (TOML) in the metadata under [`SPEC_METADATA_KEY`], so the file alone rebuilds the model.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(String, Tensor)> =
            self.layout.entries.iter().zip(&self.vars).map(|(e, v)| (e.name.clone(), v.as_tensor().clone())).collect();
        let metadata = HashMap::from([(SPEC_METADATA_KEY.to_string(), self.spec.to_toml())]);
        safetensors::tensor::serialize(tensors, Some(metadata)).map_err(|e| ModelError::Safetensors(e.to_string()))
    }

    /// Loads parameters from safetensors bytes; every tensor of the layout must be present with
    /// its shape.
    pub fn load_safetensors(&self, bytes: &[u8]) -> Result<()> {
        let flat = flat_from_safetensors(&self.layout, bytes)?;
        self.set_flat(&flat)
    }
}

/// Named flat vectors (personal heads, a server optimizer's state) as a safetensors file, one
/// flat f32 tensor each.
pub fn vectors_to_safetensors(vectors: &BTreeMap<String, Vec<f32>>) -> Vec<u8> {
    let bytes: Vec<(String, Vec<u8>, usize)> = vectors
        .iter()
        .map(|(name, values)| (name.clone(), values.iter().flat_map(|v| v.to_le_bytes()).collect(), values.len()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(name, data, len)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], data)
                .expect("a flat f32 tensor is consistent");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("serializing in memory cannot fail")
}

/// Reads what [`vectors_to_safetensors`] wrote.
pub fn vectors_from_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Vec<f32>>> {
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                return Err(ModelError::Safetensors(format!("tensor `{name}` is not a flat f32 tensor")));
            }
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok((name, values))
        })
        .collect()
}

/// The safetensors metadata key under which [`Model::to_safetensors`] keeps the model spec.
pub const SPEC_METADATA_KEY: &str = "cohort.model_spec";

/// The model spec kept in a safetensors file written by [`Model::to_safetensors`]; `None` for a
/// file without one.
pub fn spec_from_safetensors(bytes: &[u8]) -> Result<Option<ModelSpec>> {
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    match metadata.metadata().as_ref().and_then(|m| m.get(SPEC_METADATA_KEY)) {
        Some(text) => ModelSpec::from_toml(text).map(Some),
        None => Ok(None),
    }
}

/// Reads a safetensors file into a flat vector in `layout` order, checking names and shapes.
pub fn flat_from_safetensors(layout: &ParamLayout, bytes: &[u8]) -> Result<Vec<f32>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    let mut flat = Vec::with_capacity(layout.total_len());
    for entry in &layout.entries {
        let view =
            st.tensor(&entry.name).map_err(|_| ModelError::Mismatch(format!("tensor `{}` is missing", entry.name)))?;
        if view.shape() != entry.shape.as_slice() || view.dtype() != safetensors::Dtype::F32 {
            return Err(ModelError::Mismatch(format!(
                "tensor `{}` is {:?} {:?}, expected F32 {:?}",
                entry.name,
                view.dtype(),
                view.shape(),
                entry.shape
            )));
        }
        flat.extend(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    #[test]
    fn normalize_standardises_each_feature() {
        let spec = ModelSpec::from_toml(
            "name='t'\ninput_shape=[2]\n[[trunk]]\nkind='normalize'\nmean=[1.0, 2.0]\nstd=[2.0, 4.0]\n\
             [[heads]]\nname='y'\nclasses=2",
        )
        .unwrap();
        let model = Model::new(&spec, &Device::Cpu, 0).unwrap();
        let x = Tensor::new(&[[3.0f32, 10.0]], &Device::Cpu).unwrap();
        let out = model.forward_trunk(&x, Pass::Evaluate).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, vec![vec![1.0, 2.0]]);
        assert_eq!(ModelSpec::from_toml(&spec.to_toml()).unwrap(), spec, "the spec round-trips");
        let wrong = "name='t'\ninput_shape=[3]\n[[trunk]]\nkind='normalize'\nmean=[1.0, 2.0]\nstd=1.0\n\
                     [[heads]]\nname='y'\nclasses=2";
        let err = ModelSpec::from_toml(wrong).unwrap_err().to_string();
        assert!(err.contains("one per feature"), "{err}");
    }

    use super::*;

    const TWO_NN: &str = include_str!("../specs/mnist-2nn.toml");
    const CNN: &str = include_str!("../specs/mnist-cnn.toml");

    #[test]
    fn mcmahan_models_have_the_papers_parameter_counts() {
        let two_nn = Model::new(&ModelSpec::from_toml(TWO_NN).unwrap(), &Device::Cpu, 0).unwrap();
        assert_eq!(two_nn.layout().total_len(), 199_210);
        let cnn = Model::new(&ModelSpec::from_toml(CNN).unwrap(), &Device::Cpu, 0).unwrap();
        assert_eq!(cnn.layout().total_len(), 1_663_370);
        let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cnn.forward_head(&x, 0, Pass::Evaluate).unwrap().dims(), &[2, 10]);
    }

    #[test]
    fn the_cpu_model_trains_on_the_kernels_with_candles_values_and_gradients() {
        // The data go straight into a convolution: candle's own conv2d backward gives them a
        // gradient, the kernel none, so the data's gradient tells which ran.
        let spec = ModelSpec::from_toml(
            "name='k'\ninput_shape=[2,8,8]\n[[trunk]]\nkind='conv2d'\nout_channels=3\nkernel=3\npadding=1\n\
             [[trunk]]\nkind='relu'\n[[trunk]]\nkind='max_pool2d'\nsize=2\n[[trunk]]\nkind='flatten'\n\
             [[trunk]]\nkind='linear'\nout=6\n[[trunk]]\nkind='relu'\n[[heads]]\nname='y'\nclasses=4",
        )
        .unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 2, 8, 8), &Device::Cpu).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu).unwrap();
        let on_kernels = model.forward_head(&x, 0, Pass::Train(None)).unwrap();
        let layers = model.trunk.iter().chain(&model.heads[0]);
        let on_candle = layers.fold(x.clone(), |h, layer| layer.forward(&h, true).unwrap());
        let (got, want) = (on_kernels.to_vec2::<f32>().unwrap(), on_candle.to_vec2::<f32>().unwrap());
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() <= 1e-5, "logits: {got:?} against candle's {want:?}");
        }
        let grads_of = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (fast, reference) = (grads_of(&on_kernels), grads_of(&on_candle));
        assert!(fast.get(&x).is_none(), "the model ran candle's conv2d: the data got a gradient");
        assert!(reference.get(&x).is_some(), "candle's conv2d gives the data a gradient");
        for var in model.vars() {
            let (g, w) = (fast.get(var.as_tensor()).unwrap(), reference.get(var.as_tensor()).unwrap());
            let worst = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(worst <= 1e-4, "{:?}: gradients differ by {worst}", var.dims());
        }
    }

    #[test]
    fn layout_is_sorted_by_name_within_segments_and_deterministic() {
        let spec = ModelSpec::from_toml(TWO_NN).unwrap();
        let a = Model::new(&spec, &Device::Cpu, 3).unwrap();
        let b = Model::new(&spec, &Device::Cpu, 3).unwrap();
        assert_eq!(a.layout(), b.layout());
        assert_eq!(a.flat().unwrap(), b.flat().unwrap());
        let names: Vec<_> = a.layout().entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "trunk.02.bias",
                "trunk.02.weight",
                "trunk.04.bias",
                "trunk.04.weight",
                "heads.digit.00.bias",
                "heads.digit.00.weight"
            ]
        );
        assert_eq!(a.layout().segments()[0].name, "trunk");
        assert_eq!(a.layout().segments()[1].offset, a.layout().segments()[0].len);
    }

    #[test]
    fn flat_and_safetensors_round_trip() {
        let spec = ModelSpec::from_toml(TWO_NN).unwrap();
        let a = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let b = Model::new(&spec, &Device::Cpu, 2).unwrap();
        assert_ne!(a.flat().unwrap(), b.flat().unwrap());
        b.load_safetensors(&a.to_safetensors().unwrap()).unwrap();
        assert_eq!(a.flat().unwrap(), b.flat().unwrap());
        assert!(b.set_flat(&[0.0; 3]).is_err());
        assert!(b.load_safetensors(b"not a safetensors file").is_err());
    }

    #[test]
    fn specs_that_would_overflow_or_allocate_without_bound_are_refused() {
        // Found in review, confirmed with the `model_spec_toml` target: a padding near i64::MAX
        // overflowed the padded size (a panic in a debug build, a wrong shape in a release one).
        let padding = "name='x'\ninput_shape=[1,4,4]\n[[trunk]]\nkind='conv2d'\nout_channels=1\nkernel=1\n\
                       padding=9223372036854775807\n[[heads]]\nname='a'\nclasses=2\n";
        let err = ModelSpec::from_toml(padding).unwrap_err().to_string();
        assert!(err.contains("padding = 9223372036854775807 is too large"), "{err}");
        // Found by the `model_spec_toml` fuzz target (minimised): the heads' output layers were
        // not counted, so a spec of a few bytes described a model of any size (this one 67.6
        // million parameters, `classes = 1000000000` 8 billion: 32 GB to build).
        let big_head = "name=''\ninput_shape=[7]\n[[heads]]\nname='r'\nclasses=8454567";
        let err = ModelSpec::from_toml(big_head).unwrap_err().to_string();
        assert!(err.contains("heads[0] (r) output") && err.contains("exceed"), "{err}");
        // Found with the `frame_server_msg` target: a secure evaluation of a head of 20,000
        // classes (100,000 parameters, a 400 kB plan) made the client build a 3.2 GB confusion
        // matrix.
        let many_classes = "name='x'\ninput_shape=[4]\n[[heads]]\nname='a'\nclasses=20000\n";
        let err = ModelSpec::from_toml(many_classes).unwrap_err().to_string();
        assert!(err.contains("confusion matrices"), "{err}");
        let largest = "name='x'\ninput_shape=[4]\n[[heads]]\nname='a'\nclasses=4096\n";
        assert!(ModelSpec::from_toml(largest).is_ok());
    }

    #[test]
    fn bad_specs_say_where() {
        let err = ModelSpec::from_toml(
            "name='x'\ninput_shape=[1,28,28]\n[[trunk]]\nkind='linear'\nout=3\n[[heads]]\nname='a'\nclasses=2",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("trunk layer 0") && err.contains("flatten"), "{err}");
        let err =
            ModelSpec::from_toml("name='x'\ninput_shape=[4]\n[[heads]]\nname='a'\nclasses=1").unwrap_err().to_string();
        assert!(err.contains("heads[0] (a)"), "{err}");
        let err =
            ModelSpec::from_toml("name='x'\ninput_shape=[4]\n[[trunk]]\nkind='linaer'\n").unwrap_err().to_string();
        assert!(err.contains("linaer"), "{err}");
        let huge =
            "name='x'\ninput_shape=[100000]\n[[trunk]]\nkind='linear'\nout=100000\n[[heads]]\nname='a'\nclasses=2";
        let err = ModelSpec::from_toml(huge).unwrap_err().to_string();
        assert!(err.contains("exceed"), "{err}");
    }

    /// A model of declared tensors: the PyTorch names of a ResNet block and two heads, one personal.
    const DECLARED: &str = "name = 'declared'\n\
        [[parameters]]\nname = 'layer1.conv.weight'\nshape = [4, 3, 3, 3]\n\
        [[parameters]]\nname = 'layer1.bn.weight'\nshape = [4]\ninit = 'ones'\n\
        [[parameters]]\nname = 'layer1.bn.bias'\nshape = [4]\ninit = 'zeros'\n\
        [[heads]]\nname = 'label'\nclasses = 3\n\
        [[heads.parameters]]\nname = 'fc.weight'\nshape = [3, 4]\n\
        [[heads.parameters]]\nname = 'fc.bias'\nshape = [3]\n\
        [[heads]]\nname = 'own'\nclasses = 2\npersonal = true\n\
        [[heads.parameters]]\nname = 'own.weight'\nshape = [2, 4]\n";

    #[test]
    fn declared_tensors_are_laid_out_by_their_names_started_as_declared_and_never_run() {
        let spec = ModelSpec::from_toml(DECLARED).unwrap();
        assert!(spec.declares_parameters());
        assert_eq!(ModelSpec::from_toml(&spec.to_toml()).unwrap(), spec, "the spec round-trips");
        let model = Model::new(&spec, &Device::Cpu, 3).unwrap();
        let names: Vec<&str> = model.layout().entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["layer1.bn.bias", "layer1.bn.weight", "layer1.conv.weight", "fc.bias", "fc.weight", "own.weight"]
        );
        let segments: Vec<(&str, usize, bool)> =
            model.layout().segments().iter().map(|s| (s.name.as_str(), s.len, s.personal)).collect();
        assert_eq!(segments, [("trunk", 4 + 4 + 108, false), ("label", 3 + 12, false), ("own", 8, true)]);
        let flat = model.flat().unwrap();
        let values = |name: &str| {
            let e = model.layout().entry(name).unwrap();
            flat[e.offset..e.offset + e.len].to_vec()
        };
        assert!(values("layer1.bn.bias").iter().all(|v| *v == 0.0));
        assert!(values("layer1.bn.weight").iter().all(|v| *v == 1.0));
        let conv = values("layer1.conv.weight");
        let bound = 1.0 / 27f32.sqrt();
        assert!(conv.iter().all(|v| v.abs() <= bound) && conv.iter().any(|v| *v != 0.0), "{conv:?}");
        // Checkpoints and exports carry them by name, and load back.
        let again = Model::new(&spec, &Device::Cpu, 4).unwrap();
        again.load_safetensors(&model.to_safetensors().unwrap()).unwrap();
        assert_eq!(again.flat().unwrap(), flat);
        // Nothing here can compute with it: the error says who can.
        let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let err = model.forward_head(&x, 0, Pass::Evaluate).unwrap_err().to_string();
        assert!(err.contains("declares its parameters only") && err.contains("Python"), "{err}");
    }

    #[test]
    fn declared_tensors_are_checked_with_the_place_named() {
        let head = "[[heads]]\nname = 'y'\nclasses = 2\n";
        for (text, words) in [
            (
                format!(
                    "name='m'\ninput_shape=[2]\n[[trunk]]\nkind='relu'\n[[parameters]]\nname='w'\nshape=[2]\n{head}"
                ),
                "not both",
            ),
            (
                format!("name='m'\n[[parameters]]\nname='w'\nshape=[2]\n[[parameters]]\nname='w'\nshape=[3]\n{head}"),
                "declared twice",
            ),
            (
                format!(
                    "name='m'\n[[parameters]]\nname='w'\nshape=[2]\n{head}[[heads.parameters]]\nname='w'\nshape=[2]\n"
                ),
                "declared twice",
            ),
            (format!("name='m'\n[[parameters]]\nname='a b'\nshape=[2]\n{head}"), "parameters[0]"),
            (format!("name='m'\n[[parameters]]\nname='w'\nshape=[2, 0]\n{head}"), "no zero dimension"),
            (format!("name='m'\n[[parameters]]\nname='w'\nshape=[]\n{head}"), "non-empty"),
            (format!("name='m'\n[[parameters]]\nname='w'\nshape=[100000, 100000]\n{head}"), "exceed"),
            (
                format!("name='m'\n[[parameters]]\nname='w'\nshape=[4294967296, 4294967296, 4294967296]\n{head}"),
                "exceed",
            ),
            (
                "name='m'\n[[parameters]]\nname='w'\nshape=[2]\n[[heads]]\nname='y'\nclasses=1\n".to_string(),
                "classes = 1",
            ),
            ("name='m'\n[[parameters]]\nname='w'\nshape=[2]\ninit='gaussian'\n".to_string(), "gaussian"),
            (format!("name='m'\n[[parameters]]\nname='__metadata__'\nshape=[2]\n{head}"), "reserved"),
            (format!("name='m'\n[[parameters]]\nname='w'\nshape=[1,1,1,1,1,1,1,1,1]\n{head}"), "rank 9"),
            (
                format!(
                    "name='m'\n{}{head}",
                    (0..4097).map(|i| format!("[[parameters]]\nname='w{i}'\nshape=[1]\n")).collect::<String>()
                ),
                "4097 tensors declared",
            ),
        ] {
            let err = ModelSpec::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(words), "{words}: {err}");
        }
    }
}
