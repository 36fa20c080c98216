//! Connections: the QUIC accept loop with its bounds (a stateless retry, at most
//! [`MAX_UNWELCOMED`] connections in their handshake or hello, one greeting per identity,
//! deadlines for both), admission of registered, unrevoked certificates, the hello and welcome,
//! the [`Registry`] of welcomed clients, and the watch that closes revoked ones. It decides who
//! may connect; what connected clients are asked is the coordinator's business.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_common::wire::{self, ClientId, ServerMsg, PROTOCOL_VERSION, REPLACED_CLOSE_CODE, REPLACED_CLOSE_REASON};
use cohort_io::{escape, peer_certificate, recv_payload, send_msg, NetError};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{Admission, Store};

/// How long a new connection has for its handshake and hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long of that the TLS handshake may take (a round trip or two for an honest client).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections in their handshake or hello at once; more are refused until some finish.
const MAX_UNWELCOMED: usize = 64;
/// How often a running server looks for revocations in cohort.db.
const REVOCATION_POLL: Duration = Duration::from_millis(250);
/// A client whose certificate expires within this many days is warned about at every connection.
const EXPIRY_WARNING_DAYS: i64 = 30;
/// Cap on the messages of a connection's first exchange.
const HELLO_CAP: usize = 64 << 10;

pub(crate) struct Connected {
    conn: quinn::Connection,
    /// The serial of the certificate it connected with (revocation is by certificate).
    serial: String,
}

/// Connected, authenticated clients.
#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) clients: Mutex<HashMap<ClientId, Connected>>,
    /// Serials revoked while this server runs (as the revocation watch has read them): never
    /// registered, whenever their hello completes. Locked after `clients`, never before.
    revoked: Mutex<std::collections::HashSet<String>>,
    /// Connections past their handshake and not yet welcomed, by id: one per identity (a newer
    /// one closes the older), so one identity cannot hold the slots of connections in their hello.
    greeting: Mutex<HashMap<ClientId, quinn::Connection>>,
    pub(crate) changed: Notify,
    /// The first round a client connecting now can be sampled for (its welcome says so).
    pub(crate) next_round: AtomicU64,
    /// The run in progress (empty between runs): a welcome names it, with `next_round`.
    pub(crate) run: Mutex<String>,
}

impl Registry {
    pub(crate) fn ids(&self) -> Vec<ClientId> {
        self.clients.lock().expect("registry lock").keys().cloned().collect()
    }
    pub(crate) fn len(&self) -> usize {
        self.clients.lock().expect("registry lock").len()
    }
    pub(crate) fn connection(&self, id: &str) -> Option<quinn::Connection> {
        self.clients.lock().expect("registry lock").get(id).map(|c| c.conn.clone())
    }
    /// Registers a welcomed connection (replacing an older one of the same id); false, and
    /// nothing registered, when its certificate was revoked meanwhile.
    fn insert(&self, id: ClientId, client: Connected) -> bool {
        let mut clients = self.clients.lock().expect("registry lock");
        if self.revoked.lock().expect("revoked lock").contains(&client.serial) {
            return false;
        }
        if let Some(old) = clients.insert(id, client) {
            old.conn.close(REPLACED_CLOSE_CODE.into(), REPLACED_CLOSE_REASON.as_bytes());
        }
        drop(clients);
        self.changed.notify_waiters();
        true
    }
    /// Closes and forgets the connections of these certificates; returns their ids and serials.
    fn close_revoked(&self, serials: &[String]) -> Vec<(ClientId, String)> {
        let mut clients = self.clients.lock().expect("registry lock");
        self.revoked.lock().expect("revoked lock").extend(serials.iter().cloned());
        let revoked: Vec<(ClientId, String)> = clients
            .iter()
            .filter(|(_, c)| serials.contains(&c.serial))
            .map(|(id, c)| (id.clone(), c.serial.clone()))
            .collect();
        for (id, _) in &revoked {
            if let Some(c) = clients.remove(id) {
                c.conn.close(3u32.into(), b"certificate revoked");
            }
        }
        if !revoked.is_empty() {
            self.changed.notify_waiters();
        }
        revoked
    }

    /// Notes a connection of `id` in its hello, closing an older one of the same id; the guard
    /// forgets it when dropped.
    fn greet(&self, id: &str, conn: &quinn::Connection) -> Greeting<'_> {
        let older = self.greeting.lock().expect("greeting lock").insert(id.to_string(), conn.clone());
        if let Some(older) = older.filter(|c| c.stable_id() != conn.stable_id()) {
            older.close(REPLACED_CLOSE_CODE.into(), REPLACED_CLOSE_REASON.as_bytes());
        }
        Greeting { registry: self, id: id.to_string(), stable_id: conn.stable_id() }
    }

    /// Closes every welcomed connection and every one in its hello with `code` and `reason`, at
    /// once: `Endpoint::close` only queues the close for each connection's driver task, and a
    /// connection whose last handle is dropped before its driver ran closes with code 0 and no
    /// reason, which a daemon takes for a restart (and dials a finished server for ever). Closing
    /// each handle here settles the reason before any handle goes.
    pub(crate) fn close_all(&self, code: u32, reason: &[u8]) {
        for client in self.clients.lock().expect("registry lock").values() {
            client.conn.close(code.into(), reason);
        }
        for conn in self.greeting.lock().expect("greeting lock").values() {
            conn.close(code.into(), reason);
        }
    }

    fn remove(&self, id: &str, stable_id: usize) {
        let mut clients = self.clients.lock().expect("registry lock");
        if clients.get(id).is_some_and(|c| c.conn.stable_id() == stable_id) {
            clients.remove(id);
            drop(clients);
            self.changed.notify_waiters();
        }
    }
}

/// A connection in its hello, forgotten by the registry when this is dropped.
struct Greeting<'a> {
    registry: &'a Registry,
    id: ClientId,
    stable_id: usize,
}

impl Drop for Greeting<'_> {
    fn drop(&mut self) {
        let mut greeting = self.registry.greeting.lock().expect("greeting lock");
        if greeting.get(&self.id).is_some_and(|c| c.stable_id() == self.stable_id) {
            greeting.remove(&self.id);
        }
    }
}
/// Accepts connections: at most [`MAX_UNWELCOMED`] at a time in their handshake or hello (more
/// are refused at once, so a flood cannot hold the server's memory), each then served by
/// [`serve_connection`].
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    store: Arc<Mutex<Store>>,
    federation: Arc<str>,
    stop: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let unwelcomed = Arc::new(Semaphore::new(MAX_UNWELCOMED));
    let mut refused_busy = 0u64;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // A stateless retry first (one round trip, no state kept): a slot then goes only
                // to an address that answers, so spoofed Initial packets cannot fill them.
                if !incoming.remote_address_validated() && incoming.may_retry() {
                    let _ = incoming.retry();
                    continue;
                }
                let Ok(permit) = unwelcomed.clone().try_acquire_owned() else {
                    refused_busy += 1;
                    if refused_busy.is_power_of_two() {
                        warn!(
                            remote = %incoming.remote_address(),
                            "{MAX_UNWELCOMED} connections are in their handshake or hello: refusing new ones ({refused_busy} so \
                             far); a flood of connections that never say hello looks like this"
                        );
                    }
                    incoming.refuse();
                    continue;
                };
                let (registry, store, stop, federation) =
                    (registry.clone(), store.clone(), stop.clone(), federation.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        // The error can hold the peer's own words (its close reason): escaped.
                        r = serve_connection(incoming, permit, registry, store, federation) => if let Err(e) = r {
                            info!("connection refused or lost: {}", escape(&e.to_string(), 300))
                        },
                        _ = stop.cancelled() => {}
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = stop.cancelled() => break,
        }
    }
    tasks.shutdown().await;
}

/// Closes the live connections of certificates revoked in cohort.db (by `cohort-server revoke`
/// while the server runs) within [`REVOCATION_POLL`]; a revoked client is then neither
/// registered nor sampled again, and its reconnections are refused.
pub(crate) async fn watch_revocations(database: std::path::PathBuf, registry: Arc<Registry>, stop: CancellationToken) {
    let store = match Store::open(&database) {
        Ok(store) => Arc::new(Mutex::new(store)),
        Err(e) => {
            warn!("cannot watch for revocations ({e}); a revoked client is refused when it reconnects");
            return;
        }
    };
    // Revocations are numbered: poll past the last one seen (from the first, so the registry
    // knows every serial revoked before this server started too).
    let mut after = 0;
    let mut ticks = tokio::time::interval(REVOCATION_POLL);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let store = store.clone();
        let revoked =
            tokio::task::spawn_blocking(move || store.lock().expect("store lock").revocations_after(after)).await;
        match revoked {
            Ok(Ok(revocations)) => {
                let Some(&(last, _)) = revocations.last() else { continue };
                after = last;
                let serials: Vec<String> = revocations.into_iter().map(|(_, serial)| serial).collect();
                for (id, serial) in registry.close_revoked(&serials) {
                    warn!(client = %id, serial = %serial, "certificate revoked: connection closed; the client is not sampled again");
                }
            }
            Ok(Err(e)) => warn!("cannot read revocations: {e}"),
            Err(_) => return,
        }
    }
}

/// Refuses a connection on the stream of its hello, with a reason the client shows its owner,
/// encoded in protocol `version` (the client's: the refusal is frozen, so a client of any
/// version reads it).
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, version: u16, reason: String) -> NetError {
    if let Ok(frame) = wire::encode_refusal(version, &reason) {
        let _ = send.write_all(&frame).await;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(3u32.into(), b"refused");
    NetError::Unauthorized(reason)
}

/// Authenticates a connection (the TLS handshake already checked the certificate against the
/// CA and its validity), reads the hello under any version and refuses another version in the
/// client's own (docs/protocol.md), admits only a registered, unrevoked certificate with a valid
/// client id, exchanges hello/welcome within [`HELLO_TIMEOUT`], and keeps the client registered
/// while it stays connected.
async fn serve_connection(
    incoming: quinn::Incoming,
    unwelcomed: tokio::sync::OwnedSemaphorePermit,
    registry: Arc<Registry>,
    store: Arc<Mutex<Store>>,
    federation: Arc<str>,
) -> Result<(), NetError> {
    let remote = incoming.remote_address();
    let (conn, id, serial, device, samples) = tokio::time::timeout(HELLO_TIMEOUT, async {
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming)
            .await
            .map_err(|_| {
                NetError::Stream(format!("{remote} did not finish its handshake within {HANDSHAKE_TIMEOUT:?}"))
            })?
            .map_err(|e| {
                debug!(%remote, "handshake failed: {}", escape(&e.to_string(), 300));
                NetError::Connection(e)
            })?;
        let cert = peer_certificate(&conn);
        let _greeting = cert.as_ref().ok().map(|cert| registry.greet(&cert.client, &conn));
        let (send, mut recv) = conn.accept_bi().await.map_err(NetError::Connection)?;
        // The hello first, read under whatever version its frame names (the hello is frozen):
        // every refusal below then goes out in the client's own version, which it can read.
        let hello = match wire::decode_hello(&recv_payload(&mut recv, HELLO_CAP).await?) {
            Ok(hello) => hello,
            Err(e) => {
                conn.close(1u32.into(), b"expected hello");
                return Err(NetError::Stream(format!("{remote} did not start with a hello: {e}")));
            }
        };
        if hello.version != PROTOCOL_VERSION {
            let reason = wire::version_refusal(hello.version);
            let who = cert.as_ref().map_or_else(|_| "a client".to_string(), |c| format!("client `{}`", c.client));
            warn!(%remote, device = %escape(&hello.device, 80), "refusing {who}: {reason}");
            return Err(refuse(&conn, send, hello.version, reason).await);
        }
        let cert = match cert {
            Ok(cert) => cert,
            Err(e) => {
                let reason = format!("the certificate from {remote} was refused: {e}");
                return Err(refuse(&conn, send, hello.version, reason).await);
            }
        };
        let admission = {
            let store = store.lock().expect("store lock");
            store.admission(&cert)
        };
        let (id, serial) = (cert.client.clone(), cert.serial.clone());
        let refusal = match admission {
            Ok(Admission::Admitted) => None,
            Ok(Admission::Unregistered) => Some(format!(
                "certificate {serial} of `{id}` is not registered in this federation; the operator enrols the client \
                 (`cohort-server enroll`) or registers a certificate signed by an offline CA (`cohort-server enroll \
                 --cert`)"
            )),
            Ok(Admission::Revoked { at }) => Some(format!(
                "certificate {serial} of `{id}` was revoked on {}; the client needs a new certificate from the \
                 operator (`cohort-client renew`, then `cohort-server enroll --renew`)",
                cohort_io::utc(at)
            )),
            Err(e) => Some(format!("the server cannot check the certificate of `{id}` now ({e}); try again later")),
        };
        // (Admitted after the hello: a certificate revoked while its hello was slow is refused.)
        if let Some(reason) = refusal {
            return Err(refuse(&conn, send, hello.version, reason).await);
        }
        let days_left = (cert.not_after - cohort_io::unix_now()) / 86_400;
        if days_left < EXPIRY_WARNING_DAYS {
            warn!(
                client = %id,
                "certificate {serial} expires on {} ({days_left} days); the client renews with `cohort-client renew` \
                 and the operator signs the request with `cohort-server enroll --renew`",
                cohort_io::utc(cert.not_after)
            );
        }
        let _ = store.lock().expect("store lock").client_seen(&id, cohort_io::unix_now());
        let mut send = send;
        // The run and its next round, read under the run's lock as the server sets them.
        let (run, next_round) = {
            let run = registry.run.lock().expect("registry lock");
            (run.clone(), registry.next_round.load(Ordering::Relaxed))
        };
        let welcome = ServerMsg::Welcome {
            client_id: id.clone(),
            server_name: "cohort".into(),
            next_round,
            federation: federation.to_string(),
            run,
        };
        send_msg(&mut send, &welcome).await?;
        let _ = send.finish();
        Ok((conn, id, serial, hello.device, hello.samples))
    })
    .await
    .map_err(|_| {
        NetError::Stream(format!("{remote} did not finish its handshake and hello within {HELLO_TIMEOUT:?}"))
    })??;
    drop(unwelcomed);
    cohort_io::welcomed(&conn);
    info!(client = %id, %remote, device = %escape(&device, 80), samples, "client connected");
    if !registry.insert(id.clone(), Connected { conn: conn.clone(), serial: serial.clone() }) {
        conn.close(3u32.into(), b"certificate revoked");
        return Err(NetError::Unauthorized(format!("certificate {serial} of `{id}` was revoked during its hello")));
    }
    let reason = conn.closed().await;
    registry.remove(&id, conn.stable_id());
    info!(client = %id, "client disconnected: {}", escape(&reason.to_string(), 200));
    Ok(())
}
