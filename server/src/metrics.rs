//! The Prometheus endpoint: `GET /metrics` on `metrics_listen` (server.toml), in the text
//! exposition format.
//!
//! [`ServerMetrics`] holds the figures (rounds, their length and participants, dropouts, declines
//! by site, per-head
//! accuracy on the test sets and from federated evaluation, epsilon against each adversary,
//! clients caught cheating, clients connected); the
//! round loop updates them from each [`RoundReport`]. [`respond`] is the whole HTTP exchange as
//! a function of the request head, without I/O; [`serve`] is its thin driver over TCP: one
//! request per connection, a capped request head, a deadline and at most [`MAX_CONNECTIONS`] at
//! once, so slow or hostile scrapers cost a few small tasks and never the federation.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::RoundRow;
use cohort_common::coordinator::RoundReport;

type FloatGauge = Gauge<f64, AtomicU64>;
type ByHead = Family<Vec<(String, String)>, FloatGauge>;

/// The server's figures, shared by the round loop (writer) and the endpoint (reader).
pub struct ServerMetrics {
    registry: Registry,
    round: Gauge,
    rounds: Family<Vec<(String, String)>, Counter>,
    round_seconds: FloatGauge,
    participants: Gauge,
    dropouts: Counter,
    /// By `client`: the sites that declined a plan (a round, a census or an evaluation).
    declines: Family<Vec<(String, String)>, Counter>,
    /// Unlabelled families: exported only once a round sets them (plain rounds report a loss,
    /// DP rounds a clip norm), never as a 0 that does not apply.
    train_loss: ByHead,
    /// By `against`: `models` (anyone who sees only the models; amplified by sampling) and
    /// `server` (the server, which knows every sample: the most any client has spent).
    epsilon: ByHead,
    cheaters: Counter,
    clip: ByHead,
    connected: Gauge,
    test_accuracy: ByHead,
    test_balanced_accuracy: ByHead,
    test_macro_f1: ByHead,
    federated_accuracy: ByHead,
    federated_balanced_accuracy: ByHead,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("cohort"),
            round: Gauge::default(),
            rounds: Family::default(),
            round_seconds: FloatGauge::default(),
            participants: Gauge::default(),
            dropouts: Counter::default(),
            declines: Family::default(),
            train_loss: ByHead::default(),
            epsilon: ByHead::default(),
            cheaters: Counter::default(),
            clip: ByHead::default(),
            connected: Gauge::default(),
            test_accuracy: ByHead::default(),
            test_balanced_accuracy: ByHead::default(),
            test_macro_f1: ByHead::default(),
            federated_accuracy: ByHead::default(),
            federated_balanced_accuracy: ByHead::default(),
        };
        let registry = &mut metrics.registry;
        for (name, help, gauge) in [
            ("round", "The last round finished (completed or aborted)", &metrics.round),
            ("round_participants", "Updates in the last round's sum", &metrics.participants),
            ("clients_connected", "Authenticated clients connected now", &metrics.connected),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register("round_seconds", "Length of the last round", metrics.round_seconds.clone());
        for (name, help, family) in [
            ("train_loss", "Mean training loss the last plain round's clients reported", &metrics.train_loss),
            ("clip_norm", "The last DP round's clipping norm", &metrics.clip),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            ("test_accuracy", "Accuracy of each head on the server's test sets", &metrics.test_accuracy),
            (
                "test_balanced_accuracy",
                "Balanced accuracy of each head on the test sets",
                &metrics.test_balanced_accuracy,
            ),
            ("test_macro_f1", "Macro-F1 of each head on the server's test sets", &metrics.test_macro_f1),
            (
                "federated_accuracy",
                "Accuracy of each head in the last federated evaluation",
                &metrics.federated_accuracy,
            ),
            (
                "federated_balanced_accuracy",
                "Balanced accuracy of each head in the last federated evaluation",
                &metrics.federated_balanced_accuracy,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "epsilon",
            "Differential privacy spent so far, against anyone who sees only the models (against=\"models\", \
             amplified by sampling) and against the server (against=\"server\", the most any client spent)",
            metrics.epsilon.clone(),
        );
        registry.register(
            "cheaters",
            "Clients caught cheating in secure aggregation (bad signatures or shares)",
            metrics.cheaters.clone(),
        );
        registry.register("rounds", "Rounds finished, by status", metrics.rounds.clone());
        registry.register("dropouts", "Sampled clients that did not finish their round", metrics.dropouts.clone());
        registry.register(
            "declines",
            "Plans a site declined (a round, a census or an evaluation), by client; the reasons are in the log",
            metrics.declines.clone(),
        );
        metrics
    }
}

fn head(name: &str) -> Vec<(String, String)> {
    vec![("head".to_string(), name.to_string())]
}

impl ServerMetrics {
    /// Takes in a finished round; `first_head` names the head of `report.test`.
    pub fn record(&self, report: &RoundReport, first_head: &str) {
        self.round.set(report.round as i64);
        let status = if report.completed { "completed" } else { "aborted" };
        self.rounds.get_or_create(&vec![("status".to_string(), status.to_string())]).inc();
        self.round_seconds.set(report.seconds);
        self.participants.set(report.participants as i64);
        self.dropouts.inc_by(report.dropped.len() as u64);
        if let Some(loss) = report.train_loss {
            self.train_loss.get_or_create(&Vec::new()).set(loss);
        }
        for (against, epsilon) in [("models", report.epsilon), ("server", report.epsilon_server)] {
            if let Some(epsilon) = epsilon {
                self.epsilon.get_or_create(&vec![("against".to_string(), against.to_string())]).set(epsilon);
            }
        }
        self.cheaters.inc_by(report.cheaters.len() as u64);
        if let Some(clip) = report.clip {
            self.clip.get_or_create(&Vec::new()).set(clip);
        }
        let tests =
            report.test.iter().map(|m| (first_head, m)).chain(report.head_tests.iter().map(|(h, m)| (h.as_str(), m)));
        for (name, m) in tests {
            self.test_accuracy.get_or_create(&head(name)).set(m.accuracy);
            self.test_balanced_accuracy.get_or_create(&head(name)).set(m.balanced_accuracy);
            self.test_macro_f1.get_or_create(&head(name)).set(m.macro_f1);
        }
        for (name, m) in &report.federated {
            self.federated_accuracy.get_or_create(&head(name)).set(m.accuracy);
            self.federated_balanced_accuracy.get_or_create(&head(name)).set(m.balanced_accuracy);
        }
    }

    /// Takes in the rounds recorded before this server started, so that a restart does not reset
    /// the round, the counters or the last figures to 0.
    pub fn resume(&self, rows: &[RoundRow], first_head: &str) {
        for row in rows {
            let status = if row.status == "completed" { "completed" } else { "aborted" };
            self.rounds.get_or_create(&vec![("status".to_string(), status.to_string())]).inc();
            self.dropouts.inc_by(row.dropped as u64);
        }
        let Some(last) = rows.last() else { return };
        self.round.set(last.round as i64);
        self.round_seconds.set(last.seconds);
        self.participants.set(last.participants as i64);
        let latest = |f: &dyn Fn(&RoundRow) -> Option<f64>| rows.iter().rev().find_map(f);
        if let Some(loss) = latest(&|r| r.train_loss) {
            self.train_loss.get_or_create(&Vec::new()).set(loss);
        }
        if let Some(clip) = latest(&|r| r.clip) {
            self.clip.get_or_create(&Vec::new()).set(clip);
        }
        for (against, epsilon) in [("models", latest(&|r| r.epsilon)), ("server", latest(&|r| r.epsilon_server))] {
            if let Some(epsilon) = epsilon {
                self.epsilon.get_or_create(&vec![("against".to_string(), against.to_string())]).set(epsilon);
            }
        }
        if let Some(row) = rows.iter().rev().find(|r| r.test_accuracy.is_some() || !r.head_tests.is_empty()) {
            let first = row.test_accuracy.map(|a| (first_head, a, row.balanced_accuracy, row.macro_f1));
            for (name, accuracy, balanced, f1) in first.into_iter().chain(row.head_tests.iter().map(|h| {
                (h.head.as_str(), h.metrics.accuracy, Some(h.metrics.balanced_accuracy), Some(h.metrics.macro_f1))
            })) {
                self.test_accuracy.get_or_create(&head(name)).set(accuracy);
                if let Some(b) = balanced {
                    self.test_balanced_accuracy.get_or_create(&head(name)).set(b);
                }
                if let Some(f) = f1 {
                    self.test_macro_f1.get_or_create(&head(name)).set(f);
                }
            }
        }
    }

    /// A site declined a plan. (Client ids are checked at every connection: letters, digits,
    /// '-', '_' and '.', so they are safe as label values.)
    pub fn declined(&self, client: &str) {
        self.declines.get_or_create(&vec![("client".to_string(), client.to_string())]).inc();
    }

    /// The exposition text, with `connected` clients.
    pub fn render(&self, connected: usize) -> String {
        self.connected.set(connected as i64);
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// The longest request head read; more is refused.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper has to send its request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Scrapes answered at once; connections beyond these are closed unanswered, so a flood of
/// idle connections holds at most this many request buffers.
pub const MAX_CONNECTIONS: usize = 16;

/// A finished HTTP response.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: format!("{body}\n") }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            self.status,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// Answers one request head (everything up to the blank line): `GET /metrics` gets the
/// exposition from `metrics`; anything else a short error.
pub fn respond(head: &[u8], metrics: impl FnOnce() -> String) -> Response {
    let Ok(head) = std::str::from_utf8(head) else { return Response::text("400 Bad Request", "not HTTP") };
    let mut request_line = head.lines().next().unwrap_or_default().split(' ');
    let (method, target, version) = (request_line.next(), request_line.next(), request_line.next());
    match (method, target, version) {
        (Some(_), Some(_), Some(v)) if !v.starts_with("HTTP/1.") => Response::text("400 Bad Request", "HTTP/1.x only"),
        (Some("GET"), Some("/metrics"), Some(_)) => Response {
            status: "200 OK",
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: metrics(),
        },
        (Some("GET"), Some(_), Some(_)) => Response::text("404 Not Found", "the only path is /metrics"),
        (Some(_), Some(_), Some(_)) => Response::text("405 Method Not Allowed", "use GET /metrics"),
        _ => Response::text("400 Bad Request", "malformed request line"),
    }
}

/// Reads one request head from `stream`: up to the blank line, at most [`MAX_REQUEST_HEAD`]
/// bytes. `None`: too long or closed early.
async fn read_head(stream: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`; `render` makes the exposition.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "metrics: GET http://{addr}/metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!("metrics: accept failed: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: {MAX_CONNECTIONS} scrapes in progress; closing this connection");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let response = match tokio::time::timeout(REQUEST_DEADLINE, read_head(&mut stream)).await {
                Ok(Ok(Some(head))) => respond(&head, || render()),
                Ok(Ok(None)) => Response::text("431 Request Header Fields Too Large", "request head too long or cut"),
                Ok(Err(e)) => {
                    debug!(%peer, "metrics: {e}");
                    return;
                }
                Err(_) => Response::text("408 Request Timeout", "no request within 5 s"),
            };
            let _ = tokio::time::timeout(REQUEST_DEADLINE, stream.write_all(&response.to_bytes())).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_common::train::Metrics;

    #[test]
    fn requests_get_the_metrics_or_a_clear_error() {
        let body = || "cohort_round 3\n".to_string();
        let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x", body);
        assert_eq!((ok.status, ok.body.as_str()), ("200 OK", "cohort_round 3\n"));
        assert_eq!(respond(b"GET / HTTP/1.1", body).status, "404 Not Found");
        assert_eq!(respond(b"POST /metrics HTTP/1.1", body).status, "405 Method Not Allowed");
        assert_eq!(respond(b"GET /metrics SPDY/3", body).status, "400 Bad Request");
        assert_eq!(respond(b"\xff\xfe", body).status, "400 Bad Request");
        assert_eq!(respond(b"", body).status, "400 Bad Request");
        let bytes = String::from_utf8(ok.to_bytes()).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 200 OK\r\n") && bytes.contains("content-length: 15\r\n"), "{bytes}");
    }

    /// Issue 15: after a restart /metrics said `cohort_round 0` with its counters at 0, and a
    /// `cohort_train_loss 0.0` and `cohort_clip_norm 0.0` where they did not apply.
    #[test]
    fn metrics_resume_from_the_record_and_export_nothing_that_does_not_apply() {
        let fresh = ServerMetrics::default().render(0);
        for absent in ["cohort_train_loss", "cohort_clip_norm", "cohort_epsilon"] {
            assert!(!fresh.lines().any(|l| l.starts_with(absent)), "{absent} exported before it applies:\n{fresh}");
        }
        let row = |round: u64, status: &str, dropped: usize| RoundRow {
            round,
            started_at: 0,
            seconds: 0.5,
            status: status.into(),
            cohort: 3,
            participants: 2,
            dropped,
            train_loss: None,
            test_accuracy: Some(0.75),
            test_loss: Some(0.5),
            balanced_accuracy: Some(0.7),
            macro_f1: Some(0.7),
            checkpoint: None,
            note: String::new(),
            sampling_rate: None,
            noise_multiplier: None,
            epsilon: Some(1.5),
            epsilon_server: Some(2.5),
            too_few_probability: None,
            clip: Some(0.8),
            unclipped: None,
            head_tests: Vec::new(),
            federated: Vec::new(),
        };
        let metrics = ServerMetrics::default();
        metrics.resume(&[row(1, "completed", 1), row(2, "aborted", 3), row(3, "completed", 0)], "digit");
        let text = metrics.render(0);
        for line in [
            "cohort_round 3",
            "cohort_rounds_total{status=\"completed\"} 2",
            "cohort_rounds_total{status=\"aborted\"} 1",
            "cohort_dropouts_total 4",
            "cohort_epsilon{against=\"server\"} 2.5",
            "cohort_clip_norm{} 0.8",
            "cohort_test_accuracy{head=\"digit\"} 0.75",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(!text.lines().any(|l| l.starts_with("cohort_train_loss")), "no plain round, no loss:\n{text}");
    }

    #[test]
    fn a_round_report_becomes_metrics_per_head() {
        let metrics = ServerMetrics::default();
        let confusion = Metrics::from_confusion(vec![vec![3, 1], vec![0, 4]], 1.0);
        let report = RoundReport {
            round: 7,
            completed: true,
            cohort: 5,
            participants: 4,
            dropped: vec![("c9".into(), "timed out".into())],
            seconds: 1.5,
            train_loss: Some(0.25),
            test: Some(confusion.clone()),
            eval_seconds: None,
            head_tests: vec![("parity".into(), confusion.clone())],
            federated: vec![("digit".into(), confusion)],
            note: String::new(),
            epsilon: Some(1.25),
            epsilon_server: Some(3.5),
            delta: Some(1e-5),
            cheaters: vec![("c8".into(), "returned a bad share".into())],
            ..RoundReport::default()
        };
        metrics.record(&report, "digit");
        metrics.declined("hospital-b");
        metrics.declined("hospital-b");
        let text = metrics.render(3);
        for line in [
            "cohort_round 7",
            "cohort_rounds_total{status=\"completed\"} 1",
            "cohort_round_participants 4",
            "cohort_dropouts_total 1",
            "cohort_epsilon{against=\"models\"} 1.25",
            "cohort_epsilon{against=\"server\"} 3.5",
            "cohort_cheaters_total 1",
            "cohort_declines_total{client=\"hospital-b\"} 2",
            "cohort_clients_connected 3",
            "cohort_test_accuracy{head=\"digit\"} 0.875",
            "cohort_test_accuracy{head=\"parity\"} 0.875",
            "cohort_federated_balanced_accuracy{head=\"digit\"} 0.875",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
