//! Two client daemons started with one identity. The server keeps one connection per client id
//! (a newer one closes the older with `wire::REPLACED_CLOSE_CODE`), so the two evict each other.
//! Guards the daemon's answer to that: a replaced daemon backs off with growing delays, says
//! that another daemon holds its id, and after `MAX_REPLACEMENTS` replacements in a row stops
//! with `ClientError::DuplicateIdentity`. Without it each daemon reconnected at once: thousands
//! of connections in seconds, and most rounds aborted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;
use cohort::client::daemon::{ClientError, ClientEvent, MAX_REPLACEMENTS};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Connections a running client has made so far (its `Connected` events, drained).
fn connections(client: &mut RunningClient) -> usize {
    let mut n = 0;
    while let Ok(event) = client.events.try_recv() {
        n += usize::from(event == ClientEvent::Connected);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_daemons_with_one_identity_stops_and_rounds_go_on() {
    logs();
    let ca = Ca::new();
    // Rounds until the test stops the server: the twins' fight outlasts a few fast rounds.
    let mut fed = federation(1_000_000, 2, 1);
    fed.start_after_clients = Some(2);
    fed.round_timeout_secs = 5.0;
    let mut server = start_server(&ca, localhost(), fed, None);
    let twin = ca.client("twin");
    let mut first = start_client(twin.clone(), server.addr, dataset(40, 1));
    let mut second = start_client(twin, server.addr, dataset(40, 2));
    let honest = start_client(ca.client("honest"), server.addr, dataset(40, 3));

    // One of the twins stops, with the error that says why, in bounded time.
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            r = &mut first.task => (1, r.unwrap()),
            r = &mut second.task => (2, r.unwrap()),
        }
    })
    .await;
    let (which, outcome) = stopped.unwrap_or_else(|_| {
        panic!(
            "neither twin stopped within 30 s; they connected {} and {} times",
            connections(&mut first),
            connections(&mut second)
        )
    });
    eprintln!("twin {which} stopped after {:?}: {outcome:?}", started.elapsed());
    match outcome {
        Err(ClientError::DuplicateIdentity(why)) => {
            assert!(why.contains("another daemon with id twin is connected to the server"), "{why}");
            assert!(why.contains("stop one of them"), "{why}");
        }
        other => panic!("twin {which} stopped with {other:?}, not the duplicate-identity error"),
    }
    let (mut stopped, mut survivor) = if which == 1 { (first, second) } else { (second, first) };

    // Every round completed, during the fight and after it, with the survivor and the honest
    // client in the last ones.
    let mut participants = Vec::new();
    while let Ok(report) = server.reports.try_recv() {
        assert!(report.completed, "{report:?}");
        participants.push(report.participants);
    }
    for _ in 0..5 {
        let report = next_report(&mut server, 60).await;
        assert!(report.completed, "{report:?}");
        participants.push(report.participants);
    }
    assert_eq!(participants.last(), Some(&2), "{participants:?}");
    server.shutdown.cancel();
    let _ = server.task.await;
    assert!(!survivor.task.is_finished(), "the surviving twin stopped too");

    // Few connections in all: each replacement is one more connection of a twin.
    let total = connections(&mut stopped) + connections(&mut survivor);
    eprintln!("twins connected {total} times; participants per round {participants:?}");
    assert!(total <= 2 * MAX_REPLACEMENTS as usize + 2, "the twins connected {total} times");
    RunningClient::stop_all(vec![survivor, honest]).await;
}
