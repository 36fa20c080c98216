//! Local training throughput: how many SGD steps per second a client trains a model at, on a
//! device. Behind `cohort-sim train-bench` and `cargo bench --bench train_steps`, and the
//! figure to compare a GPU with the CPU.

use std::time::Instant;

use candle_core::Device;
use cohort_common::data::Dataset;
use cohort_common::model::{Model, ModelSpec};
use cohort_common::train::{train, DeviceData, TrainConfig, TrainError};

/// Steps per second over repeated runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    pub steps_per_run: usize,
    /// Sorted, slowest first.
    pub rates: Vec<f64>,
}

impl Throughput {
    pub fn median(&self) -> f64 {
        self.rates[self.rates.len() / 2]
    }
}

/// Trains `spec` on `data` (moved to `device` once) for `epochs` at `batch_size`, `runs` times
/// after one warm-up epoch, and reports the steps per second of each run. Every run ends by
/// reading the loss, so a GPU's queued work is counted.
pub fn measure(
    spec: &ModelSpec,
    device: &Device,
    data: &Dataset,
    epochs: usize,
    batch_size: usize,
    runs: usize,
) -> Result<Throughput, TrainError> {
    let model = Model::new(spec, device, 1)?;
    let device_data = DeviceData::new(data, &model)?;
    let config = TrainConfig { epochs, batch_size, lr: 0.05, ..Default::default() };
    train(&model, 0, &device_data, &TrainConfig { epochs: 1, ..config.clone() }, 0)?;
    let mut rates = Vec::with_capacity(runs.max(1));
    let mut steps_per_run = 0;
    for run in 0..runs.max(1) {
        let start = Instant::now();
        let stats = train(&model, 0, &device_data, &config, run as u64)?;
        steps_per_run = stats.steps;
        rates.push(stats.steps as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(Throughput { steps_per_run, rates })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_steps_of_each_run() {
        let spec = ModelSpec::from_toml("name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2").unwrap();
        let data = Dataset::new(vec![0.0, 1.0, 1.0, 0.0, 0.5, 0.5], vec![2], vec![0, 1, 0], 2).unwrap();
        let t = measure(&spec, &Device::Cpu, &data, 2, 2, 3).unwrap();
        assert_eq!(t.steps_per_run, 4, "2 epochs of 2 batches");
        assert_eq!(t.rates.len(), 3);
        assert!(t.rates.windows(2).all(|w| w[0] <= w[1]) && t.median() > 0.0);
    }
}
