//! `grpcs://` against the in-process server with certificates made for the test: a CA bundle
//! option, mutual TLS with a client certificate, and clear failures when trust is missing.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hashing::Digest;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::remote::retry::RetryPolicy;
use store::remote::{ActionCacheProvider, ByteStoreProvider};
use testutil::server::{Method, TestServer};

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it.
    fn new() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "recache test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_pem: ca.pem(),
            server: leaf(vec!["127.0.0.1".into(), "localhost".into()]),
            client: leaf(vec!["recache-client".into()]),
        }
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    }
}

fn options(ca: Option<&Path>, client: Option<(PathBuf, PathBuf)>) -> GrpcOptions {
    GrpcOptions {
        tls_ca_cert: ca.map(Path::to_path_buf),
        tls_client_cert: client,
        request_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            attempts: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn grpcs_with_a_ca_bundle_round_trips() {
    let pki = Pki::new();
    let server = TestServer::start_tls(&pki.server.0, &pki.server.1, None).await;
    assert!(server.address().starts_with("grpcs://"));
    let ca = pki.write("ca.pem", &pki.ca_pem);
    let p = Arc::new(
        GrpcProvider::connect(&server.address(), options(Some(&ca), None))
            .await
            .unwrap(),
    );
    let data = testutil::data::pseudo_random(100_000, 1);
    let d = Digest::of_bytes(&data);
    p.store_bytes(d, data.clone().into()).await.unwrap();
    assert!(server.has_blob(d));
    assert!(p.get_action_result(d).await.unwrap().is_none());
    assert_eq!(server.calls(Method::GetActionResult), 1);
}

#[tokio::test]
async fn a_server_we_do_not_trust_is_refused() {
    let pki = Pki::new();
    let other = Pki::new(); // a different CA
    let server = TestServer::start_tls(&pki.server.0, &pki.server.1, None).await;
    let wrong_ca = other.write("ca.pem", &other.ca_pem);
    let p = GrpcProvider::connect(&server.address(), options(Some(&wrong_ca), None))
        .await
        .unwrap();
    let err = p
        .get_action_result(Digest::of_bytes(b"x"))
        .await
        .unwrap_err();
    assert_eq!(
        server.calls(Method::GetActionResult),
        0,
        "no RPC reached the server: {err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let server = TestServer::start_tls(&pki.server.0, &pki.server.1, Some(&pki.ca_pem)).await;
    let ca = pki.write("ca.pem", &pki.ca_pem);

    // Without a client certificate the server refuses the connection.
    let anonymous = GrpcProvider::connect(&server.address(), options(Some(&ca), None))
        .await
        .unwrap();
    assert!(
        anonymous
            .get_action_result(Digest::of_bytes(b"x"))
            .await
            .is_err()
    );
    assert_eq!(server.calls(Method::GetActionResult), 0);

    // With one it works.
    let cert = pki.write("client.pem", &pki.client.0);
    let key = pki.write("client.key", &pki.client.1);
    let p = GrpcProvider::connect(&server.address(), options(Some(&ca), Some((cert, key))))
        .await
        .unwrap();
    assert!(
        p.get_action_result(Digest::of_bytes(b"x"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(server.calls(Method::GetActionResult), 1);
}

#[tokio::test]
async fn tls_options_are_checked_up_front() {
    // Certificates for a plaintext address are a mistake worth naming.
    let err = GrpcProvider::connect(
        "grpc://127.0.0.1:1",
        options(Some(Path::new("/nonexistent")), None),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("use grpcs://"), "{err}");
    // A CA bundle that cannot be read names the file.
    let err = GrpcProvider::connect(
        "grpcs://127.0.0.1:1",
        options(Some(Path::new("/nonexistent/ca.pem")), None),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
