//! `cohort-sim`: run a simulated federation from a scenario file.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cohort_scenarios::fleet::{FleetOptions, FleetPartition};
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
        /// The scenario (TOML), e.g. scenarios/quickstart.toml, or the name of a bundled one
        /// (`quickstart`; `cohort-sim scenarios` lists them), which needs no file.
        file: PathBuf,
        /// Write report.json, accuracy.svg and the final model (model.safetensors) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Folder holding the data sets (mnist/, winequality/). Default: $COHORT_DATA, else
        /// <exe>/../share/cohort/data, /usr/local/share/cohort/data, /usr/share/cohort/data, else the
        /// source tree this binary was built from.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Override a scenario value: `--set federation.train.loss.weighting=inverse_frequency`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Multi-task scenarios: run only the clients of this head's task.
        #[arg(long, value_name = "HEAD")]
        only_task: Option<String>,
    },
    /// List the bundled scenarios, or print one (to copy and edit).
    Scenarios {
        /// The bundled scenario to print.
        name: Option<String>,
    },
    /// Write what a fleet of real processes needs (a Kubernetes Indexed Job, or machines of
    /// their own): OUT/server/ (state directory with the CA and every client enrolled,
    /// server.toml, model.toml, test set) and per client OUT/clients/I/ (client.toml, identity
    /// bundle, data partition), and OUT/fleet.json.
    Fleet(FleetArgs),
    /// Split a data set (a `[data]` table, as in client.toml) into per-client parts for trials:
    /// OUT/client-I/x.npy and y.npy, and OUT/client-I.data.toml, a `[data]` table that reads them.
    /// Every example goes to exactly one client.
    Split {
        /// A TOML file with a `[data]` table (a client.toml will do); paths are relative to it.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        clients: usize,
        /// A new or empty folder.
        #[arg(long)]
        out: PathBuf,
        /// `iid` (shuffled, equal parts) or `dirichlet` (per class, Dirichlet(alpha) shares).
        #[arg(long, default_value = "iid")]
        partition: String,
        /// Dirichlet concentration: small is skewed (0.1), large near IID (100).
        #[arg(long)]
        alpha: Option<f64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The epsilon a DP federation would spend: Poisson sampling of `per_round` of `clients`
    /// clients each round, Gaussian noise with multiplier `noise`, composed over `rounds`;
    /// against anyone who sees only the models, and against the server (a typical client and
    /// the most-sampled one).
    Epsilon {
        #[arg(long)]
        clients: u64,
        #[arg(long)]
        per_round: u64,
        #[arg(long)]
        noise: f64,
        #[arg(long)]
        rounds: u64,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
    /// Measure local training steps per second of a bundled model on a device.
    TrainBench {
        /// `mnist-2nn` or `mnist-cnn`.
        #[arg(long, default_value = "mnist-cnn")]
        model: String,
        /// `auto`, `cpu` or `cuda:N`.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 10)]
        batch_size: usize,
        /// Training examples per run (MNIST images).
        #[arg(long, default_value_t = 600)]
        examples: usize,
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

/// `cohort-sim fleet`'s options.
#[derive(clap::Args)]
struct FleetArgs {
    /// An empty or new folder to write to.
    #[arg(long)]
    out: PathBuf,
    /// The scenario (file or bundled name) whose model, federation and data it uses.
    #[arg(long, default_value = "quickstart")]
    scenario: PathBuf,
    /// Number of clients (default: the scenario's); the cohort is lowered to it if larger.
    #[arg(long)]
    clients: Option<usize>,
    /// `iid`, `non-iid` (two label shards per client) or `scenario` (its [partition]).
    #[arg(long, default_value = "scenario")]
    partition: FleetPartition,
    /// A name or address on the server certificate (repeat); the first is the one clients dial.
    #[arg(long = "san", value_name = "HOST", default_value = "localhost")]
    sans: Vec<String>,
    /// The server's UDP port.
    #[arg(long, default_value_t = 4433)]
    port: u16,
    /// `host:port` the clients dial (default: the first --san and --port).
    #[arg(long)]
    server: Option<String>,
    /// The server's Prometheus endpoint (`metrics_listen`), e.g. 0.0.0.0:9464.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Each client's `state_dir` (relative: beside its client.toml).
    #[arg(long, default_value = "state")]
    client_state_dir: String,
    /// Folder holding mnist/ (default: searched as for `run`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Override a scenario value (see `run`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

fn main() -> Result<()> {
    cohort_io::init_logging("error");
    let (file, out, rounds, seed, data, overrides, only_task) = match Cli::parse().command {
        Command::Run { file, out, rounds, seed, data, overrides, only_task } => {
            (file, out, rounds, seed, data, overrides, only_task)
        }
        Command::Epsilon { clients, per_round, noise, rounds, delta } => {
            return epsilon(clients, per_round, noise, rounds, delta);
        }
        Command::TrainBench { model, device, batch_size, examples, epochs, runs, data } => {
            return train_bench(&model, &device, batch_size, examples, epochs, runs, data)
        }
        Command::Scenarios { name } => return scenarios(name.as_deref()),
        Command::Fleet(args) => return fleet(args),
        Command::Split { data, clients, out, partition, alpha, seed } => {
            return split(data, clients, out, &partition, alpha, seed)
        }
    };
    cohort_scenarios::runner::one_thread_per_client();
    let (scenario, stood_in) = Scenario::open(&file, &overrides)?;
    // Named by a path that is not there (scenarios/quickstart.toml outside the source tree).
    if let (Some(name), true) = (stood_in, file.components().count() > 1 || file.extension().is_some()) {
        eprintln!("{} is not a file: running the bundled scenario `{name}`", file.display());
    }
    let options = RunOptions { seed, rounds, data_dir: data, progress: true, table: true, only_task };
    // The blocking pool only runs short protocol steps (training is gated to one per core): a
    // small pool keeps thousands of simulated clients from growing hundreds of threads, each
    // with its own allocator heap.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(32).build()?;
    let report = runtime.block_on(runner::run(&scenario, &options))?;
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
    println!(
        "{}: {} rounds on {}, final test accuracy {}, best {}, median {:.3} s per round, {:.1} s in all",
        scenario.name,
        report.rounds.len(),
        report.device,
        pct(report.final_accuracy),
        pct(report.best_accuracy),
        report.median_round_seconds,
        report.wall_seconds
    );
    if let Some(last) = report.rounds.iter().rev().find(|r| r.balanced_accuracy.is_some()) {
        println!(
            "final balanced accuracy {}, macro-F1 {}, recall per class {}",
            pct(last.balanced_accuracy),
            last.macro_f1.map_or("-".to_string(), |v| format!("{v:.4}")),
            last.per_class_recall.as_deref().map_or("-".to_string(), cohort_common::train::per_class)
        );
    }
    if let Some(last) = report.rounds.iter().rev().find(|r| !r.head_accuracy.is_empty() || r.test_accuracy.is_some()) {
        if !last.head_accuracy.is_empty() || !report.scenario.tasks.is_empty() {
            let first = report.scenario.model_spec().ok().map(|s| s.heads[0].name.clone()).unwrap_or_default();
            let mut heads: Vec<String> =
                last.test_accuracy.map(|a| format!("{first} {}", pct(Some(a)))).into_iter().collect();
            heads.extend(last.head_accuracy.iter().map(|(h, a)| format!("{h} {}", pct(Some(*a)))));
            println!("final accuracy per head: {}", heads.join(", "));
        }
    }
    if let Some(last) = report.rounds.iter().rev().find(|r| !r.federated.is_empty()) {
        let heads: Vec<String> = last
            .federated
            .iter()
            .map(|(h, acc, bal)| format!("{h} {} (balanced {})", pct(Some(*acc)), pct(Some(*bal))))
            .collect();
        println!("federated evaluation after round {}: {}", last.round, heads.join(", "));
    }
    for (head, moved) in &report.personal_heads_moved {
        if *moved == 0.0 {
            println!("personal head {head}: the server's copy is exactly as initialised; it never left the clients");
        } else {
            println!("personal head {head}: the server's copy moved by up to {moved:e}; a client sent it");
        }
    }
    if let Some(epsilon) = report.epsilon {
        let delta = report.delta.unwrap_or(f64::NAN);
        println!(
            "privacy: epsilon {epsilon:.3} at delta {delta:.3e} against anyone who sees only the models (user level, \
             amplified by sampling over {} clients)",
            scenario.clients
        );
        if let Some(server) = report.epsilon_server {
            println!(
                "         epsilon {server:.3} against the server, which knows every sample (the most-sampled client)"
            );
        }
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
        let model = if report.final_model.is_some() { " and the final model, model.safetensors" } else { "" };
        println!("wrote {}, {}{model}", dir.join("report.json").display(), dir.join("accuracy.svg").display());
    }
    Ok(())
}

fn train_bench(
    model: &str,
    device: &str,
    batch_size: usize,
    examples: usize,
    epochs: usize,
    runs: usize,
    data: Option<PathBuf>,
) -> Result<()> {
    let spec = match model {
        "mnist-2nn" => cohort_common::specs::MNIST_2NN,
        "mnist-cnn" => cohort_common::specs::MNIST_CNN,
        other => anyhow::bail!("--model `{other}`: use mnist-2nn or mnist-cnn"),
    };
    let spec = cohort_common::model::ModelSpec::from_toml(spec)?;
    let (device, device_name) = cohort_client::device::select(device)?;
    let dir = runner::data_dir_for("mnist", data.as_deref())?.join("mnist");
    let mnist = cohort_io::files::DataSource::Idx {
        images: dir.join("train-images.idx3-ubyte.gz"),
        labels: dir.join("train-labels.idx1-ubyte.gz"),
        classes: 10,
    }
    .load()?;
    let data = mnist.subset(&(0..examples.clamp(1, mnist.len())).collect::<Vec<_>>());
    let t = cohort_scenarios::throughput::measure(&spec, &device, &data, epochs, batch_size, runs)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    println!(
        "{model} on {device_name}: median {:.0} steps/s at batch {batch_size} ({} runs of {} steps, min {:.0}, max {:.0}; candle CPU threads: {threads})",
        t.median(),
        t.rates.len(),
        t.steps_per_run,
        t.rates[0],
        t.rates[t.rates.len() - 1]
    );
    Ok(())
}

fn fleet(args: FleetArgs) -> Result<()> {
    let scenario = cohort_scenarios::fleet::open_scenario(&args.scenario, args.clients, &args.overrides)
        .map_err(anyhow::Error::msg)?;
    let options = FleetOptions {
        out: args.out,
        scenario,
        partition: args.partition,
        sans: args.sans,
        port: args.port,
        server: args.server,
        metrics_listen: args.metrics_listen,
        client_state_dir: args.client_state_dir,
        data_dir: args.data,
    };
    let summary = cohort_scenarios::fleet::write_fleet(&options).map_err(anyhow::Error::msg)?;
    println!(
        "wrote a fleet of {} clients for scenario `{}` ({} training examples, {} test) to {}",
        summary.clients.len(),
        summary.scenario,
        summary.train_examples,
        summary.test_examples,
        options.out.display()
    );
    let server_state = options.out.join(&summary.server_state);
    println!(
        "server: cohort-server serve --state {} --config {}",
        server_state.display(),
        options.out.join(&summary.server_config).display()
    );
    println!(
        "client I: cohort-client run --config {}  (clients dial {})",
        options.out.join("clients/I/client.toml").display(),
        summary.server
    );
    println!(
        "the CA key is {}: move it off the server once no more clients are to be enrolled",
        server_state.join("ca.key").display()
    );
    Ok(())
}

fn split(data: PathBuf, clients: usize, out: PathBuf, partition: &str, alpha: Option<f64>, seed: u64) -> Result<()> {
    use cohort_common::data::Partition;
    let partition = match (partition, alpha) {
        ("iid", None) => Partition::Iid,
        ("iid", Some(_)) => anyhow::bail!("--alpha is for --partition dirichlet"),
        ("dirichlet", Some(alpha)) => Partition::Dirichlet { alpha },
        ("dirichlet", None) => anyhow::bail!("--partition dirichlet needs --alpha (0.1: skewed, 100: near IID)"),
        (other, _) => anyhow::bail!("--partition `{other}`: use iid or dirichlet"),
    };
    let options = cohort_scenarios::split::SplitOptions { data, clients, out, partition, seed };
    let parts = cohort_scenarios::split::split(&options).map_err(anyhow::Error::msg)?;
    for part in &parts {
        println!(
            "client {}: {} examples, label counts {:?}, {}",
            part.index,
            part.examples,
            part.label_counts,
            part.snippet.display()
        );
    }
    println!("wrote {} parts of {} to {}", parts.len(), options.data.display(), options.out.display());
    Ok(())
}

fn scenarios(name: Option<&str>) -> Result<()> {
    use cohort_scenarios::bundled;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = match name {
        Some(name) => {
            let text = bundled::scenario(name).ok_or_else(|| {
                anyhow::anyhow!("no bundled scenario `{name}`; the bundled ones are {}", bundled::scenario_names())
            })?;
            write!(out, "{text}")
        }
        None => bundled::SCENARIOS
            .iter()
            .try_for_each(|(name, text)| {
                let description = Scenario::parse_bundled(text, name, &[]).map(|s| s.description).unwrap_or_default();
                writeln!(out, "{name:<26} {description}")
            })
            .and_then(|_| {
                writeln!(out, "run one with `cohort-sim run NAME`; print it with `cohort-sim scenarios NAME`")
            }),
    };
    // A reader that stops early (`| head`) is no error.
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn epsilon(clients: u64, per_round: u64, noise: f64, rounds: u64, delta: f64) -> Result<()> {
    use cohort_common::dp::{default_orders, RdpAccountant};
    anyhow::ensure!(clients > 0 && per_round > 0 && per_round <= clients, "need 0 < --per-round <= --clients");
    anyhow::ensure!(noise.is_finite() && noise > 0.0, "--noise must be positive");
    anyhow::ensure!(delta > 0.0 && delta < 1.0, "--delta must be between 0 and 1");
    let q = per_round as f64 / clients as f64;
    let mut accountant = RdpAccountant::new(default_orders())?;
    accountant.compose(q, noise, rounds);
    let (eps, order) = accountant.epsilon(delta);
    println!(
        "epsilon {eps:.2} at delta {delta:e} against anyone who sees only the models (q = {q:.4}, z = {noise}, {rounds} \
         rounds; best RDP order {order})"
    );
    // Against the server: k participations, unamplified. A client takes part Binomial(T, q)
    // times; the most-sampled of N is about its 1 - 1/N quantile.
    let unamplified = |k: u64| cohort_common::dp::composed_epsilon([(1.0, noise, k)], delta);
    let typical = (q * rounds as f64).round() as u64;
    let mut most = rounds;
    let mut below = 0.0;
    for k in 0..=rounds {
        below += cohort_common::dp::binomial_pmf(rounds, q, k);
        if below >= 1.0 - 1.0 / clients as f64 {
            most = k;
            break;
        }
    }
    println!(
        "epsilon {:.2} against the server for a typical client ({typical} rounds), {:.2} for the most-sampled of {clients} \
         (about {most} rounds)",
        unamplified(typical),
        unamplified(most)
    );
    Ok(())
}
