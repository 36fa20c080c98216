//! `cohort-client`: the data owner's daemon.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cohort_client::config::{ClientConfig, EvaluationData};
use cohort_client::renew::{self, Renewal};
use cohort_common::model::ModelSpec;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cohort-client", version, about = "Cohort client: trains on local data and sends only updates")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a private key and a certificate signing request; the key never leaves this machine.
    Keygen {
        /// This client's id (becomes the certificate subject).
        #[arg(long)]
        id: String,
        /// Directory for `ID.key` (mode 0600) and `ID.csr`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the daemon: connect, train when asked, reconnect when the connection is lost.
    Run {
        /// The client's configuration file (`client.toml`); paths in it are relative to it.
        #[arg(long)]
        config: PathBuf,
    },
    /// Renew this client's certificate: a new key and request for the same id (give the request to
    /// the operator), then `--install` the certificate they sign. The daemon keeps running with
    /// the current certificate until it is restarted.
    Renew {
        /// The client's configuration file (`client.toml`); paths in it are relative to it.
        #[arg(long)]
        config: PathBuf,
        /// Where the pending `ID.renew.key` (mode 0600) and `ID.renew.csr` are kept (default:
        /// beside the current key); give the same with `--install`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The certificate the operator signed from `ID.renew.csr`: checked, then installed with the
        /// pending key in place of the identity files `client.toml` names.
        #[arg(long)]
        install: Option<PathBuf>,
    },
    /// Check the configuration, certificates and data, and say what is wrong.
    Check {
        /// The client's configuration file (`client.toml`) to check; paths in it are relative to it.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the privacy ledger: the budget, what each run has spent, and what is left.
    Ledger {
        /// The client's configuration file (`client.toml`); its `[privacy]` and `state_dir` say
        /// where the ledger is.
        #[arg(long)]
        config: PathBuf,
        /// Print the ledger file's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a global model (from `cohort-server export`) on this client's own data, with its
    /// personal heads: per head, accuracy, balanced accuracy, macro-F1 and recall per class.
    Evaluate {
        /// The client's configuration file (`client.toml`); paths in it are relative to it.
        #[arg(long)]
        config: PathBuf,
        /// The model file to evaluate (from `cohort-server export`).
        #[arg(long)]
        model: PathBuf,
        /// The model spec (TOML), for files that do not carry one.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Evaluate on this data set instead of the client's own: a file with a `[data]` table as
        /// in client.toml (paths relative to it) and an optional `head = "NAME"`.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print JSON (with the confusion matrices).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    cohort_io::init_logging("info");
    match Cli::parse().command {
        Command::Keygen { id, out } => {
            cohort_io::check_client_id(&id).map_err(anyhow::Error::msg)?;
            let (key, csr) = cohort_client::keygen(&id)?;
            let key_path = out.join(format!("{id}.key"));
            let csr_path = out.join(format!("{id}.csr"));
            if key_path.exists() {
                bail!("{} already exists; refusing to overwrite a private key", key_path.display());
            }
            cohort_io::files::write_secret(&key_path, key.as_bytes())?;
            cohort_io::files::write_atomic(&csr_path, csr.as_bytes())?;
            println!("wrote {} (keep it here) and {}", key_path.display(), csr_path.display());
            println!(
                "key SHA-256 {}: tell the operator by another channel; `cohort-server enroll` or `sign` prints it \
                 for the request it signs, and they must match",
                cohort_client::key_hash(&key)?
            );
            println!(
                "send {} to the operator; they run `cohort-server enroll --csr {id}.csr --out {id}.pem`",
                csr_path.display()
            );
        }
        Command::Run { config: path } => {
            let config = ClientConfig::load(&path)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let setup = cohort_client::setup_from_config(&config).await?;
                tracing::info!(device = %setup.device_name, samples = setup.trainer.samples(), server = %setup.server, "starting");
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    cohort_io::shutdown_signal().await;
                    tracing::info!("shutting down");
                    signal.cancel();
                });
                cohort_client::daemon::run_with_config(setup, shutdown, &path).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Renew { config, out, install } => {
            let renewal = Renewal::from_config(&config, out.as_deref())?;
            match install {
                None => {
                    let started = renewal.start()?;
                    let current = &started.current;
                    println!(
                        "renewing `{}`: the current certificate {} is valid until {}",
                        current.client,
                        current.serial,
                        cohort_io::utc(current.not_after)
                    );
                    println!("{}", renewal.instructions(&started));
                    let key = std::fs::read_to_string(&started.pending.key)
                        .with_context(|| format!("cannot read {}", started.pending.key.display()))?;
                    println!(
                        "the new key's SHA-256 is {}: tell the operator by another channel, to compare with what \
                         `cohort-server enroll` or `sign` prints",
                        cohort_client::key_hash(&key)?
                    );
                }
                Some(cert) => {
                    let pem = std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
                    let installed =
                        renewal.install(&pem).with_context(|| format!("cannot install {}", cert.display()))?;
                    let (old, new) = (&installed.previous, &installed.installed);
                    let written: Vec<String> = installed.written.iter().map(|p| p.display().to_string()).collect();
                    println!(
                        "installed certificate {} of `{}` (valid until {}) with its new key in {}",
                        new.serial,
                        new.client,
                        cohort_io::utc(new.not_after),
                        written.join(" and ")
                    );
                    println!(
                        "it replaces certificate {} (valid until {}); removed the pending {}",
                        old.serial,
                        cohort_io::utc(old.not_after),
                        installed.removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")
                    );
                    println!(
                        "restart the daemon to use it (`cohort-client run --config {}` or its service); a running \
                         daemon keeps the old certificate until then",
                        config.display()
                    );
                }
            }
        }
        Command::Ledger { config: path, json } => {
            let config = ClientConfig::load(&path)?;
            let (Some(privacy), Some(state_dir)) = (&config.privacy, &config.state_dir) else {
                println!(
                    "this client has no privacy budget ([privacy] in {}): it takes part in plain and secure rounds \
                     alike, and nothing is charged",
                    path.display()
                );
                return Ok(());
            };
            let file = cohort_client::ledger::LedgerFile::open(
                state_dir,
                privacy.max_epsilon,
                privacy.delta,
                privacy.accounting(),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(file.ledger())?);
            } else {
                println!("ledger:   {}", state_dir.join(cohort_client::ledger::LEDGER_FILE).display());
                for line in cohort_client::ledger::describe(file.ledger()) {
                    println!("{line}");
                }
                if let Some(cap) = config.policy.max_epsilon_per_run {
                    println!("policy:   at most epsilon {cap} per run");
                }
            }
        }
        Command::Check { config: path } => {
            let config = ClientConfig::load(&path)?;
            let identity = config.identity.load().context("identity")?;
            let facts = identity.certificate().context("identity")?;
            let id = facts.client.clone();
            let config_name = path.display().to_string();
            if let renew::Expiry::Expired = renew::expiry(&facts, renew::unix_now()) {
                bail!("{}", renew::expired_notice(&facts, &config_name));
            }
            identity.check_signed_by_ca().with_context(|| format!("certificate of `{id}`"))?;
            println!("identity: `{id}`, certificate signed by the configured CA");
            println!("          serial {}, valid until {}", facts.serial, cohort_io::utc(facts.not_after));
            if let Some(warning) = renew::expiring_notice(&facts, renew::unix_now(), &config_name) {
                println!("warning:  {warning}");
            }
            let pending = Renewal::new(&path, config.identity.clone(), None).pending(&id);
            if pending.key.exists() {
                println!(
                    "renewal:  pending ({} and {}); install the operator's certificate with `cohort-client renew \
                     --config {config_name} --install {}`",
                    pending.key.display(),
                    pending.csr.display(),
                    pending.certificate
                );
            }
            if let Some(data) = &config.data {
                println!("source:   {}", data.describe());
            }
            for head in config.heads.iter().filter(|h| h.data.is_some()) {
                let source = head.data.as_ref().map(|d| d.describe()).unwrap_or_default();
                println!("          head `{}`: {source}", head.name);
            }
            for head in config.head_data()? {
                println!(
                    "data:     {} examples of shape {:?} for head {}, label counts {:?}",
                    head.data.len(),
                    head.data.feature_shape,
                    head.head.as_deref().map_or("1 (the first)".to_string(), |h| format!("`{h}`")),
                    head.data.label_counts()
                );
            }
            let (_, device) = cohort_client::device::select(&config.device)?;
            println!("device:   {device}");
            println!("server:   {} (certificate name {})", config.server, config.server_name());
            let models = config.policy.models.as_ref().map_or("any model".to_string(), |m| m.join(", "));
            let per_run =
                config.policy.max_epsilon_per_run.map_or(String::new(), |e| format!("; at most epsilon {e} per run"));
            println!("policy:   runs of {models}{per_run}");
            println!("ok");
        }
        Command::Evaluate { config: path, model, spec, data, json } => {
            let config = ClientConfig::load(&path)?;
            let spec = match spec {
                Some(p) => {
                    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
                    Some(ModelSpec::from_toml(&text).with_context(|| format!("model spec {}", p.display()))?)
                }
                None => None,
            };
            let other = data.as_deref().map(|p| Ok::<_, anyhow::Error>((EvaluationData::load(p)?, p))).transpose()?;
            let evaluation = cohort_client::evaluate_model(&config, &model, spec, other)?;
            if json {
                let heads: Vec<_> = evaluation
                    .heads
                    .iter()
                    .filter_map(|(h, m)| m.as_ref().map(|m| serde_json::json!({ "head": h, "metrics": m })))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "on": evaluation.on, "heads": heads }))?
                );
                return Ok(());
            }
            println!(
                "model:    `{}` from {}, on {}",
                evaluation.spec.name,
                model.display(),
                if data.is_some() { evaluation.on.clone() } else { format!("this client's {}", evaluation.on) }
            );
            for (head, metrics) in &evaluation.heads {
                match metrics {
                    None => println!("{head:<12} not labelled here"),
                    Some(m) => println!(
                        "{head:<12} {} examples: accuracy {:.4}, balanced {:.4}, macro-F1 {:.4}, loss {:.4}, recall per class {}",
                        m.examples,
                        m.accuracy,
                        m.balanced_accuracy,
                        m.macro_f1,
                        m.loss,
                        cohort_common::train::per_class(&m.per_class_recall)
                    ),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every option of every subcommand has a line of help (`--config`, `--out` had none).
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
