//! `live.json` in the state directory: what the running server is doing, rewritten every two
//! seconds, for `cohort-server status`. A file (not a socket) so that `status` needs nothing but
//! read access to the state directory; its age tells a running server from one that stopped or
//! was killed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_io::files;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::connections::Registry;
use cohort_io::unix_now;

/// How often the file is rewritten.
pub const LIVE_EVERY: Duration = Duration::from_secs(2);
/// A file older than this was left by a server that no longer runs (it stopped without saying,
/// or was killed).
pub const LIVE_STALE_SECS: i64 = 10;

/// What `live.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveStatus {
    pub pid: u32,
    /// When the server last wrote the file (Unix seconds).
    pub updated_at: i64,
    /// `serving`, or `stopped` when the server exited cleanly.
    pub state: String,
    pub listen: String,
    pub metrics: Option<String>,
    pub connected: usize,
    /// The run in progress, if any.
    pub run: Option<String>,
    /// What the run is doing, in words (`Coordinator::activity`).
    pub activity: Option<String>,
}

impl LiveStatus {
    /// Whether a server is running now, by the file's state and age.
    pub fn is_running(&self, now: i64) -> bool {
        // In either direction: a file from the future (a clock stepped back, or an edited file)
        // is no proof of life either.
        self.state == "serving" && (now - self.updated_at).abs() <= LIVE_STALE_SECS
    }

    /// Reads the file; `None` when there is none, or it is unreadable (a server writes it whole).
    pub fn read(path: &std::path::Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// Rewrites `path` from `live` every [`LIVE_EVERY`] until `stop`, then once more as `stopped`.
pub(crate) async fn keep_written(
    path: PathBuf,
    live: Arc<Mutex<LiveStatus>>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(LIVE_EVERY);
    let mut warned = false;
    loop {
        let stopping = tokio::select! {
            _ = ticks.tick() => false,
            _ = stop.cancelled() => true,
        };
        let snapshot = {
            let mut live = live.lock().expect("live lock");
            live.pid = std::process::id();
            live.updated_at = unix_now();
            live.connected = registry.len();
            live.state = if stopping { "stopped" } else { "serving" }.into();
            if stopping {
                live.run = None;
                live.activity = None;
            }
            live.clone()
        };
        let bytes = serde_json::to_vec_pretty(&snapshot).expect("the live status serializes");
        let path = path.clone();
        match tokio::task::spawn_blocking(move || files::write_atomic(&path, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if !warned => {
                warned = true;
                warn!("cannot write the live status for `cohort-server status` ({e}); the federation carries on");
            }
            _ => {}
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status` calls a server running only on a fresh file that says it serves: not one left by
    /// a server that was killed (old), nor one stamped in the future (a clock stepped back, an
    /// edited file), nor one a server wrote as it stopped.
    #[test]
    fn only_a_fresh_serving_file_is_a_running_server() {
        let live = |state: &str, updated_at: i64| LiveStatus { state: state.into(), updated_at, ..Default::default() };
        let now = 1_000;
        assert!(live("serving", now).is_running(now));
        assert!(live("serving", now - LIVE_STALE_SECS).is_running(now));
        assert!(!live("serving", now - LIVE_STALE_SECS - 1).is_running(now), "killed: the file went stale");
        assert!(!live("serving", now + 3_600).is_running(now), "from the future");
        assert!(!live("stopped", now).is_running(now), "stopped cleanly");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LiveStatus::read(&dir.path().join("live.json")), None, "never served");
        std::fs::write(dir.path().join("live.json"), b"{ half a file").unwrap();
        assert_eq!(LiveStatus::read(&dir.path().join("live.json")), None, "unreadable: not running");
    }
}
