//! Every kernel against candle's own ops: values and gradients, over random shapes, paddings
//! and strides, within 1e-4 of the reference's largest magnitude.

use std::sync::Arc;

use candle_core::{Device, Module, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// `got` equals `want` within 1e-4 relative to `want`'s largest magnitude.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    // NaN where the reference has a number fails (a fold with `f32::max` would skip it).
    let worst =
        g.iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) });
    assert!(worst <= 1e-4 * scale, "{what}: differs by {worst}, reference magnitude {scale}");
}

/// A scalar whose gradient with respect to `y` is `probe`: random, so every output value's
/// gradient matters.
fn probe_loss(y: &Tensor, probe: &Tensor) -> Tensor {
    (y * probe).unwrap().sum_all().unwrap()
}

/// The same input twice: as a variable (it gets a gradient) or as data (it must get none).
fn input(x: &Tensor, needs_grad: bool) -> (Tensor, Option<Var>) {
    if needs_grad {
        let v = Var::from_tensor(x).unwrap();
        (v.as_tensor().clone(), Some(v))
    } else {
        (x.clone(), None)
    }
}

fn relu_if(y: Tensor, relu: bool) -> Tensor {
    if relu {
        y.relu().unwrap()
    } else {
        y
    }
}

/// A convolution with nothing fused after it but an optional ReLU.
fn plain(padding: usize, stride: usize, relu: bool) -> ConvShape {
    ConvShape { padding, stride, relu, pool: None }
}

type LayerFn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor;

/// Runs a layer `(x, weight, bias) -> y` as the kernel and as candle's reference and compares
/// their outputs and gradients. With `needs_grad` false, `x` is data: the kernel must give it
/// no gradient.
fn compare_layer(
    at: &str,
    [x, weight, bias]: [&Tensor; 3],
    probe: &Tensor,
    needs_grad: bool,
    kernel: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    reference: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) {
    let run = |layer: LayerFn, is_kernel: bool| {
        let (w, b) = (Var::from_tensor(weight).unwrap(), Var::from_tensor(bias).unwrap());
        let (x, x_var) = input(x, needs_grad);
        let y = layer(&x, w.as_tensor(), b.as_tensor());
        let grads = probe_loss(&y, probe).backward().unwrap();
        if is_kernel && !needs_grad {
            assert!(grads.get(&x).is_none(), "{at}: the data got a gradient");
        }
        let dx = x_var.map(|v| grads.get(v.as_tensor()).unwrap().clone());
        (y, dx, grads.get(w.as_tensor()).unwrap().clone(), grads.get(b.as_tensor()).unwrap().clone())
    };
    let (got, want) = (run(&kernel, true), run(&reference, false));
    assert_close(&format!("{at}: output"), &got.0, &want.0);
    if let (Some(g), Some(w)) = (&got.1, &want.1) {
        assert_close(&format!("{at}: input gradient"), g, w);
    }
    assert_close(&format!("{at}: weight gradient"), &got.2, &want.2);
    assert_close(&format!("{at}: bias gradient"), &got.3, &want.3);
}

#[test]
fn dense_matches_candle_linear_with_and_without_relu() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for case in 0..24 {
        let (batch, inputs, outputs) = (rng.random_range(1..13), rng.random_range(1..40), rng.random_range(1..30));
        let relu = case % 2 == 0;
        let needs_grad = case % 3 != 0;
        let x = random(&mut rng, &[batch, inputs]);
        let probe = random(&mut rng, &[batch, outputs]);
        let (w0, b0) = (random(&mut rng, &[outputs, inputs]), random(&mut rng, &[outputs]));
        let at = format!("case {case}: batch {batch}, {inputs} -> {outputs}, relu {relu}");
        compare_layer(
            &at,
            [&x, &w0, &b0],
            &probe,
            needs_grad,
            |x, w, b| dense(x, w, b, relu, None).unwrap(),
            |x, w, b| relu_if(candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(x).unwrap(), relu),
        );
    }
}

#[test]
fn conv2d_matches_candle_conv2d_over_shapes_paddings_and_strides() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for case in 0..40 {
        let (batch, channels, out_channels) = (rng.random_range(1..4), rng.random_range(1..4), rng.random_range(1..6));
        let (kernel, stride) = (rng.random_range(1..6), rng.random_range(1..4));
        let padding = rng.random_range(0..kernel.min(3));
        // Sides the windows cover exactly: candle's own conv2d backward gets the input
        // gradient's shape wrong otherwise (its conv_transpose2d has no output padding).
        let side = |out: usize| ((out - 1) * stride + kernel).checked_sub(2 * padding).filter(|&s| s > 0);
        let (height, width) = loop {
            if let (Some(h), Some(w)) = (side(rng.random_range(1..7)), side(rng.random_range(1..7))) {
                break (h, w);
            }
        };
        let relu = case % 2 == 1;
        let needs_grad = case % 4 != 0;
        let x = random(&mut rng, &[batch, channels, height, width]);
        let out_h = (height + 2 * padding - kernel) / stride + 1;
        let out_w = (width + 2 * padding - kernel) / stride + 1;
        let probe = random(&mut rng, &[batch, out_channels, out_h, out_w]);
        let (w0, b0) = (random(&mut rng, &[out_channels, channels, kernel, kernel]), random(&mut rng, &[out_channels]));
        let at = format!(
            "case {case}: x {:?}, {out_channels} kernels of {kernel}, padding {padding}, stride {stride}, relu {relu}",
            x.dims()
        );
        compare_layer(
            &at,
            [&x, &w0, &b0],
            &probe,
            needs_grad,
            |x, w, b| conv2d(x, w, b, plain(padding, stride, relu), None).unwrap(),
            |x, w, b| {
                let y = x.conv2d(w, padding, stride, 1, 1).unwrap();
                relu_if(y.broadcast_add(&b.reshape((1, out_channels, 1, 1)).unwrap()).unwrap(), relu)
            },
        );
    }
}

#[test]
fn conv2d_matches_candle_where_the_last_window_leaves_values_out() {
    // candle's own conv2d backward fails on these shapes (see above); for the gradients the
    // reference pads the input, keeps the part the windows cover and convolves that unpadded,
    // a shape candle's backward gets right.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (case, (shape, kernel, padding, stride)) in [
        ([2, 3, 8, 9], 3, 1, 2),
        ([1, 2, 7, 5], 2, 0, 3),
        ([3, 1, 6, 6], 4, 2, 3),
        // Padding at least the kernel: whole output rows and columns read nothing but padding.
        ([1, 2, 3, 4], 1, 2, 2),
        ([2, 1, 4, 5], 2, 3, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let x = random(&mut rng, &shape);
        let (w, b) = (random(&mut rng, &[4, shape[1], kernel, kernel]), random(&mut rng, &[4]));
        let fast = conv2d(&x, &w, &b, plain(padding, stride, false), None).unwrap();
        let reference =
            x.conv2d(&w, padding, stride, 1, 1).unwrap().broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
        let at = format!("{shape:?}, kernel {kernel}, padding {padding}, stride {stride}");
        assert_close(&at, &fast, &reference);
        let (out_h, out_w) = (reference.dim(2).unwrap(), reference.dim(3).unwrap());
        let probe = random(&mut rng, reference.dims());
        compare_layer(
            &at,
            [&x, &w, &b],
            &probe,
            case != 1,
            |x, w, b| conv2d(x, w, b, plain(padding, stride, false), None).unwrap(),
            |x, w, b| {
                let padded =
                    x.pad_with_zeros(2, padding, padding).unwrap().pad_with_zeros(3, padding, padding).unwrap();
                let covered = padded.narrow(2, 0, (out_h - 1) * stride + kernel).unwrap();
                let covered = covered.narrow(3, 0, (out_w - 1) * stride + kernel).unwrap().contiguous().unwrap();
                let y = covered.conv2d(w, 0, stride, 1, 1).unwrap();
                y.broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap()
            },
        );
    }
}

#[test]
fn conv2d_of_the_cnns_shapes_matches_candle() {
    // The FedAvg CNN's two layers at batch 10, where the matrix products are large enough for
    // the gemm crate to block and pack them.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (channels, size, out_channels) in [(1, 28, 32), (32, 14, 64)] {
        let x = random(&mut rng, &[10, channels, size, size]);
        let w = Var::from_tensor(&random(&mut rng, &[out_channels, channels, 5, 5])).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[out_channels])).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let probe = random(&mut rng, &[10, out_channels, size, size]);
        let fast = conv2d(xv.as_tensor(), w.as_tensor(), b.as_tensor(), plain(2, 1, true), None).unwrap();
        let reference = xv
            .as_tensor()
            .conv2d(w.as_tensor(), 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, out_channels, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        assert_close("output", &fast, &reference);
        let (g_fast, g_ref) =
            (probe_loss(&fast, &probe).backward().unwrap(), probe_loss(&reference, &probe).backward().unwrap());
        for (name, t) in [("input", xv.as_tensor()), ("weight", w.as_tensor()), ("bias", b.as_tensor())] {
            assert_close(
                &format!("{channels} channels: {name} gradient"),
                g_fast.get(t).unwrap(),
                g_ref.get(t).unwrap(),
            );
        }
    }
}

#[test]
fn max_pool2d_matches_candle_max_pool2d_and_a_reshape_and_max() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for case in 0..20 {
        let size = rng.random_range(1..4);
        let shape =
            [rng.random_range(1..4), rng.random_range(1..4), rng.random_range(size..12), rng.random_range(size..12)];
        let x = Var::from_tensor(&random(&mut rng, &shape)).unwrap();
        let fast = max_pool2d(x.as_tensor(), size).unwrap();
        let at = format!("case {case}: {shape:?} in windows of {size}");
        assert_close(&at, &fast, &x.as_tensor().max_pool2d(size).unwrap());
        // candle's max_pool2d backward scales the gradient by 1/size^2: the reference for the
        // gradient is candle's max over the windows laid out by a reshape.
        let reference = max_pool2d_by_reshape(x.as_tensor(), size).unwrap();
        assert_close(&at, &fast, &reference);
        let probe = random(&mut rng, reference.dims());
        let g_fast = probe_loss(&fast, &probe).backward().unwrap();
        let g_ref = probe_loss(&reference, &probe).backward().unwrap();
        assert_close(&format!("{at}: gradient"), g_fast.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
    }
}

#[test]
fn max_pool2d_sends_each_gradient_to_its_windows_maximum() {
    // One image of 2x5 in windows of 2: the last column is left out.
    let x = Var::new(&[[[[1f32, 4.0, -1.0, -3.0, 9.0], [2.0, 3.0, -2.0, -0.5, 9.0]]]], &Device::Cpu).unwrap();
    let probe = Tensor::new(&[[[[10f32, 100.0]]]], &Device::Cpu).unwrap();
    let want = [[[[0f32, 10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 100.0, 0.0]]]];
    for (name, y) in [("kernel", max_pool2d(x.as_tensor(), 2)), ("reshape", max_pool2d_by_reshape(x.as_tensor(), 2))] {
        let y = y.unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [4.0, -0.5], "{name}");
        let grads = probe_loss(&y, &probe).backward().unwrap();
        let got = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want.as_flattened().as_flattened().as_flattened(), "{name}");
    }
}

/// Cross-entropy written with candle's ops: the reference.
fn reference_cross_entropy(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Tensor {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    let picked = log_probs.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
    match weights {
        None => picked.mean_all().unwrap().neg().unwrap(),
        Some(w) => {
            let wt = w.index_select(targets, 0).unwrap();
            let total = wt.sum_all().unwrap().maximum(1e-12).unwrap();
            (picked * &wt).unwrap().sum_all().unwrap().neg().unwrap().broadcast_div(&total).unwrap()
        }
    }
}

#[test]
fn cross_entropy_matches_candle_with_and_without_class_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for case in 0..20 {
        let (batch, classes) = (rng.random_range(1..20), rng.random_range(2..12));
        let logits = Var::from_tensor(&(random(&mut rng, &[batch, classes]) * 4.0).unwrap()).unwrap();
        let targets: Vec<u32> = (0..batch).map(|_| rng.random_range(0..classes as u32)).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        // Some classes weigh nothing; a batch of only those must give 0, not NaN.
        let weights: Vec<f32> =
            (0..classes).map(|c| if c % 3 == 2 { 0.0 } else { rng.random_range(0.1..3.0) }).collect();
        let weights = Tensor::new(weights.as_slice(), &Device::Cpu).unwrap();
        for w in [None, Some(&weights)] {
            let at = format!("case {case}: {batch} x {classes}, weighted {}", w.is_some());
            // A scale of the loss, as a head's loss_weight gives, reaches the gradient.
            let fast = (cross_entropy(logits.as_tensor(), &targets, w).unwrap() * 1.5).unwrap();
            let reference = (reference_cross_entropy(logits.as_tensor(), &targets, w) * 1.5).unwrap();
            assert_close(&at, &fast, &reference);
            let (g_fast, g_ref) = (fast.backward().unwrap(), reference.backward().unwrap());
            let (gf, gr) = (g_fast.get(logits.as_tensor()).unwrap(), g_ref.get(logits.as_tensor()).unwrap());
            assert_close(&format!("{at}: gradient"), gf, gr);
        }
    }
    // Equal weights train exactly as no weights.
    let logits = random(&mut rng, &[7, 4]);
    let targets = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2], &Device::Cpu).unwrap();
    let ones = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let plain = cross_entropy(&logits, &targets, None).unwrap().to_scalar::<f32>().unwrap();
    let weighted = cross_entropy(&logits, &targets, Some(&ones)).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(plain.to_bits(), weighted.to_bits());
    assert!(cross_entropy(&logits, &Tensor::new(&[9u32; 7], &Device::Cpu).unwrap(), None).is_err());
}

#[test]
fn sgd_step_matches_the_tensor_formula() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (momentum, weight_decay) in [(0.0, 0.0), (0.0, 0.01), (0.9, 0.0), (0.5, 0.001)] {
        let w0 = random(&mut rng, &[13, 7]);
        let grads: Vec<Tensor> = (0..3).map(|_| random(&mut rng, &[13, 7])).collect();
        let lr = 0.1;
        let var = Var::from_tensor(&w0).unwrap();
        let mut velocity = Vec::new();
        let (mut w, mut v): (Tensor, Option<Tensor>) = (w0.clone(), None);
        for g in &grads {
            let values = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            sgd_step(&var, &values, &mut velocity, lr, momentum, weight_decay).unwrap();
            // PyTorch's SGD: g += wd w; v = m v + g (v = g the first time); w -= lr v.
            let mut g = (g + (&w * weight_decay).unwrap()).unwrap();
            if momentum > 0.0 {
                let next = match v.take() {
                    Some(v) => ((v * momentum).unwrap() + g).unwrap(),
                    None => g,
                };
                g = next.clone();
                v = Some(next);
            }
            w = (w - (g * lr).unwrap()).unwrap();
        }
        assert_close(&format!("momentum {momentum}, weight decay {weight_decay}"), var.as_tensor(), &w);
    }
    let var = Var::from_tensor(&random(&mut rng, &[3, 2])).unwrap();
    assert!(sgd_step(&var, &[1.0; 5], &mut Vec::new(), 0.1, 0.0, 0.0).is_err(), "a gradient of the wrong size");
}

#[test]
fn conv2d_with_pooling_fused_matches_candle_conv2d_relu_and_pooling() {
    // Sizes the windows divide and sizes they leave a row or column out of; strides 1 and 2;
    // with and without the ReLU; the gradient of the pooling by candle's reshape and max (its own max_pool2d
    // backward scales gradients wrongly, see max_pool2d_by_reshape).
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for case in 0..30 {
        let (batch, channels, out_channels) = (rng.random_range(1..4), rng.random_range(1..4), rng.random_range(1..9));
        let (kernel, size, stride) = (rng.random_range(1..5), rng.random_range(1..4), rng.random_range(1..3));
        let padding = rng.random_range(0..kernel.min(3));
        let relu = case % 2 == 0;
        let needs_grad = case % 3 != 0;
        // Sides the convolution's windows cover exactly (candle's own conv2d backward needs
        // them, see above); outputs that the pooling windows divide or leave a row out of.
        let side = |out: usize| ((out - 1) * stride + kernel).checked_sub(2 * padding).filter(|&s| s > 0);
        let (out_h, out_w) = (rng.random_range(size..9), rng.random_range(size..9));
        let (Some(height), Some(width)) = (side(out_h), side(out_w)) else { continue };
        let x = random(&mut rng, &[batch, channels, height, width]);
        let (w0, b0) = (random(&mut rng, &[out_channels, channels, kernel, kernel]), random(&mut rng, &[out_channels]));
        let probe = random(&mut rng, &[batch, out_channels, out_h / size, out_w / size]);
        let at = format!(
            "case {case}: x {:?}, kernel {kernel}, padding {padding}, stride {stride}, pool {size}, relu {relu}",
            x.dims()
        );
        let shape = ConvShape { padding, stride, relu, pool: Some(size) };
        compare_layer(
            &at,
            [&x, &w0, &b0],
            &probe,
            needs_grad,
            |x, w, b| conv2d(x, w, b, shape, None).unwrap(),
            |x, w, b| {
                let y = x.conv2d(w, padding, stride, 1, 1).unwrap();
                let y = relu_if(y.broadcast_add(&b.reshape((1, out_channels, 1, 1)).unwrap()).unwrap(), relu);
                max_pool2d_by_reshape(&y, size).unwrap()
            },
        );
    }
}

#[test]
fn a_shared_workspace_keeps_the_parameters_gradients_and_sums_them_over_uses() {
    // One dense layer and one convolution, each used twice in the graph: the workspace must
    // hold the sum of both uses' gradients (candle's GradStore sums them for its own ops), and
    // candle must get none of the parameters' gradients (they would be applied twice).
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let workspace = Arc::new(Workspace::new());
    let (w, b) =
        (Var::from_tensor(&random(&mut rng, &[5, 4])).unwrap(), Var::from_tensor(&random(&mut rng, &[5])).unwrap());
    let (cw, cb) = (
        Var::from_tensor(&random(&mut rng, &[3, 2, 3, 3])).unwrap(),
        Var::from_tensor(&random(&mut rng, &[3])).unwrap(),
    );
    let (x1, x2) = (random(&mut rng, &[2, 4]), random(&mut rng, &[3, 4]));
    let images = random(&mut rng, &[2, 2, 6, 6]);
    let shape = ConvShape { padding: 1, stride: 1, relu: true, pool: Some(2) };
    let loss = |ws: Option<&Arc<Workspace>>| {
        let dense_part = (dense(&x1, w.as_tensor(), b.as_tensor(), true, ws).unwrap().sum_all().unwrap()
            + dense(&x2, w.as_tensor(), b.as_tensor(), false, ws).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let once = conv2d(&images, cw.as_tensor(), cb.as_tensor(), shape, ws).unwrap();
        let twice = conv2d(&images.affine(-0.5, 0.1).unwrap(), cw.as_tensor(), cb.as_tensor(), shape, ws).unwrap();
        let conv_part = (once.sum_all().unwrap() + twice.sqr().unwrap().sum_all().unwrap()).unwrap();
        (dense_part + conv_part).unwrap()
    };
    let reference = loss(None).backward().unwrap();
    let kept = loss(Some(&workspace)).backward().unwrap();
    for param in [&w, &b, &cw, &cb] {
        let t = param.as_tensor();
        assert!(kept.get(t).is_none(), "{:?}: candle got a gradient the workspace keeps", t.dims());
        let got =
            workspace.take_gradient(t, |g| Tensor::from_vec(g.to_vec(), t.dims(), &Device::Cpu).unwrap()).unwrap();
        assert_close(&format!("{:?}", t.dims()), &got, reference.get(t).unwrap());
        assert!(workspace.take_gradient(t, |_| ()).is_none(), "a gradient is taken once");
    }
    // A step's gradients not taken are forgotten, not added to by the next step.
    let _ = loss(Some(&workspace)).backward().unwrap();
    workspace.forget_gradients();
    let _ = loss(Some(&workspace)).backward().unwrap();
    let got = workspace
        .take_gradient(w.as_tensor(), |g| Tensor::from_vec(g.to_vec(), (5, 4), &Device::Cpu).unwrap())
        .unwrap();
    assert_close("after forgetting", &got, reference.get(w.as_tensor()).unwrap());
}

#[test]
fn a_shared_workspace_gives_right_gradients_step_after_step_whatever_its_buffers_hold() {
    // The buffers a workspace hands out keep the last step's values (NaN when new, in tests):
    // every kernel must write all it reads. Batches of changing size, a 7x7 convolution output
    // that windows of 2 leave a row and a column of, a layer used twice, and a weight computed
    // from a variable (its gradient must reach the variable through candle).
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let workspace = Arc::new(Workspace::new());
    let (cw, cb) = (
        Var::from_tensor(&random(&mut rng, &[4, 2, 3, 3])).unwrap(),
        Var::from_tensor(&random(&mut rng, &[4])).unwrap(),
    );
    let (w, b) =
        (Var::from_tensor(&random(&mut rng, &[3, 36])).unwrap(), Var::from_tensor(&random(&mut rng, &[3])).unwrap());
    let shape = ConvShape { padding: 1, stride: 1, relu: true, pool: Some(2) };
    for (step, batch) in [3usize, 1, 4, 2, 4].into_iter().enumerate() {
        let images = random(&mut rng, &[batch, 2, 7, 7]);
        let probe = random(&mut rng, &[batch, 3]);
        let loss = |ws: Option<&Arc<Workspace>>| {
            let once = conv2d(&images, cw.as_tensor(), cb.as_tensor(), shape, ws).unwrap();
            let twice = conv2d(&images.affine(0.5, -0.2).unwrap(), cw.as_tensor(), cb.as_tensor(), shape, ws).unwrap();
            let features = (once + twice).unwrap().flatten_from(1).unwrap();
            let scaled = (w.as_tensor() * 1.5).unwrap();
            let y = dense(&features, &scaled, b.as_tensor(), false, ws).unwrap();
            (y * &probe).unwrap().sum_all().unwrap()
        };
        let reference = loss(None).backward().unwrap();
        workspace.forget_gradients();
        let kept = loss(Some(&workspace)).backward().unwrap();
        for param in [&cw, &cb] {
            let t = param.as_tensor();
            let got = workspace.take_gradient(t, |g| Tensor::from_vec(g.to_vec(), t.dims(), &Device::Cpu).unwrap());
            assert_close(
                &format!("step {step}, batch {batch}: {:?}", t.dims()),
                &got.unwrap(),
                reference.get(t).unwrap(),
            );
        }
        // The dense layer's weight is `1.5 w`, no variable: its gradient went through candle.
        for param in [&w, &b] {
            let t = param.as_tensor();
            let got =
                match workspace.take_gradient(t, |g| Tensor::from_vec(g.to_vec(), t.dims(), &Device::Cpu).unwrap()) {
                    Some(g) => g,
                    None => kept.get(t).unwrap().clone(),
                };
            assert_close(&format!("step {step}, batch {batch}: dense {:?}", t.dims()), &got, reference.get(t).unwrap());
        }
    }
}

#[test]
fn a_nan_in_a_pooling_window_is_its_maximum_so_divergence_shows() {
    // An identity 1x1 convolution, so the pooling sees the input itself: one NaN in the first
    // window of 2x2, none in the second.
    let x = Tensor::new(&[[[[1f32, f32::NAN, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]]], &Device::Cpu).unwrap();
    let (w, b) = (
        Tensor::ones((1, 1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    for relu in [false, true] {
        let fused = conv2d(&x, &w, &b, ConvShape { padding: 0, stride: 1, relu, pool: Some(2) }, None).unwrap();
        let got = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(got[0].is_nan() && got[1] == 8.0, "relu {relu}: {got:?}");
    }
    let got = max_pool2d(&x, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(got[0].is_nan() && got[1] == 8.0, "{got:?}");
}
