//! The Prometheus endpoint over real TCP: after a round, `GET /metrics` shows it; an oversized
//! request and a silent connection get errors and the endpoint (and the federation) go on.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    String::from_utf8(response).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_reports_rounds_and_survives_bad_scrapers() {
    let ca = Ca::new();
    let fed = federation(2, 2, 2);
    let listen = "127.0.0.1:0".parse().unwrap();
    let mut server = start_server_with_metrics(&ca, listen, fed, Some(dataset(60, 9)), spec(), Some(listen));
    let metrics = server.metrics.expect("the endpoint is bound");

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
