//! The certificate side of secure aggregation: clients sign their key adverts with their
//! certificate key, and check each neighbour's certificate against the operator's CA (chain,
//! validity, client-auth usage, subject = claimed id) and signature before encrypting to it.

use cohort_common::secagg::{AdvertSigner, PeerVerifier};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
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

/// Checks neighbours' certificates against the operator's CA.
#[derive(Debug, Clone)]
pub struct CaVerifier {
    ca: CertificateDer<'static>,
}

impl CaVerifier {
    pub fn new(identity: &Identity) -> Self {
        Self { ca: identity.ca.clone() }
    }
}

impl PeerVerifier for CaVerifier {
    fn verify(&self, client: &str, certificate: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
        let anchor = webpki::anchor_from_trusted_cert(&self.ca).map_err(|e| format!("the CA certificate: {e}"))?;
        let der = CertificateDer::from(certificate);
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("the certificate does not parse: {e}"))?;
        cert.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ECDSA_P384_SHA384, webpki::ring::ED25519],
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("the certificate is not a client certificate of this federation's CA: {e}"))?;
        let subject = subject_cn(&der).map_err(|e| e.to_string())?;
        if subject != client {
            return Err(format!("the certificate belongs to `{subject}`, not `{client}`"));
        }
        cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
            .map_err(|e| format!("the signature does not verify: {e}"))
    }
}
