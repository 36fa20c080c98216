//! The operator's certificate authority: `init` makes a CA and the server certificate,
//! `enroll` signs clients' requests (or makes a whole bundle for quick starts). All keys are
//! ECDSA P-256 and are written with mode 0600.

use std::path::{Path, PathBuf};

use cohort_io::files::{write_atomic, write_secret, FileError};
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
}

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
    /// The server optimizer's state after `round` (FedAvgM, FedAdam, FedYogi).
    pub fn optimizer_checkpoint(&self, round: u64) -> PathBuf {
        self.checkpoints().join(format!("round-{round:06}.optimizer.safetensors"))
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Missing { path: path.display().to_string(), source })
}

/// Client ids are certificate subjects, file names and log fields: keep them plain.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Creates the CA and the server certificate for `name` with the subject alternative names
/// `sans` (host names or IP addresses the clients dial).
pub fn init(state: &StatePaths, name: &str, sans: &[String]) -> Result<(), PkiError> {
    if state.ca_key().exists() {
        return Err(PkiError::Exists { path: state.ca_key().display().to_string() });
    }
    if sans.is_empty() {
        return Err(PkiError::Invalid("give at least one --san (the host name or IP address clients dial)".into()));
    }
    std::fs::create_dir_all(&state.dir)
        .map_err(|source| FileError::Io { path: state.dir.display().to_string(), source })?;
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn(&format!("{name} Cohort CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = dn(name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_secret(&state.ca_key(), ca_key.serialize_pem().as_bytes())?;
    write_atomic(&state.ca_cert(), ca_cert.pem().as_bytes())?;
    write_secret(&state.server_key(), server_key.serialize_pem().as_bytes())?;
    write_atomic(&state.server_cert(), server_cert.pem().as_bytes())?;
    Ok(())
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn issuer(state: &StatePaths) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&read(&state.ca_key())?)?;
    Ok(Issuer::from_ca_cert_pem(&read(&state.ca_cert())?, key)?)
}

/// Client certificates are valid for client authentication only.
fn client_usages(params: &mut CertificateParams) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
}

/// Signs a client's certificate signing request (PEM); returns the client id (the request's
/// subject CN) and the certificate PEM.
pub fn sign_csr(state: &StatePaths, csr_pem: &str) -> Result<(String, String), PkiError> {
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
    if !is_valid_id(&id) {
        return Err(PkiError::Invalid(format!("client id `{id}` must be 1-64 ASCII letters, digits, '-', '_' or '.'")));
    }
    client_usages(&mut csr.params);
    let cert = csr.signed_by(&issuer(state)?)?;
    Ok((id, cert.pem()))
}

/// Makes a key and certificate for `client_id` and returns one PEM bundle: private key, client
/// certificate, CA certificate. For scenarios and quick starts: the key passes through the
/// operator, which `keygen` + `enroll --csr` avoids.
pub fn make_bundle(state: &StatePaths, client_id: &str) -> Result<String, PkiError> {
    if !is_valid_id(client_id) {
        return Err(PkiError::Invalid(format!(
            "client id `{client_id}` must be 1-64 ASCII letters, digits, '-', '_' or '.'"
        )));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(client_id);
    client_usages(&mut params);
    let cert = params.signed_by(&key, &issuer(state)?)?;
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

    #[test]
    fn init_sign_and_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let state = StatePaths::new(dir.path());
        init(&state, "test", &["localhost".into()]).unwrap();
        assert!(matches!(init(&state, "test", &["localhost".into()]), Err(PkiError::Exists { .. })));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn("hospital-1");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let key = key.serialize_pem();
        let (id, cert) = sign_csr(&state, &csr).unwrap();
        assert_eq!(id, "hospital-1");
        let identity =
            cohort_io::Identity::from_pem(cert.as_bytes(), key.as_bytes(), read(&state.ca_cert()).unwrap().as_bytes())
                .unwrap();
        assert_eq!(identity.subject().unwrap(), "hospital-1");
        let bundle = cohort_io::Identity::from_bundle(make_bundle(&state, "bank-2").unwrap().as_bytes()).unwrap();
        assert_eq!(bundle.subject().unwrap(), "bank-2");
        assert!(sign_csr(&state, "garbage").unwrap_err().to_string().contains("signing request"));
        assert!(make_bundle(&state, "bad id!").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [state.ca_key(), state.server_key()] {
                assert_eq!(std::fs::metadata(k).unwrap().permissions().mode() & 0o777, 0o600);
            }
        }
    }
}
