//! `cohort-sim`: run a simulated federation from a scenario file.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cohort_scenarios::runner::{self, RunOptions};
use cohort_scenarios::scenario::Scenario;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cohort-sim", version, about = "Run whole simulated Cohort federations over loopback QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file.
    Run {
        /// The scenario (TOML), e.g. scenarios/quickstart.toml.
        file: PathBuf,
        /// Write report.json and accuracy.svg here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Folder holding the bundled data sets (default: the source tree's scenarios/data).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    cohort_io::init_logging("error");
    let Command::Run { file, out, rounds, seed, data } = Cli::parse().command;
    cohort_scenarios::runner::one_thread_per_client();
    let scenario = Scenario::load(&file)?;
    let options = RunOptions { seed, rounds, data_dir: data, progress: true, table: true };
    // The blocking pool only runs short protocol steps (training is gated to one per core): a
    // small pool keeps thousands of simulated clients from growing hundreds of threads, each
    // with its own allocator heap.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(32).build()?;
    let report = runtime.block_on(runner::run(&scenario, &options))?;
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
    println!(
        "{}: {} rounds, final test accuracy {}, best {}, median {:.3} s per round, {:.1} s in all",
        scenario.name,
        report.rounds.len(),
        pct(report.final_accuracy),
        pct(report.best_accuracy),
        report.median_round_seconds,
        report.wall_seconds
    );
    if let Some(epsilon) = report.epsilon {
        let delta = report.scenario.federation.dp.as_ref().map_or(0.0, |d| d.delta);
        println!("privacy: epsilon {epsilon:.3} at delta {delta:e} (user level, {} clients)", scenario.clients);
    }
    let budget = report.scenario.federation.dp.as_ref().and_then(|d| d.epsilon_budget);
    if let (Some(budget), true) = (budget, (report.rounds.len() as u64) < report.scenario.federation.rounds) {
        println!(
            "stopped after {} of {} rounds: the next would take epsilon past the budget of {budget}",
            report.rounds.len(),
            report.scenario.federation.rounds
        );
    }
    if let (Some(target), Some(round)) = (scenario.target_accuracy, report.target_reached_at) {
        println!("reached {:.0}% test accuracy at round {round}", target * 100.0);
    } else if let Some(target) = scenario.target_accuracy {
        println!("did not reach {:.0}% test accuracy", target * 100.0);
    }
    if let Some(dir) = out {
        cohort_scenarios::report::write(&report, &dir)?;
        println!("wrote {} and {}", dir.join("report.json").display(), dir.join("accuracy.svg").display());
    }
    Ok(())
}
