//! `server.toml`: where to listen, which model, the test set, and the federation's rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use cohort_common::coordinator::config::{
    AdaptiveClipConfig, Collection, DpConfig, Federation, SecAggConfig, SiteBackoff,
};
use cohort_common::model::{ModelSpec, ParamLayout};
use cohort_io::files::{DataSource, FileError};
use serde::Deserialize;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}

/// The name of the run server.toml describes, unless it says `run = "..."`.
pub const DEFAULT_RUN: &str = "main";

/// `server.toml` as written by the operator: where to listen, and optionally a run (a model and
/// its `[federation]`) that the server runs first. Further runs are submitted to the running
/// server with `cohort-server submit` (a run file: the same `model`, `test_data` and
/// `[federation]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfigFile {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics here (`GET /metrics`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The name of this file's run (default [`DEFAULT_RUN`]).
    #[serde(default)]
    pub run: Option<String>,
    /// The model spec (TOML), relative to this file.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// An operator test set to evaluate the global model on after each round.
    #[serde(default)]
    pub test_data: Option<DataSource>,
    /// The model the run starts from (safetensors, every tensor of the spec), relative to this
    /// file; default: the spec's seeded initialisation.
    #[serde(default)]
    pub initial_model: Option<PathBuf>,
    #[serde(default)]
    pub federation: Option<Federation>,
    /// After the last run, wait for more (`true`; the default when this file has no run) or
    /// end the federation (`false`; the default when it has one): clients are then told the
    /// federation is finished, and stop.
    #[serde(default)]
    pub keep_serving: Option<bool>,
}

/// A run file (`cohort-server submit --config`), or the run part of server.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfigFile {
    /// The model spec (TOML), relative to this file.
    pub model: PathBuf,
    #[serde(default)]
    pub test_data: Option<DataSource>,
    /// The model the run starts from, relative to this file.
    #[serde(default)]
    pub initial_model: Option<PathBuf>,
    pub federation: Federation,
}

/// A run read, checked and with its model spec loaded.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub name: String,
    pub spec: ModelSpec,
    /// With absolute paths.
    pub test_data: Option<DataSource>,
    /// The model the run starts from (an absolute path), checked against the spec when read.
    pub initial_model: Option<PathBuf>,
    pub federation: Federation,
}

/// `server.toml` read, checked and with its files loaded.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// The run this file describes, run first.
    pub run: Option<RunConfig>,
    pub keep_serving: bool,
}

impl ServerConfigFile {
    /// Parses the text of `server.toml` and checks its federation: everything `load` does but
    /// reading the files (this one and the model spec it names). The error names the field.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: ServerConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        match (&file.model, &file.federation) {
            (Some(_), Some(federation)) => federation.check()?,
            (None, None) if file.test_data.is_none() && file.run.is_none() && file.initial_model.is_none() => {}
            (None, _) => {
                return Err("a run in server.toml needs `model` (the model spec) and a [federation] table; leave \
                            `run`, `test_data`, `initial_model` and [federation] out to host submitted runs only"
                    .into())
            }
            (Some(_), None) => {
                return Err("`model` needs a [federation] table (rounds, clients per round, ...)".into());
            }
        }
        if let Some(name) = &file.run {
            cohort_common::wire::check_run_name(name)?;
        }
        Ok(file)
    }
}

impl RunConfigFile {
    /// Parses a run file's text and checks its federation. The error names the field.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: RunConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.federation.check()?;
        Ok(file)
    }
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Io { path: path.display().to_string(), source })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Io { path: path.display().to_string(), source })
}

impl RunConfig {
    /// Reads a run file and the model spec it names (relative to it).
    pub fn load(path: &Path, name: &str) -> Result<Self, FileError> {
        let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
        cohort_common::wire::check_run_name(name).map_err(bad)?;
        let file = RunConfigFile::from_toml(&read(path)?).map_err(bad)?;
        Self::from_parts(path, name, file.model, file.test_data, file.initial_model, file.federation)
    }

    fn from_parts(
        path: &Path,
        name: &str,
        model: PathBuf,
        test_data: Option<DataSource>,
        initial_model: Option<PathBuf>,
        federation: Federation,
    ) -> Result<Self, FileError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        let model_path = base.join(model);
        let spec = ModelSpec::from_toml(&read(&model_path)?)
            .map_err(|e| FileError::Config { path: model_path.display().to_string(), message: e.to_string() })?;
        federation
            .check_model(&spec)
            .map_err(|message| FileError::Config { path: path.display().to_string(), message })?;
        check_test_set(&spec, test_data.is_some())
            .map_err(|message| FileError::Config { path: path.display().to_string(), message })?;
        let initial_model = initial_model.map(|p| base.join(p));
        if let Some(initial) = &initial_model {
            let model = cohort_common::model::Model::new(&spec, &candle_core::Device::Cpu, 0)
                .map_err(|e| FileError::Config { path: path.display().to_string(), message: e.to_string() })?;
            read_initial_model(initial, &spec.name, model.layout())?;
        }
        Ok(Self { name: name.into(), spec, test_data: test_data.map(|d| d.resolve(&base)), initial_model, federation })
    }

    /// The run file a submitted run keeps in its directory: this run's settings with the model
    /// spec beside it (`model.toml`) and absolute data paths, so later edits to the operator's
    /// files do not change a submitted run. `original` is the text it was read from.
    pub fn to_run_file(&self, original: &str) -> Result<String, String> {
        let mut table: toml::Table = toml::from_str(original).map_err(|e| e.to_string())?;
        table.insert("model".into(), toml::Value::String(RUN_MODEL_FILE.into()));
        match &self.test_data {
            Some(data) => {
                table.insert("test_data".into(), toml::Value::try_from(data).map_err(|e| e.to_string())?);
            }
            None => {
                table.remove("test_data");
            }
        }
        // `runs::submit` keeps a copy beside the run file, as it does the spec.
        match &self.initial_model {
            Some(_) => {
                table.insert("initial_model".into(), toml::Value::String(RUN_INITIAL_MODEL_FILE.into()));
            }
            None => {
                table.remove("initial_model");
            }
        }
        toml::to_string(&table).map_err(|e| e.to_string())
    }
}

/// The model spec's file name in a submitted run's directory.
pub const RUN_MODEL_FILE: &str = "model.toml";
/// The run file's name in a submitted run's directory.
pub const RUN_FILE: &str = "run.toml";
/// The initial model's file name in a submitted run's directory.
pub const RUN_INITIAL_MODEL_FILE: &str = "initial.safetensors";

/// A model of declared parameters has no layers to evaluate a test set with.
pub fn check_test_set(spec: &ModelSpec, has_test_set: bool) -> Result<(), String> {
    match spec.declares_parameters() && has_test_set {
        true => Err(format!(
            "the model `{}` declares its parameters only (no layers), so the server cannot evaluate it on `test_data`: \
             leave test_data out and set [federation] evaluate_every for federated evaluation (the clients' own \
             `evaluate`)",
            spec.name
        )),
        false => Ok(()),
    }
}

/// Reads a run's initial model (`initial_model`) for the model `model` of `layout`: its size
/// checked before it is read (it must fit in one plan), every tensor with its shape, every value
/// finite. The flat parameters.
pub fn read_initial_model(path: &Path, model: &str, layout: &ParamLayout) -> Result<Vec<f32>, FileError> {
    let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
    let size = std::fs::metadata(path).map_err(|source| FileError::Io { path: path.display().to_string(), source })?;
    if size.len() > cohort_common::wire::MAX_FRAME_BYTES as u64 {
        return Err(bad(format!(
            "{} bytes; a model must fit in one plan ({} bytes)",
            size.len(),
            cohort_common::wire::MAX_FRAME_BYTES
        )));
    }
    let flat = cohort_common::model::flat_from_safetensors(layout, &read_bytes(path)?).map_err(|e| {
        bad(format!("{e}; the initial model must hold every tensor of the model `{model}` with its shape"))
    })?;
    if flat.iter().any(|v| !v.is_finite()) {
        return Err(bad("the initial model holds non-finite values".into()));
    }
    Ok(flat)
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
        let file = ServerConfigFile::from_toml(&read(path)?).map_err(bad)?;
        let run = match (file.model, file.federation) {
            (Some(model), Some(federation)) => {
                let name = file.run.unwrap_or_else(|| DEFAULT_RUN.into());
                Some(RunConfig::from_parts(path, &name, model, file.test_data, file.initial_model, federation)?)
            }
            _ => None,
        };
        let keep_serving = file.keep_serving.unwrap_or(run.is_none());
        Ok(Self { listen: file.listen, metrics_listen: file.metrics_listen, run, keep_serving })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_configs_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(dir.path().join("m.toml"), cohort_common::specs::MNIST_2NN).unwrap();
        std::fs::write(&path, "model = 'm.toml'\n[federation]\nrounds = 3\nclients_per_round = 2\nmin_clients = 5\n")
            .unwrap();
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("server.toml") && err.contains("min_clients"), "{err}");
        std::fs::write(&path, "model = 'm.toml'\n[federation]\nrounds = 3\n[federation.train]\nlr = -1.0\n").unwrap();
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("lr = -1"), "{err}");
        std::fs::write(&path, "model = 'missing.toml'\n[federation]\nrounds = 3\n").unwrap();
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::write(&path, "model = 'm.toml'\n[federation]\nrounds = 3\n").unwrap();
        let ok = ServerConfig::load(&path).unwrap();
        let run = ok.run.unwrap();
        assert_eq!((run.name.as_str(), run.spec.name.as_str()), (DEFAULT_RUN, "mnist-2nn"));
        assert_eq!(run.federation.clients_per_round, 10);
        assert!(!ok.keep_serving, "a server.toml with a run ends the federation after it");
        for (dp, field) in [
            ("collection = 'plain'\n[federation.dp]\nclip = 1.0", "collection = \"secure\""),
            ("[federation.dp]\nclip = 0.0", "clip = 0"),
            ("[federation.dp]\nclip = 1.0\nepsilon_budget = 8.0", "noise_multiplier > 0"),
            ("[federation.dp]\nclip = 1.0\nnoise_multiplier = 1.0\ncount_noise = 0.1", "count_noise = 0.1"),
            ("[federation.dp]\nclip = 1.0\n[federation.dp.adaptive]\ntarget_quantile = 2.0", "target_quantile"),
        ] {
            std::fs::write(&path, format!("model = 'm.toml'\n[federation]\nrounds = 3\n{dp}\n")).unwrap();
            let err = ServerConfig::load(&path).err().unwrap().to_string();
            assert!(err.contains("federation.dp") && err.contains(field), "{dp}: {err}");
        }
        std::fs::write(
            &path,
            "model = 'm.toml'\n[federation]\nrounds = 3\n[federation.dp]\nclip = 1.0\nnoise_multiplier = 1.0\n",
        )
        .unwrap();
        let dp = ServerConfig::load(&path).unwrap().run.unwrap().federation.dp.unwrap();
        assert_eq!(dp.count_noise(10), 1.0, "small cohorts default to count noise z");
        assert_eq!(dp.count_noise(600), 30.0, "Andrew et al.: clients_per_round / 20");
        for (train, field) in [
            ("[federation.train.head_loss.digit]\nscope = 'global'", "federation.train.head_loss.digit.scope"),
            ("[federation.train.head_loss.colour]\nweighting = 'inverse_frequency'", "no head `colour`"),
            ("[federation.train.head_loss.digit]\nbeta = 2.0", "head_loss.digit.beta = 2"),
            ("[federation.train]\nhead_epochs = 0", "head_epochs = 0"),
        ] {
            std::fs::write(
                &path,
                format!("model = 'm.toml'\n[federation]\nrounds = 3\ncollection = 'plain'\n{train}\n"),
            )
            .unwrap();
            let err = ServerConfig::load(&path).err().unwrap().to_string();
            assert!(err.contains("server.toml") && err.contains(field), "{train}: {err}");
        }
    }

    #[test]
    fn a_phase_timeout_past_any_deadline_is_refused() {
        // Issue 15: 1e19 passed the check and panicked the server when round 1 set its deadline.
        let text = "model = 'm.toml'\n[federation]\nrounds = 1\n[federation.secagg]\nphase_timeout_secs = 1e19\n";
        let err = ServerConfigFile::from_toml(text).err().unwrap();
        assert!(err.contains("phase_timeout_secs = 10000000000000000000 must be"), "{err}");
    }

    #[test]
    fn a_huge_secure_cohort_is_an_error_not_an_allocation() {
        // Found in review, confirmed with the `server_config_toml` target: the check built a
        // trial cohort of clients_per_round ids before asking whether a secure session takes that
        // many (3.2 TB for this one).
        let text = "model = 'm.toml'\n[federation]\nrounds = 1\nclients_per_round = 100000000000\n";
        let err = ServerConfigFile::from_toml(text).err().unwrap();
        assert!(err.contains("clients_per_round = 100000000000 is more than a secure session takes"), "{err}");
        let plain =
            "model = 'm.toml'\n[federation]\nrounds = 1\nclients_per_round = 100000000000\ncollection = 'plain'\n";
        assert!(ServerConfigFile::from_toml(plain).is_ok());
    }

    #[test]
    fn adaptive_clipping_follows_the_noisy_count() {
        let mut dp = DpConfig {
            clip: 1.0,
            noise_multiplier: 1.0,
            per_segment: false,
            delta: 1e-5,
            epsilon_budget: None,
            count_noise: None,
            adaptive: None,
        };
        assert_eq!(dp.next_clip(1.0, 0.0), 1.0, "fixed clipping stays put");
        dp.adaptive = Some(AdaptiveClipConfig::default());
        assert!(dp.next_clip(1.0, 0.0) > 1.0, "every update clipped: C grows");
        assert!(dp.next_clip(1.0, 1.0) < 1.0, "none clipped: C shrinks");
    }

    #[test]
    fn a_run_starts_from_an_initial_model_only_if_it_fits_and_a_declared_model_has_no_test_set() {
        let dir = tempfile::tempdir().unwrap();
        let spec = "name='d'\n[[heads]]\nname='y'\nclasses=2\n[[heads.parameters]]\nname='fc.weight'\nshape=[2, 3]\n";
        std::fs::write(dir.path().join("m.toml"), spec).unwrap();
        let model =
            cohort_common::model::Model::new(&ModelSpec::from_toml(spec).unwrap(), &candle_core::Device::Cpu, 5)
                .unwrap();
        std::fs::write(dir.path().join("init.safetensors"), model.to_safetensors().unwrap()).unwrap();
        let other = cohort_common::model::Model::new(
            &ModelSpec::from_toml(cohort_common::specs::MNIST_2NN).unwrap(),
            &candle_core::Device::Cpu,
            5,
        )
        .unwrap();
        std::fs::write(dir.path().join("other.safetensors"), other.to_safetensors().unwrap()).unwrap();
        let path = dir.path().join("server.toml");
        let write = |extra: &str| {
            std::fs::write(
                &path,
                format!("model = 'm.toml'\n{extra}\n[federation]\nrounds = 3\nclients_per_round = 3\n"),
            )
            .unwrap()
        };
        write("initial_model = 'init.safetensors'");
        let run = ServerConfig::load(&path).unwrap().run.unwrap();
        assert_eq!(run.initial_model.as_deref(), Some(dir.path().join("init.safetensors").as_path()));
        write("initial_model = 'other.safetensors'");
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("other.safetensors") && err.contains("fc.weight"), "{err}");
        write("initial_model = 'absent.safetensors'");
        assert!(ServerConfig::load(&path).err().unwrap().to_string().contains("absent.safetensors"));
        write("[test_data]\nformat = 'csv'\npath = 't.csv'\nlabel_column = 'y'\nclasses = 2");
        let err = ServerConfig::load(&path).err().unwrap().to_string();
        assert!(err.contains("declares its parameters only") && err.contains("evaluate_every"), "{err}");
    }
}
