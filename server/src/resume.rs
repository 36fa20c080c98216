//! Resuming: what cohort.db and the checkpoint files remember of earlier runs, read into the
//! coordinator's [`Resume`] (rounds recorded and completed, the last model and the server
//! optimizer's state, the privacy account's history, the last census).

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::Device;
use cohort_common::coordinator::{PrivacyRow, Resume};
use cohort_common::model::{spec_from_safetensors, vectors_from_safetensors, Model};
use tracing::{info, warn};

use crate::pki::StatePaths;
use crate::serve::{RunSetup, ServeError};
use crate::store::Store;

/// What cohort.db and the checkpoint files remember of earlier runs. Rounds a server was
/// running when it stopped are marked interrupted first (their samples are already accounted).
pub(crate) fn resume(
    store: &Mutex<Store>,
    run: &RunSetup,
    paths: &StatePaths,
    model: &Model,
) -> Result<Resume, ServeError> {
    let store = store.lock().expect("store lock");
    let interrupted = store.mark_interrupted()?;
    if interrupted > 0 {
        warn!(
            "{interrupted} round(s) were in progress when the server last stopped: recorded as interrupted, their \
             samples accounted"
        );
    }
    let (last_round, done) = store.resume_point()?;
    let mut resume = Resume {
        last_round,
        completed: store.completed_rounds()?,
        privacy: store
            .rounds()?
            .iter()
            .map(|r| PrivacyRow {
                sampling_rate: r.sampling_rate,
                noise_multiplier: r.noise_multiplier,
                too_few_probability: r.too_few_probability,
                clip: r.clip,
                unclipped: r.unclipped,
            })
            .collect(),
        participations: store.dp_participations()?,
        census: store.last_census()?,
        ..Resume::default()
    };
    drop(store);
    if let Some((round, checkpoint)) = done {
        let (bytes, params) = read_checkpoint(paths, &checkpoint, Some(model))?;
        drop(bytes);
        resume.params = Some(params);
        info!(
            run = %run.name,
            round,
            checkpoint = %paths.dir.join(&checkpoint).display(),
            "resuming from the last completed round"
        );
        resume.optimizer = saved_optimizer(run, paths, round, model.layout().total_len())?;
    }
    Ok(resume)
}

/// Reads the checkpoint cohort.db names for a round, and checks it before anyone uses it: the
/// name must be one the server writes (`checkpoints/round-NNNNNN.safetensors`, so a damaged or
/// edited database cannot point at another file), and the file must hold a whole model (the
/// spec in its metadata, or `model`'s) with finite values. Returns the bytes and the flat
/// parameters.
pub fn read_checkpoint(
    state: &StatePaths,
    relative: &str,
    model: Option<&Model>,
) -> Result<(Vec<u8>, Vec<f32>), ServeError> {
    let path = state.dir.join(relative);
    let damaged = |problem: String| ServeError::Checkpoint { path: path.display().to_string(), problem };
    let name = relative.strip_prefix("checkpoints/round-").and_then(|r| r.strip_suffix(".safetensors"));
    if !name.is_some_and(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit())) {
        return Err(damaged(format!(
            "cohort.db names `{}` as a checkpoint, which is not a name the server writes \
             (checkpoints/round-NNNNNN.safetensors); the database was damaged or edited",
            cohort_io::escape(relative, 200)
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| damaged(e.to_string()))?;
    let built;
    let model = match model {
        Some(model) => model,
        None => {
            let spec = spec_from_safetensors(&bytes)
                .map_err(|e| damaged(e.to_string()))?
                .ok_or_else(|| damaged("the file carries no model spec in its metadata".into()))?;
            built = Model::new(&spec, &Device::Cpu, 0).map_err(|e| damaged(e.to_string()))?;
            &built
        }
    };
    model.load_safetensors(&bytes).map_err(|e| damaged(format!("{e}; the file is damaged")))?;
    let params = model.flat()?;
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        return Err(damaged(format!(
            "parameter {i} is {} (the model diverged before this checkpoint was written); resume from an earlier \
             round's checkpoint or start a new state directory",
            params[i]
        )));
    }
    Ok((bytes, params))
}

/// The server optimizer's state saved with round `round`'s checkpoint. A missing file (an
/// older state directory) restarts the optimizer from zero, with a warning; a damaged one is
/// an error.
fn saved_optimizer(
    run: &RunSetup,
    paths: &StatePaths,
    round: u64,
    params: usize,
) -> Result<Option<BTreeMap<String, Vec<f32>>>, ServeError> {
    if run.federation.strategy.build(params).map(|s| s.state().is_empty()).unwrap_or(true) {
        return Ok(None);
    }
    let path = paths.optimizer_checkpoint(round);
    if !path.exists() {
        warn!(round, "no saved state of the server optimizer for round {round}; it starts from zero");
        return Ok(None);
    }
    let damaged = |problem: String| ServeError::Checkpoint {
        path: path.display().to_string(),
        problem: format!("{problem}; remove the file to restart the server optimizer from zero"),
    };
    let bytes = std::fs::read(&path).map_err(|e| damaged(e.to_string()))?;
    Ok(Some(vectors_from_safetensors(&bytes).map_err(|e| damaged(e.to_string()))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_common::model::ModelSpec;

    fn state_with_checkpoint(bytes: &[u8]) -> (tempfile::TempDir, StatePaths) {
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path());
        std::fs::create_dir_all(state.checkpoints()).unwrap();
        std::fs::write(state.checkpoint(1), bytes).unwrap();
        (dir, state)
    }

    /// Issue 15: `export` followed whatever path cohort.db held (it copied /etc/hostname), copied a
    /// damaged checkpoint unchecked, and `serve` resumed from a NaN one silently.
    #[test]
    fn only_whole_finite_checkpoints_under_their_own_names_are_read() {
        let spec = ModelSpec::from_toml("name='t'\ninput_shape=[2]\n[[heads]]\nname='y'\nclasses=2").unwrap();
        let model = Model::new(&spec, &Device::Cpu, 1).unwrap();
        let good = model.to_safetensors().unwrap();
        let (_dir, state) = state_with_checkpoint(&good);
        let name = "checkpoints/round-000001.safetensors";
        let (bytes, params) = read_checkpoint(&state, name, None).unwrap();
        assert_eq!((bytes, params), (good.clone(), model.flat().unwrap()));
        for elsewhere in
            ["../../etc/hostname", "/etc/hostname", "checkpoints/../cohort.db", "checkpoints/round-1.safetensors"]
        {
            let err = read_checkpoint(&state, elsewhere, None).unwrap_err().to_string();
            assert!(err.contains("not a name the server writes"), "{elsewhere}: {err}");
        }
        let (_dir, damaged) = state_with_checkpoint(&good[..good.len() - 7]);
        assert!(read_checkpoint(&damaged, name, None).is_err(), "a truncated checkpoint");
        let mut nan = model.flat().unwrap();
        nan[3] = f32::NAN;
        model.set_flat(&nan).unwrap();
        let (_dir, diverged) = state_with_checkpoint(&model.to_safetensors().unwrap());
        let err = read_checkpoint(&diverged, name, Some(&model)).unwrap_err().to_string();
        assert!(err.contains("parameter 3 is NaN"), "{err}");
    }
}
