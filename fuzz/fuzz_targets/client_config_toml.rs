//! `client.toml`: `cohort_client::config::ClientConfig::from_toml` on arbitrary UTF-8 (the parse
//! and every check `ClientConfig::load` makes), then the checks the client makes before it
//! starts: the device name, the privacy budget (as its ledger opens it), the server name.
#![no_main]

use std::path::Path;

use cohort_client::config::ClientConfig;
use cohort_common::dp::PrivacyLedger;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = ClientConfig::from_toml(text, Path::new("/etc/cohort")) else { return };
    let _ = cohort_client::device::select(&config.device);
    if let Some(budget) = &config.privacy {
        let _ = PrivacyLedger::new(budget.max_epsilon, budget.delta, budget.accounting());
    }
    let _ = config.server_name();
});
