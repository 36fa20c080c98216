//! What clients decode from the server: `wire::decode_frame::<ServerMsg>` on the whole input,
//! then the input as a connection's stream of frames (`payload_len` + `decode_payload`), each
//! message handed to a client as the daemon hands it: the nested data parsed (the plan's model
//! spec with `ModelSpec::from_toml`, its parameters with `TensorBytes::to_f32`, its training
//! config, secure setup and DP plan checked, the DP plan charged to a privacy ledger), then
//! `ClientSession::handle`, with every job it asks for run at once by a `Trainer` with
//! synthetic training and its result handed back, as the daemon drives them.
#![no_main]

use std::sync::Arc;

use candle_core::Device;
use cohort_common::data::Dataset;
use cohort_common::dp::{Accounting, PrivacyLedger};
use cohort_common::model::ModelSpec;
use cohort_common::secagg::{AdvertSigner, PeerVerifier, Rejection};
use cohort_common::session::{Action, ClientSession, SecureKeys};
use cohort_common::train::TrainConfig;
use cohort_common::trainer::Trainer;
use cohort_common::wire::{self, ClientMsg, ServerMsg, HEADER_BYTES, MAX_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

/// This client: the second of the cohort `c000`, `c001`, ...
const ME: &str = "c001";

/// Certificates are the client's id; a signature is `sig`.
struct Pki;

impl AdvertSigner for Pki {
    fn certificate(&self) -> Vec<u8> {
        ME.as_bytes().to_vec()
    }
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, String> {
        Ok(b"sig".to_vec())
    }
}

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

fn client() -> (ClientSession, Trainer) {
    let features: Vec<f32> = (0..24).map(|i| i as f32 / 24.0).collect();
    let data = Dataset::new(features, vec![4], vec![0, 1, 2, 0, 1, 2], 3).expect("a valid data set");
    let pki = Arc::new(Pki);
    let session = ClientSession::new(ME).with_secure_keys(SecureKeys { signer: pki.clone(), verifier: pki });
    (session, Trainer::new(ME, Arc::new(data), Device::Cpu).with_synthetic_updates())
}

/// What the client parses of a message before the session sees it; `ledger` is the
/// client's privacy ledger (with sampled-rounds accounting, which charges the rounds the
/// server's round numbers skip).
fn inspect(msg: &ServerMsg, ledger: &mut PrivacyLedger) {
    let frame = wire::encode(msg).expect("a decoded message encodes");
    let back: ServerMsg = wire::decode_frame(&frame, MAX_FRAME_BYTES).expect("an encoded message decodes");
    assert_eq!(wire::encode(&back).expect("encodes"), frame, "the message round-trips");
    // (at most 300 characters kept, each control character escaped to at most 10)
    let shown = wire::escape(&format!("{msg:?}"), 300);
    assert!(shown.chars().count() <= 3001 && !shown.chars().any(char::is_control));
    match msg {
        ServerMsg::Welcome { client_id, federation, .. } => {
            let _ = (wire::escape(client_id, 64), wire::escape(federation, 64));
        }
        ServerMsg::Refused { reason } => {
            let _ = wire::escape(reason, 300);
        }
        ServerMsg::Plan(plan) => {
            let _ = ModelSpec::from_toml(&plan.model_spec);
            if let Ok(params) = plan.params.to_f32() {
                assert_eq!(params.len(), plan.params.len());
            }
            if let Ok(train) = TrainConfig::try_from(&plan.train) {
                let _ = train.check();
            }
            if let Some(secure) = &plan.secure {
                let _ = secure.setup.check();
                if let Some(dp) = &secure.dp {
                    if dp.check().is_ok() {
                        let _ = dp.coordinate_range();
                    }
                    let _ = ledger.admit("federation", plan.round, 1, dp);
                    assert!(!(ledger.epsilon() < 0.0));
                }
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_frame::<ServerMsg>(data, MAX_FRAME_BYTES);
    let (mut session, mut trainer) = client();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let mut ledger = PrivacyLedger::new(8.0, 1e-5, Accounting::SampledRounds).expect("a valid budget");
    let mut rest = data;
    let mut token = 0;
    while rest.len() >= HEADER_BYTES {
        let header = [rest[0], rest[1], rest[2], rest[3]];
        let Ok(len) = wire::payload_len(header, MAX_FRAME_BYTES) else { return };
        let Some(payload) = rest.get(HEADER_BYTES..HEADER_BYTES + len) else { return };
        rest = &rest[HEADER_BYTES + len..];
        // A refusal of any version, as tests and tools read one (`decode_refusal`). The daemon
        // reads a refusal in its own version through `decode_payload` below, and a frame of
        // another version as `WireError::Version`.
        let _ = wire::decode_refusal(payload);
        let Ok(msg) = wire::decode_payload::<ServerMsg>(payload) else { continue };
        inspect(&msg, &mut ledger);
        if session.handle(token, msg, &mut rng).is_err() {
            continue;
        }
        token += 1;
        while let Some(action) = session.poll_action() {
            match action {
                // Replies are the frame_client_msg target's business; each one must encode.
                Action::Reply { msg, .. } => {
                    let _ = wire::encode::<ClientMsg>(&msg);
                }
                Action::Run(job) => {
                    let result = trainer.run(&job).map_err(|e| e.to_string());
                    session.job_done(job.id, result, &mut rng).expect("a job the session started");
                }
                Action::SaveLedger { .. } => unreachable!("this client keeps no ledger"),
            }
        }
    }
});
