//! Small whole federations on the bundled MNIST through the `cohort-sim` runner: the data is
//! intact, the report has every round, the model learns, and the outputs are written.

use std::path::Path;

use cohort::io::files::DataSource;
use cohort::scenarios::runner::{self, default_data_dir, RunOptions};
use cohort::scenarios::scenario::Scenario;

#[test]
fn bundled_mnist_is_intact() {
    let dir = default_data_dir().join("mnist");
    let load = |img: &str, lbl: &str| {
        DataSource::Idx { images: dir.join(img), labels: dir.join(lbl), classes: 10 }.load().unwrap()
    };
    let train = load("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz");
    let test = load("t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz");
    assert_eq!(train.label_counts(), vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    assert_eq!(test.label_counts(), vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    assert_eq!(train.feature_shape, vec![1, 28, 28]);
}

const SMALL: &str = r#"
name = "smoke"
model = "mnist-2nn"
clients = 6
target_accuracy = 0.8
[data]
train_examples = 3000
test_examples = 1000
[partition]
kind = "shards"
shards_per_client = 2
shard_size = 250
[federation]
rounds = 5
clients_per_round = 4
min_clients = 3
seed = 7
collection = "plain"
[federation.train]
epochs = 1
batch_size = 10
lr = 0.05
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_non_iid_federation_learns_and_writes_its_report() {
    let scenario = Scenario::parse(SMALL, Path::new("smoke.toml")).unwrap();
    let report = runner::run(&scenario, &RunOptions::default()).await.unwrap();
    // Pathological non-IID (two digits a client): five rounds, so that learning does not hang
    // on one lucky shuffle seed.
    assert_eq!(report.rounds.len(), 5);
    assert!(report.rounds.iter().all(|r| r.completed && r.participants == 4), "{:?}", report.rounds);
    assert_eq!(report.test_examples, 1000);
    let first = report.rounds[0].test_accuracy.unwrap();
    let last = report.final_accuracy.unwrap();
    assert!(last > 0.5 && last > first, "accuracy went from {first} to {last}");

    let out = tempfile::tempdir().unwrap();
    cohort::scenarios::report::write(&report, out.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["seed"], 7);
    for key in ["round", "participants", "seconds", "test_accuracy", "test_loss"] {
        assert!(json["rounds"][2].get(key).is_some(), "report rounds lack `{key}`");
    }
    let svg = std::fs::read_to_string(out.path().join("accuracy.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("test accuracy per round"));
    // Issue 15: the simulator kept no trained model. It writes the last round's global model,
    // which the spec in its metadata rebuilds.
    let model = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let spec = cohort::common::model::spec_from_safetensors(&model).unwrap().expect("the spec travels with it");
    let rebuilt = cohort::common::model::Model::new(&spec, &candle_core::Device::Cpu, 0).unwrap();
    rebuilt.load_safetensors(&model).unwrap();

    // Same seed, same federation: the run is reproducible.
    let again = runner::run(&scenario, &RunOptions::default()).await.unwrap();
    assert_eq!(
        again.rounds.iter().map(|r| r.test_accuracy).collect::<Vec<_>>(),
        report.rounds.iter().map(|r| r.test_accuracy).collect::<Vec<_>>()
    );
}

const DROPOUTS: &str = r#"
name = "dropouts"
model = "mnist-2nn"
clients = 10
[data]
train_examples = 2000
test_examples = 500
[partition]
kind = "iid"
[faults]
dropout_fraction = 0.3
[federation]
rounds = 4
clients_per_round = 10
min_clients = 5
seed = 3
collection = "secure"
[federation.secagg]
degree = 9
threshold = 5
phase_timeout_secs = 10
[federation.train]
epochs = 1
batch_size = 20
lr = 0.05
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_federation_with_thirty_percent_crashing_completes_every_round() {
    let scenario = Scenario::parse(DROPOUTS, Path::new("dropouts.toml")).unwrap();
    let report = runner::run(&scenario, &RunOptions::default()).await.unwrap();
    assert_eq!(report.rounds.len(), 4);
    for r in &report.rounds {
        assert!(r.completed, "round {} aborted", r.round);
        // 3 of 10 crash each round; those that crash after their masked input still count.
        assert!((7..=10).contains(&r.participants), "round {}: {} participants", r.round, r.participants);
    }
    assert!(report.rounds.iter().any(|r| r.participants < 10), "crashes happened");
    assert!(report.final_accuracy.unwrap() > 0.6, "{:?}", report.final_accuracy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multitask_federation_reports_every_head_and_each_head_alone() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/mnist-multitask.toml");
    // Three tasks of three clients each, a few rounds.
    let text = std::fs::read_to_string(&path).unwrap().replace("clients = 10", "clients = 3");
    let small = [
        "clients=9",
        "data.train_examples=2700",
        "data.test_examples=1000",
        "federation.rounds=2",
        "federation.clients_per_round=9",
        "federation.min_clients=9",
        "federation.collection=plain",
        "federation.train.epochs=2",
    ];
    let overrides: Vec<String> = small.iter().map(|s| s.to_string()).collect();
    let scenario = Scenario::parse_with(&text, &path, &overrides).unwrap();
    let report = runner::run(&scenario, &RunOptions::default()).await.unwrap();
    assert!(report.rounds.iter().all(|r| r.completed && r.participants == 9), "{:?}", report.rounds);
    let last = report.rounds.last().unwrap();
    let heads: Vec<&str> = last.head_accuracy.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(heads, vec!["parity", "loops"], "the first head is the report's test accuracy");
    let digit = last.test_accuracy.unwrap();
    assert!(digit > 0.3, "digit accuracy {digit} after 2 rounds on 150 labelled images");
    for (head, accuracy) in &last.head_accuracy {
        assert!(*accuracy > 0.6, "{head}: {accuracy}");
    }

    let alone = RunOptions { only_task: Some("parity".into()), ..RunOptions::default() };
    let report = runner::run(&scenario, &alone).await.unwrap();
    let last = report.rounds.last().unwrap();
    assert!(report.rounds.iter().all(|r| r.participants == 3), "only the three parity clients run");
    assert!(last.test_accuracy.is_none() && last.head_accuracy.len() == 1 && last.head_accuracy[0].0 == "parity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_heads_stay_on_the_clients_and_fit_their_digits() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/mnist-personal.toml");
    let small = [
        "clients=4",
        "data.train_examples=2400",
        "data.test_examples=1000",
        "federation.rounds=2",
        "federation.clients_per_round=4",
        "federation.min_clients=4",
        "federation.evaluate_every=1",
        "federation.secagg.degree=3",
        "federation.secagg.threshold=2",
    ];
    let overrides: Vec<String> = small.iter().map(|s| s.to_string()).collect();
    let scenario = Scenario::load_with(&path, &overrides).unwrap();
    let report = runner::run(&scenario, &RunOptions::default()).await.unwrap();
    assert!(report.rounds.iter().all(|r| r.completed && r.participants == 4), "{:?}", report.rounds);
    assert_eq!(report.personal_heads_moved, vec![("digit".to_string(), 0.0)], "no client sent its head");
    let last = report.rounds.last().unwrap();
    let (head, accuracy, _) = &last.federated[0];
    assert!(head == "digit" && *accuracy > 0.8, "each client's own head on its two digits: {accuracy}");
}
