//! Conversions between the server's training configuration ([`TrainConfig`], read from TOML)
//! and the training terms a round plan carries ([`TrainTerms`]). They live here rather than in
//! `wire` so that the messages need neither `train` nor candle.
//!
//! Server to plan is total. Plan to client fails only where a count does not fit this machine's
//! `usize`: the client declines such a round (the ranges themselves are checked by
//! [`TrainConfig::check`], as for any plan).

use crate::train::{ClassWeighting, CountScope, LossConfig, TrainConfig};
use crate::wire::{LossScope, LossTerms, LossWeighting, TrainTerms};

/// Training terms this client cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the plan's training terms do not fit this machine: {0}")]
pub struct TermsError(String);

impl From<&TrainConfig> for TrainTerms {
    fn from(c: &TrainConfig) -> Self {
        TrainTerms {
            epochs: c.epochs as u64,
            batch_size: c.batch_size as u64,
            lr: c.lr,
            momentum: c.momentum,
            weight_decay: c.weight_decay,
            loss: (&c.loss).into(),
            head_loss: c.head_loss.iter().map(|(head, loss)| (head.clone(), loss.into())).collect(),
            head_epochs: c.head_epochs.map(|h| h as u64),
        }
    }
}

impl From<&LossConfig> for LossTerms {
    fn from(l: &LossConfig) -> Self {
        LossTerms {
            weighting: match l.weighting {
                ClassWeighting::None => LossWeighting::None,
                ClassWeighting::InverseFrequency => LossWeighting::InverseFrequency,
                ClassWeighting::EffectiveNumber => LossWeighting::EffectiveNumber,
            },
            beta: l.beta,
            focal_gamma: l.focal_gamma,
            logit_adjustment: l.logit_adjustment,
            scope: match l.scope {
                CountScope::Local => LossScope::Local,
                CountScope::Global => LossScope::Global,
            },
            recount_every: l.recount_every,
        }
    }
}

impl From<&LossTerms> for LossConfig {
    fn from(l: &LossTerms) -> Self {
        LossConfig {
            weighting: match l.weighting {
                LossWeighting::None => ClassWeighting::None,
                LossWeighting::InverseFrequency => ClassWeighting::InverseFrequency,
                LossWeighting::EffectiveNumber => ClassWeighting::EffectiveNumber,
            },
            beta: l.beta,
            focal_gamma: l.focal_gamma,
            logit_adjustment: l.logit_adjustment,
            scope: match l.scope {
                LossScope::Local => CountScope::Local,
                LossScope::Global => CountScope::Global,
            },
            recount_every: l.recount_every,
        }
    }
}

impl TryFrom<&TrainTerms> for TrainConfig {
    type Error = TermsError;

    fn try_from(t: &TrainTerms) -> Result<Self, TermsError> {
        let count = |name: &str, n: u64| {
            usize::try_from(n).map_err(|_| TermsError(format!("{name} = {n} is more than this machine can count")))
        };
        Ok(TrainConfig {
            epochs: count("epochs", t.epochs)?,
            batch_size: count("batch_size", t.batch_size)?,
            lr: t.lr,
            momentum: t.momentum,
            weight_decay: t.weight_decay,
            loss: (&t.loss).into(),
            head_loss: t.head_loss.iter().map(|(head, loss)| (head.clone(), loss.into())).collect(),
            head_epochs: t.head_epochs.map(|h| count("head_epochs", h)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every field away from its default, so a field the conversion forgot shows.
    fn config() -> TrainConfig {
        let digit = LossConfig {
            weighting: ClassWeighting::EffectiveNumber,
            beta: 0.99,
            focal_gamma: Some(2.0),
            logit_adjustment: None,
            scope: CountScope::Global,
            recount_every: Some(5),
        };
        TrainConfig {
            epochs: 3,
            batch_size: 32,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-4,
            loss: LossConfig { weighting: ClassWeighting::InverseFrequency, ..Default::default() },
            head_loss: BTreeMap::from([
                ("digit".into(), digit),
                ("colour".into(), LossConfig { logit_adjustment: Some(1.0), ..Default::default() }),
            ]),
            head_epochs: Some(2),
        }
    }

    #[test]
    fn config_to_terms_and_back_is_the_identity() {
        let c = config();
        let terms = TrainTerms::from(&c);
        assert_eq!(TrainConfig::try_from(&terms).unwrap(), c);
        let plain = TrainConfig::default();
        assert_eq!(TrainConfig::try_from(&TrainTerms::from(&plain)).unwrap(), plain);
    }

    /// Version 2 sent `TrainConfig` itself; the terms keep its bytes (as PROTOCOL_VERSION's doc
    /// says).
    #[test]
    fn terms_encode_as_version_2_encoded_the_config() {
        fn bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
            bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
        }
        let c = config();
        assert_eq!(bytes(&c), bytes(&TrainTerms::from(&c)));
    }

    #[test]
    fn counts_past_usize_are_an_error_not_a_truncation() {
        if usize::BITS >= 64 {
            return; // every u64 fits
        }
        let terms = TrainTerms { epochs: u64::MAX, ..TrainTerms::from(&config()) };
        let err = TrainConfig::try_from(&terms).unwrap_err();
        assert!(err.to_string().contains("epochs"), "{err}");
    }
}
