//! What the server decodes from clients: `wire::decode_frame::<ClientMsg>` on the whole input,
//! then the input as a stream of frames (`payload_len` + `decode_payload`, as the server reads a
//! connection), each frame also as a connection's first, a hello of any version
//! (`wire::decode_hello`), and for every message that decodes what the server does with it
//! first: the round trip through `encode`, the escaped text it logs, the round's checks of an
//! update (`Round::handle_update`), a decline, and the secure session's checks of a join and of
//! a key advert (`SecAggServer::handle_join`, `handle_advert`).
#![no_main]

use std::time::{Duration, Instant};

use cohort_common::round::{PlainCollector, Round};
use cohort_common::secagg::quantize::Quantizer;
use cohort_common::secagg::{PeerVerifier, Rejection, SecAggParams, SecAggServer, SecAggSetup};
use cohort_common::wire::{self, ClientMsg, HEADER_BYTES, MAX_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;

/// The sender: the second of a cohort of four.
const ME: &str = "c001";
const ROUND: u64 = 3;
const SEGMENTS: [usize; 2] = [3, 2];

fn cohort() -> Vec<String> {
    (0..4).map(|i| format!("c{i:03}")).collect()
}

/// Certificates are the client's id; a signature is accepted when it is `sig`.
struct Pki;

impl PeerVerifier for Pki {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Rejection> {
        if certificate != client.as_bytes() {
            return Err(Rejection::Certificate("another client's certificate".into()));
        }
        self.verify_signature(certificate, message, signature).map_err(Rejection::Signature)
    }
    fn verify_signature(&self, _certificate: &[u8], _message: &[u8], signature: &[u8]) -> Result<(), String> {
        if signature == b"sig" {
            Ok(())
        } else {
            Err("bad signature".into())
        }
    }
}

fn secure_server() -> SecAggServer {
    let setup = SecAggSetup {
        round: ROUND,
        purpose: "train".into(),
        params: SecAggParams {
            threshold: 2,
            degree: 3,
            dropout_tolerance: 0.3,
            quantizer: Quantizer { bits: 32, clip: 1.0, scale: 1000.0, wrap: false },
        },
        cohort: cohort(),
        vector_len: 7,
        min_inputs: 2,
    };
    SecAggServer::new(setup).expect("a valid setup")
}

fn handle(msg: ClientMsg) {
    let frame = wire::encode(&msg).expect("a decoded message encodes");
    let back: ClientMsg = wire::decode_frame(&frame, MAX_FRAME_BYTES).expect("an encoded message decodes");
    assert_eq!(wire::encode(&back).expect("encodes"), frame, "the message round-trips");
    // What the server logs of a message it did not expect.
    // (at most 300 characters kept, each control character escaped to at most 10)
    let shown = wire::escape(&format!("{msg:?}"), 300);
    assert!(shown.chars().count() <= 3001 && !shown.chars().any(char::is_control));
    match msg {
        ClientMsg::Hello { device, .. } => {
            let shown = wire::escape(&device, 64);
            assert!(shown.chars().count() <= 641 && !shown.chars().any(char::is_control));
        }
        ClientMsg::Update(update) => {
            let now = Instant::now();
            let collector = Box::new(PlainCollector::new(&SEGMENTS));
            let mut round = Round::new(ROUND, cohort(), now, Duration::from_secs(1), &SEGMENTS, 1, collector);
            let _ = round.handle_update(ME, update);
            if let Ok(outcome) = round.finish() {
                assert_eq!(outcome.aggregate.mean_delta.len(), SEGMENTS.iter().sum::<usize>());
                assert!(outcome.aggregate.mean_delta.iter().all(|v| v.is_finite()));
            }
        }
        ClientMsg::Decline { reason, .. } => {
            let now = Instant::now();
            let collector = Box::new(PlainCollector::new(&SEGMENTS));
            let mut round = Round::new(ROUND, cohort(), now, Duration::from_secs(1), &SEGMENTS, 1, collector);
            round.handle_dropout(ME, wire::escape(&reason, 300));
            assert!(round.finish().is_err());
        }
        ClientMsg::Join { nonce, .. } => {
            let mut server = secure_server();
            let _ = server.handle_join(ME, nonce);
        }
        ClientMsg::Advert { advert, .. } => {
            let mut server = secure_server();
            for (i, id) in cohort().iter().enumerate() {
                server.handle_join(id, [i as u8; 32]).expect("joins");
            }
            server.close_joins().expect("everybody joined");
            let _ = server.handle_advert(ME, advert, &Pki);
        }
        ClientMsg::Shares { .. } | ClientMsg::Masked { .. } | ClientMsg::Confirm { .. } | ClientMsg::Unmask { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The whole input as one frame.
    let whole = wire::decode_frame::<ClientMsg>(data, MAX_FRAME_BYTES);
    if data.len() >= HEADER_BYTES {
        let payload = wire::decode_payload::<ClientMsg>(&data[HEADER_BYTES..]);
        if let Ok(whole) = &whole {
            let payload = payload.expect("a frame's payload decodes");
            assert_eq!(wire::encode(whole).unwrap(), wire::encode(&payload).unwrap(), "a frame decodes as its payload");
        }
    }
    // The input as a connection: frames one after another, each capped at what a client may send.
    let mut rest = data;
    while rest.len() >= HEADER_BYTES {
        let header = [rest[0], rest[1], rest[2], rest[3]];
        let Ok(len) = wire::payload_len(header, 64 << 10) else { return };
        let Some(payload) = rest.get(HEADER_BYTES..HEADER_BYTES + len) else { return };
        rest = &rest[HEADER_BYTES + len..];
        // A connection's first frame is read as a hello of any version, before anything else.
        if let Ok(hello) = wire::decode_hello(payload) {
            let _ = wire::escape(&hello.device, 100);
        }
        if let Ok(msg) = wire::decode_payload::<ClientMsg>(payload) {
            handle(msg);
        }
    }
});
