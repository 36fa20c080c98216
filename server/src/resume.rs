//! Resuming: what cohort.db and the checkpoint files remember of earlier runs, read into the
//! coordinator's [`Resume`] (rounds recorded and completed, the last model and the server
//! optimizer's state, the privacy account's history, the last census).

use std::collections::BTreeMap;
use std::sync::Mutex;

use cohort_common::coordinator::{PrivacyRow, Resume};
use cohort_common::model::{vectors_from_safetensors, Model};
use tracing::{info, warn};

use crate::serve::{ServeError, ServeSetup};
use crate::store::Store;

/// What cohort.db and the checkpoint files remember of earlier runs. Rounds a server was
/// running when it stopped are marked interrupted first (their samples are already accounted).
pub(crate) fn resume(store: &Mutex<Store>, setup: &ServeSetup, model: &Model) -> Result<Resume, ServeError> {
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
        let path = setup.state.dir.join(checkpoint);
        let damaged = |problem: String| ServeError::Checkpoint { path: path.display().to_string(), problem };
        let bytes = std::fs::read(&path).map_err(|e| damaged(e.to_string()))?;
        model.load_safetensors(&bytes).map_err(|e| damaged(e.to_string()))?;
        resume.params = Some(model.flat()?);
        info!(round, checkpoint = %path.display(), "resuming from the last completed round");
        resume.optimizer = saved_optimizer(setup, round, model.layout().total_len())?;
    }
    Ok(resume)
}

/// The server optimizer's state saved with round `round`'s checkpoint. A missing file (an
/// older state directory) restarts the optimizer from zero, with a warning; a damaged one is
/// an error.
fn saved_optimizer(
    setup: &ServeSetup,
    round: u64,
    params: usize,
) -> Result<Option<BTreeMap<String, Vec<f32>>>, ServeError> {
    if setup.federation.strategy.build(params).map(|s| s.state().is_empty()).unwrap_or(true) {
        return Ok(None);
    }
    let path = setup.state.optimizer_checkpoint(round);
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
