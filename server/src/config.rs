//! `server.toml`: where to listen, which model, the test set, and the federation's rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use cohort_common::coordinator::config::{
    AdaptiveClipConfig, Collection, DpConfig, Federation, SecAggConfig, SiteBackoff,
};
use cohort_common::model::ModelSpec;
use cohort_io::files::{DataSource, FileError};
use serde::Deserialize;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}

/// `server.toml` as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfigFile {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The model spec (TOML), relative to this file.
    pub model: PathBuf,
    /// An operator test set to evaluate the global model on after each round.
    #[serde(default)]
    pub test_data: Option<DataSource>,
    /// Serve Prometheus metrics here (`GET /metrics`).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub federation: Federation,
}

/// `server.toml` read, checked and with its files loaded.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub spec: ModelSpec,
    pub test_data: Option<DataSource>,
    pub metrics_listen: Option<SocketAddr>,
    pub federation: Federation,
}

impl ServerConfigFile {
    /// Parses the text of `server.toml` and checks its federation: everything `load` does but
    /// reading the files (this one and the model spec it names). The error names the field.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: ServerConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.federation.check()?;
        Ok(file)
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FileError::Io { path: path.display().to_string(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
        let file = ServerConfigFile::from_toml(&text).map_err(bad)?;
        let model_path = base.join(&file.model);
        let text = std::fs::read_to_string(&model_path)
            .map_err(|source| FileError::Io { path: model_path.display().to_string(), source })?;
        let spec = ModelSpec::from_toml(&text)
            .map_err(|e| FileError::Config { path: model_path.display().to_string(), message: e.to_string() })?;
        file.federation.check_model(&spec).map_err(bad)?;
        Ok(Self {
            listen: file.listen,
            spec,
            test_data: file.test_data.map(|d| d.resolve(base)),
            metrics_listen: file.metrics_listen,
            federation: file.federation,
        })
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
        assert_eq!(ok.spec.name, "mnist-2nn");
        assert_eq!(ok.federation.clients_per_round, 10);
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
        let dp = ServerConfig::load(&path).unwrap().federation.dp.unwrap();
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
}
