//! # cohort-client
//!
//! The data owner's side of Cohort: the daemon `cohort-client` and the library it is made of.
//!
//! - [`config`]: `client.toml` (server, identity, data, device, reconnection, privacy budget, and
//!   the `[policy]` of runs this site joins).
//! - [`daemon`]: the driver of `cohort_common::session::ClientSession`: dial, hello, feed it the
//!   server's requests, send its replies, run its jobs on `cohort_common::trainer::Trainer` on a
//!   blocking thread, write the privacy ledger before the reply that depends on it, reconnect
//!   with backoff, stop cleanly; it refuses to run with an expired certificate, warns while it
//!   expires within 30 days, and stops (with the renew instructions) when it expires while
//!   connected.
//! - [`device`]: `auto | cpu | cuda:N` to a candle device.
//! - [`ledger`]: the file that keeps the client's own privacy ledger (which the session charges
//!   per round it trains in, unless the data owner trusts the server's sampler, and which
//!   declines rounds past its budget), and [`ledger::describe`] for `cohort-client ledger`: what
//!   each run spent and what is left.
//! - [`progress`]: the progress of local training, as a bar on a terminal or a log line every
//!   ten seconds.
//! - [`renew`]: `cohort-client renew`: a new key and request for the same id, then the
//!   operator's certificate checked (same id, the pending key, the CA, valid now) and installed
//!   over the identity files; the warnings `check` and the daemon give within
//!   [`renew::EXPIRY_WARNING_DAYS`] of expiry, and the refusal once it has expired.
//! - [`keygen`]: a private key and certificate signing request for a new client id.
//! - [`setup_from_config`]: everything `run` and `check` need, loaded and checked;
//!   [`setup_with_runner`]: the same with another job runner than candle's (the Python
//!   package's clients, whose training is their own code).
//! - [`evaluate_model`]: `cohort-client evaluate`, a global model on this client's own data, or
//!   on another labelled data set (`--data`).
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
pub mod progress;
pub mod renew;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cohort_common::model::{flat_from_safetensors, spec_from_safetensors, Model, ModelSpec};
use cohort_common::session::{ClientSession, SecureKeys};
use cohort_common::train::Metrics;
use cohort_common::trainer::{JobRunner, Trainer};

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

/// The SHA-256 of a private key's public half (as `cohort-server enroll` and `sign` print it):
/// the data owner tells the operator, who checks that the request signed is the one made here.
pub fn key_hash(key_pem: &str) -> Result<String, rcgen::Error> {
    use rcgen::PublicKeyData;
    Ok(cohort_io::key_hash(&rcgen::KeyPair::from_pem(key_pem)?.subject_public_key_info()))
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
    #[error("model {path}: {problem}")]
    Model { path: String, problem: String },
}

/// The keys a client needs for secure aggregation: its certificate key signs its key adverts,
/// and its CA checks its neighbours'.
pub fn secure_keys(identity: &cohort_io::Identity) -> Result<SecureKeys, cohort_io::NetError> {
    Ok(SecureKeys {
        signer: Arc::new(cohort_io::secagg_keys::CertSigner::new(identity)?),
        verifier: Arc::new(cohort_io::secagg_keys::CaVerifier::new(identity)),
    })
}

/// Personal heads by name, as kept in the state directory.
pub type PersonalHeads = BTreeMap<String, Vec<f32>>;

/// Where this client keeps its personal heads, and those trained in earlier runs.
fn personal_heads(
    config: &config::ClientConfig,
) -> Result<(Option<PathBuf>, PersonalHeads), cohort_io::files::FileError> {
    let personal_path = config.state_dir.as_ref().map(|d| d.join(PERSONAL_HEADS_FILE));
    let personal = match personal_path.as_ref().filter(|p| p.exists()) {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|source| cohort_io::files::FileError::Io { path: path.display().to_string(), source })?;
            cohort_common::model::vectors_from_safetensors(&bytes).map_err(|e| cohort_io::files::FileError::Config {
                path: path.display().to_string(),
                message: format!(
                    "the personal heads are unreadable ({e}); restore them or remove the file to start them anew"
                ),
            })?
        }
        None => Default::default(),
    };
    Ok((personal_path, personal))
}

/// What `cohort-client evaluate` found: each head of the model, with its metrics on this
/// client's data where it labels the head.
pub struct LocalEvaluation {
    pub spec: ModelSpec,
    /// What the metrics were computed on: `validation split`, `training data`, or the data
    /// `--data` named.
    pub on: String,
    pub heads: Vec<(String, Option<Metrics>)>,
}

/// Evaluates a model file (`cohort-server export`) on this client's own data, as federated
/// evaluation would: with its personal heads, on its validation split (`validation_fraction`)
/// or else its training data. The model spec comes from the file, or from `spec` when given.
pub fn evaluate_model(
    config: &config::ClientConfig,
    model_path: &Path,
    spec: Option<ModelSpec>,
    other: Option<(config::EvaluationData, &Path)>,
) -> Result<LocalEvaluation, SetupError> {
    let bad = |problem: String| SetupError::Model { path: model_path.display().to_string(), problem };
    let bytes = std::fs::read(model_path).map_err(|e| bad(e.to_string()))?;
    let spec = match spec {
        Some(spec) => spec,
        None => spec_from_safetensors(&bytes).map_err(|e| bad(e.to_string()))?.ok_or_else(|| {
            bad("the file carries no model spec (not written by Cohort); name the spec with --spec".into())
        })?,
    };
    let layout = Model::new(&spec, &candle_core::Device::Cpu, 0).map_err(|e| bad(e.to_string()))?.layout().clone();
    let params = flat_from_safetensors(&layout, &bytes).map_err(|e| bad(e.to_string()))?;
    let (device, _) = device::select(&config.device)?;
    let (_, personal) = personal_heads(config)?;
    let (mut trainer, on) = match other {
        // Another labelled data set, whole (a held-out set of the site, another site's test set).
        Some((data, path)) => (
            Trainer::with_heads("local", vec![data.head_data()?], device).with_personal_heads(personal),
            format!("data in {}", path.display()),
        ),
        None => (
            Trainer::with_heads("local", config.head_data()?, device)
                .with_personal_heads(personal)
                .with_validation_fraction(config.validation_fraction),
            if config.validation_fraction > 0.0 { "validation split" } else { "training data" }.to_string(),
        ),
    };
    let heads = trainer.evaluate(&spec.to_toml(), &params).map_err(|e| bad(e.to_string()))?;
    Ok(LocalEvaluation { spec, on, heads })
}

/// Loads the identity, data and device a config names and resolves the server address: the
/// native client, training with candle.
pub async fn setup_from_config(config: &config::ClientConfig) -> Result<daemon::ClientSetup, SetupError> {
    let heads = config.head_data()?;
    let (device, device_name) = device::select(&config.device)?;
    let validation = config.validation_fraction;
    setup_with_runner(config, device_name, move |id, personal| {
        Box::new(
            Trainer::with_heads(id, heads, device)
                .with_progress(progress::observer())
                .with_personal_heads(personal)
                .with_validation_fraction(validation),
        )
    })
    .await
}

/// Everything a daemon needs from a config but what runs its jobs: `runner` makes that from
/// the client's id (its certificate's subject) and the personal heads kept by earlier runs.
/// The Python package's clients start here, with their own training; `device_name` is what the
/// server's logs show for the client.
pub async fn setup_with_runner(
    config: &config::ClientConfig,
    device_name: String,
    runner: impl FnOnce(String, PersonalHeads) -> Box<dyn JobRunner>,
) -> Result<daemon::ClientSetup, SetupError> {
    let identity = config.identity.load()?;
    let id = identity.subject()?;
    let keys = secure_keys(&identity)?;
    if let Some(dir) = &config.state_dir {
        std::fs::create_dir_all(dir)
            .map_err(|source| cohort_io::files::FileError::Io { path: dir.display().to_string(), source })?;
    }
    let (personal_path, personal) = personal_heads(config)?;
    let ledger = match (&config.privacy, &config.state_dir) {
        (Some(budget), Some(dir)) => {
            let file = ledger::LedgerFile::open(dir, budget.max_epsilon, budget.delta, budget.accounting())?;
            Some(Arc::new(std::sync::Mutex::new(file)))
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
        session: ClientSession::new(id.clone())
            .with_secure_keys(keys)
            .with_min_sum_clients(config.min_sum_clients)
            .with_policy(config.policy.run_policy()),
        trainer: runner(id, personal),
        device_name,
        backoff: config.reconnect,
        train_gate: None,
        events: None,
        fault: None,
        tamper: None,
        ledger,
        endpoint: None,
        personal_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_common::model::vectors_to_safetensors;

    const SPEC: &str =
        "name = 'two'\ninput_shape = [2]\n[[trunk]]\nkind = 'linear'\nout = 4\n[[trunk]]\nkind = 'relu'\n\
                        [[heads]]\nname = 'y'\nclasses = 2\npersonal = true\n[[heads]]\nname = 'other'\nclasses = 3\n";

    /// A client labelling head `y` with 20 rows of a CSV; `extra` is appended to its config.
    fn client(dir: &Path, extra: &str) -> config::ClientConfig {
        let rows: String =
            (0..20).map(|i| format!("{},{},{}\n", i as f32 / 20.0, 1.0 - i as f32 / 20.0, i % 2)).collect();
        std::fs::write(dir.join("d.csv"), format!("a,b,label\n{rows}")).unwrap();
        let text = format!(
            "server = 'fl.example.org:4433'\nidentity = {{ bundle = 'me.pem' }}\ndevice = 'cpu'\n{extra}\n\
             [data]\nformat = 'csv'\npath = 'd.csv'\nlabel_column = 'label'\nclasses = 2\n\
             [[heads]]\nname = 'y'\n"
        );
        std::fs::write(dir.join("client.toml"), text).unwrap();
        config::ClientConfig::load(&dir.join("client.toml")).unwrap()
    }

    #[test]
    fn evaluates_an_exported_model_with_the_personal_heads_on_local_data() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::from_toml(SPEC).unwrap();
        let model = Model::new(&spec, &candle_core::Device::Cpu, 3).unwrap();
        let model_path = dir.path().join("model.safetensors");
        std::fs::write(&model_path, model.to_safetensors().unwrap()).unwrap();

        let config = client(dir.path(), "");
        let evaluation = evaluate_model(&config, &model_path, None, None).unwrap();
        assert_eq!(evaluation.spec, spec, "the spec travels in the file");
        assert_eq!(evaluation.on, "training data");
        let names: Vec<&str> = evaluation.heads.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(names, ["y", "other"]);
        assert!(evaluation.heads[1].1.is_none(), "head `other` is not labelled here");
        let data = config.head_data().unwrap()[0].data.clone();
        let expected = cohort_common::train::evaluate(
            &model,
            0,
            &cohort_common::train::DeviceData::new(&data, &model).unwrap(),
            64,
        )
        .unwrap();
        let y = evaluation.heads[0].1.clone().unwrap();
        assert_eq!(y.confusion, expected.confusion);
        assert!(expected.confusion.iter().map(|row| row[0]).sum::<u64>() > 0, "the exported head predicts 0 too");
        assert!((y.loss - expected.loss).abs() < 1e-5);

        // With a state directory holding a personal head that always says 1, and a validation split.
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let y_segment = model.layout().segments()[1].clone();
        let mut always_one = vec![0.0f32; y_segment.len];
        // Layout order inside the head: bias (2), then weight (2 x 4).
        always_one[1] = 5.0;
        let saved = BTreeMap::from([("y".to_string(), always_one)]);
        std::fs::write(state.join(PERSONAL_HEADS_FILE), vectors_to_safetensors(&saved)).unwrap();
        let without = client(dir.path(), "validation_fraction = 0.25");
        let exported_head = evaluate_model(&without, &model_path, None, None).unwrap().heads[0].1.clone().unwrap();
        let config = client(dir.path(), "state_dir = 'state'\nvalidation_fraction = 0.25");
        let evaluation = evaluate_model(&config, &model_path, None, None).unwrap();
        assert_eq!(evaluation.on, "validation split");

        // Issue 15: another data set than the client's own (`--data`): its whole set, for head y.
        let rows: String = (0..8).map(|i| format!("{},{},1\n", i as f32 / 8.0, 0.5)).collect();
        std::fs::write(dir.path().join("held-out.csv"), format!("a,b,label\n{rows}")).unwrap();
        let other = dir.path().join("held-out.toml");
        std::fs::write(
            &other,
            "head = 'y'\n[data]\nformat = 'csv'\npath = 'held-out.csv'\nlabel_column = 'label'\nclasses = 2\n",
        )
        .unwrap();
        let data = config::EvaluationData::load(&other).unwrap();
        let elsewhere = evaluate_model(&config, &model_path, None, Some((data, &other))).unwrap();
        assert!(elsewhere.on.contains("held-out.toml"), "{}", elsewhere.on);
        assert_eq!(elsewhere.heads[0].1.as_ref().unwrap().examples, 8, "all 8 rows, no split");
        std::fs::write(
            &other,
            "[data]\nformat = 'csv'\npath = 'held-out.csv'\nlabel_column = 'label'\nclasses = 99999999\n",
        )
        .unwrap();
        let err = config::EvaluationData::load(&other).err().unwrap().to_string();
        assert!(err.contains("held-out.toml") && err.contains("4096"), "{err}");
        let y = evaluation.heads[0].1.clone().unwrap();
        assert_eq!(y.examples, 5, "every fourth row");
        assert_eq!(y.confusion.iter().map(|row| row[0]).sum::<u64>(), 0, "the personal head predicts 1 only");
        assert_ne!(y.confusion, exported_head.confusion, "the exported copy of the head predicts otherwise");

        // A file without a spec needs --spec; a stranger file is an error naming it.
        let bare = dir.path().join("bare.safetensors");
        let tensors: Vec<(String, candle_core::Tensor)> = model
            .layout()
            .entries()
            .iter()
            .zip(model.vars())
            .map(|(e, v)| (e.name.clone(), v.as_tensor().clone()))
            .collect();
        std::fs::write(&bare, safetensors::tensor::serialize(tensors, None).unwrap()).unwrap();
        let err = evaluate_model(&config, &bare, None, None).err().unwrap().to_string();
        assert!(err.contains("bare.safetensors") && err.contains("--spec"), "{err}");
        assert!(evaluate_model(&config, &bare, Some(spec.clone()), None).is_ok());
        std::fs::write(&bare, b"not a model").unwrap();
        let err = evaluate_model(&config, &bare, None, None).err().unwrap().to_string();
        assert!(err.contains("bare.safetensors"), "{err}");
    }
}
