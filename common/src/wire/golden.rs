//! Golden bytes: every variant of [`ClientMsg`] and [`ServerMsg`], with every nested type filled
//! with fixed values away from their defaults, encoded and compared with a hex constant. Any
//! change to the encoding of a message fails one of these tests, so it cannot happen unseen.
//!
//! The constants hold the message body (what follows the version in a frame): bumping
//! [`PROTOCOL_VERSION`] changes none of them. The frozen parts (the envelope, the hello, the
//! refusal) are checked as whole frames in `frozen_*` below, and those constants never change.
//!
//! When a change is intended: bump [`PROTOCOL_VERSION`] (docs/protocol.md says why and how),
//! then print the new constants with
//! `cargo test -p cohort-common --lib wire::golden -- --ignored --nocapture print_golden_bytes`
//! (a failing test also shows its actual hex).

use std::collections::BTreeMap;

use super::*;
use crate::secagg::quantize::Quantizer;
use crate::secagg::shamir::Share;
use crate::secagg::{Confirmation, Joined, MaskingList, SecAggParams};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

/// The bincode body of `msg` in a frame of this build (after length and version).
fn body<M: Serialize>(msg: &M) -> Vec<u8> {
    encode(msg).expect("encodes")[HEADER_BYTES + 2..].to_vec()
}

/// 32 distinct bytes from `first` on, so a reordered or truncated array shows.
fn bytes32(first: u8) -> [u8; 32] {
    std::array::from_fn(|i| first.wrapping_add(i as u8))
}

fn check<M>(name: &str, msg: &M, golden: &str)
where
    M: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let actual = hex(&body(msg));
    assert!(
        actual == golden,
        "the encoding of {name} changed. If that is intended, it is a protocol change: bump PROTOCOL_VERSION \
         (docs/protocol.md) and replace the golden hex of {name} with\n{actual}\n"
    );
    let back: M = decode_frame(&encode(msg).unwrap(), MAX_FRAME_BYTES).expect("the golden sample decodes");
    assert_eq!(&back, msg, "{name} does not round-trip");
}

fn train_terms() -> TrainTerms {
    let digit = LossTerms {
        weighting: LossWeighting::EffectiveNumber,
        beta: 0.99,
        focal_gamma: Some(2.0),
        logit_adjustment: None,
        scope: LossScope::Global,
        recount_every: Some(5),
    };
    let colour = LossTerms {
        weighting: LossWeighting::None,
        beta: 0.5,
        focal_gamma: None,
        logit_adjustment: Some(1.5),
        scope: LossScope::Local,
        recount_every: None,
    };
    TrainTerms {
        epochs: 3,
        batch_size: 300,
        lr: 0.0125,
        momentum: 0.9,
        weight_decay: 1e-4,
        loss: LossTerms { weighting: LossWeighting::InverseFrequency, ..colour },
        head_loss: BTreeMap::from([("colour".into(), colour), ("digit".into(), digit)]),
        head_epochs: Some(2),
    }
}

fn setup() -> SecAggSetup {
    SecAggSetup {
        round: 7,
        purpose: "evaluate".into(),
        params: SecAggParams {
            threshold: 3,
            degree: 4,
            dropout_tolerance: 0.25,
            quantizer: Quantizer { bits: 64, clip: 2.5, scale: 1e6, wrap: true },
        },
        cohort: vec!["alice".into(), "bob".into(), "carol".into()],
        vector_len: 1000,
        min_inputs: 2,
    }
}

fn dp_plan() -> DpPlan {
    DpPlan {
        clip: 1.5,
        per_segment: true,
        noise_multiplier: 1.1,
        count_noise: 0.75,
        min_survivors: 4,
        sampling_rate: 0.01,
        expected_clients: 12.5,
    }
}

fn plan() -> RoundPlan {
    RoundPlan {
        round: 7,
        run: "trial-2".into(),
        model_spec: "name = 't'".into(),
        params: TensorBytes::from_f32(&[0.5, -1.0]),
        train: train_terms(),
        seed: 0x0123_4567_89ab_cdef,
        deadline_ms: 20_000,
        secure: Some(Box::new(SecurePlan {
            setup: setup(),
            sample_cap: 600,
            segments: vec![2, 1],
            dp: Some(dp_plan()),
        })),
        task: Task::Evaluate,
        class_counts: Some(vec![3, 0, 5]),
    }
}

fn advert() -> KeyAdvert {
    KeyAdvert {
        client: "alice".into(),
        cipher_pk: bytes32(0x10),
        mask_pk: bytes32(0x40),
        seed_commitment: bytes32(0x80),
        certificate: vec![0x30, 0x82, 0x01],
        signature: vec![0xaa, 0xbb],
    }
}

fn sealed() -> SealedShares {
    SealedShares {
        from: "alice".into(),
        to: "bob".into(),
        ciphertext: vec![1, 2, 3, 4, 5],
        seed_commitment: bytes32(0x20),
        key_commitment: bytes32(0x60),
    }
}

fn masking() -> MaskingList {
    MaskingList { client: "carol".into(), masked_with: vec!["alice".into(), "bob".into()], signature: vec![0xcc] }
}

/// The encoding of the frozen hello and refusal, as whole frames. These never change, in any
/// version (docs/protocol.md): a peer of any version reads them.
const FROZEN_HELLO_V2: &str = "0000000a00020003637075fbe803";
const FROZEN_REFUSAL_V1: &str = "0000000b00010207676f20686f6d65";

macro_rules! golden {
    ($($test:ident: $msg:expr => $golden:expr;)*) => {
        $(
            #[test]
            fn $test() {
                check(stringify!($test), &$msg, $golden);
            }
        )*

        /// Every sample's name and current hex.
        fn all_samples() -> Vec<(&'static str, String)> {
            vec![$((stringify!($test), hex(&body(&$msg))),)*]
        }
    };
}

golden! {
    client_hello: ClientMsg::Hello { device: "cpu".into(), samples: 1_000 } => "0003637075fbe803";
    client_update: ClientMsg::Update(Update {
        round: 7,
        samples: 600,
        delta: TensorBytes::from_f32(&[1.0, -2.5]),
        train_loss: 0.25,
        train_seconds: 1.5,
        segment_samples: vec![600, 0],
    }) => "0107fb5802080000803f000020c00000803e0000c03f02fb580200";
    client_decline: ClientMsg::Decline { round: 7, reason: "no budget".into() } => "0207096e6f20627564676574";
    client_join: ClientMsg::Join { round: 7, nonce: bytes32(0x01) } => "03070102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20";
    client_advert: ClientMsg::Advert { round: 7, advert: advert() } => "040705616c696365101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f0330820102aabb";
    client_shares: ClientMsg::Shares {
        round: 7,
        keys: SharedKeys { sealed: vec![sealed()], refused: vec!["dave".into()] },
    } => "05070105616c69636503626f62050102030405202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f010464617665";
    client_masked: ClientMsg::Masked {
        round: 7,
        input: MaskedInput { values: vec![1, 1 << 40, 3], invalid_shares_from: vec!["bob".into()], masking: masking() },
    } => "060719080100000000000000000000000001000003000000000000000103626f62056361726f6c0205616c69636503626f6201cc";
    client_confirm: ClientMsg::Confirm { round: 7, signature: vec![0xde, 0xad] } => "070702dead";
    client_unmask: ClientMsg::Unmask {
        round: 7,
        reply: UnmaskReply {
            seed_shares: vec![("alice".into(), Share { x: 1, y: vec![9, 8] })],
            key_shares: vec![("dave".into(), Share { x: 4, y: vec![7] })],
        },
    } => "08070105616c69636501020908010464617665040107";
    server_welcome: ServerMsg::Welcome {
        client_id: "alice".into(),
        server_name: "cohort".into(),
        next_round: 12,
        federation: "f00d".into(),
        run: "trial-2".into(),
    } => "0005616c69636506636f686f72740c046630306407747269616c2d32";
    server_plan: ServerMsg::Plan(plan()) => "010707747269616c2d320a6e616d65203d20277427080000003f000080bf03fb2c019a9999999999893fcdccccccccccec3f2d431cebe2361a3f01000000000000e03f0001000000000000f83f00000206636f6c6f757200000000000000e03f0001000000000000f83f000005646967697402ae47e17a14aeef3f010000000000000040000101050102fdefcdab8967452301fb204e0107086576616c756174650304000000000000d03f4000000000000004400000000080842e41010305616c69636503626f62056361726f6cfbe80302fb580202020101000000000000f83f019a9999999999f13f000000000000e83f047b14ae47e17a843f0000000000002940020103030005";
    server_plan_plain: ServerMsg::Plan(RoundPlan {
        secure: None,
        task: Task::CountLabels,
        class_counts: None,
        train: TrainTerms { head_loss: BTreeMap::new(), head_epochs: None, ..train_terms() },
        ..plan()
    }) => "010707747269616c2d320a6e616d65203d20277427080000003f000080bf03fb2c019a9999999999893fcdccccccccccec3f2d431cebe2361a3f01000000000000e03f0001000000000000f83f00000000fdefcdab8967452301fb204e000100";
    server_refused: ServerMsg::Refused { reason: "go home".into() } => "0207676f20686f6d65";
    server_joined: ServerMsg::Joined {
        round: 7,
        list: JoinList { joined: vec![Joined { client: "alice".into(), nonce: bytes32(0x02) }] },
    } => "03070105616c69636502030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021";
    server_adverts: ServerMsg::Adverts { round: 7, adverts: vec![advert()] } => "04070105616c696365101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f0330820102aabb";
    server_shares: ServerMsg::Shares { round: 7, shares: vec![sealed()] } => "05070105616c69636503626f62050102030405202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f";
    server_survivors: ServerMsg::Survivors {
        round: 7,
        list: SurvivorList { survivors: vec!["alice".into(), "carol".into()] },
    } => "06070205616c696365056361726f6c";
    server_unmask: ServerMsg::Unmask {
        round: 7,
        request: UnmaskRequest {
            confirmations: vec![Confirmation { client: "bob".into(), certificate: vec![0x30], signature: vec![0x55] }],
            masking: vec![masking()],
        },
    } => "07070103626f620130015501056361726f6c0205616c69636503626f6201cc";
    task_train: Task::Train => "00";
}

/// Fails to compile when a message gains a variant: give it a golden test above, and add it here.
#[allow(dead_code)]
fn every_variant_has_a_golden_test(client: &ClientMsg, server: &ServerMsg) -> [&'static str; 2] {
    let client = match client {
        ClientMsg::Hello { .. } => "client_hello",
        ClientMsg::Update(_) => "client_update",
        ClientMsg::Decline { .. } => "client_decline",
        ClientMsg::Join { .. } => "client_join",
        ClientMsg::Advert { .. } => "client_advert",
        ClientMsg::Shares { .. } => "client_shares",
        ClientMsg::Masked { .. } => "client_masked",
        ClientMsg::Confirm { .. } => "client_confirm",
        ClientMsg::Unmask { .. } => "client_unmask",
    };
    let server = match server {
        ServerMsg::Welcome { .. } => "server_welcome",
        ServerMsg::Plan(_) => "server_plan",
        ServerMsg::Refused { .. } => "server_refused",
        ServerMsg::Joined { .. } => "server_joined",
        ServerMsg::Adverts { .. } => "server_adverts",
        ServerMsg::Shares { .. } => "server_shares",
        ServerMsg::Survivors { .. } => "server_survivors",
        ServerMsg::Unmask { .. } => "server_unmask",
    };
    [client, server]
}

/// Prints every golden constant as it is now (`--ignored --nocapture`), for an intended change.
#[test]
#[ignore]
fn print_golden_bytes() {
    for (name, hex) in all_samples() {
        println!("{name}: {hex}");
    }
    println!(
        "frozen hello (v2 frame): {}",
        hex(&encode_as(2, &ClientMsg::Hello { device: "cpu".into(), samples: 1_000 }).unwrap())
    );
    println!("frozen refusal (v1 frame): {}", hex(&encode_refusal(1, "go home").unwrap()));
}

#[test]
fn frozen_hello_reads_in_every_version() {
    // A version-2 client's hello (the bytes version 2 sent) reads as a hello of version 2.
    let frame = unhex(FROZEN_HELLO_V2);
    let hello = decode_hello(&frame[HEADER_BYTES..]).unwrap();
    assert_eq!(hello, Hello { version: 2, device: "cpu".into(), samples: 1_000 });
    // This build's hello has the same body, and only the version differs in its frame.
    let ours = encode(&ClientMsg::Hello { device: "cpu".into(), samples: 1_000 }).unwrap();
    assert_eq!(hex(&ours[HEADER_BYTES + 2..]), hex(&frame[HEADER_BYTES + 2..]), "the hello's encoding is frozen");
    assert_eq!(ours[..HEADER_BYTES], frame[..HEADER_BYTES]);
    assert_eq!(decode_hello(&ours[HEADER_BYTES..]).unwrap().version, PROTOCOL_VERSION);
}

#[test]
fn frozen_refusal_reads_in_every_version() {
    let frame = encode_refusal(1, "go home").unwrap();
    assert_eq!(hex(&frame), FROZEN_REFUSAL_V1, "the refusal's encoding is frozen");
    assert_eq!(decode_refusal(&frame[HEADER_BYTES..]).unwrap(), (1, "go home".to_string()));
    // Under this build's version it is this build's own `ServerMsg::Refused`.
    let ours = encode_refusal(PROTOCOL_VERSION, "go home").unwrap();
    assert_eq!(ours, encode(&ServerMsg::Refused { reason: "go home".into() }).unwrap());
}
