//! The few DER encodings we build by hand: wrapping PKCS#1 (RSA) and SEC1 (EC) private keys in
//! PKCS#8, so that a keystore always holds one `PRIVATE KEY` format.

/// DER of OID 1.2.840.113549.1.1.1 (rsaEncryption).
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
/// DER of OID 1.2.840.10045.2.1 (id-ecPublicKey).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of the named curves P-256, P-384, P-521.
const OID_CURVES: [&[u8]; 3] = [
    &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
    &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
];
const NULL: &[u8] = &[0x05, 0x00];
const VERSION_0: &[u8] = &[0x02, 0x01, 0x00];

/// One DER TLV with a definite length.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// PKCS#8 `PrivateKeyInfo` around an RSA PKCS#1 `RSAPrivateKey`.
pub(crate) fn pkcs8_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    let alg = sequence(&[OID_RSA_ENCRYPTION, NULL]);
    sequence(&[VERSION_0, &alg, &tlv(0x04, pkcs1)])
}

/// PKCS#8 wrappings of a SEC1 `ECPrivateKey`, one per supported curve; the caller keeps the one
/// the crypto library accepts (a key only loads under its own curve).
pub(crate) fn pkcs8_candidates_from_sec1(sec1: &[u8]) -> Vec<Vec<u8>> {
    OID_CURVES
        .iter()
        .map(|curve| {
            let alg = sequence(&[OID_EC_PUBLIC_KEY, curve]);
            sequence(&[VERSION_0, &alg, &tlv(0x04, sec1)])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(tlv(0x04, &[]), vec![0x04, 0x00]);
        assert_eq!(tlv(0x04, &[0; 0x7f])[..2], [0x04, 0x7f]);
        assert_eq!(tlv(0x04, &[0; 0x80])[..3], [0x04, 0x81, 0x80]);
        assert_eq!(tlv(0x04, &[0; 0x1234])[..4], [0x04, 0x82, 0x12, 0x34]);
    }
}
