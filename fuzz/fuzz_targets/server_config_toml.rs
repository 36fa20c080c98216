//! `server.toml`: `cohort_server::config::ServerConfigFile::from_toml` on arbitrary UTF-8 (the
//! parse and every check `ServerConfig::load` makes before reading the model file), then, for a
//! file with a run, the checks against a model (`Federation::check_model`), the DP plan its
//! settings make and the path resolution of the test set; and the same text as a run file
//! (`RunConfigFile::from_toml`, what `cohort-server submit` reads), with the same checks.
#![no_main]

use std::path::Path;

use cohort_common::coordinator::config::Federation;
use cohort_common::model::ModelSpec;
use cohort_server::config::{RunConfigFile, ServerConfigFile};
use libfuzzer_sys::fuzz_target;

const SPEC: &str = "name = 'tiny'\ninput_shape = [4]\n[[trunk]]\nkind = 'linear'\nout = 8\n[[trunk]]\nkind = 'relu'\n\
                    [[heads]]\nname = 'y'\nclasses = 3\n[[heads]]\nname = 'digit'\nclasses = 10\npersonal = true\n";

/// What the server does with a checked federation before its first round.
fn use_federation(fed: &Federation) {
    let spec = ModelSpec::from_toml(SPEC).expect("the fixed spec parses");
    let _ = fed.check_model(&spec);
    if let Some(dp) = &fed.dp {
        let plan = dp.plan(dp.clip, fed.clients_per_round, fed.min_clients, 0.5, fed.clients_per_round as f64);
        plan.check().expect("a checked config makes a valid plan");
        let _ = dp.next_clip(dp.clip, 0.5);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(file) = ServerConfigFile::from_toml(text) {
        if let Some(fed) = &file.federation {
            use_federation(fed);
        }
        let _ = file.test_data.map(|d| d.resolve(Path::new("/etc/cohort")));
    }
    if let Ok(run) = RunConfigFile::from_toml(text) {
        use_federation(&run.federation);
        let _ = run.test_data.map(|d| d.resolve(Path::new("/etc/cohort")));
    }
});
