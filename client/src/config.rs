//! `client.toml`: the server to dial, this client's identity, its data and device.

use std::path::{Path, PathBuf};

use cohort_io::files::{DataSource, FileError};
use cohort_io::Identity;
use serde::Deserialize;
use std::sync::Arc;

use cohort_common::trainer::HeadData;

/// The certificate and key, as separate PEM files or as one bundle.
///
/// `[identity]` takes exactly one of two shapes: `bundle` alone, or `cert`, `key` and `ca`
/// together. Any other key is refused with a message that names it and both shapes.
#[derive(Debug, Clone)]
pub enum IdentityFiles {
    Bundle { bundle: PathBuf },
    Files { cert: PathBuf, key: PathBuf, ca: PathBuf },
}

/// The shapes `[identity]` accepts, in the words of its error messages.
const IDENTITY_SHAPES: &str = "`[identity]` takes either `bundle = \"ID.pem\"` (one PEM file with the certificate, \
     key and CA) or all three of `cert = \"ID.crt\"`, `key = \"ID.key\"` and `ca = \"ca.crt\"`";

impl<'de> Deserialize<'de> for IdentityFiles {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Two steps: the keys as given, then the shape they make. (An untagged enum can only say
        // that the table matched neither shape.)
        let mut table = std::collections::BTreeMap::<String, PathBuf>::deserialize(deserializer)?;
        if let Some(unknown) = table.keys().find(|k| !["bundle", "cert", "key", "ca"].contains(&k.as_str())) {
            return Err(D::Error::custom(format!("unknown key `{unknown}` in `[identity]`; {IDENTITY_SHAPES}")));
        }
        let (bundle, cert, key, ca) =
            (table.remove("bundle"), table.remove("cert"), table.remove("key"), table.remove("ca"));
        match (bundle, cert, key, ca) {
            (Some(bundle), None, None, None) => Ok(IdentityFiles::Bundle { bundle }),
            (None, Some(cert), Some(key), Some(ca)) => Ok(IdentityFiles::Files { cert, key, ca }),
            (Some(_), ..) => Err(D::Error::custom(format!(
                "`[identity]` has `bundle` and also `cert`, `key` or `ca`; give one shape: {IDENTITY_SHAPES}"
            ))),
            (None, cert, key, ca) => {
                let missing: Vec<&str> = [("cert", cert.is_none()), ("key", key.is_none()), ("ca", ca.is_none())]
                    .into_iter()
                    .filter_map(|(name, absent)| absent.then_some(name))
                    .collect();
                Err(D::Error::custom(format!("`[identity]` lacks `{}`; {IDENTITY_SHAPES}", missing.join("`, `"))))
            }
        }
    }
}

impl IdentityFiles {
    fn resolve(self, base: &Path) -> Self {
        let j = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        match self {
            IdentityFiles::Bundle { bundle } => IdentityFiles::Bundle { bundle: j(bundle) },
            IdentityFiles::Files { cert, key, ca } => IdentityFiles::Files { cert: j(cert), key: j(key), ca: j(ca) },
        }
    }

    pub fn load(&self) -> Result<Identity, FileError> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|source| FileError::Io { path: p.display().to_string(), source });
        let bad = |p: &Path, e: cohort_io::NetError| FileError::Config {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        match self {
            IdentityFiles::Bundle { bundle } => Identity::from_bundle(&read(bundle)?).map_err(|e| bad(bundle, e)),
            IdentityFiles::Files { cert, key, ca } => {
                Identity::from_pem(&read(cert)?, &read(key)?, &read(ca)?).map_err(|e| bad(cert, e))
            }
        }
    }
}

fn backoff_initial() -> u64 {
    250
}
fn backoff_max() -> u64 {
    10_000
}
fn auto() -> String {
    "auto".into()
}

/// Reconnection after a lost connection: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "backoff_initial")]
    pub initial_ms: u64,
    #[serde(default = "backoff_max")]
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial_ms: backoff_initial(), max_ms: backoff_max() }
    }
}

/// `client.toml` as written by the data owner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `host:port` of the server.
    pub server: String,
    /// The name on the server's certificate (default: the host part of `server`).
    #[serde(default)]
    pub server_name: Option<String>,
    pub identity: IdentityFiles,
    /// The labelled examples candle trains on. A client whose training is its own code (the
    /// Python package `cohort`) holds its data itself and leaves `[data]` out.
    #[serde(default)]
    pub data: Option<DataSource>,
    /// `auto`, `cpu` or `cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
    /// Where the client keeps its own state (created if missing).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub reconnect: Backoff,
    /// This client's own privacy budget; its ledger lives in `state_dir`.
    #[serde(default)]
    pub privacy: Option<PrivacyBudget>,
    /// Multi-task models: the heads this client trains and where their labels come from
    /// (default: the first head, labelled by `data`).
    #[serde(default)]
    pub heads: Vec<HeadSource>,
    /// The fraction of this client's examples held out for federated evaluation (0: evaluate on
    /// the training data).
    #[serde(default)]
    pub validation_fraction: f64,
    /// This client's update goes only into secure sums of at least this many clients (label
    /// counts and confusion matrices at least 3), whatever the server asks.
    #[serde(default = "min_sum_clients")]
    pub min_sum_clients: usize,
    /// Which runs this site takes part in.
    #[serde(default)]
    pub policy: Policy,
}

/// `[policy]`: which of the federation's runs this site takes part in. The server hosts many
/// runs one after another; a plan outside the policy is declined with the reason.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The model names (a model spec's `name`) this site trains; absent: any model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The most epsilon one run may spend of `[privacy] max_epsilon` (needs `[privacy]`).
    #[serde(default)]
    pub max_epsilon_per_run: Option<f64>,
}

impl Policy {
    pub fn run_policy(&self) -> cohort_common::session::RunPolicy {
        cohort_common::session::RunPolicy { models: self.models.clone(), max_epsilon_per_run: self.max_epsilon_per_run }
    }
}

/// Three by default: in a sum of two, each of the two learns the other's update. A data owner
/// who accepts that (a two-site consortium) sets 2, as the operator sets `allow_two_site_sums`.
fn min_sum_clients() -> usize {
    cohort_common::secagg::MIN_TRAIN_INPUTS + 1
}

/// `[[heads]]`: one head this client labels.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSource {
    /// The head's name in the model spec.
    pub name: String,
    /// Its own labelled examples (default: `data`).
    #[serde(default)]
    pub data: Option<DataSource>,
    /// `map[label]`: the labels mapped to this head's classes (parity from digits, grades from
    /// scores).
    #[serde(default)]
    pub map: Option<Vec<u32>>,
}

impl ClientConfig {
    /// The labelled data of each head this client trains.
    pub fn head_data(&self) -> Result<Vec<HeadData>, FileError> {
        let no_data = |place: &str| FileError::Config {
            path: place.into(),
            message: "no data: the native client trains on the examples `[data]` (or a head's own `data`) names; \
                      add [data] to client.toml (only a client whose training is its own code, the Python package \
                      `cohort`, leaves it out)"
                .into(),
        };
        let base = self.data.as_ref().map(|d| d.load()).transpose()?;
        if self.heads.is_empty() {
            return Ok(vec![HeadData { head: None, data: Arc::new(base.ok_or_else(|| no_data("[data]"))?) }]);
        }
        self.heads
            .iter()
            .map(|h| {
                let data = match (&h.data, &base) {
                    (Some(source), _) => source.load()?,
                    (None, Some(base)) => base.clone(),
                    (None, None) => return Err(no_data(&format!("[[heads]] `{}`", h.name))),
                };
                let data = match &h.map {
                    Some(map) => {
                        let classes = map.iter().max().map_or(0, |m| *m as usize + 1);
                        data.map_labels(map, classes).map_err(|e| FileError::Config {
                            path: format!("[[heads]] `{}`", h.name),
                            message: e.to_string(),
                        })?
                    }
                    None => data,
                };
                Ok(HeadData { head: Some(h.name.clone()), data: Arc::new(data) })
            })
            .collect()
    }
}

fn delta() -> f64 {
    1e-5
}

/// `[privacy]`: decline private rounds that would take this client past `max_epsilon`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudget {
    pub max_epsilon: f64,
    #[serde(default = "delta")]
    pub delta: f64,
    /// Count amplification by sampling (every round since joining at the server's stated q)
    /// instead of each round this client trains in at full cost. Only for a data owner who
    /// trusts the server's sampler to be secret and honest: against the server itself, which
    /// knows whom it sampled, amplification does not hold.
    #[serde(default)]
    pub trust_server_sampling: bool,
}

impl PrivacyBudget {
    /// The one check of `[privacy]`, made by `check` and `run` alike (through
    /// [`ClientConfig::from_toml`]): the ledger's own rules, so a budget the ledger would refuse
    /// at start never passes the check. NaN, infinite, zero or negative `max_epsilon` is refused,
    /// and `delta` outside (0, 1).
    pub fn check(&self) -> Result<(), String> {
        cohort_common::dp::PrivacyLedger::new(self.max_epsilon, self.delta, self.accounting()).map(|_| ()).map_err(
            |e| {
                format!("[privacy]: {e}; set `max_epsilon` to the most epsilon this client may spend (for example 8.0)")
            },
        )
    }

    pub fn accounting(&self) -> cohort_common::dp::Accounting {
        if self.trust_server_sampling {
            cohort_common::dp::Accounting::SampledRounds
        } else {
            cohort_common::dp::Accounting::Participations
        }
    }
}

/// `cohort-client evaluate --data FILE`: another labelled data set to evaluate a model on (a
/// `[data]` table as in client.toml, paths relative to FILE), for head `head` (default: the
/// model's first).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationData {
    pub data: DataSource,
    #[serde(default)]
    pub head: Option<String>,
}

impl EvaluationData {
    /// Reads and checks FILE (the same class limits as client.toml).
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let parsed: Self = cohort_io::files::read_toml(path)?;
        check_classes(&parsed.data, "[data]")
            .map_err(|message| FileError::Config { path: path.display().to_string(), message })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(Self { data: parsed.data.resolve(base), head: parsed.head })
    }

    /// Loads the data set, for its head.
    pub fn head_data(&self) -> Result<HeadData, FileError> {
        Ok(HeadData { head: self.head.clone(), data: Arc::new(self.data.load()?) })
    }
}

/// The most classes a client's data (and a head's label `map`) may have: as many as one head of
/// a model spec can have, whose confusion matrix (classes squared) must fit in
/// [`cohort_common::model::MAX_CONFUSION_CELLS`]. A larger number is a mistake, and one the
/// client would try to allocate counts for (`classes = 10^15` aborted it).
pub const MAX_CLASSES: usize = cohort_common::model::MAX_CONFUSION_CELLS.isqrt();

/// Refuses a data source with more than [`MAX_CLASSES`] classes; `place` names its table.
fn check_classes(source: &DataSource, place: &str) -> Result<(), String> {
    // The number of classes the source gives, and how to say where it gave it.
    let (classes, given): (usize, fn(usize) -> String) = match source {
        DataSource::Idx { classes, .. } => (*classes, |n| format!("classes = {n}")),
        DataSource::Csv { options, .. } => match (&options.label_values, options.classes) {
            (Some(values), _) => (values.len(), |n| format!("label_values has {n} values")),
            (None, Some(classes)) => (classes, |n| format!("classes = {n}")),
            (None, None) => return Ok(()),
        },
        // Without `classes`, the loaders refuse labels past the same limit.
        DataSource::Npy { classes, .. } | DataSource::Npz { classes, .. } => match classes {
            Some(classes) => (*classes, |n| format!("classes = {n}")),
            None => return Ok(()),
        },
        // Without `classes`, the loader refuses more class folders than the same limit.
        DataSource::Images(folder) => match &folder.classes {
            Some(names) => (names.len(), |n| format!("classes lists {n} names")),
            None => return Ok(()),
        },
    };
    if classes > MAX_CLASSES {
        return Err(format!(
            "{place}: {}, more than the {MAX_CLASSES} classes a model head can have; set it to the number of \
             distinct labels in the data",
            given(classes)
        ));
    }
    Ok(())
}

impl ClientConfig {
    /// Reads the file; relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FileError::Io { path: path.display().to_string(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base).map_err(|message| FileError::Config { path: path.display().to_string(), message })
    }

    /// Parses the text of `client.toml` and checks it: everything [`ClientConfig::load`] does
    /// but reading the file. Relative paths in it are made relative to `base`; no file it names
    /// is read. The error names the field.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, String> {
        let mut config: ClientConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.identity = config.identity.resolve(base);
        config.data = config.data.map(|d| d.resolve(base));
        for head in &mut config.heads {
            head.data = head.data.take().map(|d| d.resolve(base));
        }
        config.state_dir = config.state_dir.map(|d| if d.is_relative() { base.join(d) } else { d });
        if config.reconnect.initial_ms == 0 || config.reconnect.max_ms < config.reconnect.initial_ms {
            return Err("reconnect: initial_ms must be > 0 and max_ms >= initial_ms".into());
        }
        if let Some(privacy) = &config.privacy {
            privacy.check()?;
            if config.state_dir.is_none() {
                return Err("[privacy] needs state_dir: the privacy ledger is kept there across restarts".into());
            }
        }
        if let Some(cap) = config.policy.max_epsilon_per_run {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(format!("[policy]: max_epsilon_per_run = {cap} must be a positive number"));
            }
            match &config.privacy {
                None => {
                    return Err("[policy]: max_epsilon_per_run needs [privacy] (the ledger that counts what each run \
                                spends); add [privacy] with max_epsilon"
                        .into())
                }
                Some(p) if cap > p.max_epsilon => {
                    return Err(format!(
                        "[policy]: max_epsilon_per_run = {cap} is more than [privacy] max_epsilon = {}; a run can \
                         never spend more than the whole budget",
                        p.max_epsilon
                    ))
                }
                Some(_) => {}
            }
        }
        if config.policy.models.as_ref().is_some_and(|m| m.is_empty()) {
            return Err("[policy]: models = [] accepts no run at all; list the model names this site trains, or \
                        leave models out to accept any"
                .into());
        }
        if let Some(data) = &config.data {
            check_classes(data, "[data]")?;
        }
        for head in &config.heads {
            let place = format!("[[heads]] `{}`", head.name);
            if let Some(data) = &head.data {
                check_classes(data, &format!("{place} data"))?;
            }
            if let Some(class) = head.map.iter().flatten().find(|&&c| c as usize >= MAX_CLASSES) {
                return Err(format!(
                    "{place}: map has the class {class}, and a head has at most {MAX_CLASSES} classes; map each label \
                     of the data to one of the head's classes, 0 to its number of classes - 1"
                ));
            }
        }
        if config.min_sum_clients < cohort_common::secagg::MIN_TRAIN_INPUTS {
            return Err(format!(
                "min_sum_clients = {} must be at least 2: a sum of one update is the update",
                config.min_sum_clients
            ));
        }
        if !(0.0..0.5).contains(&config.validation_fraction) {
            return Err(format!("validation_fraction = {} must be in [0, 0.5)", config.validation_fraction));
        }
        if !config.server.contains(':') {
            return Err(format!("server = `{}` needs a port, like `fl.example.org:4433`", config.server));
        }
        Ok(config)
    }

    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            let host = self.server.rsplit_once(':').map_or(self.server.as_str(), |(h, _)| h);
            host.trim_start_matches('[').trim_end_matches(']').to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, heads: &str) -> Result<ClientConfig, FileError> {
        std::fs::write(dir.join("d.csv"), "a,b,digit\n0.1,0.2,3\n0.3,0.4,4\n0.5,0.6,9\n").unwrap();
        let text = format!(
            "server = 'fl.example.org:4433'\nidentity = {{ bundle = 'me.pem' }}\n\
             [data]\nformat = 'csv'\npath = 'd.csv'\nlabel_column = 'digit'\nclasses = 10\n{heads}"
        );
        std::fs::write(dir.join("client.toml"), text).unwrap();
        ClientConfig::load(&dir.join("client.toml"))
    }

    #[test]
    fn heads_take_their_labels_from_data_or_a_map() {
        let dir = tempfile::tempdir().unwrap();
        let plain = config(dir.path(), "").unwrap().head_data().unwrap();
        assert_eq!(plain.len(), 1);
        assert!(plain[0].head.is_none() && plain[0].data.labels == vec![3, 4, 9]);

        let parity = "[[heads]]\nname = 'digit'\n[[heads]]\nname = 'parity'\nmap = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]\n";
        let heads = config(dir.path(), parity).unwrap().head_data().unwrap();
        assert_eq!(heads[0].head.as_deref(), Some("digit"));
        assert_eq!(heads[0].data.labels, vec![3, 4, 9]);
        assert_eq!(heads[1].head.as_deref(), Some("parity"));
        assert_eq!((heads[1].data.labels.clone(), heads[1].data.classes), (vec![1, 0, 1], 2));

        let short = "[[heads]]\nname = 'parity'\nmap = [0, 1]\n";
        let err = config(dir.path(), short).unwrap().head_data().unwrap_err().to_string();
        assert!(err.contains("parity") && err.contains("one entry per class"), "{err}");
    }

    /// `client.toml` with `identity` and `extra` (tables after `[data]`) spliced in.
    fn parse(identity: &str, data: &str, extra: &str) -> Result<ClientConfig, String> {
        let text = format!(
            "server = 'fl.example.org:4433'\nstate_dir = 'state'\nidentity = {identity}\n\
             [data]\nformat = 'csv'\npath = 'd.csv'\nlabel_column = 'digit'\n{data}\n{extra}"
        );
        ClientConfig::from_toml(&text, Path::new("/etc/cohort"))
    }

    const BUNDLE: &str = "{ bundle = 'me.pem' }";

    #[test]
    fn classes_and_label_maps_past_a_heads_limit_are_refused() {
        assert_eq!(MAX_CLASSES, 4096);
        parse(BUNDLE, "classes = 4096", "").unwrap();
        // 10^15 classes aborted the client (allocation failure) when it counted its labels.
        let err = parse(BUNDLE, "classes = 1000000000000000", "").unwrap_err();
        assert!(err.contains("[data]: classes = 1000000000000000") && err.contains("4096"), "{err}");
        let err = parse(BUNDLE, "classes = 4097", "").unwrap_err();
        assert!(err.contains("[data]: classes = 4097"), "{err}");
        let values = format!("label_values = {:?}", (0..5000).collect::<Vec<i64>>());
        let err = parse(BUNDLE, &values, "").unwrap_err();
        assert!(err.contains("[data]: label_values has 5000 values") && err.contains("4096"), "{err}");

        let idx = "[[heads]]\nname = 'scan'\ndata = { format = 'idx', images = 'i', labels = 'l', classes = 100000 }";
        let err = parse(BUNDLE, "classes = 10", idx).unwrap_err();
        assert!(err.contains("[[heads]] `scan` data: classes = 100000"), "{err}");
        for (data, given) in [
            ("{ format = 'npy', x = 'x.npy', y = 'y.npy', classes = 5000 }", "classes = 5000"),
            ("{ format = 'npz', path = 'd.npz', classes = 5000 }", "classes = 5000"),
            ("{ format = 'images', dir = 'train', classes = [NAMES] }", "classes lists 4097 names"),
        ] {
            let names: Vec<String> = (0..4097).map(|i| format!("'c{i}'")).collect();
            let head = format!("[[heads]]\nname = 'scan'\ndata = {}", data.replace("NAMES", &names.join(", ")));
            let err = parse(BUNDLE, "classes = 10", &head).unwrap_err();
            assert!(err.contains(&format!("[[heads]] `scan` data: {given}")) && err.contains("4096"), "{err}");
        }
        parse(BUNDLE, "classes = 10", "[[heads]]\nname = 'scan'\ndata = { format = 'images', dir = 'train' }").unwrap();
        // The loaders refuse as many classes without `classes` (labels past it, class folders).
        assert_eq!(cohort_io::files::images::MAX_CLASSES, MAX_CLASSES);

        // A map onto class 4294967295 made a head of 2^32 classes: 32 GiB of label counts.
        let map = "[[heads]]\nname = 'parity'\nmap = [0, 1, 0, 1, 0, 1, 0, 1, 0, 4294967295]";
        let err = parse(BUNDLE, "classes = 10", map).unwrap_err();
        assert!(err.contains("[[heads]] `parity`: map has the class 4294967295") && err.contains("4096"), "{err}");
        parse(BUNDLE, "classes = 10", "[[heads]]\nname = 'parity'\nmap = [0, 1, 0, 1, 0, 1, 0, 1, 0, 4095]").unwrap();
    }

    #[test]
    fn a_budget_the_ledger_would_refuse_fails_the_check() {
        // `check` and `run` both load through `from_toml`: NaN passed `check` and failed `run`.
        parse(BUNDLE, "classes = 10", "[privacy]\nmax_epsilon = 8.0").unwrap();
        for bad in ["nan", "inf", "-inf", "0.0", "-1.0"] {
            let err = parse(BUNDLE, "classes = 10", &format!("[privacy]\nmax_epsilon = {bad}")).unwrap_err();
            assert!(err.starts_with("[privacy]: max_epsilon = "), "{bad}: {err}");
            assert!(err.contains("must be a positive number") && err.contains("for example 8.0"), "{bad}: {err}");
        }
        let err = parse(BUNDLE, "classes = 10", "[privacy]\nmax_epsilon = 8.0\ndelta = 1.5").unwrap_err();
        assert!(err.contains("[privacy]: delta = 1.5"), "{err}");
    }

    #[test]
    fn identity_errors_name_the_key_and_the_accepted_shapes() {
        let files = "{ cert = 'me.crt', key = 'me.key', ca = 'ca.crt' }";
        match parse(files, "classes = 10", "").unwrap().identity {
            IdentityFiles::Files { cert, key, ca } => {
                assert_eq!(
                    (cert, key, ca),
                    ("/etc/cohort/me.crt".into(), "/etc/cohort/me.key".into(), "/etc/cohort/ca.crt".into())
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(BUNDLE, "classes = 10", "").unwrap().identity, IdentityFiles::Bundle { .. }));

        let shapes =
            |err: &str| err.contains("`bundle") && err.contains("`cert") && err.contains("`key") && err.contains("`ca");
        for (identity, says) in [
            ("{ bundel = 'me.pem' }", "unknown key `bundel` in `[identity]`"),
            ("{ cert = 'a', key = 'b', ca = 'c', chain = 'd' }", "unknown key `chain` in `[identity]`"),
            ("{ cert = 'a', key = 'b' }", "`[identity]` lacks `ca`"),
            ("{ cert = 'a' }", "`[identity]` lacks `key`, `ca`"),
            ("{}", "`[identity]` lacks `cert`, `key`, `ca`"),
            ("{ bundle = 'a', cert = 'b' }", "has `bundle` and also"),
        ] {
            let err = parse(identity, "classes = 10", "").unwrap_err();
            assert!(err.contains(says) && shapes(&err), "{identity}: {err}");
            assert!(!err.contains("untagged"), "{identity}: {err}");
        }
    }
}
