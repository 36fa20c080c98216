//! The dense layer (bias and ReLU fused in), cross-entropy and the in-place SGD update.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor, Var};

use super::{matmul, on_cpu, relu, relu_masked, tensor, values, Operand};

/// `x @ weight^T + bias` for `x` of shape `[batch, inputs]` and `weight` of shape
/// `[outputs, inputs]` (candle's `Linear`), then a ReLU if `relu`. No gradient for `x` when it
/// needs none (the data).
pub fn dense(x: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool) -> Result<Tensor> {
    x.apply_op3(weight, bias, Dense { relu })
}

struct Dense {
    relu: bool,
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
        // The weight's rows are its outputs: its transpose is a layout over the same storage.
        let w_t = Operand { storage: w, layout: w_layout.transpose(0, 1)? };
        let mut y = matmul(&Operand { storage: x, layout: x_layout.clone() }, &w_t, batch, outputs, inputs)?;
        let bias = values(b, b_layout, "dense bias")?;
        for row in y.chunks_exact_mut(outputs) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
                if self.relu {
                    *v = relu(*v);
                }
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
        let db = b.track_op().then(|| column_sums(&dz, outputs)).map(|v| tensor(v, &[outputs])).transpose()?;
        let dz = CpuStorage::F32(dz);
        let dw = if w.track_op() {
            let dz_t = Operand::transposed(&dz, 0, batch, outputs);
            let dw = on_cpu(x, |xs, xl| {
                matmul(&dz_t, &Operand { storage: xs, layout: xl.clone() }, outputs, inputs, batch)
            })?;
            Some(tensor(dw, &[outputs, inputs])?)
        } else {
            None
        };
        // The data need no gradient: skipping it saves a quarter of the 2NN's arithmetic.
        let dx = if x.track_op() {
            let dz = Operand::rows(&dz, 0, batch, outputs);
            let dx =
                on_cpu(w, |ws, wl| matmul(&dz, &Operand { storage: ws, layout: wl.clone() }, batch, inputs, outputs))?;
            Some(tensor(dx, &[batch, inputs])?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Sums of the columns of a row-major matrix `width` wide.
fn column_sums(m: &[f32], width: usize) -> Vec<f32> {
    let mut sums = vec![0f32; width];
    for row in m.chunks_exact(width) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    sums
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
/// `v = momentum v + g` (the first `v` being `g`; `velocity` is the variable's, `None` before its
/// first step), `w -= lr v`. No tensor is allocated after the first step (candle's tensor
/// arithmetic allocates three of the weight's size).
pub fn sgd_step(
    var: &Var,
    grad: &Tensor,
    velocity: &mut Option<Tensor>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<()> {
    let grad = grad.contiguous()?;
    let weight_decay = weight_decay as f32;
    if momentum > 0.0 {
        // A zero velocity makes the first step's `v = momentum * 0 + g` exactly `g`.
        let v = match velocity.take() {
            Some(v) => v,
            None => var.as_tensor().zeros_like()?,
        };
        v.inplace_op3(&grad, var.as_tensor(), &Accumulate { momentum: momentum as f32, weight_decay })?;
        var.as_tensor().inplace_op2(&v, &Descend { lr: lr as f32, weight_decay: 0.0 })?;
        *velocity = Some(v);
    } else {
        var.as_tensor().inplace_op2(&grad, &Descend { lr: lr as f32, weight_decay })?;
    }
    Ok(())
}

/// `w -= lr * (g + weight_decay * w)`.
struct Descend {
    lr: f32,
    weight_decay: f32,
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "cohort-sgd-descend"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, w_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> Result<()> {
        let g = values(g, g_layout, "sgd gradient")?;
        let w = weights_mut(w, w_layout, g.len())?;
        for (w, g) in w.iter_mut().zip(g) {
            let step = if self.weight_decay > 0.0 { g + *w * self.weight_decay } else { *g };
            *w -= step * self.lr;
        }
        Ok(())
    }
}

/// `v = momentum * v + g + weight_decay * w`.
struct Accumulate {
    momentum: f32,
    weight_decay: f32,
}

impl InplaceOp3 for Accumulate {
    fn name(&self) -> &'static str {
        "cohort-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        v_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<()> {
        let g = values(g, g_layout, "sgd gradient")?;
        let w = values(w, w_layout, "sgd weights")?;
        let v = weights_mut(v, v_layout, g.len())?;
        for ((v, g), w) in v.iter_mut().zip(g).zip(w) {
            let g = if self.weight_decay > 0.0 { g + w * self.weight_decay } else { *g };
            *v = *v * self.momentum + g;
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
