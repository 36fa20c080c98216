//! One secure sum as the coordinator runs it: the six SecAgg+ phases of a [`SecAggServer`], each
//! a request to every client still in the session and one answer back, with a deadline that
//! starts when the phase's requests go out. Replies are matched to the request they answer, so
//! a late answer from an earlier phase or session is never mistaken for this one's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::secagg::{PeerVerifier, Phase, SecAggError, SecAggServer, Unmasked};
use crate::wire::{escape, ClientId, ClientMsg, RoundPlan, ServerMsg, Task};

use super::{Outbox, RequestId};

/// What a finished sum gives the coordinator.
#[derive(Debug)]
pub(crate) struct Summed {
    pub sum: Vec<u64>,
    pub survivors: Vec<ClientId>,
    /// Everyone else of the cohort, with why.
    pub dropped: BTreeMap<ClientId, String>,
    pub cheaters: Vec<(ClientId, String)>,
}

/// Why a sum did not finish, in plain words, with the sites that did not answer.
#[derive(Debug)]
pub(crate) struct Failed {
    pub note: String,
    pub dropped: BTreeMap<ClientId, String>,
    pub cheaters: Vec<(ClientId, String)>,
}

/// A secure sum in progress.
pub(crate) struct SecureSum {
    round: u64,
    task: Task,
    server: SecAggServer,
    cohort: Vec<ClientId>,
    phase: Phase,
    /// Who the current phase still waits for, and the request each answers.
    waiting: BTreeMap<ClientId, RequestId>,
    dropped: BTreeMap<ClientId, String>,
    /// Survivors that sent no usable unmask reply: the sum does not need them all, but if it
    /// fails they are why (a client that withholds its shares must not abort rounds unnamed).
    unmask_missing: BTreeMap<ClientId, String>,
    deadline: Instant,
    /// The masked inputs are due by the round's deadline (the clients train meanwhile).
    round_deadline: Instant,
    phase_timeout: Duration,
    /// How long the current phase was given.
    phase_length: Duration,
    /// Answers of the masked-input phase may be as large as the vector; others are small.
    masked_cap: usize,
    /// The fewest survivors that make the sum.
    min_survivors: usize,
}

/// Replies of every phase but the masked inputs are small.
const SMALL_REPLY: usize = 4 << 20;

impl SecureSum {
    /// The phase the sum is in.
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Starts the session: the plan goes out to the cohort now, and the phase's deadline
    /// starts now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        plan: RoundPlan,
        cohort: Vec<ClientId>,
        now: Instant,
        phase_timeout: Duration,
        round_timeout: Duration,
        min_survivors: usize,
        out: &mut Outbox,
    ) -> Result<Self, Failed> {
        let secure = plan.secure.as_ref().expect("a secure plan");
        let setup = secure.setup.clone();
        let masked_cap = setup.vector_len.saturating_mul(8).saturating_add(1 << 20);
        let server = SecAggServer::new(setup).map_err(|e| Failed {
            note: format!("the secure session cannot start: {e}"),
            dropped: BTreeMap::new(),
            cheaters: Vec::new(),
        })?;
        let round_deadline = now + round_timeout;
        let mut sum = Self {
            round: plan.round,
            task: plan.task,
            server,
            cohort: cohort.clone(),
            phase: Phase::Join,
            waiting: BTreeMap::new(),
            dropped: BTreeMap::new(),
            unmask_missing: BTreeMap::new(),
            deadline: (now + phase_timeout).min(round_deadline),
            round_deadline,
            phase_timeout,
            phase_length: phase_timeout.min(round_timeout),
            masked_cap,
            min_survivors,
        };
        let msg = Arc::new(ServerMsg::Plan(plan));
        for id in cohort {
            let request = out.send(&id, msg.clone(), SMALL_REPLY, sum.deadline);
            sum.waiting.insert(id, request);
        }
        Ok(sum)
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Takes one answer. `None` while the session goes on.
    pub(crate) fn handle_reply(
        &mut self,
        request: RequestId,
        from: &str,
        reply: Result<ClientMsg, String>,
        now: Instant,
        verifier: &dyn PeerVerifier,
        out: &mut Outbox,
    ) -> Option<Result<Summed, Failed>> {
        if self.waiting.get(from) != Some(&request) {
            return None; // an answer to an earlier request: the phase it belonged to is closed
        }
        self.waiting.remove(from);
        let round = self.round;
        let accepted = match reply {
            Err(why) => Err(why),
            Ok(ClientMsg::Decline { reason, .. }) => {
                let reason = escape(&reason, 300);
                out.declined(round, self.task, from, &reason);
                Err(super::decline_dropout(&reason))
            }
            Ok(msg) => {
                let kind = msg.kind();
                let result = match (self.phase, msg) {
                    (Phase::Join, ClientMsg::Join { round: r, nonce }) if r == round => {
                        Some(self.server.handle_join(from, nonce))
                    }
                    (Phase::Advertise, ClientMsg::Advert { round: r, advert }) if r == round => {
                        Some(self.server.handle_advert(from, advert, verifier))
                    }
                    (Phase::ShareKeys, ClientMsg::Shares { round: r, keys }) if r == round => {
                        Some(self.server.handle_shares(from, keys))
                    }
                    (Phase::MaskedInput, ClientMsg::Masked { round: r, input }) if r == round => {
                        Some(self.server.handle_masked(from, input, verifier))
                    }
                    (Phase::Confirm, ClientMsg::Confirm { round: r, signature }) if r == round => {
                        Some(self.server.handle_confirmation(from, signature, verifier))
                    }
                    (Phase::Unmask, ClientMsg::Unmask { round: r, reply }) if r == round => {
                        // A refused unmask reply leaves the sum to the other neighbours.
                        let refused = self.server.handle_unmask(from, reply);
                        if let Err(e) = &refused {
                            out.notice(
                                round,
                                Some(from),
                                format!("unmask reply refused: {}", escape(&e.to_string(), 300)),
                            );
                        }
                        Some(refused)
                    }
                    _ => None,
                };
                match result {
                    Some(Ok(())) => Ok(()),
                    Some(Err(refused)) => Err(escape(&refused.to_string(), 300)),
                    None => Err(format!("protocol violation: expected {}, got {kind}", self.phase.wanted())),
                }
            }
        };
        if let Err(why) = accepted {
            if self.phase == Phase::Unmask {
                self.unmask_missing.insert(from.to_string(), why);
            } else {
                self.dropped.insert(from.to_string(), why);
            }
        }
        // Only the last answer closes a phase here; the deadline closes it in `handle_timeout`,
        // which the driver calls after every reply that had already arrived.
        if self.waiting.is_empty() {
            return self.close_phase(now, out);
        }
        None
    }

    /// The deadline may have passed. `None` while the session goes on.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Outbox) -> Option<Result<Summed, Failed>> {
        if self.waiting.is_empty() || now >= self.deadline {
            return self.close_phase(now, out);
        }
        None
    }

    /// Closes the phase (those still waited for missed its deadline) and starts the next.
    fn close_phase(&mut self, now: Instant, out: &mut Outbox) -> Option<Result<Summed, Failed>> {
        let late = format!("missed the {:.0} s deadline for {}", self.phase_length.as_secs_f64(), self.phase.wanted());
        for (id, _) in std::mem::take(&mut self.waiting) {
            if self.phase == Phase::Unmask {
                self.unmask_missing.insert(id, late.clone());
            } else {
                self.dropped.insert(id, late.clone());
            }
        }
        let round = self.round;
        let phase = self.phase;
        let next = match phase {
            Phase::Join => self.server.close_joins().map(|list| {
                let to: Vec<ClientId> = list.joined.iter().map(|j| j.client.clone()).collect();
                let msg = Arc::new(ServerMsg::Joined { round, list });
                to.into_iter().map(|id| (id, msg.clone())).collect::<Vec<_>>()
            }),
            Phase::Advertise => self.server.close_adverts().map(|adverts| {
                adverts.into_iter().map(|(id, adverts)| (id, Arc::new(ServerMsg::Adverts { round, adverts }))).collect()
            }),
            Phase::ShareKeys => {
                for (client, refused) in self.server.refusals() {
                    let text =
                        format!("refused the key advert of `{}` (bad signature or certificate)", escape(&refused, 64));
                    out.notice(round, Some(&client), text);
                }
                self.server.close_shares().map(|inbox| {
                    inbox.into_iter().map(|(id, shares)| (id, Arc::new(ServerMsg::Shares { round, shares }))).collect()
                })
            }
            Phase::MaskedInput => {
                for (holder, dealer) in self.server.complaints() {
                    let text = format!(
                        "the shares `{}` sealed for it do not open or match their commitments",
                        escape(&dealer, 64)
                    );
                    out.notice(round, Some(&holder), text);
                }
                self.server.close_masked().map(|list| {
                    let to = list.survivors.clone();
                    let msg = Arc::new(ServerMsg::Survivors { round, list });
                    to.into_iter().map(|id| (id, msg.clone())).collect()
                })
            }
            Phase::Confirm => self.server.close_confirmations().map(|requests| {
                requests.into_iter().map(|(id, request)| (id, Arc::new(ServerMsg::Unmask { round, request }))).collect()
            }),
            Phase::Unmask => return Some(self.finish()),
        };
        let requests = match next {
            Ok(requests) => requests,
            Err(e) => return Some(Err(self.failed(phase, &e))),
        };
        self.phase = match phase {
            Phase::Join => Phase::Advertise,
            Phase::Advertise => Phase::ShareKeys,
            Phase::ShareKeys => Phase::MaskedInput,
            Phase::MaskedInput => Phase::Confirm,
            Phase::Confirm | Phase::Unmask => Phase::Unmask,
        };
        // The deadline of a phase starts when its requests go out; the masked inputs are due
        // by the round's deadline, since the clients train until then.
        (self.deadline, self.phase_length) = match self.phase {
            // At least a phase's time, however long the earlier phases took: a straggler that
            // answers each phase at its deadline cannot squeeze this one to nothing.
            Phase::MaskedInput => {
                let deadline = self.round_deadline.max(now + self.phase_timeout);
                (deadline, deadline.saturating_duration_since(now))
            }
            _ => (now + self.phase_timeout, self.phase_timeout),
        };
        let cap = if self.phase == Phase::MaskedInput { self.masked_cap } else { SMALL_REPLY };
        for (id, msg) in requests {
            let request = out.send(&id, msg, cap, self.deadline);
            self.waiting.insert(id, request);
        }
        if self.waiting.is_empty() {
            return self.close_phase(now, out);
        }
        None
    }

    fn finish(&mut self) -> Result<Summed, Failed> {
        let Unmasked { sum, survivors, cheaters } = match self.server.finish() {
            Ok(unmasked) => unmasked,
            Err(e) => return Err(self.failed(Phase::Unmask, &e)),
        };
        if survivors.len() < self.min_survivors {
            let mut failed = self.failed_with(format!(
                "only {} of {} sites' inputs are in the sum, {} are needed",
                survivors.len(),
                self.cohort.len(),
                self.min_survivors
            ));
            failed.cheaters = cheaters;
            return Err(failed);
        }
        let mut dropped = std::mem::take(&mut self.dropped);
        let kept: BTreeSet<&ClientId> = survivors.iter().collect();
        dropped.retain(|id, _| !kept.contains(id));
        for id in &self.cohort {
            if !kept.contains(id) {
                dropped.entry(id.clone()).or_insert_with(|| "dropped during secure aggregation".into());
            }
        }
        Ok(Summed { sum, survivors, dropped, cheaters })
    }

    /// The session ends at `phase` with `error`: say so in plain words, naming the sites.
    fn failed(&mut self, phase: Phase, error: &SecAggError) -> Failed {
        if phase == Phase::Unmask {
            let missing = std::mem::take(&mut self.unmask_missing);
            self.dropped.extend(missing);
        }
        let what = match error {
            SecAggError::Abort(why) => why.clone(),
            other => other.to_string(),
        };
        let mut failed = self.failed_with(format!("secure aggregation stopped {}: {}", phase.describe(), what));
        failed.cheaters = self.server.cheaters();
        failed
    }

    fn failed_with(&mut self, what: String) -> Failed {
        let dropped = std::mem::take(&mut self.dropped);
        let mut note = what;
        if !dropped.is_empty() {
            let sites: Vec<String> = dropped.iter().map(|(id, why)| format!("{id} {why}")).collect();
            note = format!("{note}. {}", sites.join("; "));
        }
        Failed { note, dropped, cheaters: Vec::new() }
    }
}
