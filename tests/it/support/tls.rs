//! Throwaway certificates for TLS tests (rcgen, made at test time): a CA, a server certificate
//! for `127.0.0.1` and `localhost` signed by it, and a client certificate signed by it.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// PEM files in a directory of their own.
pub struct Pki {
    /// Keeps the files.
    pub _dir: tempfile::TempDir,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server certificate and key (SANs `127.0.0.1`, `localhost`).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate and key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

impl Pki {
    /// A fresh CA named `name` and certificates it signed.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("threadgate test CA {name}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "threadgate");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer).unwrap();

        let d = dir.path().to_owned();
        Pki {
            ca: write(&d, "ca.pem", &ca_cert.pem()),
            server_cert: write(&d, "server.pem", &server_cert.pem()),
            server_key: write(&d, "server.key", &server_key.serialize_pem()),
            client_cert: write(&d, "client.pem", &client_cert.pem()),
            client_key: write(&d, "client.key", &client_key.serialize_pem()),
            _dir: dir,
        }
    }
}
