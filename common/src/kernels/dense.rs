//! The dense layer (bias and ReLU fused in), cross-entropy and the in-place SGD update.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, InplaceOp1, Layout, Result, Shape, Tensor, Var};

use super::workspace::{OpWorkspace, Workspace};
use super::{matmul, on_cpu, relu, relu_masked, shape_error, tensor, values, Accumulate, Matrix, MatrixMut};

/// `x @ weight^T + bias` for `x` of shape `[batch, inputs]` and `weight` of shape
/// `[outputs, inputs]` (candle's `Linear`), then a ReLU if `relu`. No gradient for `x` when it
/// needs none (the data). With a `workspace`, the weight's and bias's gradients go there, not to
/// candle (see [`Workspace`]).
pub fn dense(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    relu: bool,
    workspace: Option<&Arc<Workspace>>,
) -> Result<Tensor> {
    let workspace = OpWorkspace::new(workspace, weight, bias);
    x.contiguous()?.apply_op3(&weight.contiguous()?, bias, Dense { relu, workspace })
}

struct Dense {
    relu: bool,
    workspace: OpWorkspace,
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "cohort-dense"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, inputs) = x_layout.shape().dims2()?;
        let (outputs, weight_inputs) = w_layout.shape().dims2()?;
        if weight_inputs != inputs || b_layout.shape().dims1()? != outputs {
            bail!("dense: input {:?}, weight {:?}, bias {:?}", x_layout.dims(), w_layout.dims(), b_layout.dims());
        }
        let (x, w) = (values(x, x_layout, "dense input")?, values(w, w_layout, "dense weight")?);
        // y^T = weight @ x^T, [outputs, batch]: with the weight's rows as the product's rows the
        // gemm crate runs this in half the time of x @ weight^T (0.65 against 1.2 ms for the
        // CNN's 3136 x 512 layer at batch 10); the transpose back is small.
        let mut y_t = vec![0f32; outputs * batch];
        matmul(
            MatrixMut::rows(&mut y_t, outputs, batch).map_err(shape_error)?,
            Matrix::rows(w, outputs, inputs).map_err(shape_error)?,
            Matrix::rows(x, batch, inputs).map_err(shape_error)?.t(),
            Accumulate::No,
        )?;
        let bias = values(b, b_layout, "dense bias")?;
        let mut y = vec![0f32; batch * outputs];
        for (o, (row, bias)) in y_t.chunks_exact(batch.max(1)).zip(bias).enumerate() {
            for (e, v) in row.iter().enumerate() {
                let v = v + bias;
                y[e * outputs + o] = if self.relu { relu(v) } else { v };
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, inputs) = x.dims2()?;
        let outputs = w.dim(0)?;
        let dy = dy.contiguous()?;
        let dz = on_cpu(&dy, |gs, gl| {
            on_cpu(y, |ys, yl| Ok(relu_masked(values(gs, gl, "dense grad")?, values(ys, yl, "dense out")?, self.relu)))
        })?;
        let dz_rows = Matrix::rows(&dz, batch, outputs).map_err(shape_error)?;
        if b.track_op() {
            self.workspace.add_gradient(b, |db, mode| {
                add_column_sums(&dz, db, mode);
                Ok(())
            })?;
        }
        if w.track_op() {
            // dW = dz^T @ x, [outputs, inputs], straight into the gradient's buffer.
            self.workspace.add_gradient(w, |dw, mode| {
                on_cpu(x, |xs, xl| {
                    let x = Matrix::rows(values(xs, xl, "dense input")?, batch, inputs).map_err(shape_error)?;
                    matmul(MatrixMut::rows(dw, outputs, inputs).map_err(shape_error)?, dz_rows.t(), x, mode)
                })
            })?;
        }
        // The data need no gradient: skipping it saves a quarter of the 2NN's arithmetic.
        let dx = if x.track_op() {
            let mut dx = vec![0f32; batch * inputs];
            on_cpu(w, |ws, wl| {
                let w = Matrix::rows(values(ws, wl, "dense weight")?, outputs, inputs).map_err(shape_error)?;
                matmul(MatrixMut::rows(&mut dx, batch, inputs).map_err(shape_error)?, dz_rows, w, Accumulate::No)
            })?;
            Some(tensor(dx, &[batch, inputs])?)
        } else {
            None
        };
        let (dw, db) = self.workspace.for_candle(w, b)?;
        Ok((dx, dw, db))
    }
}

/// Sums of the columns of a row-major matrix `sums.len()` wide, written into `sums` or added to
/// them.
pub(super) fn add_column_sums(m: &[f32], sums: &mut [f32], mode: Accumulate) {
    if mode == Accumulate::No {
        sums.fill(0.0);
    }
    for row in m.chunks_exact(sums.len().max(1)) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
}

/// Mean cross-entropy of `logits` `[batch, classes]` against `targets` `[batch]` (u32), with
/// optional per-class weights: PyTorch's `weight=` with mean reduction, the sum of the weighted
/// losses over the sum of the targets' weights (at least 1e-12, so a batch of weightless
/// classes gives 0). Without weights every class weighs 1, by the same arithmetic, so equal
/// weights and no weights train identically.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, class_weights: Option<&Tensor>) -> Result<Tensor> {
    let weights = class_weights.map(|w| w.to_vec1::<f32>()).transpose()?;
    logits.apply_op2(targets, CrossEntropy { weights, grad: Mutex::new(None) })
}

struct CrossEntropy {
    weights: Option<Vec<f32>>,
    /// d loss / d logits, found in the forward pass (softmax minus the one-hot target, weighted).
    grad: Mutex<Option<Vec<f32>>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cohort-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, classes) = logits_layout.shape().dims2()?;
        let z = values(logits, logits_layout, "cross-entropy logits")?;
        let Some((start, end)) = targets_layout.contiguous_offsets() else {
            bail!("cross-entropy: the targets must be contiguous")
        };
        let targets = &targets.as_slice::<u32>()?[start..end];
        if targets.len() != batch {
            bail!("cross-entropy: {} targets for {batch} examples", targets.len());
        }
        let mut grad = vec![0f32; batch * classes];
        let (mut loss, mut total_weight) = (0f64, 0f32);
        for ((row, g), &t) in z.chunks_exact(classes).zip(grad.chunks_exact_mut(classes)).zip(targets) {
            let t = t as usize;
            if t >= classes {
                bail!("cross-entropy: target {t} of {classes} classes");
            }
            let weight = self.weights.as_ref().map_or(Some(1.0), |w| w.get(t).copied());
            let Some(weight) = weight else { bail!("cross-entropy: no weight for class {t}") };
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            let log_sum = max + sum.ln();
            loss += f64::from(weight * (log_sum - row[t]));
            total_weight += weight;
            for (g, v) in g.iter_mut().zip(row) {
                *g = weight * (v - log_sum).exp();
            }
            g[t] -= weight;
        }
        let total = total_weight.max(1e-12);
        grad.iter_mut().for_each(|g| *g /= total);
        *self.grad.lock().expect("cross-entropy lock") = Some(grad);
        Ok((CpuStorage::F32(vec![(loss / f64::from(total)) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _: &Tensor, _: &Tensor, dloss: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = dloss.to_scalar::<f32>()?;
        let Some(mut grad) = self.grad.lock().expect("cross-entropy lock").take() else {
            bail!("cross-entropy: backward without forward")
        };
        if scale != 1.0 {
            grad.iter_mut().for_each(|g| *g *= scale);
        }
        Ok((Some(tensor(grad, logits.dims())?), None))
    }
}

/// One SGD step of `var`, in place in its storage, PyTorch's formulation: `g += weight_decay w`,
/// `v = momentum v + g` (the first `v` being `g`; `velocity` is the variable's, empty before its
/// first step), `w -= lr v`. Nothing is allocated after the first step (candle's tensor
/// arithmetic allocates three of the weight's size).
pub fn sgd_step(
    var: &Var,
    grad: &[f32],
    velocity: &mut Vec<f32>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<()> {
    if grad.len() != var.elem_count() {
        bail!("sgd: a gradient of {} values for a variable of {}", grad.len(), var.elem_count());
    }
    let step = Descend {
        grad,
        velocity: Mutex::new(velocity),
        lr: lr as f32,
        momentum: momentum as f32,
        weight_decay: weight_decay as f32,
    };
    var.as_tensor().inplace_op1(&step)
}

/// `w -= lr * v`, `v` as [`sgd_step`] says.
struct Descend<'a> {
    grad: &'a [f32],
    velocity: Mutex<&'a mut Vec<f32>>,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
}

impl InplaceOp1 for Descend<'_> {
    fn name(&self) -> &'static str {
        "cohort-sgd"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, w_layout: &Layout) -> Result<()> {
        let w = weights_mut(w, w_layout, self.grad.len())?;
        let (lr, wd) = (self.lr, self.weight_decay);
        if self.momentum <= 0.0 {
            for (w, g) in w.iter_mut().zip(self.grad) {
                let g = if wd > 0.0 { g + *w * wd } else { *g };
                *w -= g * lr;
            }
            return Ok(());
        }
        let mut velocity = self.velocity.lock().expect("sgd lock");
        if velocity.len() != w.len() {
            // The first step: `v = momentum * 0 + g` is exactly `g`.
            velocity.clear();
            velocity.resize(w.len(), 0.0);
        }
        for ((w, g), v) in w.iter_mut().zip(self.grad).zip(velocity.iter_mut()) {
            let g = if wd > 0.0 { g + *w * wd } else { *g };
            *v = *v * self.momentum + g;
            *w -= *v * lr;
        }
        Ok(())
    }
}

/// The values of a contiguous f32 storage, mutably, checked to hold `len` of them.
fn weights_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, len: usize) -> Result<&'a mut [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("sgd: the variable must be contiguous") };
    if end - start != len {
        bail!("sgd: {} values against a gradient of {len}", end - start);
    }
    match storage {
        CpuStorage::F32(values) => Ok(&mut values[start..end]),
        other => bail!("sgd: the variable is {:?}, expected f32", other.dtype()),
    }
}
