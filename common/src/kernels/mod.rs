//! Fast CPU training paths for the layers of the model specs: dense and convolution layers (each
//! with its bias and an optional ReLU fused in, a convolution with the max pooling after it too),
//! max pooling with saved indices, cross-entropy and the SGD update.
//!
//! Each is a candle custom op whose backward computes only the gradients the graph needs. candle
//! 0.11's own backward computes every input's gradient, the data's too (a quarter of the 2NN's
//! arithmetic), and its `conv2d` backward runs `conv_transpose2d` as a direct loop and the kernel
//! gradient as a convolution with a 28x28 kernel: the CNN trained at a seventh of PyTorch's
//! speed. Here a convolution is im2col, one matrix product and, backward, col2im; max pooling
//! keeps the index of each window's maximum for its backward (fused into the convolution before
//! it, the pooling reads the product's rows and no convolution-sized activation is made); the
//! activations keep candle's NCHW layout, so these ops mix with candle's own.
//!
//! The pieces:
//! - `dense` ([`dense()`], [`cross_entropy`], [`sgd_step`]) and `conv` ([`conv2d`],
//!   [`max_pool2d`]): the ops;
//! - [`Workspace`]: what a training run keeps between steps. Given one, the ops write parameter
//!   gradients into its buffers instead of handing them to candle's `GradStore` (which zeroes
//!   and adds a new tensor per parameter and step), reuse its scratch buffers, and the
//!   optimizer takes the gradients from it. Without one (a single forward and backward, as in
//!   the tests against candle's ops), each op keeps a private one and hands its gradients to
//!   candle as usual.
//!
//! The matrix products run on the `gemm` crate through [`cohort_matmul`] (the crate candle's CPU
//! matmul uses, without its zero-filled output), in the orientation measured fastest for each
//! product. [`crate::model::Model`] uses these ops on the CPU only: they have no CUDA forward,
//! and a GPU keeps candle's own ops.

mod conv;
mod dense;
mod workspace;

#[cfg(test)]
mod tests;

pub use conv::{conv2d, max_pool2d, ConvShape};
pub use dense::{cross_entropy, dense, sgd_step};
pub use workspace::Workspace;

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};
use cohort_matmul::{Accumulate, Matrix, MatrixMut};

/// `max_pool2d(size)` from candle's reshape and max, for any device. candle 0.11's own
/// `max_pool2d` has the right values but a backward that scales every gradient by 1/size^2
/// (it multiplies by the share of maxima in the window where it means to divide), so a model
/// on the GPU trains with this one; [`max_pool2d`] is the CPU's.
pub fn max_pool2d_by_reshape(x: &Tensor, size: usize) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let (rows, cols) = (height / size, width / size);
    let windows = x.narrow(2, 0, rows * size)?.narrow(3, 0, cols * size)?;
    let windows = windows.reshape((batch, channels, rows, size, cols, size))?.permute((0, 1, 2, 4, 3, 5))?;
    windows.reshape((batch, channels, rows, cols, size * size))?.max(candle_core::D::Minus1)
}

/// The values of a contiguous f32 storage, from its layout's offset.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let all = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// Runs `f` on a CPU tensor's storage and layout.
fn on_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu, layout),
        _ => bail!("the CPU kernels take CPU tensors only"),
    }
}

/// `out = a @ b` (or `+=`) on candle's CPU thread count.
fn matmul(out: MatrixMut, a: Matrix, b: Matrix, accumulate: Accumulate) -> Result<()> {
    cohort_matmul::matmul(out, a, b, accumulate, candle_core::utils::get_num_threads()).map_err(shape_error)
}

/// A view or product that does not fit, as candle's error.
fn shape_error(e: cohort_matmul::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("CPU kernel: {e}"))
}

/// A new CPU tensor owning `values`.
fn tensor(values: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
}

/// `dy`, with the ReLU's gradient applied where it was fused in: zero where the output `y` was
/// not positive.
fn relu_masked(dy: &[f32], y: &[f32], relu: bool) -> Vec<f32> {
    if relu {
        dy.iter().zip(y).map(|(&g, &v)| if v > 0.0 { g } else { 0.0 }).collect()
    } else {
        dy.to_vec()
    }
}

/// ReLU that keeps NaN (`f32::max` would turn it into 0 and hide a diverged model).
#[inline]
fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}
