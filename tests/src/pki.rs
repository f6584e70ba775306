//! Certificates for the TLS tests, generated per test (`rcgen`, ring): a CA, a server certificate
//! it signs for 127.0.0.1 and localhost, the same server name with an expired certificate, a client
//! certificate (mutual TLS), and a second, unrelated CA (the "wrong CA"). Written as PEM files in a
//! scratch directory removed on drop.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// Common name of the client certificate (the receiver reports it as `peer_cn`).
pub const CLIENT_CN: &str = "keepalive-agent-test-client";

/// The PEM files of one test's PKI.
pub struct Pki {
    dir: PathBuf,
    /// The CA that signs the server and client certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Signed by [`Pki::ca`] for the same names, valid only in 2020.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of these.
    pub other_ca: PathBuf,
}

fn ca_params(cn: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn leaf_params(cn: &str, names: &[&str], eku: ExtendedKeyUsagePurpose) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    Ok(p)
}

impl Pki {
    /// Generates everything into a fresh scratch directory.
    pub fn generate() -> Result<Pki> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("keepalive-tests-pki-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let write = |name: &str, pem: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca = CertifiedIssuer::self_signed(ca_params("keepalive test CA")?, KeyPair::generate()?)?;
        let other = CertifiedIssuer::self_signed(ca_params("keepalive unrelated CA")?, KeyPair::generate()?)?;
        let names = ["127.0.0.1", "localhost"];
        let server_key = KeyPair::generate()?;
        let server = leaf_params("localhost", &names, ExtendedKeyUsagePurpose::ServerAuth)?.signed_by(&server_key, &ca)?;
        let expired_key = KeyPair::generate()?;
        let mut expired = leaf_params("localhost", &names, ExtendedKeyUsagePurpose::ServerAuth)?;
        expired.not_before = date_time_ymd(2020, 1, 1);
        expired.not_after = date_time_ymd(2020, 12, 31);
        let expired = expired.signed_by(&expired_key, &ca)?;
        let client_key = KeyPair::generate()?;
        let client = leaf_params(CLIENT_CN, &[], ExtendedKeyUsagePurpose::ClientAuth)?.signed_by(&client_key, &ca)?;
        Ok(Pki {
            ca: write("ca.pem", &ca.pem())?,
            server_cert: write("server.pem", &server.pem())?,
            server_key: write("server.key", &server_key.serialize_pem())?,
            expired_cert: write("expired.pem", &expired.pem())?,
            expired_key: write("expired.key", &expired_key.serialize_pem())?,
            client_cert: write("client.pem", &client.pem())?,
            client_key: write("client.key", &client_key.serialize_pem())?,
            other_ca: write("other-ca.pem", &other.pem())?,
            dir,
        })
    }

    /// The scratch directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A path as a `&str` (the tests pass them as flags).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}
