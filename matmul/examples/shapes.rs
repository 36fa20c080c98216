//! The matrix products of the FedAvg CNN and 2NN at batch 10, in every orientation of the
//! operands and the output: microseconds per product on one thread.
//! `cargo run --release -p cohort-matmul --example shapes`; the kernels use the fastest.

use cohort_matmul::*;
use std::time::Instant;
fn main() {
    let shapes: &[(&str, usize, usize, usize)] = &[
        ("conv2 fwd", 1960, 64, 800),
        ("conv2 dW", 64, 800, 1960),
        ("conv2 dcols", 800, 1960, 64),
        ("conv2 dcols/img", 800, 196, 64),
        ("conv2 fwd/img", 196, 64, 800),
        ("conv2 dW/img", 64, 800, 196),
        ("dense1 dW", 512, 3136, 10),
        ("dense1 fwd", 10, 512, 3136),
        ("dense1 dx", 10, 3136, 512),
        ("dense1 fwd^T", 512, 10, 3136),
        ("dense1 dx^T", 3136, 10, 512),
        ("dense2 fwd", 10, 10, 512),
        ("conv1 fwd", 7840, 32, 25),
        ("conv1 dW", 32, 25, 7840),
    ];
    for &(name, m, n, k) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut out = vec![0f32; m * n];
        let mut line = format!("{name:16} m{m} n{n} k{k}:");
        for at in [false, true] {
            for bt in [false, true] {
                for ot in [false, true] {
                    let run = |out: &mut Vec<f32>| {
                        let av = if at { Matrix::rows(&a, k, m).unwrap().t() } else { Matrix::rows(&a, m, k).unwrap() };
                        let bv = if bt { Matrix::rows(&b, n, k).unwrap().t() } else { Matrix::rows(&b, k, n).unwrap() };
                        let ov = if ot {
                            MatrixMut::columns(out, m, n).unwrap()
                        } else {
                            MatrixMut::rows(out, m, n).unwrap()
                        };
                        matmul(ov, av, bv, Accumulate::No, 1).unwrap();
                    };
                    for _ in 0..5 {
                        run(&mut out);
                    }
                    let reps = 50;
                    let t = Instant::now();
                    for _ in 0..reps {
                        run(&mut out);
                    }
                    let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
                    line += &format!(
                        " {}{}{}={:.0}",
                        if at { "T" } else { "n" },
                        if bt { "T" } else { "n" },
                        if ot { "T" } else { "n" },
                        us
                    );
                }
            }
        }
        println!("{line}");
    }
}
