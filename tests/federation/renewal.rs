//! Certificate renewal and expiry, from the client's side: `cohort-client renew` makes a new key
//! and request, the operator enrols it with `--renew`, `renew --install` puts it in place of the
//! identity files, and a real server admits the renewed client; certificates for another id, key
//! or CA are refused without touching the identity; an expired certificate is refused by the
//! server with a message that says so and how to renew, and the daemon stops instead of dialling
//! again and again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::support::*;
use cohort::client::config::ClientConfig;
use cohort::client::daemon::{ClientError, ClientEvent};
use cohort::client::renew::{RenewError, Renewal};
use cohort::common::wire::{ClientMsg, ServerMsg};
use cohort::io::{client_config, recv_msg, send_msg, Identity, NetError};
use cohort::server::pki;
use cohort::server::store::{Enrolment, Store};

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// How the client's `client.toml` names its identity.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// `identity = { cert, key, ca }`
    Files,
    /// `identity = { bundle }`
    Bundle,
}

/// An enrolled client `id` in its own directory under `root`, with a `client.toml` naming its
/// identity in `layout`; returns the path of `client.toml`.
fn enrolled_client(ca: &Ca, root: &Path, id: &str, layout: Layout) -> PathBuf {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let identity = match layout {
        Layout::Files => {
            let (key, csr) = cohort::client::keygen(id).unwrap();
            let (pem, _, _) = pki::enroll_csr(&ca.state, &csr, 30, Enrolment::New).unwrap();
            cohort::io::files::write_secret(&dir.join(format!("{id}.key")), key.as_bytes()).unwrap();
            std::fs::write(dir.join(format!("{id}.pem")), pem).unwrap();
            std::fs::copy(ca.state.ca_cert(), dir.join("ca.pem")).unwrap();
            format!("{{ cert = '{id}.pem', key = '{id}.key', ca = 'ca.pem' }}")
        }
        Layout::Bundle => {
            let bundle = pki::make_bundle(&ca.state, id, 30, Enrolment::New).unwrap();
            cohort::io::files::write_secret(&dir.join(format!("{id}.bundle.pem")), bundle.as_bytes()).unwrap();
            format!("{{ bundle = '{id}.bundle.pem' }}")
        }
    };
    let config = dir.join("client.toml");
    std::fs::write(
        &config,
        format!(
            "server = '127.0.0.1:4433'\nidentity = {identity}\n[data]\nformat = 'csv'\npath = 'd.csv'\n\
             label_column = 'label'\nclasses = 3\n"
        ),
    )
    .unwrap();
    config
}

/// The identity `client.toml` names, as the daemon loads it.
fn load_identity(config: &Path) -> Identity {
    ClientConfig::load(config).unwrap().identity.load().unwrap()
}

/// Every file in the client's directory but the pending ones, with its contents.
fn identity_files(config: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(config.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains(".renew."))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The whole renewal of a client with separate files and of one with a bundle: a pending key
/// (0600) and request, enrolment with `Enrolment::Renew`, installation, then the identity read
/// again from `client.toml` has a new serial, the same id, and completes a round on a real server
/// (with the old certificates revoked, so only the new ones can be what it admits). Guards
/// `Renewal::start`/`install` end to end, including the bundle rewrite and the file modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_client_keeps_its_id_gets_a_new_serial_and_completes_a_round() {
    let ca = Ca::new();
    let root = tempfile::tempdir().unwrap();
    let mut renewed = Vec::new();
    for (id, layout) in [("site-files", Layout::Files), ("site-bundle", Layout::Bundle)] {
        let config = enrolled_client(&ca, root.path(), id, layout);
        let old = load_identity(&config).certificate().unwrap();

        let renewal = Renewal::from_config(&config, None).unwrap();
        let started = renewal.start().unwrap();
        assert_eq!(started.current, old);
        let dir = config.parent().unwrap();
        assert_eq!(started.pending.key, dir.join(format!("{id}.renew.key")), "beside the current key");
        assert_eq!(started.pending.csr, dir.join(format!("{id}.renew.csr")));
        #[cfg(unix)]
        assert_eq!(mode(&started.pending.key), 0o600, "the new key is the owner's alone");
        let steps = renewal.instructions(&started);
        for needed in [
            format!("cohort-server enroll --state STATE --csr {id}.renew.csr --out {id}.renew.pem --renew"),
            format!("cohort-server sign --ca CA_DIR --csr {id}.renew.csr"),
            format!("cohort-server enroll --state STATE --cert {id}.renew.pem --renew"),
            format!("cohort-client renew --config {} --install {id}.renew.pem", config.display()),
            "restart the daemon".into(),
        ] {
            assert!(steps.contains(&needed), "missing `{needed}` in:\n{steps}");
        }
        // A second start keeps the pending key: it is never overwritten.
        let key_before = std::fs::read(&started.pending.key).unwrap();
        let again = renewal.start().unwrap_err();
        assert!(matches!(again, RenewError::Pending(_)) && again.to_string().contains("already pending"), "{again}");
        assert_eq!(std::fs::read(&started.pending.key).unwrap(), key_before);

        // The operator: `cohort-server enroll --csr ID.renew.csr --renew`.
        let csr = std::fs::read_to_string(&started.pending.csr).unwrap();
        let (pem, facts, revoked) = pki::enroll_csr(&ca.state, &csr, 30, Enrolment::Renew).unwrap();
        assert!(revoked.is_empty(), "renewal keeps the old certificate until it expires");

        let installed = renewal.install(pem.as_bytes()).unwrap();
        assert_eq!(installed.previous.serial, old.serial);
        assert_eq!(installed.installed, facts);
        assert!(!started.pending.key.exists() && !started.pending.csr.exists(), "the pending files are removed");
        let now = load_identity(&config);
        let certificate = now.certificate().unwrap();
        assert_eq!(certificate.client, id);
        assert_ne!(certificate.serial, old.serial);
        assert_ne!(certificate.key_hash, old.key_hash, "a new key");
        assert_eq!(certificate.serial, facts.serial);
        now.check_signed_by_ca().unwrap();
        #[cfg(unix)]
        for written in &installed.written {
            if written.to_string_lossy().ends_with(".key") || matches!(layout, Layout::Bundle) {
                assert_eq!(mode(written), 0o600, "{}", written.display());
            }
        }
        assert!(matches!(
            Renewal::from_config(&config, None).unwrap().install(pem.as_bytes()),
            Err(RenewError::Pending(_))
        ));
        renewed.push((now, old.serial));
    }

    // The old certificates are revoked: only the renewed ones can take part.
    let mut store = Store::open(&ca.state.database()).unwrap();
    for (_, old) in &renewed {
        store.revoke_certificate(old, 1).unwrap().unwrap();
    }
    let mut server = start_server(&ca, localhost(), federation(1, 2, 2), None);
    let clients: Vec<_> = renewed
        .into_iter()
        .enumerate()
        .map(|(i, (id, _))| start_client(id, server.addr, dataset(30, i as u64)))
        .collect();
    let report = next_report(&mut server, 60).await;
    assert!(report.completed && report.participants == 2, "{report:?}");
    server.task.await.unwrap().unwrap();
    RunningClient::stop_all(clients).await;
}

/// A certificate for another client id, for another key than the pending one, from another CA,
/// or already expired is refused, and the identity files are byte for byte as they were (the
/// pending key kept for the right certificate); installing without a pending renewal is refused
/// too. Guards the checks of `Renewal::install` that run before anything is written.
#[test]
fn a_certificate_for_another_id_key_or_ca_is_refused_and_changes_nothing() {
    let ca = Ca::new();
    let root = tempfile::tempdir().unwrap();
    let config = enrolled_client(&ca, root.path(), "site-1", Layout::Files);
    let renewal = Renewal::from_config(&config, None).unwrap();

    let none = renewal.install(b"whatever").unwrap_err().to_string();
    assert!(
        none.contains("no renewal of `site-1` is pending") && none.contains("cohort-client renew --config"),
        "{none}"
    );

    let started = renewal.start().unwrap();
    let before = identity_files(&config);
    let pending_csr = std::fs::read_to_string(&started.pending.csr).unwrap();

    // Another id.
    let (_, other_csr) = cohort::client::keygen("site-2").unwrap();
    let (other_id, _, _) = pki::enroll_csr(&ca.state, &other_csr, 30, Enrolment::New).unwrap();
    // The same id, another key (a request made elsewhere).
    let (_, stray_csr) = cohort::client::keygen("site-1").unwrap();
    let (other_key, _, _) = pki::enroll_csr(&ca.state, &stray_csr, 30, Enrolment::Renew).unwrap();
    // The pending request, signed by another federation's CA.
    let stranger = Ca::new();
    let (other_ca, _) = pki::sign_csr(&stranger.state, &pending_csr, 30).unwrap();
    // The pending key, certified by the right CA, but expired.
    let pending_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&started.pending.key).unwrap()).unwrap();
    let day = Duration::from_secs(86_400);
    let expired = certificate(&ca, "site-1", &pending_key, SystemTime::now() - 400 * day, SystemTime::now() - day);

    for (what, pem, says) in [
        ("another id", other_id.as_str(), "is for `site-2`, but this client is `site-1`"),
        ("another key", other_key.as_str(), "certifies another key than the pending"),
        ("another CA", other_ca.as_str(), "not signed by the configured CA"),
        ("expired", expired.as_str(), "expired on"),
        ("garbage", "not a certificate", "no CERTIFICATE block"),
    ] {
        let err = renewal.install(pem.as_bytes()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RenewError::Refused(_)), "{what}: {err:?}");
        assert!(text.contains(says) && text.ends_with("nothing was changed"), "{what}: {text}");
        assert_eq!(identity_files(&config), before, "{what}: the identity files are untouched");
        assert!(started.pending.key.exists() && started.pending.csr.exists(), "{what}: the renewal is still pending");
    }

    // The right certificate still installs afterwards.
    let (right, facts, _) = pki::enroll_csr(&ca.state, &pending_csr, 30, Enrolment::Renew).unwrap();
    renewal.install(right.as_bytes()).unwrap();
    assert_eq!(load_identity(&config).certificate().unwrap().serial, facts.serial);
}

/// A client certificate for `id` and `key`, signed by `ca`'s CA key, valid from `not_before` to
/// `not_after`, as `cohort-server enroll` would make it but for the dates.
fn certificate(ca: &Ca, id: &str, key: &rcgen::KeyPair, not_before: SystemTime, not_after: SystemTime) -> String {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.state.ca_key()).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca.state.ca_cert()).unwrap(), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, id);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let mut serial: [u8; 16] = rand::random();
    serial[0] = 0x40 | (serial[0] & 0x3f);
    params.serial_number = Some(serial.to_vec().into());
    params.signed_by(key, &issuer).unwrap().pem()
}

/// An identity for `id` whose certificate the CA signed for `not_before..not_after`.
fn identity_valid(ca: &Ca, id: &str, not_before: SystemTime, not_after: SystemTime) -> (Identity, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = certificate(ca, id, &key, not_before, not_after);
    let ca_pem = std::fs::read(ca.state.ca_cert()).unwrap();
    (Identity::from_pem(pem.as_bytes(), key.serialize_pem().as_bytes(), &ca_pem).unwrap(), pem)
}

/// Dials the server with `identity` and says hello, as the daemon does; returns why it failed.
async fn dial(identity: &Identity, addr: std::net::SocketAddr) -> NetError {
    let endpoint = cohort::io::client_endpoint(false).unwrap();
    let attempt = async {
        let conn = endpoint
            .connect_with(client_config(identity)?, addr, "localhost")
            .map_err(NetError::from)?
            .await
            .map_err(cohort::io::classify)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(cohort::io::classify)?;
        send_msg(&mut send, &ClientMsg::Hello { device: "cpu".into(), samples: 1 }).await?;
        let _ = send.finish();
        recv_msg::<ServerMsg>(&mut recv, 1 << 16).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt).await.expect("the server answered in time");
    endpoint.close(0u32.into(), b"");
    match outcome {
        Ok(reply) => panic!("the server answered {reply:?}"),
        Err(e) => e,
    }
}

/// An expired certificate (signed by the federation's CA; cohort.db could not register it, but
/// the TLS handshake refuses it first): the running server refuses it and the client's error says
/// it expired and names `cohort-client renew`; the daemon stops at once with the renew
/// instructions and never dials. A certificate that expires while its daemon is connected ends
/// the connection and the daemon with the same instructions, instead of a reconnection loop.
/// Guards `cohort_io::classify` on the server's refusal and the daemon's expiry checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_with_how_to_renew_and_the_daemon_stops() {
    logs();
    let ca = Ca::new();
    let server = start_server(&ca, localhost(), federation(3, 2, 2), None);
    let day = Duration::from_secs(86_400);
    let (expired, pem) = identity_valid(&ca, "late", SystemTime::now() - 400 * day, SystemTime::now() - day);
    let refused = pki::register(&ca.state, &pem, Enrolment::New).unwrap_err().to_string();
    assert!(refused.contains("expired"), "{refused}");

    // The server refuses it in the handshake, saying why; the daemon turns that into the renew
    // instructions (it dials only while its own clock finds the certificate valid: a certificate
    // the server finds expired then means a clock is wrong or it expired that instant).
    let err = dial(&expired, server.addr).await;
    let text = err.to_string();
    eprintln!("the server's refusal: {text}");
    assert!(err.is_unauthorized() && text.contains("certificate expired"), "{err:?}");
    assert!(text.contains("because it has expired") && text.contains("cohort-client renew"), "{text}");
    let facts = expired.certificate().unwrap();
    match cohort::client::daemon::certificate_refusal(&err, &facts, "client.toml") {
        ClientError::Expired(why) => {
            eprintln!("the client: {why}");
            assert!(why.contains("refused the certificate of `late`") && why.contains("as expired"), "{why}");
            assert!(why.contains("cohort-client renew --config client.toml"), "{why}");
        }
        other => panic!("expected an expiry error, got {other:?}"),
    }
    // Any other refusal stays a refusal.
    let stranger = Ca::new().client("late");
    let other = dial(&stranger, server.addr).await;
    let not_expired = cohort::client::daemon::certificate_refusal(&other, &facts, "client.toml");
    assert!(matches!(not_expired, ClientError::Unauthorized(_)), "{not_expired:?}");

    let mut daemon = start_client(expired, server.addr, dataset(20, 1));
    let outcome = tokio::time::timeout(Duration::from_secs(5), &mut daemon.task)
        .await
        .expect("the daemon stopped at once")
        .unwrap();
    match outcome {
        Err(ClientError::Expired(why)) => {
            eprintln!("the daemon: {why}");
            assert!(why.contains("`late`") && why.contains("expired on"), "{why}");
            assert!(why.contains("cohort-client renew --config") && why.contains("--install late.renew.pem"), "{why}");
        }
        other => panic!("expected an expiry error, got {other:?}"),
    }
    assert!(daemon.events.try_recv().is_err(), "it never connected");

    // Valid for a few seconds: admitted, then the certificate expires while connected.
    let now = SystemTime::now();
    let (brief, pem) = identity_valid(&ca, "brief", now - Duration::from_secs(60), now + Duration::from_secs(5));
    pki::register(&ca.state, &pem, Enrolment::New).unwrap();
    let mut daemon = start_client(brief, server.addr, dataset(20, 2));
    daemon.wait_for(5, |e| *e == ClientEvent::Connected).await;
    let outcome =
        tokio::time::timeout(Duration::from_secs(15), &mut daemon.task).await.expect("the daemon stopped").unwrap();
    match outcome {
        Err(ClientError::Expired(why)) => {
            assert!(why.contains("`brief`") && why.contains("cohort-client renew"), "{why}")
        }
        other => panic!("expected an expiry error, got {other:?}"),
    }
    let mut connections = 0;
    while let Ok(event) = daemon.events.try_recv() {
        connections += usize::from(event == ClientEvent::Connected);
    }
    assert_eq!(connections, 0, "it did not dial again after its certificate expired");
    server.shutdown.cancel();
    let _ = server.task.await;
}
