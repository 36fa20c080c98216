//! The operator's certificate authority: `init` makes a CA and the server certificate,
//! `enroll` signs clients' requests (or makes a whole bundle for quick starts) and registers
//! each certificate in cohort.db, the only certificates the server admits. All keys are ECDSA
//! P-256 and are written with mode 0600; every certificate has a random serial and a lifetime
//! ([`CLIENT_DAYS`] for clients by default).
//!
//! The CA key can stay off the server ([`init`] with an offline CA directory): requests are then
//! signed on the CA's machine ([`sign_csr`]) and the certificates registered on the server
//! ([`register`]); a server that is broken into cannot mint identities.

use std::path::{Path, PathBuf};

use crate::store::{Enrolment, Store};
use cohort_io::files::{write_atomic, write_secret, FileError};
use cohort_io::CertificateFacts;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Files(#[from] FileError),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path} already exists; refusing to overwrite the CA (use another --state directory)")]
    Exists { path: String },
    #[error("{path}: cannot read it ({source}); run `cohort-server init --state DIR` first")]
    Missing { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{dir} holds no CA key: this federation's CA is kept offline. Sign the request on the CA's machine with \
         `cohort-server sign --ca CA_DIR --csr CLIENT.csr --out CLIENT.pem`, then register the certificate here with \
         `cohort-server enroll --state {dir} --cert CLIENT.pem`"
    )]
    OfflineCa { dir: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Default lifetime of a client certificate.
pub const CLIENT_DAYS: u32 = 365;
/// Lifetime of the server certificate.
pub const SERVER_DAYS: u32 = 825;
/// Lifetime of the CA certificate.
pub const CA_DAYS: u32 = 3650;

/// Validity from five minutes ago (clocks differ) for `days`, and a random serial.
fn stamp(params: &mut CertificateParams, days: u32) -> Result<(), PkiError> {
    if days == 0 || days > 36_500 {
        return Err(PkiError::Invalid(format!("a certificate lifetime of {days} days; give 1 to 36500")));
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(days.into());
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial[0] |= 0x40;
    params.serial_number = Some(serial.to_vec().into());
    Ok(())
}

use cohort_io::unix_now;

/// File names inside a server state directory.
#[derive(Debug, Clone)]
pub struct StatePaths {
    pub dir: PathBuf,
}

impl StatePaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn database(&self) -> PathBuf {
        self.dir.join("cohort.db")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    pub fn checkpoint(&self, round: u64) -> PathBuf {
        self.checkpoints().join(format!("round-{round:06}.safetensors"))
    }
    /// What the running server is doing (`cohort-server status` reads it).
    pub fn live(&self) -> PathBuf {
        self.dir.join("live.json")
    }
    /// Where a submitted run keeps its files: its run file and model spec, and records laid
    /// out as a state directory's own (`cohort.db`, `checkpoints/`).
    pub fn run(&self, name: &str) -> StatePaths {
        StatePaths::new(self.dir.join("runs").join(name))
    }
    /// The records of a run whose `dir` (as cohort.db's runs table gives it) is `dir`: '' for
    /// server.toml's run, whose records are this directory's own.
    pub fn records_of(&self, dir: &str) -> StatePaths {
        match dir {
            "" => self.clone(),
            dir => StatePaths::new(self.dir.join(dir)),
        }
    }
    /// The server optimizer's state after `round` (FedAvgM, FedAdam, FedYogi).
    pub fn optimizer_checkpoint(&self, round: u64) -> PathBuf {
        self.checkpoints().join(format!("round-{round:06}.optimizer.safetensors"))
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Missing { path: path.display().to_string(), source })
}

/// Creates the CA and the server certificate for `name` with the subject alternative names
/// `sans` (host names or IP addresses the clients dial). With `offline_ca`, the CA's key and
/// certificate go there (to be moved off this machine) and the state directory gets only the CA
/// certificate.
pub fn init(state: &StatePaths, name: &str, sans: &[String], offline_ca: Option<&Path>) -> Result<(), PkiError> {
    if offline_ca.is_some_and(|dir| same_dir(dir, &state.dir)) {
        return Err(PkiError::Invalid(
            "--offline-ca names the state directory itself: give a directory to move off the server".into(),
        ));
    }
    let ca_dir = StatePaths::new(offline_ca.unwrap_or(&state.dir));
    for key in [ca_dir.ca_key(), state.ca_key(), state.server_key()] {
        if key.exists() {
            return Err(PkiError::Exists { path: key.display().to_string() });
        }
    }
    if sans.is_empty() {
        return Err(PkiError::Invalid("give at least one --san (the host name or IP address clients dial)".into()));
    }
    for dir in [&state.dir, &ca_dir.dir] {
        std::fs::create_dir_all(dir).map_err(|source| FileError::Io { path: dir.display().to_string(), source })?;
    }
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn(&format!("{name} Cohort CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    stamp(&mut ca_params, CA_DAYS)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = dn(name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    stamp(&mut params, SERVER_DAYS)?;
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_secret(&ca_dir.ca_key(), ca_key.serialize_pem().as_bytes())?;
    write_atomic(&ca_dir.ca_cert(), ca_cert.pem().as_bytes())?;
    write_atomic(&state.ca_cert(), ca_cert.pem().as_bytes())?;
    write_secret(&state.server_key(), server_key.serialize_pem().as_bytes())?;
    write_atomic(&state.server_cert(), server_cert.pem().as_bytes())?;
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canonical(a) == canonical(b)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The CA in `ca` (a state directory, or an offline CA directory) as an issuer.
fn issuer(ca: &StatePaths) -> Result<Issuer<'static, KeyPair>, PkiError> {
    if !ca.ca_key().exists() && ca.ca_cert().exists() {
        return Err(PkiError::OfflineCa { dir: ca.dir.display().to_string() });
    }
    let key = KeyPair::from_pem(&read(&ca.ca_key())?)?;
    Ok(Issuer::from_ca_cert_pem(&read(&ca.ca_cert())?, key)?)
}

/// Client certificates are valid for client authentication only.
fn client_usages(params: &mut CertificateParams) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
}

fn check_id(id: &str) -> Result<(), PkiError> {
    cohort_io::check_client_id(id).map_err(PkiError::Invalid)
}

fn facts(der: &[u8]) -> Result<CertificateFacts, PkiError> {
    CertificateFacts::from_der(&der.to_vec().into()).map_err(|e| PkiError::Invalid(e.to_string()))
}

/// Signs a client's certificate signing request (PEM) with the CA in `ca`, valid for `days`;
/// returns the certificate PEM and what it certifies. Registers nothing: for an offline CA, or
/// through [`enroll_csr`].
pub fn sign_csr(ca: &StatePaths, csr_pem: &str, days: u32) -> Result<(String, CertificateFacts), PkiError> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::Invalid(format!("not a valid certificate signing request: {e}")))?;
    let id = csr
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            rcgen::DnValue::Utf8String(s) => Some(s.clone()),
            rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
            _ => None,
        })
        .ok_or_else(|| PkiError::Invalid("the request's subject has no common name (the client id)".into()))?;
    check_id(&id)?;
    client_usages(&mut csr.params);
    csr.params.subject_alt_names.clear();
    stamp(&mut csr.params, days)?;
    let cert = csr.signed_by(&issuer(ca)?)?;
    Ok((cert.pem(), facts(cert.der())?))
}

/// Signs a request with the state directory's CA and registers the certificate in cohort.db;
/// returns the certificate PEM, what it certifies and the serials the enrolment revoked.
pub fn enroll_csr(
    state: &StatePaths,
    csr_pem: &str,
    days: u32,
    mode: Enrolment,
) -> Result<(String, CertificateFacts, Vec<String>), PkiError> {
    let (pem, facts) = sign_csr(state, csr_pem, days)?;
    let revoked = Store::open(&state.database())?.register_certificate(&facts, unix_now(), mode)?;
    Ok((pem, facts, revoked))
}

/// Registers a certificate signed elsewhere (by the offline CA): it must be a client certificate
/// signed by this state directory's CA and valid now.
pub fn register(
    state: &StatePaths,
    cert_pem: &str,
    mode: Enrolment,
) -> Result<(CertificateFacts, Vec<String>), PkiError> {
    let cert = cohort_io::certificate_from_pem(cert_pem.as_bytes()).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let ca = cohort_io::certificate_from_pem(read(&state.ca_cert())?.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("{}: {e}", state.ca_cert().display())))?;
    let facts = cohort_io::check_issued_by(&cert, &ca).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let revoked = Store::open(&state.database())?.register_certificate(&facts, unix_now(), mode)?;
    Ok((facts, revoked))
}

/// Makes a key and certificate for `client_id`, registers the certificate and returns one PEM
/// bundle: private key, client certificate, CA certificate. For scenarios and quick starts: the
/// key passes through the operator, which `keygen` + `enroll --csr` avoids.
pub fn make_bundle(state: &StatePaths, client_id: &str, days: u32, mode: Enrolment) -> Result<String, PkiError> {
    check_id(client_id)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(client_id);
    client_usages(&mut params);
    stamp(&mut params, days)?;
    let cert = params.signed_by(&key, &issuer(state)?)?;
    Store::open(&state.database())?.register_certificate(&facts(cert.der())?, unix_now(), mode)?;
    Ok(format!("{}{}{}", key.serialize_pem(), cert.pem(), read(&state.ca_cert())?))
}

/// The server's TLS identity from its state directory.
pub fn server_identity(state: &StatePaths) -> Result<cohort_io::Identity, PkiError> {
    let cert = read(&state.server_cert())?;
    let key = read(&state.server_key())?;
    let ca = read(&state.ca_cert())?;
    cohort_io::Identity::from_pem(cert.as_bytes(), key.as_bytes(), ca.as_bytes())
        .map_err(|e| PkiError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(id);
        (params.serialize_request(&key).unwrap().pem().unwrap(), key.serialize_pem())
    }

    #[test]
    fn init_sign_and_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path());
        init(&state, "test", &["localhost".into()], None).unwrap();
        assert!(matches!(init(&state, "test", &["localhost".into()], None), Err(PkiError::Exists { .. })));
        let (csr, key) = request("hospital-1");
        let (cert, facts, revoked) = enroll_csr(&state, &csr, 30, Enrolment::New).unwrap();
        assert_eq!((facts.client.as_str(), revoked.len()), ("hospital-1", 0));
        // A lifetime of 30 days from (five minutes before) now, and a random 16-byte serial.
        let lifetime = facts.not_after - facts.not_before;
        assert!((30 * 86_400..30 * 86_400 + 400).contains(&lifetime), "{lifetime}");
        assert_eq!(facts.serial.len(), 32);
        let identity =
            cohort_io::Identity::from_pem(cert.as_bytes(), key.as_bytes(), read(&state.ca_cert()).unwrap().as_bytes())
                .unwrap();
        assert_eq!(identity.subject().unwrap(), "hospital-1");
        identity.check_signed_by_ca().unwrap();
        // The same id again: refused unless renewed or replaced.
        let again = enroll_csr(&state, &request("hospital-1").0, 30, Enrolment::New).unwrap_err();
        assert!(again.to_string().contains("--renew"), "{again}");
        let (_, _, revoked) = enroll_csr(&state, &request("hospital-1").0, 30, Enrolment::Replace).unwrap();
        assert_eq!(revoked, vec![facts.serial.clone()]);

        let bundle = make_bundle(&state, "bank-2", CLIENT_DAYS, Enrolment::New).unwrap();
        assert_eq!(cohort_io::Identity::from_bundle(bundle.as_bytes()).unwrap().subject().unwrap(), "bank-2");
        assert!(sign_csr(&state, "garbage", 30).unwrap_err().to_string().contains("signing request"));
        assert!(make_bundle(&state, "bad id!", 30, Enrolment::New).is_err());
        assert!(make_bundle(&state, "ok", 0, Enrolment::New).is_err());
        for odd in ["", &"x".repeat(10_000), "a\nround complete round=999"] {
            let err = enroll_csr(&state, &request(odd).0, 30, Enrolment::New).unwrap_err().to_string();
            assert!(err.contains("client id") && err.len() < 300, "{err}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [state.ca_key(), state.server_key()] {
                assert_eq!(std::fs::metadata(k).unwrap().permissions().mode() & 0o777, 0o600);
            }
        }
    }

    /// With an offline CA the server holds no CA key: it cannot sign (so a compromised server
    /// mints no identity), and registers only certificates its CA signed.
    #[test]
    fn an_offline_ca_signs_and_the_server_only_registers() {
        let dir = tempfile::tempdir().unwrap();
        let (state, ca) = (StatePaths::new(dir.path().join("state")), StatePaths::new(dir.path().join("ca")));
        assert!(init(&state, "test", &["localhost".into()], Some(&state.dir)).is_err());
        init(&state, "test", &["localhost".into()], Some(&ca.dir)).unwrap();
        assert!(!state.ca_key().exists() && ca.ca_key().exists() && state.ca_cert().exists());
        let err = make_bundle(&state, "h1", 30, Enrolment::New).unwrap_err();
        assert!(matches!(err, PkiError::OfflineCa { .. }), "{err}");
        assert!(err.to_string().contains("cohort-server sign"), "{err}");
        let (cert, facts) = sign_csr(&ca, &request("h1").0, 30).unwrap();
        assert!(
            Store::open(&state.database()).unwrap().certificates().unwrap().is_empty(),
            "signing registers nothing"
        );
        let (registered, _) = register(&state, &cert, Enrolment::New).unwrap();
        assert_eq!(registered, facts);
        // A certificate from another CA is not registered.
        let other = tempfile::tempdir().unwrap();
        let other = StatePaths::new(other.path());
        init(&other, "other", &["localhost".into()], None).unwrap();
        let (foreign, _) = sign_csr(&other, &request("h2").0, 30).unwrap();
        let err = register(&state, &foreign, Enrolment::New).unwrap_err().to_string();
        assert!(err.contains("not signed by the configured CA"), "{err}");
    }
}
