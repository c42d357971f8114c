//! ActionResult ⇄ ProcessResult.
//!
//! A cached ActionResult is untrusted input. [`parse_action_result`] validates every digest and
//! path (no absolute paths, no `..`, no symlink leaving the output root, no Tree entry with a bad
//! name, no two outputs at one path) and only ever writes Directory messages into the local
//! store: nothing touches a workspace until the result has been fully accepted.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashing::Digest;
use hashing::reapi::require_digest;
use process_execution::{Process, ProcessResult};
use prost::Message;
use reapi::build::bazel::remote::execution::v2 as remexec;
use reapi::google::protobuf::Timestamp;
use store::directory::DirectoryBuilder;
use store::{LocalStore, Store, StoreError};

/// What a cached ActionResult turned into.
#[derive(Debug, Clone)]
pub(crate) struct CachedOutputs {
    pub stdout: Digest,
    pub stderr: Digest,
    pub exit_code: i32,
    pub output_root: Digest,
    /// File blobs named directly (stdout, stderr, output files).
    pub files: HashSet<Digest>,
    /// Root directories of output directories (their files are found by walking them).
    pub directories: HashSet<Digest>,
    /// The Tree blobs the output directories came from.
    pub trees: HashSet<Digest>,
    pub original_run_time: Option<Duration>,
}

fn digest_field(field: &str, d: Option<&remexec::Digest>) -> Result<Digest, StoreError> {
    require_digest(field, d).map_err(|e| StoreError::invalid(format!("ActionResult: {e}")))
}

/// Stores inline content after checking it against its digest.
fn store_inline(
    store: &LocalStore,
    what: &str,
    raw: &[u8],
    expected: Option<Digest>,
) -> Result<Digest, StoreError> {
    let d = store.store_bytes(raw)?;
    match expected {
        Some(e) if e != d => Err(StoreError::invalid(format!(
            "ActionResult: inline {what} does not match its digest {e}"
        ))),
        _ => Ok(d),
    }
}

/// stdout or stderr of a cached result: by digest, or inline (checked against the digest when
/// both are given), or empty.
fn output_stream(
    local: &LocalStore,
    name: &str,
    digest: Option<&remexec::Digest>,
    raw: &[u8],
) -> Result<Digest, StoreError> {
    let field = format!("{name}_digest");
    let digest = digest.map(|d| digest_field(&field, Some(d))).transpose()?;
    match (digest, raw.is_empty()) {
        (Some(d), true) => Ok(d),
        (d, false) => store_inline(local, name, raw, d),
        (None, true) => Ok(hashing::EMPTY_DIGEST),
    }
}

fn duration_between(start: Option<&Timestamp>, end: Option<&Timestamp>) -> Option<Duration> {
    let (s, e) = (start?, end?);
    let nanos = |t: &Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let d = nanos(e) - nanos(s);
    (d >= 0).then(|| Duration::from_nanos(u64::try_from(d).unwrap_or(u64::MAX)))
}

/// See the module docs. Fetches output Trees (small metadata blobs) through `store`, never file
/// content.
#[allow(deprecated)] // output_file_symlinks / output_directory_symlinks: still sent by servers
pub(crate) async fn parse_action_result(
    store: &Store,
    ar: &remexec::ActionResult,
) -> Result<CachedOutputs, StoreError> {
    let local = store.local();
    let mut files = HashSet::new();
    let mut directories = HashSet::new();
    let mut trees = HashSet::new();

    let stdout = output_stream(local, "stdout", ar.stdout_digest.as_ref(), &ar.stdout_raw)?;
    let stderr = output_stream(local, "stderr", ar.stderr_digest.as_ref(), &ar.stderr_raw)?;
    files.insert(stdout);
    files.insert(stderr);

    let mut builder = DirectoryBuilder::new(local);
    for f in &ar.output_files {
        let mut d = digest_field(
            &format!("output_files[{:?}].digest", f.path),
            f.digest.as_ref(),
        )?;
        if !f.contents.is_empty() {
            d = store_inline(
                local,
                &format!("content of {:?}", f.path),
                &f.contents,
                Some(d),
            )?;
        }
        if f.path.is_empty() {
            return Err(StoreError::invalid(
                "ActionResult: an output file has an empty path",
            ));
        }
        builder
            .add_file(&f.path, d, f.is_executable)
            .map_err(|e| e.context("ActionResult output file"))?;
        files.insert(d);
    }
    for s in ar
        .output_symlinks
        .iter()
        .chain(&ar.output_file_symlinks)
        .chain(&ar.output_directory_symlinks)
    {
        builder
            .add_symlink(&s.path, &s.target)
            .map_err(|e| e.context("ActionResult output symlink"))?;
    }
    for d in &ar.output_directories {
        let tree = digest_field(
            &format!("output_directories[{:?}].tree_digest", d.path),
            d.tree_digest.as_ref(),
        )?;
        let root = store.load_tree(tree).await?;
        trees.insert(tree);
        builder
            .add_directory(&d.path, root)
            .map_err(|e| e.context("ActionResult output directory"))?;
        directories.insert(root);
    }
    let output_root = builder.build()?;
    // Symlinks are checked against the whole output root, following links inside it (a chain
    // such as `a -> .`, `b -> a/a/../..` is textually inside but really escapes). Only output
    // symlinks and output directories can bring one: a result of plain files (the common hit)
    // skips the walk.
    let may_hold_symlinks = !ar.output_symlinks.is_empty()
        || !ar.output_file_symlinks.is_empty()
        || !ar.output_directory_symlinks.is_empty()
        || !ar.output_directories.is_empty();
    if may_hold_symlinks {
        local
            .check_symlinks(output_root)
            .map_err(|e| e.context("ActionResult"))?;
    }

    let original_run_time = ar.execution_metadata.as_ref().and_then(|m| {
        duration_between(
            m.worker_start_timestamp.as_ref(),
            m.worker_completed_timestamp.as_ref(),
        )
        .or_else(|| {
            duration_between(
                m.execution_start_timestamp.as_ref(),
                m.execution_completed_timestamp.as_ref(),
            )
        })
    });
    Ok(CachedOutputs {
        stdout,
        stderr,
        exit_code: ar.exit_code,
        output_root,
        files,
        directories,
        trees,
        original_run_time,
    })
}

/// One entry of a stored directory tree.
enum Entry {
    File { digest: Digest, executable: bool },
    Dir(Digest),
    Symlink(String),
}

/// Finds `path` (relative, `/`-separated) below the directory `root`.
fn lookup(local: &LocalStore, root: Digest, path: &str) -> Result<Option<Entry>, StoreError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut current = root;
    for (i, part) in parts.iter().enumerate() {
        let dir = local.load_directory(current)?;
        let last = i + 1 == parts.len();
        if let Some(sub) = dir.directories.iter().find(|d| d.name == *part) {
            current = digest_field("directories[].digest", sub.digest.as_ref())?;
            if last {
                return Ok(Some(Entry::Dir(current)));
            }
            continue;
        }
        if !last {
            return Ok(None);
        }
        if let Some(f) = dir.files.iter().find(|f| f.name == *part) {
            return Ok(Some(Entry::File {
                digest: digest_field("files[].digest", f.digest.as_ref())?,
                executable: f.is_executable,
            }));
        }
        if let Some(s) = dir.symlinks.iter().find(|s| s.name == *part) {
            return Ok(Some(Entry::Symlink(s.target.clone())));
        }
        return Ok(None);
    }
    Ok(Some(Entry::Dir(current)))
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// An ActionResult for a local run, and every blob the remote needs for it (outputs, Trees,
/// stdout/stderr). Trees for output directories are built and stored locally.
pub(crate) fn make_action_result(
    local: &LocalStore,
    process: &Process,
    result: &ProcessResult,
    finished_at: SystemTime,
) -> Result<(remexec::ActionResult, HashSet<Digest>), StoreError> {
    let mut blobs = HashSet::from([result.stdout, result.stderr]);
    let mut ar = remexec::ActionResult {
        exit_code: result.exit_code,
        stdout_digest: Some(result.stdout.into()),
        stderr_digest: Some(result.stderr.into()),
        ..Default::default()
    };
    let mut files: Vec<&String> = process.output_files.iter().collect();
    files.sort();
    files.dedup();
    for path in files {
        match lookup(local, result.output_root, path)? {
            Some(Entry::File { digest, executable }) => {
                blobs.insert(digest);
                ar.output_files.push(remexec::OutputFile {
                    path: path.clone(),
                    digest: Some(digest.into()),
                    is_executable: executable,
                    ..Default::default()
                });
            }
            Some(Entry::Symlink(target)) => ar.output_symlinks.push(remexec::OutputSymlink {
                path: path.clone(),
                target,
                node_properties: None,
            }),
            Some(Entry::Dir(_)) | None => {}
        }
    }
    let mut dirs: Vec<&String> = process.output_directories.iter().collect();
    dirs.sort();
    dirs.dedup();
    for path in dirs {
        if let Some(Entry::Dir(root)) = lookup(local, result.output_root, path)? {
            let tree = local.build_tree(root)?;
            let tree_digest = local.store_bytes(&tree.encode_to_vec())?;
            blobs.insert(tree_digest);
            blobs.extend(local.file_digests(root)?);
            // The Directory messages too (root and every subdirectory), not only the Tree:
            // buildbox-casd will not serve an entry whose output directory has subdirectories
            // unless they are in its CAS, and `root_directory_digest` names the root one.
            blobs.insert(root);
            for child in &tree.children {
                blobs.insert(Digest::of_bytes(&child.encode_to_vec()));
            }
            ar.output_directories.push(remexec::OutputDirectory {
                path: path.clone(),
                tree_digest: Some(tree_digest.into()),
                is_topologically_sorted: false,
                root_directory_digest: Some(root.into()),
            });
        }
    }
    let started = finished_at
        .checked_sub(result.metadata.wall_time)
        .unwrap_or(finished_at);
    ar.execution_metadata = Some(remexec::ExecutedActionMetadata {
        worker: "recache (local)".into(),
        worker_start_timestamp: Some(timestamp(started)),
        worker_completed_timestamp: Some(timestamp(finished_at)),
        execution_start_timestamp: Some(timestamp(started)),
        execution_completed_timestamp: Some(timestamp(finished_at)),
        ..Default::default()
    });
    blobs.remove(&hashing::EMPTY_DIGEST);
    Ok((ar, blobs))
}
