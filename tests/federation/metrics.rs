//! The Prometheus endpoint over real TCP: after a round, `GET /metrics` shows it; a flood of idle
//! connections, an oversized request and a silent connection get errors or are closed, and the
//! endpoint (and the federation) go on.

use std::time::Duration;

use crate::support::*;
use cohort::server::metrics::MAX_CONNECTIONS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap() {
        Ok(_) => {}
        // A connection closed unanswered with our request unread is reset, not finished (seen
        // under load in CI): both are "closed unanswered".
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && response.is_empty() => {}
        Err(e) => panic!("reading the response: {e}"),
    }
    String::from_utf8(response).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_reports_rounds_and_survives_bad_scrapers() {
    let ca = Ca::new();
    let fed = federation(2, 2, 2);
    let listen = "127.0.0.1:0".parse().unwrap();
    let mut server = start_server_with_metrics(&ca, listen, fed, Some(dataset(60, 9)), spec(), Some(listen));
    let metrics = server.metrics.expect("the endpoint is bound");

    // Before any client: a flood of idle connections. Beyond the cap, connections are closed
    // unanswered; once the idle ones go, scrapes are answered again.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(metrics).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(exchange(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").await, "", "over the cap: closed");
    drop(idle);
    let mut answered = String::new();
    for _ in 0..50 {
        answered = exchange(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        if !answered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");

    // A silent scraper holds one connection open while the federation runs.
    let silent = TcpStream::connect(metrics).await.unwrap();
    let clients = start_sized_clients(&ca, server.addr, &[(1, 40), (2, 50)]);
    let report = next_report(&mut server, 60).await;
    assert!(report.completed, "{report:?}");

    let oversized = [b"GET /metrics HTTP/1.1\r\nX-Pad: ".as_slice(), &[b'a'; 20_000]].concat();
    assert!(exchange(metrics, &oversized).await.starts_with("HTTP/1.1 431 "));
    assert!(exchange(metrics, b"DELETE /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405 "));
    let text = exchange(metrics, b"GET /metrics HTTP/1.1\r\nHost: cohort\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    for line in ["cohort_round 1", "cohort_rounds_total{status=\"completed\"} 1", "cohort_round_participants 2"] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("cohort_test_accuracy{head=\"y\"} 0.")), "{text}");
    assert!(text.lines().any(|l| l == "cohort_clients_connected 2"), "{text}");

    let report = next_report(&mut server, 60).await;
    assert!(report.completed && report.round == 2, "{report:?}");
    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
    drop(silent);
}

/// The driver's part in a decline: a site whose data do not fit the model declines every plan;
/// each decline is logged with the site's reason (the driver's `warn!`), counted
/// for that site in `cohort_declines_total` and recorded in cohort.db as a decline, and the
/// rounds go on with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_declines_is_counted_per_client_and_recorded() {
    let ca = Ca::new();
    let mut fed = federation(4, 3, 2);
    // Sampled every round: no backoff within these three.
    fed.backoff.after_failures = 10;
    let listen = "127.0.0.1:0".parse().unwrap();
    let mut server = start_server_with_metrics(&ca, listen, fed, None, spec(), Some(listen));
    let metrics = server.metrics.expect("the endpoint is bound");
    let mut clients = start_sized_clients(&ca, server.addr, &[(1, 40), (2, 50)]);
    // Three features where the model takes four.
    let misfit = {
        let d = dataset(30, 3);
        let features = d.features.chunks_exact(4).flat_map(|x| x[..3].to_vec()).collect();
        cohort::common::data::Dataset::new(features, vec![3], d.labels.clone(), 3).unwrap()
    };
    clients.push(start_client(ca.client("misfit"), server.addr, misfit));

    // Scraped after round 3 of 4: the endpoint stops with the server after the last round.
    let mut declines = 0;
    for round in 1..=3 {
        let report = next_report(&mut server, 60).await;
        assert!(report.completed && report.round == round, "{report:?}");
        assert_eq!(report.participants, 2, "{report:?}");
        let (site, reason) = report.declined.first().expect("the misfit site declined");
        assert_eq!(site, "misfit");
        assert!(reason.contains("the data do not fit the model"), "the site's own reason: {reason}");
        declines += report.declined.len();
    }
    let text = exchange(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    // Round 4's decline may already be counted.
    let counted = |n: usize| format!("cohort_declines_total{{client=\"misfit\"}} {n}");
    assert!(text.lines().any(|l| l == counted(declines) || l == counted(declines + 1)), "no misfit count in\n{text}");
    assert!(!text.contains("cohort_declines_total{client=\"client-1\"}"), "{text}");
    let last = next_report(&mut server, 60).await;
    assert!(last.completed && last.round == 4 && last.declined.len() == 1, "{last:?}");
    declines += 1;
    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;

    let store = cohort::server::store::Store::open(&ca.state.database()).unwrap();
    let rows = store.clients().unwrap();
    let row = rows.iter().find(|c| c.id == "misfit").unwrap();
    assert_eq!(row.declines, declines as i64);
    assert_eq!(row.rounds, 0);
    let (round, why) = row.last_dropout.clone().unwrap();
    let reason = cohort::common::coordinator::declined_reason(&why).unwrap_or_default();
    assert!(round == 4 && reason.contains("expects [4]"), "{round} {why}");
    assert!(rows.iter().filter(|c| c.id.starts_with("client-")).all(|c| c.declines == 0 && c.rounds == 4));
}
