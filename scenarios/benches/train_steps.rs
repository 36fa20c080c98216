//! Local training throughput: steps per second of the MNIST 2NN and CNN at batch 10 on the
//! CPU, as one client trains in a round (600 examples). Median of 5 runs.
//!
//! `cargo bench -p cohort-scenarios --bench train_steps [2nn|cnn]`; set `RAYON_NUM_THREADS=1`
//! to measure what one simulated client gets in `cohort-sim` (one training per core).

use candle_core::Device;
use cohort_common::model::ModelSpec;
use cohort_io::files::DataSource;
use cohort_scenarios::throughput::measure;

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
        let t = measure(&spec, &Device::Cpu, &data, epochs, 10, 5).unwrap();
        println!(
            "{name}: median {:.0} steps/s at batch 10 (5 runs of {} steps, min {:.0}, max {:.0}; candle threads: {threads})",
            t.median(),
            t.steps_per_run,
            t.rates[0],
            t.rates[4]
        );
    }
}
