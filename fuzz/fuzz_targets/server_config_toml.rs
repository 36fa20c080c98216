//! `server.toml`: `cohort_server::config::ServerConfigFile::from_toml` on arbitrary UTF-8 (the
//! parse and every check `ServerConfig::load` makes before reading the model file), then the
//! checks against a model (`Federation::check_model`) and the path resolution of the test set.
#![no_main]

use std::path::Path;

use cohort_common::model::ModelSpec;
use cohort_server::config::ServerConfigFile;
use libfuzzer_sys::fuzz_target;

const SPEC: &str = "name = 'tiny'\ninput_shape = [4]\n[[trunk]]\nkind = 'linear'\nout = 8\n[[trunk]]\nkind = 'relu'\n\
                    [[heads]]\nname = 'y'\nclasses = 3\n[[heads]]\nname = 'digit'\nclasses = 10\npersonal = true\n";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = ServerConfigFile::from_toml(text) else { return };
    let spec = ModelSpec::from_toml(SPEC).expect("the fixed spec parses");
    let _ = file.federation.check_model(&spec);
    let _ = file.test_data.map(|d| d.resolve(Path::new("/etc/cohort")));
    let fed = &file.federation;
    if let Some(dp) = &fed.dp {
        let plan = dp.plan(dp.clip, fed.clients_per_round, fed.min_clients, 0.5, fed.clients_per_round as f64);
        plan.check().expect("a checked config makes a valid plan");
        let _ = dp.next_clip(dp.clip, 0.5);
    }
});
