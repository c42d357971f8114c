//! The S3 slow tier's first layer against real S3-compatible servers started by
//! `scripts/s3-servers.sh` (moto, SeaweedFS). Under `CI=true` a server that is not configured
//! or not reachable fails the test; elsewhere it is a loud skip.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use hashing::Digest;
use server::s3::{S3Blobs, S3Options};
use testutil::real_servers::in_ci;

fn blobs(var: &str) -> Option<S3Blobs> {
    let endpoint = match std::env::var(var) {
        Ok(e) => e,
        Err(_) => {
            let msg = format!(
                "{var} is not set: start the S3 servers with `scripts/s3-servers.sh start` and \
                 `eval \"$(scripts/s3-servers.sh env)\"`, or run scripts/test.sh"
            );
            assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
            eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
            return None;
        }
    };
    let mut o = S3Options::new(Some(endpoint), "recache-test");
    o.credentials = Some((
        std::env::var("RECACHE_TEST_S3_ACCESS_KEY").unwrap(),
        std::env::var("RECACHE_TEST_S3_SECRET_KEY").unwrap(),
    ));
    o.prefix = format!("run-{}/", uuid::Uuid::new_v4().simple());
    o.multipart_threshold = 6 << 20;
    o.part_size = 5 << 20;
    Some(S3Blobs::new(o).unwrap())
}

async fn round_trip(var: &str) {
    let Some(s3) = blobs(var) else {
        return;
    };
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (len, seed) in [(1000usize, 1u64), (17 << 20, 2)] {
        let data = testutil::data::pseudo_random(len, seed);
        let d = Digest::of_bytes(&data);
        let path = dir.path().join(format!("in-{seed}"));
        std::fs::write(&path, &data).unwrap();
        assert!(!s3.contains(d).await.unwrap());
        s3.put_file(d, &path).await.unwrap();
        assert!(
            s3.contains(d).await.unwrap(),
            "{len} bytes: not there after the upload"
        );
        let back = dir.path().join(format!("out-{seed}"));
        assert!(s3.get_to_file(d, &back).await.unwrap());
        assert_eq!(std::fs::read(&back).unwrap(), data, "{len} bytes read back");
    }
    // Absent: false, not an error.
    let absent = Digest::of_bytes(b"never uploaded");
    assert!(!s3.get_to_file(absent, &dir.path().join("x")).await.unwrap());
    assert!(!dir.path().join("x").exists());
    // An upload left open is listed, and gone once aborted.
    let open = Digest::of_bytes(&testutil::data::pseudo_random(7 << 20, 3));
    let id = s3.start_multipart(open).await.unwrap();
    let listed = s3.open_uploads().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|u| u.upload_id == id && u.key == s3.key(open)),
        "{listed:?}"
    );
    s3.abort(&s3.key(open), &id).await.unwrap();
    assert!(
        s3.open_uploads()
            .await
            .unwrap()
            .iter()
            .all(|u| u.upload_id != id)
    );
    assert!(!s3.contains(open).await.unwrap());
}

#[tokio::test]
async fn blobs_round_trip_through_moto() {
    round_trip("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test]
async fn blobs_round_trip_through_seaweedfs() {
    round_trip("RECACHE_TEST_S3_SEAWEED").await;
}
