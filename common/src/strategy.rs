//! Server optimizers applied to the averaged client update.
//!
//! The round produces the weighted mean of the clients' deltas (`local - global`); a
//! [`Strategy`] turns it into the next global model. FedAvg with `server_lr = 1` is McMahan et
//! al.'s weighted model average; FedAvgM adds server momentum (Hsu et al. 2019); FedAdam and
//! FedYogi are the adaptive optimizers of Reddi et al. 2021, "Adaptive Federated Optimization".

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategyError {
    #[error("strategy `{name}`: {problem}")]
    Config { name: &'static str, problem: String },
    #[error("update has {got} values, the model has {expected}")]
    Length { got: usize, expected: usize },
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
    fn bad_settings_are_refused() {
        assert!(StrategyConfig::FedAvg { server_lr: 0.0 }.build(1).is_err());
        assert!(StrategyConfig::FedAvgM { server_lr: 1.0, momentum: 1.0 }.build(1).is_err());
        let err = StrategyConfig::FedAdam { server_lr: 0.1, beta1: 2.0, beta2: 0.9, tau: 1e-3 }.build(1).unwrap_err();
        assert!(err.to_string().contains("beta1"));
    }
}
