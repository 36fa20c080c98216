//! What the CPU kernels keep between the steps of one training run: each parameter's gradient
//! and each layer's scratch buffers.
//!
//! Without it every step allocated and zero-filled its buffers (candle's matmul zero-fills its
//! output, and its backward starts every gradient as zeros and adds the op's gradient to them:
//! for the CNN's first dense layer 1.6 M values, three passes over 6.4 MB a step). With it, a
//! kernel's backward writes a parameter's gradient straight into the buffer kept here (adding
//! on, when the parameter is used twice in the step) and gives candle none, and the optimizer
//! reads it from here ([`Workspace::take_gradient`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId};
use cohort_matmul::Accumulate;

/// Gradients and scratch buffers for one training run on the CPU (one model, one thread at a
/// time). Share it as an `Arc`: each kernel op holds one until its backward has run. Only
/// variables' gradients are kept here (a kernel given a weight computed from one hands its
/// gradient to candle, which carries it back to the variable).
#[derive(Default)]
pub struct Workspace {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    gradients: HashMap<TensorId, Gradient>,
    /// Free buffers by owner and purpose: a stack, because a layer used twice in a step (the
    /// trunk under two heads) holds two of each at once.
    scratch: HashMap<(TensorId, Scratch), Vec<Vec<f32>>>,
}

/// A parameter's gradient buffer; `holds` is false between steps, when its values are stale.
struct Gradient {
    values: Vec<f32>,
    holds: bool,
}

/// Free buffers kept per owner and purpose.
const MAX_FREE_BUFFERS: usize = 4;

/// What a layer keeps a scratch buffer for, beside its weight's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scratch {
    /// A convolution's im2col matrix.
    Columns,
    /// A matrix product's output before its epilogue.
    Product,
    /// The gradient at a layer's output, in the product's layout.
    OutputGradient,
    /// A weight's gradient, transposed, before it is added to the parameter's.
    WeightGradient,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Workspace")
    }
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a gradient of `param` through `write`, which gets the buffer and whether it must add
    /// to it ([`Accumulate::Yes`]: a gradient is already there this step) or may overwrite it.
    pub(crate) fn add_gradient(
        &self,
        param: &Tensor,
        write: impl FnOnce(&mut [f32], Accumulate) -> Result<()>,
    ) -> Result<()> {
        let mut inner = self.inner.lock().expect("workspace lock");
        let len = param.elem_count();
        let gradient =
            inner.gradients.entry(param.id()).or_insert_with(|| Gradient { values: Vec::new(), holds: false });
        if gradient.values.len() != len {
            gradient.values = vec![0.0; len];
            gradient.holds = false;
        }
        let mode = if gradient.holds { Accumulate::Yes } else { Accumulate::No };
        // A failed write leaves the buffer half-written: it holds nothing then.
        gradient.holds = false;
        write(&mut gradient.values, mode)?;
        gradient.holds = true;
        Ok(())
    }

    /// `param`'s gradient of this step, if a kernel wrote one, passed to `read`; afterwards the
    /// buffer holds nothing until the next step writes it.
    pub fn take_gradient<R>(&self, param: &Tensor, read: impl FnOnce(&[f32]) -> R) -> Option<R> {
        // Moved out while `read` runs, so the lock is not held while the caller takes others
        // (the optimizer's update locks the variable's storage).
        let values = {
            let mut inner = self.inner.lock().expect("workspace lock");
            let gradient = inner.gradients.get_mut(&param.id()).filter(|g| g.holds)?;
            gradient.holds = false;
            std::mem::take(&mut gradient.values)
        };
        let result = read(&values);
        if let Some(gradient) = self.inner.lock().expect("workspace lock").gradients.get_mut(&param.id()) {
            gradient.values = values;
        }
        Some(result)
    }

    /// Forgets every gradient not taken: a step that failed half-way, or parameters a phase
    /// does not train, must not leave theirs to be added to by the next step.
    pub fn forget_gradients(&self) {
        let mut inner = self.inner.lock().expect("workspace lock");
        inner.gradients.values_mut().for_each(|g| g.holds = false);
    }

    /// A buffer of `len` values for `(owner, what)`, its values left from its last use (the
    /// caller overwrites all of them); give it back with [`Workspace::keep`].
    pub(crate) fn buffer(&self, owner: TensorId, what: Scratch, len: usize) -> Vec<f32> {
        let mut buffer = {
            let mut inner = self.inner.lock().expect("workspace lock");
            inner.scratch.get_mut(&(owner, what)).and_then(Vec::pop).unwrap_or_default()
        };
        // Only a buffer of another size is written here: the first step's, or after a shorter
        // last batch. The tests fill new values with NaN, so a value a kernel leaves unwritten
        // shows in its results.
        buffer.resize(len, if cfg!(test) { f32::NAN } else { 0.0 });
        buffer
    }

    /// Keeps `buffer` for the next step's [`Workspace::buffer`] of `(owner, what)`.
    pub(crate) fn keep(&self, owner: TensorId, what: Scratch, buffer: Vec<f32>) {
        let mut inner = self.inner.lock().expect("workspace lock");
        let free = inner.scratch.entry((owner, what)).or_default();
        // A bound, whatever the graph: no model spec uses a layer more than a few times a step.
        if free.len() < MAX_FREE_BUFFERS {
            free.push(buffer);
        }
    }
}

/// The workspace one kernel op writes into: the training run's, when one is given and the op's
/// weight and bias are variables (the gradients stay there for the optimizer), or a private
/// one, whose gradients the op hands to candle.
pub(crate) struct OpWorkspace {
    workspace: Arc<Workspace>,
    shared: bool,
}

impl OpWorkspace {
    pub(crate) fn new(run: Option<&Arc<Workspace>>, weight: &Tensor, bias: &Tensor) -> Self {
        match run.filter(|_| weight.is_variable() && bias.is_variable()) {
            Some(w) => Self { workspace: Arc::clone(w), shared: true },
            None => Self { workspace: Arc::new(Workspace::new()), shared: false },
        }
    }

    /// Whether this is the training run's workspace.
    pub(crate) fn shared(&self) -> bool {
        self.shared
    }

    /// The weight's and bias's gradients for candle: none when they stay in the run's
    /// workspace, else taken from the private one.
    pub(crate) fn for_candle(&self, weight: &Tensor, bias: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.shared {
            return Ok((None, None));
        }
        let take = |p: &Tensor| self.workspace.take_gradient(p, |g| super::tensor(g.to_vec(), p.dims())).transpose();
        Ok((take(weight)?, take(bias)?))
    }
}

impl std::ops::Deref for OpWorkspace {
    type Target = Workspace;

    fn deref(&self) -> &Workspace {
        &self.workspace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn a_workspace_keeps_a_bounded_number_of_free_buffers_per_layer() {
        // However often a graph hands buffers back (a layer used many times a step), the
        // workspace keeps at most MAX_FREE_BUFFERS of each: its memory is bounded by the model.
        let workspace = Workspace::new();
        let owner = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap().id();
        for _ in 0..100 {
            workspace.keep(owner, Scratch::Columns, vec![1.0; 1000]);
        }
        let kept = workspace.inner.lock().unwrap().scratch[&(owner, Scratch::Columns)].len();
        assert_eq!(kept, MAX_FREE_BUFFERS);
        // A buffer handed out has the length asked for, whatever it held before.
        assert_eq!(workspace.buffer(owner, Scratch::Columns, 10).len(), 10);
        assert_eq!(workspace.buffer(owner, Scratch::Columns, 5000).len(), 5000);
    }

    #[test]
    fn a_gradient_is_taken_once_and_the_first_write_of_a_step_replaces_the_last_steps() {
        let workspace = Workspace::new();
        let param = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let write = |value: f32| {
            workspace
                .add_gradient(&param, |g, mode| {
                    for v in g.iter_mut() {
                        *v = if mode == Accumulate::Yes { *v + value } else { value };
                    }
                    Ok(())
                })
                .unwrap()
        };
        assert!(workspace.take_gradient(&param, |_| ()).is_none(), "nothing written yet");
        write(1.0);
        write(2.0);
        assert_eq!(workspace.take_gradient(&param, |g| g.to_vec()), Some(vec![3.0; 4]));
        assert!(workspace.take_gradient(&param, |_| ()).is_none(), "taken once");
        write(5.0);
        assert_eq!(workspace.take_gradient(&param, |g| g.to_vec()), Some(vec![5.0; 4]));
        // A failed write leaves nothing to take.
        let failed = workspace.add_gradient(&param, |_, _| Err(candle_core::Error::Msg("no".into())));
        assert!(failed.is_err());
        assert!(workspace.take_gradient(&param, |_| ()).is_none());
    }
}
