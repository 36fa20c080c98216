//! Local training throughput: steps per second of the MNIST 2NN and CNN at batch 10 on the
//! CPU, as one client trains in a round (600 examples). Median of 5 runs.
//!
//! `cargo bench -p cohort-scenarios --bench train_steps [2nn|cnn]`; set `RAYON_NUM_THREADS=1`
//! to measure what one simulated client gets in `cohort-sim` (one training per core).

use std::time::Instant;

use candle_core::Device;
use cohort_common::model::{Model, ModelSpec};
use cohort_common::train::{train, DeviceData, TrainConfig};
use cohort_io::files::DataSource;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dir = cohort_scenarios::runner::default_data_dir().join("mnist");
    let data = DataSource::Idx {
        images: dir.join("train-images.idx3-ubyte.gz"),
        labels: dir.join("train-labels.idx1-ubyte.gz"),
        classes: 10,
    }
    .load()
    .expect("bundled MNIST");
    let data = data.subset(&(0..600).collect::<Vec<_>>());
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    for (name, spec, epochs) in
        [("mnist-2nn", cohort_common::specs::MNIST_2NN, 10), ("mnist-cnn", cohort_common::specs::MNIST_CNN, 1)]
    {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let spec = ModelSpec::from_toml(spec).unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let device_data = DeviceData::new(&data, &model).unwrap();
        let cfg = TrainConfig { epochs, batch_size: 10, lr: 0.05, momentum: 0.0, weight_decay: 0.0 };
        train(&model, 0, &device_data, &TrainConfig { epochs: 1, ..cfg.clone() }, 0).unwrap(); // warm up
        let mut rates: Vec<f64> = (0..5)
            .map(|rep| {
                let start = Instant::now();
                let stats = train(&model, 0, &device_data, &cfg, rep).unwrap();
                stats.steps as f64 / start.elapsed().as_secs_f64()
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.0} steps/s at batch 10 (5 runs of {} steps, min {:.0}, max {:.0}; candle threads: {threads})",
            rates[2],
            epochs * 60,
            rates[0],
            rates[4]
        );
    }
}
