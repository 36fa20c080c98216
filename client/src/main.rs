//! `cohort-client`: the data owner's daemon.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cohort_client::config::ClientConfig;
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
        #[arg(long)]
        config: PathBuf,
    },
    /// Check the configuration, certificates and data, and say what is wrong.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> Result<()> {
    cohort_io::init_logging("info");
    match Cli::parse().command {
        Command::Keygen { id, out } => {
            if !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || id.is_empty() || id.len() > 64 {
                bail!("client id `{id}` must be 1-64 ASCII letters, digits, '-', '_' or '.'");
            }
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
                "send {} to the operator; they run `cohort-server enroll --csr {id}.csr --out {id}.pem`",
                csr_path.display()
            );
        }
        Command::Run { config } => {
            let config = ClientConfig::load(&config)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let setup = cohort_client::setup_from_config(&config).await?;
                tracing::info!(device = %setup.device_name, samples = setup.participant.samples(), server = %setup.server, "starting");
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    cohort_io::shutdown_signal().await;
                    tracing::info!("shutting down");
                    signal.cancel();
                });
                cohort_client::daemon::run(setup, shutdown).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Check { config: path } => {
            let config = ClientConfig::load(&path)?;
            let identity = config.identity.load().context("identity")?;
            let id = identity.subject()?;
            identity.check_signed_by_ca().with_context(|| format!("certificate of `{id}`"))?;
            println!("identity: `{id}`, certificate signed by the configured CA");
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
            println!("ok");
        }
    }
    Ok(())
}
