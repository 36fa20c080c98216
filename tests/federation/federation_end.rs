//! The end of a federation (docs/protocol.md, "Close codes"): every daemon hears that the
//! federation is finished and stops with `Ok`, however the close reaches it; none takes the end
//! for a restart and dials the stopped server for ever.

use std::time::Duration;

use crate::support::*;
use cohort::client::daemon::ClientEvent;
use cohort::common::wire;
use cohort::server::pki;

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Waits (generously) for the daemon to stop by itself; asserts it stopped cleanly and said why.
async fn assert_stops_finished(name: &str, mut client: RunningClient) {
    let stopped = tokio::time::timeout(Duration::from_secs(120), &mut client.task).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{name}: the daemon did not stop by itself: {stopped:?}");
    let mut reasons = Vec::new();
    while let Ok(event) = client.events.try_recv() {
        if let ClientEvent::Disconnected { reason } = event {
            reasons.push(reason);
        }
    }
    assert_eq!(reasons.last().map(String::as_str), Some("the federation is finished"), "{name}: {reasons:?}");
}

/// Every daemon of a cohort connected at the end is told, each through its own connection's
/// close (the server used to queue the close on its endpoint and then drop its handles, and a
/// connection whose driver had not run yet closed with no reason: "the server shut down").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connected_daemon_hears_the_federation_is_finished() {
    const CLIENTS: u64 = 8;
    let ca = Ca::new();
    let server = start_server(&ca, localhost(), federation(2, CLIENTS as usize, CLIENTS as usize), None);
    let sizes: Vec<(u64, usize)> = (0..CLIENTS).map(|i| (i, 20)).collect();
    let clients = start_sized_clients(&ca, server.addr, &sizes);
    let ended = tokio::time::timeout(Duration::from_secs(300), server.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(_)))), "the server did not finish: {ended:?}");
    for (i, client) in clients.into_iter().enumerate() {
        assert_stops_finished(&format!("client-{i}"), client).await;
    }
}

/// A daemon that missed its connection's close dials again; a server on its way out closes the
/// new connection in its hello with the same reason, and the daemon stops there too instead of
/// taking the failed hello for an unreachable server. (A stand-in server does exactly that to
/// every connection.)
#[tokio::test]
async fn a_daemon_told_in_its_hello_that_the_federation_is_finished_stops() {
    let ca = Ca::new();
    let endpoint = cohort::io::server_endpoint(&pki::server_identity(&ca.state).unwrap(), localhost()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let closer = tokio::spawn(async move {
        let mut closed = 0u32;
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            // The hello's stream opens: the daemon is in its hello, as a redial at the end is.
            if conn.accept_bi().await.is_ok() {
                conn.close(wire::SHUTDOWN_CLOSE_CODE.into(), wire::FINISHED_CLOSE_REASON.as_bytes());
                closed += 1;
            }
        }
        closed
    });
    let client = start_client(ca.client("client-0"), addr, dataset(20, 0));
    assert_stops_finished("client-0", client).await;
    closer.abort();
}
