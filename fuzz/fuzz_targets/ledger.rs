//! The client's privacy ledger file (`privacy-ledger.json`): `cohort_client::ledger::parse_ledger`
//! on arbitrary bytes, then what the client does with a ledger it kept: sum what it spent and
//! decide on the next round of a private plan.
//!
//! The first byte chooses the accounting and the plan's sampling rate, and whether the spending
//! is computed at all: the RDP accountant takes up to a second per ledger entry for some rates
//! (`dp::log_a_frac` is quadratic in its series length), which would otherwise leave the parser
//! itself fuzzed at a few dozen inputs per second.
#![no_main]

use cohort_client::ledger::parse_ledger;
use cohort_common::dp::{Accounting, DpPlan, PrivacyLedger};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else { return };
    let accounting = if mode & 1 == 0 { Accounting::Participations } else { Accounting::SampledRounds };
    let configured = PrivacyLedger::new(8.0, 1e-5, accounting).expect("a valid budget");
    let Ok(mut ledger) = parse_ledger(file, configured) else { return };
    if mode & 0x80 == 0 {
        return;
    }
    assert!(!(ledger.epsilon() < 0.0), "a kept ledger never gives back spending");
    let _ = ledger.rounds_charged();
    let plan = DpPlan {
        clip: 1.0,
        per_segment: false,
        noise_multiplier: 1.0,
        count_noise: 1.0,
        min_survivors: 2,
        sampling_rate: [0.01, 0.5, 1.0][((mode >> 1) & 3) as usize % 3],
        expected_clients: 10.0,
    };
    let federation = ledger.spent.first().map(|s| s.federation.clone()).unwrap_or_default();
    let round = ledger.spent.iter().map(|s| s.last_round).max().unwrap_or(0);
    for (fed, r) in [(federation.as_str(), round), (federation.as_str(), round.wrapping_add(1)), ("other", 1)] {
        let _ = ledger.admit(fed, r, u64::from(mode), &plan);
        // `LedgerFile::admit` writes the ledger back after every decision.
        let json = serde_json::to_vec_pretty(&ledger).expect("the ledger serializes");
        assert!(serde_json::from_slice::<PrivacyLedger>(&json).is_ok(), "the ledger reads back");
    }
});
