//! Personal heads over real QUIC: two clients train a shared head and a personal one. The
//! server's model moves in the trunk and the shared head only; each client keeps its personal
//! head in its state directory, trained.

use std::sync::Arc;

use crate::support::*;
use candle_core::Device;
use cohort::common::model::vectors_from_safetensors;
use cohort::common::model::{flat_from_safetensors, Model, ModelSpec};
use cohort::common::trainer::HeadData;

const PERSONAL_SPEC: &str = "name = 'tiny-personal'\ninput_shape = [4]\n[[trunk]]\nkind = 'linear'\nout = 8\n\
                             [[trunk]]\nkind = 'relu'\n[[heads]]\nname = 'y'\nclasses = 3\n\
                             [[heads]]\nname = 'mine'\nclasses = 3\npersonal = true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_heads_stay_on_their_clients() {
    let ca = Ca::new();
    let spec = ModelSpec::from_toml(PERSONAL_SPEC).unwrap();
    let fed = federation(2, 2, 2);
    let server = start_server_with_spec(&ca, "127.0.0.1:0".parse().unwrap(), fed.clone(), None, spec.clone());
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let clients: Vec<RunningClient> = (0..2u64)
        .map(|i| {
            let data = Arc::new(dataset(60, i));
            let heads = vec![
                HeadData { head: Some("y".into()), data: data.clone() },
                HeadData { head: Some("mine".into()), data },
            ];
            let path = dirs[i as usize].path().join("personal-heads.safetensors");
            start_multitask_client(ca.client(&format!("client-{i}")), server.addr, heads, path)
        })
        .collect();
    run_to_end(server, clients, 2, 2).await;

    let model = Model::new(&spec, &Device::Cpu, fed.seed).unwrap();
    let initial = model.flat().unwrap();
    let global = flat_from_safetensors(model.layout(), &std::fs::read(ca.state.checkpoint(2)).unwrap()).unwrap();
    let segment = |v: &[f32], i: usize| {
        let s = &model.layout().segments()[i];
        v[s.offset..s.offset + s.len].to_vec()
    };
    assert_ne!(segment(&global, 0), segment(&initial, 0), "the trunk is federated");
    assert_ne!(segment(&global, 1), segment(&initial, 1), "the shared head is federated");
    assert_eq!(segment(&global, 2), segment(&initial, 2), "the server never learns the personal head");
    for dir in &dirs {
        let kept =
            vectors_from_safetensors(&std::fs::read(dir.path().join("personal-heads.safetensors")).unwrap()).unwrap();
        assert_ne!(kept["mine"], segment(&initial, 2), "each client trained and kept its own");
    }
}
