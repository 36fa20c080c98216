//! Model specs, which the server sends every client in each round plan and which checkpoints
//! and safetensors files carry: `ModelSpec::from_toml` on arbitrary UTF-8, then, for a spec that
//! parses, the round trip through `to_toml` and building the `Model` on the CPU.
//!
//! `from_toml` caps a model at `MAX_PARAMETERS` (64 Mi parameters, 256 MiB of f32, output layers
//! included), so building is bounded: the largest model a spec may describe builds in about 2 s
//! with a peak of 0.8 to 1 GB. The target asserts that cap on every spec that parses, and builds
//! only models of at most `BUILD_CAP` parameters, so that it keeps its pace.
#![no_main]

use candle_core::Device;
use cohort_common::model::{LayerSpec, Model, ModelSpec, MAX_PARAMETERS};
use libfuzzer_sys::fuzz_target;

const BUILD_CAP: usize = 1 << 16;

/// Parameters of a checked spec, counted as `from_toml` counts them (weights and biases of
/// linear and conv layers; each head ends in a linear layer onto its classes).
fn parameters(spec: &ModelSpec) -> usize {
    fn walk(shape: &mut Vec<usize>, layers: &[LayerSpec], total: &mut usize) {
        for layer in layers {
            match layer {
                LayerSpec::Linear { out } => {
                    *total = total.saturating_add(shape[0].saturating_mul(*out).saturating_add(*out));
                    *shape = vec![*out];
                }
                LayerSpec::Conv2d { out_channels, kernel, padding, stride } => {
                    let weights = shape[0].saturating_mul(kernel.saturating_mul(*kernel)).saturating_mul(*out_channels);
                    *total = total.saturating_add(weights.saturating_add(*out_channels));
                    let side = |d: usize| (d + 2 * padding - kernel) / stride + 1;
                    *shape = vec![*out_channels, side(shape[1]), side(shape[2])];
                }
                LayerSpec::MaxPool2d { size } => *shape = vec![shape[0], shape[1] / size, shape[2] / size],
                LayerSpec::Flatten => *shape = vec![shape.iter().product()],
                LayerSpec::Relu | LayerSpec::Dropout { .. } | LayerSpec::Normalize { .. } => {}
            }
        }
    }
    let mut total = 0;
    let mut trunk = spec.input_shape.clone();
    walk(&mut trunk, &spec.trunk, &mut total);
    for head in &spec.heads {
        let mut shape = trunk.clone();
        let mut layers = head.layers.clone();
        layers.push(LayerSpec::Linear { out: head.classes });
        walk(&mut shape, &layers, &mut total);
    }
    total
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = ModelSpec::from_toml(text) else { return };
    let again = ModelSpec::from_toml(&spec.to_toml()).expect("a checked spec's TOML parses");
    assert_eq!(again, spec, "the spec round-trips through TOML");
    let params = parameters(&spec);
    assert!(params <= MAX_PARAMETERS);
    if params > BUILD_CAP {
        return;
    }
    let model = Model::new(&spec, &Device::Cpu, 0).expect("a checked spec builds");
    let layout = model.layout();
    assert_eq!(layout.total_len(), params);
    assert_eq!(layout.segments().iter().map(|s| s.len).sum::<usize>(), params);
    assert_eq!(layout.segments().len(), spec.heads.len() + 1);
});
