//! # cohort-io
//!
//! The I/O that the server and client drivers share, so neither holds a copy (`cohort-common`
//! has none):
//!
//! - [`Identity`]: a certificate chain, its private key and the operator's CA, read from PEM
//!   (separate files or one bundle), with errors that say which part is wrong.
//! - [`server_config`] / [`client_config`]: QUIC over rustls with ring's provider, TLS 1.3
//!   only, ALPN `cohort/1`, and mutual TLS: the server refuses, in the handshake, any client
//!   whose certificate the operator's CA did not sign or that is not valid now. The server's
//!   transport lets a client open one stream (its hello) and park 256 KiB before [`welcomed`]
//!   opens the window, and buffers no datagrams; [`classify`] tells a refused certificate (by
//!   its TLS alert) from a lost connection.
//! - [`CertificateFacts`]: what a client certificate certifies (id under the one id rule,
//!   serial, key hash, validity), of a connection ([`peer_certificate`]) or a file
//!   ([`check_issued_by`]); [`utc`] prints its dates.
//! - [`send_msg`] / [`recv_msg`]: one framed message on a QUIC stream, with a size cap.
//! - [`secagg_keys`]: signing key adverts with the certificate key, checking peers against the CA
//!   (a certificate that passed is remembered for five minutes). [`escape`] (from
//!   `cohort_common::wire`) makes peer strings safe for logs.
//! - [`files`]: data sets named in configuration files (IDX or CSV, gzipped or not), TOML
//!   configuration read with the file named in every error, atomic writes, and secrets that are
//!   mode 0600 from the moment they exist.
//!
//! ```no_run
//! # async fn demo(identity: cohort_io::Identity) -> Result<(), cohort_io::NetError> {
//! let endpoint = quinn::Endpoint::server(cohort_io::server_config(&identity)?, "127.0.0.1:0".parse().unwrap())
//!     .map_err(cohort_io::NetError::Bind)?;
//! # Ok(()) }
//! ```

pub mod files;
pub mod secagg_keys;

use std::sync::Arc;
use std::time::Duration;

pub use cohort_common::wire::check_client_id;
use cohort_common::wire::{self, WireError, HEADER_BYTES};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Serialize};

/// What can go wrong on the transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("identity: {0}")]
    Identity(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot bind the UDP socket: {0}")]
    Bind(std::io::Error),
    /// Binding a given address failed: the message names it and what to do.
    #[error("cannot listen on {addr} (UDP): {source}; is another server (or another program) using that port? Choose another `listen` address or stop it")]
    BindAddress { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer refused our certificate (TLS 1.3 tells the client only when a stream fails).
    #[error("not authorised: {0}")]
    Unauthorized(String),
    #[error("stream closed by the peer before a whole message arrived")]
    Closed,
    #[error("stream: {0}")]
    Stream(String),
    #[error("the peer sent a bad message: {0}")]
    Wire(#[from] WireError),
}

impl NetError {
    fn from_read(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => NetError::Closed,
            quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => classify(c),
            quinn::ReadExactError::ReadError(other) => NetError::Stream(other.to_string()),
        }
    }

    /// True when the failure says the peer refused our certificate.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, NetError::Unauthorized(_))
    }
}

/// A string a peer controls, made safe for a log line (the rule lives with the messages).
pub use cohort_common::wire::escape;

/// The TLS alert a connection error carries, if it is one: QUIC reports alert `n` as the
/// transport error code `0x100 + n` (RFC 9001, 4.8).
fn tls_alert(e: &quinn::ConnectionError) -> Option<u64> {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return None,
    };
    (0x100..0x200).contains(&code).then(|| code - 0x100)
}

/// TLS alerts that mean the peer refused our certificate, or that we refused the peer's, become
/// `Unauthorized`, with what to do. The alert code decides, never the text that comes with it
/// (the peer writes its own; ours is rustls's wording, which may change).
pub fn classify(e: quinn::ConnectionError) -> NetError {
    const CERTIFICATE_EXPIRED: u64 = 45;
    // bad_certificate, unsupported_certificate, certificate_revoked, certificate_unknown,
    // unknown_ca, access_denied, certificate_required (RFC 8446, 6).
    const REFUSED: [u64; 7] = [42, 43, 44, 46, 48, 49, 116];
    let text = escape(&e.to_string(), 300);
    // decrypt_error: a signature in the certificate chain does not verify (a CA of the same name
    // that did not sign it).
    const DECRYPT_ERROR: u64 = 51;
    // A local transport error carrying a certificate alert is our own TLS stack refusing the
    // peer's certificate: the alert code decides, as for the peer's alerts.
    if let (quinn::ConnectionError::TransportError(_), Some(alert)) = (&e, tls_alert(&e)) {
        if alert == CERTIFICATE_EXPIRED || alert == DECRYPT_ERROR || REFUSED.contains(&alert) {
            return NetError::Unauthorized(format!(
                "this client refused the server's certificate ({text}); is the CA certificate in its identity the \
                 federation's, and the server name right?"
            ));
        }
    }
    match tls_alert(&e) {
        Some(CERTIFICATE_EXPIRED) => NetError::Unauthorized(format!(
            "the peer refused this certificate because it has expired ({text}); renew it: run `cohort-client renew \
             --config CLIENT.toml` and have the operator sign the request"
        )),
        Some(alert) if REFUSED.contains(&alert) => NetError::Unauthorized(format!(
            "the peer refused this certificate ({text}); is it signed by the operator's CA, registered and not \
             revoked?"
        )),
        _ => NetError::Connection(e),
    }
}

/// A certificate chain, its key and the CA that peers must be signed by.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("chain", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key(), ca: self.ca.clone() }
    }
}

impl Identity {
    /// From PEM texts: the certificate (chain), its private key and the CA certificate.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, NetError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| NetError::Identity(format!("certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(NetError::Identity("the certificate file holds no CERTIFICATE block".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| NetError::Identity(format!("private key PEM: {e}")))?;
        let ca = CertificateDer::from_pem_slice(ca_pem)
            .map_err(|e| NetError::Identity(format!("CA certificate PEM: {e}")))?;
        Ok(Self { chain, key, ca })
    }

    /// From one bundle: a private key, the certificate, then the CA certificate.
    pub fn from_bundle(pem: &[u8]) -> Result<Self, NetError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| NetError::Identity(format!("bundle: {e}")))?;
        if certs.len() < 2 {
            return Err(NetError::Identity(format!(
                "the bundle holds {} certificates; it needs the client certificate and then the CA certificate",
                certs.len()
            )));
        }
        let key =
            PrivateKeyDer::from_pem_slice(pem).map_err(|e| NetError::Identity(format!("bundle private key: {e}")))?;
        let ca = certs[certs.len() - 1].clone();
        Ok(Self { chain: certs[..certs.len() - 1].to_vec(), key, ca })
    }

    /// SHA-256 of the CA certificate (DER), in hex: which federation's CA this identity trusts.
    pub fn ca_fingerprint(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.ca.as_ref()).as_ref())
    }

    /// The subject CN of this identity's certificate.
    pub fn subject(&self) -> Result<String, NetError> {
        subject_cn(&self.chain[0])
    }

    /// The id, serial, key hash and validity of this identity's certificate.
    pub fn certificate(&self) -> Result<CertificateFacts, NetError> {
        CertificateFacts::from_der(&self.chain[0])
    }

    /// Checks that the certificate was signed by the CA and is within its validity period.
    pub fn check_signed_by_ca(&self) -> Result<(), NetError> {
        check_issued_by(&self.chain[0], &self.ca).map(|_| ())
    }

    fn roots(&self) -> Result<rustls::RootCertStore, NetError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| NetError::Tls(format!("CA certificate: {e}")))?;
        Ok(roots)
    }
}

/// The subject common name of a DER certificate.
pub fn subject_cn(cert: &CertificateDer<'_>) -> Result<String, NetError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| NetError::Identity(format!("cannot parse the certificate: {e}")))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| NetError::Identity("the certificate subject has no common name".into()))?;
    Ok(cn.to_string())
}

/// What the server's registry knows a client certificate by: the client id (its subject CN,
/// checked against [`check_client_id`]), its serial, the SHA-256 of its public key, and its
/// validity in Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub client: String,
    /// The serial number in lowercase hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// SHA-256 of the SubjectPublicKeyInfo, in hex: a revoked key cannot be certified again.
    pub key_hash: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl CertificateFacts {
    /// From a DER certificate; the id must follow the client id rule.
    pub fn from_der(cert: &CertificateDer<'_>) -> Result<Self, NetError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| NetError::Identity(format!("cannot parse the certificate: {e}")))?;
        let client = subject_cn(cert)?;
        check_client_id(&client).map_err(|e| NetError::Identity(format!("certificate subject: {e}")))?;
        let validity = parsed.validity();
        Ok(Self {
            client,
            serial: hex(parsed.tbs_certificate.raw_serial()),
            key_hash: key_hash(parsed.public_key().raw),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }
}

/// Checks that `leaf` is a client certificate that `ca` signed and that is valid now; returns
/// what it certifies.
pub fn check_issued_by(leaf: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> Result<CertificateFacts, NetError> {
    let (_, ca) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| NetError::Identity(format!("cannot parse the CA certificate: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| NetError::Identity(format!("cannot parse the certificate: {e}")))?;
    parsed.verify_signature(Some(ca.public_key())).map_err(|_| {
        NetError::Identity(format!(
            "the certificate was not signed by the configured CA ({}); enrol with this federation's operator",
            ca.subject()
        ))
    })?;
    if parsed.is_ca() {
        return Err(NetError::Identity("that is a CA certificate, not a client's".into()));
    }
    let client_auth = parsed.extended_key_usage().ok().flatten().is_none_or(|eku| eku.value.client_auth);
    if !client_auth {
        return Err(NetError::Identity("the certificate is not for client authentication (extended key usage)".into()));
    }
    let facts = CertificateFacts::from_der(leaf)?;
    let now = unix_now();
    if now >= facts.not_after {
        return Err(NetError::Identity(format!(
            "the certificate of `{}` expired on {}; renew it: run `cohort-client renew --config CLIENT.toml` and have \
             the operator sign the request",
            facts.client,
            utc(facts.not_after)
        )));
    }
    if now < facts.not_before {
        return Err(NetError::Identity(format!(
            "the certificate of `{}` is valid only from {}; is this machine's clock right?",
            facts.client,
            utc(facts.not_before)
        )));
    }
    Ok(facts)
}

/// The first certificate of a PEM text.
pub fn certificate_from_pem(pem: &[u8]) -> Result<CertificateDer<'static>, NetError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| NetError::Identity("the file holds no CERTIFICATE block".into()))?
        .map_err(|e| NetError::Identity(format!("certificate PEM: {e}")))
}

/// A UTC date and time for people, from Unix seconds ("Nov 30 08:28:08 2026 +00:00").
pub fn utc(unix: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(unix).map_or_else(|_| format!("{unix} (Unix time)"), |t| t.to_string())
}

/// SHA-256 of a SubjectPublicKeyInfo (DER), in hex: how a key is named in the registry, and what
/// the data owner and the operator compare to know that the request signed is the one made.
pub fn key_hash(subject_public_key_info: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, subject_public_key_info).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The unread data a client's connection may hold at the server before its hello is answered:
/// the hello fits many times over, and a hundred connections that never say hello pin at most
/// 25 MiB between them.
pub const HELLO_RECEIVE_WINDOW: u32 = 256 << 10;
/// The receive window of a welcomed connection: models of a few MB cross in one window.
pub const RECEIVE_WINDOW: u32 = 64 << 20;
/// The receive window of one stream.
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(3)));
    t.max_idle_timeout(Some(Duration::from_secs(15).try_into().expect("15 s fits a VarInt")));
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(RECEIVE_WINDOW.into());
    t.send_window(64 << 20);
    // The protocol sends no datagrams: buffer none (quinn's default keeps 1.25 MB of unread
    // ones per connection, which a peer could fill).
    t.datagram_receive_buffer_size(None);
    t
}

/// The server's side of a connection, sized to what the protocol uses: a client opens one
/// stream, the hello (every later stream is the server's, see [`welcomed`]), no unidirectional
/// ones, and until its hello is answered it may park only [`HELLO_RECEIVE_WINDOW`] bytes.
fn server_transport() -> Arc<quinn::TransportConfig> {
    let mut t = transport();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.receive_window(HELLO_RECEIVE_WINDOW.into());
    Arc::new(t)
}

/// A client's connection after the server welcomed it: it may open no more streams, and the
/// receive window grows to carry updates (on the streams the server opens and reads).
pub fn welcomed(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(0u32.into());
    conn.set_receive_window(RECEIVE_WINDOW.into());
}

/// Socket buffers for QUIC's UDP sockets. A round moves a model to and an update from every
/// cohort member at once; the kernel's default (about 200 KiB) overflows under such a burst and
/// the lost packets cost retransmission timeouts. Capped by `net.core.rmem_max` / `wmem_max`.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// A UDP socket bound to `addr` with large buffers, for `quinn::Endpoint::new`.
pub fn bind_udp(addr: std::net::SocketAddr) -> Result<std::net::UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(NetError::Bind)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into()).map_err(|source| NetError::BindAddress { addr, source })?;
    Ok(socket.into())
}

/// A QUIC server endpoint on `addr` (large socket buffers, mutual TLS as [`server_config`]).
pub fn server_endpoint(identity: &Identity, addr: std::net::SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let socket = bind_udp(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| NetError::Tls("no async runtime".into()))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server_config(identity)?), socket, runtime)
        .map_err(NetError::Bind)
}

/// A QUIC client endpoint (large socket buffers); each connection brings its identity's
/// [`client_config`] (`connect_with`). Simulations share one among many clients, since every
/// endpoint holds megabytes of receive buffers.
pub fn client_endpoint(ipv6: bool) -> Result<quinn::Endpoint, NetError> {
    let any: std::net::SocketAddr =
        if ipv6 { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") };
    let socket = bind_udp(any)?;
    let runtime = quinn::default_runtime().ok_or_else(|| NetError::Tls("no async runtime".into()))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).map_err(NetError::Bind)
}

/// The server's QUIC configuration: its certificate, and client certificates required and
/// checked against the CA in the handshake.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, NetError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots()?), provider())
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| NetError::Tls(format!("server certificate and key: {e}")))?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(server_transport());
    Ok(config)
}

/// The client's QUIC configuration: the server must present a certificate signed by the CA,
/// and the client presents its own.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, NetError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| NetError::Tls(format!("client certificate and key: {e}")))?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// The certificate an authenticated client presented, with its id checked against the client
/// id rule: a CA-signed certificate whose subject is empty, 10 kB long or full of control
/// characters is refused here, whatever the CA signed.
pub fn peer_certificate(conn: &quinn::Connection) -> Result<CertificateFacts, NetError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| NetError::Identity("the peer presented no certificate".into()))?;
    let leaf = certs.first().ok_or_else(|| NetError::Identity("the peer presented an empty chain".into()))?;
    CertificateFacts::from_der(leaf)
}

/// `cohort-server runs | head` closes the pipe before the table is written: `println!` then
/// panics ("failed printing to stdout: Broken pipe"). Unix tools end quietly there, so do ours:
/// that one panic exits with status 141 (128 + SIGPIPE, what a shell reports for a tool killed
/// by it) and no message; every other panic reaches the default hook.
pub fn end_quietly_on_a_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (else `default_filter`), in colour
/// only on a terminal; and a closed standard output ends the program quietly (see
/// [`end_quietly_on_a_closed_stdout`]). For the binaries' `main`.
pub fn init_logging(default_filter: &str) {
    end_quietly_on_a_closed_stdout();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: the signals on which both daemons stop cleanly.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Writes one framed message.
pub async fn send_msg<M: Serialize>(send: &mut quinn::SendStream, msg: &M) -> Result<(), NetError> {
    let frame = wire::encode(msg)?;
    send.write_all(&frame).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(c) => classify(c),
        other => NetError::Stream(other.to_string()),
    })
}

/// Reads one framed message of at most `cap` payload bytes; the length is checked before
/// anything is allocated.
pub async fn recv_msg<M: DeserializeOwned>(recv: &mut quinn::RecvStream, cap: usize) -> Result<M, NetError> {
    Ok(wire::decode_payload(&recv_payload(recv, cap).await?)?)
}

/// Reads one frame's payload (version and message, not decoded) of at most `cap` bytes; the
/// length is checked before anything is allocated. For a hello, which is decoded under any
/// version (`wire::decode_hello`).
pub async fn recv_payload(recv: &mut quinn::RecvStream, cap: usize) -> Result<Vec<u8>, NetError> {
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(NetError::from_read)?;
    let len = wire::payload_len(header, cap)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(NetError::from_read)?;
    Ok(payload)
}

/// Seconds since the Unix epoch (0 on a clock before it): certificate lifetimes and the times
/// cohort.db and `live.json` record.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15: a port in use said only "cannot bind the UDP socket: Address in use".
    #[test]
    fn a_listen_address_in_use_is_named() {
        let taken = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind_udp(addr).unwrap_err().to_string();
        assert!(err.contains(&addr.to_string()) && err.contains("listen"), "{err}");
    }
}
