//! 2-D convolution as im2col and one matrix product (bias, ReLU and max pooling fused in), and
//! max pooling on its own, each with the index of each window's maximum kept for the backward
//! pass.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, TensorId};

use super::dense::add_column_sums;
use super::workspace::{OpWorkspace, Scratch, Workspace};
use super::{matmul, on_cpu, relu, shape_error, tensor, values, Accumulate, Matrix, MatrixMut};

/// candle's `conv2d` of `x` `[batch, channels, height, width]` with `weight`
/// `[out_channels, channels, kernel, kernel]` (square kernel, no dilation, one group), plus
/// `bias` `[out_channels]`, then a ReLU if `relu`, then `max_pool2d(size)` if `pool` is
/// `Some(size)`. No gradient for `x` when it needs none (the data, in a model's first layer).
/// With a `workspace`, the weight's and bias's gradients go there, not to candle, and the
/// scratch buffers are kept there between steps (see [`Workspace`]).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    shape: ConvShape,
    workspace: Option<&Arc<Workspace>>,
) -> Result<Tensor> {
    let weight = weight.contiguous()?;
    let workspace = OpWorkspace::new(workspace, &weight, bias);
    let op = Conv { shape, weight_id: weight.id(), workspace, saved: Mutex::new(None) };
    x.contiguous()?.apply_op3(&weight, bias, op)
}

/// What a convolution does besides its product: padding, stride, and what is fused after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub padding: usize,
    pub stride: usize,
    /// A ReLU after the convolution.
    pub relu: bool,
    /// Max pooling with windows of this size (and stride) after the ReLU.
    pub pool: Option<usize>,
}

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    out_height: usize,
    out_width: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], padding: usize, stride: usize) -> Result<Self> {
        let (&[batch, channels, height, width], &[out_channels, w_channels, kernel, kernel_w]) = (x, w) else {
            bail!("conv2d: input {x:?} and weight {w:?} must both have four dimensions")
        };
        if w_channels != channels || kernel != kernel_w || stride == 0 || kernel == 0 {
            bail!("conv2d: input {x:?}, weight {w:?}, stride {stride}: a square kernel over the input's channels");
        }
        let (padded_h, padded_w) = (height + 2 * padding, width + 2 * padding);
        if padded_h < kernel || padded_w < kernel {
            bail!("conv2d: kernel {kernel} is larger than the padded input {padded_h}x{padded_w}");
        }
        let out_height = (padded_h - kernel) / stride + 1;
        let out_width = (padded_w - kernel) / stride + 1;
        Ok(Self { batch, channels, height, width, out_channels, kernel, padding, stride, out_height, out_width })
    }

    /// Values in one receptive field: the rows of the im2col matrix.
    fn patch(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// Output positions of one image.
    fn positions(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Output positions of the batch: the columns of the im2col matrix.
    fn columns(&self) -> usize {
        self.batch * self.positions()
    }

    /// The input row under output row `oh` at kernel row `ki`, if not in the padding.
    fn input_row(&self, oh: usize, ki: usize) -> Option<usize> {
        (oh * self.stride + ki).checked_sub(self.padding).filter(|&ih| ih < self.height)
    }

    /// The output columns whose input column at kernel column `kj` is inside the image (the
    /// others read the padding's zeros).
    fn inside_columns(&self, kj: usize) -> std::ops::Range<usize> {
        let first = if self.padding > kj { (self.padding - kj).div_ceil(self.stride) } else { 0 };
        let end = if self.width + self.padding > kj {
            ((self.width + self.padding - kj - 1) / self.stride + 1).min(self.out_width)
        } else {
            0
        };
        first.min(end)..end
    }

    /// Visits the runs of im2col cells that read the image rather than the padding, one per
    /// output row of each kernel offset, channel and image: `visit(index of the first input
    /// value, index of the im2col row's cell of output column 0, the output columns inside)`;
    /// the input values follow `stride` apart. col2im adds back along them ([`im2col`] walks the
    /// same cells in its own order, writing the padding's zeros too).
    fn for_each_row(&self, mut visit: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        let (k, plane, positions, columns) = (self.kernel, self.height * self.width, self.positions(), self.columns());
        for c in 0..self.channels {
            for ki in 0..k {
                for kj in 0..k {
                    let row = (c * k + ki) * k + kj;
                    let inside = self.inside_columns(kj);
                    if inside.is_empty() {
                        continue;
                    }
                    // The input column of output column `inside.start`.
                    let first_column = inside.start * self.stride + kj - self.padding;
                    for b in 0..self.batch {
                        let image = (b * self.channels + c) * plane;
                        for oh in 0..self.out_height {
                            let Some(ih) = self.input_row(oh, ki) else { continue };
                            let cell = row * columns + b * positions + oh * self.out_width;
                            visit(image + ih * self.width + first_column, cell, inside.clone());
                        }
                    }
                }
            }
        }
    }
}

/// The im2col matrix of `x` into `columns`: `[patch, batch * positions]`, row `(c, ki, kj)`,
/// column `(b, oh, ow)`, so that `weight [out_channels, patch] @ columns` is the convolution.
/// Every value is written, in order (the padding's zeros with the rest), so the buffer need not
/// be zeroed first: for the CNN's second layer the matrix is 6 MB a step.
fn im2col(x: &[f32], g: &Geometry, columns: &mut [f32]) {
    debug_assert_eq!(columns.len(), g.patch() * g.columns());
    let (k, plane) = (g.kernel, g.height * g.width);
    let mut rows = columns.chunks_exact_mut(g.out_width);
    for c in 0..g.channels {
        for ki in 0..k {
            for kj in 0..k {
                let inside = g.inside_columns(kj);
                for b in 0..g.batch {
                    let image = (b * g.channels + c) * plane;
                    for oh in 0..g.out_height {
                        let Some(row) = rows.next() else { return };
                        let Some(ih) = g.input_row(oh, ki).filter(|_| !inside.is_empty()) else {
                            row.fill(0.0);
                            continue;
                        };
                        row[..inside.start].fill(0.0);
                        row[inside.end..].fill(0.0);
                        let first = image + ih * g.width + inside.start * g.stride + kj - g.padding;
                        let dst = &mut row[inside.clone()];
                        if g.stride == 1 {
                            dst.copy_from_slice(&x[first..first + dst.len()]);
                        } else {
                            for (d, s) in dst.iter_mut().zip(x[first..].iter().step_by(g.stride)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: each im2col cell's value added back onto the input value it was
/// copied from.
/// `x` must hold zeros, or the gradient to add to.
fn col2im(columns: &[f32], g: &Geometry, x: &mut [f32]) {
    g.for_each_row(|input, cell, inside| {
        let src = &columns[cell + inside.start..cell + inside.end];
        if g.stride == 1 {
            for (d, s) in x[input..input + src.len()].iter_mut().zip(src) {
                *d += s;
            }
        } else {
            for (d, s) in x[input..].iter_mut().step_by(g.stride).zip(src) {
                *d += s;
            }
        }
    });
}

struct Conv {
    shape: ConvShape,
    /// The weight's id: the key of this layer's scratch buffers in the workspace.
    weight_id: TensorId,
    workspace: OpWorkspace,
    /// What the forward pass leaves for the backward: the im2col matrix (the weight's gradient
    /// needs it again) and, when pooling is fused in, each output's window maximum.
    saved: Mutex<Option<Saved>>,
}

struct Saved {
    columns: Vec<f32>,
    /// For each pooled output, in `[batch, pooled row, pooled column, out_channel]` order, the
    /// product row (`b * positions + oh * out_width + ow`) of its window's maximum.
    argmax: Vec<u32>,
}

impl Conv {
    fn geometry(&self, x: &[usize], w: &[usize]) -> Result<Geometry> {
        Geometry::new(x, w, self.shape.padding, self.shape.stride)
    }

    /// The pooled output's height and width, checked.
    fn pooled(&self, g: &Geometry) -> Result<Option<(usize, usize, usize)>> {
        let Some(s) = self.shape.pool else { return Ok(None) };
        if s == 0 || g.out_height < s || g.out_width < s {
            bail!("conv2d: pooling windows of {s} over {}x{}", g.out_height, g.out_width);
        }
        if g.columns() > u32::MAX as usize {
            bail!("conv2d: {} output positions are too many to pool", g.columns());
        }
        Ok(Some((s, g.out_height / s, g.out_width / s)))
    }
}

impl Drop for Conv {
    /// A forward pass whose backward never ran (a frozen trunk's, or evaluation's) gives its
    /// im2col buffer back for the next step.
    fn drop(&mut self) {
        let saved = self.saved.get_mut().map(Option::take).unwrap_or(None);
        if let (Some(saved), true) = (saved, self.workspace.shared()) {
            self.workspace.keep(self.weight_id, Scratch::Columns, saved.columns);
        }
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "cohort-conv2d"
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
        let g = self.geometry(x_layout.dims(), w_layout.dims())?;
        let out_channels = g.out_channels;
        if b_layout.shape().dims1()? != out_channels {
            bail!("conv2d: bias {:?} for {out_channels} output channels", b_layout.dims());
        }
        let pooled = self.pooled(&g)?;
        let (patch, cols, positions) = (g.patch(), g.columns(), g.positions());
        let w = values(w, w_layout, "conv2d weight")?;
        let mut columns = self.workspace.buffer(self.weight_id, Scratch::Columns, patch * cols);
        im2col(values(x, x_layout, "conv2d input")?, &g, &mut columns);
        // columns^T @ weight^T, [batch * positions, out_channels]: the gemm crate runs this
        // orientation of the product faster (measured: 1.5 against 1.8 ms for the CNN's second
        // layer at batch 10), and pooling reads whole rows of it.
        let mut product = self.workspace.buffer(self.weight_id, Scratch::Product, cols * out_channels);
        matmul(
            MatrixMut::rows(&mut product, cols, out_channels).map_err(shape_error)?,
            Matrix::rows(&columns, patch, cols).map_err(shape_error)?.t(),
            Matrix::rows(w, out_channels, patch).map_err(shape_error)?.t(),
            Accumulate::No,
        )?;
        let bias = values(b, b_layout, "conv2d bias")?;
        let activate = |v: f32| if self.shape.relu { relu(v) } else { v };
        // The output is NCHW.
        let (out, argmax, dims) = match pooled {
            None => {
                let mut out = vec![0f32; g.batch * out_channels * positions];
                for (b, image) in product.chunks_exact(positions * out_channels).enumerate() {
                    let dst = &mut out[b * out_channels * positions..][..out_channels * positions];
                    for (p, at_position) in image.chunks_exact(out_channels).enumerate() {
                        for (o, (v, bias)) in at_position.iter().zip(bias).enumerate() {
                            dst[o * positions + p] = activate(v + bias);
                        }
                    }
                }
                (out, Vec::new(), (g.batch, out_channels, g.out_height, g.out_width))
            }
            Some((s, rows, width)) => {
                let cells = rows * width;
                let mut out = vec![0f32; g.batch * out_channels * cells];
                let mut argmax = vec![0u32; g.batch * cells * out_channels];
                let mut best = vec![0f32; out_channels];
                for b in 0..g.batch {
                    for ph in 0..rows {
                        for pw in 0..width {
                            let row_of =
                                |di: usize, dj: usize| b * positions + (ph * s + di) * g.out_width + pw * s + dj;
                            let cell = ph * width + pw;
                            let at = &mut argmax[(b * cells + cell) * out_channels..][..out_channels];
                            let first = row_of(0, 0);
                            best.copy_from_slice(&product[first * out_channels..][..out_channels]);
                            at.fill(first as u32);
                            for di in 0..s {
                                for dj in (0..s).filter(|&dj| di + dj > 0) {
                                    let row = row_of(di, dj);
                                    let values = &product[row * out_channels..][..out_channels];
                                    keep_maxima(&mut best, at, values, row as u32);
                                }
                            }
                            // The bias is the same across the window and the ReLU monotonic, so
                            // both apply to the maximum alone.
                            for (o, (v, bias)) in best.iter().zip(bias).enumerate() {
                                out[(b * out_channels + o) * cells + cell] = activate(v + bias);
                            }
                        }
                    }
                }
                (out, argmax, (g.batch, out_channels, rows, width))
            }
        };
        self.workspace.keep(self.weight_id, Scratch::Product, product);
        *self.saved.lock().expect("conv2d lock") = Some(Saved { columns, argmax });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(x.dims(), w.dims())?;
        let (patch, cols, positions, out_channels) = (g.patch(), g.columns(), g.positions(), g.out_channels);
        let Some(saved) = self.saved.lock().expect("conv2d lock").take() else {
            bail!("conv2d: backward without forward")
        };
        let dy = dy.contiguous()?;
        // The gradient at the product, in its layout [batch * positions, out_channels], the
        // ReLU's and the pooling's gradients applied.
        let mut dz = self.workspace.buffer(self.weight_id, Scratch::OutputGradient, cols * out_channels);
        on_cpu(&dy, |gs, gl| {
            on_cpu(y, |ys, yl| {
                let (dy, y) = (values(gs, gl, "conv2d grad")?, values(ys, yl, "conv2d out")?);
                let passes = |at: usize| !self.shape.relu || y[at] > 0.0;
                match self.pooled(&g)? {
                    None => {
                        for b in 0..g.batch {
                            for o in 0..out_channels {
                                let from = (b * out_channels + o) * positions;
                                let dz = &mut dz[b * positions * out_channels..][..positions * out_channels];
                                for (p, &d) in dy[from..from + positions].iter().enumerate() {
                                    dz[p * out_channels + o] = if passes(from + p) { d } else { 0.0 };
                                }
                            }
                        }
                    }
                    Some((s, rows, width)) => {
                        let cells = rows * width;
                        if saved.argmax.len() != dy.len() || dy.len() != g.batch * out_channels * cells {
                            bail!("conv2d: a pooled gradient of {} values for {} maxima", dy.len(), saved.argmax.len());
                        }
                        // Where the windows leave rows or columns out, those get no gradient.
                        if rows * s != g.out_height || width * s != g.out_width {
                            dz.fill(0.0);
                        }
                        // Every cell of every window written once: the window's gradient at
                        // its maximum, zero elsewhere (no zero-fill first, no scattered adds).
                        let mut gradient = vec![0f32; out_channels];
                        for b in 0..g.batch {
                            for cell in 0..cells {
                                for (o, d) in gradient.iter_mut().enumerate() {
                                    let at = (b * out_channels + o) * cells + cell;
                                    *d = if passes(at) { dy[at] } else { 0.0 };
                                }
                                let maxima = &saved.argmax[(b * cells + cell) * out_channels..][..out_channels];
                                let (ph, pw) = (cell / width, cell % width);
                                for di in 0..s {
                                    for dj in 0..s {
                                        let row = b * positions + (ph * s + di) * g.out_width + pw * s + dj;
                                        let dz = &mut dz[row * out_channels..][..out_channels];
                                        route_to_maxima(dz, &gradient, maxima, row as u32);
                                    }
                                }
                            }
                        }
                    }
                }
                Ok(())
            })
        })?;
        if b.track_op() {
            self.workspace.add_gradient(b, |db, mode| {
                add_column_sums(&dz, db, mode);
                Ok(())
            })?;
        }
        let Saved { columns, .. } = saved;
        if w.track_op() {
            // The weight's gradient transposed, columns @ dz, [patch, out_channels]: this
            // orientation runs in half the time of the untransposed one (1.3 against 1.9 ms for
            // the CNN's second layer at batch 10); the transpose into the gradient is small.
            let mut dw_t = self.workspace.buffer(self.weight_id, Scratch::WeightGradient, patch * out_channels);
            matmul(
                MatrixMut::rows(&mut dw_t, patch, out_channels).map_err(shape_error)?,
                Matrix::rows(&columns, patch, cols).map_err(shape_error)?,
                Matrix::rows(&dz, cols, out_channels).map_err(shape_error)?,
                Accumulate::No,
            )?;
            self.workspace.add_gradient(w, |dw, mode| {
                for (k, row) in dw_t.chunks_exact(out_channels).enumerate() {
                    for (o, v) in row.iter().enumerate() {
                        let d = &mut dw[o * patch + k];
                        *d = if mode == Accumulate::Yes { *d + v } else { *v };
                    }
                }
                Ok(())
            })?;
            self.workspace.keep(self.weight_id, Scratch::WeightGradient, dw_t);
        }
        // The data need no gradient: the first layer skips this product and col2im. The
        // columns' buffer is free now and holds the columns' gradient.
        let mut dcols = columns;
        let dx = if x.track_op() {
            on_cpu(w, |ws, wl| {
                let w = Matrix::rows(values(ws, wl, "conv2d weight")?, out_channels, patch).map_err(shape_error)?;
                matmul(
                    MatrixMut::rows(&mut dcols, patch, cols).map_err(shape_error)?,
                    w.t(),
                    Matrix::rows(&dz, cols, out_channels).map_err(shape_error)?.t(),
                    Accumulate::No,
                )
            })?;
            let mut dx = vec![0f32; x.elem_count()];
            col2im(&dcols, &g, &mut dx);
            Some(tensor(dx, x.dims())?)
        } else {
            None
        };
        self.workspace.keep(self.weight_id, Scratch::Columns, dcols);
        self.workspace.keep(self.weight_id, Scratch::OutputGradient, dz);
        let (dw, db) = self.workspace.for_candle(w, b)?;
        Ok((dx, dw, db))
    }
}

/// One more cell of a pooling window: where its `values` beat the window's `best` so far (or
/// are NaN, so a diverged model shows in the loss), they and their product `row` replace
/// `best` and `at`. The selects are bit masks, which the compiler vectorizes (it leaves
/// `if`-selects between floats and integers scalar, with branches).
#[inline(always)]
fn keep_maxima(best: &mut [f32], at: &mut [u32], values: &[f32], row: u32) {
    let n = best.len();
    let (at, values) = (&mut at[..n], &values[..n]);
    for o in 0..n {
        let v = values[o];
        let better = 0u32.wrapping_sub(u32::from((v > best[o]) | v.is_nan()));
        best[o] = f32::from_bits((v.to_bits() & better) | (best[o].to_bits() & !better));
        at[o] = (row & better) | (at[o] & !better);
    }
}

/// The gradient at one cell (product `row`) of a pooling window: the window's `gradient` for
/// the channels whose maximum it holds, zero for the others (a bit mask, as above).
#[inline(always)]
fn route_to_maxima(dz: &mut [f32], gradient: &[f32], maxima: &[u32], row: u32) {
    let n = dz.len();
    let (gradient, maxima) = (&gradient[..n], &maxima[..n]);
    for o in 0..n {
        let here = 0u32.wrapping_sub(u32::from(maxima[o] == row));
        dz[o] = f32::from_bits(gradient[o].to_bits() & here);
    }
}

/// candle's `max_pool2d(size)` (windows of `size x size`, stride `size`) of `x`
/// `[batch, channels, height, width]`; the backward pass sends each gradient to the window's
/// maximum, found again from the indices kept by the forward pass.
pub fn max_pool2d(x: &Tensor, size: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool { size, argmax: Mutex::new(Vec::new()) })
}

struct MaxPool {
    size: usize,
    /// For each output value, the index into the input of its window's maximum.
    argmax: Mutex<Vec<usize>>,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "cohort-max-pool2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        let s = self.size;
        if s == 0 || height < s || width < s {
            bail!("max_pool2d: windows of {s} over {height}x{width}");
        }
        let x = values(x, layout, "max_pool2d input")?;
        // The FedAvg CNN's windows of 2 get a copy of the loop with the size known, unrolled.
        let (out, argmax) = match s {
            2 => pool_planes(x, 2, height, width),
            _ => pool_planes(x, s, height, width),
        };
        *self.argmax.lock().expect("max_pool2d lock") = argmax;
        Ok((CpuStorage::F32(out), Shape::from((batch, channels, height / s, width / s))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let argmax = std::mem::take(&mut *self.argmax.lock().expect("max_pool2d lock"));
        if argmax.len() != dy.elem_count() {
            bail!("max_pool2d: backward without forward");
        }
        let dy = dy.contiguous()?;
        let mut dx = vec![0f32; x.elem_count()];
        on_cpu(&dy, |gs, gl| {
            for (&at, g) in argmax.iter().zip(values(gs, gl, "max_pool2d grad")?) {
                dx[at] += g;
            }
            Ok(())
        })?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// The maxima of the `s x s` windows of each `height x width` plane of `x`, and their indices
/// into `x`.
#[inline(always)]
fn pool_planes(x: &[f32], s: usize, height: usize, width: usize) -> (Vec<f32>, Vec<usize>) {
    let (out_h, out_w) = (height / s, width / s);
    let outputs = x.len() / (height * width) * out_h * out_w;
    let (mut out, mut argmax) = (Vec::with_capacity(outputs), Vec::with_capacity(outputs));
    for (plane, image) in x.chunks_exact(height * width).enumerate() {
        for oh in 0..out_h {
            let top = plane * height * width + oh * s * width;
            let rows = &image[oh * s * width..(oh * s + s) * width];
            for ow in 0..out_w {
                let (mut best, mut at) = (rows[ow * s], ow * s);
                for di in 0..s {
                    let start = di * width + ow * s;
                    for (offset, &v) in (start..).zip(&rows[start..start + s]) {
                        // Branch-free selects (the maximum's place is random), and NaN wins,
                        // so a diverged model shows in the loss.
                        let better = v > best || v.is_nan();
                        best = if better { v } else { best };
                        at = if better { offset } else { at };
                    }
                }
                out.push(best);
                argmax.push(top + at);
            }
        }
    }
    (out, argmax)
}
