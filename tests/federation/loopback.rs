//! Real QUIC with mutual TLS on 127.0.0.1: enrolment, a full round checked against an
//! independent computation, refusal of strangers, a client killed mid-round, a hung client
//! held to the deadline, and a client that reconnects after the server restarts (which resumes
//! its optimizer's momentum).

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use candle_core::Device;
use cohort::client::daemon::{ClientError, ClientEvent};
use cohort::common::model::{flat_from_safetensors, vectors_from_safetensors, Model};
use cohort::common::round::{plan_seed, run_seed};
use cohort::common::strategy::StrategyConfig;
use cohort::common::trainer::Trainer;
use cohort::common::wire::{self, ClientMsg, ServerMsg};
use cohort::io::{client_config, recv_msg, send_msg, Identity};
use cohort::server::config::Federation;
use cohort::server::store::Store;

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_complete_a_round_equal_to_the_weighted_average() {
    let ca = Ca::new();
    let fed = federation(1, 3, 3);
    let mut server = start_server(&ca, localhost(), fed.clone(), Some(dataset(200, 99)));
    let sizes = [(1, 30), (2, 60), (3, 90)];
    let clients = start_sized_clients(&ca, server.addr, &sizes);

    let report = next_report(&mut server, 60).await;
    assert!(report.completed, "{report:?}");
    assert_eq!(report.participants, 3);
    assert!(report.test.as_ref().unwrap().examples == 200);

    // The same round, computed here without the network.
    let (initial, plan) = first_plan(&fed);
    let mut expected = vec![0f64; initial.len()];
    let total: f64 = sizes.iter().map(|&(_, n)| n as f64).sum();
    for &(i, n) in &sizes {
        let mut p = Trainer::new(format!("client-{i}"), Arc::new(dataset(n, i)), Device::Cpu);
        let delta = p.train(&plan).unwrap().delta.to_f32().unwrap();
        for (e, (g, d)) in expected.iter_mut().zip(initial.iter().zip(&delta)) {
            *e += (n as f64 / total) * (*g + *d) as f64;
        }
    }
    let checkpoint = std::fs::read(ca.state.checkpoint(1)).unwrap();
    let model = Model::new(&spec(), &Device::Cpu, 0).unwrap();
    let global = flat_from_safetensors(model.layout(), &checkpoint).unwrap();
    let worst = global.iter().zip(&expected).map(|(g, e)| (*g as f64 - e).abs()).fold(0f64, f64::max);
    assert!(worst < 1e-5, "global model differs from the weighted average by {worst}");
    assert!(initial.iter().zip(&global).any(|(a, b)| a != b), "the model moved");

    // The exported tensors carry the spec's names and shapes.
    let st = safetensors::SafeTensors::deserialize(&checkpoint).unwrap();
    for entry in model.layout().entries() {
        assert_eq!(st.tensor(&entry.name).unwrap().shape(), entry.shape.as_slice());
    }

    let store = Store::open(&ca.state.database()).unwrap();
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0].participants, 3);
    assert_eq!(store.clients().unwrap().iter().map(|c| c.rounds).sum::<i64>(), 3);

    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_signed_by_another_ca_is_refused_and_the_federation_goes_on() {
    let ca = Ca::new();
    let stranger_ca = Ca::new();
    let mut server = start_server(&ca, localhost(), federation(1, 1, 1), None);

    let stranger = start_client(stranger_ca.client("stranger"), server.addr, dataset(20, 7));
    let outcome = tokio::time::timeout(Duration::from_secs(20), stranger.task)
        .await
        .expect("the stranger gave up in time")
        .unwrap();
    match outcome {
        Err(ClientError::Unauthorized(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("expected an authorisation error, got {other:?}"),
    }

    // A raw peer with a good certificate that sends an oversized frame is dropped alone.
    let rogue = raw_connect(ca.client("rogue"), server.addr).await;
    let (mut send, _recv) = rogue.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let _ = send.finish();

    let honest = start_client(ca.client("honest"), server.addr, dataset(20, 8));
    let report = next_report(&mut server, 30).await;
    assert!(report.completed);
    assert_eq!(report.participants, 1);
    let store = Store::open(&ca.state.database()).unwrap();
    let clients = store.clients().unwrap();
    assert!(!clients.iter().any(|c| c.id == "stranger"), "{clients:?}");
    // The rogue is enrolled, but never said hello: it was never seen.
    assert!(clients.iter().any(|c| c.id == "rogue" && c.last_seen.is_none()), "{clients:?}");
    honest.stop().await;
}

/// Connects with `identity` and completes the hello exchange, as a client would.
async fn raw_connect(identity: Identity, addr: std::net::SocketAddr) -> quinn::Connection {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(&identity).unwrap());
    endpoint.connect(addr, "localhost").unwrap().await.unwrap()
}

async fn hello(conn: &quinn::Connection) -> ServerMsg {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send_msg(&mut send, &ClientMsg::Hello { device: "cpu".into(), samples: 10 }).await.unwrap();
    let _ = send.finish();
    recv_msg(&mut recv, 1 << 16).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_and_a_hung_client_are_left_out_and_the_others_go_on() {
    let ca = Ca::new();
    let mut fed = federation(2, 4, 2);
    fed.round_timeout_secs = 3.0;
    let mut server = start_server(&ca, localhost(), fed, None);
    let steady: Vec<RunningClient> =
        (0..2).map(|i| start_client(ca.client(&format!("steady-{i}")), server.addr, dataset(40, i))).collect();
    // The victim has enough data that it is still training when it is killed.
    let mut victim = start_client(ca.client("victim"), server.addr, dataset(20_000, 5));
    // The hung client says hello, takes the plan and never answers.
    let hung = raw_connect(ca.client("hung"), server.addr).await;
    assert!(matches!(hello(&hung).await, ServerMsg::Welcome { .. }));
    let hung_task = tokio::spawn(async move {
        let (_send, mut recv) = hung.accept_bi().await.unwrap();
        let plan: ServerMsg = recv_msg(&mut recv, wire::MAX_FRAME_BYTES).await.unwrap();
        assert!(matches!(plan, ServerMsg::Plan(_)));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(hung);
    });

    victim.wait_for(30, |e| matches!(e, ClientEvent::PlanReceived { round: 1 })).await;
    victim.task.abort();

    let first = next_report(&mut server, 30).await;
    assert!(first.completed, "{first:?}");
    assert_eq!(first.participants, 2);
    let dropped: Vec<&str> = first.dropped.iter().map(|(c, _)| c.as_str()).collect();
    assert!(dropped.contains(&"victim") && dropped.contains(&"hung"), "{:?}", first.dropped);
    let hung_reason = &first.dropped.iter().find(|(c, _)| c == "hung").unwrap().1;
    assert!(hung_reason.contains("deadline"), "{hung_reason}");
    assert!(first.seconds < 3.0 + 2.0, "the deadline held: {}", first.seconds);

    let second = next_report(&mut server, 30).await;
    assert!(second.completed);
    assert!(second.participants >= 2, "{second:?}");
    hung_task.abort();
    RunningClient::stop_all(steady).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_after_the_server_restarts_and_the_optimizer_resumes() {
    let ca = Ca::new();
    // Server momentum: its state must survive the restart for round 2 to be right.
    let with_momentum = |rounds| Federation {
        strategy: StrategyConfig::FedAvgM { server_lr: 1.0, momentum: 0.9 },
        ..federation(rounds, 1, 1)
    };
    let mut first = start_server(&ca, localhost(), with_momentum(2), None);
    let addr = first.addr;
    let mut client = start_client(ca.client("steadfast"), addr, dataset(30, 3));
    client.wait_for(20, |e| *e == ClientEvent::Connected).await;
    assert!(next_report(&mut first, 30).await.completed);
    // The operator stops the server after round 1 (round 2 is abandoned, not recorded): a
    // restart, not the end of the federation, so the client waits and dials again.
    first.shutdown.cancel();
    first.task.await.unwrap().unwrap();
    client.wait_for(20, |e| matches!(e, ClientEvent::Disconnected { .. })).await;

    // Same state directory and address, two rounds in total: it resumes at round 2.
    let mut second = start_server(&ca, addr, with_momentum(2), None);
    client.wait_for(30, |e| *e == ClientEvent::Connected).await;
    let report = next_report(&mut second, 30).await;
    assert_eq!(report.round, 2);
    assert!(report.completed);
    assert_eq!(report.participants, 1);
    second.task.await.unwrap().unwrap();
    client.stop().await;

    // Round 2 recomputed here: the client's update from the round-1 model, added to the saved
    // momentum: m2 = 0.9 m1 + d2 and global2 = global1 + m2.
    let model = Model::new(&spec(), &Device::Cpu, 0).unwrap();
    let read = |path: std::path::PathBuf| std::fs::read(path).unwrap();
    let global1 = flat_from_safetensors(model.layout(), &read(ca.state.checkpoint(1))).unwrap();
    let global2 = flat_from_safetensors(model.layout(), &read(ca.state.checkpoint(2))).unwrap();
    let m1 = vectors_from_safetensors(&read(ca.state.optimizer_checkpoint(1))).unwrap()["first"].clone();
    let fed = with_momentum(2);
    let (_, mut plan) = first_plan(&fed);
    plan.round = 2;
    plan.seed = plan_seed(run_seed(fed.seed, cohort::server::config::DEFAULT_RUN), 2);
    plan.params = wire::TensorBytes::from_f32(&global1);
    let mut steadfast = Trainer::new("steadfast", Arc::new(dataset(30, 3)), Device::Cpu);
    let d2 = steadfast.train(&plan).unwrap().delta.to_f32().unwrap();
    let worst = (0..d2.len()).map(|i| ((global1[i] + 0.9 * m1[i] + d2[i]) - global2[i]).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "round 2 differs from momentum resumed by {worst}");
    let momentum = m1.iter().map(|m| (0.9 * m).abs()).fold(0f32, f32::max);
    assert!(momentum > 1e-3, "the saved momentum matters ({momentum})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_with_a_reason() {
    let ca = Ca::new();
    let identity = ca.client("former");
    let mut store = Store::open(&ca.state.database()).unwrap();
    assert!(store.revoke("former", 0).unwrap());
    let server = start_server(&ca, localhost(), federation(1, 1, 1), None);
    let client = start_client(identity, server.addr, dataset(10, 1));
    let outcome = tokio::time::timeout(Duration::from_secs(20), client.task).await.unwrap().unwrap();
    match outcome {
        Err(ClientError::Refused(why)) => assert!(why.contains("revoked"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.shutdown.cancel();
    let _ = server.task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_set_with_more_classes_than_its_head_is_refused_at_start() {
    use cohort::server::pki;
    use cohort::server::serve::{ServeSetup, Server};
    let ca = Ca::new();
    let wide = cohort::common::data::Dataset::new(vec![0.5; 8], vec![4], vec![0, 4], 5).unwrap();
    let err = Server::bind(ServeSetup {
        state: cohort::server::pki::StatePaths::new(ca.dir.path()),
        identity: pki::server_identity(&ca.state).unwrap(),
        listen: localhost(),
        run: Some(cohort::server::serve::RunSetup {
            name: "main".into(),
            spec: spec(),
            federation: federation(1, 1, 1),
            test_data: Some(wide),
            head_tests: Vec::new(),
            initial_model: None,
        }),
        keep_serving: false,
        events: None,
        metrics_listen: None,
    })
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("head `y` has 5 classes, the head has 3"), "{err}");
}

/// Issue 15: after the federation ended, the daemons logged "reconnecting" for ever. The server
/// now closes with "the federation is finished", and the daemons stop cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stop_when_the_federation_is_finished() {
    let ca = Ca::new();
    let server = start_server(&ca, localhost(), federation(2, 2, 2), None);
    let clients = start_sized_clients(&ca, server.addr, &[(1, 30), (2, 30)]);
    server.task.await.unwrap().unwrap();
    for mut client in clients {
        let stopped = tokio::time::timeout(Duration::from_secs(10), &mut client.task).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "the daemon did not stop by itself: {stopped:?}");
        let mut reasons = Vec::new();
        while let Ok(event) = client.events.try_recv() {
            if let ClientEvent::Disconnected { reason } = event {
                reasons.push(reason);
            }
        }
        assert!(reasons.iter().any(|r| r.contains("the federation is finished")), "{reasons:?}");
    }
}
