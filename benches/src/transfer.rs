//! Large-blob download and upload through the in-process server, and the hash-only floor of the
//! same bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hashing::{Digest, Hasher};
use store::remote::ByteStoreProvider;
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::server::TestServer;

/// A server holding one large blob.
pub struct TransferFixture {
    /// The in-process server.
    pub server: TestServer,
    /// The provider talking to it.
    pub provider: Arc<GrpcProvider>,
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: usize,
    seed: u64,
    dir: tempfile::TempDir,
}

impl TransferFixture {
    /// Puts a `mib` MiB incompressible blob on a fresh server.
    pub async fn new(mib: usize, dir_in: &std::path::Path) -> TransferFixture {
        let size = mib * 1024 * 1024;
        let seed = 7;
        let server = TestServer::start().await;
        let digest = server.put_blob(&crate::pseudo_random_bytes(size, seed));
        let provider = Arc::new(
            GrpcProvider::connect(&server.address(), GrpcOptions::default())
                .await
                .expect("connect"),
        );
        TransferFixture {
            server,
            provider,
            digest,
            size,
            seed,
            dir: tempfile::tempdir_in(dir_in).expect("tempdir"),
        }
    }

    fn fresh_store(&self) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir_in(self.dir.path()).expect("tempdir");
        let local = LocalStore::open(LocalStoreOptions::new(dir.path())).expect("store");
        (dir, Store::with_remote(local, self.provider.clone()))
    }

    /// One download into a fresh local store (streamed into the pool, verified, fsynced).
    pub async fn download(&self) -> Duration {
        let (_dir, store) = self.fresh_store();
        let start = Instant::now();
        store.ensure_local(self.digest).await.expect("download");
        start.elapsed()
    }

    /// Peak RSS growth (MiB) of one download, measured with the kernel's high-water mark.
    pub async fn download_peak_rss_growth_mib(&self) -> f64 {
        let (_dir, store) = self.fresh_store();
        crate::reset_peak_rss().expect("clear_refs");
        let before = crate::rss_mib();
        store.ensure_local(self.digest).await.expect("download");
        (crate::peak_rss_mib() - before).max(0.0)
    }

    /// A local pool file holding the blob, for uploads.
    pub async fn local_copy(&self) -> (tempfile::TempDir, std::path::PathBuf) {
        let (dir, store) = self.fresh_store();
        store.ensure_local(self.digest).await.expect("download");
        let path = store
            .local()
            .load_file(self.digest)
            .expect("load")
            .expect("in pool");
        (dir, path)
    }

    /// One upload from `path` (the server forgets the blob first).
    pub async fn upload(&self, path: &std::path::Path) -> Duration {
        self.server.remove_blob(self.digest);
        let file = tokio::fs::File::open(path).await.expect("open");
        let start = Instant::now();
        self.provider
            .store_file(self.digest, file)
            .await
            .expect("upload");
        let took = start.elapsed();
        assert!(self.server.has_blob(self.digest));
        took
    }

    /// Hashing the same bytes in memory, 1 MiB at a time.
    pub fn hash_only(&self, data: &[u8]) -> Duration {
        let start = Instant::now();
        let mut h = Hasher::new();
        for c in data.chunks(1024 * 1024) {
            h.update(c);
        }
        let d = h.finish();
        let took = start.elapsed();
        assert_eq!(d, self.digest);
        took
    }

    /// The blob's bytes (regenerated: the fixture does not keep a copy).
    pub fn bytes(&self) -> Vec<u8> {
        crate::pseudo_random_bytes(self.size, self.seed)
    }
}

/// MiB per second for `bytes` moved in `d`.
pub fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}
