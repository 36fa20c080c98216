//! The socket-free federation suite: one [`Coordinator`] and N client sessions in one loop with
//! a virtual clock (quinn-proto's `Pair` is the model). Requests are answered by real client
//! state machines (plan checks, SecAgg+ clients, DP, census, evaluation, personal heads), with
//! synthetic updates where training itself is not under test, so hundreds of rounds run in
//! seconds and every rule of the round is tested here; the loopback tests are for the transport.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use proptest::prelude::*;
use rand::SeedableRng;

use super::config::{Collection, DpConfig, Federation, SecAggConfig, SiteBackoff};
use super::*;
use crate::data::Dataset;
use crate::model::{Model, ModelSpec};
use crate::secagg::harness::{TestPki, TestSigner};
use crate::secagg::Phase;
use crate::session::{Action, ClientSession, Job, SecureKeys};
use crate::train::{CountScope, LossConfig, TrainConfig};
use crate::trainer::{HeadData, Trainer};

const SPEC: &str = "name='t'\ninput_shape=[2]\n[[trunk]]\nkind='linear'\nout=3\n[[heads]]\nname='y'\nclasses=2";

/// What a simulated site does besides following the protocol.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    /// Declines every plan with this reason.
    decline: Option<String>,
    /// Vanishes (its connection lost) when it receives this phase's request of this round.
    vanish_at: Option<(u64, Phase)>,
    /// Never answers this phase's request of this round (but stays connected).
    silent_at: Option<(u64, Phase)>,
    /// Never answers this phase's request from this round on.
    silent_from: Option<(u64, Phase)>,
    /// How long each reply takes to arrive.
    latency: Duration,
}

struct Site {
    session: ClientSession,
    trainer: Trainer,
    /// Jobs the session asked for that have not run yet (see [`Sim::deliver`]).
    jobs: Vec<Job>,
    behaviour: Behaviour,
    online: bool,
}

/// The phase a request belongs to.
fn phase_of(msg: &ServerMsg) -> Phase {
    match msg {
        ServerMsg::Plan(_) => Phase::Join,
        ServerMsg::Joined { .. } => Phase::Advertise,
        ServerMsg::Adverts { .. } => Phase::ShareKeys,
        ServerMsg::Shares { .. } => Phase::MaskedInput,
        ServerMsg::Survivors { .. } => Phase::Confirm,
        _ => Phase::Unmask,
    }
}

/// A whole federation in one loop.
struct Sim {
    coordinator: Coordinator,
    sites: BTreeMap<ClientId, Site>,
    now: Instant,
    /// Replies on their way: (arrival, request, from, reply).
    in_flight: Vec<(Instant, RequestId, ClientId, Result<ClientMsg, String>)>,
    events: Vec<Event>,
    reports: Vec<RoundReport>,
    stopped: Option<StopReason>,
    rng: rand_chacha::ChaCha20Rng,
    /// Virtual time the driver spends after each finished round before it looks at its timers
    /// again (a slow test-set evaluation in the driver).
    after_round: Duration,
    /// Requests delivered, for the rounds-per-second figure.
    requests: usize,
    /// What the coordinator said it was doing ([`Coordinator::activity`]), each change once.
    activities: Vec<String>,
}

fn federation(collection: Collection, rounds: u64, clients: usize) -> Federation {
    let text = format!("rounds = {rounds}\nclients_per_round = {clients}\nmin_clients = 2\nseed = 7\n");
    let mut fed: Federation = toml::from_str(&text).unwrap();
    fed.collection = collection;
    fed.round_timeout_secs = 60.0;
    fed.wait_for_clients_secs = 30.0;
    // Small cohorts take a complete graph (degree 2, all shares needed); larger ones tolerate a
    // quarter of each neighbourhood dropping.
    let (degree, threshold, dropout_tolerance) = if clients <= 4 { (2, 2, 0.0) } else { (4, 3, 0.25) };
    fed.secagg = SecAggConfig {
        degree,
        threshold: Some(threshold),
        dropout_tolerance: Some(dropout_tolerance),
        phase_timeout_secs: 5.0,
        ..SecAggConfig::default()
    };
    fed.train = TrainConfig { epochs: 1, batch_size: 4, ..TrainConfig::default() };
    fed
}

fn dataset(n: usize, salt: usize) -> Arc<Dataset> {
    let features: Vec<f32> = (0..2 * n).map(|i| ((i * 7 + salt * 13) % 10) as f32 / 10.0).collect();
    let labels: Vec<u32> = (0..n).map(|i| ((i + salt) % 2) as u32).collect();
    Arc::new(Dataset::new(features, vec![2], labels, 2).unwrap())
}

impl Sim {
    /// `n` sites `c000`.. with synthetic updates (or real training), all connected at once.
    fn new(fed: Federation, spec: &str, n: usize, seed: u64, train: bool) -> Self {
        Self::with_sites(fed, spec, seed, (0..n).map(|i| (format!("c{i:03}"), Behaviour::default())).collect(), train)
    }

    fn with_sites(fed: Federation, spec: &str, seed: u64, sites: Vec<(String, Behaviour)>, train: bool) -> Self {
        let spec = ModelSpec::from_toml(spec).unwrap();
        let model = Model::new(&spec, &Device::Cpu, fed.seed).unwrap();
        let now = Instant::now();
        let setup = CoordinatorSetup {
            run: "trial".into(),
            federation: fed,
            segments: model.layout().segments().to_vec(),
            initial: model.flat().unwrap(),
            spec: spec.clone(),
            resume: Resume::default(),
            verifier: Arc::new(TestPki),
            rng: Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0xd9)),
        };
        let mut coordinator = Coordinator::new(setup, now).unwrap();
        let mut all = BTreeMap::new();
        for (i, (id, behaviour)) in sites.into_iter().enumerate() {
            let keys = SecureKeys { signer: Arc::new(TestSigner(id.clone())), verifier: Arc::new(TestPki) };
            let heads: Vec<HeadData> =
                spec.heads.iter().map(|h| HeadData { head: Some(h.name.clone()), data: dataset(12, i) }).collect();
            let session = ClientSession::new(id.clone()).with_secure_keys(keys);
            let mut trainer = Trainer::with_heads(id.clone(), heads, Device::Cpu);
            if !train {
                trainer = trainer.with_synthetic_updates();
            }
            all.insert(id, Site { session, trainer, jobs: Vec::new(), behaviour, online: true });
        }
        coordinator.set_enrolled(all.keys().cloned().collect());
        for id in all.keys() {
            coordinator.client_connected(id, now);
        }
        Self {
            coordinator,
            sites: all,
            now,
            in_flight: Vec::new(),
            events: Vec::new(),
            reports: Vec::new(),
            stopped: None,
            rng: rand_chacha::ChaCha20Rng::seed_from_u64(seed),
            after_round: Duration::ZERO,
            requests: 0,
            activities: Vec::new(),
        }
    }

    /// Answers one request the way a client daemon would. Training takes as long as the key
    /// exchange: a secure round's job runs only once its masked-input request has arrived (which
    /// the session parks until the job result comes in); a plain plan's runs at once.
    fn deliver(&mut self, request: Request) {
        self.requests += 1;
        let Request { id, to, msg, .. } = request;
        let (round, phase) = (msg.request_round().unwrap_or(0), phase_of(&msg));
        let site = self.sites.get_mut(&to).expect("requests go to known sites");
        if !site.online {
            self.in_flight.push((self.now, id, to, Err("disconnected".into())));
            return;
        }
        if site.behaviour.vanish_at == Some((round, phase)) {
            site.online = false;
            site.session.abandon_round();
            site.jobs.clear();
            // Whatever it would still have said is lost with the connection.
            while site.session.poll_action().is_some() {}
            self.in_flight.push((self.now, id, to.clone(), Err("connection lost".into())));
            self.coordinator.client_disconnected(&to);
            return;
        }
        let silent_from = site.behaviour.silent_from.is_some_and(|(from, p)| p == phase && round >= from);
        if site.behaviour.silent_at == Some((round, phase)) || silent_from {
            return;
        }
        let arrival = self.now + site.behaviour.latency;
        if let (Some(reason), ServerMsg::Plan(_)) = (&site.behaviour.decline, msg.as_ref()) {
            let reply = ClientMsg::Decline { round, reason: reason.clone() };
            self.in_flight.push((arrival, id, to, Ok(reply)));
            return;
        }
        let run_jobs = match msg.as_ref() {
            ServerMsg::Plan(plan) => plan.secure.is_none(),
            msg => matches!(msg, ServerMsg::Shares { .. }),
        };
        site.session.handle(id, msg.as_ref().clone(), &mut self.rng).expect("the coordinator sends requests");
        loop {
            while let Some(action) = site.session.poll_action() {
                match action {
                    Action::Reply { to: request, msg } => self.in_flight.push((arrival, request, to.clone(), Ok(msg))),
                    Action::Run(job) => site.jobs.push(job),
                    Action::SaveLedger { .. } => unreachable!("the simulated sites keep no privacy ledger"),
                }
            }
            if !run_jobs || site.jobs.is_empty() {
                break;
            }
            for job in std::mem::take(&mut site.jobs) {
                let result = site.trainer.run(&job).map_err(|e| e.to_string());
                site.session.job_done(job.id, result, &mut self.rng).expect("a job the session started");
            }
        }
    }

    fn drain(&mut self) {
        while let Some(output) = self.coordinator.poll_output() {
            match output {
                Output::Send(request) => self.deliver(request),
                Output::Event(event) => {
                    match &event {
                        Event::RoundFinished { report, .. } => {
                            self.reports.push(report.as_ref().clone());
                            self.now += self.after_round;
                        }
                        Event::Stopped(reason) => self.stopped = Some(reason.clone()),
                        _ => {}
                    }
                    self.events.push(event);
                }
            }
        }
    }

    /// Runs until the coordinator stops (or `limit` of virtual time passes).
    fn run(&mut self, limit: Duration) -> StopReason {
        let end = self.now + limit;
        loop {
            self.drain();
            let activity = self.coordinator.activity().to_string();
            if self.activities.last() != Some(&activity) {
                self.activities.push(activity);
            }
            if let Some(reason) = &self.stopped {
                return reason.clone();
            }
            let next_reply = self.in_flight.iter().map(|r| r.0).min();
            let timer = self.coordinator.poll_timeout();
            let next = [next_reply, timer].into_iter().flatten().min().expect("the coordinator waits for something");
            assert!(next <= end, "still running after {limit:?} of virtual time");
            self.now = self.now.max(next);
            // Replies that have arrived are taken before any deadline fires.
            if next_reply.is_some_and(|t| t <= self.now) {
                let i = self.in_flight.iter().enumerate().min_by_key(|(i, r)| (r.0, *i)).map(|(i, _)| i).unwrap();
                let (_, request, from, reply) = self.in_flight.remove(i);
                self.coordinator.handle_reply(request, &from, reply, self.now);
            } else {
                self.coordinator.handle_timeout(self.now);
            }
        }
    }

    fn completed(&self) -> Vec<&RoundReport> {
        self.reports.iter().filter(|r| r.completed).collect()
    }
}

/// Rounds run by the suite's cases, to check the suite's size (at least 300).
static ROUNDS_RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count(sim: &Sim) {
    ROUNDS_RUN.fetch_add(sim.reports.len(), std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn plain_and_secure_federations_complete_every_round_deterministically() {
    for collection in [Collection::Plain, Collection::Secure] {
        let run = |seed| {
            let mut sim = Sim::new(federation(collection, 40, 5), SPEC, 8, seed, false);
            assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 40 });
            count(&sim);
            sim
        };
        let (a, b) = (run(1), run(1));
        assert_eq!(a.completed().len(), 40, "{collection:?}");
        assert!(a.reports.iter().all(|r| r.participants == 5 && r.dropped.is_empty()), "{collection:?}");
        assert_eq!(a.coordinator.global(), b.coordinator.global(), "deterministic for a seed");
        assert_eq!(a.reports, b.reports);
        let rounds: Vec<u64> = a.reports.iter().map(|r| r.round).collect();
        assert_eq!(rounds, (1..=40).collect::<Vec<_>>());
    }
}

#[test]
fn plain_rounds_average_real_training() {
    let mut sim = Sim::new(federation(Collection::Plain, 3, 3), SPEC, 3, 2, true);
    let before = sim.coordinator.global().clone();
    sim.run(Duration::from_secs(10_000));
    count(&sim);
    assert_eq!(sim.completed().len(), 3);
    assert!(sim.reports.iter().all(|r| r.train_loss.is_some_and(|l| l.is_finite())));
    assert_ne!(&before, sim.coordinator.global(), "the model moved");
}

/// Dropouts at every phase of secure rounds, generated: a round with enough survivors
/// completes without the dropped site; one without aborts, naming the site in plain words;
/// aborted rounds do not use up `rounds`.
#[test]
fn secure_rounds_survive_or_abort_clearly_with_a_dropout_at_every_phase() {
    let phases = [Phase::Join, Phase::Advertise, Phase::ShareKeys, Phase::MaskedInput, Phase::Confirm, Phase::Unmask];
    for (i, phase) in phases.into_iter().enumerate() {
        let mut sites: Vec<(String, Behaviour)> = (0..6).map(|i| (format!("c{i:03}"), Behaviour::default())).collect();
        sites[1].1.vanish_at = Some((2, phase));
        sites[2].1.silent_at = Some((3, phase));
        let mut sim = Sim::with_sites(federation(Collection::Secure, 5, 6), SPEC, i as u64, sites, false);
        assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 5 });
        count(&sim);
        let two = sim.reports.iter().find(|r| r.round == 2).unwrap();
        assert!(two.completed, "{phase:?}: {two:?}");
        // Before it masked its input a vanished site is simply not in the sum; after, its
        // input is in it and the unmasking phase (which it misses) does not need it.
        let in_sum = matches!(phase, Phase::Confirm | Phase::Unmask);
        assert_eq!(two.participants, if in_sum { 6 } else { 5 }, "{phase:?}");
        if !in_sum {
            assert!(two.dropped.iter().any(|(id, why)| id == "c001" && why.contains("connection lost")), "{two:?}");
        }
        let three = sim.reports.iter().find(|r| r.round == 3).unwrap();
        assert!(three.completed, "{phase:?}: {three:?}");
        if phase != Phase::Unmask && phase != Phase::Confirm {
            assert!(
                three.dropped.iter().any(|(id, why)| id == "c002" && why.contains("missed the")),
                "{phase:?}: {three:?}"
            );
        }
        assert_eq!(sim.completed().len(), 5);
    }
}

/// Failure 4 of the issue: a dropout that aborts a round is reported in plain words naming the
/// sites, the round does not count, and the federation goes on.
#[test]
fn a_dropout_that_aborts_a_round_names_the_sites_and_the_round_does_not_count() {
    // Three sites, two needed: two of them vanish after masking their inputs in round 2, so the
    // unmasking has too few shares.
    let mut sites: Vec<(String, Behaviour)> =
        ["hospital-a", "hospital-b", "hospital-c"].iter().map(|s| (s.to_string(), Behaviour::default())).collect();
    sites[0].1.silent_at = Some((2, Phase::Advertise));
    sites[1].1.silent_at = Some((2, Phase::Advertise));
    let mut fed = federation(Collection::Secure, 3, 3);
    fed.backoff = SiteBackoff { after_failures: 3, ..SiteBackoff::default() };
    let mut sim = Sim::with_sites(fed, SPEC, 5, sites, false);
    assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 3 });
    count(&sim);
    let aborted: Vec<&RoundReport> = sim.reports.iter().filter(|r| !r.completed).collect();
    assert_eq!(aborted.len(), 1, "{:?}", sim.reports);
    let note = &aborted[0].note;
    assert!(note.starts_with("round 2 aborted: secure aggregation stopped during the key exchange"), "{note}");
    assert!(note.contains("hospital-a missed the 5 s deadline for a key advert"), "{note}");
    assert!(note.contains("hospital-b missed the 5 s deadline for a key advert"), "{note}");
    assert!(note.ends_with("The global model is unchanged"), "{note}");
    assert!(!note.contains("round aborted: round"), "no stacked prefixes: {note}");
    assert_eq!(sim.completed().len(), 3, "the aborted round did not count");
    assert_eq!(sim.reports.last().unwrap().round, 4);
}

/// What `cohort-server status` shows of a running federation (issue 15): waiting for clients,
/// each round with its cohort and the secure-aggregation phase it waits for, the end.
#[test]
fn the_activity_follows_the_round_and_its_phases() {
    let mut sim = Sim::new(federation(Collection::Secure, 2, 3), SPEC, 3, 5, false);
    assert_eq!(sim.coordinator.activity().to_string(), "waiting for clients (3 eligible connected, 3 needed)");
    assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 2 });
    for round in 1..=2 {
        for wanted in ["a key advert", "sealed shares", "a masked input", "shares for unmasking"] {
            let expected = format!("round {round}, 3 clients sampled, waiting for {wanted}");
            assert!(sim.activities.contains(&expected), "{expected:?} not in {:?}", sim.activities);
        }
    }
    assert_eq!(sim.activities.last().map(String::as_str), Some("stopped"));
}

/// Sums of two (issue 15): in a secure round of two sites, each learns the other's update from
/// the sum (the sum minus its own). Attack: only two of a federation's sites are online, and the
/// server would sum their updates. Unless the operator accepted that (`allow_two_site_sums`),
/// no round starts with fewer than three; with it, rounds of two complete.
#[test]
fn a_sum_of_two_updates_needs_the_operators_consent() {
    let mut fed = federation(Collection::Secure, 1, 3);
    fed.min_clients = 2;
    fed.start_after_clients = Some(2);
    let mut sim = Sim::new(fed.clone(), SPEC, 2, 3, false);
    let stop = sim.run(Duration::from_secs(100_000));
    assert_eq!(stop, StopReason::NotEnoughClients { connected: 2, needed: 3, waited_secs: 30.0 });
    assert!(sim.reports.is_empty(), "a round of two was tried: {:?}", sim.reports);

    fed.secagg.allow_two_site_sums = true;
    let mut sim = Sim::new(fed, SPEC, 2, 3, false);
    assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 1 });
    let round1 = sim.reports.iter().find(|r| r.round == 1).unwrap();
    assert!(round1.completed && round1.participants == 2, "{round1:?}");
}

/// Failure 1 of the issue: a site whose data do not fit declines every round. Its reason
/// reaches the server (events and reports), it backs off, aborted rounds do not use up
/// `rounds`, and after `max_consecutive_aborts` the federation stops saying why.
#[test]
fn a_site_that_always_declines_is_heard_backs_off_and_stops_the_federation_clearly() {
    let sites = vec![
        ("hospital-a".to_string(), Behaviour::default()),
        (
            "hospital-b".to_string(),
            Behaviour { decline: Some("its data have 3 features, the model takes 2".into()), ..Behaviour::default() },
        ),
        ("hospital-c".to_string(), Behaviour::default()),
    ];
    let mut fed = federation(Collection::Secure, 10, 3);
    fed.min_clients = 3;
    fed.max_consecutive_aborts = 4;
    fed.backoff = SiteBackoff { after_failures: 2, initial_secs: 60.0, max_secs: 600.0 };
    let mut sim = Sim::with_sites(fed, SPEC, 3, sites, false);
    let started = sim.now;
    let stop = sim.run(Duration::from_secs(100_000));
    count(&sim);
    let StopReason::TooManyAborts { aborts, last } = &stop else { panic!("{stop:?}") };
    assert_eq!(*aborts, 4);
    assert!(last.contains("hospital-b declined: its data have 3 features, the model takes 2"), "{last}");
    assert!(stop.to_string().contains("4 rounds in a row aborted"), "{stop}");
    assert!(sim.completed().is_empty());
    let declines: Vec<&Event> = sim.events.iter().filter(|e| matches!(e, Event::Declined { .. })).collect();
    assert_eq!(declines.len(), 4, "every decline is an event with its reason");
    assert!(sim
        .reports
        .iter()
        .all(|r| r.declined
            == vec![("hospital-b".to_string(), "its data have 3 features, the model takes 2".to_string())]));
    // It backed off: 60 s after its second failure, 120 s after its third.
    let backoffs: Vec<f64> = sim
        .events
        .iter()
        .filter_map(|e| match e {
            Event::BackingOff { client, for_secs, .. } if client == "hospital-b" => Some(*for_secs),
            _ => None,
        })
        .collect();
    assert_eq!(backoffs, vec![60.0, 120.0, 240.0]);
    assert!(sim.now - started >= Duration::from_secs(60 + 120), "rounds waited for the backoff");
}

/// Failure 2 of the issue: the driver spends 35 s (a slow test-set evaluation) after each
/// round. The next round's deadlines start when its phases start, so nothing aborts; and
/// replies that arrive exactly at a deadline are taken before it fires.
#[test]
fn a_slow_driver_between_rounds_aborts_nothing_and_replies_at_the_deadline_count() {
    let sites: Vec<(String, Behaviour)> = (0..4)
        .map(|i| (format!("c{i:03}"), Behaviour { latency: Duration::from_secs(5), ..Behaviour::default() }))
        .collect();
    let mut sim = Sim::with_sites(federation(Collection::Secure, 4, 4), SPEC, 9, sites, false);
    sim.after_round = Duration::from_secs(35);
    assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 4 });
    count(&sim);
    assert!(sim.reports.iter().all(|r| r.completed && r.participants == 4), "{:?}", sim.reports);
}

#[test]
fn differential_privacy_is_accounted_every_round_and_the_budget_stops_the_federation() {
    let mut fed = federation(Collection::Secure, 200, 4);
    fed.min_clients = 3;
    fed.dp = Some(DpConfig {
        clip: 1.0,
        noise_multiplier: 2.0,
        per_segment: false,
        delta: 1e-5,
        epsilon_budget: Some(2.0),
        count_noise: None,
        adaptive: None,
    });
    let mut sim = Sim::new(fed, SPEC, 16, 4, false);
    let stop = sim.run(Duration::from_secs(1_000_000));
    count(&sim);
    let StopReason::Budget { epsilon, budget, .. } = stop else { panic!("{stop:?}") };
    assert!(epsilon > budget && budget == 2.0);
    let epsilons: Vec<f64> = sim.reports.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(epsilons.windows(2).all(|w| w[1] > w[0]), "every round drew a sample and is accounted");
    assert!(*epsilons.last().unwrap() <= 2.0);
    assert!(sim.reports.iter().all(|r| r.sampling_rate == Some(0.25) && r.noise_multiplier == Some(2.0)));
    // Poisson sampling: the cohort size varies, and those sent plans are charged.
    let sizes: std::collections::BTreeSet<usize> = sim.reports.iter().map(|r| r.charged.len()).collect();
    assert!(sizes.len() > 1, "{sizes:?}");
    assert!(sim.reports.iter().filter(|r| r.completed).all(|r| r.charged.len() >= 3));
    // Write-ahead: each private round's start carries its sample and the sites charged, before
    // any of its plans (the driver stores them first, so a crash loses no accounting).
    for report in sim.reports.iter().filter(|r| !r.charged.is_empty()) {
        let started = sim.events.iter().find_map(|e| match e {
            Event::RoundStarted { round, cohort, noise_multiplier, sampling_rate, .. } if *round == report.round => {
                Some((cohort.clone(), *noise_multiplier, *sampling_rate))
            }
            _ => None,
        });
        assert_eq!(started, Some((report.charged.clone(), Some(2.0), Some(0.25))), "round {}", report.round);
    }
    let notes: Vec<&str> = sim.reports.iter().map(|r| r.note.as_str()).collect();
    assert!(sim.completed().len() > 5, "{notes:#?}");
}

#[test]
fn the_census_sums_the_populations_label_counts_and_evaluation_sums_confusions() {
    let mut fed = federation(Collection::Secure, 6, 5);
    fed.train.loss = LossConfig { scope: CountScope::Global, recount_every: Some(2), ..LossConfig::default() };
    fed.evaluate_every = Some(2);
    let mut sim = Sim::new(fed, SPEC, 5, 6, false);
    assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 6 });
    count(&sim);
    let census: Vec<(u64, usize, Vec<u64>)> = sim
        .events
        .iter()
        .filter_map(|e| match e {
            Event::CensusDone { round, clients, counts } => Some((*round, *clients, counts.clone())),
            _ => None,
        })
        .collect();
    // Every site has 12 examples, half of each class (see `dataset`); a census every 2 rounds.
    let population = vec![30, 30];
    assert_eq!(census, [1, 3, 5].map(|round| (round, 5, population.clone())).to_vec());
    for report in &sim.reports {
        let evaluated = report.round % 2 == 0;
        assert_eq!(report.federated.len(), usize::from(evaluated), "{report:?}");
        if let Some((_, metrics)) = report.federated.first() {
            assert_eq!(metrics.examples, 60, "every site's 12 examples, summed");
        }
    }
}

#[test]
fn personal_heads_never_move_on_the_server() {
    let spec = "name='t'\ninput_shape=[2]\n[[trunk]]\nkind='linear'\nout=3\n[[heads]]\nname='y'\nclasses=2\n\
                [[heads]]\nname='mine'\nclasses=2\npersonal=true";
    let mut sim = Sim::new(federation(Collection::Secure, 3, 3), spec, 3, 8, true);
    let segments =
        Model::new(&ModelSpec::from_toml(spec).unwrap(), &Device::Cpu, 7).unwrap().layout().segments().to_vec();
    let mine = segments.iter().find(|s| s.personal).unwrap();
    let range = mine.offset..mine.offset + mine.len;
    let before = sim.coordinator.global()[range.clone()].to_vec();
    sim.run(Duration::from_secs(10_000));
    count(&sim);
    assert_eq!(sim.completed().len(), 3);
    assert_eq!(sim.coordinator.global()[range].to_vec(), before);
    assert!(sim.sites.values().all(|s| s.trainer.personal_heads().contains_key("mine")));
}

#[test]
fn too_few_clients_stop_the_federation_after_the_wait() {
    let mut sim = Sim::new(federation(Collection::Plain, 3, 3), SPEC, 1, 1, false);
    let stop = sim.run(Duration::from_secs(1_000));
    assert_eq!(stop, StopReason::NotEnoughClients { connected: 1, needed: 2, waited_secs: 30.0 });
}

/// Review finding: with secure collection and the default `min_clients = 1`, one connected site
/// made a cohort of one, whose session cannot start; five such aborts in milliseconds stopped
/// the server before a second site connected. A secure round now waits for three (two with the
/// operator's consent to sums of two).
#[test]
fn a_secure_federation_waits_for_three_sites_even_with_min_clients_one() {
    let mut fed = federation(Collection::Secure, 3, 3);
    fed.min_clients = 1;
    let mut sim = Sim::new(fed, SPEC, 1, 1, false);
    let stop = sim.run(Duration::from_secs(1_000));
    assert_eq!(stop, StopReason::NotEnoughClients { connected: 1, needed: 3, waited_secs: 30.0 });
    assert!(sim.reports.is_empty(), "no round was tried with one site: {:?}", sim.reports);
}

/// Review finding: a survivor that withholds its shares for unmasking made the sum fail without
/// being named, so it never backed off and aborted rounds for ever. It is now named in the
/// abort and its failures count.
#[test]
fn a_site_withholding_its_unmask_shares_is_named_and_backs_off() {
    let mut sites: Vec<(String, Behaviour)> = (0..3).map(|i| (format!("c{i:03}"), Behaviour::default())).collect();
    sites[1].1.silent_at = Some((1, Phase::Unmask));
    sites[1].1.silent_from = Some((2, Phase::Unmask));
    let mut fed = federation(Collection::Secure, 2, 3);
    fed.backoff = SiteBackoff { after_failures: 2, initial_secs: 600.0, max_secs: 600.0 };
    fed.max_consecutive_aborts = 10;
    let mut sim = Sim::with_sites(fed, SPEC, 3, sites, false);
    sim.run(Duration::from_secs(100_000));
    count(&sim);
    let first = &sim.reports[0];
    assert!(!first.completed, "{first:?}");
    assert!(first.note.contains("c001 missed the 5 s deadline for shares for unmasking"), "{}", first.note);
    let backed_off = sim.events.iter().any(|e| matches!(e, Event::BackingOff { client, .. } if client == "c001"));
    assert!(backed_off, "the withholder backs off after failing twice");
}

/// Review finding: a straggler that answers each phase just before its deadline used to leave
/// the masked-input phase no time at all (its deadline was the round's, already past), and every
/// honest site was dropped for "missing" it. The phase now gets at least a phase's time.
#[test]
fn a_straggler_cannot_squeeze_the_masked_input_phase_to_nothing() {
    let mut sites: Vec<(String, Behaviour)> = (0..4).map(|i| (format!("c{i:03}"), Behaviour::default())).collect();
    sites[3].1.latency = Duration::from_millis(4_900);
    let mut fed = federation(Collection::Secure, 2, 4);
    fed.round_timeout_secs = 12.0;
    let mut sim = Sim::with_sites(fed, SPEC, 4, sites, false);
    assert_eq!(sim.run(Duration::from_secs(100_000)), StopReason::Finished { rounds: 2 });
    count(&sim);
    assert!(sim.reports.iter().all(|r| r.completed && r.participants == 4), "{:?}", sim.reports);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Generated dropouts: any site may vanish or fall silent at any phase of any round. Every
    /// round ends (completed or aborted with a note naming sites), the completed ones hold at
    /// least min_clients, and the federation completes its rounds or stops for aborts.
    #[test]
    fn generated_dropouts_never_wedge_a_federation(
        faults in proptest::collection::vec((0usize..6, 1u64..8, 0usize..6, any::<bool>()), 0..6),
        seed in any::<u64>(),
    ) {
        let phases = [Phase::Join, Phase::Advertise, Phase::ShareKeys,
            Phase::MaskedInput, Phase::Confirm, Phase::Unmask];
        let mut sites: Vec<(String, Behaviour)> = (0..6).map(|i| (format!("c{i:03}"), Behaviour::default())).collect();
        for (site, round, phase, vanish) in faults {
            if vanish {
                sites[site].1.vanish_at = Some((round, phases[phase]));
            } else {
                sites[site].1.silent_at = Some((round, phases[phase]));
            }
        }
        let mut fed = federation(Collection::Secure, 6, 6);
        fed.max_consecutive_aborts = 20;
        let mut sim = Sim::with_sites(fed, SPEC, seed, sites, false);
        let stop = sim.run(Duration::from_secs(1_000_000));
        count(&sim);
        let finished = matches!(stop, StopReason::Finished { rounds: 6 } | StopReason::NotEnoughClients { .. });
        prop_assert!(finished, "{:?}", stop);
        for r in &sim.reports {
            if r.completed {
                prop_assert!(r.participants >= 2);
            } else {
                prop_assert!(r.note.starts_with(&format!("round {} aborted: ", r.round)), "{}", r.note);
            }
        }
    }
}

/// The suite's size and speed (acceptance: at least 300 rounds across its cases in under 10 s;
/// timed assertions are flaky, so this one only checks the count of a fixed workload and
/// prints the time).
#[test]
fn hundreds_of_rounds_run_in_seconds() {
    let started = std::time::Instant::now();
    let mut sim = Sim::new(federation(Collection::Secure, 300, 5), SPEC, 10, 11, false);
    assert_eq!(sim.run(Duration::from_secs(10_000_000)), StopReason::Finished { rounds: 300 });
    count(&sim);
    println!(
        "300 secure rounds of 5 of 10 sites: {:.2} s ({} requests); {} rounds across the suite so far",
        started.elapsed().as_secs_f64(),
        sim.requests,
        ROUNDS_RUN.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(sim.completed().len(), 300);
}
