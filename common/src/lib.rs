//! # cohort-common
//!
//! Everything the Cohort server and client share, and no I/O at all: no sockets, clocks or
//! global randomness. Time and random sources are passed in; files are parsed from readers the
//! caller opens. The protocol logic lives here as state machines that thin async drivers in
//! `cohort-server` and `cohort-client` feed (the quinn-proto / quinn split).
//!
//! - [`wire`]: versioned messages and length-prefixed frames with a hard size cap (and length
//!   claims inside a message bounded by the payload's own length), the frozen hello and refusal
//!   that peers of any version read, golden bytes for every message. It needs neither `train` nor candle:
//!   plans carry [`wire::TrainTerms`], which [`train_terms`] converts to and from
//!   `train::TrainConfig`.
//! - [`peer`]: what a peer is called and how its words reach a log: [`peer::ClientId`], the one
//!   rule for client ids ([`peer::check_client_id`]) and [`peer::escape`], which every string a
//!   peer sent goes through before a log or an error (a leaf module; `wire` re-exports them).
//! - [`model`]: `ModelSpec` (trunk + named heads, shared or personal, from TOML), its candle
//!   build, the flat `ParamLayout` with one segment per head, and safetensors in and out (the
//!   spec travels in the file's metadata).
//! - [`train`]: local SGD over several heads at once (or FedRep's heads-then-trunk order), the
//!   per-head imbalance losses, evaluation metrics with per-class recall.
//! - [`kernels`]: the CPU training ops (dense, convolution with ReLU and pooling fused in,
//!   pooling, cross-entropy, SGD) as candle custom ops, and the [`kernels::Workspace`] a training
//!   run keeps its parameters' gradients and scratch buffers in.
//! - [`data`]: IDX and CSV loaders, partitioners for simulations.
//! - [`dp`]: clipping, Gaussian noise, adaptive clipping, the RDP accountant, the client's
//!   privacy ledger (per participation by default, bound to the federation), and the server's
//!   account ([`dp::ServerAccount`]: epsilon against model observers and against the server).
//! - [`session`]: the client's side of a round as a sans-IO state machine ([`session::ClientSession`]):
//!   requests and job results in; replies, jobs to run and privacy-ledger saves out. It owns the
//!   plan checks, the privacy ledger's admission, the SecAgg+ client sessions and every decline
//!   with its reason.
//! - [`trainer`]: the client's computation with candle ([`trainer::Trainer`]): its data per head,
//!   the model cache, the validation split and personal heads; runs the session's jobs (train,
//!   count labels, evaluate), blocking, on the driver's blocking thread; [`trainer::JobRunner`]
//!   is what the driver runs, candle's trainer or another.
//! - [`callbacks`]: the job runner for training the data owner brings
//!   ([`callbacks::CallbackTrainer`]: `fit`, `evaluate` and `label_counts` callbacks, the Python
//!   package's): parameters cut into named tensors by the layout and everything returned checked
//!   against it.
//! - [`secagg`]: SecAgg+ secure aggregation, one sans-IO state machine per role: sessions the
//!   clients join with nonces, a committee-signed survivor list, cheaters named; its attack
//!   tests play the server or a client doing its worst.
//! - [`coordinator`]: the server's whole federation as a sans-IO state machine
//!   ([`coordinator::Coordinator`]): sampling and who is left out, plans, plain and secure rounds
//!   with every phase and deadline, the label census, federated evaluation, dropouts and their
//!   reasons, decoding, DP accounting and the budget stop, the strategy step, when to stop; and
//!   the `[federation]` settings ([`coordinator::config`]). Its tests run whole federations with
//!   client sessions on a virtual clock.
//! - [`round`]: one plain round (updates checked and summed in the clear), cohort sampling and
//!   the derived seeds.
//! - [`strategy`]: server optimizers (FedAvg, FedAvgM, FedAdam, FedYogi) and their state.
//!
//! ```
//! use cohort_common::wire::{self, ClientMsg};
//! let frame = wire::encode(&ClientMsg::Hello { device: "cpu".into(), samples: 600 }).unwrap();
//! let back: ClientMsg = wire::decode_frame(&frame, wire::MAX_FRAME_BYTES).unwrap();
//! assert_eq!(back, ClientMsg::Hello { device: "cpu".into(), samples: 600 });
//! ```

pub mod callbacks;
pub mod coordinator;
pub mod data;
pub mod dp;
pub mod kernels;
pub mod model;
pub mod peer;
pub mod round;
pub mod secagg;
pub mod session;
pub mod strategy;
pub mod train;
pub mod train_terms;
pub mod trainer;
pub mod wire;

/// The bundled McMahan et al. 2017 model specs.
pub mod specs {
    /// The MNIST 2NN (784-200-200-10, 199,210 parameters).
    pub const MNIST_2NN: &str = include_str!("../specs/mnist-2nn.toml");
    /// The MNIST CNN (1,663,370 parameters).
    pub const MNIST_CNN: &str = include_str!("../specs/mnist-cnn.toml");
}
