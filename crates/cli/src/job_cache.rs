//! `recache cache save|restore|list|delete`: a CI job's directories, cached by key on any cache
//! recache speaks (the embedded default, `file://`, any REAPI server), incrementally by content.
//!
//! An entry is made of what REAPI caches already hold:
//! - its **tree**: the saved paths captured into one REAPI `Directory` tree (files, directories,
//!   symlinks, executable bits, empty directories, and every file's and directory's
//!   modification time as `NodeProperties.mtime`, which cargo's freshness check reads). The
//!   root has `root/…` for paths under `--root` and `home/…` for `~/…` paths, so a restore on
//!   another machine maps `~` to its own home. Its blobs go up only when the cache lacks them
//!   (FindMissingBlobs), as a `Tree` blob plus files.
//! - its **record**: an ActionCache entry under a digest only this command uses
//!   (`sha256("recache job cache v1\0entry\0" KEY)`), whose single output directory is the tree
//!   and whose `stdout_raw` is a small JSON record (key, time created, size, files, paths). A
//!   server that checks its entries' blobs (as `recache serve` does) then never answers an
//!   entry whose files it lost.
//! - **prefix records**: for fallback keys on servers that cannot list (BuildGrid,
//!   buildbox-casd), a save also writes a record naming KEY (no outputs, so no server walks
//!   the tree again for it) under `sha256("recache job cache v1\0prefix\0" PREFIX)` for every
//!   proper prefix of KEY that ends at a separator (`-`, `_`, `.`, `+`), unless that prefix
//!   already names a newer entry. So `--restore-key linux-cargo-` restores the newest entry
//!   saved under `linux-cargo-…` (if that entry is still there and not deleted).
//! - **deleting** overwrites the record with a tombstone (`"deleted": true`); a prefix record
//!   naming a deleted key is skipped.
//!
//! Only the embedded default and `file://` caches can list: a save there also writes
//! `job-cache-keys/<KEY>` (the record) next to the cache's blobs.
//!
//! Everything read back is untrusted: keys and paths in a record are checked with the rules of
//! a save (no `..`, no absolute paths), the tree is validated as `recache run` validates
//! outputs (symlinks must stay inside), and a restore replaces only the saved paths, through a
//! staging directory renamed into place, never following a symlink it finds on the way.

use std::collections::{HashMap, HashSet};
use std::io::BufRead as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashing::Digest;
use reapi::build::bazel::remote::execution::v2 as remexec;
use serde::{Deserialize, Serialize};
use store::directory::DirectoryBuilder;
use store::directory::{FileStamp, KnownFiles};
use store::remote::RemoteProviders;
use store::{CaptureOptions, LocalStore, LocalStoreOptions, MaterializeOptions, Store};

use crate::CliError;
use crate::args::{
    CacheCommand, CacheCommon, CacheDeleteArgs, CacheListArgs, CacheRestoreArgs, CacheSaveArgs,
};
use crate::cache_dir::{CacheDir, human_bytes};
use crate::run::Failure;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// What the record and prefix digests are salted with; a new layout gets a new one.
const FORMAT: &str = "recache job cache v1";

/// Characters after which a key's prefix gets a prefix record.
const SEPARATORS: [char; 4] = ['-', '_', '.', '+'];

/// The output directory of a record's ActionResult that holds the tree.
const ENTRY_DIR: &str = "entry";

/// Where file-backed caches keep their key listing.
const KEYS_DIR: &str = "job-cache-keys";

/// Exit code when a cache problem is fatal (`--strict`).
const STRICT_EXIT: i32 = 1;

/// Runs a `recache cache` command; returns the exit code.
pub async fn command(cmd: CacheCommand) -> Result<i32, CliError> {
    match cmd {
        CacheCommand::Save(a) => {
            let strict = a.common.strict;
            finish(strict, "save", save(*a).await)
        }
        CacheCommand::Restore(a) => {
            let strict = a.common.strict;
            finish(strict, "restore", restore(*a).await)
        }
        CacheCommand::List(a) => finish(a.common.strict, "list", list(&a).await),
        CacheCommand::Delete(a) => finish(a.common.strict, "delete", delete(&a).await),
        CacheCommand::Rust(cmd) => match cmd {
            crate::args::RustCacheCommand::Save(a) => finish(
                a.common.strict,
                "rust save",
                crate::job_cache_rust::save(&a).await,
            ),
            crate::args::RustCacheCommand::Restore(a) => finish(
                a.common.strict,
                "rust restore",
                crate::job_cache_rust::restore(&a).await,
            ),
        },
    }
}

/// A cache problem is a warning and exit 0 (1 with `--strict`); a usage error exit 125.
fn finish(strict: bool, what: &str, outcome: Result<(), Failure>) -> Result<i32, CliError> {
    match outcome {
        Ok(()) => Ok(0),
        Err(Failure::Usage(e)) => Err(e),
        Err(Failure::Cache(why)) => {
            crate::warnings::warn(format!("cache {what}: {why}"));
            Ok(if strict { STRICT_EXIT } else { 0 })
        }
    }
}

pub(crate) fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(CliError::new(msg))
}

pub(crate) fn cache_problem(msg: impl Into<String>) -> Failure {
    Failure::Cache(msg.into())
}

/// Checks a key (or a `--restore-key` prefix): letters, digits and `._+-`, 1 to
/// [`MAX_KEY_BYTES`] bytes.
pub fn validate_key(key: &str, what: &str) -> Result<(), CliError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(CliError::new(format!(
            "{what} {key:?}: a key is 1 to {MAX_KEY_BYTES} bytes long (this one is {})",
            key.len()
        )));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || SEPARATORS.contains(c)))
    {
        return Err(CliError::new(format!(
            "{what} {key:?}: {c:?} is not allowed (letters, digits and . _ + - are)"
        )));
    }
    Ok(())
}

/// The ActionCache digest of KEY's record.
fn entry_action(key: &str) -> Digest {
    Digest::of_bytes(format!("{FORMAT}\0entry\0{key}").as_bytes())
}

/// The ActionCache digest of PREFIX's prefix record.
fn prefix_action(prefix: &str) -> Digest {
    Digest::of_bytes(format!("{FORMAT}\0prefix\0{prefix}").as_bytes())
}

/// The proper prefixes of `key` that end at a separator, shortest first.
fn boundaries(key: &str) -> Vec<&str> {
    key.char_indices()
        .filter(|(i, c)| SEPARATORS.contains(c) && i + 1 < key.len())
        .map(|(i, _)| &key[..=i])
        .collect()
}

/// Where a saved path lives: under `--root`, or under the home directory (`~/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Base {
    Root,
    Home,
}

impl Base {
    /// The tree's top directory for it.
    fn top(self) -> &'static str {
        match self {
            Base::Root => "root",
            Base::Home => "home",
        }
    }
}

/// A path to save or restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedPath {
    base: Base,
    /// Normalized, `/`-separated, never empty, no `.`/`..`.
    rel: String,
}

impl SavedPath {
    /// As the record (and the user) spell it: `target`, `~/.cargo/registry`.
    fn spelled(&self) -> String {
        match self.base {
            Base::Root => self.rel.clone(),
            Base::Home => format!("~/{}", self.rel),
        }
    }

    /// Its path in the entry's tree.
    fn in_tree(&self) -> String {
        format!("{}/{}", self.base.top(), self.rel)
    }

    fn on_disk(&self, dirs: &Dirs) -> Result<PathBuf, Failure> {
        Ok(dirs.base(self.base)?.join(&self.rel))
    }
}

/// The directories paths are relative to.
pub(crate) struct Dirs {
    root: PathBuf,
    home: Option<PathBuf>,
}

impl Dirs {
    pub(crate) fn new(root: Option<&Path>) -> Result<Dirs, Failure> {
        let cwd = std::env::current_dir()
            .map_err(|e| usage(format!("cannot read the current directory: {e}")))?;
        let root = match root {
            Some(r) if r.is_absolute() => r.to_path_buf(),
            Some(r) => cwd.join(r),
            None => cwd,
        };
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from);
        Ok(Dirs { root, home })
    }

    fn base(&self, base: Base) -> Result<&Path, Failure> {
        match base {
            Base::Root => Ok(&self.root),
            Base::Home => self
                .home
                .as_deref()
                .ok_or_else(|| usage("a `~/` path needs HOME to be set")),
        }
    }
}

/// `raw` as a [`SavedPath`]: `~/x` under the home directory, an absolute path under the root
/// or the home directory, anything else relative to the root; no `..`, not the base itself.
pub(crate) fn parse_path(raw: &str, dirs: &Dirs) -> Result<SavedPath, String> {
    let (base, rest): (Base, PathBuf) = if raw == "~" {
        return Err(format!(
            "path {raw:?}: name something under the home directory"
        ));
    } else if let Some(r) = raw.strip_prefix("~/") {
        (Base::Home, PathBuf::from(r))
    } else if Path::new(raw).is_absolute() {
        let p = Path::new(raw);
        if let Ok(r) = p.strip_prefix(&dirs.root) {
            (Base::Root, r.to_path_buf())
        } else if let Some(r) = dirs.home.as_deref().and_then(|h| p.strip_prefix(h).ok()) {
            (Base::Home, r.to_path_buf())
        } else {
            return Err(format!(
                "path {raw:?} is neither under the root ({}) nor under the home directory",
                dirs.root.display()
            ));
        }
    } else {
        (Base::Root, PathBuf::from(raw))
    };
    let mut parts = Vec::new();
    for c in rest.components() {
        match c {
            Component::Normal(n) => match n.to_str() {
                Some(s) => parts.push(s.to_owned()),
                None => return Err(format!("path {raw:?} is not UTF-8")),
            },
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "path {raw:?}: `..` and absolute parts are not allowed"
                ));
            }
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "path {raw:?} names the root itself: name what under it to save"
        ));
    }
    Ok(SavedPath {
        base,
        rel: parts.join("/"),
    })
}

/// Refuses two paths of which one contains the other.
fn check_apart(paths: &[SavedPath]) -> Result<(), String> {
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            let inside = |x: &SavedPath, y: &SavedPath| {
                x.base == y.base && (x.rel == y.rel || y.rel.starts_with(&format!("{}/", x.rel)))
            };
            if inside(a, b) || inside(b, a) {
                return Err(format!(
                    "paths {:?} and {:?} overlap: save each place once",
                    a.spelled(),
                    b.spelled()
                ));
            }
        }
    }
    Ok(())
}

/// The JSON record kept in an entry's ActionResult (`stdout_raw`) and listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Record {
    format: u32,
    key: String,
    /// Seconds since the Unix epoch.
    created: f64,
    /// The files' total size, in bytes (each occurrence counted).
    size: u64,
    files: u64,
    paths: Vec<String>,
    #[serde(default)]
    deleted: bool,
}

impl Record {
    fn to_action_result(&self, tree: Option<Digest>) -> remexec::ActionResult {
        remexec::ActionResult {
            output_directories: tree
                .map(|t| remexec::OutputDirectory {
                    path: ENTRY_DIR.into(),
                    tree_digest: Some(t.into()),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            stdout_raw: serde_json::to_vec(self).unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The record and tree of an ActionResult, when it is one of ours and well formed.
    fn from_action_result(ar: &remexec::ActionResult) -> Result<(Record, Option<Digest>), String> {
        let record: Record = serde_json::from_slice(&ar.stdout_raw)
            .map_err(|e| format!("the entry's record is not readable ({e})"))?;
        if record.format != 1 {
            return Err(format!(
                "the entry has format {}; this recache reads 1",
                record.format
            ));
        }
        validate_key(&record.key, "the entry's key").map_err(|e| e.0)?;
        let tree = match ar.output_directories.as_slice() {
            // A tombstone, or a prefix record (which only names the key).
            [] => None,
            [dir] if dir.path == ENTRY_DIR => Some(
                hashing::reapi::require_digest("tree_digest", dir.tree_digest.as_ref())
                    .map_err(|e| format!("the entry's tree: {e}"))?,
            ),
            _ => return Err("the entry's outputs are not a recache job cache entry".into()),
        };
        Ok((record, tree))
    }
}

/// An age for people: `42 s ago`, `3 h ago`, `2 d ago`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The local store and the cache, opened as `recache run` opens them.
struct Opened {
    local: LocalStore,
    store: Store,
    providers: RemoteProviders,
    /// The directory of a file-backed cache (default or `file://`), which can list.
    listing: Option<PathBuf>,
    /// Where saves remember the stamps and digests of the files they read.
    stat_dir: PathBuf,
}

async fn open(common: &CacheCommon) -> Result<Opened, Failure> {
    let root = CacheDir::locate(common.cache_dir.cache_dir.clone()).map_err(Failure::Usage)?;
    let cache = CacheDir::create(root).map_err(cache_problem)?;
    let mut remote = common.remote.clone();
    remote.apply_list_env().map_err(usage)?;
    let store_bound = if remote.address.is_none() {
        common.max_size / 2
    } else {
        common.max_size
    };
    let mut options = LocalStoreOptions::new(cache.store_dir());
    options.max_size = Some(store_bound);
    // A bulk transfer bound by the disk: the caller's own commits keep its memory flat. With
    // write-behind, `cache-report`'s 1 GiB cold restores took the same time (9.2–9.9 s against
    // 9.1–11.2 s, alternating runs) and peak anonymous memory went from 32–44 to 47–91 MiB.
    options.write_behind = false;
    let local = LocalStore::open(options)
        .map_err(|e| cache_problem(format!("cannot open the local store: {e}")))?;
    let providers = crate::run::providers(&remote, &cache, common.max_size).await?;
    let store = Store::with_remote(local.clone(), providers.bytes.clone());
    let listing = match remote.address.as_deref() {
        None => Some(cache.default_cache_dir()),
        Some(a) => a.strip_prefix("file://").map(PathBuf::from),
    };
    Ok(Opened {
        local,
        store,
        providers,
        listing: listing.map(|d| d.join(KEYS_DIR)),
        stat_dir: cache.root().join("job-cache-stat"),
    })
}

/// Runs `f` within the command's deadline.
async fn within<T>(
    deadline: Duration,
    started: Instant,
    what: &str,
    f: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let left = deadline.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, f).await {
        Ok(r) => r,
        Err(_) => Err(cache_problem(format!(
            "{what} did not finish within --timeout {:.0} s",
            deadline.as_secs_f64()
        ))),
    }
}

/// What a command did, for the summary line and `--json`.
#[derive(Debug, Default, Serialize)]
struct Report {
    command: &'static str,
    key: String,
    /// restore: `exact`, `prefix` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    matched: Option<&'static str>,
    /// restore: the key of the entry restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    restored_key: Option<String>,
    files: u64,
    bytes: u64,
    bytes_transferred: u64,
    seconds: f64,
    paths: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    skipped: Vec<String>,
}

fn print_report(common: &CacheCommon, r: &Report, line: String) {
    if common.json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        eprintln!("recache: {line}");
    }
}

/// Counts the files (each occurrence) and their bytes under the stored directory `root`.
fn tree_totals(local: &LocalStore, root: Digest) -> Result<(u64, u64), store::StoreError> {
    fn walk(
        local: &LocalStore,
        d: Digest,
        memo: &mut HashMap<Digest, (u64, u64)>,
    ) -> Result<(u64, u64), store::StoreError> {
        if let Some(t) = memo.get(&d) {
            return Ok(*t);
        }
        let dir = local.load_directory(d)?;
        let mut t = (0u64, 0u64);
        for f in &dir.files {
            t.0 += 1;
            t.1 += f.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64);
        }
        for sub in &dir.directories {
            let sd = hashing::reapi::require_digest("directories[].digest", sub.digest.as_ref())
                .map_err(|e| store::StoreError::invalid(e.to_string()))?;
            let s = walk(local, sd, memo)?;
            t.0 += s.0;
            t.1 += s.1;
        }
        memo.insert(d, t);
        Ok(t)
    }
    walk(local, root, &mut HashMap::new())
}

/// Reads the paths of `--files-from` (`-`: stdin), one per line, blank lines skipped.
fn read_paths_from(from: &Path) -> Result<Vec<String>, CliError> {
    let lines: Vec<String> = if from == Path::new("-") {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|e| CliError::new(format!("--files-from -: {e}")))?
    } else {
        std::fs::read_to_string(from)
            .map_err(|e| CliError::new(format!("--files-from {}: {e}", from.display())))?
            .lines()
            .map(str::to_owned)
            .collect()
    };
    Ok(lines
        .into_iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

async fn save(a: CacheSaveArgs) -> Result<(), Failure> {
    validate_key(&a.key, "key").map_err(Failure::Usage)?;
    let dirs = Dirs::new(a.root.as_deref())?;
    let mut raw = a.paths.clone();
    if let Some(from) = &a.files_from {
        raw.extend(read_paths_from(from).map_err(Failure::Usage)?);
    }
    if raw.is_empty() {
        return Err(usage("nothing to save: give PATH… or --files-from"));
    }
    let mut paths = Vec::new();
    for r in &raw {
        paths.push((parse_path(r, &dirs).map_err(usage)?, Vec::new()));
    }
    save_paths(&a.common, &a.key, &dirs, paths, a.max_entry_size).await
}

/// Saves `paths` (each with the relative paths under it to leave out) under `key`.
pub(crate) async fn save_paths(
    common: &CacheCommon,
    key: &str,
    dirs: &Dirs,
    paths: Vec<(SavedPath, Vec<PathBuf>)>,
    max_entry_size: u64,
) -> Result<(), Failure> {
    let started = Instant::now();
    let just_paths: Vec<SavedPath> = paths.iter().map(|(p, _)| p.clone()).collect();
    check_apart(&just_paths).map_err(usage)?;
    let mut report = Report {
        command: "save",
        key: key.to_owned(),
        ..Default::default()
    };
    // A path that is not there is skipped (a job that built nothing still saves the rest).
    let mut present = Vec::new();
    for (p, exclude) in paths {
        match std::fs::symlink_metadata(p.on_disk(dirs)?) {
            Ok(_) => present.push((p, exclude)),
            Err(_) => report.skipped.push(p.spelled()),
        }
    }
    if !report.skipped.is_empty() {
        crate::warnings::warn(format!(
            "cache save: not found, so not saved: {}",
            report.skipped.join(", ")
        ));
    }
    if present.is_empty() {
        return Err(cache_problem(format!(
            "none of the paths exist; nothing saved under {key:?}"
        )));
    }
    let opened = open(common).await?;
    let local = opened.local.clone();
    let stat_dir = opened.stat_dir.clone();
    let bases: Vec<(SavedPath, PathBuf, Vec<PathBuf>)> = present
        .iter()
        .map(|(p, ex)| Ok((p.clone(), p.on_disk(dirs)?, ex.clone())))
        .collect::<Result<_, Failure>>()?;
    // Capture on a blocking thread: hashing and storing every file.
    let (root, tree, lease, files, bytes) =
        tokio::task::spawn_blocking(move || capture(&local, &bases, &stat_dir))
            .await
            .map_err(|e| cache_problem(format!("capture task: {e}")))??;
    if bytes > max_entry_size {
        drop(lease);
        return Err(cache_problem(format!(
            "the entry would be {} ({files} files), over --max-entry-size {}; nothing saved",
            human_bytes(bytes),
            human_bytes(max_entry_size)
        )));
    }
    let progress = crate::progress::Progress::uploads(opened.store.clone());
    let uploaded = within(common.timeout, started, "uploading", async {
        opened
            .store
            .ensure_remote_has_recursive(HashSet::from([tree]), HashSet::from([root]))
            .await
            .map_err(|e| cache_problem(format!("uploading: {e}")))
    })
    .await;
    progress.finish();
    let uploaded = uploaded?;
    let record = Record {
        format: 1,
        key: key.to_owned(),
        created: now(),
        size: bytes,
        files,
        paths: present.iter().map(|(p, _)| p.spelled()).collect(),
        deleted: false,
    };
    let ar = record.to_action_result(Some(tree));
    let ac = opened.providers.action_cache.clone();
    within(common.timeout, started, "recording the entry", async {
        ac.update_action_result(entry_action(key), ar.clone())
            .await
            .map_err(|e| cache_problem(format!("recording the entry: {e}")))
    })
    .await?;
    if let Some(dir) = &opened.listing {
        write_listing(dir, &record);
    }
    // Prefix records: best effort, each on its own (a failure is a warning, the entry stands).
    for prefix in boundaries(key) {
        let done = within(
            common.timeout,
            started,
            "recording prefixes",
            record_prefix(&ac, prefix, &record),
        )
        .await;
        if let Err(Failure::Cache(why)) | Err(Failure::Usage(CliError(why))) = done {
            crate::warnings::warn(format!("cache save: prefix {prefix:?}: {why}"));
        }
    }
    drop(lease);
    report.files = files;
    report.bytes = bytes;
    report.bytes_transferred = uploaded.bytes;
    report.paths = record.paths.clone();
    report.seconds = started.elapsed().as_secs_f64();
    let line = format!(
        "saved {}: {files} files, {}, {} uploaded, in {:.1} s",
        key,
        human_bytes(bytes),
        human_bytes(uploaded.bytes),
        report.seconds
    );
    print_report(common, &report, line);
    Ok(())
}

/// What a capture gives: the entry's root, its Tree blob, the lease on its blobs, files, bytes.
type Captured = (Digest, Digest, store::Lease, u64, u64);

/// Captures every path into one tree (blocking).
fn capture(
    local: &LocalStore,
    paths: &[(SavedPath, PathBuf, Vec<PathBuf>)],
    stat_dir: &Path,
) -> Result<Captured, Failure> {
    let problem = |e: store::StoreError| cache_problem(format!("capturing: {e}"));
    let mut digests = Vec::new();
    let mut builder = DirectoryBuilder::new(local);
    for (p, disk, exclude) in paths {
        let stats = Arc::new(StatCache::load(stat_dir, disk));
        let options = CaptureOptions {
            mtimes: true,
            exclude: exclude.clone(),
            known: Some(stats.clone()),
        };
        let meta = std::fs::symlink_metadata(disk)
            .map_err(|e| cache_problem(format!("reading {}: {e}", disk.display())))?;
        let at = p.in_tree();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(disk)
                .map_err(|e| cache_problem(format!("reading {}: {e}", disk.display())))?;
            let target = target.to_str().ok_or_else(|| {
                cache_problem(format!("the symlink {} is not UTF-8", disk.display()))
            })?;
            builder.add_symlink(&at, target).map_err(problem)?;
        } else if meta.is_dir() {
            let (d, all) = local
                .capture_directory_with(disk, &options)
                .map_err(problem)?;
            stats.save();
            digests.extend(all);
            builder.add_directory(&at, d).map_err(problem)?;
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt as _;
            let d = local.store_file(disk, false).map_err(problem)?;
            digests.push(d);
            let exec = meta.permissions().mode() & 0o111 != 0;
            builder
                .add_file_at(&at, d, exec, meta.modified().ok())
                .map_err(problem)?;
        } else {
            return Err(usage(format!(
                "{} is neither a file, a directory nor a symlink",
                disk.display()
            )));
        }
    }
    let root = builder.build().map_err(problem)?;
    let tree = local.build_tree(root).map_err(problem)?;
    let tree_digest = local
        .store_bytes(&prost::Message::encode_to_vec(&tree))
        .map_err(problem)?;
    digests.push(root);
    digests.push(tree_digest);
    let lease = local.lease(digests);
    let (files, bytes) = tree_totals(local, root).map_err(problem)?;
    Ok((root, tree_digest, lease, files, bytes))
}

/// What a save read last time under one saved directory: each file's [`FileStamp`] and
/// digest, so the next save reads only files whose stamp changed (see
/// [`CaptureOptions::known`]). One file per directory (by its absolute path) under the cache
/// directory's `job-cache-stat/`, a line per file: `rel TAB size TAB mtime TAB ctime TAB inode
/// TAB device TAB hash TAB digest-size`. Unreadable or stale lines only cost a read.
struct StatCache {
    file: PathBuf,
    old: HashMap<PathBuf, (FileStamp, Digest)>,
    seen: std::sync::Mutex<Vec<(PathBuf, FileStamp, Digest)>>,
}

impl StatCache {
    fn load(dir: &Path, saved: &Path) -> StatCache {
        let name = Digest::of_bytes(saved.as_os_str().as_encoded_bytes())
            .hash
            .to_hex();
        let file = dir.join(&name[..32]);
        let mut old = HashMap::new();
        for line in std::fs::read_to_string(&file).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [rel, size, mtime, ctime, inode, device, hash, dsize] = f[..] else {
                continue;
            };
            let parsed = (|| {
                let stamp = FileStamp {
                    size: size.parse().ok()?,
                    mtime_ns: mtime.parse().ok()?,
                    ctime_ns: ctime.parse().ok()?,
                    inode: inode.parse().ok()?,
                    device: device.parse().ok()?,
                };
                let d = Digest::new(
                    hashing::Fingerprint::from_hex(hash).ok()?,
                    dsize.parse().ok()?,
                );
                Some((stamp, d))
            })();
            if let Some(v) = parsed {
                old.insert(PathBuf::from(rel), v);
            }
        }
        StatCache {
            file,
            old,
            seen: Default::default(),
        }
    }

    /// Writes what this save saw (replacing the old file; a failure costs only reads).
    fn save(&self) {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = String::new();
        for (rel, st, d) in seen.iter() {
            let Some(rel) = rel.to_str().filter(|r| !r.contains(['\t', '\n'])) else {
                continue;
            };
            text.push_str(&format!(
                "{rel}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                st.size,
                st.mtime_ns,
                st.ctime_ns,
                st.inode,
                st.device,
                d.hash.to_hex(),
                d.size_bytes
            ));
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self
                .file
                .with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &self.file)
        };
        if let Err(e) = write() {
            tracing::debug!(error = %e, "cannot remember the files a save read");
        }
    }
}

impl KnownFiles for StatCache {
    fn lookup(&self, rel: &Path, stamp: &FileStamp) -> Option<Digest> {
        let (st, d) = self.old.get(rel)?;
        if st != stamp {
            return None;
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((rel.to_path_buf(), *stamp, *d));
        Some(*d)
    }

    fn record(&self, rel: &Path, stamp: FileStamp, digest: Digest) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).push((
            rel.to_path_buf(),
            stamp,
            digest,
        ));
    }
}

/// Points PREFIX's record at this entry (a record without outputs: it names the key, so a
/// server never walks the tree again for it), unless it already names a newer one.
async fn record_prefix(
    ac: &Arc<dyn store::remote::ActionCacheProvider>,
    prefix: &str,
    record: &Record,
) -> Result<(), Failure> {
    let ar = record.to_action_result(None);
    let action = prefix_action(prefix);
    if let Ok(Some(existing)) = ac.get_action_result(action).await
        && let Ok((r, _)) = Record::from_action_result(&existing)
        && r.created > record.created
    {
        return Ok(());
    }
    ac.update_action_result(action, ar)
        .await
        .map_err(|e| cache_problem(e.to_string()))
}

/// Writes KEY's listing file (file-backed caches); a failure only costs the listing.
fn write_listing(dir: &Path, record: &Record) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.{}", record.key, std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(record).unwrap_or_default())?;
        std::fs::rename(&tmp, dir.join(&record.key))
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, "cannot update the cache's key listing");
    }
}

/// The entry under `action`, if there is a readable live one (an unreadable one is a warning).
async fn lookup(
    ac: &Arc<dyn store::remote::ActionCacheProvider>,
    action: Digest,
    what: &str,
) -> Result<Option<(Record, Option<Digest>)>, Failure> {
    match ac.get_action_result(action).await {
        Ok(None) => Ok(None),
        Ok(Some(ar)) => match Record::from_action_result(&ar) {
            Ok(found) => Ok(Some(found)),
            Err(why) => {
                crate::warnings::warn(format!("cache restore: {what}: {why}; ignored"));
                Ok(None)
            }
        },
        Err(e) => Err(cache_problem(format!("looking up {what}: {e}"))),
    }
}

/// Finds what to restore: KEY, else each prefix in order. Returns how it matched.
async fn choose(
    ac: &Arc<dyn store::remote::ActionCacheProvider>,
    key: &str,
    prefixes: &[String],
) -> Result<Option<(&'static str, Record, Digest)>, Failure> {
    if let Some((r, Some(t))) = lookup(ac, entry_action(key), &format!("key {key:?}")).await?
        && !r.deleted
    {
        return Ok(Some(("exact", r, t)));
    }
    for prefix in prefixes {
        let mut candidates = Vec::new();
        // The prefix record names the newest key saved under the prefix; its entry must still
        // be there and live (it may have been deleted, or saved again, since).
        if let Some((p, _)) =
            lookup(ac, prefix_action(prefix), &format!("prefix {prefix:?}")).await?
            && !p.deleted
            && p.key.starts_with(prefix.as_str())
            && let Some((e, Some(t))) =
                lookup(ac, entry_action(&p.key), &format!("key {:?}", p.key)).await?
            && !e.deleted
        {
            candidates.push((e, t));
        }
        // A whole key equal to the prefix counts too.
        if let Some((e, Some(t))) =
            lookup(ac, entry_action(prefix), &format!("key {prefix:?}")).await?
            && !e.deleted
        {
            candidates.push((e, t));
        }
        if let Some((e, t)) = candidates
            .into_iter()
            .max_by(|a, b| a.0.created.total_cmp(&b.0.created))
        {
            return Ok(Some(("prefix", e, t)));
        }
    }
    Ok(None)
}

async fn restore(a: CacheRestoreArgs) -> Result<(), Failure> {
    validate_key(&a.key, "key").map_err(Failure::Usage)?;
    for p in &a.restore_keys {
        validate_key(p, "--restore-key").map_err(Failure::Usage)?;
    }
    let dirs = Dirs::new(a.root.as_deref())?;
    let only: Vec<SavedPath> = a
        .paths
        .iter()
        .map(|r| parse_path(r, &dirs))
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    restore_entry(&a.common, &a.key, &a.restore_keys, &dirs, only).await
}

/// Restores KEY (else the newest entry of the first prefix that has one); `only`: just those
/// of its paths.
pub(crate) async fn restore_entry(
    common: &CacheCommon,
    key: &str,
    restore_keys: &[String],
    dirs: &Dirs,
    only: Vec<SavedPath>,
) -> Result<(), Failure> {
    let started = Instant::now();
    let opened = open(common).await?;
    let ac = opened.providers.action_cache.clone();
    let mut report = Report {
        command: "restore",
        key: key.to_owned(),
        ..Default::default()
    };
    let chosen = within(
        common.timeout,
        started,
        "looking up the entry",
        choose(&ac, key, restore_keys),
    )
    .await?;
    let Some((matched, record, tree)) = chosen else {
        report.matched = Some("none");
        report.seconds = started.elapsed().as_secs_f64();
        let line = format!(
            "nothing restored: no entry for {}{}",
            key,
            if restore_keys.is_empty() {
                String::new()
            } else {
                format!(" or the prefixes {}", restore_keys.join(", "))
            }
        );
        print_report(common, &report, line);
        return Ok(());
    };
    // The record's paths are untrusted: the same rules as a save's.
    let mut saved = Vec::new();
    for p in &record.paths {
        let parsed = parse_path(p, dirs).map_err(|why| {
            cache_problem(format!("the entry {:?} is refused: {why}", record.key))
        })?;
        if p.starts_with('/') || parsed.spelled() != *p {
            return Err(cache_problem(format!(
                "the entry {:?} is refused: path {p:?} is not in its normal form",
                record.key
            )));
        }
        saved.push(parsed);
    }
    check_apart(&saved).map_err(|why| cache_problem(format!("the entry is refused: {why}")))?;
    let wanted: Vec<SavedPath> = if only.is_empty() {
        saved
    } else {
        for p in &only {
            if !saved.contains(p) {
                return Err(usage(format!(
                    "{:?} is not one of the entry's paths ({})",
                    p.spelled(),
                    record.paths.join(", ")
                )));
            }
        }
        only
    };
    let progress = crate::progress::Progress::start(opened.local.clone());
    let fetched = within(common.timeout, started, "downloading", async {
        let root = opened
            .store
            .load_tree(tree)
            .await
            .map_err(|e| cache_problem(format!("the entry's tree: {e}")))?;
        let mut nodes = Vec::new();
        for p in &wanted {
            nodes.push(node_at(&opened.local, root, &p.in_tree()).map_err(cache_problem)?);
        }
        let dirs_wanted: HashSet<Digest> = nodes
            .iter()
            .filter_map(|n| match n {
                Node::Dir(d) => Some(*d),
                _ => None,
            })
            .collect();
        let files_wanted: HashSet<Digest> = nodes
            .iter()
            .filter_map(|n| match n {
                Node::File { digest, .. } => Some(*digest),
                _ => None,
            })
            .collect();
        let got = opened
            .store
            .ensure_downloaded(files_wanted, dirs_wanted)
            .await
            .map_err(|e| cache_problem(format!("downloading: {e}")))?;
        Ok((nodes, got))
    })
    .await;
    progress.finish();
    let (nodes, got) = fetched?;
    // Writing to disk, once started, finishes (no deadline): each path is swapped in whole.
    let local = opened.local.clone();
    let targets: Vec<(SavedPath, Node, PathBuf)> = wanted
        .iter()
        .zip(nodes)
        .map(|(p, n)| Ok((p.clone(), n, dirs.base(p.base)?.to_path_buf())))
        .collect::<Result<_, Failure>>()?;
    let (written, skipped) = tokio::task::spawn_blocking(move || materialize_all(&local, &targets))
        .await
        .map_err(|e| cache_problem(format!("restore task: {e}")))?;
    for (p, why) in &skipped {
        crate::warnings::warn(format!("cache restore: {p} not restored: {why}"));
    }
    report.matched = Some(matched);
    report.restored_key = Some(record.key.clone());
    report.files = record.files;
    report.bytes = record.size;
    report.bytes_transferred = got.bytes;
    report.paths = written;
    report.skipped = skipped.into_iter().map(|(p, _)| p).collect();
    report.seconds = started.elapsed().as_secs_f64();
    let how = if matched == "exact" {
        format!("restored {}", record.key)
    } else {
        format!("restored {} (prefix match for {})", record.key, key)
    };
    let line = format!(
        "{how}: {} files, {}, {} downloaded, in {:.1} s",
        record.files,
        human_bytes(record.size),
        human_bytes(got.bytes),
        report.seconds
    );
    print_report(common, &report, line);
    if !report.skipped.is_empty() {
        return Err(cache_problem(format!(
            "{} of the entry's paths were not restored",
            report.skipped.len()
        )));
    }
    Ok(())
}

/// What a saved path is in the tree.
#[derive(Debug, Clone)]
enum Node {
    Dir(Digest),
    File {
        digest: Digest,
        executable: bool,
        mtime: Option<SystemTime>,
    },
    Symlink(String),
}

/// The node at `path` (`/`-separated) under the stored directory `root`.
fn node_at(local: &LocalStore, root: Digest, path: &str) -> Result<Node, String> {
    let mut dir = root;
    let parts: Vec<&str> = path.split('/').collect();
    for (i, name) in parts.iter().enumerate() {
        let msg = local
            .load_directory(dir)
            .map_err(|e| format!("the entry's tree: {e}"))?;
        let last = i + 1 == parts.len();
        if let Some(sub) = msg.directories.iter().find(|d| d.name == *name) {
            dir = hashing::reapi::require_digest("directories[].digest", sub.digest.as_ref())
                .map_err(|e| e.to_string())?;
            if last {
                return Ok(Node::Dir(dir));
            }
            continue;
        }
        if last {
            if let Some(f) = msg.files.iter().find(|f| f.name == *name) {
                let digest = hashing::reapi::require_digest("files[].digest", f.digest.as_ref())
                    .map_err(|e| e.to_string())?;
                let mtime = f
                    .node_properties
                    .as_ref()
                    .and_then(|p| p.mtime.as_ref())
                    .and_then(|m| {
                        UNIX_EPOCH.checked_add(Duration::new(
                            u64::try_from(m.seconds).ok()?,
                            u32::try_from(m.nanos).ok().filter(|n| *n < 1_000_000_000)?,
                        ))
                    });
                return Ok(Node::File {
                    digest,
                    executable: f.is_executable,
                    mtime,
                });
            }
            if let Some(s) = msg.symlinks.iter().find(|s| s.name == *name) {
                return Ok(Node::Symlink(s.target.clone()));
            }
        }
        break;
    }
    Err(format!("the entry's tree has no {path:?}"))
}

/// Writes every path (blocking); returns the paths written and those skipped, with why.
fn materialize_all(
    local: &LocalStore,
    targets: &[(SavedPath, Node, PathBuf)],
) -> (Vec<String>, Vec<(String, String)>) {
    let mut written = Vec::new();
    let mut skipped = Vec::new();
    for (p, node, base) in targets {
        match materialize_one(local, p, node, base) {
            Ok(()) => written.push(p.spelled()),
            Err(why) => skipped.push((p.spelled(), why)),
        }
    }
    (written, skipped)
}

/// Leftover staging directories of restores whose process is gone are removed on the way.
const STAGING: &str = ".recache-cache-restore-";

/// Writes one saved path: into a staging directory beside it, then swapped into place. Refuses
/// to go through an existing symlink between the base and the path.
fn materialize_one(
    local: &LocalStore,
    p: &SavedPath,
    node: &Node,
    base: &Path,
) -> Result<(), String> {
    let dest = base.join(&p.rel);
    // Every existing ancestor between the base and the destination must be a real directory.
    let mut at = base.to_path_buf();
    let parts: Vec<&str> = p.rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symlink; a restore never writes through one",
                    at.display()
                ));
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!("{} is not a directory", at.display()));
            }
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?;
            }
        }
    }
    let parent = dest.parent().unwrap_or(base);
    crate::staging::remove_stale(parent, STAGING);
    let staging = parent.join(format!(
        "{STAGING}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
    let result = (|| {
        let fresh = staging.join("new");
        let options = MaterializeOptions {
            mutable: true,
            mtimes: true,
        };
        match node {
            Node::Dir(d) => local
                .materialize_directory(*d, &fresh, options)
                .map_err(|e| e.to_string())?,
            Node::File {
                digest,
                executable,
                mtime,
            } => {
                local
                    .materialize_file(*digest, &fresh, *executable, options)
                    .map_err(|e| e.to_string())?;
                if let Some(t) = mtime {
                    std::fs::File::open(&fresh)
                        .and_then(|f| f.set_modified(*t))
                        .map_err(|e| format!("setting the time of {}: {e}", dest.display()))?;
                }
            }
            Node::Symlink(target) => {
                if Path::new(target).is_absolute()
                    || Path::new(target)
                        .components()
                        .any(|c| c == Component::ParentDir)
                {
                    return Err(format!(
                        "the saved symlink -> {target:?} could point outside; refused"
                    ));
                }
                std::os::unix::fs::symlink(target, &fresh)
                    .map_err(|e| format!("creating symlink {}: {e}", dest.display()))?;
            }
        }
        // Swap: what is there moves into the staging directory (removed below), the new
        // content takes its place. A symlink there is removed as a link, never followed.
        if let Ok(m) = std::fs::symlink_metadata(&dest) {
            let old = staging.join("old");
            if m.is_dir() && !m.file_type().is_symlink() {
                std::fs::rename(&dest, &old)
                    .map_err(|e| format!("moving {} aside: {e}", dest.display()))?;
            } else {
                std::fs::remove_file(&dest)
                    .map_err(|e| format!("removing {}: {e}", dest.display()))?;
            }
        }
        std::fs::rename(&fresh, &dest).map_err(|e| format!("placing {}: {e}", dest.display()))
    })();
    let _ = crate::staging::remove_tree(&staging);
    result
}

async fn list(a: &CacheListArgs) -> Result<(), Failure> {
    if let Some(p) = &a.prefix {
        validate_key(p, "prefix").map_err(Failure::Usage)?;
    }
    if a.common
        .remote
        .address
        .as_deref()
        .is_some_and(|r| !r.starts_with("file://"))
    {
        return Err(usage(
            "listing needs the embedded default cache or a file:// cache: REAPI servers have \
             no way to list ActionCache entries",
        ));
    }
    let opened = open(&a.common).await?;
    let Some(dir) = opened.listing else {
        return Err(usage("this cache cannot list"));
    };
    let mut records: Vec<Record> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| !r.deleted && validate_key(&r.key, "key").is_ok())
            .filter(|r| a.prefix.as_deref().is_none_or(|p| r.key.starts_with(p)))
            .collect(),
        Err(_) => Vec::new(),
    };
    records.sort_by(|x, y| {
        y.created
            .total_cmp(&x.created)
            .then_with(|| x.key.cmp(&y.key))
    });
    if a.common.json {
        println!("{}", serde_json::to_string(&records).unwrap_or_default());
    } else {
        for r in &records {
            let created = age(now() - r.created);
            println!(
                "{}  {created:>9}  {:>10}  {} files  {}",
                r.key,
                human_bytes(r.size),
                r.files,
                r.paths.join(" ")
            );
        }
    }
    Ok(())
}

async fn delete(a: &CacheDeleteArgs) -> Result<(), Failure> {
    validate_key(&a.key, "key").map_err(Failure::Usage)?;
    let started = Instant::now();
    let opened = open(&a.common).await?;
    let ac = opened.providers.action_cache.clone();
    let tombstone = Record {
        format: 1,
        key: a.key.clone(),
        created: now(),
        size: 0,
        files: 0,
        paths: Vec::new(),
        deleted: true,
    };
    within(a.common.timeout, started, "deleting", async {
        ac.update_action_result(entry_action(&a.key), tombstone.to_action_result(None))
            .await
            .map_err(|e| cache_problem(format!("deleting {:?}: {e}", a.key)))
    })
    .await?;
    if let Some(dir) = &opened.listing {
        let _ = std::fs::remove_file(dir.join(&a.key));
    }
    let report = Report {
        command: "delete",
        key: a.key.clone(),
        seconds: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    print_report(&a.common, &report, format!("deleted {}", a.key));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("linux-cargo-1.2+x_y", "key").is_ok());
        for bad in ["", "a b", "a/b", "ключ", "a\0"] {
            assert!(validate_key(bad, "key").is_err(), "{bad:?}");
        }
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES), "key").is_ok());
        let long = validate_key(&"k".repeat(MAX_KEY_BYTES + 1), "key").unwrap_err();
        assert!(long.0.contains("513"), "{}", long.0);
    }

    #[test]
    fn prefixes_end_at_separators() {
        assert_eq!(
            boundaries("linux-cargo-abc"),
            vec!["linux-", "linux-cargo-"]
        );
        assert_eq!(boundaries("a.b_c+d-"), vec!["a.", "a.b_", "a.b_c+"]);
        assert!(boundaries("plain").is_empty());
        assert_ne!(entry_action("x"), prefix_action("x"));
    }

    #[test]
    fn paths_are_normalized_and_checked() {
        let dirs = Dirs {
            root: PathBuf::from("/work/repo"),
            home: Some(PathBuf::from("/home/ci")),
        };
        let p = |s: &str| parse_path(s, &dirs).map(|p| p.spelled());
        assert_eq!(p("./target/").unwrap(), "target");
        assert_eq!(p("~/.cargo/registry").unwrap(), "~/.cargo/registry");
        assert_eq!(p("/home/ci/.cargo/git/db").unwrap(), "~/.cargo/git/db");
        assert_eq!(p("/work/repo/node_modules").unwrap(), "node_modules");
        for bad in ["../x", "a/../../b", "/etc", "~", ".", "~/"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        let a = parse_path("target", &dirs).unwrap();
        let b = parse_path("target/debug", &dirs).unwrap();
        assert!(check_apart(&[a.clone(), b]).is_err());
        let c = parse_path("~/target", &dirs).unwrap();
        assert!(check_apart(&[a, c]).is_ok());
    }
}
