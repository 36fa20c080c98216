//! Versioned messages and length-prefixed framing.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload; the payload is a
//! 2-byte big-endian protocol version followed by the bincode encoding of one message.
//! Every decode path is bounded by [`MAX_FRAME_BYTES`] (or a smaller cap the caller passes),
//! and rejects truncated input and trailing bytes with a typed [`WireError`].
//!
//! Tensors travel as raw little-endian `f32` bytes ([`TensorBytes`]), never element by element.
//!
//! **What never changes** (docs/protocol.md): the frame envelope (length, then version), the
//! encoding of [`ClientMsg::Hello`] (variant 0: a string, an integer) and that of
//! [`ServerMsg::Refused`] (variant 2: a string). A server reads the hello of a client of any
//! version with [`decode_hello`], and refuses one of another version with [`encode_refusal`],
//! encoded under the client's version, which that client can read whatever its version. Every
//! other message may change, and any change to the bytes of one (the golden tests in
//! `wire/golden.rs`) bumps [`PROTOCOL_VERSION`].
//!
//! The messages use types of their own ([`TrainTerms`] for the training settings), never
//! configuration types, so `wire` needs neither `train` nor candle. The secure-aggregation and
//! DP types nested in them (`secagg::SecAggSetup` and its `Quantizer`, `dp::DpPlan`, the phase
//! messages) belong to the state machines that check them; the golden tests cover their bytes.

use serde::{Deserialize, Serialize};

use crate::dp::DpPlan;
use crate::secagg::{
    JoinList, KeyAdvert, MaskedInput, SealedShares, SecAggSetup, SharedKeys, SurvivorList, UnmaskReply, UnmaskRequest,
};

mod terms;
pub use terms::{LossScope, LossTerms, LossWeighting, TrainTerms};

#[cfg(test)]
mod golden;

// What a peer is called and how its words reach a log live in `peer`, a leaf module that the
// secure-aggregation state machines use too (so `secagg` never needs `wire`).
pub use crate::peer::{check_client_id, escape, ClientId, MAX_CLIENT_ID};

/// The protocol version this build speaks. Peers with another version are refused, in their
/// own version (see [`encode_refusal`]).
///
/// Version 4: a federation hosts many runs, one after another: the plan names its run
/// ([`RoundPlan::run`]; round numbers start again at 1 in each run) and the welcome names the
/// run in progress, so a client's ledger and its one-sum-per-round rule count per run.
/// Version 3: the first under the rules of docs/protocol.md: the frame envelope, the hello and
/// the refusal are frozen, a hello of any version is read and one of another version refused
/// in that version, and every message's bytes are pinned by golden tests. The plan's training
/// settings became the protocol's own [`TrainTerms`] (whose bytes equal those of version 2's
/// `TrainConfig`), so that a configuration field can no longer change the protocol unseen.
/// Version 2: SecAgg+ sessions the clients join with nonces, adverts with seed commitments,
/// direction-bound share keys, share commitments, signed masking lists, the consistency phase,
/// DP vectors without per-segment counts, the federation id in the welcome.
pub const PROTOCOL_VERSION: u16 = 4;
/// ALPN identifier used on the QUIC connection.
pub const ALPN: &[u8] = b"cohort/1";
/// The longest run name.
pub const MAX_RUN_NAME: usize = 64;

/// A run's name: 1 to [`MAX_RUN_NAME`] letters, digits, `-`, `_` or `.`, not starting with a
/// dot. It names a directory on the server and shows in clients' logs and ledgers, so nothing
/// else is allowed. The error says what is wrong (with the name escaped).
pub fn check_run_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_RUN_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "run name `{}` is not 1 to {MAX_RUN_NAME} letters, digits, `-`, `_` or `.` (not starting with `.`)",
            escape(name, 80)
        )),
    }
}

/// The hard cap on one frame's payload: enough for models of tens of millions of parameters.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 4;

/// What can be wrong with bytes received from a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the cap of {cap} bytes")]
    Oversized { len: usize, cap: usize },
    #[error("truncated input: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    Version { got: u16 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("tensor payload of {0} bytes is not a whole number of f32 values")]
    TensorLength(usize),
    #[error("the first message of a connection must be a hello")]
    NotHello,
    #[error("expected a refusal")]
    NotRefusal,
}

/// The application close code with which a server closes a client's connection when a newer
/// connection with the same client id replaces it (in its hello or after its welcome). A client
/// daemon that sees it knows that another daemon holds its identity.
pub const REPLACED_CLOSE_CODE: u32 = 2;
/// The close reason that goes with [`REPLACED_CLOSE_CODE`].
pub const REPLACED_CLOSE_REASON: &str = "replaced by a newer connection";

/// The application close code with which a server closes its endpoint when it stops: the code of
/// every stop, a restart as well as the end of the federation. What follows a stop is in the
/// reason: [`FINISHED_CLOSE_REASON`], or any other (a restart: clients dial again).
pub const SHUTDOWN_CLOSE_CODE: u32 = 0;
/// The close reason, with [`SHUTDOWN_CLOSE_CODE`], of a server that stops because the federation
/// is finished (its last round done) and will not be back for it: a client daemon that sees it
/// stops instead of reconnecting. The reason of any other stop must differ from it.
pub const FINISHED_CLOSE_REASON: &str = "the federation is finished";

/// Raw little-endian `f32` values.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TensorBytes(#[serde(with = "serde_bytes")] Vec<u8>);

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({} values)", self.0.len() / 4)
    }
}

impl TensorBytes {
    pub fn from_f32(values: &[f32]) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Self(bytes)
    }

    /// Number of `f32` values (rounded down).
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw little-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_f32(&self) -> Result<Vec<f32>, WireError> {
        if !self.0.len().is_multiple_of(4) {
            return Err(WireError::TensorLength(self.0.len()));
        }
        Ok(self.0.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

impl From<Vec<u8>> for TensorBytes {
    /// Bytes that claim to be little-endian `f32` values; [`TensorBytes::to_f32`] checks them.
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

/// Opaque bytes (a safetensors file, a TOML document) with a compact encoding.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Blob(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

/// Everything a client needs to take part in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub round: u64,
    /// The run this round belongs to ([`check_run_name`]): a federation hosts runs one after
    /// another, each numbering its rounds from 1.
    pub run: String,
    /// The model spec as TOML; the client parses (and so validates) it.
    pub model_spec: String,
    /// The global parameters, flattened in `ParamLayout` order.
    pub params: TensorBytes,
    /// The training settings (the server's `[federation.train]`).
    pub train: TrainTerms,
    /// Seed for the client's data shuffling and dropout this round.
    pub seed: u64,
    /// Milliseconds the client has from receiving the plan to deliver its update.
    pub deadline_ms: u64,
    /// Present when the round uses secure aggregation: the client answers with a key advert.
    pub secure: Option<Box<SecurePlan>>,
    /// What the round asks of the client.
    pub task: Task,
    /// The population's label counts from the last label census, one histogram per head whose
    /// loss has `scope = "global"` (`TrainConfig::census_heads`, in model order): those heads
    /// weigh classes by these instead of the client's own counts.
    pub class_counts: Option<Vec<u64>>,
}

/// What a round asks of its cohort.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Train and send the update.
    #[default]
    Train,
    /// Send the label counts of every head with `scope = "global"`, through secure aggregation
    /// only: the server learns the population's histograms, no client's.
    CountLabels,
    /// Federated evaluation: evaluate the plan's parameters on local validation data and send
    /// one confusion matrix per head, through secure aggregation only (a client's confusion
    /// matrix reveals its label distribution).
    Evaluate,
}

impl Task {
    /// The name a secure session of this task is bound to ([`SecAggSetup::purpose`]).
    pub fn purpose(self) -> &'static str {
        match self {
            Task::Train => "train",
            Task::CountLabels => "census",
            Task::Evaluate => "evaluate",
        }
    }
}

/// How a secure round encodes and masks updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurePlan {
    pub setup: SecAggSetup,
    /// The sample count that gives a client the full weight 1 (public, so weights stay in [0, 1]).
    pub sample_cap: u64,
    /// Lengths of the parameter segments (trunk, then heads); one weight each rides in the vector.
    pub segments: Vec<usize>,
    /// Differential privacy: clip, add a share of the noise, and send the clipping indicator.
    pub dp: Option<DpPlan>,
}

impl SecurePlan {
    /// Length of the masked vector: the parameters, then one weight per segment, or with DP
    /// (where every segment divides by the public expected number of clients, so no count is
    /// summed) the clipping indicator alone.
    pub fn vector_len(params: usize, segments: usize, dp: bool) -> usize {
        if dp {
            params + 1
        } else {
            params + segments
        }
    }
}

/// A client's contribution to one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub round: u64,
    /// Number of local training examples; the FedAvg weight.
    pub samples: u64,
    /// `local - global`, flattened in `ParamLayout` order.
    pub delta: TensorBytes,
    pub train_loss: f32,
    pub train_seconds: f32,
    /// Examples behind each parameter segment (trunk, then heads): a head this client did not
    /// train has 0. Empty: every segment weighs `samples`.
    #[serde(default)]
    pub segment_samples: Vec<u64>,
}

impl Update {
    /// The examples behind each of `segments` segments.
    pub fn samples_per_segment(&self, segments: usize) -> Vec<u64> {
        if self.segment_samples.is_empty() {
            vec![self.samples; segments]
        } else {
            self.segment_samples.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to `Hello`: the connection is authorised and registered.
    /// `next_round` lets a client's privacy ledger count rounds from the one it joined at;
    /// `federation` is the server's random federation id, which the ledger binds its account to
    /// (with the fingerprint of the CA the client trusts).
    /// `run` is the run in progress ([`check_run_name`]; empty while none is), whose round
    /// `next_round` is.
    Welcome { client_id: String, server_name: String, next_round: u64, federation: String, run: String },
    /// Asks the client to train this round.
    Plan(RoundPlan),
    /// The server refuses the client (wrong version, revoked, duplicate connection).
    Refused { reason: String },
    /// Secure aggregation, phase 0 answered: who joined with which nonce (the same for all).
    Joined { round: u64, list: JoinList },
    /// Phase 2: the neighbours' key adverts.
    Adverts { round: u64, adverts: Vec<KeyAdvert> },
    /// Phase 3: the shares the neighbours sealed for this client.
    Shares { round: u64, shares: Vec<SealedShares> },
    /// Phase 4: who sent a masked input (the same list for everybody), to confirm.
    Survivors { round: u64, list: SurvivorList },
    /// Phase 5: the neighbours' confirmations of that list.
    Unmask { round: u64, request: UnmaskRequest },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on a new connection.
    Hello {
        device: String,
        samples: u64,
    },
    Update(Update),
    /// The client will not take part in this round (and says why).
    Decline {
        round: u64,
        reason: String,
    },
    /// Secure aggregation, phase 0: this client's fresh nonce for the session id.
    Join {
        round: u64,
        nonce: [u8; 32],
    },
    /// Phase 1: this client's signed keys.
    Advert {
        round: u64,
        advert: KeyAdvert,
    },
    /// Phase 2: shares sealed for the neighbours, and the adverts refused.
    Shares {
        round: u64,
        keys: SharedKeys,
    },
    /// Phase 3: the masked, quantized update.
    Masked {
        round: u64,
        input: MaskedInput,
    },
    /// Phase 4: this client's signature over the survivor list.
    Confirm {
        round: u64,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Phase 5: shares for unmasking.
    Unmask {
        round: u64,
        reply: UnmaskReply,
    },
}

impl ServerMsg {
    /// The round a request belongs to; `None` for what is no request (a welcome, a refusal).
    /// One place for the rule that every client daemon, harness and test uses.
    pub fn request_round(&self) -> Option<u64> {
        match self {
            ServerMsg::Plan(plan) => Some(plan.round),
            ServerMsg::Joined { round, .. }
            | ServerMsg::Adverts { round, .. }
            | ServerMsg::Shares { round, .. }
            | ServerMsg::Survivors { round, .. }
            | ServerMsg::Unmask { round, .. } => Some(*round),
            ServerMsg::Welcome { .. } | ServerMsg::Refused { .. } => None,
        }
    }
}

impl ClientMsg {
    /// The message's name, for logs and errors: a message in the wrong phase is described by
    /// this, never by its contents (which a peer controls and can make megabytes long).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "a hello",
            ClientMsg::Update(_) => "an update",
            ClientMsg::Decline { .. } => "a decline",
            ClientMsg::Join { .. } => "a join",
            ClientMsg::Advert { .. } => "a key advert",
            ClientMsg::Shares { .. } => "shares",
            ClientMsg::Masked { .. } => "a masked input",
            ClientMsg::Confirm { .. } => "a confirmation",
            ClientMsg::Unmask { .. } => "an unmask reply",
        }
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// How much memory bincode may claim per byte of payload. bincode counts what it decodes at its
/// in-memory size, and a `u64` can arrive as one byte, so honest messages claim up to 8 bytes
/// per byte received; twice that leaves room.
const CLAIM_PER_BYTE: usize = 16;

/// Decodes `body` with bincode's limit set from the body's own length: a length prefix inside
/// the message (a string, a byte vector) can claim at most [`CLAIM_PER_BYTE`] (rounded up to a
/// power of two) times the bytes that arrived, from 1 KiB, so a 20-byte payload that claims
/// 250 MB is refused before anything is allocated. bincode takes the limit as a const
/// parameter, hence one instance per power of two.
fn decode_limited<M: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<(M, usize), bincode::error::DecodeError> {
    fn with<M: for<'de> Deserialize<'de>, const LIMIT: usize>(
        body: &[u8],
    ) -> Result<(M, usize), bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, bincode::config::standard().with_limit::<LIMIT>())
    }
    macro_rules! by_power_of_two {
        ($($bits:literal)*) => {
            match (body.len().saturating_mul(CLAIM_PER_BYTE)).max(1 << 10).next_power_of_two().trailing_zeros() {
                $($bits => with::<M, { 1 << $bits }>(body),)*
                _ => with::<M, { 1 << 32 }>(body),
            }
        };
    }
    by_power_of_two!(10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
}

/// Encodes a message as a complete frame (header included).
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, WireError> {
    encode_as(PROTOCOL_VERSION, msg)
}

/// Encodes a message as a frame of protocol `version`: only the frozen messages are sent under
/// another version than this build's.
fn encode_as<M: Serialize>(version: u16, msg: &M) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; HEADER_BYTES];
    out.extend_from_slice(&version.to_be_bytes());
    bincode::serde::encode_into_std_write(msg, &mut out, bincode_config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::Oversized { len, cap: MAX_FRAME_BYTES });
    }
    out[..HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a frame header and checks the announced payload length against `cap`.
pub fn payload_len(header: [u8; HEADER_BYTES], cap: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    let cap = cap.min(MAX_FRAME_BYTES);
    if len > cap {
        return Err(WireError::Oversized { len, cap });
    }
    Ok(len)
}

/// The protocol version of a payload (without header): the frozen envelope, readable whatever
/// version wrote the rest.
pub fn payload_version(payload: &[u8]) -> Result<u16, WireError> {
    match payload {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(WireError::Truncated { needed: 2, got: payload.len() }),
    }
}

/// Decodes one payload (without header): version check, message, no trailing bytes.
pub fn decode_payload<M: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<M, WireError> {
    let version = payload_version(payload)?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version { got: version });
    }
    decode_body(&payload[2..])
}

/// Decodes a message body (after the version): the whole body, bounded by its own length.
fn decode_body<M: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<M, WireError> {
    let (msg, used) = decode_limited(body).map_err(|e| match e {
        bincode::error::DecodeError::UnexpectedEnd { additional } => {
            WireError::Truncated { needed: body.len() + additional, got: body.len() }
        }
        bincode::error::DecodeError::LimitExceeded => WireError::Malformed(format!(
            "a length inside the message claims more than the {} bytes that arrived",
            body.len()
        )),
        other => WireError::Malformed(other.to_string()),
    })?;
    if used != body.len() {
        return Err(WireError::Trailing(body.len() - used));
    }
    Ok(msg)
}

/// The variant number bincode writes first for an enum: [`ClientMsg::Hello`]'s. Frozen.
const HELLO_VARIANT: u32 = 0;
/// [`ServerMsg::Refused`]'s variant number. Frozen.
const REFUSED_VARIANT: u32 = 2;

/// The variant number at the start of a message body.
fn variant_of(body: &[u8]) -> Result<u32, WireError> {
    let config = bincode::config::standard().with_limit::<16>();
    match bincode::serde::decode_from_slice::<u32, _>(body, config) {
        Ok((variant, _)) => Ok(variant),
        Err(bincode::error::DecodeError::UnexpectedEnd { additional }) => {
            Err(WireError::Truncated { needed: body.len() + additional, got: body.len() })
        }
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// A hello as a server of any version reads it: the version of its frame (the version the
/// client speaks) and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub device: String,
    pub samples: u64,
}

/// Reads the first message of a connection as a hello, whatever version its frame names: the
/// hello's encoding is frozen ([`ClientMsg::Hello`]: variant 0, the device, the samples), so a
/// server can read a client of any version and answer it in that version.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, WireError> {
    let version = payload_version(payload)?;
    let body = &payload[2..];
    if variant_of(body)? != HELLO_VARIANT {
        return Err(WireError::NotHello);
    }
    let (_, device, samples): (u32, String, u64) = decode_body(body)?;
    Ok(Hello { version, device, samples })
}

/// A refusal as a frame of protocol `version`: what a server sends a client that speaks
/// `version`, which reads it as its own [`ServerMsg::Refused`] (frozen: variant 2, the reason).
pub fn encode_refusal(version: u16, reason: &str) -> Result<Vec<u8>, WireError> {
    encode_as(version, &(REFUSED_VARIANT, reason))
}

/// Reads a refusal of any version (tests, tools): the version of its frame and the reason, which
/// the peer wrote (escape it before showing it).
pub fn decode_refusal(payload: &[u8]) -> Result<(u16, String), WireError> {
    let version = payload_version(payload)?;
    let body = &payload[2..];
    if variant_of(body)? != REFUSED_VARIANT {
        return Err(WireError::NotRefusal);
    }
    let (_, reason): (u32, String) = decode_body(body)?;
    Ok((version, reason))
}

/// The reason a server gives a client that speaks protocol `client`, not this build's: both
/// versions, and what to install.
pub fn version_refusal(client: u16) -> String {
    let server = PROTOCOL_VERSION;
    if client < server {
        format!(
            "this client speaks Cohort protocol {client}, the server speaks {server}: install a cohort-client that \
             speaks protocol {server}"
        )
    } else {
        format!(
            "this client speaks Cohort protocol {client}, the server speaks {server}: the server is older than this \
             client; install a cohort-client that speaks protocol {server}, or ask the operator to upgrade the server \
             to one that speaks protocol {client}"
        )
    }
}

/// What a client says when the server answers its hello in protocol `server`, not this build's
/// (a server that predates the refusal in the client's own version).
pub fn server_version_mismatch(server: u16) -> String {
    let client = PROTOCOL_VERSION;
    format!(
        "the server speaks Cohort protocol {server}, this client speaks {client}: install a cohort-client that \
         speaks protocol {server}, or ask the operator to upgrade the server to one that speaks protocol {client}"
    )
}

/// Decodes exactly one whole frame (header and payload) from `bytes`.
pub fn decode_frame<M: for<'de> Deserialize<'de>>(bytes: &[u8], cap: usize) -> Result<M, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Truncated { needed: HEADER_BYTES, got: bytes.len() });
    }
    let len = payload_len([bytes[0], bytes[1], bytes[2], bytes[3]], cap)?;
    let rest = &bytes[HEADER_BYTES..];
    if rest.len() < len {
        return Err(WireError::Truncated { needed: len, got: rest.len() });
    }
    if rest.len() > len {
        return Err(WireError::Trailing(rest.len() - len));
    }
    decode_payload(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_update() -> ClientMsg {
        ClientMsg::Update(Update {
            round: 7,
            samples: 600,
            delta: TensorBytes::from_f32(&[1.0, -2.5, f32::MIN_POSITIVE]),
            train_loss: 0.25,
            train_seconds: 1.5,
            segment_samples: vec![600, 0],
        })
    }

    #[test]
    fn round_trips() {
        let msg = sample_update();
        let frame = encode(&msg).unwrap();
        let back: ClientMsg = decode_frame(&frame, MAX_FRAME_BYTES).unwrap();
        assert_eq!(back, msg);
        let ClientMsg::Update(u) = back else { panic!() };
        assert_eq!(u.delta.to_f32().unwrap(), vec![1.0, -2.5, f32::MIN_POSITIVE]);
    }

    #[test]
    fn tensors_are_raw_little_endian() {
        let t = TensorBytes::from_f32(&[1.0; 1000]);
        let frame = encode(&t).unwrap();
        // 4 header + 2 version + a short length prefix + 4000 raw bytes
        assert!(frame.len() <= 4000 + 4 + 2 + 9, "{}", frame.len());
    }

    #[test]
    fn rejects_every_truncation() {
        let frame = encode(&sample_update()).unwrap();
        for cut in 0..frame.len() {
            let err = decode_frame::<ClientMsg>(&frame[..cut], MAX_FRAME_BYTES).unwrap_err();
            assert!(matches!(err, WireError::Truncated { .. }), "cut {cut}: {err:?}");
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut frame = encode(&sample_update()).unwrap();
        frame.push(0);
        assert_eq!(decode_frame::<ClientMsg>(&frame, MAX_FRAME_BYTES), Err(WireError::Trailing(1)));
        // Trailing bytes inside the announced payload are caught too.
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) + 1;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode_frame::<ClientMsg>(&frame, MAX_FRAME_BYTES), Err(WireError::Trailing(1)));
    }

    #[test]
    fn rejects_oversized_before_reading() {
        let header = (u32::MAX).to_be_bytes();
        assert!(matches!(payload_len(header, MAX_FRAME_BYTES), Err(WireError::Oversized { .. })));
        let frame = encode(&sample_update()).unwrap();
        assert!(matches!(decode_frame::<ClientMsg>(&frame, 8), Err(WireError::Oversized { cap: 8, .. })));
    }

    #[test]
    fn rejects_other_versions() {
        let mut frame = encode(&sample_update()).unwrap();
        frame[4..6].copy_from_slice(&99u16.to_be_bytes());
        assert_eq!(decode_frame::<ClientMsg>(&frame, MAX_FRAME_BYTES), Err(WireError::Version { got: 99 }));
    }

    #[test]
    fn a_hello_of_another_version_is_read_and_refused_in_that_version() {
        // A client of version 1 (the frozen hello under its version).
        let frame = encode_as(1, &ClientMsg::Hello { device: "gpu".into(), samples: 42 }).unwrap();
        let payload = &frame[HEADER_BYTES..];
        assert_eq!(decode_payload::<ClientMsg>(payload), Err(WireError::Version { got: 1 }));
        let hello = decode_hello(payload).unwrap();
        assert_eq!(hello, Hello { version: 1, device: "gpu".into(), samples: 42 });

        // The server's refusal, in version 1: the old client decodes it as its own refusal.
        let reason = version_refusal(hello.version);
        assert_eq!(
            reason,
            format!(
                "this client speaks Cohort protocol 1, the server speaks {PROTOCOL_VERSION}: install a cohort-client \
                 that speaks protocol {PROTOCOL_VERSION}"
            )
        );
        let refusal = encode_refusal(hello.version, &reason).unwrap();
        assert_eq!(payload_version(&refusal[HEADER_BYTES..]), Ok(1));
        assert_eq!(decode_refusal(&refusal[HEADER_BYTES..]), Ok((1, reason.clone())));
        // Its body is this build's `ServerMsg::Refused` (the same under every version).
        let ours = encode(&ServerMsg::Refused { reason: reason.clone() }).unwrap();
        assert_eq!(refusal[HEADER_BYTES + 2..], ours[HEADER_BYTES + 2..]);

        // A newer client hears that the server is older.
        let newer = version_refusal(PROTOCOL_VERSION + 1);
        assert!(newer.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)) && newer.contains("upgrade"), "{newer}");
    }

    #[test]
    fn a_first_message_that_is_not_a_hello_is_refused_by_kind() {
        let frame = encode(&sample_update()).unwrap();
        assert_eq!(decode_hello(&frame[HEADER_BYTES..]), Err(WireError::NotHello));
        let refusal = encode(&ServerMsg::Refused { reason: "x".into() }).unwrap();
        assert_eq!(decode_hello(&refusal[HEADER_BYTES..]), Err(WireError::NotHello));
        assert_eq!(decode_refusal(&frame[HEADER_BYTES..]), Err(WireError::NotRefusal));
        for cut in 0..frame.len() - HEADER_BYTES {
            assert!(decode_hello(&frame[HEADER_BYTES..HEADER_BYTES + cut]).is_err());
        }
        // A hello whose device string claims 250 MB in a few bytes is refused before allocating.
        let mut bomb = PROTOCOL_VERSION.to_be_bytes().to_vec();
        bomb.extend_from_slice(&[0, 252]);
        bomb.extend_from_slice(&250_000_000u32.to_le_bytes());
        bomb.extend_from_slice(b"abc");
        assert!(
            matches!(decode_hello(&bomb), Err(WireError::Malformed(m)) if m.contains("claims more than the 9 bytes"))
        );
    }

    #[test]
    fn huge_length_prefix_inside_payload_is_an_error_not_an_allocation() {
        // A ByteBuf announcing 2^60 bytes inside a tiny frame.
        let mut payload = PROTOCOL_VERSION.to_be_bytes().to_vec();
        payload.push(252 + 3); // bincode varint marker for u64
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_payload::<TensorBytes>(&payload).is_err());
    }

    #[test]
    fn messages_of_every_size_decode_under_the_limit_from_their_length() {
        for n in [0usize, 1, 15, 16, 17, 1000, 65_536, 1 << 20] {
            let msg = TensorBytes::from_f32(&vec![0.5; n]);
            let frame = encode(&msg).unwrap();
            let back: TensorBytes = decode_frame(&frame, usize::MAX).unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn odd_tensor_length_is_an_error() {
        let t = TensorBytes(vec![1, 2, 3]);
        assert_eq!(t.to_f32(), Err(WireError::TensorLength(3)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_hello(&bytes);
            let _ = decode_refusal(&bytes);
            let _ = decode_frame::<ClientMsg>(&bytes, MAX_FRAME_BYTES);
            let _ = decode_frame::<ServerMsg>(&bytes, MAX_FRAME_BYTES);
            let _ = decode_payload::<ServerMsg>(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..64, byte in any::<u8>()) {
            let mut frame = encode(&sample_update()).unwrap();
            let i = idx % frame.len();
            frame[i] = byte;
            let _ = decode_frame::<ClientMsg>(&frame, MAX_FRAME_BYTES);
        }
    }
}
