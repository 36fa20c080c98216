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
            Ok(bytes) => parse_ledger(&bytes, fresh).map_err(bad)?,
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

    /// Keeps `ledger` (as the client's session charged it: see
    /// `cohort_common::session::Action::SaveLedger`) and writes it before returning.
    pub fn record(&mut self, ledger: PrivacyLedger) -> Result<(), LedgerError> {
        let json = serde_json::to_vec_pretty(&ledger).expect("the ledger serializes");
        self.ledger = ledger;
        files::write_atomic(&self.path, &json)?;
        Ok(())
    }
}

/// The ledger in words, for `cohort-client ledger`: the whole budget, then what each account
/// (one run of one federation) has spent, in the order first charged.
pub fn describe(ledger: &PrivacyLedger) -> Vec<String> {
    let spent = ledger.epsilon();
    let mut lines = vec![format!(
        "budget:   epsilon {} at delta {}; spent {spent:.3}, left {:.3}{} (accounting: {})",
        ledger.max_epsilon,
        ledger.delta,
        (ledger.max_epsilon - spent).max(0.0),
        if ledger.exhausted { "; exhausted: this client takes part in no more private rounds" } else { "" },
        match ledger.accounting {
            Accounting::Participations => "each round taken part in, at full cost",
            Accounting::SampledRounds => "every round since joining, amplified by the server's sampling",
        }
    )];
    let mut keys: Vec<&str> = Vec::new();
    for s in &ledger.spent {
        if !keys.contains(&s.federation.as_str()) {
            keys.push(&s.federation);
        }
    }
    if keys.is_empty() {
        lines.push("spent:    nothing yet".into());
    }
    for key in keys {
        let entries: Vec<_> = ledger.spent.iter().filter(|s| s.federation == key).collect();
        let rounds: u64 = entries.iter().map(|s| s.count()).sum();
        let first = entries.iter().map(|s| s.first_round).min().unwrap_or(0);
        let last = entries.iter().map(|s| s.last_round).max().unwrap_or(0);
        let (federation, run) = match cohort_common::dp::split_run_key(key) {
            Some((federation, run)) => (federation, run),
            None => (key, "(before runs were named)"),
        };
        lines.push(format!(
            "run {}: epsilon {:.3} over {rounds} round(s) charged, rounds {first}-{last} ({})",
            cohort_io::escape(run, 64),
            ledger.epsilon_under(key),
            cohort_io::escape(federation, 120)
        ));
    }
    lines
}

/// Reads the bytes of a ledger file kept by an earlier run; `configured` is the ledger the
/// config makes (its budget, delta and accounting replace the kept ones; what was spent is kept,
/// and a changed budget lifts the exhaustion). The error says what to do.
pub fn parse_ledger(bytes: &[u8], configured: PrivacyLedger) -> Result<PrivacyLedger, String> {
    let mut kept: PrivacyLedger = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "the privacy ledger is unreadable ({e}); it records what this client has spent, so restore it from a \
             backup (removing it forgets the spending)"
        )
    })?;
    check_kept(&kept).map_err(|problem| {
        format!(
            "the privacy ledger is damaged ({problem}); it records what this client has spent, so restore it from a \
             backup (removing it forgets the spending)"
        )
    })?;
    if kept.max_epsilon != configured.max_epsilon {
        kept.exhausted = false;
    }
    let PrivacyLedger { max_epsilon, delta, accounting, .. } = configured;
    Ok(PrivacyLedger { max_epsilon, delta, accounting, ..kept })
}

/// What a ledger this client wrote always holds: every entry a round of real noise (a sampling
/// rate in (0, 1], a positive noise multiplier) over an ordered range of rounds, and a number of
/// rounds charged in all that can be counted.
fn check_kept(ledger: &PrivacyLedger) -> Result<(), String> {
    let mut charged = 0u64;
    for (i, s) in ledger.spent.iter().enumerate() {
        if !(s.sampling_rate > 0.0 && s.sampling_rate <= 1.0) {
            return Err(format!("spent[{i}].sampling_rate = {} is not in (0, 1]", s.sampling_rate));
        }
        if !(s.noise_multiplier.is_finite() && s.noise_multiplier > 0.0) {
            return Err(format!("spent[{i}].noise_multiplier = {} is not a positive number", s.noise_multiplier));
        }
        if s.first_round > s.last_round {
            return Err(format!("spent[{i}] runs from round {} back to round {}", s.first_round, s.last_round));
        }
        // `steps` 0: every round of the range (ledgers written before it was kept).
        let rounds = if s.steps == 0 { (s.last_round - s.first_round).saturating_add(1) } else { s.steps };
        charged =
            charged.checked_add(rounds).ok_or_else(|| format!("spent[{i}] charges more rounds than can be counted"))?;
    }
    if let Some(a) = ledger.federations.iter().find(|a| !(0.0..=1.0).contains(&a.max_sampling_rate)) {
        return Err(format!(
            "the sampling rate {} of federation `{}` is not in [0, 1]",
            a.max_sampling_rate, a.federation
        ));
    }
    Ok(())
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
    fn a_ledger_with_impossible_entries_is_refused_not_counted() {
        // Found by the `ledger` fuzz target: two entries whose steps add past u64::MAX made
        // counting the rounds charged overflow.
        let overflow: &[u8] = br#"{"max_epsilon":8.0,"delta":1e-5,"spent":[
            {"first_round":1,"last_round":2,"sampling_rate":1.0,"noise_multiplier":2.0,"steps":18446744073709551615},
            {"first_round":1,"last_round":2,"sampling_rate":1.0,"noise_multiplier":2.0,"steps":18446744073709551615}],
            "exhausted":false}"#;
        let configured = || PrivacyLedger::new(8.0, 1e-5, Accounting::Participations).unwrap();
        let err = parse_ledger(overflow, configured()).unwrap_err();
        assert!(err.contains("damaged") && err.contains("spent[1]"), "{err}");
        for (entry, field) in [
            (r#""sampling_rate":-1.0,"noise_multiplier":2.0"#, "sampling_rate"),
            (r#""sampling_rate":1.0,"noise_multiplier":0.0"#, "noise_multiplier"),
        ] {
            let text = format!(
                r#"{{"max_epsilon":8.0,"delta":1e-5,"spent":[{{"first_round":1,"last_round":1,{entry}}}],"exhausted":false}}"#
            );
            let err = parse_ledger(text.as_bytes(), configured()).unwrap_err();
            assert!(err.contains(field), "{err}");
        }
        let backwards = br#"{"max_epsilon":8.0,"delta":1e-5,"spent":[
            {"first_round":5,"last_round":1,"sampling_rate":1.0,"noise_multiplier":2.0}],"exhausted":false}"#;
        assert!(parse_ledger(backwards, configured()).unwrap_err().contains("back to round 1"));
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
