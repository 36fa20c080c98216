//! The federation's runs as the operator manages them while the server serves: [`submit`] (a
//! run file and its model, checked as `serve` would, copied into `runs/NAME/`, queued),
//! [`stop`], [`resume`], and [`records`] (where a run's rounds and checkpoints are). Each is a
//! plain write to or read of cohort.db; the running server picks the changes up within a second
//! (`serve::Server::host`).

use std::path::Path;

use cohort_io::files::{self, FileError};

use crate::config::{RunConfig, RUN_FILE, RUN_INITIAL_MODEL_FILE, RUN_MODEL_FILE};
use crate::pki::StatePaths;
use crate::serve::{RunSetup, ServeError};
use crate::store::{RunRow, RunStatus, Store, StoreError};
use cohort_io::unix_now;

#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] FileError),
    /// The run's test set or model does not load (the message names the file).
    #[error("{0}")]
    Setup(#[from] ServeError),
    #[error(
        "{dir} exists but no run `{name}` is recorded (left by an earlier submission that failed?); remove it or \
         choose another name"
    )]
    Leftover { dir: String, name: String },
}

/// What [`submit`] queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub model: String,
    pub rounds: u64,
    /// Runs queued or running before it.
    pub ahead: usize,
}

/// Checks run file `config` and its model as `serve` would (the test set is read now, so a
/// wrong path is found before the run's turn), keeps a copy of both in `runs/NAME/` (later edits
/// to the operator's files change nothing; the initial model too, if any), and queues the run.
pub fn submit(paths: &StatePaths, name: &str, config: &Path) -> Result<Submitted, RunsError> {
    let store = Store::open_existing(&paths.database())?;
    let run = RunConfig::load(config, name)?;
    if store.run(name)?.is_some() {
        return Err(StoreError::RunExists { name: name.into() }.into());
    }
    RunSetup::load(run.clone())?;
    let original = std::fs::read_to_string(config)
        .map_err(|source| FileError::Io { path: config.display().to_string(), source })?;
    let run_file = run
        .to_run_file(&original)
        .map_err(|message| FileError::Config { path: config.display().to_string(), message })?;
    let dir = paths.run(name);
    let runs_dir = paths.dir.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .map_err(|source| FileError::Io { path: runs_dir.display().to_string(), source })?;
    // Created, not found: of two `submit`s of one name at once, one gets the directory.
    match std::fs::create_dir(&dir.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(RunsError::Leftover { dir: dir.dir.display().to_string(), name: name.into() });
        }
        Err(source) => return Err(FileError::Io { path: dir.dir.display().to_string(), source }.into()),
    }
    files::write_atomic(&dir.dir.join(RUN_MODEL_FILE), run.spec.to_toml().as_bytes())?;
    if let Some(initial) = &run.initial_model {
        let target = dir.dir.join(RUN_INITIAL_MODEL_FILE);
        std::fs::copy(initial, &target)
            .map_err(|source| FileError::Io { path: target.display().to_string(), source })?;
    }
    files::write_atomic(&dir.dir.join(RUN_FILE), run_file.as_bytes())?;
    store.submit_run(name, &format!("runs/{name}"), &run.spec.name, run.federation.rounds, unix_now())?;
    let ahead = store
        .runs()?
        .iter()
        .filter(|r| r.name != name && matches!(r.status, RunStatus::Queued | RunStatus::Running))
        .count();
    Ok(Submitted { model: run.spec.name, rounds: run.federation.rounds, ahead })
}

/// Stops run `name`: a queued one at once, a running one within a second (the server abandons
/// its round in progress and keeps every completed one). Returns the run as it stood.
pub fn stop(paths: &StatePaths, name: &str) -> Result<RunRow, RunsError> {
    Ok(Store::open_existing(&paths.database())?.request_stop(name, unix_now())?)
}

/// Queues a stopped, failed or finished run again: it resumes from its last checkpoint (a
/// finished one finishes again at once unless its rounds were raised). Returns the run as it
/// stood; a queued or running one is left as it is.
pub fn resume(paths: &StatePaths, name: &str) -> Result<RunRow, RunsError> {
    let store = Store::open_existing(&paths.database())?;
    let row = store.run(name)?.ok_or_else(|| StoreError::NoRun { name: name.into() })?;
    if !matches!(row.status, RunStatus::Queued | RunStatus::Running) {
        store.set_run_status(name, RunStatus::Queued, "queued again by the operator", unix_now())?;
    }
    Ok(row)
}

/// What the most-used client has spent against the server over every private run of the
/// federation: runs on the same sites compose, while each run's account (and its
/// `epsilon_budget`) counts its own rounds only. Each client's private rounds of every run are
/// composed, unamplified (the server knows every sample), at `delta`. `None` unless more than one
/// run was private (one run's figure is that run's `epsilon_server`).
pub fn epsilon_across_runs(paths: &StatePaths, delta: f64) -> Result<Option<AcrossRuns>, RunsError> {
    let runs = Store::open_existing(&paths.database())?.runs()?;
    let mut per_client: std::collections::BTreeMap<String, Vec<(f64, f64, u64)>> = Default::default();
    let mut private_runs = 0;
    for run in &runs {
        let records = paths.records_of(&run.dir);
        if !records.database().is_file() {
            continue; // never started
        }
        let participations = Store::open_existing(&records.database())?.dp_participations()?;
        private_runs += usize::from(!participations.is_empty());
        for (client, z, rounds) in participations {
            per_client.entry(client).or_default().push((1.0, z, rounds));
        }
    }
    if private_runs < 2 {
        return Ok(None);
    }
    let most = per_client
        .into_iter()
        .map(|(client, mechanisms)| (client, cohort_common::dp::composed_epsilon(mechanisms, delta)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    Ok(most.map(|(client, epsilon)| AcrossRuns { client, epsilon, private_runs }))
}

/// [`epsilon_across_runs`]: who spent the most, and how much, over how many private runs.
#[derive(Debug, Clone, PartialEq)]
pub struct AcrossRuns {
    pub client: String,
    pub epsilon: f64,
    pub private_runs: usize,
}

/// Where the records of run `name` are, or (without a name) of the run in progress or the last
/// that ran; a state directory from before runs were recorded has its own.
pub fn records(paths: &StatePaths, name: Option<&str>) -> Result<(StatePaths, Option<RunRow>), RunsError> {
    let runs = Store::open_existing(&paths.database())?.runs()?;
    let row = match name {
        Some(name) => {
            Some(runs.into_iter().find(|r| r.name == name).ok_or_else(|| StoreError::NoRun { name: name.into() })?)
        }
        // The run in progress, else the one that started last.
        None => runs
            .into_iter()
            .filter(|r| r.started_at.is_some())
            .max_by_key(|r| (r.status == RunStatus::Running, r.started_at)),
    };
    Ok((row.as_ref().map_or_else(|| paths.clone(), |r| paths.records_of(&r.dir)), row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RoundRow;

    /// Review finding (issue 15): each run's epsilon against the server counts its own rounds
    /// only; a site in two private runs has spent both. `status` shows the composition.
    #[test]
    fn private_runs_on_the_same_sites_compose() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StatePaths::new(dir.path());
        let store = Store::open(&paths.database()).unwrap();
        store.queue_config_run("main", "m", 1, 1).unwrap();
        store.submit_run("again", "runs/again", "m", 1, 2).unwrap();
        store.start_run("main", 3).unwrap();
        assert_eq!(epsilon_across_runs(&paths, 1e-5).unwrap(), None, "no private round yet");
        // A private round of each run, site `a` sampled in both and `b` in one.
        let charge = |records: &StatePaths, cohort: &[&str]| {
            std::fs::create_dir_all(&records.dir).unwrap();
            let cohort: Vec<String> = cohort.iter().map(|c| c.to_string()).collect();
            let row = RoundRow::started(1, 4, cohort.len(), Some(1.0), 1.0, Some(0.0));
            Store::open(&records.database()).unwrap().record_round(&row, &[], &[], &cohort).unwrap();
        };
        charge(&paths, &["a", "b"]);
        assert_eq!(epsilon_across_runs(&paths, 1e-5).unwrap(), None, "one private run: its own figure");
        charge(&paths.run("again"), &["a"]);
        let across = epsilon_across_runs(&paths, 1e-5).unwrap().unwrap();
        let two_rounds = cohort_common::dp::composed_epsilon([(1.0, 1.0, 2)], 1e-5);
        let one_round = cohort_common::dp::composed_epsilon([(1.0, 1.0, 1)], 1e-5);
        assert_eq!((across.client.as_str(), across.private_runs), ("a", 2));
        assert!((across.epsilon - two_rounds).abs() < 1e-9 && across.epsilon > one_round, "{across:?}");
    }
}
