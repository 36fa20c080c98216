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
rounds = 3
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
    assert_eq!(report.rounds.len(), 3);
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
