//! PEM in and out: a strict, panic-free reader that tells *why* an input is unusable (empty,
//! DER, truncated, encrypted key, broken base64) and a writer with 64-column lines.
//!
//! We parse PEM ourselves instead of using `rustls_pki_types::pem`, because that reader skips
//! sections it does not know (`ENCRYPTED PRIVATE KEY`) and fails on the `Proc-Type` headers of
//! legacy encrypted keys with a base64 error — the operator needs "the key is encrypted, here is
//! how to decrypt it" instead.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};

use super::PkiError;
use super::der;

/// Largest PEM input we accept (a keystore is a few KB; a long chain a few tens of KB).
pub const MAX_PEM_INPUT: usize = 4 * 1024 * 1024;

/// One `-----BEGIN label-----` … `-----END label-----` section.
#[derive(Debug)]
pub(crate) struct Section {
    pub label: String,
    /// RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`) were present.
    pub encrypted_headers: bool,
    pub der: Vec<u8>,
}

/// Certificates and keys found in one PEM input, in file order.
pub(crate) struct Bundle {
    pub certs: Vec<CertificateDer<'static>>,
    pub keys: Vec<PrivateKeyDer<'static>>,
}

/// Splits `data` into PEM sections. Text outside sections (openssl's "Bag Attributes", `-text`
/// dumps) is ignored. Never panics.
pub(crate) fn sections(data: &[u8], what: &str) -> Result<Vec<Section>, PkiError> {
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(PkiError::Empty { what: what.into() });
    }
    if data.len() > MAX_PEM_INPUT {
        return Err(PkiError::Pem {
            what: what.into(),
            message: format!("the file is larger than {MAX_PEM_INPUT} bytes"),
        });
    }
    let has_begin = data.windows(11).any(|w| w == b"-----BEGIN ");
    if !has_begin {
        // A DER certificate or key starts with a SEQUENCE tag (0x30) and is binary.
        if data[0] == 0x30 && data.iter().any(|b| !b.is_ascii()) {
            return Err(PkiError::Der { what: what.into() });
        }
        return Err(PkiError::Pem {
            what: what.into(),
            message: "no -----BEGIN …----- line found".into(),
        });
    }
    let text = match std::str::from_utf8(data) {
        Ok(t) => t,
        Err(_) => {
            return Err(PkiError::Pem {
                what: what.into(),
                message: "the file contains bytes that are not text".into(),
            });
        }
    };

    let pem_err = |message: String| PkiError::Pem {
        what: what.into(),
        message,
    };
    let mut out = Vec::new();
    // (label, line number of BEGIN, headers seen, base64 text)
    let mut open: Option<(String, usize, bool, String)> = None;
    for (n, raw_line) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = raw_line.trim();
        if let Some(rest) = line.strip_prefix("-----BEGIN ") {
            let Some(label) = rest.strip_suffix("-----") else {
                return Err(pem_err(format!("line {line_no}: malformed BEGIN line")));
            };
            if let Some((open_label, begin, _, _)) = &open {
                return Err(pem_err(format!(
                    "the {open_label} section that starts on line {begin} has no END line \
                     (the file is truncated or two files were pasted together badly)"
                )));
            }
            open = Some((label.to_owned(), line_no, false, String::new()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("-----END ") {
            let Some(label) = rest.strip_suffix("-----") else {
                return Err(pem_err(format!("line {line_no}: malformed END line")));
            };
            let Some((open_label, begin, headers, b64)) = open.take() else {
                return Err(pem_err(format!(
                    "line {line_no}: END {label} without a BEGIN line"
                )));
            };
            if label != open_label {
                return Err(pem_err(format!(
                    "line {line_no}: END {label} does not match BEGIN {open_label} on line {begin}"
                )));
            }
            let der = STANDARD.decode(b64.as_bytes()).map_err(|e| {
                pem_err(format!(
                    "the {open_label} section on line {begin} has invalid base64 ({e})"
                ))
            })?;
            if der.is_empty() {
                return Err(pem_err(format!(
                    "the {open_label} section on line {begin} is empty"
                )));
            }
            out.push(Section {
                label: open_label,
                encrypted_headers: headers,
                der,
            });
            continue;
        }
        if let Some((_, _, headers, b64)) = &mut open {
            if line.is_empty() {
                continue;
            }
            if line.contains(':') {
                // RFC 1421 header, e.g. `Proc-Type: 4,ENCRYPTED` / `DEK-Info: …`.
                if line.starts_with("Proc-Type:") && line.contains("ENCRYPTED") {
                    *headers = true;
                }
                continue;
            }
            b64.push_str(line);
        }
    }
    if let Some((label, begin, _, _)) = open {
        return Err(pem_err(format!(
            "the {label} section that starts on line {begin} has no END line (the file is truncated)"
        )));
    }
    Ok(out)
}

/// Parses certificates and private keys out of a PEM input. Certificates are checked to be
/// X.509; keys are normalised to PKCS#8 and checked to be usable. Encrypted keys are refused
/// with the decryption hint. Other sections (`EC PARAMETERS`, `CERTIFICATE REQUEST`) are skipped.
pub(crate) fn bundle(data: &[u8], what: &str) -> Result<Bundle, PkiError> {
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    for section in sections(data, what)? {
        match section.label.as_str() {
            "CERTIFICATE" | "X509 CERTIFICATE" | "TRUSTED CERTIFICATE" => {
                let index = certs.len() + 1;
                check_certificate(&section.der, what, index)?;
                certs.push(CertificateDer::from(section.der));
            }
            "ENCRYPTED PRIVATE KEY" => return Err(PkiError::EncryptedKey { what: what.into() }),
            "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" if section.encrypted_headers => {
                return Err(PkiError::EncryptedKey { what: what.into() });
            }
            "PRIVATE KEY" => keys.push(normalize_key(
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(section.der)),
                what,
            )?),
            "RSA PRIVATE KEY" => keys.push(normalize_key(
                PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(section.der)),
                what,
            )?),
            "EC PRIVATE KEY" => keys.push(normalize_key(
                PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(section.der)),
                what,
            )?),
            _ => {}
        }
    }
    if certs.is_empty() && keys.is_empty() {
        return Err(PkiError::Pem {
            what: what.into(),
            message: "no CERTIFICATE or PRIVATE KEY section found".into(),
        });
    }
    Ok(Bundle { certs, keys })
}

fn check_certificate(der: &[u8], what: &str, index: usize) -> Result<(), PkiError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], _)) => Ok(()),
        Ok(_) => Err(PkiError::Certificate {
            what: what.into(),
            index,
            message: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(PkiError::Certificate {
            what: what.into(),
            index,
            message: e.to_string(),
        }),
    }
}

/// Converts any supported key encoding (PKCS#8, PKCS#1 RSA, SEC1 EC) to PKCS#8 and checks that
/// it can sign (RSA, ECDSA P-256/P-384/P-521, Ed25519).
pub(crate) fn normalize_key(
    key: PrivateKeyDer<'static>,
    what: &str,
) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bad = |message: &str| PkiError::Key {
        what: what.into(),
        message: message.into(),
    };
    let candidates: Vec<Vec<u8>> = match &key {
        PrivateKeyDer::Pkcs8(k) => vec![k.secret_pkcs8_der().to_vec()],
        PrivateKeyDer::Pkcs1(k) => vec![der::pkcs8_from_pkcs1(k.secret_pkcs1_der())],
        PrivateKeyDer::Sec1(k) => der::pkcs8_candidates_from_sec1(k.secret_sec1_der()),
        _ => return Err(bad("unsupported key encoding")),
    };
    for pkcs8 in candidates {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
        if rcgen::KeyPair::try_from(&der).is_ok() {
            return Ok(der);
        }
    }
    Err(bad(
        "not a usable RSA, ECDSA (P-256, P-384, P-521) or Ed25519 private key",
    ))
}

/// Encodes one PEM section with 64-column base64 lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// PEM of a certificate.
pub fn cert_pem(cert: &CertificateDer<'_>) -> String {
    encode("CERTIFICATE", cert.as_ref())
}

/// PEM (`PRIVATE KEY`, PKCS#8) of a key that went through [`normalize_key`].
pub(crate) fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    encode("PRIVATE KEY", key.secret_der())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_apart_empty_der_truncated_and_garbage() {
        assert!(matches!(sections(b"", "t"), Err(PkiError::Empty { .. })));
        assert!(matches!(
            sections(b" \n\t", "t"),
            Err(PkiError::Empty { .. })
        ));
        assert!(matches!(
            sections(&[0x30, 0x82, 0x01, 0xff, 0x80], "t"),
            Err(PkiError::Der { .. })
        ));
        assert!(matches!(
            sections(b"hello world", "t"),
            Err(PkiError::Pem { .. })
        ));
        let truncated = "-----BEGIN CERTIFICATE-----\nMIIB\n";
        let e = sections(truncated.as_bytes(), "t").unwrap_err();
        assert!(e.to_string().contains("no END line"), "{e}");
        let bad64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = sections(bad64.as_bytes(), "t").unwrap_err();
        assert!(e.to_string().contains("invalid base64"), "{e}");
        let garbage = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            bundle(garbage.as_bytes(), "t"),
            Err(PkiError::Certificate { .. })
        ));
    }

    #[test]
    fn encrypted_keys_are_refused_with_the_hint() {
        let pkcs8 = "-----BEGIN ENCRYPTED PRIVATE KEY-----\naGVsbG8=\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\naGVsbG8=\n-----END RSA PRIVATE KEY-----\n";
        for input in [pkcs8, legacy] {
            let e = bundle(input.as_bytes(), "t").err().expect("refused");
            assert!(matches!(e, PkiError::EncryptedKey { .. }));
            assert!(
                e.to_string()
                    .contains("openssl rsa -in encrypted.key -out decrypted.key")
            );
        }
    }

    #[test]
    fn encode_round_trips() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let s = sections(pem.as_bytes(), "t").unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].der, der);
    }
}
