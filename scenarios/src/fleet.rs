//! `cohort-sim fleet`: what a real fleet of separate processes needs, written to a folder, from
//! a scenario (its model, federation and partition) and a data set:
//!
//! ```text
//! OUT/server/            the server's state directory: CA, server certificate, cohort.db with
//!                        every client enrolled, server.toml, model.toml and the test set
//! OUT/clients/I/         client I (0-based, as JOB_COMPLETION_INDEX in a Kubernetes Indexed
//!                        Job): client.toml, its identity bundle client-IIII.pem (mode 0600)
//!                        and data/ with its partition as IDX files
//! OUT/fleet.json         a summary: server address, and per client its id and label counts
//! ```
//!
//! Every example of the training set (or of its first `train_examples`) goes to exactly one
//! client. The files are checked as written: server.toml with the server's loader, every
//! client.toml with the client's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cohort_common::data::{self, IdxArray, Partition};
use cohort_io::files::{self, DataSource};
use cohort_server::pki::{self, StatePaths};
use cohort_server::store::Enrolment;
use rand::SeedableRng;
use serde::Serialize;

use crate::bundled::{self, DataSearch};
use crate::scenario::Scenario;

/// How to split the data across the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetPartition {
    /// The scenario's own `[partition]`.
    Scenario,
    /// Shuffled, equal parts.
    Iid,
    /// Two label-sorted shards per client (McMahan et al. 2017's pathological non-IID split).
    NonIid,
}

impl std::str::FromStr for FleetPartition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scenario" => Ok(Self::Scenario),
            "iid" => Ok(Self::Iid),
            "non-iid" | "noniid" => Ok(Self::NonIid),
            other => Err(format!("`{other}`: use iid, non-iid or scenario (the scenario's own [partition])")),
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The folder to fill; it must not exist or be empty.
    pub out: PathBuf,
    /// The scenario whose model, federation and data set the fleet uses, one client per
    /// `clients` ([`open_scenario`] fits a scenario to a number of clients).
    pub scenario: Scenario,
    pub partition: FleetPartition,
    /// Names and addresses on the server certificate; the first is what clients dial.
    pub sans: Vec<String>,
    /// The UDP port the server listens on (all interfaces).
    pub port: u16,
    /// `host:port` the clients dial (default: the first SAN and `port`).
    pub server: Option<String>,
    /// Prometheus endpoint of the server, `metrics_listen` in server.toml.
    pub metrics_listen: Option<SocketAddr>,
    /// The clients' `state_dir`, written as given (relative: beside each client.toml).
    pub client_state_dir: String,
    /// Where the data set is (default: searched as `cohort-sim run` searches).
    pub data_dir: Option<PathBuf>,
}

/// One client in `fleet.json`.
#[derive(Debug, Clone, Serialize)]
pub struct FleetClient {
    pub index: usize,
    pub id: String,
    pub examples: usize,
    pub label_counts: Vec<u64>,
    /// Its folder, relative to the fleet's.
    pub dir: PathBuf,
}

/// What was written: `fleet.json` (paths relative to the fleet's folder).
#[derive(Debug, Clone, Serialize)]
pub struct FleetSummary {
    pub scenario: String,
    pub server: String,
    pub server_state: PathBuf,
    pub server_config: PathBuf,
    pub train_examples: usize,
    pub test_examples: usize,
    pub clients: Vec<FleetClient>,
}

const TRAIN: [&str; 2] = ["train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz"];
const TEST: [&str; 2] = ["t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz"];

fn read_idx_file(path: &Path) -> Result<IdxArray, String> {
    let reader = files::open_maybe_gz(path).map_err(|e| e.to_string())?;
    data::read_idx(reader, &path.display().to_string()).map_err(|e| e.to_string())
}

/// The images (N x rows x columns) and labels (N) `files` in `dir`, checked to match.
fn read_images_and_labels(dir: &Path, files: [&str; 2]) -> Result<(IdxArray, IdxArray), String> {
    let (images, labels) = (read_idx_file(&dir.join(files[0]))?, read_idx_file(&dir.join(files[1]))?);
    if images.dims.len() != 3 || labels.dims.len() != 1 || images.dims[0] != labels.dims[0] {
        return Err(format!(
            "{}: {} (dimensions {:?}) and {} ({:?}) are not N images and their N labels",
            dir.display(),
            files[0],
            images.dims,
            files[1],
            labels.dims
        ));
    }
    Ok((images, labels))
}

/// An IDX file (gzipped) holding the rows `rows` of `array` (rows along its first dimension).
fn idx_gz(array: &IdxArray, rows: &[usize]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let row: usize = array.dims[1..].iter().product();
    let n = u32::try_from(rows.len()).map_err(|_| "too many rows for an IDX file".to_string())?;
    let mut raw = Vec::with_capacity(4 + 4 * array.dims.len() + rows.len() * row);
    raw.extend_from_slice(&[0, 0, 0x08, array.dims.len() as u8]);
    raw.extend_from_slice(&n.to_be_bytes());
    for &d in &array.dims[1..] {
        raw.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for &r in rows {
        raw.extend_from_slice(&array.data[r * row..(r + 1) * row]);
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).and_then(|_| gz.finish()).map_err(|e| format!("compressing: {e}"))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    files::write_atomic(path, bytes).map_err(|e| e.to_string())
}

/// A TOML table as text.
fn toml_text(table: &toml::Table) -> Result<String, String> {
    toml::to_string(table).map_err(|e| format!("writing TOML: {e}"))
}

/// The scenario `file` (a file or a bundled name) for `clients` clients with `overrides`: its
/// `clients`, and `clients_per_round`, `min_clients` and `start_after_clients` where larger,
/// are set to `clients` before the overrides, so `--set federation.clients_per_round=...`
/// still has the last word.
pub fn open_scenario(file: &Path, clients: Option<usize>, overrides: &[String]) -> Result<Scenario, String> {
    let Some(n) = clients else {
        return Scenario::open(file, overrides).map(|(s, _)| s).map_err(|e| e.to_string());
    };
    let (base, _) = Scenario::open(file, &[]).map_err(|e| e.to_string())?;
    let f = &base.federation;
    let per_round = f.clients_per_round.min(n);
    let mut fitted = vec![
        format!("clients={n}"),
        format!("federation.clients_per_round={per_round}"),
        format!("federation.min_clients={}", f.min_clients.min(per_round)),
    ];
    if let Some(start) = f.start_after_clients {
        fitted.push(format!("federation.start_after_clients={}", start.min(n)));
    }
    fitted.extend(overrides.iter().cloned());
    Scenario::open(file, &fitted).map(|(s, _)| s).map_err(|e| e.to_string())
}

/// Writes the fleet; every error names the file or option at fault.
pub fn write_fleet(options: &FleetOptions) -> Result<FleetSummary, String> {
    let scenario = &options.scenario;
    let (n, federation) = (scenario.clients, &scenario.federation);
    if scenario.data.dataset != "mnist" {
        return Err(format!(
            "scenario `{}` uses data set `{}`; `fleet` writes MNIST partitions only (use an MNIST scenario such as \
             quickstart)",
            scenario.name, scenario.data.dataset
        ));
    }
    if !scenario.tasks.is_empty() || scenario.data.longtail_ratio.is_some() {
        return Err(format!(
            "scenario `{}` has [[tasks]] or data.longtail_ratio, which `fleet` does not write; use a single-task \
             scenario such as quickstart",
            scenario.name
        ));
    }
    let first_san = options.sans.first().ok_or("give at least one --san (the name the clients dial)")?;
    crate::require_new_out(&options.out, "fleet never overwrites a CA or keys")?;

    let spec = scenario.model_spec().map_err(|e| e.to_string())?;

    // The data, its partition.
    let data_dir = DataSearch::from_environment(options.data_dir.as_deref()).find(&bundled::MNIST)?;
    let mnist = data_dir.join(bundled::MNIST.folder);
    let (mut images, mut labels) = read_images_and_labels(&mnist, TRAIN)?;
    let available = labels.dims[0];
    let used = scenario.data.train_examples.map_or(available, |t| t.min(available));
    images.dims[0] = used;
    images.data.truncate(used * images.dims[1] * images.dims[2]);
    labels.dims[0] = used;
    labels.data.truncate(used);
    let label_ids: Vec<u32> = labels.data.iter().map(|&l| u32::from(l)).collect();
    let classes = spec.heads[0].classes;
    if let Some(l) = label_ids.iter().find(|&&l| l as usize >= classes) {
        return Err(format!("{}: label {l} is past the model's {classes} classes", mnist.display()));
    }
    // The test set (every place the data is looked for has it), read before anything is written.
    let (test_images, test_labels) = read_images_and_labels(&mnist, TEST)?;
    let test_examples = scenario.data.test_examples.map_or(test_labels.dims[0], |t| t.min(test_labels.dims[0]));
    let test_rows: Vec<usize> = (0..test_examples).collect();
    let partition = match options.partition {
        FleetPartition::Scenario => scenario.partition.clone(),
        FleetPartition::Iid => Partition::Iid,
        FleetPartition::NonIid => Partition::Shards { shards_per_client: 2, shard_size: (used / (2 * n)).max(1) },
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(federation.seed);
    let mut parts = partition
        .split_all(&label_ids, classes, n, &mut rng)
        .map_err(|e| format!("partitioning {used} examples across {n} clients: {e}"))?;

    // The server: CA, certificate, configuration, model spec, test set.
    let server_dir = options.out.join("server");
    let state = StatePaths::new(&server_dir);
    pki::init(&state, &scenario.name, &options.sans, None).map_err(|e| e.to_string())?;
    write(&server_dir.join("model.toml"), scenario.model_spec_text().map_err(|e| e.to_string())?.as_bytes())?;
    let mut server_toml = toml::Table::new();
    server_toml.insert("listen".into(), SocketAddr::from(([0, 0, 0, 0], options.port)).to_string().into());
    server_toml.insert("model".into(), "model.toml".into());
    if let Some(metrics) = options.metrics_listen {
        server_toml.insert("metrics_listen".into(), metrics.to_string().into());
    }
    write(&server_dir.join("test").join(TEST[0]), &idx_gz(&test_images, &test_rows)?)?;
    write(&server_dir.join("test").join(TEST[1]), &idx_gz(&test_labels, &test_rows)?)?;
    let source =
        DataSource::Idx { images: Path::new("test").join(TEST[0]), labels: Path::new("test").join(TEST[1]), classes };
    server_toml.insert("test_data".into(), toml::Value::try_from(&source).map_err(|e| e.to_string())?);
    server_toml.insert("federation".into(), toml::Value::try_from(federation).map_err(|e| e.to_string())?);
    let server_config = server_dir.join("server.toml");
    let header = format!(
        "# Written by `cohort-sim fleet` from scenario `{}` for {n} clients; this folder is the server's state\n\
         # directory: cohort-server serve --state THIS_FOLDER --config THIS_FOLDER/server.toml\n",
        scenario.name
    );
    write(&server_config, format!("{header}{}", toml_text(&server_toml)?).as_bytes())?;
    cohort_server::config::ServerConfig::load(&server_config).map_err(|e| format!("the written server.toml: {e}"))?;

    // The clients.
    let server = options.server.clone().unwrap_or_else(|| format!("{first_san}:{}", options.port));
    let mut clients = Vec::with_capacity(n);
    for (i, rows) in parts.iter_mut().enumerate() {
        rows.sort_unstable();
        let id = format!("client-{i:04}");
        let dir = options.out.join("clients").join(i.to_string());
        let bundle = pki::make_bundle(&state, &id, pki::CLIENT_DAYS, Enrolment::New).map_err(|e| e.to_string())?;
        let bundle_name = format!("{id}.pem");
        files::write_secret(&dir.join(&bundle_name), bundle.as_bytes()).map_err(|e| e.to_string())?;
        write(&dir.join("data").join(TRAIN[0]), &idx_gz(&images, rows)?)?;
        write(&dir.join("data").join(TRAIN[1]), &idx_gz(&labels, rows)?)?;
        let mut table = toml::Table::new();
        table.insert("server".into(), server.clone().into());
        table.insert("server_name".into(), first_san.clone().into());
        table.insert("state_dir".into(), options.client_state_dir.clone().into());
        table.insert("device".into(), scenario.device.clone().into());
        if scenario.data.validation_fraction > 0.0 {
            table.insert("validation_fraction".into(), scenario.data.validation_fraction.into());
        }
        let mut identity = toml::Table::new();
        identity.insert("bundle".into(), bundle_name.into());
        table.insert("identity".into(), identity.into());
        let source = DataSource::Idx {
            images: Path::new("data").join(TRAIN[0]),
            labels: Path::new("data").join(TRAIN[1]),
            classes,
        };
        table.insert("data".into(), toml::Value::try_from(&source).map_err(|e| e.to_string())?);
        let config = dir.join("client.toml");
        let header = format!(
            "# Client {i} of {n} ({id}), written by `cohort-sim fleet`; paths are relative to this file.\n\
             # cohort-client run --config client.toml\n"
        );
        write(&config, format!("{header}{}", toml_text(&table)?).as_bytes())?;
        cohort_client::config::ClientConfig::load(&config).map_err(|e| format!("the written client.toml: {e}"))?;
        let mut label_counts = vec![0u64; classes];
        for &r in rows.iter() {
            label_counts[label_ids[r] as usize] += 1;
        }
        let dir = PathBuf::from("clients").join(i.to_string());
        clients.push(FleetClient { index: i, id, examples: rows.len(), label_counts, dir });
    }
    let summary = FleetSummary {
        scenario: scenario.name.clone(),
        server,
        server_state: PathBuf::from("server"),
        server_config: PathBuf::from("server/server.toml"),
        train_examples: used,
        test_examples,
        clients,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| e.to_string())?;
    write(&options.out.join("fleet.json"), &json)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data folder whose MNIST has `train` training and `test_images`/`test_labels` test rows
    /// (blank 28 x 28 images, labels 0 to 9 in turn).
    fn mnist(dir: &Path, train: usize, test_images: usize, test_labels: usize) -> PathBuf {
        let images = |n: usize| IdxArray { dims: vec![n, 28, 28], data: vec![0; n * 28 * 28] };
        let labels = |n: usize| IdxArray { dims: vec![n], data: (0..n).map(|i| (i % 10) as u8).collect() };
        let all = |a: &IdxArray| (0..a.dims[0]).collect::<Vec<_>>();
        let folder = dir.join("mnist");
        for (name, array) in [
            (TRAIN[0], images(train)),
            (TRAIN[1], labels(train)),
            (TEST[0], images(test_images)),
            (TEST[1], labels(test_labels)),
        ] {
            write(&folder.join(name), &idx_gz(&array, &all(&array)).unwrap()).unwrap();
        }
        dir.to_path_buf()
    }

    fn options(out: PathBuf, data_dir: PathBuf) -> FleetOptions {
        let small =
            ["federation.secagg.degree=2", "federation.secagg.threshold=2", "federation.secagg.dropout_tolerance=0"];
        let small: Vec<String> = small.iter().map(|s| s.to_string()).collect();
        FleetOptions {
            out,
            scenario: open_scenario(Path::new("quickstart"), Some(3), &small).unwrap(),
            partition: FleetPartition::Iid,
            sans: vec!["cohort-server".into()],
            port: 4433,
            server: None,
            metrics_listen: None,
            client_state_dir: "state".into(),
            data_dir: Some(data_dir),
        }
    }

    #[test]
    fn test_images_and_labels_that_do_not_match_are_an_error_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("fleet");
        // Fewer test images than labels: the test set's rows were once cut from the images
        // unchecked, and panicked.
        let data = mnist(&tmp.path().join("short"), 30, 5, 10);
        let err = write_fleet(&options(out.clone(), data)).unwrap_err();
        assert!(err.contains("t10k-images") && err.contains("not N images and their N labels"), "{err}");
        assert!(!out.exists(), "nothing is written for a data set that cannot be used");

        let data = mnist(&tmp.path().join("fine"), 30, 10, 10);
        let summary = write_fleet(&options(out.clone(), data)).unwrap();
        assert_eq!((summary.train_examples, summary.test_examples), (30, 10));
    }
}
