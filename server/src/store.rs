//! The server's records in SQLite (`cohort.db`): the federation's id, enrolled clients and the
//! registry of their certificates (the only ones the server admits, each revocable), one row per
//! round with its metrics (per head, with per-class recall), checkpoint and
//! privacy spent, and each client's count of private rounds (for the epsilon against the server).

use std::path::Path;

use cohort_common::coordinator::{declined_reason, RoundReport};
use cohort_common::train::Metrics;
use cohort_io::CertificateFacts;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error(
        "there is no {path}: is `--state` the directory `cohort-server init` made? (run `cohort-server init --state \
         DIR --name NAME --san HOST` to make one)"
    )]
    Missing { path: String },
    #[error(
        "client `{client}` is already enrolled, with {active} active certificate(s); to give it another one while \
         the old stays valid until it expires, add --renew; to revoke the old one at once (a lost or stolen key), \
         add --replace"
    )]
    AlreadyEnrolled { client: String, active: usize },
    #[error(
        "the key of this certificate was revoked (certificate {serial} of `{client}`); the client makes a new key \
         with `cohort-client keygen` or `cohort-client renew`"
    )]
    RevokedKey { client: String, serial: String },
    #[error("a certificate with serial {serial} is already registered (to `{client}`)")]
    SerialTaken { client: String, serial: String },
    #[error("there is already a run named `{name}`; choose another name (`cohort-server runs` lists them)")]
    RunExists { name: String },
    #[error("there is no run named `{name}` (`cohort-server runs` lists them)")]
    NoRun { name: String },
}

/// How an enrolment treats the client's certificates that are still active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolment {
    /// A new client: refused if the id already has an active certificate.
    New,
    /// Another certificate for the same client (renewal): the old ones stay valid until they expire.
    Renew,
    /// The client's old certificates are revoked at once (a lost or stolen key).
    Replace,
}

/// Whether the server admits a certificate that the CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Not in this federation's registry (signed by the CA for another federation, or never
    /// registered with `enroll --cert`).
    Unregistered,
    Revoked {
        at: i64,
    },
}

/// Revokes the certificates `condition` selects (with its parameters), numbering each revocation.
const REVOKE: &str = "UPDATE certificates SET revoked_at = ?1,
    revocation = (SELECT COALESCE(MAX(revocation), 0) FROM certificates) + 1
    WHERE serial = ?2 AND revoked_at IS NULL";

/// One registered certificate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertificateRow {
    pub serial: String,
    pub client: String,
    pub key_hash: String,
    pub not_before: i64,
    pub not_after: i64,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
}

pub struct Store {
    conn: Connection,
    path: String,
}

/// One enrolled client.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientRow {
    pub id: String,
    pub enrolled_at: i64,
    pub revoked: bool,
    pub last_seen: Option<i64>,
    pub rounds: i64,
    /// Rounds (and censuses or evaluations recorded with them) the site declined.
    pub declines: i64,
    /// The last time it did not take part when sampled: the round and why.
    pub last_dropout: Option<(u64, String)>,
}

/// One round, completed or aborted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRow {
    pub round: u64,
    pub started_at: i64,
    pub seconds: f64,
    /// `completed` or `aborted`.
    pub status: String,
    pub cohort: usize,
    pub participants: usize,
    pub dropped: usize,
    pub train_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub balanced_accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    pub checkpoint: Option<String>,
    pub note: String,
    /// DP rounds: the sampling rate q and noise multiplier z the accountant composed.
    pub sampling_rate: Option<f64>,
    pub noise_multiplier: Option<f64>,
    /// Epsilon spent after this round against anyone who sees only the models (amplified by
    /// sampling; at the configured delta).
    pub epsilon: Option<f64>,
    /// Epsilon spent after this round against the server, which knows every sample: the most
    /// any one client has spent from its own private rounds (unamplified).
    pub epsilon_server: Option<f64>,
    /// The probability that this round's Poisson sample fell below `min_clients` (added to delta).
    pub too_few_probability: Option<f64>,
    /// The clip norm of this round, and how many updates (a noisy count) it did not clip.
    pub clip: Option<f64>,
    pub unclipped: Option<f64>,
    /// Every head on the server's test sets (the first head's figures are also above).
    pub head_tests: Vec<HeadMetrics>,
    /// Federated evaluation: every head on the clients' own validation data (summed securely).
    pub federated: Vec<HeadMetrics>,
}

impl RoundRow {
    /// The write-ahead row of a private round whose plans are about to go out (status
    /// `started`): its sample is accounted even if the server stops before the round ends.
    pub fn started(
        round: u64,
        started_at: i64,
        cohort: usize,
        sampling_rate: Option<f64>,
        noise_multiplier: f64,
        too_few_probability: Option<f64>,
    ) -> Self {
        RoundRow {
            round,
            started_at,
            seconds: 0.0,
            status: "started".into(),
            cohort,
            participants: 0,
            dropped: 0,
            train_loss: None,
            test_accuracy: None,
            test_loss: None,
            balanced_accuracy: None,
            macro_f1: None,
            checkpoint: None,
            note: String::new(),
            sampling_rate,
            noise_multiplier: Some(noise_multiplier),
            epsilon: None,
            epsilon_server: None,
            too_few_probability,
            clip: None,
            unclipped: None,
            head_tests: Vec::new(),
            federated: Vec::new(),
        }
    }

    /// The row of a finished round (test metrics come later, with
    /// [`Store::set_test_metrics`]).
    pub fn from_report(r: &RoundReport, started_at: i64, checkpoint: Option<String>) -> Self {
        RoundRow {
            round: r.round,
            started_at,
            seconds: r.seconds,
            status: if r.completed { "completed" } else { "aborted" }.into(),
            cohort: r.cohort,
            participants: r.participants,
            dropped: r.dropped.len(),
            train_loss: r.train_loss,
            test_accuracy: None,
            test_loss: None,
            balanced_accuracy: None,
            macro_f1: None,
            checkpoint,
            note: r.note.clone(),
            sampling_rate: r.sampling_rate,
            noise_multiplier: r.noise_multiplier,
            epsilon: r.epsilon,
            epsilon_server: r.epsilon_server,
            too_few_probability: r.too_few_probability,
            clip: r.clip,
            unclipped: r.unclipped,
            head_tests: Vec::new(),
            federated: r
                .federated
                .iter()
                .map(|(head, metrics)| HeadMetrics { head: head.clone(), metrics: metrics.clone() })
                .collect(),
        }
    }
}

/// One head's metrics: accuracy, balanced accuracy, macro-F1, per-class recall, confusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMetrics {
    pub head: String,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// Per-head metrics as stored: a JSON array, or NULL for none.
fn metrics_json(heads: &[HeadMetrics]) -> Option<String> {
    (!heads.is_empty()).then(|| serde_json::to_string(heads).expect("metrics serialize"))
}

fn metrics_from_json(column: usize, text: Option<String>) -> rusqlite::Result<Vec<HeadMetrics>> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(&t)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))),
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY,
    enrolled_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER,
    rounds INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    started_at INTEGER NOT NULL,
    seconds REAL NOT NULL,
    status TEXT NOT NULL,
    cohort INTEGER NOT NULL,
    participants INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    train_loss REAL,
    test_accuracy REAL,
    test_loss REAL,
    balanced_accuracy REAL,
    macro_f1 REAL,
    checkpoint TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS dropouts (
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    reason TEXT NOT NULL,
    declined INTEGER NOT NULL,
    PRIMARY KEY (round, client)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dp_participations (
    client TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    rounds INTEGER NOT NULL,
    PRIMARY KEY (client, noise_multiplier)
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    -- 1, 2, 3... in the order of revocation: what a running server polls past (a clock could
    -- go back, and a revoking command can wait for the lock after reading it).
    revocation INTEGER UNIQUE
);
CREATE INDEX IF NOT EXISTS certificates_by_client ON certificates (client);
CREATE TABLE IF NOT EXISTS label_census (
    round INTEGER PRIMARY KEY,
    clients INTEGER NOT NULL,
    counts TEXT NOT NULL
);
-- The runs this federation hosts, in the order they run (by position). `dir` is where a run's
-- records are, relative to the state directory: '' for server.toml's run, runs/NAME otherwise.
CREATE TABLE IF NOT EXISTS runs (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    dir TEXT NOT NULL,
    model TEXT NOT NULL,
    rounds INTEGER NOT NULL,
    status TEXT NOT NULL,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    submitted_at INTEGER NOT NULL,
    started_at INTEGER,
    ended_at INTEGER,
    note TEXT NOT NULL DEFAULT ''
);
";

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Waiting for its turn.
    Queued,
    Running,
    /// Every configured round completed (or its privacy budget was spent).
    Finished,
    /// Stopped by the operator (`cohort-server stop`); `resume` queues it again.
    Stopped,
    /// It could not go on (see its note); `resume` queues it again.
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Finished => "finished",
            RunStatus::Stopped => "stopped",
            RunStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [RunStatus::Queued, RunStatus::Running, RunStatus::Finished, RunStatus::Stopped, RunStatus::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One run as cohort.db records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunRow {
    pub name: String,
    /// Where its records and checkpoints are, relative to the state directory ('' for the
    /// run of server.toml, whose records are the state directory's own).
    pub dir: String,
    pub model: String,
    pub rounds: u64,
    #[serde(serialize_with = "status_text")]
    pub status: RunStatus,
    pub stop_requested: bool,
    pub submitted_at: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub note: String,
}

fn status_text<S: serde::Serializer>(status: &RunStatus, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(status.as_str())
}

/// Columns added after the first schema: databases that lack them get them on open.
const ADDED_ROUND_COLUMNS: [(&str, &str); 9] = [
    ("sampling_rate", "REAL"),
    ("noise_multiplier", "REAL"),
    ("epsilon", "REAL"),
    ("clip", "REAL"),
    ("unclipped", "REAL"),
    ("head_tests", "TEXT"),
    ("federated", "TEXT"),
    ("epsilon_server", "REAL"),
    ("too_few_probability", "REAL"),
];

impl Store {
    /// Opens the database of an existing state directory; a missing one is an error (the
    /// operator's commands never create a database where `init` did not make one).
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing { path: path.display().to_string() });
        }
        Self::open(path)
    }

    /// Opens the database, creating it (and its tables) if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        let wrap = |source| StoreError::Sqlite { path: p.clone(), source };
        let conn = Connection::open(path).map_err(wrap)?;
        // The operator's commands (enroll, revoke) write while a server runs: wait for its
        // transactions instead of failing with "database is locked".
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(wrap)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").map_err(wrap)?;
        conn.execute_batch(SCHEMA).map_err(wrap)?;
        let existing: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('rounds')")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(wrap)?;
        for (column, kind) in ADDED_ROUND_COLUMNS.iter().filter(|(c, _)| !existing.iter().any(|e| e == c)) {
            conn.execute_batch(&format!("ALTER TABLE rounds ADD COLUMN {column} {kind}")).map_err(wrap)?;
        }
        Ok(Self { conn, path: p })
    }

    fn wrap(&self) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite { path: self.path.clone(), source }
    }

    /// Registers a certificate the CA signed for `facts.client`, as `mode` says; returns the
    /// serials it revoked (with [`Enrolment::Replace`]). A key that was ever revoked is refused.
    pub fn register_certificate(
        &mut self,
        facts: &CertificateFacts,
        now: i64,
        mode: Enrolment,
    ) -> Result<Vec<String>, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite { path: path.clone(), source };
        // Immediate: take the write lock first (waiting for the server's transactions), so the
        // reads below cannot go stale before the writes.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(wrap)?;
        let taken: Option<String> = tx
            .query_row("SELECT client FROM certificates WHERE serial = ?1", params![facts.serial], |r| r.get(0))
            .optional()
            .map_err(wrap)?;
        if let Some(client) = taken {
            return Err(StoreError::SerialTaken { client, serial: facts.serial.clone() });
        }
        let revoked_key: Option<(String, String)> = tx
            .query_row(
                "SELECT client, serial FROM certificates WHERE key_hash = ?1 AND revoked_at IS NOT NULL",
                params![facts.key_hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(wrap)?;
        if let Some((client, serial)) = revoked_key {
            return Err(StoreError::RevokedKey { client, serial });
        }
        let active: Vec<String> = tx
            .prepare("SELECT serial FROM certificates WHERE client = ?1 AND revoked_at IS NULL AND not_after > ?2")
            .and_then(|mut st| st.query_map(params![facts.client, now], |r| r.get(0))?.collect())
            .map_err(wrap)?;
        if mode == Enrolment::New && !active.is_empty() {
            return Err(StoreError::AlreadyEnrolled { client: facts.client.clone(), active: active.len() });
        }
        let revoked = if mode == Enrolment::Replace { active } else { Vec::new() };
        for serial in &revoked {
            tx.execute(REVOKE, params![now, serial]).map_err(wrap)?;
        }
        tx.execute(
            "INSERT INTO certificates (serial, client, key_hash, not_before, not_after, enrolled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![facts.serial, facts.client, facts.key_hash, facts.not_before, facts.not_after, now],
        )
        .map_err(wrap)?;
        tx.execute(
            "INSERT INTO clients (id, enrolled_at) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET enrolled_at = ?2, revoked = 0",
            params![facts.client, now],
        )
        .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(revoked)
    }

    /// Revokes every certificate of a client (and so the client, until it is enrolled again with a
    /// new certificate); false when no such client is enrolled.
    pub fn revoke(&mut self, id: &str, now: i64) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(wrap)?;
        let serials: Vec<String> = tx
            .prepare("SELECT serial FROM certificates WHERE client = ?1 AND revoked_at IS NULL ORDER BY serial")
            .and_then(|mut st| st.query_map(params![id], |r| r.get(0))?.collect())
            .map_err(wrap)?;
        for serial in &serials {
            tx.execute(REVOKE, params![now, serial]).map_err(wrap)?;
        }
        let n = tx.execute("UPDATE clients SET revoked = 1 WHERE id = ?1", params![id]).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(n > 0)
    }

    /// Revokes one certificate by serial (hex, case and leading zeros as `openssl` may print
    /// them); returns its client, or `None` when no such certificate is registered. A client left
    /// with no active certificate is marked revoked.
    pub fn revoke_certificate(&mut self, serial: &str, now: i64) -> Result<Option<String>, StoreError> {
        let wanted = serial.trim().trim_start_matches("0x").to_ascii_lowercase().replace(':', "");
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(wrap)?;
        let found: Option<(String, String)> = tx
            .query_row(
                "SELECT serial, client FROM certificates WHERE ltrim(serial, '0') = ltrim(?1, '0')",
                params![wanted],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(wrap)?;
        let Some((serial, client)) = found else { return Ok(None) };
        tx.execute(REVOKE, params![now, serial]).map_err(wrap)?;
        tx.execute(
            "UPDATE clients SET revoked = 1 WHERE id = ?1 AND NOT EXISTS
                (SELECT 1 FROM certificates WHERE client = ?1 AND revoked_at IS NULL)",
            params![client],
        )
        .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(Some(client))
    }

    /// Whether the server admits this certificate (its chain and validity were checked in the
    /// TLS handshake).
    pub fn admission(&self, facts: &CertificateFacts) -> Result<Admission, StoreError> {
        let row: Option<(String, Option<i64>)> = self
            .conn
            .query_row("SELECT client, revoked_at FROM certificates WHERE serial = ?1", params![facts.serial], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(self.wrap())?;
        Ok(match row {
            Some((client, None)) if client == facts.client => Admission::Admitted,
            Some((client, Some(at))) if client == facts.client => Admission::Revoked { at },
            _ => Admission::Unregistered,
        })
    }

    /// Certificates revoked after revocation number `after`, with their numbers, in order: what a
    /// running server polls for (0 for all).
    pub fn revocations_after(&self, after: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT revocation, serial FROM certificates WHERE revocation > ?1 ORDER BY revocation")
            .map_err(self.wrap())?;
        let rows = stmt
            .query_map(params![after], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.wrap())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.wrap())?;
        Ok(rows)
    }

    /// Every registered certificate, by client and expiry.
    pub fn certificates(&self) -> Result<Vec<CertificateRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT serial, client, key_hash, not_before, not_after, enrolled_at, revoked_at FROM certificates
                 ORDER BY client, not_after",
            )
            .map_err(self.wrap())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(CertificateRow {
                    serial: r.get(0)?,
                    client: r.get(1)?,
                    key_hash: r.get(2)?,
                    not_before: r.get(3)?,
                    not_after: r.get(4)?,
                    enrolled_at: r.get(5)?,
                    revoked_at: r.get(6)?,
                })
            })
            .map_err(self.wrap())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.wrap())?;
        Ok(rows)
    }

    /// Notes that an admitted client connected.
    pub fn client_seen(&self, id: &str, now: i64) -> Result<(), StoreError> {
        self.conn.execute("UPDATE clients SET last_seen = ?2 WHERE id = ?1", params![id, now]).map_err(self.wrap())?;
        Ok(())
    }

    pub fn clients(&self) -> Result<Vec<ClientRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, enrolled_at, revoked, last_seen, rounds,
                    (SELECT COUNT(*) FROM dropouts d WHERE d.client = c.id AND d.declined = 1),
                    (SELECT d.round FROM dropouts d WHERE d.client = c.id ORDER BY d.round DESC LIMIT 1),
                    (SELECT d.reason FROM dropouts d WHERE d.client = c.id ORDER BY d.round DESC LIMIT 1)
                 FROM clients c ORDER BY id",
            )
            .map_err(self.wrap())?;
        let rows = stmt
            .query_map([], |r| {
                let last_round: Option<i64> = r.get(6)?;
                let last_reason: Option<String> = r.get(7)?;
                Ok(ClientRow {
                    id: r.get(0)?,
                    enrolled_at: r.get(1)?,
                    revoked: r.get::<_, i64>(2)? == 1,
                    last_seen: r.get(3)?,
                    rounds: r.get(4)?,
                    declines: r.get(5)?,
                    last_dropout: last_round.zip(last_reason).map(|(round, why)| (round as u64, why)),
                })
            })
            .map_err(self.wrap())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.wrap())?;
        Ok(rows)
    }

    /// The federation's id, made (from `fresh`) the first time it is asked for. Clients' privacy
    /// ledgers bind their accounts to it; a new state directory is a new federation.
    pub fn federation_id(&self, fresh: impl FnOnce() -> String) -> Result<String, StoreError> {
        let read = || {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = 'federation_id'", [], |r| r.get::<_, String>(0))
                .optional()
                .map_err(self.wrap())
        };
        if let Some(id) = read()? {
            return Ok(id);
        }
        self.conn
            .execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('federation_id', ?1)", params![fresh()])
            .map_err(self.wrap())?;
        Ok(read()?.expect("just inserted"))
    }

    /// Adds a run at the end of the queue. The error says if the name is taken.
    pub fn submit_run(&self, name: &str, dir: &str, model: &str, rounds: u64, now: i64) -> Result<(), StoreError> {
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO runs (name, dir, model, rounds, status, submitted_at) VALUES (?1, ?2, ?3, ?4, \
                 'queued', ?5)",
                params![name, dir, model, rounds as i64, now],
            )
            .map_err(self.wrap())?;
        if inserted == 0 {
            return Err(StoreError::RunExists { name: name.into() });
        }
        Ok(())
    }

    /// The run of server.toml: recorded the first time, and queued again at every start (its
    /// records say how far it got; raising its `rounds` continues it), unless the operator
    /// stopped it (`resume` queues it again).
    pub fn queue_config_run(&self, name: &str, model: &str, rounds: u64, now: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO runs (name, dir, model, rounds, status, submitted_at) VALUES (?1, '', ?2, ?3, 'queued', \
                 ?4) ON CONFLICT (name) DO UPDATE SET model = ?2, rounds = ?3, status = 'queued', stop_requested = 0, \
                 note = '' WHERE dir = '' AND status != 'stopped'",
                params![name, model, rounds as i64, now],
            )
            .map_err(self.wrap())?;
        match self.run(name)? {
            Some(run) if !run.dir.is_empty() => Err(StoreError::RunExists { name: name.into() }),
            _ => Ok(()),
        }
    }

    /// Every run, in queue order.
    pub fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, dir, model, rounds, status, stop_requested, submitted_at, started_at, ended_at, note \
                 FROM runs ORDER BY position",
            )
            .map_err(self.wrap())?;
        let rows = stmt
            .query_map([], |r| {
                let status: String = r.get(4)?;
                Ok(RunRow {
                    name: r.get(0)?,
                    dir: r.get(1)?,
                    model: r.get(2)?,
                    rounds: r.get::<_, i64>(3)? as u64,
                    status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
                    stop_requested: r.get::<_, i64>(5)? != 0,
                    submitted_at: r.get(6)?,
                    started_at: r.get(7)?,
                    ended_at: r.get(8)?,
                    note: r.get(9)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.wrap())?;
        Ok(rows)
    }

    pub fn run(&self, name: &str) -> Result<Option<RunRow>, StoreError> {
        Ok(self.runs()?.into_iter().find(|r| r.name == name))
    }

    /// Records where a run stands (with a note: why it stopped or failed).
    pub fn set_run_status(&self, name: &str, status: RunStatus, note: &str, now: i64) -> Result<(), StoreError> {
        // `started_at` is the last start (the run in progress, or the last that ran); `ended_at`
        // is set by the states a run ends in and cleared by the others.
        let started = (status == RunStatus::Running).then_some(now);
        let ended = matches!(status, RunStatus::Finished | RunStatus::Stopped | RunStatus::Failed).then_some(now);
        self.conn
            .execute(
                "UPDATE runs SET status = ?2, note = ?3, stop_requested = 0, started_at = COALESCE(?4, started_at), \
                 ended_at = ?5 WHERE name = ?1",
                params![name, status.as_str(), note, started, ended],
            )
            .map_err(self.wrap())?;
        Ok(())
    }

    /// Asks the running server to stop run `name` (a queued one is stopped at once). Returns
    /// the run as it stood.
    pub fn request_stop(&self, name: &str, now: i64) -> Result<RunRow, StoreError> {
        let run = self.run(name)?.ok_or_else(|| StoreError::NoRun { name: name.into() })?;
        match run.status {
            RunStatus::Queued => self.set_run_status(name, RunStatus::Stopped, "stopped by the operator", now)?,
            RunStatus::Running => {
                self.conn
                    .execute("UPDATE runs SET stop_requested = 1 WHERE name = ?1", params![name])
                    .map_err(self.wrap())?;
            }
            _ => {}
        }
        Ok(run)
    }

    /// Takes run `name` from the queue to running, unless the operator stopped it meanwhile (a
    /// `stop` of a queued run can land while the server loads it). Returns whether it may start.
    pub fn start_run(&self, name: &str, now: i64) -> Result<bool, StoreError> {
        let started = self
            .conn
            .execute(
                "UPDATE runs SET status = 'running', note = '', started_at = ?2, ended_at = NULL WHERE name = ?1 AND \
                 status = 'queued' AND stop_requested = 0",
                params![name, now],
            )
            .map_err(self.wrap())?;
        Ok(started == 1)
    }

    /// Runs a server found `running` when it started were interrupted: they go back to the
    /// queue, where they resume from their records.
    pub fn requeue_interrupted_runs(&self) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE runs SET status = 'queued', note = 'interrupted; resumes from its last checkpoint' WHERE \
                 status = 'running'",
                [],
            )
            .map_err(self.wrap())
    }

    /// Each client's private rounds: `(client, noise multiplier, rounds)`.
    pub fn dp_participations(&self) -> Result<Vec<(String, f64, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT client, noise_multiplier, rounds FROM dp_participations ORDER BY client")
            .map_err(self.wrap())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))
            .map_err(self.wrap())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.wrap())?;
        Ok(rows)
    }

    /// Records a round, credits its participants, keeps why each sampled client did not take
    /// part (`dropped`: client and reason, escaped by the coordinator; a decline is told apart by
    /// `coordinator::declined_reason`) and charges the clients whose data a private round used
    /// (`charged`, at the row's noise multiplier), in one transaction.
    pub fn record_round(
        &mut self,
        row: &RoundRow,
        participants: &[String],
        dropped: &[(String, String)],
        charged: &[String],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(wrap)?;
        tx.execute(
            "INSERT OR REPLACE INTO rounds (round, started_at, seconds, status, cohort, participants, dropped, train_loss,
                test_accuracy, test_loss, balanced_accuracy, macro_f1, checkpoint, note, sampling_rate,
                noise_multiplier, epsilon, clip, unclipped, head_tests, federated, epsilon_server, too_few_probability)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22,
                ?23)",
            params![
                row.round as i64,
                row.started_at,
                row.seconds,
                row.status,
                row.cohort as i64,
                row.participants as i64,
                row.dropped as i64,
                row.train_loss,
                row.test_accuracy,
                row.test_loss,
                row.balanced_accuracy,
                row.macro_f1,
                row.checkpoint,
                row.note,
                row.sampling_rate,
                row.noise_multiplier,
                row.epsilon,
                row.clip,
                row.unclipped,
                metrics_json(&row.head_tests),
                metrics_json(&row.federated),
                row.epsilon_server,
                row.too_few_probability
            ],
        )
        .map_err(wrap)?;
        for p in participants {
            tx.execute("UPDATE clients SET rounds = rounds + 1 WHERE id = ?1", params![p]).map_err(wrap)?;
        }
        for (client, reason) in dropped {
            tx.execute(
                "INSERT OR REPLACE INTO dropouts (round, client, reason, declined) VALUES (?1, ?2, ?3, ?4)",
                params![row.round as i64, client, reason, declined_reason(reason).is_some() as i64],
            )
            .map_err(wrap)?;
        }
        if let Some(z) = row.noise_multiplier {
            for c in charged {
                tx.execute(
                    "INSERT INTO dp_participations (client, noise_multiplier, rounds) VALUES (?1, ?2, 1)
                     ON CONFLICT(client, noise_multiplier) DO UPDATE SET rounds = rounds + 1",
                    params![c, z],
                )
                .map_err(wrap)?;
            }
        }
        tx.commit().map_err(wrap)?;
        Ok(())
    }

    /// Adds the test-set metrics of a recorded round: `first` is the first head on the
    /// operator's test data, `heads` every head evaluated.
    pub fn set_test_metrics(
        &self,
        round: u64,
        first: Option<&Metrics>,
        heads: &[HeadMetrics],
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE rounds SET test_accuracy = ?2, test_loss = ?3, balanced_accuracy = ?4, macro_f1 = ?5,
                    head_tests = ?6 WHERE round = ?1",
                params![
                    round as i64,
                    first.map(|m| m.accuracy),
                    first.map(|m| m.loss),
                    first.map(|m| m.balanced_accuracy),
                    first.map(|m| m.macro_f1),
                    metrics_json(heads)
                ],
            )
            .map_err(self.wrap())?;
        Ok(())
    }

    pub fn rounds(&self) -> Result<Vec<RoundRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT round, started_at, seconds, status, cohort, participants, dropped, train_loss, test_accuracy,
                        test_loss, balanced_accuracy, macro_f1, checkpoint, note, sampling_rate, noise_multiplier,
                        epsilon, clip, unclipped, head_tests, federated, epsilon_server, too_few_probability
                 FROM rounds ORDER BY round",
            )
            .map_err(self.wrap())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RoundRow {
                    round: r.get::<_, i64>(0)? as u64,
                    started_at: r.get(1)?,
                    seconds: r.get(2)?,
                    status: r.get(3)?,
                    cohort: r.get::<_, i64>(4)? as usize,
                    participants: r.get::<_, i64>(5)? as usize,
                    dropped: r.get::<_, i64>(6)? as usize,
                    train_loss: r.get(7)?,
                    test_accuracy: r.get(8)?,
                    test_loss: r.get(9)?,
                    balanced_accuracy: r.get(10)?,
                    macro_f1: r.get(11)?,
                    checkpoint: r.get(12)?,
                    note: r.get(13)?,
                    sampling_rate: r.get(14)?,
                    noise_multiplier: r.get(15)?,
                    epsilon: r.get(16)?,
                    clip: r.get(17)?,
                    unclipped: r.get(18)?,
                    head_tests: metrics_from_json(19, r.get(19)?)?,
                    federated: metrics_from_json(20, r.get(20)?)?,
                    epsilon_server: r.get(21)?,
                    too_few_probability: r.get(22)?,
                })
            })
            .map_err(self.wrap())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.wrap())?;
        Ok(rows)
    }

    /// Records the population's label counts summed before `round` by `clients` clients.
    pub fn record_census(&self, round: u64, clients: usize, counts: &[u64]) -> Result<(), StoreError> {
        let json = serde_json::to_string(counts).expect("counts serialize");
        self.conn
            .execute(
                "INSERT OR REPLACE INTO label_census (round, clients, counts) VALUES (?1, ?2, ?3)",
                params![round as i64, clients as i64, json],
            )
            .map_err(self.wrap())?;
        Ok(())
    }

    /// The latest label census: the round it preceded and the counts.
    pub fn last_census(&self) -> Result<Option<(u64, Vec<u64>)>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row("SELECT round, counts FROM label_census ORDER BY round DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(self.wrap())?;
        Ok(row.and_then(|(round, json)| serde_json::from_str(&json).ok().map(|c| (round as u64, c))))
    }

    /// Marks the rounds a server was running when it stopped (status `started`) as
    /// `interrupted`: their samples and charges are already recorded, and their numbers are not
    /// reused. Call it when a server starts, never from a command that may run beside one.
    pub fn mark_interrupted(&self) -> Result<usize, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE rounds SET status = 'interrupted', note = 'the server stopped during this round; its sample \
                 is accounted and its number is not reused' WHERE status = 'started'",
                [],
            )
            .map_err(self.wrap())?;
        Ok(n)
    }

    /// How many rounds completed (aborted rounds do not count toward `federation.rounds`).
    pub fn completed_rounds(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM rounds WHERE status = 'completed'", [], |r| r.get(0))
            .map_err(self.wrap())?;
        Ok(n as u64)
    }

    /// The last round number recorded (completed or aborted) and the last completed round
    /// with its checkpoint.
    pub fn resume_point(&self) -> Result<(u64, Option<(u64, String)>), StoreError> {
        let last: Option<i64> =
            self.conn.query_row("SELECT MAX(round) FROM rounds", [], |r| r.get(0)).map_err(self.wrap())?;
        let done: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT round, checkpoint FROM rounds WHERE status = 'completed' AND checkpoint IS NOT NULL ORDER BY round DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.wrap())?;
        Ok((last.unwrap_or(0) as u64, done.map(|(r, c)| (r as u64, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(client: &str, serial: &str, key: &str) -> CertificateFacts {
        CertificateFacts {
            client: client.into(),
            serial: serial.into(),
            key_hash: key.into(),
            not_before: 0,
            not_after: 1_000,
        }
    }

    /// Review findings (issue 15): a `stop` of a queued run that lands while the server loads it
    /// holds (the server starts only what is still queued), and an operator's stop of
    /// server.toml's run survives the restart that queues that run again.
    #[test]
    fn a_stopped_run_stays_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cohort.db")).unwrap();
        store.submit_run("late", "runs/late", "m", 3, 1).unwrap();
        store.request_stop("late", 2).unwrap();
        assert!(!store.start_run("late", 3).unwrap(), "stopped while it loaded: not started");
        assert_eq!(store.run("late").unwrap().unwrap().status, RunStatus::Stopped);
        store.submit_run("next", "runs/next", "m", 3, 1).unwrap();
        assert!(store.start_run("next", 4).unwrap());
        assert_eq!(store.run("next").unwrap().unwrap().status, RunStatus::Running);

        store.queue_config_run("main", "m", 3, 1).unwrap();
        store.set_run_status("main", RunStatus::Stopped, "stopped by the operator", 5).unwrap();
        store.queue_config_run("main", "m", 3, 6).unwrap();
        assert_eq!(store.run("main").unwrap().unwrap().status, RunStatus::Stopped, "a restart leaves it stopped");
        store.set_run_status("main", RunStatus::Finished, "", 7).unwrap();
        store.queue_config_run("main", "m", 4, 8).unwrap();
        assert_eq!(store.run("main").unwrap().unwrap().status, RunStatus::Queued, "a finished one continues");
        let err = store.queue_config_run("next", "m", 3, 9).unwrap_err().to_string();
        assert!(err.contains("already a run named `next`"), "a submitted run's name: {err}");
    }

    /// Revocation is by certificate: enrolling an id again never revives an old certificate, a
    /// revoked key cannot be certified again, and an id is enrolled once unless the operator
    /// renews or replaces it.
    #[test]
    fn certificates_are_admitted_only_while_registered_and_not_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("cohort.db")).unwrap();
        let stolen = facts("h1", "0a", "k1");
        assert_eq!(store.admission(&stolen).unwrap(), Admission::Unregistered);
        store.register_certificate(&stolen, 10, Enrolment::New).unwrap();
        assert_eq!(store.admission(&stolen).unwrap(), Admission::Admitted);
        // The same serial presented under another id is not that id's certificate.
        assert_eq!(store.admission(&facts("h2", "0a", "k1")).unwrap(), Admission::Unregistered);
        let again = store.register_certificate(&facts("h1", "0b", "k2"), 11, Enrolment::New).unwrap_err();
        assert!(matches!(again, StoreError::AlreadyEnrolled { active: 1, .. }), "{again}");
        assert!(matches!(
            store.register_certificate(&facts("h9", "0a", "k9"), 11, Enrolment::New),
            Err(StoreError::SerialTaken { .. })
        ));

        // Revoked, then the id enrolled again: the old certificate stays out.
        assert!(store.revoke("h1", 12).unwrap());
        assert_eq!(store.admission(&stolen).unwrap(), Admission::Revoked { at: 12 });
        assert_eq!(store.revocations_after(0).unwrap(), vec![(1, "0a".to_string())]);
        assert!(store.revocations_after(1).unwrap().is_empty());
        store.register_certificate(&facts("h1", "0b", "k2"), 13, Enrolment::New).unwrap();
        assert_eq!(store.admission(&stolen).unwrap(), Admission::Revoked { at: 12 });
        assert_eq!(store.admission(&facts("h1", "0b", "k2")).unwrap(), Admission::Admitted);
        assert!(!store.clients().unwrap()[0].revoked);
        // The revoked key cannot come back under a new serial.
        let key = store.register_certificate(&facts("h1", "0c", "k1"), 14, Enrolment::Renew).unwrap_err();
        assert!(matches!(key, StoreError::RevokedKey { .. }), "{key}");

        // Renewal keeps the old certificate; replacement revokes it.
        store.register_certificate(&facts("h1", "0d", "k3"), 15, Enrolment::Renew).unwrap();
        assert_eq!(store.admission(&facts("h1", "0b", "k2")).unwrap(), Admission::Admitted);
        let revoked = store.register_certificate(&facts("h1", "0e", "k4"), 16, Enrolment::Replace).unwrap();
        assert_eq!(revoked, vec!["0b".to_string(), "0d".to_string()]);
        assert_eq!(store.admission(&facts("h1", "0d", "k3")).unwrap(), Admission::Revoked { at: 16 });

        // One certificate by serial, as openssl prints it; the client stays while another is active.
        assert_eq!(store.revoke_certificate("0x0E", 17).unwrap(), Some("h1".to_string()));
        assert_eq!(store.revoke_certificate("ff", 17).unwrap(), None);
        assert!(store.clients().unwrap()[0].revoked, "no active certificate is left");
        assert_eq!(store.certificates().unwrap().len(), 4, "the refused one is not registered");
        // Revocations are numbered in order, whatever the clock said.
        let numbered: Vec<i64> = store.revocations_after(1).unwrap().iter().map(|(n, _)| *n).collect();
        assert_eq!(numbered, vec![2, 3, 4]);
    }

    #[test]
    fn commands_never_create_a_database_where_init_made_none() {
        // Issue 15: `revoke` on an empty directory created a database, and `rounds` on a missing
        // one printed "Error code 14: Unable to open the database file".
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cohort.db");
        let err = Store::open_existing(&path).err().unwrap().to_string();
        assert!(err.contains("cohort-server init") && err.contains("cohort.db"), "{err}");
        assert!(!path.exists(), "nothing was created");
        Store::open(&path).unwrap();
        assert!(Store::open_existing(&path).is_ok());
    }

    #[test]
    fn clients_and_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("cohort.db")).unwrap();
        store.register_certificate(&facts("a", "01", "ka"), 1, Enrolment::New).unwrap();
        store.register_certificate(&facts("b", "02", "kb"), 1, Enrolment::New).unwrap();
        store.client_seen("b", 2).unwrap();
        assert!(store.revoke("a", 3).unwrap());
        assert!(!store.revoke("zz", 3).unwrap());
        let revoked: Vec<bool> = store.clients().unwrap().iter().map(|c| c.revoked).collect();
        assert_eq!(revoked, vec![true, false]);
        let mut row = RoundRow {
            round: 1,
            started_at: 3,
            seconds: 0.5,
            status: "completed".into(),
            cohort: 2,
            participants: 1,
            dropped: 1,
            train_loss: Some(0.3),
            test_accuracy: Some(0.9),
            test_loss: Some(0.2),
            balanced_accuracy: None,
            macro_f1: None,
            checkpoint: Some("checkpoints/round-000001.safetensors".into()),
            note: String::new(),
            sampling_rate: Some(0.1),
            noise_multiplier: Some(1.0),
            epsilon: Some(0.5),
            epsilon_server: Some(0.9),
            too_few_probability: Some(1e-9),
            clip: Some(1.0),
            unclipped: Some(0.7),
            head_tests: Vec::new(),
            federated: vec![HeadMetrics {
                head: "digit".into(),
                metrics: Metrics::from_confusion(vec![vec![3, 1], vec![0, 2]], 0.0),
            }],
        };
        let declined = [("a".to_string(), cohort_common::coordinator::decline_dropout("its data do not fit"))];
        store.record_round(&row, &["b".into()], &declined, &["a".into(), "b".into()]).unwrap();
        let parity =
            HeadMetrics { head: "parity".into(), metrics: Metrics::from_confusion(vec![vec![5, 0], vec![1, 4]], 2.0) };
        store.set_test_metrics(1, Some(&parity.metrics), std::slice::from_ref(&parity)).unwrap();
        let stored = &store.rounds().unwrap()[0];
        assert_eq!(stored.federated, row.federated);
        assert_eq!(stored.head_tests, vec![parity.clone()]);
        assert_eq!(stored.head_tests[0].metrics.per_class_recall, vec![1.0, 0.8]);
        assert_eq!(stored.balanced_accuracy, Some(0.9));
        row.round = 2;
        row.status = "aborted".into();
        row.checkpoint = None;
        let missed = [("a".to_string(), "missed the 30 s deadline for an update".to_string())];
        store.record_round(&row, &[], &missed, &["b".into()]).unwrap();
        assert_eq!(store.rounds().unwrap().len(), 2);
        assert_eq!(store.dp_participations().unwrap(), vec![("a".into(), 1.0, 1), ("b".into(), 1.0, 2)]);
        assert_eq!(store.rounds().unwrap()[0].epsilon_server, Some(0.9));
        let id = store.federation_id(|| "f1".into()).unwrap();
        assert_eq!((id.as_str(), store.federation_id(|| "f2".into()).unwrap().as_str()), ("f1", "f1"));
        assert_eq!(store.resume_point().unwrap(), (2, Some((1, "checkpoints/round-000001.safetensors".into()))));
        assert_eq!(store.clients().unwrap()[1].rounds, 1);
        // A private round that started (write-ahead: sample and charges) and never finished: on
        // the next start it is marked interrupted, accounted, and its number stays used.
        let started = RoundRow::started(3, 4, 2, Some(0.1), 1.0, Some(1e-9));
        store.record_round(&started, &[], &[], &["a".into()]).unwrap();
        assert_eq!(store.mark_interrupted().unwrap(), 1);
        let interrupted = &store.rounds().unwrap()[2];
        assert_eq!((interrupted.status.as_str(), interrupted.sampling_rate), ("interrupted", Some(0.1)));
        assert_eq!(store.dp_participations().unwrap(), vec![("a".into(), 1.0, 2), ("b".into(), 1.0, 2)]);
        assert_eq!(store.completed_rounds().unwrap(), 1, "only completed rounds count toward federation.rounds");
        assert_eq!(store.resume_point().unwrap().0, 3, "the interrupted round's number is not reused");
        let a = &store.clients().unwrap()[0];
        assert_eq!(a.declines, 1, "why each site did not take part is kept");
        assert_eq!(a.last_dropout, Some((2, "missed the 30 s deadline for an update".to_string())));
        assert_eq!(store.rounds().unwrap()[0].epsilon, Some(0.5));
        assert_eq!(store.last_census().unwrap(), None);
        store.record_census(1, 3, &[5, 0, 7]).unwrap();
        store.record_census(11, 4, &[6, 1, 7]).unwrap();
        assert_eq!(store.last_census().unwrap(), Some((11, vec![6, 1, 7])));
    }

    /// Stored metrics read back bit for bit: the test-set loss of round 1 once came back one unit
    /// in the last place off (serde_json's default float parser is fast, not exact), so what the
    /// database says differed from what the round reported.
    #[test]
    fn stored_metrics_read_back_bit_for_bit() {
        let mut losses = vec![1.0841400623321533, 0.1 + 0.2, f64::MIN_POSITIVE, 1e308, 5e-324];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let value = f64::from_bits(x);
            if value.is_finite() {
                losses.push(value.abs());
            }
        }
        for loss in losses {
            let mut metrics = Metrics::from_confusion(vec![vec![1, 2], vec![3, 4]], 0.0);
            metrics.loss = loss;
            let heads = [HeadMetrics { head: "y".into(), metrics }];
            let back = metrics_from_json(0, metrics_json(&heads)).unwrap();
            assert_eq!(back[0].metrics.loss.to_bits(), loss.to_bits(), "{loss:e}");
        }
    }

    #[test]
    fn databases_from_before_the_privacy_columns_gain_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cohort.db");
        let old_schema = SCHEMA.replace("CREATE TABLE IF NOT EXISTS", "CREATE TABLE");
        Connection::open(&path).unwrap().execute_batch(&old_schema).unwrap();
        let store = Store::open(&path).unwrap();
        assert!(store.rounds().unwrap().is_empty());
        drop(store);
        Store::open(&path).unwrap();
    }
}
