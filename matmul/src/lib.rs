//! A safe f32 matrix product over strided views of slices, on the `gemm` crate (the one
//! candle's CPU matmul runs on).
//!
//! Cohort's CPU training kernels (`cohort_common::kernels`) need what candle's matmul does not
//! give: a product written into a buffer the caller keeps between steps (candle allocates and
//! zero-fills a new output for every product: 12% of the CNN's step), added onto what a buffer
//! already holds (a gradient summed over uses without a temporary), and written in any
//! orientation (straight into NCHW activations or a transposed gradient).
//!
//! The pieces:
//! - [`Matrix`]: a read-only `rows x cols` view of a slice with any row and column strides (a
//!   transpose is a view, [`Matrix::t`]);
//! - [`MatrixMut`]: the same over a mutable slice, for the output;
//! - [`matmul`]: `out = a @ b` or `out += a @ b`.
//!
//! Every view is checked when it is made: its last element must lie inside its slice. That is
//! all `gemm::gemm` needs to stay in bounds, and the borrow checker keeps the output apart from
//! the operands, so the one `unsafe` call here is sound for any input; a bad shape is an
//! [`Error`], never undefined behaviour.
//!
//! ```
//! use cohort_matmul::{matmul, Accumulate, Matrix, MatrixMut};
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 x 3
//! let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // 3 x 2
//! let mut out = [0.0; 4];
//! matmul(
//!     MatrixMut::rows(&mut out, 2, 2)?,
//!     Matrix::rows(&a, 2, 3)?,
//!     Matrix::rows(&b, 3, 2)?,
//!     Accumulate::No,
//!     1,
//! )?;
//! assert_eq!(out, [4.0, 5.0, 10.0, 11.0]);
//! # Ok::<(), cohort_matmul::Error>(())
//! ```

use thiserror::Error;

/// A view or product that does not fit: a caller's mistake, reported rather than run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "a {rows}x{cols} view with strides ({row_stride}, {col_stride}) from {offset} reaches past a slice of {len}"
    )]
    OutOfBounds { rows: usize, cols: usize, row_stride: usize, col_stride: usize, offset: usize, len: usize },
    #[error("cannot multiply {a_rows}x{a_cols} by {b_rows}x{b_cols} into {out_rows}x{out_cols}")]
    Shapes { a_rows: usize, a_cols: usize, b_rows: usize, b_cols: usize, out_rows: usize, out_cols: usize },
}

/// The placement of a `rows x cols` view in its slice, checked to fit.
#[derive(Debug, Clone, Copy)]
struct Placement {
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Placement {
    /// Checks that element `(rows - 1, cols - 1)` lies inside a slice of `len` (the strides are
    /// non-negative, so it is the last).
    fn new(
        len: usize,
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, Error> {
        let out_of_bounds = || Error::OutOfBounds { rows, cols, row_stride, col_stride, offset, len };
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(row_stride)
                .and_then(|r| (cols - 1).checked_mul(col_stride).and_then(|c| r.checked_add(c)))
                .and_then(|i| i.checked_add(offset))
                .ok_or_else(out_of_bounds)?;
            if last >= len {
                return Err(out_of_bounds());
            }
            // gemm takes strides as isize.
            if isize::try_from(row_stride).is_err() || isize::try_from(col_stride).is_err() {
                return Err(out_of_bounds());
            }
        } else if offset > len {
            return Err(out_of_bounds());
        }
        Ok(Self { rows, cols, row_stride, col_stride })
    }

    fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride }
    }
}

/// A read-only `rows x cols` matrix in a slice.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    values: &'a [f32],
    at: Placement,
}

impl<'a> Matrix<'a> {
    /// The row-major `rows x cols` matrix at the start of `values`.
    pub fn rows(values: &'a [f32], rows: usize, cols: usize) -> Result<Self, Error> {
        Self::strided(values, 0, rows, cols, cols, 1)
    }

    /// Element `(i, j)` at `values[offset + i * row_stride + j * col_stride]`.
    pub fn strided(
        values: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, Error> {
        let at = Placement::new(values.len(), offset, rows, cols, row_stride, col_stride)?;
        Ok(Self { values: &values[offset.min(values.len())..], at })
    }

    /// The transpose, as a view of the same values.
    pub fn t(self) -> Self {
        Self { values: self.values, at: self.at.t() }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.at.rows, self.at.cols)
    }
}

/// A mutable `rows x cols` matrix in a slice: a product's output.
#[derive(Debug)]
pub struct MatrixMut<'a> {
    values: &'a mut [f32],
    at: Placement,
}

impl<'a> MatrixMut<'a> {
    /// The row-major `rows x cols` matrix at the start of `values`.
    pub fn rows(values: &'a mut [f32], rows: usize, cols: usize) -> Result<Self, Error> {
        Self::strided(values, 0, rows, cols, cols, 1)
    }

    /// The column-major `rows x cols` matrix at the start of `values` (the transpose of a
    /// row-major `cols x rows` one).
    pub fn columns(values: &'a mut [f32], rows: usize, cols: usize) -> Result<Self, Error> {
        Self::strided(values, 0, rows, cols, 1, rows)
    }

    /// Element `(i, j)` at `values[offset + i * row_stride + j * col_stride]`. The strides must
    /// not make two elements share a place (gemm would race with itself): one of them must be
    /// at least the other's extent.
    pub fn strided(
        values: &'a mut [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, Error> {
        let at = Placement::new(values.len(), offset, rows, cols, row_stride, col_stride)?;
        let distinct = match (rows > 1, cols > 1) {
            (false, false) => true,
            (true, false) => row_stride > 0,
            (false, true) => col_stride > 0,
            (true, true) => {
                (col_stride > 0 && row_stride >= cols.saturating_mul(col_stride))
                    || (row_stride > 0 && col_stride >= rows.saturating_mul(row_stride))
            }
        };
        if !distinct {
            return Err(Error::OutOfBounds { rows, cols, row_stride, col_stride, offset, len: values.len() });
        }
        let len = values.len();
        Ok(Self { values: &mut values[offset.min(len)..], at })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.at.rows, self.at.cols)
    }
}

/// Whether a product replaces the output's values or is added to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulate {
    /// `out = a @ b`; the output's old values are never read (it need not be zeroed).
    No,
    /// `out += a @ b`.
    Yes,
}

/// `out = a @ b` (or `out += a @ b`) for `a` `m x k`, `b` `k x n` and `out` `m x n`, on
/// `threads` threads (1: the calling thread only).
pub fn matmul(out: MatrixMut, a: Matrix, b: Matrix, accumulate: Accumulate, threads: usize) -> Result<(), Error> {
    let ((m, k), (b_rows, n), (out_rows, out_cols)) = (a.shape(), b.shape(), out.shape());
    if b_rows != k || out_rows != m || out_cols != n {
        return Err(Error::Shapes { a_rows: m, a_cols: k, b_rows, b_cols: n, out_rows, out_cols });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: zero, or nothing to add.
        if accumulate == Accumulate::No {
            for i in 0..m {
                for j in 0..n {
                    out.values[i * out.at.row_stride + j * out.at.col_stride] = 0.0;
                }
            }
        }
        return Ok(());
    }
    // More threads than the machine has only adds tasks (each allocating its packing buffers).
    let threads = threads.min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // Checked to fit in isize when the view was made.
    let stride = |s: usize| s as isize;
    // SAFETY: every index gemm touches is `i * row_stride + j * col_stride` for `i` and `j`
    // inside the view's shape (m, n, k checked equal above), and each view's last such index was
    // checked to lie inside its slice when the view was made (strides non-negative, so no other
    // index is larger). `out` is borrowed mutably, so it cannot overlap `a` or `b`, and its
    // strides were checked to give each element its own place (gemm's threads split the output
    // into disjoint tiles). With `read_dst` false gemm only writes the output (k > 0 here).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.values.as_mut_ptr(),
            stride(out.at.col_stride),
            stride(out.at.row_stride),
            accumulate == Accumulate::Yes,
            a.values.as_ptr(),
            stride(a.at.col_stride),
            stride(a.at.row_stride),
            b.values.as_ptr(),
            stride(b.at.col_stride),
            stride(b.at.row_stride),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook triple loop over the same views.
    fn reference(a: &Matrix, b: &Matrix) -> Vec<f32> {
        let ((m, k), (_, n)) = (a.shape(), b.shape());
        let get = |x: &Matrix, i: usize, j: usize| x.values[i * x.at.row_stride + j * x.at.col_stride];
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|d| get(a, i, d) * get(b, d, j)).sum();
            }
        }
        out
    }

    /// A `rows x cols` view at `offset` with rows `pad` longer than they need be; with
    /// `transposed`, the transpose of such a `cols x rows` view.
    fn padded(vals: &[f32], offset: usize, pad: usize, rows: usize, cols: usize, transposed: bool) -> Matrix<'_> {
        if transposed {
            Matrix::strided(vals, offset, cols, rows, rows + pad, 1).unwrap().t()
        } else {
            Matrix::strided(vals, offset, rows, cols, cols + pad, 1).unwrap()
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    proptest! {
        /// Every orientation of every operand and of the output, at an offset inside a larger
        /// slice with padded strides, replacing (the output seeded with NaN: it must never be
        /// read) and accumulating, on one thread and two, against the triple loop.
        #[test]
        fn products_match_the_triple_loop(
            m in 1usize..40, n in 1usize..40, k in 0usize..40,
            a_t: bool, b_t: bool, out_t: bool, acc: bool, two_threads: bool,
            pad in 0usize..3, offset in 0usize..5, seed: u32,
        ) {
            let (a_vals, b_vals) = (values(offset + (m + pad) * (k + pad) + 3, seed), values(offset + (k + pad) * (n + pad) + 5, seed ^ 7));
            let (a, b) = (padded(&a_vals, offset, pad, m, k, a_t), padded(&b_vals, offset, pad, k, n, b_t));
            let start = if acc { values(m * n, seed ^ 11) } else { vec![f32::NAN; m * n] };
            let mut out = start.clone();
            let out_view = if out_t { MatrixMut::columns(&mut out, m, n) } else { MatrixMut::rows(&mut out, m, n) };
            let mode = if acc { Accumulate::Yes } else { Accumulate::No };
            matmul(out_view.unwrap(), a, b, mode, if two_threads { 2 } else { 1 }).unwrap();
            let want = reference(&a, &b);
            for i in 0..m {
                for j in 0..n {
                    let at = if out_t { j * m + i } else { i * n + j };
                    let w = want[i * n + j] + if acc { start[at] } else { 0.0 };
                    prop_assert!((out[at] - w).abs() <= 1e-4 * (1.0 + w.abs()), "({i}, {j}): {} against {w}", out[at]);
                }
            }
        }
    }

    /// Products large enough for gemm to pack, block, split the depth into chunks (k > 512) and
    /// share the work between threads.
    #[test]
    fn large_products_match_the_triple_loop_on_several_threads() {
        for (m, n, k, threads) in [(130, 97, 600, 1), (130, 97, 600, 2), (64, 200, 33, 2), (7, 300, 1025, 2)] {
            let (a_vals, b_vals) = (values(m * k, 1), values(k * n, 2));
            let (a, b) = (Matrix::rows(&a_vals, m, k).unwrap(), Matrix::rows(&b_vals, n, k).unwrap().t());
            let mut out = vec![f32::NAN; m * n];
            matmul(MatrixMut::columns(&mut out, m, n).unwrap(), a, b, Accumulate::No, threads).unwrap();
            let want = reference(&a, &b);
            for i in 0..m {
                for j in 0..n {
                    let (got, w) = (out[j * m + i], want[i * n + j]);
                    assert!((got - w).abs() <= 1e-3 * (1.0 + w.abs()), "{m}x{n}x{k} ({i}, {j}): {got} against {w}");
                }
            }
        }
    }

    #[test]
    fn views_that_reach_past_their_slice_are_refused() {
        let v = vec![0f32; 12];
        assert!(Matrix::rows(&v, 3, 4).is_ok());
        assert!(Matrix::rows(&v, 4, 4).is_err());
        assert!(Matrix::strided(&v, 1, 3, 4, 4, 1).is_err());
        assert!(Matrix::strided(&v, 0, 2, 2, usize::MAX / 2, 1).is_err());
        // A stride that fits the slice (one row) but not gemm's isize.
        assert!(Matrix::strided(&v, 0, 1, 4, usize::MAX, 1).is_err());
        assert!(Matrix::strided(&v, 13, 0, 4, 4, 1).is_err());
        let mut o = vec![0f32; 12];
        assert!(MatrixMut::rows(&mut o, 4, 3).is_ok());
        assert!(MatrixMut::rows(&mut o, 4, 4).is_err());
        // Two elements in one place: refused.
        assert!(MatrixMut::strided(&mut o, 0, 3, 3, 1, 1).is_err());
        assert!(MatrixMut::strided(&mut o, 0, 3, 3, 0, 1).is_err());
        assert!(MatrixMut::strided(&mut o, 0, 3, 1, 0, 1).is_err());
        assert!(MatrixMut::strided(&mut o, 0, 3, 3, 1, 3).is_ok());
    }

    #[test]
    fn shapes_that_do_not_chain_are_refused() {
        let (a, b) = (vec![1f32; 6], vec![1f32; 6]);
        let mut o = vec![0f32; 4];
        let err = matmul(
            MatrixMut::rows(&mut o, 2, 2).unwrap(),
            Matrix::rows(&a, 2, 3).unwrap(),
            Matrix::rows(&b, 2, 3).unwrap(),
            Accumulate::No,
            1,
        );
        assert!(matches!(err, Err(Error::Shapes { .. })));
    }

    #[test]
    fn an_empty_sum_writes_zeros_or_adds_nothing() {
        let mut o = vec![5f32; 4];
        let empty: [f32; 0] = [];
        let (a, b) = (Matrix::rows(&empty, 2, 0).unwrap(), Matrix::rows(&empty, 0, 2).unwrap());
        matmul(MatrixMut::rows(&mut o, 2, 2).unwrap(), a, b, Accumulate::Yes, 1).unwrap();
        assert_eq!(o, [5.0; 4]);
        matmul(MatrixMut::rows(&mut o, 2, 2).unwrap(), a, b, Accumulate::No, 1).unwrap();
        assert_eq!(o, [0.0; 4]);
    }
}
