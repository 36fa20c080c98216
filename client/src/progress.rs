//! The data owner's view of local training: a progress bar on a terminal, a log line every
//! [`LOG_EVERY`] otherwise (a service's journal), so a 48-second CNN round is not silence.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_common::train::TrainProgress;
use cohort_common::trainer::ProgressObserver;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

/// How often a log line reports progress when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Where one round's training stands, as the display last showed it.
struct Shown {
    round: u64,
    started: Instant,
    logged: Instant,
    bar: Option<ProgressBar>,
}

/// The observer the daemon's trainer reports to: a bar when stderr is a terminal, log lines
/// otherwise.
pub fn observer() -> ProgressObserver {
    reporter(std::io::stderr().is_terminal())
}

fn reporter(terminal: bool) -> ProgressObserver {
    let shown: Mutex<Option<Shown>> = Mutex::new(None);
    Arc::new(move |round, at: TrainProgress| {
        let now = Instant::now();
        let mut shown = shown.lock().expect("progress lock");
        if shown.as_ref().is_none_or(|s| s.round != round || at.step <= 1) {
            if let Some(bar) = shown.take().and_then(|s| s.bar) {
                bar.finish_and_clear();
            }
            let bar = terminal.then(|| {
                let bar = ProgressBar::with_draw_target(Some(at.steps as u64), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("training round {msg} [{bar:30}] {pos}/{len} steps, {eta} left")
                        .expect("a valid template")
                        .progress_chars("=> "),
                );
                bar.set_message(round.to_string());
                bar
            });
            *shown = Some(Shown { round, started: now, logged: now, bar });
        }
        let s = shown.as_mut().expect("set above");
        match &s.bar {
            Some(bar) => {
                bar.set_position(at.step as u64);
                if at.step >= at.steps {
                    bar.finish_and_clear();
                }
            }
            None if now.duration_since(s.logged) >= LOG_EVERY && at.step < at.steps => {
                s.logged = now;
                info!(round, "training: {}", describe(at, now.duration_since(s.started)));
            }
            None => {}
        }
    })
}

/// `120/600 steps (20%), about 40 s left`.
fn describe(at: TrainProgress, elapsed: Duration) -> String {
    let done = at.step as f64 / at.steps.max(1) as f64;
    let left = if at.step == 0 { 0.0 } else { elapsed.as_secs_f64() * (1.0 - done) / done };
    format!("{}/{} steps ({:.0}%), about {left:.0} s left", at.step, at.steps, done * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_steps_percent_and_time_left() {
        let line = describe(TrainProgress { step: 150, steps: 600 }, Duration::from_secs(10));
        assert_eq!(line, "150/600 steps (25%), about 30 s left");
        assert_eq!(describe(TrainProgress { step: 0, steps: 0 }, Duration::ZERO), "0/0 steps (0%), about 0 s left");
        // Every step of two rounds, out of order between them, without a terminal: no panic.
        let observe = reporter(false);
        for round in [1, 2, 1] {
            for step in 1..=5 {
                observe(round, TrainProgress { step, steps: 5 });
            }
        }
    }
}
