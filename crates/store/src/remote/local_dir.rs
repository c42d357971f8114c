//! A CAS and ActionCache in a plain directory (`file:///path`), like Bazel's `--disk_cache`.
//!
//! ```text
//! <root>/cas/ab/<hash>-<size>       blob content
//! <root>/ac/ab/<hash>-<size>        encoded ActionResult for that action digest
//! <root>/tmp/<uuid>                 writes in progress
//! ```
//!
//! Every write goes to `tmp/` and is renamed into place, so several processes (or machines on a
//! shared filesystem) can use one directory: a reader sees a whole file or none. Blob content is
//! verified by the caller's destination on load, so a corrupted file is refused, never trusted.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2 as remexec;
use bytes::Bytes;
use hashing::Digest;
use prost::Message;
use tokio::io::AsyncWriteExt;

use super::{ActionCacheProvider, ByteStoreProvider};
use crate::destination::LoadDestination;
use crate::error::StoreError;

/// Blobs up to this size are read in one go by `load_batch`.
const BATCH_BLOB_MAX: u64 = 1024 * 1024;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct LocalDirProvider {
    root: PathBuf,
}

impl LocalDirProvider {
    /// Uses (creating if needed) the directory `root`.
    pub fn open(root: &Path) -> Result<LocalDirProvider, StoreError> {
        for sub in ["cas", "ac", "tmp"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| {
                StoreError::io(format!("creating cache directory {}", p.display()), e)
            })?;
        }
        Ok(LocalDirProvider {
            root: root.to_path_buf(),
        })
    }

    /// The directory this provider uses.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, kind: &str, d: &Digest) -> PathBuf {
        let hex = d.hash.to_hex();
        self.root
            .join(kind)
            .join(&hex[..2])
            .join(format!("{hex}-{}", d.size_bytes))
    }

    /// Writes `data` atomically to `dest` via a temp file and rename.
    fn write_atomic(
        &self,
        dest: &Path,
        write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let tmp = self
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            write(&mut f)?;
            f.flush()?;
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, dest)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::io(format!("writing {}", dest.display()), e)
        })
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            StoreError::new(
                crate::ErrorKind::Other,
                format!("blocking task failed: {e}"),
            )
        })?
    }
}

#[async_trait]
impl ByteStoreProvider for LocalDirProvider {
    async fn store_bytes(&self, digest: Digest, bytes: Bytes) -> Result<(), StoreError> {
        let this = self.clone();
        Self::blocking(move || {
            let dest = this.path("cas", &digest);
            if dest.is_file() {
                return Ok(());
            }
            this.write_atomic(&dest, |f| f.write_all(&bytes))
        })
        .await
    }

    async fn store_file(&self, digest: Digest, file: tokio::fs::File) -> Result<(), StoreError> {
        let this = self.clone();
        let mut file = file.into_std().await;
        Self::blocking(move || {
            let dest = this.path("cas", &digest);
            if dest.is_file() {
                return Ok(());
            }
            this.write_atomic(&dest, |f| {
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(0))?;
                std::io::copy(&mut file, f).map(|_| ())
            })
        })
        .await
    }

    async fn load(
        &self,
        digest: Digest,
        dest: &mut dyn LoadDestination,
    ) -> Result<bool, StoreError> {
        let path = self.path("cas", &digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
        };
        match tokio::io::copy(&mut file, dest).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(StoreError::invalid(format!("{}: {e}", path.display())));
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
        }
        dest.flush()
            .await
            .map_err(|e| StoreError::io("writing to the local store", e))?;
        Ok(true)
    }

    async fn load_batch(&self, digests: Vec<Digest>) -> Result<HashMap<Digest, Bytes>, StoreError> {
        let this = self.clone();
        Self::blocking(move || {
            let mut out = HashMap::new();
            for d in digests {
                let path = this.path("cas", &d);
                match std::fs::read(&path) {
                    Ok(data) => {
                        if Digest::of_bytes(&data) != d {
                            return Err(StoreError::invalid(format!(
                                "{} is corrupt: its content does not match {d}",
                                path.display()
                            )));
                        }
                        out.insert(d, Bytes::from(data));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_missing_digests(
        &self,
        digests: &mut (dyn Iterator<Item = Digest> + Send),
    ) -> Result<HashSet<Digest>, StoreError> {
        Ok(digests
            .filter(|d| *d != hashing::EMPTY_DIGEST && !self.path("cas", d).is_file())
            .collect())
    }

    fn max_batch_blob_size(&self) -> u64 {
        BATCH_BLOB_MAX
    }
}

#[async_trait]
impl ActionCacheProvider for LocalDirProvider {
    async fn get_action_result(
        &self,
        action_digest: Digest,
    ) -> Result<Option<remexec::ActionResult>, StoreError> {
        let path = self.path("ac", &action_digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => remexec::ActionResult::decode(&bytes[..])
                .map(Some)
                .map_err(|e| {
                    StoreError::invalid(format!(
                        "{} holds an undecodable ActionResult: {e}",
                        path.display()
                    ))
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn update_action_result(
        &self,
        action_digest: Digest,
        result: remexec::ActionResult,
    ) -> Result<(), StoreError> {
        let this = self.clone();
        Self::blocking(move || {
            let dest = this.path("ac", &action_digest);
            let bytes = result.encode_to_vec();
            this.write_atomic(&dest, |f| f.write_all(&bytes))
        })
        .await
    }
}
