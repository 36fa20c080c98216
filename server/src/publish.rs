//! Publishing finished rounds: the [`Publisher`] evaluates each completed round's model on the
//! operator's test sets, one after another off the event loop (so a slow evaluation never
//! holds up a round), records the metrics, and publishes every report in round order to the
//! log, the Prometheus metrics, the observer channel and the list `Server::run` returns.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;
use cohort_common::model::Model;
use cohort_common::train::{evaluate, per_class, DeviceData, Metrics, TrainError};
use tokio::sync::mpsc;
use tracing::info;

use crate::metrics::ServerMetrics;
use crate::serve::{blocking, test_head, RoundReport, RunSetup, ServeError};
use crate::store::{HeadMetrics, Store};

/// The first head on the test set, the other heads on theirs, and the seconds it took.
type Evaluated = (Option<Metrics>, Vec<(String, Metrics)>, f64);

/// Round reports kept in memory (and returned by `Server::run`); every round is in cohort.db.
const REPORTS_KEPT: usize = 100;

/// A finished round on its way to evaluation and publication.
pub(crate) struct Finished {
    pub report: RoundReport,
    /// The new global parameters (completed rounds).
    pub params: Option<Arc<Vec<f32>>>,
}

/// See the module documentation.
pub(crate) struct Publisher {
    run: String,
    model: Arc<Model>,
    test: Option<Arc<DeviceData>>,
    head_tests: Arc<Vec<(usize, String, DeviceData)>>,
    first_head: String,
    store: Arc<Mutex<Store>>,
    metrics: Arc<ServerMetrics>,
    events: Option<mpsc::UnboundedSender<RoundReport>>,
    reports: VecDeque<RoundReport>,
}

impl Publisher {
    #[allow(clippy::type_complexity)]
    pub(crate) fn start(
        setup: &RunSetup,
        events: Option<mpsc::UnboundedSender<RoundReport>>,
        store: &Arc<Mutex<Store>>,
        metrics: &Arc<ServerMetrics>,
    ) -> Result<
        (mpsc::UnboundedSender<Finished>, tokio::task::JoinHandle<Result<Vec<RoundReport>, ServeError>>),
        ServeError,
    > {
        // A model of its own: evaluation runs while the driver writes the next checkpoint.
        let model = Arc::new(Model::new(&setup.spec, &Device::Cpu, setup.federation.seed)?);
        let test = setup.test_data.as_ref().map(|d| DeviceData::new(d, &model).map(Arc::new)).transpose()?;
        let mut head_tests = Vec::new();
        for (name, data) in &setup.head_tests {
            head_tests.push((test_head(&setup.spec, name, data)?, name.clone(), DeviceData::new(data, &model)?));
        }
        let mut publisher = Publisher {
            run: setup.name.clone(),
            model,
            test,
            head_tests: Arc::new(head_tests),
            first_head: setup.spec.heads.first().map(|h| h.name.clone()).unwrap_or_default(),
            store: store.clone(),
            metrics: metrics.clone(),
            events,
            reports: VecDeque::new(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Finished>();
        let task = tokio::spawn(async move {
            while let Some(finished) = rx.recv().await {
                publisher.publish(finished).await?;
            }
            Ok(publisher.reports.into())
        });
        Ok((tx, task))
    }

    async fn publish(&mut self, finished: Finished) -> Result<(), ServeError> {
        let Finished { mut report, params } = finished;
        if let Some(params) = params.filter(|_| self.test.is_some() || !self.head_tests.is_empty()) {
            let (model, test, heads) = (self.model.clone(), self.test.clone(), self.head_tests.clone());
            let evaluated = blocking(move || -> Result<Evaluated, ServeError> {
                let started = Instant::now();
                model.set_flat(&params)?;
                let first = test.map(|d| evaluate(&model, 0, &d, 1000)).transpose()?;
                let heads = heads
                    .iter()
                    .map(|(head, name, d)| Ok((name.clone(), evaluate(&model, *head, d, 1000)?)))
                    .collect::<Result<Vec<_>, TrainError>>()?;
                Ok((first, heads, started.elapsed().as_secs_f64()))
            })
            .await??;
            let (first, heads, seconds) = evaluated;
            let rows: Vec<HeadMetrics> = first
                .iter()
                .map(|m| (self.first_head.clone(), m))
                .chain(heads.iter().map(|(h, m)| (h.clone(), m)))
                .map(|(head, metrics)| HeadMetrics { head, metrics: metrics.clone() })
                .collect();
            let (store, round, recorded) = (self.store.clone(), report.round, first.clone());
            blocking(move || store.lock().expect("store lock").set_test_metrics(round, recorded.as_ref(), &rows))
                .await??;
            report.test = first;
            report.head_tests = heads;
            report.eval_seconds = Some(seconds);
        }
        match &report.test {
            Some(m) => info!(
                run = %self.run,
                round = report.round,
                participants = report.participants,
                seconds = format!("{:.3}", report.seconds),
                accuracy = format!("{:.4}", m.accuracy),
                balanced_accuracy = format!("{:.4}", m.balanced_accuracy),
                macro_f1 = format!("{:.4}", m.macro_f1),
                recall = %per_class(&m.per_class_recall),
                loss = format!("{:.4}", m.loss),
                "round complete"
            ),
            None => info!(
                run = %self.run,
                round = report.round,
                completed = report.completed,
                participants = report.participants,
                "round finished"
            ),
        }
        self.metrics.record(&report, &self.first_head);
        if let Some(events) = &self.events {
            let _ = events.send(report.clone());
        }
        if self.reports.len() == REPORTS_KEPT {
            self.reports.pop_front();
        }
        self.reports.push_back(report);
        Ok(())
    }
}
