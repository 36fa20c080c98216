//! Peer strings reach the server's log escaped: a client whose hello `device`, decline reason or
//! certificate subject holds newlines and terminal escapes cannot forge a log line ("round
//! complete round=999") or drive the operator's terminal. The whole log of a federation with such
//! a peer is captured, and every line must be one the server wrote.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort::common::wire::{ClientMsg, ServerMsg};
use cohort::io::{client_config, recv_msg, send_msg, Identity};
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use support::*;

const FORGED: &str = "\nINFO round complete round=999 accuracy=1.0\u{1b}[2J\u{1b}[31m";

/// Everything the federation logs, as the operator's terminal would receive it.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A certificate the federation's CA signed for a subject outside the id rule (as a CA operator's
/// mistake, or another tool, could), in a bundle.
fn odd_subject(ca: &Ca, cn: &str) -> Identity {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(ca.state.ca_key()).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(ca.state.ca_cert()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    Identity::from_bundle(format!("{}{}{}", key.serialize_pem(), cert.pem(), ca_pem).as_bytes()).unwrap()
}

async fn connect(identity: &Identity, addr: std::net::SocketAddr) -> quinn::Connection {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(identity).unwrap());
    endpoint.connect(addr, "localhost").unwrap().await.unwrap()
}

async fn hello(conn: &quinn::Connection, device: &str) -> ServerMsg {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send_msg(&mut send, &ClientMsg::Hello { device: device.into(), samples: 10 }).await.unwrap();
    let _ = send.finish();
    recv_msg(&mut recv, 1 << 16).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_strings_with_newlines_and_escapes_are_logged_escaped() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt().with_env_filter("info").with_ansi(false).with_writer(move || writer.clone()).init();

    let ca = Ca::new();
    let mut server = start_server(&ca, "127.0.0.1:0".parse().unwrap(), federation(1, 2, 1), None);

    // A subject with a newline and escapes, signed by the CA: refused, and logged escaped.
    let odd = connect(&odd_subject(&ca, &format!("evil{FORGED}")), server.addr).await;
    match hello(&odd, "cpu").await {
        ServerMsg::Refused { reason } => assert!(reason.contains("client id"), "{reason}"),
        other => panic!("an odd subject was not refused: {other:?}"),
    }

    // An enrolled client whose hello and decline carry forged lines.
    let hostile = connect(&ca.client("hostile"), server.addr).await;
    assert!(matches!(hello(&hostile, &format!("cpu{FORGED}")).await, ServerMsg::Welcome { .. }));
    let honest = start_client(ca.client("honest"), server.addr, dataset(20, 1));
    let (mut send, mut recv) =
        tokio::time::timeout(Duration::from_secs(30), hostile.accept_bi()).await.unwrap().unwrap();
    let _plan: ServerMsg = recv_msg(&mut recv, 256 << 20).await.unwrap();
    send_msg(&mut send, &ClientMsg::Decline { round: 1, reason: format!("busy{FORGED}") }).await.unwrap();
    let _ = send.finish();
    let report = next_report(&mut server, 60).await;
    assert!(report.completed, "{report:?}");
    let (_, why) = report.dropped.iter().find(|(id, _)| id == "hostile").expect("the decline is recorded");
    assert!(!why.contains('\n') && !why.contains('\u{1b}') && why.contains("busy\\n"), "{why}");
    server.task.await.unwrap().unwrap();
    honest.stop().await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!log.contains('\u{1b}'), "a terminal escape reached the log:\n{log}");
    for line in log.lines() {
        assert!(line.starts_with("20") && line.contains('Z'), "a line the server did not write: {line:?}\n{log}");
    }
    assert!(!log.lines().any(|l| l.starts_with("INFO round complete")), "a forged line:\n{log}");
    // The peer strings are there, escaped.
    assert!(log.contains("cpu\\nINFO round complete"), "the hello's device is logged escaped:\n{log}");
    assert!(log.contains("evil\\nINFO round complete"), "the odd subject is logged escaped:\n{log}");
    // Issue 15: the data owner sees each plan (round, task, model, size, epochs, how it is
    // collected) and what was sent.
    let plan = log.lines().find(|l| l.contains("plan received")).unwrap_or_else(|| panic!("no plan line:\n{log}"));
    for field in ["round=1", "task=\"train\"", "parameters=", "epochs=", "plain (the server sees the update)"] {
        assert!(plan.contains(field), "`{field}` missing from {plan}");
    }
    assert!(log.lines().any(|l| l.contains("sent the update") && l.contains("bytes=")), "no sent line:\n{log}");
}
