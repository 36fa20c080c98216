//! Revocation on a running server, by certificate: the adversary is a client whose key was
//! stolen or whose site left the consortium, and which stays connected, reconnects, or comes back
//! after its id was enrolled again.

use std::time::{Duration, Instant};

use crate::support::*;
use cohort::client::daemon::{ClientError, ClientEvent};
use cohort::common::wire::{self, ClientMsg, ServerMsg};
use cohort::io::{client_config, recv_msg, unix_now};
use cohort::server::pki;
use cohort::server::store::{Enrolment, Store};

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A revoked certificate's live connection is closed within a second of `cohort-server revoke`
/// (which writes cohort.db while the server runs), its reconnection is refused with a reason,
/// and no later round samples it. Guards the revocation watch of the running server: without it
/// the connection stays registered and the client is sampled round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_closed_within_a_second_and_never_sampled_again() {
    let ca = Ca::new();
    // Rounds take milliseconds: enough of them that the federation outlives the test.
    let server_fed = federation(1_000_000, 3, 2);
    let mut server = start_server(&ca, localhost(), server_fed, None);
    let leaving = ca.client("leaving");
    let serial = leaving.certificate().unwrap().serial;
    let mut clients = vec![
        start_client(ca.client("stays-1"), server.addr, dataset(20, 1)),
        start_client(ca.client("stays-2"), server.addr, dataset(20, 2)),
    ];
    let mut revoked = start_client(leaving, server.addr, dataset(20, 3));
    let first = next_report(&mut server, 60).await;
    assert_eq!((first.cohort, first.participants), (3, 3), "{first:?}");

    // The operator revokes the certificate, as `cohort-server revoke --serial` does.
    let mut store = Store::open(&ca.state.database()).unwrap();
    assert_eq!(store.revoke_certificate(&serial, unix_now()).unwrap().as_deref(), Some("leaving"));
    let revoked_at = Instant::now();
    revoked.wait_for(5, |e| matches!(e, ClientEvent::Disconnected { .. })).await;
    let closed_after = revoked_at.elapsed();
    assert!(closed_after <= Duration::from_secs(1), "the revoked connection stayed open {closed_after:?}");

    // It reconnects and is refused, saying why; the daemon stops instead of retrying forever.
    let outcome = tokio::time::timeout(Duration::from_secs(20), revoked.task).await.unwrap().unwrap();
    match outcome {
        Err(ClientError::Refused(why)) => assert!(why.contains("revoked") && why.contains(&serial), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Rounds that start after the revocation sample only the others. (Rounds take milliseconds:
    // skip those already reported and the one that may be running.)
    let mut last = first.round;
    while let Ok(report) = server.reports.try_recv() {
        last = report.round;
    }
    let mut later = 0;
    while later < 3 {
        let report = next_report(&mut server, 60).await;
        if report.round <= last + 1 {
            continue;
        }
        later += 1;
        assert!(report.completed, "{report:?}");
        assert_eq!((report.cohort, report.participants), (2, 2), "{report:?}");
        assert!(report.dropped.iter().all(|(id, _)| id != "leaving"), "{report:?}");
    }
    server.shutdown.cancel();
    let _ = server.task.await;
    for client in clients.drain(..) {
        client.stop().await;
    }
}

/// Enrolling an id again gives it a new certificate and never revives the old one: the stolen
/// certificate stays refused while the new one takes part. Guards revocation by certificate:
/// with revocation by id, the new enrolment cleared the flag and the stolen certificate was
/// welcomed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_an_id_again_does_not_revive_its_old_certificate() {
    let ca = Ca::new();
    let stolen = ca.client("h1");
    let mut store = Store::open(&ca.state.database()).unwrap();
    assert!(store.revoke("h1", unix_now()).unwrap());
    let fresh = pki::make_bundle(&ca.state, "h1", pki::CLIENT_DAYS, Enrolment::New).unwrap();
    let fresh = cohort::io::Identity::from_bundle(fresh.as_bytes()).unwrap();
    assert_ne!(fresh.certificate().unwrap().serial, stolen.certificate().unwrap().serial);

    let mut server = start_server(&ca, localhost(), federation(1, 1, 1), None);
    let thief = start_client(stolen, server.addr, dataset(10, 1));
    match tokio::time::timeout(Duration::from_secs(20), thief.task).await.unwrap().unwrap() {
        Err(ClientError::Refused(why)) => assert!(why.contains("revoked"), "{why}"),
        other => panic!("the old certificate was not refused: {other:?}"),
    }
    let owner = start_client(fresh, server.addr, dataset(10, 2));
    let report = next_report(&mut server, 60).await;
    assert!(report.completed && report.participants == 1, "{report:?}");
    server.task.await.unwrap().unwrap();
    owner.stop().await;

    // Enrolling an id that has an active certificate is refused unless renewed or replaced.
    let again = pki::make_bundle(&ca.state, "h1", pki::CLIENT_DAYS, Enrolment::New).unwrap_err();
    assert!(again.to_string().contains("--replace"), "{again}");
}

/// A thief that starts its hello, stalls while the operator revokes the certificate, and
/// finishes the hello after the revocation watch has run: it is refused, not welcomed and
/// registered. Guards the admission check after the hello and the registry's refusal of serials
/// revoked meanwhile (without them the thief was welcomed and sampled round after round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_finished_after_the_revocation_is_refused() {
    let ca = Ca::new();
    let mut fed = federation(1_000_000, 2, 1);
    fed.start_after_clients = Some(1);
    let server = start_server(&ca, localhost(), fed, None);
    let thief = ca.client("thief");
    let serial = thief.certificate().unwrap().serial;
    let endpoint = cohort::io::client_endpoint(false).unwrap();
    let conn = endpoint.connect_with(client_config(&thief).unwrap(), server.addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frame = wire::encode(&ClientMsg::Hello { device: "cpu".into(), samples: 10 }).unwrap();
    send.write_all(&frame[..2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut store = Store::open(&ca.state.database()).unwrap();
    store.revoke_certificate(&serial, unix_now()).unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await; // the revocation watch has run
    send.write_all(&frame[2..]).await.unwrap();
    let _ = send.finish();
    match recv_msg::<ServerMsg>(&mut recv, 1 << 16).await {
        Ok(ServerMsg::Refused { reason }) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("a certificate revoked during its hello was not refused: {other:?}"),
    }
    server.shutdown.cancel();
    let _ = server.task.await;
}
