//! TLS settings for the connection to Proxmox: the platform trust store, a given CA bundle
//! (PVE's own `pve-root-ca.pem`), a pinned SHA-256 fingerprint of the node's certificate, or
//! no verification at all when explicitly asked for.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use super::error::{Error, Result};

/// How the server certificate is checked.
#[derive(Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// The platform's trust store (a publicly trusted or locally installed certificate).
    System,
    /// Only the given CA certificates, PEM-encoded (for example `/etc/pve/pve-root-ca.pem`).
    CaBundle(String),
    /// The leaf certificate's SHA-256 fingerprint, as `pvenode cert info` prints it.
    Fingerprint([u8; 32]),
    /// No verification. Only when asked for; logged as a warning.
    Insecure,
}

impl fmt::Debug for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsMode::System => f.write_str("System"),
            TlsMode::CaBundle(pem) => write!(f, "CaBundle({} bytes of PEM)", pem.len()),
            TlsMode::Fingerprint(fp) => write!(f, "Fingerprint({})", format_fingerprint(fp)),
            TlsMode::Insecure => f.write_str("Insecure"),
        }
    }
}

/// Parse a SHA-256 fingerprint written as `AA:BB:...` (any case, `:` or `-` or spaces between
/// bytes) or as 64 plain hex digits.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32]> {
    let mut t = text.trim();
    // Accept what `openssl x509 -fingerprint -sha256` prints: "sha256 Fingerprint=AA:BB..".
    if let Some((_, rest)) = t.split_once('=') {
        t = rest.trim();
    }
    let hex_digits: String = t
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | ' '))
        .collect();
    let bytes = hex::decode(&hex_digits).map_err(|_| {
        Error::config(format!(
            "fingerprint {text:?} is not hexadecimal; expected 32 bytes like AA:BB:...:FF (pvenode cert info)"
        ))
    })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        Error::config(format!(
            "fingerprint {text:?} has {} bytes, a SHA-256 fingerprint has 32 (AA:BB:... with 32 pairs)",
            bytes.len()
        ))
    })
}

/// `AA:BB:...` form of a fingerprint.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse PEM text into certificates; at least one is required.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        certs.push(
            cert.map_err(|e| Error::config(format!("CA certificate PEM is not valid: {e}")))?,
        );
    }
    if certs.is_empty() {
        return Err(Error::config(
            "CA certificate PEM holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)",
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Build the rustls client configuration for a mode.
pub fn client_config(mode: &TlsMode) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS setup: {e}")))?;
    let mut config = match mode {
        TlsMode::System => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| Error::config(format!("cannot load the system trust store: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        TlsMode::CaBundle(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in parse_ca_pem(pem)? {
                roots.add(cert).map_err(|e| {
                    Error::config(format!("CA certificate not usable as a trust anchor: {e}"))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsMode::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LeafVerifier {
                pin: Some(*fp),
                provider,
            }))
            .with_no_client_auth(),
        TlsMode::Insecure => {
            tracing::warn!(
                "TLS certificate verification of the Proxmox API is DISABLED (insecure=true)"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LeafVerifier {
                    pin: None,
                    provider,
                }))
                .with_no_client_auth()
        }
    };
    // pveproxy speaks HTTP/1.1 only, and HTTP/1 keeps the reason phrase older PVE puts errors in.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The leaf-only verifier of the `fingerprint` and `insecure` modes. With a pin it accepts
/// exactly the certificate whose DER SHA-256 matches, whoever signed it (PVE's node certificates
/// are signed by a per-cluster CA, and its own nodes pin the same way); without one (insecure
/// mode) any certificate. Either way the handshake signatures are verified against the
/// certificate shown, so the connection is at least bound to it.
#[derive(Debug)]
struct LeafVerifier {
    /// `None`: insecure mode.
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LeafVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = &self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if &got == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned {}",
                format_fingerprint(&got),
                format_fingerprint(pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn fingerprints_in_colon_and_plain_hex() {
        let a = parse_fingerprint(FP).unwrap();
        let b = parse_fingerprint(&FP.replace(':', "").to_lowercase()).unwrap();
        let c = parse_fingerprint(&format!("sha256 Fingerprint={FP}")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a[0], 0xAB);
        assert_eq!(format_fingerprint(&a), FP);
    }

    #[test]
    fn bad_fingerprints_are_config_errors() {
        for bad in ["", "zz", "AB:CD", &FP[..FP.len() - 3], &format!("{FP}:00")] {
            let e = parse_fingerprint(bad).unwrap_err();
            assert_eq!(e.category(), "config", "{bad}");
        }
    }

    #[test]
    fn pem_without_certificates_is_refused() {
        assert!(parse_ca_pem("").is_err());
        assert!(
            parse_ca_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_err()
        );
    }

    #[test]
    fn every_mode_builds() {
        let fp = parse_fingerprint(FP).unwrap();
        assert!(client_config(&TlsMode::Fingerprint(fp)).is_ok());
        assert!(client_config(&TlsMode::Insecure).is_ok());
        assert!(format!("{:?}", TlsMode::Fingerprint(fp)).contains("AB:CD"));
    }

    /// Captures what a subscriber writes, to see the insecure-mode warning.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_insecure_mode_warns() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let fp = parse_fingerprint(FP).unwrap();
        let _anchor = crate::telemetry::interest_anchor();
        tracing::subscriber::with_default(subscriber, || {
            client_config(&TlsMode::Fingerprint(fp)).unwrap();
            assert!(out.0.lock().unwrap().is_empty());
            client_config(&TlsMode::Insecure).unwrap();
        });
        let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
        assert!(text.contains("WARN") && text.contains("DISABLED"), "{text}");
    }
}
