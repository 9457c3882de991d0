//! The credentials file `loadtest register --creds-out` writes and `loadtest reconnect --creds`
//! reads: JSON lines, one device a line, `{"unit_id":…,"key":PKCS#8 PEM,"cert":PEM}`. The
//! order is the order in which devices finished; nothing depends on it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// One registered device: its unit ID, private key and device certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub unit_id: String,
    /// The device's private key, PKCS#8 PEM.
    pub key: String,
    /// The device certificate the gateway issued, PEM.
    pub cert: String,
}

impl Credential {
    /// The certificate chain (the device certificate) and the private key, decoded.
    pub fn decode(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let chain = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("bad certificate PEM for unit {}", self.unit_id))?;
        if chain.is_empty() {
            bail!("no certificate for unit {}", self.unit_id);
        }
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .with_context(|| format!("bad private key PEM for unit {}", self.unit_id))?;
        Ok((chain, key))
    }

    /// One line of the file, with its newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("plain data serializes");
        line.push('\n');
        line
    }
}

/// Appends credentials to a file, one JSON line each.
pub struct CredsWriter {
    out: std::io::BufWriter<File>,
    pub written: u64,
}

impl CredsWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("cannot create the credentials file {}", path.display()))?;
        Ok(Self {
            out: std::io::BufWriter::new(file),
            written: 0,
        })
    }

    pub fn write(&mut self, cred: &Credential) -> Result<()> {
        self.out.write_all(cred.to_line().as_bytes())?;
        self.written += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<u64> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(self.written)
    }
}

/// Number of credentials (non-empty lines) in a file.
pub fn count(path: &Path) -> Result<u64> {
    let file = File::open(path)
        .with_context(|| format!("cannot open the credentials file {}", path.display()))?;
    let mut n = 0;
    for line in BufReader::new(file).lines() {
        if !line?.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

/// Credentials `first .. first + len` (counting non-empty lines from 0).
pub fn read_slice(path: &Path, first: u64, len: u64) -> Result<Vec<Credential>> {
    let file = File::open(path)
        .with_context(|| format!("cannot open the credentials file {}", path.display()))?;
    let mut out = Vec::with_capacity(len as usize);
    let mut index = 0u64;
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        if index >= first {
            let cred: Credential = serde_json::from_str(&line).with_context(|| {
                format!("{} line {}: not a credential", path.display(), number + 1)
            })?;
            out.push(cred);
            if out.len() as u64 == len {
                break;
            }
        }
        index += 1;
    }
    if (out.len() as u64) < len {
        bail!(
            "{} holds {} credentials from index {first}, {len} needed",
            path.display(),
            out.len()
        );
    }
    Ok(out)
}

/// Keys `first .. first + len` of a keys file (one key per line, as `fleetgate keys create`
/// prints them; blank lines and lines starting with `#` are skipped).
pub fn read_keys(path: &Path, first: u64, len: u64) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the keys file {}", path.display()))?;
    let keys: Vec<String> = key_lines(&text)
        .skip(first as usize)
        .take(len as usize)
        .map(str::to_owned)
        .collect();
    if (keys.len() as u64) < len {
        bail!(
            "{} holds too few keys: {len} needed from index {first}",
            path.display()
        );
    }
    Ok(keys)
}

/// The usable lines of a keys file.
pub fn key_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(unit: &str) -> Credential {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["x.example".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        Credential {
            unit_id: unit.to_owned(),
            key: key.serialize_pem(),
            cert: cert.pem(),
        }
    }

    #[test]
    fn credentials_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("lt-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("creds.jsonl");
        let creds: Vec<Credential> = (0..5).map(|i| sample(&format!("lt-{i:06}"))).collect();
        let mut w = CredsWriter::create(&path).unwrap();
        for c in &creds {
            w.write(c).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 5);
        assert_eq!(count(&path).unwrap(), 5);
        assert_eq!(read_slice(&path, 0, 5).unwrap(), creds);
        assert_eq!(read_slice(&path, 3, 2).unwrap(), creds[3..]);
        assert!(read_slice(&path, 3, 3).is_err());
        let (chain, key) = creds[1].decode().unwrap();
        assert_eq!(chain.len(), 1);
        assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_file_lines() {
        let text = "ABCD-EFGH-IJKL\n\n# comment\n  MNOP-QRST-UVWX  \nZZZZ\n";
        assert_eq!(
            key_lines(text).collect::<Vec<_>>(),
            ["ABCD-EFGH-IJKL", "MNOP-QRST-UVWX", "ZZZZ"]
        );
    }
}
