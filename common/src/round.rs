//! One plain round, free of I/O, and cohort sampling.
//!
//! A [`Round`] is created by the coordinator (`coordinator::Coordinator`, which uses this
//! module) for a selected cohort with a deadline, fed updates and dropouts (`handle_update`,
//! `handle_dropout`), polled with the current time (`poll`), and finished into a
//! [`RoundOutcome`]. How updates are combined sits behind the [`Collector`] seam:
//! [`PlainCollector`] sums weighted deltas in the clear. (Secure rounds are the coordinator's
//! `SecureSum`, which only ever holds the running sum of masked vectors.) [`select_cohort`],
//! [`poisson_cohort`] and the derived seeds are the sampling rules the coordinator applies.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use cohort_common::round::{PlainCollector, Round, Poll};
//! use cohort_common::wire::{TensorBytes, Update};
//! let now = Instant::now();
//! let cohort = vec!["a".to_string(), "b".to_string()];
//! let mut round = Round::new(1, cohort, now, Duration::from_secs(5), &[2], 1, Box::new(PlainCollector::new(&[2])));
//! let update = |samples, v: f32| Update {
//!     round: 1, samples, delta: TensorBytes::from_f32(&[v, v]), train_loss: 0.0, train_seconds: 0.0, segment_samples: vec![],
//! };
//! round.handle_update("a", update(1, 1.0)).unwrap();
//! round.handle_update("b", update(3, 5.0)).unwrap();
//! assert_eq!(round.poll(now), Poll::Ready);
//! let outcome = round.finish().unwrap();
//! assert_eq!(outcome.aggregate.mean_delta, vec![4.0, 4.0]);
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::seq::IndexedRandom;
use rand::Rng;

use crate::wire::{ClientId, Update};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RoundError {
    /// The peer sent something it should not have; the update is dropped.
    #[error("client `{client}` misbehaved: {problem}")]
    Peer { client: ClientId, problem: String },
    #[error("round {round} got {got} usable updates, fewer than the minimum of {min}; the global model is unchanged")]
    TooFew { round: u64, got: usize, min: usize },
    #[error("round {round} aborted: {reason}; the global model is unchanged")]
    Aborted { round: u64, reason: String },
}

/// Picks `wanted` clients uniformly at random without replacement (all of them if fewer).
/// The eligible list is sorted first so the choice depends only on the seed.
pub fn select_cohort(eligible: &[ClientId], wanted: usize, rng: &mut impl Rng) -> Vec<ClientId> {
    let mut sorted = eligible.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut chosen: Vec<ClientId> = sorted.choose_multiple(rng, wanted.min(sorted.len())).cloned().collect();
    chosen.sort();
    chosen
}

/// Poisson sampling: each member of `population` joins independently with probability `q`, the
/// scheme the privacy accountant assumes (so the cohort's size varies from round to round).
/// The population is sorted first so the choice depends only on the randomness. For a DP round
/// `rng` must be fresh OS randomness (the server passes one seeded from the OS per round):
/// amplification by sampling holds only if nobody can redraw the sample, and every seed a client
/// receives is derived from the federation seed.
pub fn poisson_cohort(population: &[ClientId], q: f64, rng: &mut impl Rng) -> Vec<ClientId> {
    let mut sorted = population.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted.retain(|_| rng.random::<f64>() < q);
    sorted
}

/// Seeds derived from the federation seed: SHA-256 of a label, the seed and the round, so that
/// one seed a client receives tells nothing of the federation seed or of any other seed.
fn derived_seed(label: &[u8], federation_seed: u64, round: u64) -> u64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(label);
    context.update(&federation_seed.to_be_bytes());
    context.update(&round.to_be_bytes());
    let digest = context.finish();
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// The seed of run `run` of a federation with `federation.seed`: the run's plan and
/// (non-private) cohort seeds derive from it, so two runs with the same settings train with
/// different shuffles and never ask for the same computation (the same updates summed over two
/// cohorts that differ by one site would give that site's update away by difference; a client
/// refuses such a repeat whatever the server says, `session::PlanRefusal::SameInput`).
pub fn run_seed(federation_seed: u64, run: &str) -> u64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"cohort-run-seed-v1");
    context.update(&federation_seed.to_be_bytes());
    context.update(run.as_bytes());
    let digest = context.finish();
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// The seed of round `round`'s plan: clients derive their shuffling from it and their id.
pub fn plan_seed(federation_seed: u64, round: u64) -> u64 {
    derived_seed(b"cohort-plan-seed-v2", federation_seed, round)
}

/// The seed of round `round`'s cohort sampling when the round is not differentially private
/// (plain runs are reproducible); DP rounds sample from OS randomness instead.
pub fn cohort_seed(federation_seed: u64, round: u64) -> u64 {
    derived_seed(b"cohort-cohort-seed-v2", federation_seed, round)
}

/// A checked update, ready for a collector.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// The FedAvg weight of each segment (trunk, then heads): 0 for a head not trained.
    pub weights: Vec<f64>,
    pub delta: Vec<f32>,
}

/// What the collector hands back: the weighted mean of the deltas.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub mean_delta: Vec<f32>,
    pub total_weight: f64,
    pub contributors: usize,
}

/// How a plain round combines what it accepts (the secure sum is the coordinator's `SecureSum`).
pub trait Collector: Send {
    /// Takes one client's checked update.
    fn accept(&mut self, client: &str, update: ClientUpdate) -> Result<(), RoundError>;
    /// Combines what was accepted; `None` when nothing was.
    fn finish(self: Box<Self>) -> Option<Aggregate>;
}

/// Plain weighted FedAvg collection: the server sees each update. For debugging and comparison.
/// Each segment (trunk, heads) is averaged over the clients that trained it; a segment nobody
/// trained is left unchanged (zero mean delta).
pub struct PlainCollector {
    segments: Vec<usize>,
    sum: Vec<f64>,
    totals: Vec<f64>,
    contributors: usize,
}

impl PlainCollector {
    /// `segments`: the lengths of the layout's segments.
    pub fn new(segments: &[usize]) -> Self {
        Self {
            segments: segments.to_vec(),
            sum: vec![0.0; segments.iter().sum()],
            totals: vec![0.0; segments.len()],
            contributors: 0,
        }
    }
}

impl Collector for PlainCollector {
    fn accept(&mut self, _client: &str, update: ClientUpdate) -> Result<(), RoundError> {
        let mut start = 0;
        for (i, &len) in self.segments.iter().enumerate() {
            let w = update.weights[i];
            for (s, d) in self.sum[start..start + len].iter_mut().zip(&update.delta[start..start + len]) {
                *s += w * *d as f64;
            }
            self.totals[i] += w;
            start += len;
        }
        self.contributors += 1;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Option<Aggregate> {
        if self.contributors == 0 || self.totals.iter().all(|t| *t <= 0.0) {
            return None;
        }
        let mut mean_delta = Vec::with_capacity(self.sum.len());
        let mut start = 0;
        for (&len, &total) in self.segments.iter().zip(&self.totals) {
            let seg = &self.sum[start..start + len];
            if total > 0.0 {
                mean_delta.extend(seg.iter().map(|s| (s / total) as f32));
            } else {
                mean_delta.extend(std::iter::repeat_n(0.0f32, len));
            }
            start += len;
        }
        Some(Aggregate { mean_delta, total_weight: self.totals[0], contributors: self.contributors })
    }
}

/// Where a cohort member stands in the round.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientStatus {
    Waiting,
    Reported { samples: u64, train_loss: f32 },
    Dropped(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// Still waiting for updates; poll again at this instant at the latest.
    Collecting { until: Instant },
    /// Every member answered, or the deadline passed.
    Ready,
}

/// The result of a finished round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutcome {
    pub round: u64,
    pub aggregate: Aggregate,
    pub reported: Vec<ClientId>,
    pub dropped: Vec<(ClientId, String)>,
    /// Mean of the clients' training losses.
    pub mean_train_loss: Option<f32>,
}

pub struct Round {
    number: u64,
    deadline: Instant,
    segments: Vec<usize>,
    param_len: usize,
    min_updates: usize,
    statuses: BTreeMap<ClientId, ClientStatus>,
    collector: Box<dyn Collector>,
}

impl Round {
    pub fn new(
        number: u64,
        cohort: Vec<ClientId>,
        now: Instant,
        timeout: Duration,
        segments: &[usize],
        min_updates: usize,
        collector: Box<dyn Collector>,
    ) -> Self {
        Self {
            number,
            deadline: now + timeout,
            segments: segments.to_vec(),
            param_len: segments.iter().sum(),
            min_updates: min_updates.max(1),
            statuses: cohort.into_iter().map(|c| (c, ClientStatus::Waiting)).collect(),
            collector,
        }
    }

    pub fn number(&self) -> u64 {
        self.number
    }
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
    pub fn cohort(&self) -> impl Iterator<Item = &ClientId> {
        self.statuses.keys()
    }
    pub fn status(&self, client: &str) -> Option<&ClientStatus> {
        self.statuses.get(client)
    }

    /// Checks and takes an update. A bad update drops its sender and is an error; the round
    /// goes on.
    pub fn handle_update(&mut self, client: &str, update: Update) -> Result<(), RoundError> {
        let peer = |problem: String| RoundError::Peer { client: client.into(), problem };
        match self.statuses.get(client) {
            None => return Err(peer(format!("sent an update for round {} without being in its cohort", self.number))),
            Some(ClientStatus::Waiting) => {}
            Some(_) => return Err(peer("sent a second update in one round".into())),
        }
        let checked = (|| {
            if update.round != self.number {
                return Err(format!("update is for round {}, this is round {}", update.round, self.number));
            }
            if update.samples == 0 {
                return Err("update claims zero training examples".into());
            }
            let delta = update.delta.to_f32().map_err(|e| e.to_string())?;
            if delta.len() != self.param_len {
                return Err(format!("update has {} values, the model has {}", delta.len(), self.param_len));
            }
            if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
                return Err(format!("update value {i} is {} (not finite)", delta[i]));
            }
            let per_segment = update.samples_per_segment(self.segments.len());
            if per_segment.len() != self.segments.len() || per_segment.iter().any(|&n| n > update.samples) {
                return Err(format!(
                    "update gives {} segment sample counts (each at most its {} samples); the model has {} segments",
                    per_segment.len(),
                    update.samples,
                    self.segments.len()
                ));
            }
            Ok(ClientUpdate { weights: per_segment.iter().map(|&n| n as f64).collect(), delta })
        })();
        match checked {
            Ok(u) => {
                self.collector.accept(client, u)?;
                self.statuses.insert(
                    client.into(),
                    ClientStatus::Reported { samples: update.samples, train_loss: update.train_loss },
                );
                Ok(())
            }
            Err(problem) => {
                self.statuses.insert(client.into(), ClientStatus::Dropped(problem.clone()));
                Err(peer(problem))
            }
        }
    }

    /// Records that a cohort member will not report (lost connection, declined, error).
    pub fn handle_dropout(&mut self, client: &str, reason: impl Into<String>) {
        if let Some(s @ ClientStatus::Waiting) = self.statuses.get_mut(client) {
            *s = ClientStatus::Dropped(reason.into());
        }
    }

    pub fn poll(&self, now: Instant) -> Poll {
        let waiting = self.statuses.values().any(|s| *s == ClientStatus::Waiting);
        if !waiting || now >= self.deadline {
            Poll::Ready
        } else {
            Poll::Collecting { until: self.deadline }
        }
    }

    /// Closes the round: members still waiting count as dropped (missed the deadline).
    pub fn finish(self) -> Result<RoundOutcome, RoundError> {
        let mut reported = Vec::new();
        let mut dropped = Vec::new();
        let mut loss = 0f64;
        for (client, status) in self.statuses {
            match status {
                ClientStatus::Reported { train_loss, .. } => {
                    loss += train_loss as f64;
                    reported.push(client);
                }
                ClientStatus::Dropped(why) => dropped.push((client, why)),
                ClientStatus::Waiting => dropped.push((client, "missed the round deadline".into())),
            }
        }
        let too_few = RoundError::TooFew { round: self.number, got: reported.len(), min: self.min_updates };
        if reported.len() < self.min_updates {
            return Err(too_few);
        }
        let aggregate = self.collector.finish().ok_or(too_few)?;
        Ok(RoundOutcome {
            round: self.number,
            mean_train_loss: Some((loss / reported.len() as f64) as f32),
            aggregate,
            reported,
            dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::TensorBytes;
    use rand::SeedableRng;

    fn update(round: u64, samples: u64, delta: &[f32]) -> Update {
        Update {
            round,
            samples,
            delta: TensorBytes::from_f32(delta),
            train_loss: 1.0,
            train_seconds: 0.1,
            segment_samples: Vec::new(),
        }
    }

    fn round(now: Instant, min: usize) -> Round {
        let cohort = ["a", "b", "c"].map(String::from).to_vec();
        Round::new(4, cohort, now, Duration::from_secs(10), &[2], min, Box::new(PlainCollector::new(&[2])))
    }

    #[test]
    fn each_segment_is_averaged_over_the_clients_that_trained_it() {
        // Segments: trunk (2 values), head A (1), head B (1). Client a trains head A, b head B,
        // c both; nobody trains a fourth head C.
        let now = Instant::now();
        let cohort = ["a", "b", "c"].map(String::from).to_vec();
        let segments = [2, 1, 1, 1];
        let round_of = |cohort: Vec<ClientId>| {
            Round::new(1, cohort, now, Duration::from_secs(9), &segments, 1, Box::new(PlainCollector::new(&segments)))
        };
        let mut r = round_of(cohort);
        let with = |samples, delta: &[f32], per: Vec<u64>| Update { segment_samples: per, ..update(1, samples, delta) };
        r.handle_update("a", with(10, &[1.0, 1.0, 4.0, 0.0, 0.0], vec![10, 10, 0, 0])).unwrap();
        r.handle_update("b", with(30, &[3.0, 3.0, 0.0, 8.0, 0.0], vec![30, 0, 30, 0])).unwrap();
        r.handle_update("c", with(20, &[2.0, 2.0, 1.0, 2.0, 0.0], vec![20, 10, 10, 0])).unwrap();
        let out = r.finish().unwrap();
        // Trunk: (10 + 90 + 40) / 60; head A: (40 + 10) / 20; head B: (240 + 20) / 40; head C: 0.
        let expected = [140.0 / 60.0, 140.0 / 60.0, 2.5, 6.5, 0.0];
        for (got, want) in out.aggregate.mean_delta.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{:?}", out.aggregate.mean_delta);
        }
        let mut bad = round_of(vec!["a".into()]);
        assert!(
            bad.handle_update("a", with(10, &[0.0; 5], vec![10, 11, 0, 0])).is_err(),
            "a head with more examples than the client"
        );
        let mut bad = round_of(vec!["a".into()]);
        assert!(bad.handle_update("a", with(10, &[0.0; 5], vec![10, 10])).is_err(), "too few segment counts");
    }

    #[test]
    fn weighted_average_of_reported_updates() {
        let now = Instant::now();
        let mut r = round(now, 2);
        r.handle_update("a", update(4, 100, &[1.0, 0.0])).unwrap();
        r.handle_update("b", update(4, 300, &[0.0, 2.0])).unwrap();
        assert!(matches!(r.poll(now), Poll::Collecting { .. }));
        r.handle_dropout("c", "connection lost");
        assert_eq!(r.poll(now), Poll::Ready);
        let out = r.finish().unwrap();
        assert_eq!(out.aggregate.mean_delta, vec![0.25, 1.5]);
        assert_eq!(out.reported, vec!["a", "b"]);
        assert_eq!(out.dropped, vec![("c".to_string(), "connection lost".to_string())]);
    }

    #[test]
    fn bad_updates_drop_their_sender_and_the_round_goes_on() {
        let now = Instant::now();
        let mut r = round(now, 1);
        assert!(r.handle_update("a", update(4, 1, &[f32::NAN, 0.0])).is_err());
        assert!(r.handle_update("b", update(3, 1, &[0.0, 0.0])).is_err());
        assert!(r.handle_update("c", update(4, 1, &[0.0])).is_err());
        assert!(r.handle_update("z", update(4, 1, &[0.0, 0.0])).is_err());
        assert!(matches!(r.status("a"), Some(ClientStatus::Dropped(w)) if w.contains("not finite")));
        assert_eq!(r.poll(now), Poll::Ready);
        assert!(matches!(r.finish(), Err(RoundError::TooFew { got: 0, .. })));
    }

    #[test]
    fn duplicate_updates_are_refused() {
        let now = Instant::now();
        let mut r = round(now, 1);
        r.handle_update("a", update(4, 1, &[1.0, 1.0])).unwrap();
        assert!(r.handle_update("a", update(4, 1, &[9.0, 9.0])).is_err());
        r.handle_dropout("a", "late dropout does not erase a report");
        assert!(matches!(r.status("a"), Some(ClientStatus::Reported { .. })));
    }

    #[test]
    fn the_deadline_closes_the_round() {
        let now = Instant::now();
        let mut r = round(now, 1);
        r.handle_update("a", update(4, 1, &[1.0, 1.0])).unwrap();
        assert!(matches!(r.poll(now + Duration::from_secs(9)), Poll::Collecting { .. }));
        assert_eq!(r.poll(now + Duration::from_secs(10)), Poll::Ready);
        let out = r.finish().unwrap();
        assert_eq!(out.dropped.len(), 2);
        assert!(out.dropped.iter().all(|(_, why)| why.contains("deadline")));
    }

    #[test]
    fn cohort_selection_is_seeded_and_without_replacement() {
        let clients: Vec<ClientId> = (0..100).map(|i| format!("c{i:03}")).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let a = select_cohort(&clients, 10, &mut rng);
        let mut shuffled = clients.clone();
        shuffled.reverse();
        let b = select_cohort(&shuffled, 10, &mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, b);
        let mut d = a.clone();
        d.dedup();
        assert_eq!(d.len(), 10);
        assert_eq!(select_cohort(&clients[..3], 10, &mut rng).len(), 3);
    }

    #[test]
    fn poisson_sampling_takes_each_client_with_probability_q() {
        let clients: Vec<ClientId> = (0..10_000).map(|i| format!("c{i:05}")).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let sizes: Vec<usize> = (0..20).map(|_| poisson_cohort(&clients, 0.1, &mut rng).len()).collect();
        // Binomial(10,000, 0.1): mean 1,000, standard deviation 30.
        assert!(sizes.iter().all(|&n| (850..1150).contains(&n)), "{sizes:?}");
        assert!(sizes.windows(2).any(|w| w[0] != w[1]), "the size varies: {sizes:?}");
        let mut reversed = clients.clone();
        reversed.reverse();
        let seeded = |c: &[ClientId]| poisson_cohort(c, 0.1, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        assert_eq!(seeded(&clients), seeded(&reversed));
        assert!(poisson_cohort(&clients, 0.0, &mut rng).is_empty());
        assert_eq!(poisson_cohort(&clients, 1.0, &mut rng).len(), 10_000);
    }

    /// Attack: a client replays the server's cohort draws. In protocol v1 the plan seed was
    /// `federation_seed ^ round.rotate_left(17)`, so any client recovered the federation seed
    /// from one plan, and with it every round's cohort seed.
    #[test]
    fn no_seed_a_client_receives_gives_the_federation_seed() {
        let federation_seed = 0x5eed;
        let v1_plan_seed = |round: u64| federation_seed ^ round.rotate_left(17);
        let recovered = v1_plan_seed(7) ^ 7u64.rotate_left(17);
        assert_eq!(recovered, federation_seed, "v1: one plan gives the federation seed away");
        let now = plan_seed(federation_seed, 7) ^ 7u64.rotate_left(17);
        assert_ne!(now, federation_seed);
        // Seeds are one-way and unrelated across rounds and uses.
        assert_ne!(plan_seed(federation_seed, 7), plan_seed(federation_seed, 8));
        assert_ne!(plan_seed(federation_seed, 7), cohort_seed(federation_seed, 7));
        assert_eq!(plan_seed(federation_seed, 7), plan_seed(federation_seed, 7));
    }
}
