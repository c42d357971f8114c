//! Issue 26 item 1: what an async engine calls never blocks its runtime's thread. The probe:
//! on a current-thread runtime (one thread for every task), a second task counts how often it
//! gets to run while a 64 MiB output is read, stored or streamed. A call that did its disk work
//! on the runtime's thread (as `read_file` did) lets it run about never; one that hands the
//! work to a blocking thread lets it run throughout.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use store::directory::DirectoryBuilder;
use store::{LocalStore, LocalStoreOptions, Store};
use tokio::io::AsyncReadExt as _;

const BIG: usize = 64 << 20;

fn big_bytes() -> Vec<u8> {
    (0..BIG)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect()
}

/// Runs `work` on a current-thread runtime beside a task that yields in a loop; returns how
/// many times that task ran before `work` finished, and what `work` returned.
fn probe<T>(work: impl std::future::Future<Output = T>) -> (u64, T) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ran = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (ran, done) = (ran.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    ran.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::task::yield_now().await; // the ticker starts
        let before = ran.load(Ordering::Relaxed);
        let out = work.await;
        let during = ran.load(Ordering::Relaxed) - before;
        done.store(true, Ordering::Relaxed);
        ticker.await.unwrap();
        (during, out)
    })
}

#[test]
fn large_outputs_are_read_stored_and_streamed_off_the_runtime_thread() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap();
    let data = big_bytes();
    let digest = local.store_bytes(&data).unwrap();
    let mut b = DirectoryBuilder::new(&local);
    b.add_file("out/big.bin", digest, false).unwrap();
    let root = b.build().unwrap();
    let store = Store::local_only(local.clone());

    let (ran, read) = probe(store.read_file(root, "out/big.bin"));
    assert_eq!(read.unwrap().len(), BIG);
    assert!(
        ran >= 10,
        "read_file let other tasks run {ran} times while reading 64 MiB"
    );

    let (ran, streamed) = probe(async {
        let mut reader = store.open_blob(digest).await.unwrap();
        let mut all = Vec::new();
        reader.read_to_end(&mut all).await.unwrap();
        all
    });
    assert!(streamed == data, "the stream is the blob");
    assert!(ran >= 10, "open_blob let other tasks run {ran} times");

    let mut other = data.clone();
    other[0] ^= 1;
    let expected = hashing::Digest::of_bytes(&other);
    let (ran, stored) = probe(store.store(Bytes::from(other)));
    assert_eq!(stored.unwrap(), expected);
    assert!(
        ran >= 10,
        "store let other tasks run {ran} times while storing 64 MiB"
    );
}
