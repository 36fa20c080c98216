//! Server optimizers applied to the averaged client update.
//!
//! The round produces the weighted mean of the clients' deltas (`local - global`); a
//! [`Strategy`] turns it into the next global model. FedAvg with `server_lr = 1` is McMahan et
//! al.'s weighted model average; FedAvgM adds server momentum (Hsu et al. 2019); FedAdam and
//! FedYogi are the adaptive optimizers of Reddi et al. 2021, "Adaptive Federated Optimization".
//! Their state (momentum, second moments) is part of the federation: [`Strategy::state`] and
//! [`Strategy::restore`] let the server keep it with each checkpoint, so a restart resumes the
//! optimizer where it stopped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategyError {
    #[error("strategy `{name}`: {problem}")]
    Config { name: &'static str, problem: String },
    #[error("update has {got} values, the model has {expected}")]
    Length { got: usize, expected: usize },
    #[error("saved optimizer state: {0}")]
    State(String),
}

fn one() -> f64 {
    1.0
}
fn momentum() -> f64 {
    0.9
}
fn adaptive_lr() -> f64 {
    0.01
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.99
}
fn tau() -> f64 {
    1e-3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum StrategyConfig {
    FedAvg {
        #[serde(default = "one")]
        server_lr: f64,
    },
    FedAvgM {
        #[serde(default = "one")]
        server_lr: f64,
        #[serde(default = "momentum")]
        momentum: f64,
    },
    FedAdam {
        #[serde(default = "adaptive_lr")]
        server_lr: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
    FedYogi {
        #[serde(default = "adaptive_lr")]
        server_lr: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::FedAvg { server_lr: 1.0 }
    }
}

impl StrategyConfig {
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::FedAvg { .. } => "fedavg",
            StrategyConfig::FedAvgM { .. } => "fedavgm",
            StrategyConfig::FedAdam { .. } => "fedadam",
            StrategyConfig::FedYogi { .. } => "fedyogi",
        }
    }

    /// Checks the ranges and makes the optimizer for a model of `params` parameters.
    pub fn build(&self, params: usize) -> Result<Strategy, StrategyError> {
        let name = self.name();
        let bad = |problem: String| Err(StrategyError::Config { name, problem });
        let (lr, extra): (f64, Vec<(&str, f64, f64, f64)>) = match *self {
            StrategyConfig::FedAvg { server_lr } => (server_lr, vec![]),
            StrategyConfig::FedAvgM { server_lr, momentum } => (server_lr, vec![("momentum", momentum, 0.0, 1.0)]),
            StrategyConfig::FedAdam { server_lr, beta1, beta2, tau }
            | StrategyConfig::FedYogi { server_lr, beta1, beta2, tau } => (
                server_lr,
                vec![("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0), ("tau", tau, f64::MIN_POSITIVE, 1.0)],
            ),
        };
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("server_lr = {lr} must be > 0"));
        }
        for (field, v, lo, hi) in extra {
            if !(v >= lo && v < hi) {
                return bad(format!("{field} = {v} must be in [{lo}, {hi})"));
            }
        }
        let second = matches!(self, StrategyConfig::FedAdam { .. } | StrategyConfig::FedYogi { .. });
        let tau_sq = match *self {
            StrategyConfig::FedAdam { tau, .. } | StrategyConfig::FedYogi { tau, .. } => (tau * tau) as f32,
            _ => 0.0,
        };
        Ok(Strategy {
            config: self.clone(),
            first: if matches!(self, StrategyConfig::FedAvg { .. }) { Vec::new() } else { vec![0.0; params] },
            second: if second { vec![tau_sq; params] } else { Vec::new() },
            params,
        })
    }
}

/// A server optimizer with its state.
#[derive(Debug, Clone)]
pub struct Strategy {
    config: StrategyConfig,
    first: Vec<f32>,
    second: Vec<f32>,
    params: usize,
}

impl Strategy {
    pub fn config(&self) -> &StrategyConfig {
        &self.config
    }

    /// The optimizer's state by name (`first`: momentum or first moment; `second`: second
    /// moment); empty for FedAvg, which has none.
    pub fn state(&self) -> BTreeMap<String, Vec<f32>> {
        [("first", &self.first), ("second", &self.second)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(name, v)| (name.to_string(), v.clone()))
            .collect()
    }

    /// Continues from a saved [`Strategy::state`]: the same vectors, each of the model's length.
    pub fn restore(&mut self, state: &BTreeMap<String, Vec<f32>>) -> Result<(), StrategyError> {
        let expected = self.state();
        if state.keys().ne(expected.keys()) {
            return Err(StrategyError::State(format!(
                "it holds {:?}, strategy `{}` keeps {:?}",
                state.keys().collect::<Vec<_>>(),
                self.config.name(),
                expected.keys().collect::<Vec<_>>()
            )));
        }
        if let Some((name, v)) = state.iter().find(|(_, v)| v.len() != self.params || v.iter().any(|x| !x.is_finite()))
        {
            return Err(StrategyError::State(format!(
                "`{name}` has {} values (non-finite ones refused), the model has {}",
                v.len(),
                self.params
            )));
        }
        for (name, v) in state {
            let slot = if name == "first" { &mut self.first } else { &mut self.second };
            slot.copy_from_slice(v);
        }
        Ok(())
    }

    /// Moves `global` by the averaged client delta.
    pub fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]) -> Result<(), StrategyError> {
        if global.len() != self.params || mean_delta.len() != self.params {
            return Err(StrategyError::Length { got: mean_delta.len().min(global.len()), expected: self.params });
        }
        match self.config {
            StrategyConfig::FedAvg { server_lr } => {
                let lr = server_lr as f32;
                for (x, d) in global.iter_mut().zip(mean_delta) {
                    *x += lr * d;
                }
            }
            StrategyConfig::FedAvgM { server_lr, momentum } => {
                let (lr, mu) = (server_lr as f32, momentum as f32);
                for ((x, d), m) in global.iter_mut().zip(mean_delta).zip(&mut self.first) {
                    *m = mu * *m + d;
                    *x += lr * *m;
                }
            }
            StrategyConfig::FedAdam { server_lr, beta1, beta2, tau }
            | StrategyConfig::FedYogi { server_lr, beta1, beta2, tau } => {
                let yogi = matches!(self.config, StrategyConfig::FedYogi { .. });
                let (lr, b1, b2, tau) = (server_lr as f32, beta1 as f32, beta2 as f32, tau as f32);
                for (((x, d), m), v) in global.iter_mut().zip(mean_delta).zip(&mut self.first).zip(&mut self.second) {
                    *m = b1 * *m + (1.0 - b1) * d;
                    let d2 = d * d;
                    *v = if yogi { *v - (1.0 - b2) * d2 * (*v - d2).signum() } else { b2 * *v + (1.0 - b2) * d2 };
                    *x += lr * *m / (v.sqrt() + tau);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_with_unit_rate_takes_the_mean_model() {
        let mut s = StrategyConfig::default().build(2).unwrap();
        let mut g = vec![1.0, 2.0];
        s.apply(&mut g, &[0.5, -1.0]).unwrap();
        assert_eq!(g, vec![1.5, 1.0]);
        assert!(s.apply(&mut g, &[0.5]).is_err());
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let mut s = StrategyConfig::FedAvgM { server_lr: 1.0, momentum: 0.5 }.build(1).unwrap();
        let mut g = vec![0.0];
        s.apply(&mut g, &[1.0]).unwrap();
        s.apply(&mut g, &[1.0]).unwrap();
        assert_eq!(g, vec![1.0 + 1.5]);
    }

    #[test]
    fn fedadam_follows_reddi_et_al() {
        let (lr, b1, b2, tau) = (0.1f32, 0.9f32, 0.99f32, 1e-3f32);
        let mut s =
            StrategyConfig::FedAdam { server_lr: lr as f64, beta1: b1 as f64, beta2: b2 as f64, tau: tau as f64 }
                .build(1)
                .unwrap();
        let mut g = vec![0.0];
        s.apply(&mut g, &[2.0]).unwrap();
        let m = (1.0 - b1) * 2.0;
        let v = b2 * tau * tau + (1.0 - b2) * 4.0;
        assert!((g[0] - lr * m / (v.sqrt() + tau)).abs() < 1e-6, "{}", g[0]);
    }

    #[test]
    fn fedyogi_moves_in_the_direction_of_the_update() {
        let mut s = StrategyConfig::FedYogi { server_lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 }.build(2).unwrap();
        let mut g = vec![0.0, 0.0];
        s.apply(&mut g, &[1.0, -1.0]).unwrap();
        assert!(g[0] > 0.0 && g[1] < 0.0);
    }

    #[test]
    fn a_restored_optimizer_continues_exactly() {
        let config = StrategyConfig::FedAdam { server_lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 };
        let deltas = [[0.5f32, -1.0, 0.25], [0.1, 0.2, -0.3], [-0.4, 0.0, 0.9]];
        let mut straight = config.build(3).unwrap();
        let mut global = vec![0.0f32; 3];
        for d in &deltas {
            straight.apply(&mut global, d).unwrap();
        }
        // Stop after one round, keep the state, start a new optimizer from it.
        let mut first = config.build(3).unwrap();
        let mut resumed_global = vec![0.0f32; 3];
        first.apply(&mut resumed_global, &deltas[0]).unwrap();
        let saved = first.state();
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["first", "second"]);
        let mut resumed = config.build(3).unwrap();
        resumed.restore(&saved).unwrap();
        for d in &deltas[1..] {
            resumed.apply(&mut resumed_global, d).unwrap();
        }
        assert_eq!(resumed_global, global, "bit for bit");

        assert!(StrategyConfig::default().build(3).unwrap().state().is_empty(), "FedAvg keeps nothing");
        let momentum = StrategyConfig::FedAvgM { server_lr: 1.0, momentum: 0.9 };
        let err = momentum.build(3).unwrap().restore(&saved).unwrap_err().to_string();
        assert!(err.contains("fedavgm") && err.contains("second"), "{err}");
        let short = BTreeMap::from([("first".to_string(), vec![0.0f32; 2])]);
        assert!(momentum.build(3).unwrap().restore(&short).is_err());
        let nan = BTreeMap::from([("first".to_string(), vec![f32::NAN; 3])]);
        assert!(momentum.build(3).unwrap().restore(&nan).is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(StrategyConfig::FedAvg { server_lr: 0.0 }.build(1).is_err());
        assert!(StrategyConfig::FedAvgM { server_lr: 1.0, momentum: 1.0 }.build(1).is_err());
        let err = StrategyConfig::FedAdam { server_lr: 0.1, beta1: 2.0, beta2: 0.9, tau: 1e-3 }.build(1).unwrap_err();
        assert!(err.to_string().contains("beta1"));
    }
}
