//! 2-D convolution as im2col and one matrix product (bias and ReLU fused in), and max pooling
//! with the index of each window's maximum kept for the backward pass.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::{matmul, on_cpu, relu, relu_masked, tensor, values, Operand};

/// candle's `conv2d` of `x` `[batch, channels, height, width]` with `weight`
/// `[out_channels, channels, kernel, kernel]` (square kernel, no dilation, one group), plus
/// `bias` `[out_channels]`, then a ReLU if `relu`. No gradient for `x` when it needs none (the
/// data, in a model's first layer).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize, stride: usize, relu: bool) -> Result<Tensor> {
    let op = Conv { padding, stride, relu, columns: Mutex::new(None) };
    x.contiguous()?.apply_op3(&weight.contiguous()?, bias, op)
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

/// The im2col matrix of `x`: `[patch, batch * positions]`, row `(c, ki, kj)`, column
/// `(b, oh, ow)`, so that `weight [out_channels, patch] @ columns` is the convolution. Written
/// once, in order (the padding's zeros with the rest), never zero-filled first: for the CNN's
/// second layer the matrix is 6 MB a step.
fn im2col(x: &[f32], g: &Geometry) -> Vec<f32> {
    let (k, plane, width) = (g.kernel, g.height * g.width, g.out_width);
    let mut columns = Vec::with_capacity(g.patch() * g.columns());
    let zeros = |columns: &mut Vec<f32>, n: usize| columns.resize(columns.len() + n, 0.0);
    for c in 0..g.channels {
        for ki in 0..k {
            for kj in 0..k {
                let inside = g.inside_columns(kj);
                for b in 0..g.batch {
                    let image = (b * g.channels + c) * plane;
                    for oh in 0..g.out_height {
                        let Some(ih) = g.input_row(oh, ki).filter(|_| !inside.is_empty()) else {
                            zeros(&mut columns, width);
                            continue;
                        };
                        zeros(&mut columns, inside.start);
                        let first = image + ih * g.width + inside.start * g.stride + kj - g.padding;
                        if g.stride == 1 {
                            columns.extend_from_slice(&x[first..first + inside.len()]);
                        } else {
                            columns.extend(x[first..].iter().step_by(g.stride).take(inside.len()));
                        }
                        zeros(&mut columns, width - inside.end);
                    }
                }
            }
        }
    }
    debug_assert_eq!(columns.len(), g.patch() * g.columns());
    columns
}

/// The adjoint of [`im2col`]: each im2col cell's value added back onto the input value it was
/// copied from.
fn col2im(columns: &[f32], g: &Geometry) -> Vec<f32> {
    let mut x = vec![0f32; g.batch * g.channels * g.height * g.width];
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
    x
}

struct Conv {
    padding: usize,
    stride: usize,
    relu: bool,
    /// The forward pass's im2col matrix, which the weight's gradient needs again.
    columns: Mutex<Option<CpuStorage>>,
}

impl Conv {
    fn geometry(&self, x: &[usize], w: &[usize]) -> Result<Geometry> {
        Geometry::new(x, w, self.padding, self.stride)
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
        if b_layout.shape().dims1()? != g.out_channels {
            bail!("conv2d: bias {:?} for {} output channels", b_layout.dims(), g.out_channels);
        }
        let Some((w_start, _)) = w_layout.contiguous_offsets() else { bail!("conv2d: the weight must be contiguous") };
        let columns = CpuStorage::F32(im2col(values(x, x_layout, "conv2d input")?, &g));
        let (patch, cols, positions) = (g.patch(), g.columns(), g.positions());
        // columns^T @ weight^T, [batch * positions, out_channels]: the gemm crate runs this
        // orientation of the product faster (measured: 1.5 against 1.8 ms for the CNN's second
        // layer at batch 10).
        let product = matmul(
            &Operand::transposed(&columns, 0, patch, cols),
            &Operand::transposed(w, w_start, g.out_channels, patch),
            cols,
            g.out_channels,
            patch,
        )?;
        // The output is NCHW.
        let bias = values(b, b_layout, "conv2d bias")?;
        let mut out = vec![0f32; g.batch * g.out_channels * positions];
        for (b, image) in product.chunks_exact(positions * g.out_channels).enumerate() {
            let dst = &mut out[b * g.out_channels * positions..][..g.out_channels * positions];
            for (p, at_position) in image.chunks_exact(g.out_channels).enumerate() {
                for (o, (v, bias)) in at_position.iter().zip(bias).enumerate() {
                    let v = v + bias;
                    dst[o * positions + p] = if self.relu { relu(v) } else { v };
                }
            }
        }
        *self.columns.lock().expect("conv2d lock") = Some(columns);
        Ok((CpuStorage::F32(out), Shape::from((g.batch, g.out_channels, g.out_height, g.out_width))))
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
        let dy = dy.contiguous()?;
        let dz_nchw = on_cpu(&dy, |gs, gl| {
            on_cpu(y, |ys, yl| {
                Ok(relu_masked(values(gs, gl, "conv2d grad")?, values(ys, yl, "conv2d out")?, self.relu))
            })
        })?;
        // Back to the product's layout, [out_channels, batch * positions].
        let mut dz = vec![0f32; out_channels * cols];
        for (i, image) in dz_nchw.chunks_exact(positions).enumerate() {
            let (b, o) = (i / out_channels, i % out_channels);
            dz[o * cols + b * positions..][..positions].copy_from_slice(image);
        }
        let db = b.track_op().then(|| dz.chunks_exact(cols).map(|row| row.iter().sum()).collect::<Vec<f32>>());
        let db = db.map(|v| tensor(v, &[out_channels])).transpose()?;
        let dz = CpuStorage::F32(dz);
        let dw = if w.track_op() {
            let saved = self.columns.lock().expect("conv2d lock").take();
            let columns = match saved {
                Some(c) => c,
                None => CpuStorage::F32(on_cpu(x, |xs, xl| Ok(im2col(values(xs, xl, "conv2d input")?, &g)))?),
            };
            // The weight's gradient transposed, columns @ dz^T, [patch, out_channels]: this
            // orientation runs in half the time of dz @ columns^T (1.3 against 2.2-2.7 ms for
            // the CNN's second layer at batch 10); the transpose back is small.
            let dw_t = matmul(
                &Operand::rows(&columns, 0, patch, cols),
                &Operand::transposed(&dz, 0, out_channels, cols),
                patch,
                out_channels,
                cols,
            )?;
            let mut dw = vec![0f32; out_channels * patch];
            for (k, row) in dw_t.chunks_exact(out_channels).enumerate() {
                for (o, v) in row.iter().enumerate() {
                    dw[o * patch + k] = *v;
                }
            }
            Some(tensor(dw, w.dims())?)
        } else {
            None
        };
        // The data need no gradient: the first layer skips this product and col2im.
        let dx = if x.track_op() {
            let dcols = on_cpu(w, |ws, wl| {
                let Some((w_start, _)) = wl.contiguous_offsets() else {
                    bail!("conv2d: the weight must be contiguous")
                };
                matmul(
                    &Operand::transposed(ws, w_start, out_channels, patch),
                    &Operand::rows(&dz, 0, out_channels, cols),
                    patch,
                    cols,
                    out_channels,
                )
            })?;
            Some(tensor(col2im(&dcols, &g), x.dims())?)
        } else {
            None
        };
        Ok((dx, dw, db))
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
