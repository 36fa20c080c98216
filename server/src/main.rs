//! `cohort-server`: the operator's command line.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cohort_common::train::per_class;
use cohort_io::unix_now;
use cohort_server::config::ServerConfig;
use cohort_server::live::LiveStatus;
use cohort_server::pki::{self, StatePaths};
use cohort_server::runs;
use cohort_server::serve::{RunSetup, ServeSetup, Server};
use cohort_server::store::{Enrolment, HeadMetrics, RoundRow, RunRow, RunStatus, Store};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cohort-server",
    version,
    about = "Cohort aggregation server: the operator's CA, the federation and its records"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a state directory with a CA and the server certificate.
    Init {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The federation's name (the server certificate's subject).
        #[arg(long)]
        name: String,
        /// Host names or IP addresses the clients dial (repeat for several).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Keep the CA off the server: write the CA's key and certificate to this directory (move
        /// it to another machine), and only the CA certificate to the state directory. Requests
        /// are then signed there with `sign` and registered here with `enroll --cert`.
        #[arg(long, value_name = "CA_DIR")]
        offline_ca: Option<PathBuf>,
    },
    /// Enrol a client: sign its request, make a key + certificate bundle, or register a
    /// certificate the offline CA signed. Only registered certificates are admitted.
    Enroll {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The client's request, made by `cohort-client keygen` or `cohort-client renew`.
        #[arg(long, requires = "out", conflicts_with_all = ["client_id", "bundle", "cert"])]
        csr: Option<PathBuf>,
        /// Where to write the signed certificate.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Make a key and certificate for this client id (quick starts, scenarios).
        #[arg(long, requires = "bundle", conflicts_with = "cert")]
        client_id: Option<String>,
        /// Where to write the bundle (private key, certificate, CA certificate; mode 0600).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Register a certificate signed by the offline CA (`cohort-server sign`).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Lifetime of the certificate in days.
        #[arg(long, default_value_t = pki::CLIENT_DAYS)]
        days: u32,
        /// The client is already enrolled: give it another certificate and keep the old ones
        /// valid until they expire (renewal).
        #[arg(long, conflicts_with = "replace")]
        renew: bool,
        /// The client is already enrolled: revoke its old certificates at once (a lost or
        /// stolen key).
        #[arg(long)]
        replace: bool,
    },
    /// Sign a client's request with an offline CA (on the CA's machine; registers nothing).
    Sign {
        /// The offline CA directory made by `init --offline-ca`.
        #[arg(long)]
        ca: PathBuf,
        /// The client's request, made by `cohort-client keygen` or `cohort-client renew`.
        #[arg(long)]
        csr: PathBuf,
        /// Where to write the signed certificate (then `enroll --cert` it on the server).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the certificate in days.
        #[arg(long, default_value_t = pki::CLIENT_DAYS)]
        days: u32,
    },
    /// Revoke a client (every certificate it has) or one certificate; a running server closes
    /// its connection within a second and never samples it again.
    Revoke {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The client to revoke, with every certificate it has (its certificate subject).
        #[arg(long, required_unless_present_any = ["serial", "cert"], conflicts_with_all = ["serial", "cert"])]
        client_id: Option<String>,
        /// One certificate, by serial (hex, as `clients` or `openssl x509 -serial` prints it).
        #[arg(long, conflicts_with = "cert")]
        serial: Option<String>,
        /// One certificate, from its PEM file.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
    /// Run the federation.
    Serve {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The server's configuration (server.toml: listen address, model spec, test set, federation).
        #[arg(long)]
        config: PathBuf,
    },
    /// Submit a run (a model and its federation settings) to the federation: a running server
    /// starts it after the runs before it, keeping its clients connected.
    Submit {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The run's name (letters, digits, `-`, `_`, `.`): clients' logs and ledgers show it.
        #[arg(long)]
        run: String,
        /// The run file: `model` (the model spec, relative to this file), optional `test_data`, and
        /// a [federation] table, as in server.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// List the federation's runs: queued, running, finished, stopped or failed.
    Runs {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop a run: a queued one is taken off the queue, a running one stops within a second (its
    /// round in progress is abandoned; completed rounds are kept) and the next run starts.
    Stop {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The run to stop.
        #[arg(long)]
        run: String,
    },
    /// Queue a stopped or failed run again: it resumes from its last checkpoint.
    Resume {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The run to queue again.
        #[arg(long)]
        run: String,
    },
    /// Summarise the state directory and what the running server is doing.
    Status {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The run (`cohort-server runs` lists them; default: the one running, or the last that ran).
        #[arg(long)]
        run: Option<String>,
    },
    /// List the recorded rounds.
    Rounds {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The run (`cohort-server runs` lists them; default: the one running, or the last that ran).
        #[arg(long)]
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List enrolled clients.
    Clients {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
    },
    /// Write a round's global model as safetensors.
    Export {
        /// The server's state directory (`init` makes it: CA, server certificate, cohort.db).
        #[arg(long)]
        state: PathBuf,
        /// The round (default: the last completed one).
        #[arg(long)]
        round: Option<u64>,
        /// The run (`cohort-server runs` lists them; default: the one running, or the last that ran).
        #[arg(long)]
        run: Option<String>,
        /// Where to write the model (safetensors, with the model spec in its metadata).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    cohort_io::init_logging("info");
    match Cli::parse().command {
        Command::Init { state, name, sans, offline_ca } => {
            let paths = StatePaths::new(&state);
            pki::init(&paths, &name, &sans, offline_ca.as_deref())?;
            Store::open(&paths.database())?;
            println!("created {} (CA, server certificate for {}, cohort.db)", state.display(), sans.join(", "));
            match offline_ca {
                Some(ca) => {
                    println!(
                        "the CA's key is in {}: move that directory to the machine that signs requests, off this \
                         server. There: `cohort-server sign --ca {} --csr CLIENT.csr --out CLIENT.pem`; here: \
                         `cohort-server enroll --state {} --cert CLIENT.pem`",
                        ca.display(),
                        ca.display(),
                        state.display()
                    );
                }
                None => println!(
                    "next: enroll clients with `cohort-server enroll --state {} --csr CLIENT.csr --out CLIENT.pem`",
                    state.display()
                ),
            }
        }
        Command::Enroll { state, csr, out, client_id, bundle, cert, days, renew, replace } => {
            let paths = StatePaths::new(&state);
            let mode = match (renew, replace) {
                (true, _) => Enrolment::Renew,
                (_, true) => Enrolment::Replace,
                _ => Enrolment::New,
            };
            let revoked = match (csr, out, client_id, bundle, cert) {
                (Some(csr), Some(out), None, None, None) => {
                    let text =
                        std::fs::read_to_string(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
                    let (pem, facts, revoked) =
                        pki::enroll_csr(&paths, &text, days, mode).with_context(|| format!("{}", csr.display()))?;
                    cohort_io::files::write_atomic(&out, pem.as_bytes())?;
                    println!(
                        "enrolled `{}` with the key SHA-256 {} (compare it with what the data owner's keygen printed): \
                         certificate {} (valid until {}) written to {}; give it and {} to the client",
                        facts.client,
                        facts.key_hash,
                        facts.serial,
                        cohort_io::utc(facts.not_after),
                        out.display(),
                        paths.ca_cert().display()
                    );
                    revoked
                }
                (None, None, Some(id), Some(bundle), None) => {
                    let pem = pki::make_bundle(&paths, &id, days, mode)?;
                    cohort_io::files::write_secret(&bundle, pem.as_bytes())?;
                    println!("enrolled `{id}`: bundle (key, certificate, CA) written to {}", bundle.display());
                    Vec::new()
                }
                (None, None, None, None, Some(cert)) => {
                    let text =
                        std::fs::read_to_string(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
                    let (facts, revoked) =
                        pki::register(&paths, &text, mode).with_context(|| format!("{}", cert.display()))?;
                    println!(
                        "registered certificate {} of `{}` (valid until {})",
                        facts.serial,
                        facts.client,
                        cohort_io::utc(facts.not_after)
                    );
                    revoked
                }
                _ => bail!("give one of --csr FILE --out CERT, --client-id ID --bundle FILE, or --cert FILE"),
            };
            for serial in revoked {
                println!("revoked the old certificate {serial}");
            }
        }
        Command::Sign { ca, csr, out, days } => {
            let text = std::fs::read_to_string(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
            let (pem, facts) =
                pki::sign_csr(&StatePaths::new(&ca), &text, days).with_context(|| format!("{}", csr.display()))?;
            cohort_io::files::write_atomic(&out, pem.as_bytes())?;
            println!(
                "signed certificate {} of `{}` for the key SHA-256 {} (compare it with what the data owner's keygen \
                 printed: a request that came through the server could be another's) (valid until {}) to {}; register \
                 it on the server with `cohort-server enroll --state STATE --cert {}`",
                facts.serial,
                facts.client,
                facts.key_hash,
                cohort_io::utc(facts.not_after),
                out.display(),
                out.display()
            );
        }
        Command::Revoke { state, client_id, serial, cert } => {
            let mut store = Store::open_existing(&StatePaths::new(&state).database())?;
            let now = unix_now();
            let serial = match cert {
                Some(path) => {
                    let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                    Some(cohort_io::CertificateFacts::from_der(&cohort_io::certificate_from_pem(&pem)?)?.serial)
                }
                None => serial,
            };
            match (client_id, serial) {
                (Some(id), _) => {
                    if !store.revoke(&id, now)? {
                        bail!("no client `{id}` is enrolled in {}", state.display());
                    }
                    println!(
                        "revoked `{id}` and every certificate it has: a running server closes its connection within a \
                         second; enrolling it again takes a new certificate"
                    );
                }
                (None, Some(serial)) => match store.revoke_certificate(&serial, now)? {
                    Some(id) => println!(
                        "revoked certificate {serial} of `{id}`: a running server closes a connection made with it \
                         within a second"
                    ),
                    None => bail!("no certificate with serial {serial} is registered in {}", state.display()),
                },
                (None, None) => bail!("give --client-id, --serial or --cert"),
            }
        }
        Command::Serve { state, config } => serve(state, config)?,
        Command::Submit { state, run, config } => {
            let paths = StatePaths::new(&state);
            let submitted = runs::submit(&paths, &run, &config)?;
            println!(
                "submitted run `{run}` (model `{}`, {} round(s)) with {} run(s) ahead of it; a running server starts \
                 it in turn (`cohort-server runs --state {}` shows where it stands)",
                submitted.model,
                submitted.rounds,
                submitted.ahead,
                state.display()
            );
        }
        Command::Runs { state, json } => {
            let store = Store::open_existing(&StatePaths::new(&state).database())?;
            let runs = store.runs()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print_runs(&StatePaths::new(&state), &runs);
            }
        }
        Command::Stop { state, run } => {
            let row = runs::stop(&StatePaths::new(&state), &run)?;
            match row.status {
                RunStatus::Queued => println!("run `{run}` was queued: it is stopped, and will not start"),
                RunStatus::Running => {
                    println!(
                        "asked the server to stop run `{run}`: it stops within a second (a round in progress is \
                         abandoned; completed rounds are kept), and the next queued run starts"
                    );
                    if row.dir.is_empty() {
                        println!(
                            "note: `{run}` is server.toml's run; with no other run queued, a server without \
                             `keep_serving = true` then ends the federation and its clients stop. It stays stopped \
                             across restarts until `cohort-server resume --run {run}`"
                        );
                    }
                }
                other => println!("run `{run}` is already {}", other.as_str()),
            }
        }
        Command::Resume { state, run } => {
            let row = runs::resume(&StatePaths::new(&state), &run)?;
            match row.status {
                RunStatus::Queued | RunStatus::Running => println!("run `{run}` is already {}", row.status.as_str()),
                RunStatus::Finished => println!(
                    "run `{run}` is queued again: it finishes at once unless its rounds were raised (in server.toml \
                     for server.toml's run)"
                ),
                _ => println!("run `{run}` is queued again: it resumes from its last checkpoint when its turn comes"),
            }
        }
        Command::Status { state, run } => status(&StatePaths::new(&state), run)?,
        Command::Rounds { state, json, run } => {
            let (records, _) = runs::records(&StatePaths::new(&state), run.as_deref())?;
            let rounds = Store::open_existing(&records.database())?.rounds()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rounds)?);
            } else {
                println!(
                    "{:>6} {:>10} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
                    "round",
                    "status",
                    "cohort",
                    "updates",
                    "seconds",
                    "accuracy",
                    "bal.acc",
                    "macro-F1",
                    "loss",
                    "eps.mdl",
                    "eps.srv",
                    "clip"
                );
                let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
                let g = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
                for r in &rounds {
                    println!(
                        "{:>6} {:>10} {:>7} {:>8} {:>9.3} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
                        r.round,
                        r.status,
                        r.cohort,
                        r.participants,
                        r.seconds,
                        f(r.test_accuracy),
                        f(r.balanced_accuracy),
                        f(r.macro_f1),
                        f(r.test_loss),
                        g(r.epsilon),
                        g(r.epsilon_server),
                        g(r.clip)
                    );
                    // Why a round did not complete, in the coordinator's words (escaped when
                    // recorded; escaped again for the terminal).
                    if !r.note.is_empty() {
                        println!("       {}", cohort_io::escape(&r.note, 600));
                    }
                }
                if rounds.iter().any(|r| r.epsilon.is_some()) {
                    println!(
                        "eps.mdl: epsilon against anyone who sees only the models (amplified by sampling); eps.srv: \
                         against the server, which knows every sample (the most any client spent)"
                    );
                }
                // Per head, with per-class recall: the latest round that has them.
                for (what, pick) in [
                    ("test set", (|r: &RoundRow| &r.head_tests) as fn(&RoundRow) -> &Vec<HeadMetrics>),
                    ("federated evaluation", |r: &RoundRow| &r.federated),
                ] {
                    if let Some(r) = rounds.iter().rev().find(|r| !pick(r).is_empty()) {
                        println!("\n{what}, round {}:", r.round);
                        for h in pick(r) {
                            let m = &h.metrics;
                            println!(
                                "  {:<12} accuracy {:.4}  balanced {:.4}  macro-F1 {:.4}  recall per class {}",
                                h.head,
                                m.accuracy,
                                m.balanced_accuracy,
                                m.macro_f1,
                                per_class(&m.per_class_recall)
                            );
                        }
                    }
                }
            }
        }
        Command::Clients { state } => {
            let store = Store::open_existing(&StatePaths::new(&state).database())?;
            let now = unix_now();
            let certificates = store.certificates()?;
            println!("{:<24} {:>8} {:>7} {:>8} {:<28}", "client", "revoked", "rounds", "declines", "last seen");
            for c in store.clients()? {
                println!(
                    "{:<24} {:>8} {:>7} {:>8} {:<28}",
                    cohort_io::escape(&c.id, 64),
                    if c.revoked { "yes" } else { "no" },
                    c.rounds,
                    c.declines,
                    c.last_seen.map_or("never".into(), cohort_io::utc)
                );
                if let Some((round, why)) = &c.last_dropout {
                    // Stored escaped and capped by the coordinator; escaped again for the terminal.
                    println!("    last left out in round {round}: {}", cohort_io::escape(why, 300));
                }
                for cert in certificates.iter().filter(|cert| cert.client == c.id) {
                    let state = match cert.revoked_at {
                        Some(at) => format!("revoked {}", cohort_io::utc(at)),
                        None if cert.not_after <= now => "expired".into(),
                        None if cert.not_after - now < 30 * 86_400 => "expires soon: renew".into(),
                        None => "active".into(),
                    };
                    println!(
                        "    certificate {} valid until {} ({state})",
                        cert.serial,
                        cohort_io::utc(cert.not_after)
                    );
                }
            }
        }
        Command::Export { state, round, out, run } => {
            let (paths, run) = runs::records(&StatePaths::new(&state), run.as_deref())?;
            let store = Store::open_existing(&paths.database())?;
            let rounds = store.rounds()?;
            let row = match round {
                Some(n) => rounds
                    .iter()
                    .find(|r| r.round == n)
                    .with_context(|| format!("round {n} is not recorded in {}", state.display()))?,
                None => rounds.iter().rev().find(|r| r.status == "completed").context("no completed round yet")?,
            };
            let Some(checkpoint) = &row.checkpoint else { bail!("round {} was aborted; it has no model", row.round) };
            let (bytes, _) = cohort_server::resume::read_checkpoint(&paths, checkpoint, None)?;
            cohort_io::files::write_atomic(&out, &bytes)?;
            let of_run = run.map(|r| format!(" of run `{}`", r.name)).unwrap_or_default();
            println!("wrote the global model after round {}{of_run} to {}", row.round, out.display());
        }
    }
    Ok(())
}

fn serve(state: PathBuf, config_path: PathBuf) -> Result<()> {
    let config = ServerConfig::load(&config_path)?;
    let paths = StatePaths::new(&state);
    let identity = pki::server_identity(&paths)?;
    let run = config.run.map(RunSetup::load).transpose()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        let server = Server::bind(ServeSetup {
            state: paths,
            identity,
            listen: config.listen,
            run,
            keep_serving: config.keep_serving,
            events: None,
            metrics_listen: config.metrics_listen,
        })?;
        let reports = server.run(shutdown).await?;
        tracing::info!(rounds = reports.len(), "done");
        anyhow::Ok(())
    })
}

fn print_runs(paths: &StatePaths, runs: &[RunRow]) {
    println!("{:<20} {:<9} {:<16} {:>11} {:>9} {:<20}", "run", "status", "model", "rounds", "accuracy", "submitted");
    for run in runs {
        let records = paths.records_of(&run.dir);
        let recorded = Store::open_existing(&records.database()).and_then(|s| s.rounds()).unwrap_or_default();
        let completed = recorded.iter().filter(|r| r.status == "completed").count();
        let accuracy = recorded
            .iter()
            .rev()
            .find_map(|r| r.test_accuracy)
            .map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
        println!(
            "{:<20} {:<9} {:<16} {:>11} {:>9} {:<20}",
            cohort_io::escape(&run.name, 64),
            run.status.as_str(),
            cohort_io::escape(&run.model, 64),
            format!("{completed}/{}", run.rounds),
            accuracy,
            cohort_io::utc(run.submitted_at)
        );
        if !run.note.is_empty() {
            println!("    {}", cohort_io::escape(&run.note, 600));
        }
    }
}

/// `status`: the running server (from its live file), the runs, the clients, and the rounds of
/// one run.
fn status(paths: &StatePaths, run: Option<String>) -> Result<()> {
    let store = Store::open_existing(&paths.database())?;
    let now = unix_now();
    println!("state:    {}", paths.dir.display());
    match LiveStatus::read(&paths.live()) {
        Some(live) if live.is_running(now) => {
            println!(
                "server:   running (pid {}, listening on {}{}), {} client(s) connected (as of {} s ago)",
                live.pid,
                live.listen,
                live.metrics.as_ref().map(|m| format!(", metrics on {m}")).unwrap_or_default(),
                live.connected,
                (now - live.updated_at).max(0)
            );
            match (&live.run, &live.activity) {
                (Some(run), Some(activity)) => println!("now:      run `{run}`: {activity}"),
                _ => println!("now:      between runs, waiting for one to be submitted (`cohort-server submit`)"),
            }
        }
        Some(live) => println!("server:   not running (last seen {})", cohort_io::utc(live.updated_at)),
        None => println!("server:   not running (it has never served from this directory)"),
    }
    let clients = store.clients()?;
    println!(
        "clients:  {} enrolled, {} revoked",
        clients.iter().filter(|c| !c.revoked).count(),
        clients.iter().filter(|c| c.revoked).count()
    );
    let runs = store.runs()?;
    if !runs.is_empty() {
        let count = |s: RunStatus| runs.iter().filter(|r| r.status == s).count();
        println!(
            "runs:     {} queued, {} running, {} finished, {} stopped, {} failed (`cohort-server runs` lists them)",
            count(RunStatus::Queued),
            count(RunStatus::Running),
            count(RunStatus::Finished),
            count(RunStatus::Stopped),
            count(RunStatus::Failed)
        );
    }
    let (records, row) = runs::records(paths, run.as_deref())?;
    let rounds = Store::open_existing(&records.database()).and_then(|s| s.rounds()).unwrap_or_default();
    if let Some(row) = &row {
        println!("run:      `{}` (model `{}`), {}", row.name, cohort_io::escape(&row.model, 64), row.status.as_str());
    }
    let count = |status: &str| rounds.iter().filter(|r| r.status == status).count();
    let (completed, started) = (count("completed"), count("started"));
    let in_progress = if started > 0 { format!(", {started} in progress") } else { String::new() };
    println!(
        "rounds:   {} recorded, {completed} completed{in_progress}, {} aborted or interrupted",
        rounds.len(),
        rounds.len() - completed - started
    );
    if let Some(last) = rounds.iter().rev().find(|r| r.status == "completed") {
        let acc = last.test_accuracy.map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
        println!(
            "last:     round {} ({} participants, {:.2} s, test accuracy {acc})",
            last.round, last.participants, last.seconds
        );
    }
    if let Some(last) = rounds.iter().rev().find(|r| r.epsilon.is_some()) {
        let (eps, z) = (last.epsilon.unwrap_or(f64::NAN), last.noise_multiplier.unwrap_or(f64::NAN));
        let against_server = last.epsilon_server.map_or("-".into(), |e| format!("{e:.3}"));
        let clip = last.clip.map_or("-".into(), |c| format!("{c:.4}"));
        let too_few: f64 = rounds.iter().filter_map(|r| r.too_few_probability).sum();
        println!(
            "privacy:  in this run, after round {}: epsilon {eps:.3} against anyone who sees only the models \
             (amplified by sampling), {against_server} against the server (the most any client spent); noise \
             multiplier {z}, clip norm {clip}",
            last.round
        );
        println!(
            "          delta: the configured one + {:.2e} (chance of too-small samples x (1 + e^epsilon))",
            too_few * (1.0 + eps.exp())
        );
    }
    // Runs on the same sites compose: what the most-used client spent over all of them.
    if let Some(across) = runs::epsilon_across_runs(paths, 1e-5)? {
        println!(
            "          over all {} private runs: epsilon {:.3} against the server at delta 1e-5 (the most any client \
             spent: `{}`); each run's budget counts its own rounds only",
            across.private_runs,
            across.epsilon,
            cohort_io::escape(&across.client, 64)
        );
    }
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        cohort_io::shutdown_signal().await;
        tracing::info!("shutting down: the current round is abandoned, completed rounds are saved");
        shutdown.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Issue 15: `--state`, `--out`, `--client-id` and others had no help text.
    #[test]
    fn every_option_of_every_command_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut undocumented = Vec::new();
        for command in cli.get_subcommands() {
            assert!(command.get_about().is_some(), "`{}` has no help", command.get_name());
            for arg in command.get_arguments().filter(|a| a.get_id() != "help" && a.get_id() != "version") {
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    undocumented.push(format!("{} --{}", command.get_name(), arg.get_id()));
                }
            }
        }
        assert!(undocumented.is_empty(), "options without help: {undocumented:?}");
    }
}
