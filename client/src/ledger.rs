//! The client's privacy ledger on disk (`privacy-ledger.json` in its state directory): what
//! this client has spent of its own epsilon budget, in every federation it took part in, kept
//! across restarts. The accounting itself is [`cohort_common::dp::PrivacyLedger`]; this module
//! loads it, and writes it atomically after every decision, before the client answers the server.

use std::path::{Path, PathBuf};

use cohort_common::dp::{Accounting, DpPlan, LedgerRefusal, PrivacyLedger};
use cohort_io::files::{self, FileError};

/// The file name inside the state directory.
pub const LEDGER_FILE: &str = "privacy-ledger.json";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Refused(#[from] LedgerRefusal),
    #[error("cannot record the privacy ledger: {0}")]
    Write(#[from] FileError),
}

/// A ledger and the file that keeps it.
#[derive(Debug)]
pub struct LedgerFile {
    path: PathBuf,
    ledger: PrivacyLedger,
}

impl LedgerFile {
    /// Opens the ledger in `state_dir`, or starts one. The budget, delta and accounting come
    /// from the config (a raised budget lets a client that stopped take part again); what was
    /// spent is kept.
    pub fn open(state_dir: &Path, max_epsilon: f64, delta: f64, accounting: Accounting) -> Result<Self, FileError> {
        let path = state_dir.join(LEDGER_FILE);
        let bad = |message: String| FileError::Config { path: path.display().to_string(), message };
        let fresh = PrivacyLedger::new(max_epsilon, delta, accounting).map_err(|e| bad(format!("privacy: {e}")))?;
        let ledger = match std::fs::read(&path) {
            Ok(bytes) => {
                let mut kept: PrivacyLedger = serde_json::from_slice(&bytes).map_err(|e| {
                    bad(format!(
                        "the privacy ledger is unreadable ({e}); it records what this client has spent, so restore \
                         it from a backup (removing it forgets the spending)"
                    ))
                })?;
                if kept.max_epsilon != max_epsilon {
                    kept.exhausted = false;
                }
                PrivacyLedger { max_epsilon, delta, accounting, ..kept }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh,
            Err(source) => return Err(FileError::Io { path: path.display().to_string(), source }),
        };
        Ok(Self { path, ledger })
    }

    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }

    /// Decides on `round` of `federation` (see [`PrivacyLedger::admit`]) and writes the ledger
    /// before returning.
    pub fn admit(&mut self, federation: &str, round: u64, joined_at: u64, plan: &DpPlan) -> Result<f64, LedgerError> {
        let decision = self.ledger.admit(federation, round, joined_at, plan);
        let json = serde_json::to_vec_pretty(&self.ledger).expect("the ledger serializes");
        files::write_atomic(&self.path, &json)?;
        Ok(decision?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> DpPlan {
        DpPlan {
            clip: 1.0,
            per_segment: false,
            noise_multiplier: 1.0,
            count_noise: 1.0,
            min_survivors: 2,
            sampling_rate: 0.5,
            expected_clients: 2.0,
        }
    }

    #[test]
    fn the_ledger_survives_a_restart_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fed = "ca:ab/federation:cd";
        let mut file = LedgerFile::open(dir.path(), 5.0, 1e-5, Accounting::Participations).unwrap();
        let spent = file.admit(fed, 1, 1, &plan()).unwrap();
        let reopened = LedgerFile::open(dir.path(), 5.0, 1e-5, Accounting::Participations).unwrap();
        assert_eq!(reopened.ledger().rounds_charged(), 1);
        assert_eq!(reopened.ledger().spent[0].federation, fed);
        assert!((reopened.ledger().epsilon() - spent).abs() < 1e-12);

        let mut file = reopened;
        let refused = (2..1000).find_map(|r| file.admit(fed, r, 1, &plan()).err()).unwrap();
        assert!(matches!(refused, LedgerError::Refused(LedgerRefusal::OverBudget { .. })), "{refused}");
        let mut after_restart = LedgerFile::open(dir.path(), 5.0, 1e-5, Accounting::Participations).unwrap();
        assert!(matches!(
            after_restart.admit(fed, 5000, 1, &plan()),
            Err(LedgerError::Refused(LedgerRefusal::Exhausted { .. }))
        ));

        let bytes = std::fs::read(dir.path().join(LEDGER_FILE)).unwrap();
        std::fs::write(dir.path().join(LEDGER_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let err = LedgerFile::open(dir.path(), 5.0, 1e-5, Accounting::Participations).unwrap_err().to_string();
        assert!(err.contains(LEDGER_FILE) && err.contains("unreadable"), "{err}");
    }
}
