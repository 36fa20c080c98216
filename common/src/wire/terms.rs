//! The training terms a round plan carries: protocol types of their own, not the server's
//! configuration types.
//!
//! The server reads its training settings from TOML into `train::TrainConfig`, whose serde
//! attributes (defaults, renamed enums, unknown fields refused) are about TOML. bincode encodes
//! by position and ignores all of them, so a field added to the configuration would have changed
//! every plan's bytes while [`super::PROTOCOL_VERSION`] stayed put. These types change only with
//! the protocol (the golden tests in `wire` fail when their bytes change), and they need neither
//! `train` nor candle. `cohort_common::train_terms` converts between them and `TrainConfig`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Local training hyper-parameters, as sent in every round plan: every field of
/// `train::TrainConfig`. Counts are `u64` on the wire (the same on every platform); a client
/// where one does not fit a `usize` declines the round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainTerms {
    pub epochs: u64,
    pub batch_size: u64,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// The loss of every head without an entry in `head_loss`.
    pub loss: LossTerms,
    /// Per-head losses, by head name.
    pub head_loss: BTreeMap<String, LossTerms>,
    /// FedRep's schedule: epochs of the heads alone before `epochs` of the trunk alone.
    pub head_epochs: Option<u64>,
}

/// A head's loss options: every field of `train::LossConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossTerms {
    pub weighting: LossWeighting,
    pub beta: f64,
    pub focal_gamma: Option<f64>,
    pub logit_adjustment: Option<f64>,
    pub scope: LossScope,
    pub recount_every: Option<u64>,
}

/// How a loss weighs classes (the protocol's `train::ClassWeighting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossWeighting {
    None,
    InverseFrequency,
    EffectiveNumber,
}

/// Whose label counts a loss weighs classes by (the protocol's `train::CountScope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossScope {
    Local,
    Global,
}
