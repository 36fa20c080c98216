//! Certificate lifetimes on the client's side: `cohort-client renew`, and the warnings before a
//! certificate expires.
//!
//! A renewal has two steps, with the operator in between:
//!
//! 1. [`Renewal::start`] makes a new private key and a certificate signing request for this
//!    client's id, kept beside the current key (or in `--out`) as `ID.renew.key` (mode 0600) and
//!    `ID.renew.csr`. The identity in use is not touched: the daemon keeps running with it.
//! 2. The operator signs the request (`cohort-server enroll --csr ID.renew.csr --renew`, or
//!    `cohort-server sign` with an offline CA and `cohort-server enroll --cert --renew`) and sends
//!    the certificate back. [`Renewal::install`] checks it (the same client id, the pending key,
//!    signed by the configured CA, valid now) and only then writes it and the new key over the
//!    identity files named in `client.toml`, and removes the pending files.
//!
//! [`expiring_notice`] and [`expired_notice`] are what `check` and the daemon say when a
//! certificate expires within [`EXPIRY_WARNING_DAYS`] or has expired.

use std::path::{Path, PathBuf};

use cohort_io::files::{write_atomic, write_secret, FileError};
use cohort_io::{utc, CertificateFacts, Identity};

use crate::config::{ClientConfig, IdentityFiles};

/// `check` and the daemon warn when the certificate expires within this many days.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

const DAY: i64 = 86_400;

/// Why a renewal step did not happen; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(transparent)]
    Files(#[from] FileError),
    #[error("cannot make a key: {0}")]
    Key(#[from] rcgen::Error),
    /// The identity named in `client.toml` cannot be read.
    #[error("the identity named in {config}: {problem}")]
    Identity { config: String, problem: String },
    /// A renewal is already pending (start), or none is (install).
    #[error("{0}")]
    Pending(String),
    /// The certificate offered to `--install` was refused; the identity files are as they were.
    #[error("{0}; nothing was changed")]
    Refused(String),
}

/// The files of a renewal in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingFiles {
    /// `ID.renew.key`: the new private key (mode 0600).
    pub key: PathBuf,
    /// `ID.renew.csr`: the request for the operator.
    pub csr: PathBuf,
    /// `ID.renew.pem`: the name the instructions give the signed certificate.
    pub certificate: String,
}

/// What [`Renewal::start`] did.
#[derive(Debug, Clone)]
pub struct Started {
    /// The certificate in use, which stays in use until the new one is installed.
    pub current: CertificateFacts,
    pub pending: PendingFiles,
}

/// What [`Renewal::install`] did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub previous: CertificateFacts,
    pub installed: CertificateFacts,
    /// The identity files written.
    pub written: Vec<PathBuf>,
    /// The pending files removed.
    pub removed: Vec<PathBuf>,
}

/// A client's renewal: the identity files `client.toml` names and where the pending key and
/// request are kept.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// `client.toml`, as the instructions name it.
    pub config: PathBuf,
    pub identity: IdentityFiles,
    /// Where `ID.renew.key` and `ID.renew.csr` are kept: `--out`, else beside the current key.
    pub dir: PathBuf,
    /// `--out`, repeated in the instructions.
    out: Option<PathBuf>,
}

impl Renewal {
    /// The renewal of the identity that the configuration file `config` names.
    pub fn from_config(config: &Path, out: Option<&Path>) -> Result<Self, RenewError> {
        Ok(Self::new(config, ClientConfig::load(config)?.identity, out))
    }

    /// The renewal of `identity` (as named in `config`), with the pending files in `out` or
    /// beside the current key (the bundle, for a bundle).
    pub fn new(config: &Path, identity: IdentityFiles, out: Option<&Path>) -> Self {
        let beside = match &identity {
            IdentityFiles::Bundle { bundle } => bundle,
            IdentityFiles::Files { key, .. } => key,
        };
        let dir = match out {
            Some(out) => out.to_path_buf(),
            None => beside.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        Self { config: config.to_path_buf(), identity, dir, out: out.map(Path::to_path_buf) }
    }

    /// The pending files of `id`'s renewal.
    pub fn pending(&self, id: &str) -> PendingFiles {
        PendingFiles {
            key: self.dir.join(format!("{id}.renew.key")),
            csr: self.dir.join(format!("{id}.renew.csr")),
            certificate: format!("{id}.renew.pem"),
        }
    }

    /// The identity in use and what its certificate certifies (an expired one too).
    pub fn current(&self) -> Result<(Identity, CertificateFacts), RenewError> {
        let problem = |problem: String| RenewError::Identity { config: self.config.display().to_string(), problem };
        let identity = self.identity.load().map_err(|e| problem(e.to_string()))?;
        let facts = identity.certificate().map_err(|e| problem(e.to_string()))?;
        Ok((identity, facts))
    }

    /// Step 1: a new key and a request for the same client id, written as the pending files.
    /// Refuses when a renewal is already pending (its key is never overwritten).
    pub fn start(&self) -> Result<Started, RenewError> {
        let (_, current) = self.current()?;
        let pending = self.pending(&current.client);
        if pending.key.exists() {
            return Err(RenewError::Pending(format!(
                "a renewal of `{}` is already pending: {} exists. If the operator has sent the certificate, install \
                 it with `{}`; to start again instead, delete {} and {}",
                current.client,
                pending.key.display(),
                self.install_command(&pending.certificate),
                pending.key.display(),
                pending.csr.display()
            )));
        }
        let (key, csr) = crate::keygen(&current.client)?;
        write_secret(&pending.key, key.as_bytes())?;
        write_atomic(&pending.csr, csr.as_bytes())?;
        Ok(Started { current, pending })
    }

    /// What to do after [`Renewal::start`], for people.
    pub fn instructions(&self, started: &Started) -> String {
        let Started { current, pending } = started;
        let csr =
            pending.csr.file_name().map_or_else(|| pending.csr.display().to_string(), |n| n.to_string_lossy().into());
        let pem = &pending.certificate;
        format!(
            "wrote {key} (the new private key, mode 0600: it never leaves this machine) and {csr_path}\n\
             next:\n\
             \x20 1. send {csr} to the federation's operator, who signs it with\n\
             \x20      cohort-server enroll --state STATE --csr {csr} --out {pem} --renew\n\
             \x20    or, with the CA kept offline, on the CA's machine\n\
             \x20      cohort-server sign --ca CA_DIR --csr {csr} --out {pem}\n\
             \x20    and then on the server\n\
             \x20      cohort-server enroll --state STATE --cert {pem} --renew\n\
             \x20    and sends {pem} back.\n\
             \x20 2. install it:\n\
             \x20      {install}\n\
             \x20 3. restart the daemon. Until then it uses the current certificate {serial} (valid until {until}).",
            key = pending.key.display(),
            csr_path = pending.csr.display(),
            install = self.install_command(pem),
            serial = current.serial,
            until = utc(current.not_after),
        )
    }

    fn install_command(&self, certificate: &str) -> String {
        let out = self.out.as_ref().map_or(String::new(), |o| format!(" --out {}", o.display()));
        format!("cohort-client renew --config {}{out} --install {certificate}", self.config.display())
    }

    /// Step 2: checks `cert_pem` (the certificate the operator signed from the pending request)
    /// and installs it with the pending key in place of the current identity. Refused, with the
    /// identity files untouched, unless the certificate is for the same client id, certifies the
    /// pending key, was signed by the configured CA and is valid now. Each file is replaced
    /// atomically; the pending files are removed last, so an interrupted install can be run again.
    pub fn install(&self, cert_pem: &[u8]) -> Result<Installed, RenewError> {
        let (current, previous) = self.current()?;
        let id = previous.client.clone();
        let pending = self.pending(&id);
        let key_pem = match std::fs::read_to_string(&pending.key) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RenewError::Pending(format!(
                "no renewal of `{id}` is pending: {} does not exist (a renewal started with --out DIR needs the same \
                     --out here). A certificate is installed with the key its request was made with: run \
                     `cohort-client renew --config {}{}` first, send the request it writes to the operator, then \
                     install the certificate they sign",
                pending.key.display(),
                self.config.display(),
                self.out.as_ref().map_or(String::new(), |o| format!(" --out {}", o.display())),
            )))
            }
            Err(source) => return Err(FileError::Io { path: pending.key.display().to_string(), source }.into()),
        };
        let refuse = RenewError::Refused;
        let cert_text = pem_blocks(&String::from_utf8_lossy(cert_pem), "CERTIFICATE");
        if cert_text.is_empty() {
            return Err(refuse("the new certificate file holds no CERTIFICATE block".into()));
        }
        let leaf = cohort_io::certificate_from_pem(cert_text.as_bytes())
            .map_err(|e| refuse(format!("the new certificate: {e}")))?;
        let facts = CertificateFacts::from_der(&leaf).map_err(|e| refuse(format!("the new certificate: {e}")))?;
        if facts.client != id {
            return Err(refuse(format!(
                "the new certificate is for `{}`, but this client is `{id}`: ask the operator for the certificate \
                 signed from {}",
                facts.client,
                pending.csr.display()
            )));
        }
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| {
            RenewError::Pending(format!(
                "{} is not a private key ({e}); delete it and {}, and start the renewal again",
                pending.key.display(),
                pending.csr.display()
            ))
        })?;
        let key_hash =
            hex(ring::digest::digest(&ring::digest::SHA256, &rcgen::PublicKeyData::subject_public_key_info(&key))
                .as_ref());
        if key_hash != facts.key_hash {
            return Err(refuse(format!(
                "the new certificate (serial {}) certifies another key than the pending {}: it was not made from {}. \
                 Ask the operator to sign that request (if the renewal was started again, the one they signed is an \
                 older request)",
                facts.serial,
                pending.key.display(),
                pending.csr.display()
            )));
        }
        let ca_pem = self.ca_pem(&current)?;
        let renewed = Identity::from_pem(cert_text.as_bytes(), key_pem.as_bytes(), ca_pem.as_bytes())
            .map_err(|e| refuse(format!("the new certificate: {e}")))?;
        renewed.check_signed_by_ca().map_err(|e| refuse(format!("the new certificate: {e}")))?;
        cohort_io::client_config(&renewed)
            .map_err(|e| refuse(format!("the new certificate and the pending key are not usable together: {e}")))?;

        let written = self.write(&key_pem, &cert_text, &ca_pem)?;
        let reloaded = self.identity.load().and_then(|i| {
            i.certificate()
                .map_err(|e| FileError::Config { path: self.config.display().to_string(), message: e.to_string() })
        });
        match reloaded {
            Ok(now) if now.serial == facts.serial => {}
            other => {
                let problem = other.map_or_else(|e| e.to_string(), |f| format!("it holds certificate {}", f.serial));
                return Err(RenewError::Pending(format!(
                    "the identity files were written but do not read back as the new certificate ({problem}); the \
                     pending files are kept: run the same command again"
                )));
            }
        }
        let mut removed = Vec::new();
        for path in [&pending.key, &pending.csr] {
            match std::fs::remove_file(path) {
                Ok(()) => removed.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(FileError::Io { path: path.display().to_string(), source }.into()),
            }
        }
        Ok(Installed { previous, installed: facts, written, removed })
    }

    /// The CA certificate in use, as PEM text.
    fn ca_pem(&self, current: &Identity) -> Result<String, RenewError> {
        let (path, text) = match &self.identity {
            IdentityFiles::Files { ca, .. } => (ca, read(ca)?),
            IdentityFiles::Bundle { bundle } => (bundle, read(bundle)?),
        };
        let blocks = pem_block_list(&text, "CERTIFICATE");
        let ca = blocks.last().map(|b| format!("{b}\n")).unwrap_or_default();
        match cohort_io::certificate_from_pem(ca.as_bytes()) {
            Ok(der) if der == current.ca => Ok(ca),
            _ => Err(RenewError::Pending(format!(
                "{} changed while the renewal was being installed; run the same command again",
                path.display()
            ))),
        }
    }

    /// Writes the new key and certificate over the identity files, each atomically.
    fn write(&self, key: &str, cert: &str, ca: &str) -> Result<Vec<PathBuf>, RenewError> {
        let key = if key.ends_with('\n') { key.to_string() } else { format!("{key}\n") };
        let cert = cert.to_string();
        match &self.identity {
            IdentityFiles::Bundle { bundle } => {
                write_secret(bundle, format!("{key}{cert}{ca}").as_bytes())?;
                Ok(vec![bundle.clone()])
            }
            IdentityFiles::Files { cert: cert_path, key: key_path, ca: ca_path } => {
                // Paths that name one file get every part they hold (a key and certificate in one PEM).
                let mut files: Vec<(PathBuf, String, bool)> = Vec::new();
                for (path, text, secret) in [(key_path, &key, true), (cert_path, &cert, false)] {
                    match files.iter_mut().find(|(p, ..)| same_file(p, path)) {
                        Some(file) => file.1.push_str(text),
                        None => files.push((path.clone(), text.clone(), secret)),
                    }
                }
                for file in &mut files {
                    if same_file(&file.0, ca_path) {
                        file.1.push_str(ca);
                    }
                }
                for (path, text, secret) in &files {
                    if *secret {
                        write_secret(path, text.as_bytes())?;
                    } else {
                        write_atomic(path, text.as_bytes())?;
                    }
                }
                Ok(files.into_iter().map(|(p, ..)| p).collect())
            }
        }
    }
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Io { path: path.display().to_string(), source })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The PEM blocks of `label` in `text`, each from its BEGIN line to its END line.
fn pem_block_list<'t>(text: &'t str, label: &str) -> Vec<&'t str> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let Some(stop) = rest[start..].find(&end) else { break };
        let stop = start + stop + end.len();
        blocks.push(&rest[start..stop]);
        rest = &rest[stop..];
    }
    blocks
}

/// The PEM blocks of `label` in `text`, one after the other, each ending in a newline.
fn pem_blocks(text: &str, label: &str) -> String {
    pem_block_list(text, label).iter().map(|b| format!("{b}\n")).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub use cohort_io::unix_now;

/// Where a certificate stands at `now` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Valid for more than [`EXPIRY_WARNING_DAYS`] whole days.
    Valid {
        days_left: i64,
    },
    /// Expires within [`EXPIRY_WARNING_DAYS`] days: time to renew.
    Soon {
        days_left: i64,
    },
    Expired,
}

pub fn expiry(facts: &CertificateFacts, now: i64) -> Expiry {
    let days_left = (facts.not_after - now).div_euclid(DAY);
    if now >= facts.not_after {
        Expiry::Expired
    } else if days_left < EXPIRY_WARNING_DAYS {
        Expiry::Soon { days_left }
    } else {
        Expiry::Valid { days_left }
    }
}

fn in_days(days: i64) -> String {
    match days {
        ..=0 => "in less than a day".into(),
        1 => "in 1 day".into(),
        n => format!("in {n} days"),
    }
}

/// The warning for a certificate that expires within [`EXPIRY_WARNING_DAYS`] of `now`, naming
/// `config` (the daemon's `client.toml`) in the renew command; `None` otherwise (expired too:
/// see [`expired_notice`]).
pub fn expiring_notice(facts: &CertificateFacts, now: i64, config: &str) -> Option<String> {
    let Expiry::Soon { days_left } = expiry(facts, now) else { return None };
    Some(format!(
        "the certificate of `{}` (serial {}) expires on {}, {}; renew it before then: run `cohort-client renew \
         --config {config}` and have the operator sign the request",
        facts.client,
        facts.serial,
        utc(facts.not_after),
        in_days(days_left)
    ))
}

/// Why a client whose certificate has expired cannot connect, and how to renew.
pub fn expired_notice(facts: &CertificateFacts, config: &str) -> String {
    format!(
        "the certificate of `{}` (serial {}) expired on {}: the server refuses it. Renew it: run `cohort-client \
         renew --config {config}`, have the operator sign the request, install the certificate with `cohort-client \
         renew --config {config} --install {}.renew.pem`, and start the daemon again",
        facts.client,
        facts.serial,
        utc(facts.not_after),
        facts.client
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(not_after: i64) -> CertificateFacts {
        CertificateFacts { client: "h1".into(), serial: "4f".into(), key_hash: String::new(), not_before: 0, not_after }
    }

    #[test]
    fn warns_within_thirty_days_and_says_how_to_renew() {
        let now = 1_800_000_000;
        assert_eq!(expiry(&facts(now + 31 * DAY), now), Expiry::Valid { days_left: 31 });
        assert_eq!(expiry(&facts(now + 30 * DAY), now), Expiry::Valid { days_left: 30 });
        assert_eq!(expiry(&facts(now + 30 * DAY - 1), now), Expiry::Soon { days_left: 29 });
        assert_eq!(expiry(&facts(now + 1), now), Expiry::Soon { days_left: 0 });
        assert_eq!(expiry(&facts(now), now), Expiry::Expired);
        assert_eq!(expiry(&facts(now - DAY), now), Expiry::Expired);

        assert!(expiring_notice(&facts(now + 40 * DAY), now, "c.toml").is_none());
        assert!(expiring_notice(&facts(now - 1), now, "c.toml").is_none(), "expired: the other notice");
        let soon = expiring_notice(&facts(now + 12 * DAY + 5), now, "/etc/cohort/client.toml").unwrap();
        assert!(soon.contains("in 12 days") && soon.contains("serial 4f"), "{soon}");
        assert!(soon.contains("cohort-client renew --config /etc/cohort/client.toml"), "{soon}");
        assert!(soon.contains(&utc(now + 12 * DAY + 5)), "{soon}");
        let hours = expiring_notice(&facts(now + 3600), now, "c.toml").unwrap();
        assert!(hours.contains("in less than a day"), "{hours}");

        let expired = expired_notice(&facts(now - DAY), "c.toml");
        assert!(expired.contains("expired on") && expired.contains("cohort-client renew --config c.toml"), "{expired}");
        assert!(expired.contains("--install h1.renew.pem"), "{expired}");
    }

    #[test]
    fn pem_blocks_are_found_in_order() {
        let text = "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n\
                    -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n\
                    junk\n-----BEGIN CERTIFICATE-----\nCCC\n-----END CERTIFICATE-----";
        let blocks = pem_block_list(text, "CERTIFICATE");
        assert_eq!(blocks.len(), 2);
        assert!(blocks[0].contains("BBB") && blocks[1].contains("CCC"));
        assert!(!pem_blocks(text, "CERTIFICATE").contains("PRIVATE"));
        assert!(pem_block_list("-----BEGIN CERTIFICATE-----\nunterminated", "CERTIFICATE").is_empty());
    }
}
