//! The client driver: dial the server, say hello, answer each round plan on its stream with
//! an update computed by [`Participant`] on a blocking thread, reconnect with backoff and
//! jitter when the connection is lost, and stop cleanly on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cohort_common::participant::Participant;
use cohort_common::wire::{self, ClientMsg, ServerMsg, WireError, MAX_FRAME_BYTES, REPLACED_CLOSE_CODE};
use cohort_io::{escape, recv_msg, send_msg, CertificateFacts, Identity, NetError};
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Backoff;
use crate::ledger::LedgerFile;
use crate::renew;
use cohort_common::dp::LedgerRefusal;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the server refused this client: {0}")]
    Refused(String),
    #[error("this client is not authorised: {0}")]
    Unauthorized(String),
    /// This client's certificate has expired (before start or while running): the message says
    /// how to renew it.
    #[error("{0}")]
    Expired(String),
    /// Another daemon with this client id kept replacing this one's connection at the server
    /// ([`MAX_REPLACEMENTS`] times in a row): the message says so and what to do.
    #[error("{0}")]
    DuplicateIdentity(String),
}

/// What a running client reports to an observer (tests, `cohort-sim`).
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Connected,
    PlanReceived { round: u64 },
    UpdateSent { round: u64 },
    Disconnected { reason: String },
}

/// Everything a client daemon needs, already parsed.
pub struct ClientSetup {
    pub identity: Identity,
    pub server: SocketAddr,
    pub server_name: String,
    pub participant: Participant,
    pub device_name: String,
    pub backoff: Backoff,
    /// Limits how many clients of one process train at once (simulations).
    pub train_gate: Option<Arc<Semaphore>>,
    pub events: Option<mpsc::UnboundedSender<ClientEvent>>,
    /// Simulated crashes (scenarios and tests): asked after each reply is sent; `true` drops
    /// the connection abruptly, as a crashed process would. The daemon then reconnects.
    pub fault: Option<FaultHook>,
    /// Adversarial tests: rewrites each reply before it is sent, as a cheating client would.
    pub tamper: Option<TamperHook>,
    /// This client's privacy ledger: private rounds past its budget are declined.
    pub ledger: Option<SharedLedger>,
    /// An endpoint shared with other clients of this process (simulations); `None` opens one.
    pub endpoint: Option<quinn::Endpoint>,
    /// Where personal heads are kept across restarts (in the state directory).
    pub personal_path: Option<std::path::PathBuf>,
}

/// The ledger, shared by the request handlers.
pub type SharedLedger = Arc<std::sync::Mutex<LedgerFile>>;

/// Which reply a client has just sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Update,
    Join,
    Advert,
    Shares,
    Masked,
    Confirm,
    Unmask,
}

/// Decides, after a reply of `Step` in `round`, whether the client crashes now.
pub type FaultHook = Arc<dyn Fn(u64, Step) -> bool + Send + Sync>;

/// Rewrites the reply to a request of `round` before it is sent (a cheating client, in tests).
pub type TamperHook = Arc<dyn Fn(u64, &mut ClientMsg) + Send + Sync>;

/// What the per-request handlers share.
#[derive(Clone)]
struct Hooks {
    /// The last round whose secure training finished (so a handler can await it without holding
    /// a blocking thread: a simulation runs more clients than the blocking pool has threads).
    trained: Arc<tokio::sync::watch::Sender<u64>>,
    gate: Option<Arc<Semaphore>>,
    events: Option<mpsc::UnboundedSender<ClientEvent>>,
    fault: Option<FaultHook>,
    tamper: Option<TamperHook>,
    ledger: Option<SharedLedger>,
    /// The first round of the current connection (from the server's welcome).
    joined_at: u64,
    /// The federation the ledger charges: the CA this client trusts and the server's id.
    federation: String,
    personal_path: Option<std::path::PathBuf>,
}

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const SERVER_SHUTDOWN: &str = "the server shut down";
/// How long a request (a round plan: the whole model) may take to arrive once its stream opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Why `serve` returned when the certificate expired during a connection.
const CERTIFICATE_EXPIRED: &str = "this client's certificate expired";
/// Connections in a row that a newer connection with this client id may replace before the
/// daemon stops: two daemons with one identity evict each other, so one of them must go.
pub const MAX_REPLACEMENTS: u32 = 3;

/// True when the server closed the connection because a newer one with this client id replaced
/// it (another daemon with this identity connected).
fn replaced_by_another(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == REPLACED_CLOSE_CODE.into())
}

/// What a daemon says when another daemon with its id took its connection.
fn duplicate_notice(id: &str) -> String {
    format!(
        "another daemon with id {id} is connected to the server (it replaced this one's connection); stop one of \
         them"
    )
}

/// After the `replaced`-th replacement in a row: how long to wait before dialling again (growing,
/// with jitter, so the two daemons stop evicting each other at once), or, at
/// [`MAX_REPLACEMENTS`], the error that stops this daemon.
fn after_replacement(replaced: u32, id: &str, backoff: &Backoff, rng: &mut impl Rng) -> Result<Duration, ClientError> {
    let notice = duplicate_notice(id);
    if replaced >= MAX_REPLACEMENTS {
        return Err(ClientError::DuplicateIdentity(format!(
            "{notice}: this daemon stops after {replaced} replacements in a row"
        )));
    }
    let delay = backoff_delay(backoff, replaced, rng);
    warn!("{notice}; dialling again in {:.1} s", delay.as_secs_f64());
    Ok(delay)
}

/// Runs until `shutdown` is cancelled or the server refuses this client. Refuses to start with an
/// expired certificate ([`ClientError::Expired`]), warns at start, at each reconnection and
/// daily while connected when it expires within [`renew::EXPIRY_WARNING_DAYS`], and stops when
/// it expires. Its messages name the configuration `CLIENT.toml`: see [`run_with_config`].
pub async fn run(setup: ClientSetup, shutdown: CancellationToken) -> Result<(), ClientError> {
    drive(setup, shutdown, "CLIENT.toml").await
}

/// [`run`], naming `config` (the daemon's `client.toml`) in the renew commands it gives.
pub async fn run_with_config(
    setup: ClientSetup,
    shutdown: CancellationToken,
    config: &std::path::Path,
) -> Result<(), ClientError> {
    drive(setup, shutdown, &config.display().to_string()).await
}

/// The certificate's expiry, checked before each connection.
fn check_expiry(certificate: &CertificateFacts, config: &str) -> Result<(), ClientError> {
    match renew::unix_now() >= certificate.not_after {
        true => Err(ClientError::Expired(renew::expired_notice(certificate, config))),
        false => Ok(()),
    }
}

fn warn_if_expiring(certificate: &CertificateFacts, config: &str) {
    if let Some(notice) = renew::expiring_notice(certificate, renew::unix_now(), config) {
        warn!("{notice}");
    }
}

/// What the daemon makes of the server's refusal of its certificate in the handshake. A refusal
/// that says the certificate expired becomes [`ClientError::Expired`] with the renew
/// instructions (this machine found it valid just before dialling, so a clock may be wrong too);
/// any other is [`ClientError::Unauthorized`].
pub fn certificate_refusal(refusal: &NetError, certificate: &CertificateFacts, config: &str) -> ClientError {
    let text = refusal.to_string();
    if !text.to_ascii_lowercase().contains("expired") {
        return ClientError::Unauthorized(text);
    }
    ClientError::Expired(format!(
        "the server refused the certificate of `{id}` (serial {serial}) as expired. By this machine's clock it is \
         valid until {until}: if that is not past, one of the clocks is wrong. To renew it: run `cohort-client \
         renew --config {config}`, have the operator sign the request, install the certificate with \
         `cohort-client renew --config {config} --install {id}.renew.pem`, and start the daemon again",
        id = certificate.client,
        serial = certificate.serial,
        until = cohort_io::utc(certificate.not_after),
    ))
}

/// How long until the certificate is next looked at while connected: a day, or just past its
/// expiry if sooner.
fn next_expiry_check(certificate: &CertificateFacts) -> Duration {
    let left = (certificate.not_after - renew::unix_now()).max(0) + 1;
    Duration::from_secs(left.min(86_400) as u64)
}

async fn drive(setup: ClientSetup, shutdown: CancellationToken, config: &str) -> Result<(), ClientError> {
    let ClientSetup {
        identity,
        server,
        server_name,
        participant,
        device_name,
        backoff,
        train_gate,
        events,
        fault,
        tamper,
        ledger,
        endpoint: shared_endpoint,
        personal_path,
    } = setup;
    // An expired certificate is refused by the server in the handshake: say so and stop, rather
    // than dial it again and again.
    let certificate = identity.certificate()?;
    check_expiry(&certificate, config)?;
    warn_if_expiring(&certificate, config);
    let mut connections = 0u64;
    let ca_fingerprint = identity.ca_fingerprint();
    let mut hooks = Hooks {
        trained: Arc::new(tokio::sync::watch::channel(0).0),
        gate: train_gate,
        events: events.clone(),
        fault,
        tamper,
        ledger,
        joined_at: 0,
        federation: String::new(),
        personal_path,
    };
    let owns_endpoint = shared_endpoint.is_none();
    let endpoint = match shared_endpoint {
        Some(e) => e,
        None => cohort_io::client_endpoint(server.is_ipv6())?,
    };
    let quic_config = cohort_io::client_config(&identity)?;
    let samples = participant.samples();
    let participant = Arc::new(participant);
    let hello = ClientMsg::Hello { device: device_name, samples };
    let emit = |e: ClientEvent| {
        if let Some(tx) = &events {
            let _ = tx.send(e);
        }
    };
    let mut attempt = 0u32;
    // Connections in a row closed because a newer one with this id replaced them.
    let mut replaced = 0u32;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if let Err(e) = check_expiry(&certificate, config) {
            break Err(e);
        }
        let connected = tokio::select! {
            r = connect(&endpoint, &quic_config, server, &server_name, &hello) => r,
            _ = shutdown.cancelled() => break Ok(()),
        };
        match connected {
            Ok((conn, next_round, federation)) => {
                attempt = 0;
                hooks.joined_at = next_round;
                hooks.federation = cohort_common::dp::federation_key(&ca_fingerprint, &federation);
                info!(%server, next_round, federation = %escape(&federation, 64), "connected");
                connections += 1;
                if connections > 1 {
                    warn_if_expiring(&certificate, config);
                }
                emit(ClientEvent::Connected);
                let (reason, was_replaced) = serve(&conn, &participant, &hooks, &shutdown, &certificate, config).await;
                emit(ClientEvent::Disconnected { reason: reason.clone() });
                if shutdown.is_cancelled() {
                    break Ok(());
                }
                if reason == CERTIFICATE_EXPIRED {
                    break Err(ClientError::Expired(renew::expired_notice(&certificate, config)));
                }
                if was_replaced {
                    replaced += 1;
                    // (A statement of its own: the thread's rng must not live across the await.)
                    let next = after_replacement(replaced, &certificate.client, &backoff, &mut rand::rng());
                    match next {
                        Ok(delay) => tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = shutdown.cancelled() => break Ok(()),
                        },
                        Err(e) => break Err(e),
                    }
                }
                replaced = 0;
                if reason.starts_with(SERVER_SHUTDOWN) {
                    info!("the server shut down; reconnecting until it is back");
                } else {
                    warn!("connection lost ({}); reconnecting", escape(&reason, 300));
                }
            }
            // Replaced in its hello by a newer connection with this id.
            Err(ClientError::Net(NetError::Connection(e))) if replaced_by_another(&e) => {
                replaced += 1;
                let next = after_replacement(replaced, &certificate.client, &backoff, &mut rand::rng());
                match next {
                    Ok(delay) => tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break Ok(()),
                    },
                    Err(e) => break Err(e),
                }
            }
            Err(ClientError::Net(e)) if e.is_unauthorized() => {
                warn!("the server refused this client's certificate: {}", escape(&e.to_string(), 400));
                break Err(certificate_refusal(&e, &certificate, config));
            }
            Err(e @ (ClientError::Refused(_) | ClientError::Unauthorized(_))) => {
                // The refusal is the server's text, escaped when it arrived; this daemon stops.
                warn!("{e}; stopping");
                break Err(e);
            }
            Err(e) => {
                let delay = backoff_delay(&backoff, attempt, &mut rand::rng());
                attempt = attempt.saturating_add(1);
                info!(
                    "cannot reach the server ({}); retrying in {:.1} s",
                    escape(&e.to_string(), 300),
                    delay.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break Ok(()),
                }
            }
        }
    };
    if owns_endpoint {
        endpoint.close(0u32.into(), b"client shutting down");
        // Long enough for the goodbye to reach the server; not for a handshake that never answers.
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    }
    result
}

/// Exponential backoff with full jitter: uniform in [0, min(max, initial * 2^attempt)].
pub fn backoff_delay(b: &Backoff, attempt: u32, rng: &mut impl Rng) -> Duration {
    let cap = b.initial_ms.saturating_mul(1u64 << attempt.min(20)).min(b.max_ms);
    Duration::from_millis(rng.random_range(b.initial_ms.min(cap) / 2..=cap))
}

async fn connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
    server_name: &str,
    hello: &ClientMsg,
) -> Result<(quinn::Connection, u64, String), ClientError> {
    let conn = endpoint
        .connect_with(config.clone(), server, server_name)
        .map_err(NetError::from)?
        .await
        .map_err(cohort_io::classify)?;
    let hello = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(cohort_io::classify)?;
        send_msg(&mut send, hello).await?;
        let _ = send.finish();
        recv_msg::<ServerMsg>(&mut recv, 64 << 10).await
    };
    match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
        Err(_) => Err(NetError::Stream("the server did not answer hello in time".into()).into()),
        // A server of another version answers in this client's version (docs/protocol.md); one
        // that answers in its own predates that rule, and will not understand this client either.
        Ok(Err(NetError::Wire(WireError::Version { got }))) => {
            Err(ClientError::Refused(wire::server_version_mismatch(got)))
        }
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(ServerMsg::Welcome { client_id, next_round, federation, .. })) => {
            debug!(client_id = %escape(&client_id, 64), next_round, "welcomed");
            Ok((conn, next_round, federation))
        }
        // The reason is the server's text: escaped and capped before it reaches a log or a terminal.
        Ok(Ok(ServerMsg::Refused { reason })) => Err(ClientError::Refused(escape(&reason, 500))),
        Ok(Ok(_)) => Err(NetError::Stream("expected welcome, got another message".into()).into()),
    }
}

/// Answers the server's requests until the connection ends; returns why it ended, and whether
/// the server closed it because a newer connection with this client id replaced it. Warns daily
/// while the certificate expires within [`renew::EXPIRY_WARNING_DAYS`], and closes the
/// connection when it expires.
async fn serve(
    conn: &quinn::Connection,
    participant: &Arc<Participant>,
    hooks: &Hooks,
    shutdown: &CancellationToken,
    certificate: &CertificateFacts,
    config: &str,
) -> (String, bool) {
    // Handlers live in this set: when the daemon stops, they stop with it.
    let mut handlers = JoinSet::new();
    let expiry_check = tokio::time::sleep(next_expiry_check(certificate));
    tokio::pin!(expiry_check);
    loop {
        tokio::select! {
            () = &mut expiry_check => {
                if renew::unix_now() >= certificate.not_after {
                    warn!(serial = %certificate.serial, "the certificate expired; closing the connection");
                    conn.close(0u32.into(), b"client certificate expired");
                    return (CERTIFICATE_EXPIRED.into(), false);
                }
                warn_if_expiring(certificate, config);
                expiry_check.as_mut().reset(tokio::time::Instant::now() + next_expiry_check(certificate));
            }
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let participant = participant.clone();
                    let (hooks, conn) = (hooks.clone(), conn.clone());
                    handlers.spawn(async move {
                        if let Err(e) = answer(send, recv, participant, &hooks, &conn).await {
                            warn!("request failed: {}", escape(&e.to_string(), 300));
                        }
                    });
                }
                Err(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == 0u32.into() => {
                    return (format!("{SERVER_SHUTDOWN} ({})", String::from_utf8_lossy(&c.reason)), false);
                }
                Err(e) => return (e.to_string(), replaced_by_another(&e)),
            },
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            _ = shutdown.cancelled() => {
                conn.close(0u32.into(), b"client shutting down");
                return ("shutdown".into(), false);
            }
        }
    }
}

async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    participant: Arc<Participant>,
    hooks: &Hooks,
    conn: &quinn::Connection,
) -> Result<(), NetError> {
    let msg: ServerMsg = tokio::time::timeout(REQUEST_TIMEOUT, recv_msg(&mut recv, MAX_FRAME_BYTES))
        .await
        .map_err(|_| NetError::Stream(format!("the server's request did not arrive within {REQUEST_TIMEOUT:?}")))??;
    let round = match &msg {
        ServerMsg::Plan(p) => p.round,
        ServerMsg::Joined { round, .. }
        | ServerMsg::Adverts { round, .. }
        | ServerMsg::Shares { round, .. }
        | ServerMsg::Survivors { round, .. }
        | ServerMsg::Unmask { round, .. } => *round,
        other => return Err(NetError::Stream(format!("unexpected request {}", escape(&format!("{other:?}"), 200)))),
    };
    let plan = match &msg {
        ServerMsg::Plan(plan) => {
            if let Some(tx) = &hooks.events {
                let _ = tx.send(ClientEvent::PlanReceived { round });
            }
            Some(plan.clone())
        }
        _ => None,
    };
    // A client with a privacy budget takes part only in private rounds, and only while its
    // ledger allows: otherwise it declines before any training.
    if let (Some(plan), Some(ledger)) = (&plan, &hooks.ledger) {
        let decision = match plan.secure.as_ref().and_then(|s| s.dp) {
            Some(dp) => {
                // The ledger is written and synced before the answer: off the runtime.
                let (ledger, joined_at, federation) = (ledger.clone(), hooks.joined_at, hooks.federation.clone());
                tokio::task::spawn_blocking(move || {
                    ledger.lock().expect("ledger lock").admit(&federation, round, joined_at, &dp)
                })
                .await
                .map_err(|e| NetError::Stream(format!("ledger task failed: {e}")))?
            }
            None => Err(LedgerRefusal::NoNoise { round }.into()),
        };
        match decision {
            Ok(epsilon) => info!(round, epsilon = format!("{epsilon:.3}"), "privacy ledger: taking part"),
            Err(e) => {
                warn!(round, "declining the round: {}", escape(&e.to_string(), 300));
                send_msg(&mut send, &ClientMsg::Decline { round, reason: e.to_string() }).await?;
                let _ = send.finish();
                return Ok(());
            }
        }
    }
    let secure_plan = plan.as_ref().filter(|p| p.secure.is_some()).cloned();
    // Plain rounds train here, behind the gate; secure rounds answer with keys first.
    let _permit = match (&hooks.gate, plan.is_some() && secure_plan.is_none()) {
        (Some(g), true) => Some(g.clone().acquire_owned().await.map_err(|e| NetError::Stream(e.to_string()))?),
        _ => None,
    };
    if let ServerMsg::Shares { round, .. } = &msg {
        if participant.is_training(*round) {
            let mut trained = hooks.trained.subscribe();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, trained.wait_for(|r| *r >= *round)).await;
        }
    }
    let shared = participant.clone();
    let personal_path = hooks.personal_path.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let outcome = shared.handle(&msg, &mut rand::rng());
        if let Ok(ClientMsg::Update(_)) = &outcome {
            keep_personal_heads(&shared, personal_path.as_deref());
        }
        outcome
    })
    .await
    .map_err(|e| NetError::Stream(format!("request task failed: {e}")))?;
    let joined = secure_plan.is_some() && matches!(outcome, Ok(ClientMsg::Join { .. }));
    let mut reply = match outcome {
        Ok(reply) => {
            if let ClientMsg::Update(update) = &reply {
                info!(round, loss = update.train_loss, seconds = format!("{:.2}", update.train_seconds), "trained");
            }
            reply
        }
        Err(e) => {
            warn!(round, "declining the round: {}", escape(&e.to_string(), 300));
            ClientMsg::Decline { round, reason: e.to_string() }
        }
    };
    let step = match &reply {
        ClientMsg::Update(_) => Some(Step::Update),
        ClientMsg::Join { .. } => Some(Step::Join),
        ClientMsg::Advert { .. } => Some(Step::Advert),
        ClientMsg::Shares { .. } => Some(Step::Shares),
        ClientMsg::Masked { .. } => Some(Step::Masked),
        ClientMsg::Confirm { .. } => Some(Step::Confirm),
        ClientMsg::Unmask { .. } => Some(Step::Unmask),
        _ => None,
    };
    if let Some(tamper) = &hooks.tamper {
        tamper(round, &mut reply);
    }
    send_msg(&mut send, &reply).await?;
    let _ = send.finish();
    if let Some(tx) = &hooks.events {
        let _ = tx.send(ClientEvent::UpdateSent { round });
    }
    if let (Some(fault), Some(step)) = (&hooks.fault, step) {
        if fault(round, step) {
            // Let the reply leave, then vanish without a goodbye.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            warn!(round, ?step, "simulated crash");
            participant.abandon_round();
            conn.close(99u32.into(), b"simulated crash");
            return Ok(());
        }
    }
    // A secure round trains while the keys are exchanged; the masked input waits for it.
    if let (Some(plan), true) = (secure_plan, joined) {
        let _permit = match &hooks.gate {
            Some(g) => Some(g.clone().acquire_owned().await.map_err(|e| NetError::Stream(e.to_string()))?),
            None => None,
        };
        let started = std::time::Instant::now();
        // Signalled from the training thread itself: if this handler is aborted (the connection
        // dropped), the training still finishes and a later request on a new connection is not
        // left waiting for a signal that never comes.
        let signal = hooks.trained.clone();
        let personal_path = hooks.personal_path.clone();
        let trained = tokio::task::spawn_blocking(move || {
            participant.train_secure(&plan, &mut rand::rng());
            signal.send_modify(|r| *r = (*r).max(round));
            keep_personal_heads(&participant, personal_path.as_deref());
        })
        .await;
        trained.map_err(|e| NetError::Stream(format!("training task failed: {e}")))?;
        info!(round, seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "trained");
    }
    Ok(())
}

/// Writes the personal heads to the state directory (atomically), if the model has any.
/// Blocking: call it on a blocking thread.
fn keep_personal_heads(participant: &Participant, path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    let heads = participant.personal_heads();
    if heads.is_empty() {
        return;
    }
    let bytes = cohort_common::model::vectors_to_safetensors(&heads);
    if let Err(e) = cohort_io::files::write_atomic(path, &bytes) {
        warn!("cannot keep the personal heads: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff { initial_ms: 100, max_ms: 1000 };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for attempt in 0..30 {
            let d = backoff_delay(&b, attempt, &mut rng).as_millis() as u64;
            assert!(d <= 1000 && d <= 100 << attempt.min(20), "attempt {attempt}: {d}");
        }
        let late: Vec<u64> = (0..20).map(|_| backoff_delay(&b, 10, &mut rng).as_millis() as u64).collect();
        assert!(late.iter().any(|&d| d > 500), "delays reach toward the cap: {late:?}");
        assert!(late.windows(2).any(|w| w[0] != w[1]), "delays are jittered: {late:?}");
    }
}
