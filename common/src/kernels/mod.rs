//! Fast CPU training paths for the layers of the model specs: dense and convolution layers (each
//! with its bias and an optional ReLU fused in), max pooling, cross-entropy and the SGD update.
//!
//! Each is a candle custom op whose backward computes only the gradients the graph needs. candle
//! 0.11's own backward computes every input's gradient, the data's too (a quarter of the 2NN's
//! arithmetic), and its `conv2d` backward runs `conv_transpose2d` as a direct loop and the kernel
//! gradient as a convolution with a 28x28 kernel: the CNN trained at a seventh of PyTorch's
//! speed. Here a convolution is im2col, one matrix product and, backward, col2im; max pooling
//! keeps the index of each window's maximum for its backward; the activations keep candle's
//! NCHW layout, so these ops mix with candle's own.
//!
//! The matrix products still run on candle's CPU matmul (the `gemm` crate), called through
//! [`BackendStorage::matmul`] on the op's own storages, so no operand is copied to reach it
//! (and no `unsafe` is needed). [`crate::model::Model`] uses these ops on the CPU only: they
//! have no CUDA forward, and a GPU keeps candle's own ops.

mod conv;
mod dense;

#[cfg(test)]
mod tests;

pub use conv::{conv2d, max_pool2d};
pub use dense::{cross_entropy, dense, sgd_step};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

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

/// One operand of a matrix product: a storage read through a 2-D layout (any strides, so a
/// transpose is a layout, never a copy).
struct Operand<'a> {
    storage: &'a CpuStorage,
    layout: Layout,
}

impl<'a> Operand<'a> {
    /// A row-major `rows x cols` matrix starting at `offset`.
    fn rows(storage: &'a CpuStorage, offset: usize, rows: usize, cols: usize) -> Self {
        Self { storage, layout: Layout::contiguous_with_offset((rows, cols), offset) }
    }

    /// The transpose of the row-major `rows x cols` matrix starting at `offset`: `cols x rows`.
    fn transposed(storage: &'a CpuStorage, offset: usize, rows: usize, cols: usize) -> Self {
        Self { storage, layout: Layout::new((cols, rows).into(), vec![1, cols], offset) }
    }
}

/// `a (m x k) @ b (k x n)`, row-major `m x n`, on candle's CPU matmul.
fn matmul(a: &Operand, b: &Operand, m: usize, n: usize, k: usize) -> Result<Vec<f32>> {
    match a.storage.matmul(b.storage, (1, m, n, k), &a.layout, &b.layout)? {
        CpuStorage::F32(v) => Ok(v),
        other => bail!("matmul gave {:?}, expected f32", other.dtype()),
    }
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
