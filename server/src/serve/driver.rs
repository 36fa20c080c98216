//! One run's round driver: the event loop between the run's state machine
//! ([`Coordinator`]) and the network, files and database. Each turn it tells the coordinator who
//! is connected, sends what the coordinator asks for on new streams of its clients' connections
//! and hands back the replies (or why none came), keeps the coordinator's timer, writes
//! checkpoints and records rounds. Replies are taken before connections coming and going, and
//! those before the timer, so a deadline never wins over replies already waiting. Every decision
//! (who is sampled, what a plan holds, when a phase ends, why a round aborted, when to stop) is
//! the coordinator's.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use cohort_common::coordinator::{
    Checkpoint, Coordinator, CoordinatorSetup, Event, Output, Request, RequestId, StopReason,
};
use cohort_common::model::{vectors_to_safetensors, Model};
use cohort_common::wire::{self, ClientId, ClientMsg, ServerMsg, Task};
use cohort_io::{files, recv_msg, unix_now, NetError};
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{blocking, RoundReport, RunSetup, ServeError, Server, RUN_POLL};
use crate::config::Collection;
use crate::pki::StatePaths;
use crate::publish::{Finished, Publisher};
use crate::store::{RoundRow, Store};

/// A run being driven: where its records are, and its database.
struct RunContext {
    paths: StatePaths,
    store: Arc<Mutex<Store>>,
}

/// How a run's drive ended without an error.
pub(super) enum RunEnd {
    /// Every configured round completed, or the privacy budget is spent.
    Finished,
    /// The operator stopped the run, or the server is shutting down.
    Interrupted,
}

/// A reply, or why none came, for the coordinator.
type Reply = (RequestId, ClientId, Result<ClientMsg, String>);

impl Server {
    /// One run's event loop: replies first, then connections coming and going, then the timer.
    /// `end_run` ends the run early (the operator's `stop`, or `shutdown`).
    pub(super) async fn drive(
        &self,
        run: &RunSetup,
        paths: StatePaths,
        shutdown: &CancellationToken,
        end_run: &CancellationToken,
        cheaters: &mut BTreeSet<ClientId>,
    ) -> Result<(RunEnd, Vec<RoundReport>), ServeError> {
        let fed = &run.federation;
        let store = match paths.dir == self.setup.state.dir {
            true => self.store.clone(),
            false => {
                std::fs::create_dir_all(&paths.dir)
                    .map_err(|source| files::FileError::Io { path: paths.dir.display().to_string(), source })?;
                Arc::new(Mutex::new(Store::open(&paths.database())?))
            }
        };
        let ctx = RunContext { paths, store };
        let model = Arc::new(Model::new(&run.spec, &Device::Cpu, fed.seed)?);
        let resume = crate::resume::resume(&ctx.store, run, &ctx.paths, &model)?;
        // A resumed run goes on from its checkpoint; a new one starts from its initial model.
        if let (Some(path), None) = (&run.initial_model, &resume.params) {
            model.set_flat(&crate::config::read_initial_model(path, &run.spec.name, model.layout())?)?;
        }
        let setup = CoordinatorSetup {
            run: run.name.clone(),
            federation: fed.clone(),
            spec: run.spec.clone(),
            segments: model.layout().segments().to_vec(),
            initial: model.flat()?,
            resume,
            verifier: Arc::new(self.verifier.clone()),
            // Fresh OS randomness: nothing a client receives lets it redraw a private sample.
            rng: Box::new(rand::rngs::StdRng::from_os_rng()),
        };
        let mut coordinator = Coordinator::new(setup, Instant::now()).map_err(|e| ServeError::Config(e.to_string()))?;
        coordinator.exclude_cheaters(cheaters.iter().cloned());
        coordinator.set_enrolled(self.enrolled()?);
        // Together: a welcome names the run with that run's next round.
        self.set_welcome(&run.name, coordinator.next_round());
        let collection = match fed.collection {
            Collection::Plain => "plain (the server sees each update; for debugging and comparison only)",
            Collection::Secure => "secure (SecAgg+: the server learns only the sum of each cohort's updates)",
        };
        let params = model.layout().total_len();
        info!(addr = %self.local_addr(), run = %run.name, model = %run.spec.name, params, collection, "serving");
        if fed.collection == Collection::Plain {
            warn!("plain collection: the server sees every client's update; use it for debugging and comparison only");
        }
        let (publisher, published) = Publisher::start(run, self.setup.events.clone(), &ctx.store, &self.metrics)?;
        let (reply_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
        let mut requests = JoinSet::new();
        let mut encoded: Option<(Arc<ServerMsg>, Arc<Vec<u8>>)> = None;
        let mut told: BTreeSet<ClientId> = BTreeSet::new();
        let changed = self.registry.changed.notified();
        tokio::pin!(changed);
        let mut stop_poll = tokio::time::interval(RUN_POLL);
        let stopped = loop {
            changed.as_mut().enable();
            let now = Instant::now();
            let connected: BTreeSet<ClientId> = self.registry.ids().into_iter().collect();
            for gone in told.difference(&connected) {
                coordinator.client_disconnected(gone);
            }
            if connected.difference(&told).next().is_some() {
                // A newly enrolled client may be among them: the population of private rounds.
                coordinator.set_enrolled(self.enrolled()?);
            }
            for new in connected.difference(&told) {
                coordinator.client_connected(new, now);
            }
            told = connected;
            let mut stop = None;
            while let Some(output) = coordinator.poll_output() {
                match output {
                    Output::Send(request) => self.send(request, &mut encoded, &mut requests, &reply_tx),
                    Output::Event(Event::Stopped(reason)) => stop = Some(reason),
                    Output::Event(event) => {
                        // Left out of the runs that follow too, while this server runs.
                        if let Event::Cheater { client, .. } = &event {
                            cheaters.insert(client.clone());
                        }
                        self.act(&ctx, event, &model, &publisher, &mut coordinator).await?
                    }
                }
            }
            self.registry.next_round.store(coordinator.next_round(), Ordering::Relaxed);
            self.set_live(Some(&run.name), Some(coordinator.activity().to_string()));
            if let Some(reason) = stop {
                break Some(reason);
            }
            let timer = coordinator.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = end_run.cancelled() => break None,
                Some((request, from, reply)) = replies.recv() => {
                    coordinator.handle_reply(request, &from, reply, Instant::now());
                }
                _ = &mut changed => changed.set(self.registry.changed.notified()),
                _ = sleep_until(timer) => coordinator.handle_timeout(Instant::now()),
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
                _ = stop_poll.tick() => {
                    let store = self.store.clone();
                    let name = run.name.clone();
                    let row = blocking(move || store.lock().expect("store lock").run(&name)).await??;
                    if row.is_some_and(|r| r.stop_requested) {
                        end_run.cancel();
                    }
                }
            }
        };
        requests.shutdown().await;
        drop(publisher);
        let reports = published.await.map_err(|e| ServeError::Config(format!("the report task failed: {e}")))??;
        self.set_live(None, None);
        self.set_welcome("", 0);
        match stopped {
            None => {
                match shutdown.is_cancelled() {
                    true => info!(
                        run = %run.name,
                        "shutdown requested: a round in progress is abandoned and not recorded; it reruns after a \
                         restart"
                    ),
                    false => {
                        info!(run = %run.name, "stop requested: a round in progress is abandoned and not recorded")
                    }
                }
                Ok((RunEnd::Interrupted, reports))
            }
            Some(StopReason::Finished { rounds }) => {
                info!(run = %run.name, rounds, "every configured round is complete");
                Ok((RunEnd::Finished, reports))
            }
            Some(reason @ StopReason::Budget { .. }) => {
                warn!(run = %run.name, "{reason}");
                Ok((RunEnd::Finished, reports))
            }
            Some(StopReason::TooManyAborts { .. }) => {
                let reason = stopped.expect("matched").to_string();
                warn!("{reason}");
                Err(ServeError::Aborts(reason))
            }
            Some(StopReason::NotEnoughClients { connected, needed, waited_secs }) => {
                Err(ServeError::NotEnoughClients { connected, needed, waited: waited_secs })
            }
        }
    }

    /// Sends a request on a new stream of its client's connection; the reply (or why none came)
    /// goes back to the loop. Clients that get one message share one encoding of it.
    fn send(
        &self,
        request: Request,
        encoded: &mut Option<(Arc<ServerMsg>, Arc<Vec<u8>>)>,
        requests: &mut JoinSet<()>,
        replies: &mpsc::UnboundedSender<Reply>,
    ) {
        let Request { id, to, msg, reply_cap, deadline } = request;
        let frame = match encoded.as_ref().filter(|(m, _)| Arc::ptr_eq(m, &msg)) {
            Some((_, frame)) => Ok(frame.clone()),
            None => wire::encode(msg.as_ref()).map(Arc::new),
        };
        let frame = match frame {
            Ok(frame) => {
                *encoded = Some((msg, frame.clone()));
                frame
            }
            Err(e) => {
                let _ = replies.send((id, to, Err(format!("the request could not be encoded: {e}"))));
                return;
            }
        };
        let Some(conn) = self.registry.connection(&to) else {
            let _ = replies.send((id, to, Err("disconnected".into())));
            return;
        };
        let replies = replies.clone();
        // A little past the coordinator's deadline: by then it has stopped waiting.
        let give_up = tokio::time::Instant::from_std(deadline) + Duration::from_secs(1);
        requests.spawn(async move {
            let reply = match tokio::time::timeout_at(give_up, ask(&conn, &frame, reply_cap)).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("missed the deadline".into()),
            };
            let _ = replies.send((id, to, reply));
        });
    }

    /// Carries out what the coordinator reports: logs, records, checkpoints.
    async fn act(
        &self,
        ctx: &RunContext,
        event: Event,
        model: &Arc<Model>,
        publisher: &mpsc::UnboundedSender<Finished>,
        coordinator: &mut Coordinator,
    ) -> Result<(), ServeError> {
        match event {
            Event::RoundStarted { round, task, cohort, sampling_rate, noise_multiplier, too_few_probability } => {
                debug!(round, task = task.purpose(), ?cohort, "round starts");
                // Write-ahead for private rounds: the sample and the charges are stored before
                // any plan goes out, so a crash mid-round loses no accounting.
                if let (Task::Train, Some(z)) = (task, noise_multiplier) {
                    let store = ctx.store.clone();
                    let row = RoundRow::started(round, unix_now(), cohort.len(), sampling_rate, z, too_few_probability);
                    blocking(move || store.lock().expect("store lock").record_round(&row, &[], &[], &cohort)).await??;
                }
            }
            Event::Declined { round, task, client, reason } => {
                self.metrics.declined(&client);
                warn!(round, %client, task = task.purpose(), "the site declined: {reason}");
            }
            Event::BackingOff { client, failures, for_secs, last } => warn!(
                %client,
                "{failures} sessions in a row failed (the last: {last}); the site is not sampled for {for_secs:.0} s. \
                 Check the site's log"
            ),
            Event::Cheater { round, client, what } => warn!(
                round,
                %client,
                "client caught cheating in secure aggregation ({what}); it is sampled no more while this server runs: \
                 check the site, and revoke its certificate (`cohort-server revoke`) if it was compromised"
            ),
            Event::Notice { round, client: Some(client), text } => warn!(round, %client, "{text}"),
            Event::Notice { round, client: None, text } => warn!(round, "{text}"),
            Event::CensusDone { round, clients, counts } => {
                let store = ctx.store.clone();
                let recorded = counts.clone();
                blocking(move || store.lock().expect("store lock").record_census(round, clients, &recorded)).await??;
                info!(round, clients, ?counts, "label census: the population's label counts");
            }
            Event::CensusFailed { round, reason } => warn!(
                round,
                "label census failed ({reason}); clients weigh classes by their own counts until the next one"
            ),
            Event::RoundFinished { report, checkpoint } => {
                let started_at = unix_now() - report.seconds as i64;
                let relative = match &checkpoint {
                    Some(checkpoint) => Some(self.write_checkpoint(ctx, report.round, checkpoint, model).await?),
                    None => {
                        warn!(round = report.round, "{}", report.note);
                        None
                    }
                };
                // Recorded before evaluation: a crash during evaluation loses no round.
                self.record(ctx, &report, started_at, relative).await?;
                coordinator.set_enrolled(self.enrolled()?);
                let params = checkpoint.map(|c| c.params);
                let _ = publisher.send(Finished { report: *report, params });
            }
            Event::Stopped(_) => {}
        }
        Ok(())
    }

    /// Writes the global model (and the server optimizer's state) of a completed round.
    async fn write_checkpoint(
        &self,
        ctx: &RunContext,
        round: u64,
        checkpoint: &Checkpoint,
        model: &Arc<Model>,
    ) -> Result<String, ServeError> {
        model.set_flat(&checkpoint.params)?;
        let (state, model, optimizer) = (ctx.paths.clone(), model.clone(), checkpoint.optimizer.clone());
        // Serialising and syncing a large model takes a while: off the runtime.
        blocking(move || -> Result<(), ServeError> {
            if !optimizer.is_empty() {
                files::write_atomic(&state.optimizer_checkpoint(round), &vectors_to_safetensors(&optimizer))?;
            }
            files::write_atomic(&state.checkpoint(round), &model.to_safetensors()?)?;
            Ok(())
        })
        .await??;
        Ok(format!("checkpoints/round-{round:06}.safetensors"))
    }

    /// Records a round in the database, off the runtime (SQLite syncs every commit).
    async fn record(
        &self,
        ctx: &RunContext,
        r: &RoundReport,
        started_at: i64,
        checkpoint: Option<String>,
    ) -> Result<(), ServeError> {
        let row = RoundRow::from_report(r, started_at, checkpoint);
        let (store, participants) = (ctx.store.clone(), r.participant_ids.clone());
        let dropped = r.dropped.clone();
        // Private participations were charged when the round started (`Event::RoundStarted`).
        blocking(move || store.lock().expect("store lock").record_round(&row, &participants, &dropped, &[])).await??;
        Ok(())
    }
}

/// Sleeps until the coordinator's timer, or for ever without one.
async fn sleep_until(timer: Option<tokio::time::Instant>) {
    match timer {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends the request on a new stream and waits for the answer.
async fn ask(conn: &quinn::Connection, frame: &[u8], cap: usize) -> Result<ClientMsg, NetError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(cohort_io::classify)?;
    send.write_all(frame).await.map_err(|e| NetError::Stream(e.to_string()))?;
    let _ = send.finish();
    recv_msg(&mut recv, cap).await
}
