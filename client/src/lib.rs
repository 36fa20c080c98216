//! # cohort-client
//!
//! The data owner's side of Cohort: the daemon `cohort-client` and the library it is made of.
//!
//! - [`config`]: `client.toml` (server, identity, data, device, reconnection).
//! - [`daemon`]: the driver: dial, hello, answer round plans with updates computed by
//!   `cohort_common::participant::Participant`, reconnect with backoff, stop cleanly.
//! - [`device`]: `auto | cpu | cuda:N` to a candle device.
//! - [`ledger`]: the client's own privacy ledger, which declines rounds past its budget.
//! - [`setup_from_config`]: everything `run` and `check` need, loaded and checked.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = cohort_client::config::ClientConfig::load("client.toml".as_ref())?;
//! let setup = cohort_client::setup_from_config(&config).await?;
//! cohort_client::daemon::run(setup, tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod daemon;
pub mod ledger;

use std::sync::Arc;

use cohort_common::participant::{Participant, SecureKeys};

pub mod device {
    //! Which device trains: `auto`, `cpu` or `cuda:N`.
    use candle_core::Device;

    #[derive(Debug, thiserror::Error, PartialEq)]
    pub enum DeviceError {
        #[error("device `{0}` is not one of `auto`, `cpu`, `cuda:N`")]
        Unknown(String),
        #[error("device `{0}` needs a build with the `cuda` feature; this binary is CPU-only (use `auto` or `cpu`)")]
        NoCudaBuild(String),
        #[error("device `{asked}` is not available: {problem}")]
        Unavailable { asked: String, problem: String },
    }

    /// Opens the device and says in words which one it is.
    pub fn select(choice: &str) -> Result<(Device, String), DeviceError> {
        match choice.trim() {
            "cpu" => Ok((Device::Cpu, "cpu".into())),
            "auto" => {
                if !candle_core::utils::cuda_is_available() {
                    return Ok((Device::Cpu, "cpu (auto: this binary is built without CUDA)".into()));
                }
                match Device::new_cuda(0) {
                    Ok(d) => Ok((d, "cuda:0 (auto)".into())),
                    Err(e) => Ok((Device::Cpu, format!("cpu (auto: no CUDA device answered: {e})"))),
                }
            }
            other => {
                let Some(n) = other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) else {
                    return Err(DeviceError::Unknown(other.into()));
                };
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NoCudaBuild(other.into()));
                }
                Device::new_cuda(n)
                    .map(|d| (d, other.to_string()))
                    .map_err(|e| DeviceError::Unavailable { asked: other.into(), problem: e.to_string() })
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_choices() {
            assert!(matches!(select("cpu"), Ok((Device::Cpu, _))));
            assert!(select("auto").is_ok());
            assert!(matches!(select("gpu"), Err(DeviceError::Unknown(_))));
            if !candle_core::utils::cuda_is_available() {
                assert!(matches!(select("cuda:0"), Err(DeviceError::NoCudaBuild(_))));
            }
        }
    }
}

/// A new private key (ECDSA P-256) and a certificate signing request whose subject is
/// `client_id`: returns (key PEM, request PEM). The key stays on this machine; the operator
/// signs the request with `cohort-server enroll --csr`.
pub fn keygen(client_id: &str) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, client_id);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The file in the state directory that keeps personal heads across restarts.
pub const PERSONAL_HEADS_FILE: &str = "personal-heads.safetensors";

/// Why a client cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Files(#[from] cohort_io::files::FileError),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error("identity: {0}")]
    Identity(#[from] cohort_io::NetError),
    #[error("server address `{addr}`: {problem}")]
    Address { addr: String, problem: String },
}

/// The keys a client needs for secure aggregation: its certificate key signs its key adverts,
/// and its CA checks its neighbours'.
pub fn secure_keys(identity: &cohort_io::Identity) -> Result<SecureKeys, cohort_io::NetError> {
    Ok(SecureKeys {
        signer: Arc::new(cohort_io::secagg_keys::CertSigner::new(identity)?),
        verifier: Arc::new(cohort_io::secagg_keys::CaVerifier::new(identity)),
    })
}

/// Loads the identity, data and device a config names and resolves the server address.
pub async fn setup_from_config(config: &config::ClientConfig) -> Result<daemon::ClientSetup, SetupError> {
    let identity = config.identity.load()?;
    let id = identity.subject()?;
    let keys = secure_keys(&identity)?;
    let heads = config.head_data()?;
    let (device, device_name) = device::select(&config.device)?;
    if let Some(dir) = &config.state_dir {
        std::fs::create_dir_all(dir)
            .map_err(|source| cohort_io::files::FileError::Io { path: dir.display().to_string(), source })?;
    }
    // Personal heads trained in earlier runs.
    let personal_path = config.state_dir.as_ref().map(|d| d.join(PERSONAL_HEADS_FILE));
    let personal = match personal_path.as_ref().filter(|p| p.exists()) {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|source| cohort_io::files::FileError::Io { path: path.display().to_string(), source })?;
            cohort_common::participant::personal_heads_from_bytes(&bytes).map_err(|e| {
                cohort_io::files::FileError::Config {
                    path: path.display().to_string(),
                    message: format!(
                        "the personal heads are unreadable ({e}); restore them or remove the file to start them anew"
                    ),
                }
            })?
        }
        None => Default::default(),
    };
    let ledger = match (&config.privacy, &config.state_dir) {
        (Some(budget), Some(dir)) => {
            Some(Arc::new(std::sync::Mutex::new(ledger::LedgerFile::open(dir, budget.max_epsilon, budget.delta)?)))
        }
        _ => None,
    };
    let server = tokio::net::lookup_host(&config.server)
        .await
        .map_err(|e| SetupError::Address { addr: config.server.clone(), problem: e.to_string() })?
        .next()
        .ok_or_else(|| SetupError::Address { addr: config.server.clone(), problem: "resolves to no address".into() })?;
    Ok(daemon::ClientSetup {
        identity,
        server,
        server_name: config.server_name(),
        participant: Participant::with_heads(id, heads, device)
            .with_secure_keys(keys)
            .with_personal_heads(personal)
            .with_validation_fraction(config.validation_fraction),
        device_name,
        backoff: config.reconnect,
        train_gate: None,
        events: None,
        fault: None,
        ledger,
        endpoint: None,
        personal_path,
    })
}
