//! The client driver: dial the server, say hello, feed each request to the client's
//! [`ClientSession`] and carry out what it asks (replies on the request's stream, jobs run by the
//! [`Trainer`] on a blocking thread, the privacy ledger written before the reply that depends on
//! it), reconnect with backoff and jitter when the connection is lost, and stop cleanly on
//! shutdown.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cohort_common::dp::PrivacyLedger;
use cohort_common::secagg::Phase;
use cohort_common::session::{Action, ClientSession, Job, JobId, JobKind, JobResult, Token};
use cohort_common::trainer::JobRunner;
use cohort_common::wire::{
    self, ClientMsg, ServerMsg, WireError, FINISHED_CLOSE_REASON, MAX_FRAME_BYTES, REPLACED_CLOSE_CODE,
    SHUTDOWN_CLOSE_CODE,
};
use cohort_io::{escape, recv_msg, send_msg, CertificateFacts, Identity, NetError};
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Backoff;
use crate::ledger::LedgerFile;
use crate::renew;

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
    /// The connection ended without a word from the server and the server has not answered
    /// since, for [`GIVE_UP_AFTER`]: the message says so and what it may mean.
    #[error("{0}")]
    ServerGone(String),
}

/// What a running client reports to an observer (tests, `cohort-sim`). `ReplySent` is any reply
/// to a request of `round` (an update, a key advert, a decline, ...): `kind` says which, in the
/// words of `ClientMsg::kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Connected,
    PlanReceived { round: u64 },
    ReplySent { round: u64, kind: &'static str },
    Disconnected { reason: String },
}

/// Everything a client daemon needs, already parsed.
pub struct ClientSetup {
    pub identity: Identity,
    pub server: SocketAddr,
    pub server_name: String,
    /// The client's side of each round: plan checks, secure sessions, declines. The daemon
    /// gives it the ledger's spending (see `ledger`).
    pub session: ClientSession,
    /// Runs the session's jobs: candle's `Trainer` on the client's data, or the data owner's own
    /// training (`CallbackTrainer`, the Python package's).
    pub trainer: Box<dyn JobRunner>,
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

/// The ledger file: the session charges the ledger; the daemon writes each charge here before
/// the reply that depends on it (and tests read it back).
pub type SharedLedger = Arc<std::sync::Mutex<LedgerFile>>;

/// Which reply a client has just sent: a plain round's update, or its answer in a phase of a
/// secure sum (the phases are named once, in [`Phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Update,
    Secure(Phase),
}

/// Decides, after a reply of `Step` in `round`, whether the client crashes now.
pub type FaultHook = Arc<dyn Fn(u64, Step) -> bool + Send + Sync>;

/// Rewrites the reply to a request of `round` before it is sent (a cheating client, in tests).
pub type TamperHook = Arc<dyn Fn(u64, &mut ClientMsg) + Send + Sync>;

/// What the driver and its reply tasks share.
#[derive(Clone)]
struct Hooks {
    /// Simulations: how many clients of this process run a job at once.
    gate: Option<Arc<Semaphore>>,
    events: Option<mpsc::UnboundedSender<ClientEvent>>,
    fault: Option<FaultHook>,
    tamper: Option<TamperHook>,
    ledger: Option<SharedLedger>,
    personal_path: Option<std::path::PathBuf>,
}

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const SERVER_SHUTDOWN: &str = "the server shut down";
/// How long a request (a round plan: the whole model) may take to arrive once its stream opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Why `serve` returned when the certificate expired during a connection.
const CERTIFICATE_EXPIRED: &str = "this client's certificate expired";
/// Why `serve` returned when the server closed the connection because the federation is finished
/// ([`FINISHED_CLOSE_REASON`]): the daemon stops instead of reconnecting.
const FEDERATION_FINISHED: &str = "the federation is finished";
const FINISHED_NOTICE: &str =
    "the server says the federation is finished; stopping. Start the daemon again to take part in another federation";
/// Connections in a row that a newer connection with this client id may replace before the
/// daemon stops: two daemons with one identity evict each other, so one of them must go.
pub const MAX_REPLACEMENTS: u32 = 3;
/// How long a daemon keeps dialling a server that has not answered since its connection ended
/// without a close. A server that stops closes its connections with a reason: "server shutting
/// down" promises a restart (the daemon dials until it is back), "finished" stops the daemon. A
/// connection that times out instead is a crash, a network fault, or a close that was lost; a
/// crashed server is restarted within minutes, while a finished one never answers again, so the
/// daemon stops after this long rather than dial it for ever.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);

/// True when the server closed the connection because the federation is finished.
fn federation_finished(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == SHUTDOWN_CLOSE_CODE.into() && c.reason == FINISHED_CLOSE_REASON.as_bytes())
}

/// True when the server closed the connection because a newer one with this client id replaced
/// it (another daemon with this identity connected).
fn replaced_by_another(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == REPLACED_CLOSE_CODE.into())
}

/// What `serve` makes of the end of its connection: why it ended, in words (a stop of the server
/// starts with [`SERVER_SHUTDOWN`]; the end of the federation is [`FEDERATION_FINISHED`]), and
/// whether a newer connection with this client id replaced it.
fn connection_ended(e: &quinn::ConnectionError) -> (String, bool) {
    match e {
        e if federation_finished(e) => (FEDERATION_FINISHED.into(), false),
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == SHUTDOWN_CLOSE_CODE.into() => {
            (format!("{SERVER_SHUTDOWN} ({})", String::from_utf8_lossy(&c.reason)), false)
        }
        e => (e.to_string(), replaced_by_another(e)),
    }
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

/// Runs until `shutdown` is cancelled, the server refuses this client, or the server says the
/// federation is finished ([`FINISHED_CLOSE_REASON`]: `Ok`). Refuses to start with an
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
        session,
        trainer,
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
    // A client with a ledger file starts from what it has spent.
    let session = match &ledger {
        Some(file) => session.with_ledger(file.lock().expect("ledger lock").ledger().clone()),
        None => session,
    };
    let hooks = Hooks { gate: train_gate, events: events.clone(), fault, tamper, ledger, personal_path };
    let owns_endpoint = shared_endpoint.is_none();
    let endpoint = match shared_endpoint {
        Some(e) => e,
        None => cohort_io::client_endpoint(server.is_ipv6())?,
    };
    let quic_config = cohort_io::client_config(&identity)?;
    let samples = trainer.samples();
    let mut core = Core::new(session, trainer);
    let hello = ClientMsg::Hello { device: device_name, samples };
    let emit = |e: ClientEvent| {
        if let Some(tx) = &events {
            let _ = tx.send(e);
        }
    };
    let mut attempt = 0u32;
    // Connections in a row closed because a newer one with this id replaced them.
    let mut replaced = 0u32;
    // When the last connection ended without a close from the server (see GIVE_UP_AFTER).
    let mut lost_without_word: Option<tokio::time::Instant> = None;
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
            Ok((conn, next_round, federation, run)) => {
                attempt = 0;
                lost_without_word = None;
                let key = cohort_common::dp::federation_key(&ca_fingerprint, &federation);
                core.session.connected(next_round, key, run.clone());
                match run.is_empty() {
                    true => info!(%server, federation = %escape(&federation, 64), "connected; no run in progress"),
                    false => info!(
                        %server,
                        federation = %escape(&federation, 64),
                        run = %escape(&run, 64),
                        next_round,
                        "connected"
                    ),
                }
                connections += 1;
                if connections > 1 {
                    warn_if_expiring(&certificate, config);
                }
                emit(ClientEvent::Connected);
                let (reason, was_replaced) = serve(&conn, &mut core, &hooks, &shutdown, &certificate, config).await;
                emit(ClientEvent::Disconnected { reason: reason.clone() });
                if shutdown.is_cancelled() {
                    break Ok(());
                }
                if reason == CERTIFICATE_EXPIRED {
                    break Err(ClientError::Expired(renew::expired_notice(&certificate, config)));
                }
                if reason == FEDERATION_FINISHED {
                    info!("{FINISHED_NOTICE}");
                    break Ok(());
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
                    lost_without_word = Some(tokio::time::Instant::now());
                    warn!("connection lost ({}); reconnecting", escape(&reason, 300));
                }
            }
            // Closed in its hello by a server that is ending the federation (this daemon missed
            // the close of its previous connection, or dialled as the server stopped).
            Err(ClientError::Net(NetError::Connection(e))) if federation_finished(&e) => {
                emit(ClientEvent::Disconnected { reason: FEDERATION_FINISHED.into() });
                info!("{FINISHED_NOTICE}");
                break Ok(());
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
                if let Some(since) = lost_without_word.filter(|since| since.elapsed() >= GIVE_UP_AFTER) {
                    let minutes = since.elapsed().as_secs() / 60;
                    let e = escape(&e.to_string(), 300);
                    warn!("cannot reach the server ({e}); stopping");
                    break Err(ClientError::ServerGone(format!(
                        "the connection to the server at {server} was lost without a word from it and the server has \
                         not answered for {minutes} minutes; the federation may have finished (a close that never \
                         arrived) or the server may be down: start the daemon again to dial it again"
                    )));
                }
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
) -> Result<(quinn::Connection, u64, String, String), ClientError> {
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
    let answer = tokio::time::timeout(HELLO_TIMEOUT, hello).await;
    // A server ending the federation closes connections in their hello too: its reason, rather
    // than the stream error it caused, tells the daemon to stop.
    if let Some(closed) = conn.close_reason().filter(federation_finished) {
        return Err(NetError::Connection(closed).into());
    }
    match answer {
        Err(_) => Err(NetError::Stream("the server did not answer hello in time".into()).into()),
        // A server of another version answers in this client's version (docs/protocol.md); one
        // that answers in its own predates that rule, and will not understand this client either.
        Ok(Err(NetError::Wire(WireError::Version { got }))) => {
            Err(ClientError::Refused(wire::server_version_mismatch(got)))
        }
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(ServerMsg::Welcome { client_id, next_round, federation, run, .. })) => {
            debug!(client_id = %escape(&client_id, 64), next_round, "welcomed");
            // The run names the ledger's account: one this client would refuse in a plan is
            // taken as no run (the plan itself is then declined).
            let run = if run.is_empty() || wire::check_run_name(&run).is_ok() { run } else { String::new() };
            Ok((conn, next_round, federation, run))
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
///
/// This is the session's driver: requests are read on tasks of their own and fed to the
/// session here, one at a time; its actions are carried out in order (replies sent on their
/// request's stream by tasks of their own, jobs run one at a time on a blocking thread, the
/// privacy ledger written before anything after it); job results go back to the session. A job
/// outlives the connection it started on: its result is fed to the session on the next one.
async fn serve(
    conn: &quinn::Connection,
    core: &mut Core,
    hooks: &Hooks,
    shutdown: &CancellationToken,
    certificate: &CertificateFacts,
    config: &str,
) -> (String, bool) {
    // Readers, senders and their streams live here: when the connection ends, they end with it.
    let mut readers = JoinSet::new();
    let mut senders = JoinSet::new();
    let mut streams = Streams::new();
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
                    readers.spawn(read_request(send, recv));
                }
                Err(e) => return connection_ended(&e),
            },
            Some(read) = readers.join_next(), if !readers.is_empty() => match read {
                Ok((send, Ok(msg))) => {
                    let token = core.next_token();
                    let round = msg.request_round().unwrap_or(0);
                    if let ServerMsg::Plan(plan) = &msg {
                        describe_plan(plan);
                        if let Some(tx) = &hooks.events {
                            let _ = tx.send(ClientEvent::PlanReceived { round });
                        }
                    }
                    match core.session.handle(token, msg, &mut rand::rng()) {
                        Ok(()) => {
                            streams.insert(token, (send, round));
                        }
                        // The stream is dropped unanswered.
                        Err(e) => warn!("request refused: {}", escape(&e.to_string(), 300)),
                    }
                    core.pump(&mut streams, &mut senders, hooks).await;
                }
                Ok((_, Err(e))) => warn!("request failed: {}", escape(&e.to_string(), 300)),
                Err(e) => warn!("request task failed: {e}"),
            },
            done = core.job_finished(), if core.is_running() => {
                core.job_done(done);
                core.pump(&mut streams, &mut senders, hooks).await;
            }
            Some(sent) = senders.join_next(), if !senders.is_empty() => match sent {
                Ok(Ok(Sent::Crash { round, step })) => {
                    warn!(round, ?step, "simulated crash");
                    // What a crash loses: the secure round in progress (and the connection).
                    core.session.abandon_round();
                    core.pump(&mut streams, &mut senders, hooks).await;
                    conn.close(99u32.into(), b"simulated crash");
                }
                Ok(Ok(Sent::Sent)) => {}
                Ok(Err(e)) => warn!("reply failed: {}", escape(&e.to_string(), 300)),
                Err(e) => warn!("reply task failed: {e}"),
            },
            _ = shutdown.cancelled() => {
                conn.close(0u32.into(), b"client shutting down");
                return ("shutdown".into(), false);
            }
        }
    }
}

/// The send half of each request waiting for its reply, with the request's round.
type Streams = HashMap<Token, (quinn::SendStream, u64)>;

/// Reads one request (a round plan is the whole model: it may take a while, not for ever).
async fn read_request(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (quinn::SendStream, Result<ServerMsg, NetError>) {
    let msg = tokio::time::timeout(REQUEST_TIMEOUT, recv_msg(&mut recv, MAX_FRAME_BYTES)).await.unwrap_or_else(|_| {
        Err(NetError::Stream(format!("the server's request did not arrive within {REQUEST_TIMEOUT:?}")))
    });
    (send, msg)
}

/// What became of a reply.
enum Sent {
    Sent,
    /// The fault hook crashed the client after this reply.
    Crash {
        round: u64,
        step: Step,
    },
}

/// The data owner's line for each plan: which round, what it asks, of which model, how it will
/// be collected. Everything in it comes from the server: the spec's name is escaped and capped.
fn describe_plan(plan: &cohort_common::wire::RoundPlan) {
    let model = cohort_common::model::ModelSpec::from_toml(&plan.model_spec)
        .map(|spec| escape(&spec.name, 64))
        .unwrap_or_else(|_| "(a spec this client cannot read)".into());
    let collection = match plan.secure.as_deref() {
        None => "plain (the server sees the update)".to_string(),
        Some(secure) => match &secure.dp {
            Some(dp) => format!(
                "secure, with differential privacy (clip {:.3}, noise multiplier {}, at most {} inputs unmasked together)",
                dp.clip, dp.noise_multiplier, secure.setup.min_inputs
            ),
            None => format!("secure (sums of at least {} clients)", secure.setup.min_inputs),
        },
    };
    info!(
        run = %escape(&plan.run, 64),
        round = plan.round,
        task = plan.task.purpose(),
        model = %model,
        parameters = plan.params.len(),
        epochs = plan.train.epochs,
        batch_size = plan.train.batch_size,
        "plan received: {collection}"
    );
}

/// Sends one reply (rewritten by the tamper hook, if any), reports it, and asks the fault hook.
async fn send_reply(
    mut send: quinn::SendStream,
    round: u64,
    mut reply: ClientMsg,
    hooks: Hooks,
) -> Result<Sent, NetError> {
    match &reply {
        ClientMsg::Decline { reason, .. } => warn!(round, "declining the round: {}", escape(reason, 300)),
        ClientMsg::Update(update) => {
            info!(round, loss = update.train_loss, seconds = format!("{:.2}", update.train_seconds), "trained")
        }
        _ => {}
    }
    let step = match &reply {
        ClientMsg::Update(_) => Some(Step::Update),
        ClientMsg::Join { .. } => Some(Step::Secure(Phase::Join)),
        ClientMsg::Advert { .. } => Some(Step::Secure(Phase::Advertise)),
        ClientMsg::Shares { .. } => Some(Step::Secure(Phase::ShareKeys)),
        ClientMsg::Masked { .. } => Some(Step::Secure(Phase::MaskedInput)),
        ClientMsg::Confirm { .. } => Some(Step::Secure(Phase::Confirm)),
        ClientMsg::Unmask { .. } => Some(Step::Secure(Phase::Unmask)),
        _ => None,
    };
    if let Some(tamper) = &hooks.tamper {
        tamper(round, &mut reply);
    }
    let frame = wire::encode(&reply).map_err(NetError::from)?;
    let bytes = frame.len();
    send.write_all(&frame).await.map_err(|e| NetError::Stream(e.to_string()))?;
    let _ = send.finish();
    match &reply {
        ClientMsg::Update(_) => info!(round, bytes, "sent the update (plain collection: the server sees it)"),
        ClientMsg::Masked { .. } => {
            info!(round, bytes, "sent the masked update (the server learns only the sum of the cohort's)")
        }
        _ => debug!(round, bytes, kind = reply.kind(), "sent"),
    }
    if let Some(tx) = &hooks.events {
        let _ = tx.send(ClientEvent::ReplySent { round, kind: reply.kind() });
    }
    if let (Some(fault), Some(step)) = (&hooks.fault, step) {
        if fault(round, step) {
            // Let the reply leave, then vanish without a goodbye.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            return Ok(Sent::Crash { round, step });
        }
    }
    Ok(Sent::Sent)
}

/// What a finished job hands back: the trainer (lost if the task failed, with why) and the result.
type Finished = (JobId, Result<(Box<dyn JobRunner>, JobResult), String>);

/// What the task of a job returns: the trainer and the result, or why the task failed.
type Ran = Result<(Box<dyn JobRunner>, JobResult), JoinError>;

/// The client's state across connections: the session, the trainer (away on a blocking thread
/// while it runs a job), the jobs waiting for it, and the job running.
struct Core {
    session: ClientSession,
    trainer: Option<Box<dyn JobRunner>>,
    queue: VecDeque<Job>,
    running: Option<(Job, std::time::Instant, JoinHandle<Ran>)>,
    next_token: Token,
}

impl Core {
    fn new(session: ClientSession, trainer: Box<dyn JobRunner>) -> Self {
        Self { session, trainer: Some(trainer), queue: VecDeque::new(), running: None, next_token: 0 }
    }

    /// A token no request of any connection has had.
    fn next_token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Waits for the running job (call only while [`Core::is_running`]).
    async fn job_finished(&mut self) -> Finished {
        let (job, _, handle) = self.running.as_mut().expect("a job is running");
        let id = job.id;
        match handle.await {
            Ok(Ok(done)) => (id, Ok(done)),
            Ok(Err(e)) | Err(e) => (id, Err(e.to_string())),
        }
    }

    /// Takes the trainer back and hands the result to the session.
    fn job_done(&mut self, (id, joined): Finished) {
        let (job, started, _) = self.running.take().expect("a job was running");
        let result = match joined {
            Ok((trainer, result)) => {
                self.trainer = Some(trainer);
                result
            }
            Err(e) => Err(format!("the training task failed ({e})")),
        };
        let seconds = format!("{:.2}", started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => info!(round = job.plan.round, kind = ?job.kind, seconds, "job done"),
            Err(why) => warn!(round = job.plan.round, kind = ?job.kind, "job failed: {}", escape(why, 300)),
        }
        if let Err(e) = self.session.job_done(id, result, &mut rand::rng()) {
            warn!("{e}");
        }
    }

    /// Carries out the session's actions in order (see `cohort_common::session`), then starts
    /// the next job if none is running.
    async fn pump(&mut self, streams: &mut Streams, senders: &mut JoinSet<Result<Sent, NetError>>, hooks: &Hooks) {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Reply { to, msg } => match streams.remove(&to) {
                    Some((send, round)) => {
                        senders.spawn(send_reply(send, round, msg, hooks.clone()));
                    }
                    // A request of a connection that has ended: its stream went with it.
                    None => debug!(kind = msg.kind(), "reply to a request of an earlier connection dropped"),
                },
                Action::Run(job) => self.queue.push_back(job),
                // Written (and synced) before the next action: the reply after it depends on it.
                Action::SaveLedger { ledger, round, before } => {
                    let (epsilon, budget) = (ledger.epsilon(), ledger.max_epsilon);
                    match save_ledger(hooks.ledger.clone(), ledger).await {
                        Ok(()) => info!(
                            round,
                            "privacy ledger recorded: epsilon {epsilon:.3} spent of this client's budget of {budget} \
                             ({:.3} left)",
                            (budget - epsilon).max(0.0)
                        ),
                        Err(why) => {
                            warn!(round, "{}", escape(&why, 300));
                            self.session.ledger_not_saved(round, before, &why);
                        }
                    }
                }
            }
        }
        self.start_next_job(hooks);
    }

    /// Starts the next job on a blocking thread (behind the gate, in simulations), with the
    /// trainer; after training, the personal heads are kept.
    fn start_next_job(&mut self, hooks: &Hooks) {
        if self.running.is_some() {
            return;
        }
        let Some(job) = self.queue.pop_front() else { return };
        let Some(mut trainer) = self.trainer.take() else {
            let why = "this client's trainer was lost when a training task failed; restart the daemon".to_string();
            if let Err(e) = self.session.job_done(job.id, Err(why), &mut rand::rng()) {
                warn!("{e}");
            }
            return;
        };
        let (gate, personal_path, run) = (hooks.gate.clone(), hooks.personal_path.clone(), job.clone());
        let handle = tokio::spawn(async move {
            let _permit = match gate {
                Some(g) => g.acquire_owned().await.ok(),
                None => None,
            };
            tokio::task::spawn_blocking(move || {
                let result = trainer.run(&run).map_err(|e| e.to_string());
                if run.kind == JobKind::Train && result.is_ok() {
                    keep_personal_heads(trainer.as_ref(), personal_path.as_deref());
                }
                (trainer, result)
            })
            .await
        });
        self.running = Some((job, std::time::Instant::now(), handle));
    }
}

/// Writes the privacy ledger the session charged (atomically, off the runtime); the error says
/// why it could not.
async fn save_ledger(file: Option<SharedLedger>, ledger: PrivacyLedger) -> Result<(), String> {
    let Some(file) = file else { return Err("this client has no ledger file".into()) };
    tokio::task::spawn_blocking(move || file.lock().expect("ledger lock").record(ledger).map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("the ledger task failed: {e}"))?
}

/// Writes the personal heads to the state directory (atomically), if the model has any.
/// Blocking: call it on a blocking thread.
fn keep_personal_heads(trainer: &dyn JobRunner, path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    let heads = trainer.personal_heads();
    if heads.is_empty() {
        return;
    }
    let bytes = cohort_common::model::vectors_to_safetensors(heads);
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

    fn closed(code: u32, reason: &'static str) -> quinn::ConnectionError {
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: code.into(),
            reason: reason.as_bytes().into(),
        })
    }

    /// The end of the federation stops the daemon (`drive` breaks with `Ok` on
    /// `FEDERATION_FINISHED`); any other stop of the server is a restart to wait for. Before, every
    /// close with the shutdown code was a restart: the daemon logged "reconnecting" forever.
    #[test]
    fn the_end_of_the_federation_is_told_from_a_restart() {
        let finished = connection_ended(&closed(SHUTDOWN_CLOSE_CODE, FINISHED_CLOSE_REASON));
        assert_eq!(finished, (FEDERATION_FINISHED.to_string(), false));
        let restart = connection_ended(&closed(SHUTDOWN_CLOSE_CODE, "server shutting down"));
        assert_eq!(restart, (format!("{SERVER_SHUTDOWN} (server shutting down)"), false));
        assert_ne!(restart.0, FEDERATION_FINISHED);
        // The finished reason with another code is not the end of the federation.
        let other = connection_ended(&closed(7, FINISHED_CLOSE_REASON));
        assert_ne!(other.0, FEDERATION_FINISHED);
        assert!(!other.0.starts_with(SERVER_SHUTDOWN), "{other:?}");
        let replaced = connection_ended(&closed(REPLACED_CLOSE_CODE, wire::REPLACED_CLOSE_REASON));
        assert!(replaced.1, "{replaced:?}");
    }
}
