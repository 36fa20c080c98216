//! Federated evaluation over real QUIC: after a round, its participants evaluate the new model on
//! their own data and the server receives only the sum of their confusion matrices, which equals
//! the sum computed here from each client's data.

use crate::support::*;
use candle_core::Device;
use cohort::common::model::{flat_from_safetensors, Model};
use cohort::common::train::{evaluate, DeviceData};
use cohort::server::config::{Collection, SecAggConfig};
use cohort::server::store::{HeadMetrics, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summed_confusion_matrix_is_the_sum_of_the_clients() {
    let ca = Ca::new();
    let mut fed = federation(1, 3, 3);
    fed.collection = Collection::Secure;
    fed.secagg = SecAggConfig { degree: 2, threshold: Some(2), dropout_tolerance: Some(0.0), ..Default::default() };
    fed.evaluate_every = Some(1);
    let server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), fed, Some(dataset(90, 9)));
    let sizes = [(1u64, 30usize), (2, 45), (3, 60)];
    let clients = start_sized_clients(&ca, server.addr, &sizes);
    let report = run_to_end(server, clients, 1, 3).await.remove(0);

    let model = Model::new(&spec(), &Device::Cpu, 0).unwrap();
    let global = flat_from_safetensors(model.layout(), &std::fs::read(ca.state.checkpoint(1)).unwrap()).unwrap();
    model.set_flat(&global).unwrap();
    let mut expected = vec![vec![0u64; 3]; 3];
    for &(i, n) in &sizes {
        let local = evaluate(&model, 0, &DeviceData::new(&dataset(n, i), &model).unwrap(), 1000).unwrap();
        for (row, add) in expected.iter_mut().zip(&local.confusion) {
            row.iter_mut().zip(add).for_each(|(e, a)| *e += a);
        }
    }
    assert_eq!(report.federated.len(), 1);
    let (head, metrics) = &report.federated[0];
    assert_eq!(head, "y");
    assert_eq!(metrics.confusion, expected);
    assert_eq!(metrics.examples, 135);

    // Both evaluations are kept per head, with per-class recall, in the server's database.
    let stored = &Store::open(&ca.state.database()).unwrap().rounds().unwrap()[0];
    let federated = HeadMetrics { head: "y".into(), metrics: metrics.clone() };
    assert_eq!(stored.federated, vec![federated]);
    let tested = report.test.clone().expect("the server's test set");
    assert_eq!(stored.head_tests, vec![HeadMetrics { head: "y".into(), metrics: tested.clone() }]);
    assert_eq!(stored.head_tests[0].metrics.per_class_recall.len(), 3);
    assert_eq!(stored.balanced_accuracy, Some(tested.balanced_accuracy));
}
