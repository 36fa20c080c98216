//! The certificate side of secure aggregation: clients sign their key adverts with their
//! certificate key, and check each neighbour's certificate against the operator's CA (chain,
//! validity, client-auth usage, subject = claimed id) and signature before encrypting to it.

use cohort_common::secagg::{AdvertSigner, PeerVerifier, Rejection};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::{subject_cn, Identity, NetError};

/// Signs with the client's certificate key (ECDSA P-256, as `cohort-server enroll` issues).
pub struct CertSigner {
    key: EcdsaKeyPair,
    certificate: Vec<u8>,
    rng: SystemRandom,
}

impl std::fmt::Debug for CertSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertSigner(<redacted>)")
    }
}

impl CertSigner {
    pub fn new(identity: &Identity) -> Result<Self, NetError> {
        let rng = SystemRandom::new();
        let PrivateKeyDer::Pkcs8(pkcs8) = &identity.key else {
            return Err(NetError::Identity(
                "secure aggregation needs a PKCS#8 ECDSA P-256 key (as `cohort-client keygen` makes)".into(),
            ));
        };
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.secret_pkcs8_der(), &rng)
            .map_err(|e| NetError::Identity(format!("the private key is not an ECDSA P-256 key: {e}")))?;
        Ok(Self { key, certificate: identity.chain[0].to_vec(), rng })
    }
}

impl AdvertSigner for CertSigner {
    fn certificate(&self) -> Vec<u8> {
        self.certificate.clone()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        self.key.sign(&self.rng, message).map(|s| s.as_ref().to_vec()).map_err(|e| e.to_string())
    }
}

/// Checks neighbours' certificates against the operator's CA. A certificate that passed the
/// chain check is remembered for [`CHECKED_FOR`] (by the SHA-256 of its DER), so the adverts,
/// confirmations and masking lists of the same clients round after round cost one signature
/// check each, not a chain check too. Clones share the memory (simulated clients of one CA share
/// one verifier).
#[derive(Debug, Clone)]
pub struct CaVerifier {
    ca: CertificateDer<'static>,
    checked: Arc<Mutex<Checked>>,
}

/// Certificates that passed the chain check: the SHA-256 of the DER, its subject and when.
type Checked = HashMap<[u8; 32], (String, Instant)>;

/// How long a certificate that passed the chain check is trusted without checking it again
/// (its expiry and the CA's are checked again after that). A certificate that expires meanwhile
/// may therefore still be accepted for up to this long after its expiry: the price of not
/// re-parsing every peer's chain for each signature of a round.
pub const CHECKED_FOR: Duration = Duration::from_secs(300);
/// The most certificates remembered; the memory is cleared when full.
const MAX_CHECKED: usize = 1 << 16;

impl CaVerifier {
    pub fn new(identity: &Identity) -> Self {
        Self { ca: identity.ca.clone(), checked: Arc::default() }
    }

    /// The subject of a certificate (by digest) that passed the chain check within [`CHECKED_FOR`].
    fn remembered(&self, digest: &[u8; 32]) -> Option<String> {
        let checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        checked.get(digest).filter(|(_, at)| at.elapsed() < CHECKED_FOR).map(|(subject, _)| subject.clone())
    }

    fn remember(&self, digest: [u8; 32], subject: String) {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked.len() >= MAX_CHECKED {
            checked.clear();
        }
        checked.insert(digest, (subject, Instant::now()));
    }

    /// The chain check: this CA's client certificate, valid now; returns its subject.
    fn check_chain(&self, der: &CertificateDer<'_>) -> Result<String, Rejection> {
        let anchor = webpki::anchor_from_trusted_cert(&self.ca)
            .map_err(|e| Rejection::Certificate(format!("the CA certificate: {e}")))?;
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|e| Rejection::Certificate(format!("the certificate does not parse: {e}")))?;
        cert.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ECDSA_P384_SHA384, webpki::ring::ED25519],
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            Rejection::Certificate(format!("the certificate is not a client certificate of this federation's CA: {e}"))
        })?;
        subject_cn(der).map_err(|e| Rejection::Certificate(e.to_string()))
    }
}

impl PeerVerifier for CaVerifier {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Rejection> {
        let der = CertificateDer::from(certificate);
        let digest: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, certificate).as_ref().try_into().expect("32 bytes");
        let subject = match self.remembered(&digest) {
            Some(subject) => subject,
            None => {
                let subject = self.check_chain(&der)?;
                self.remember(digest, subject.clone());
                subject
            }
        };
        if subject != client {
            return Err(Rejection::Certificate(format!("the certificate belongs to `{subject}`, not `{client}`")));
        }
        self.verify_signature(certificate, message, signature).map_err(Rejection::Signature)
    }

    fn verify_signature(&self, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
        let der = CertificateDer::from(certificate);
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("the certificate does not parse: {e}"))?;
        cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
            .map_err(|e| format!("the signature does not verify: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    fn client(ca: &Ca, id: &str) -> Identity {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &Issuer::from_params(&ca.params, &ca.key)).unwrap();
        Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), ca.pem.as_bytes()).unwrap()
    }

    #[test]
    fn adverts_verify_only_with_the_right_ca_subject_and_signature() {
        use cohort_common::secagg::{AdvertSigner, PeerVerifier, Rejection};
        let ours = ca("ours");
        let theirs = ca("theirs");
        let alice = client(&ours, "alice");
        let verifier = CaVerifier::new(&client(&ours, "bob"));
        let signer = CertSigner::new(&alice).unwrap();
        let sig = signer.sign(b"keys").unwrap();
        verifier.verify("alice", &signer.certificate(), b"keys", &sig).unwrap();

        let err = verifier.verify("bob", &signer.certificate(), b"keys", &sig).unwrap_err();
        assert!(matches!(err, Rejection::Certificate(ref m) if m.contains("belongs to `alice`")), "{err}");
        let err = verifier.verify("alice", &signer.certificate(), b"other keys", &sig).unwrap_err();
        assert!(matches!(err, Rejection::Signature(ref m) if m.contains("signature")), "{err}");
        let stranger = CertSigner::new(&client(&theirs, "alice")).unwrap();
        let sig = stranger.sign(b"keys").unwrap();
        let err = verifier.verify("alice", &stranger.certificate(), b"keys", &sig).unwrap_err();
        assert!(matches!(err, Rejection::Certificate(ref m) if m.contains("CA")), "{err}");
        assert!(verifier.verify("alice", b"not a certificate", b"keys", &sig).is_err());
        // A remembered certificate still has its subject and signature checked.
        let sig = signer.sign(b"keys").unwrap();
        verifier.verify("alice", &signer.certificate(), b"keys", &sig).unwrap();
        assert!(verifier.verify("mallory", &signer.certificate(), b"keys", &sig).is_err());
        assert!(verifier.verify("alice", &signer.certificate(), b"other", &sig).is_err());
        // The signature alone, with a certificate already accepted.
        let sig = signer.sign(b"survivors").unwrap();
        verifier.verify_signature(&signer.certificate(), b"survivors", &sig).unwrap();
        assert!(verifier.verify_signature(&signer.certificate(), b"other survivors", &sig).is_err());
    }
}
