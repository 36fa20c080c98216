//! The `cohort-client` binary as a data owner runs it: `ledger` shows what each run spent of the
//! privacy budget, and a `[policy]` that cannot hold is refused before anything runs.

use std::process::Command;

use cohort_common::dp::{run_key, Accounting, DpPlan, PrivacyLedger};

const BASE: &str = "server = \"127.0.0.1:4433\"\nstate_dir = \"state\"\n[identity]\nbundle = \"b.pem\"\n\
                    [data]\nformat = \"csv\"\npath = \"d.csv\"\nlabel_column = \"y\"\nclasses = 2\n";

fn client(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-client")).args(args).arg(config).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_ledger_command_shows_each_run_and_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("client.toml");
    std::fs::write(&config, BASE).unwrap();
    let (ok, text) = client(&["ledger", "--config"], &config);
    assert!(ok && text.contains("no privacy budget"), "{text}");

    std::fs::write(&config, format!("{BASE}[privacy]\nmax_epsilon = 20.0\n[policy]\nmax_epsilon_per_run = 8.0\n"))
        .unwrap();
    let mut ledger = PrivacyLedger::new(20.0, 1e-5, Accounting::Participations).unwrap();
    let plan = DpPlan {
        clip: 1.0,
        per_segment: false,
        noise_multiplier: 1.0,
        count_noise: 1.0,
        min_survivors: 3,
        sampling_rate: 1.0,
        expected_clients: 3.0,
    };
    let fed = "ca:ab/federation:cd";
    for (run, rounds) in [("first", 2), ("second", 1)] {
        for round in 1..=rounds {
            ledger.admit_within(&run_key(fed, run), round, 1, &plan, Some(8.0)).unwrap();
        }
    }
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/privacy-ledger.json"), serde_json::to_vec(&ledger).unwrap()).unwrap();
    let (ok, text) = client(&["ledger", "--config"], &config);
    assert!(ok, "{text}");
    let spent = ledger.epsilon();
    assert!(text.contains(&format!("spent {spent:.3}, left {:.3}", 20.0 - spent)), "{text}");
    let first = ledger.epsilon_under(&run_key(fed, "first"));
    assert!(text.contains(&format!("run first: epsilon {first:.3} over 2 round(s) charged")), "{text}");
    assert!(text.contains("run second: epsilon") && text.contains("at most epsilon 8 per run"), "{text}");
}

#[test]
fn a_policy_that_cannot_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("client.toml");
    for (extra, expected) in [
        ("[policy]\nmax_epsilon_per_run = 2.0\n", "needs [privacy]"),
        ("[privacy]\nmax_epsilon = 1.0\n[policy]\nmax_epsilon_per_run = 2.0\n", "more than [privacy] max_epsilon"),
        ("[policy]\nmodels = []\n", "accepts no run"),
    ] {
        std::fs::write(&config, format!("{BASE}{extra}")).unwrap();
        let (ok, text) = client(&["ledger", "--config"], &config);
        assert!(!ok && text.contains(expected), "{extra}: {text}");
    }
}
