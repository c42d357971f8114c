//! REAPI `Directory` and `Tree` messages: validation, capture from disk, materialization to disk.
//!
//! A directory is stored as its `Directory` message (a small blob, keyed by the message's digest)
//! plus the blobs its files name. Everything that comes from outside (a remote cache's Tree, a
//! Directory blob downloaded from a server) is validated before anything is written to disk:
//! names must be single path components (no `/`, `.`, `..`, empty or NUL), each list sorted and
//! free of duplicates, digests well formed, and symlinks must stay inside the destination.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hashing::Digest;
use hashing::reapi::require_digest;
use prost::Message;
use rayon::prelude::*;
use reapi::build::bazel::remote::execution::v2 as remexec;

/// Fewer files than this are captured or materialized on the calling thread: starting the
/// thread pool (and asking the cgroup how many CPUs there are) costs more than a few small
/// files, and a `recache run` usually has a few.
const PARALLEL_MIN_FILES: usize = 16;

use crate::error::{ErrorKind, StoreError};
use crate::local::LocalStore;

/// Checks that `name` is a single, harmless path component.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = |why: &str| StoreError::invalid(format!("invalid entry name {name:?}: {why}"));
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name == "." || name == ".." {
        return Err(bad("`.` and `..` are not allowed"));
    }
    if name.contains('/') {
        return Err(bad("contains `/`"));
    }
    if name.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    Ok(())
}

/// Validates a `Directory` message from an untrusted source: names, ordering, duplicates and
/// digests. Symlink targets are checked when materializing, where the destination is known.
pub fn validate_directory(dir: &remexec::Directory) -> Result<(), StoreError> {
    let mut seen: HashSet<&str> = HashSet::new();
    let lists: [(&str, Vec<&str>); 3] = [
        ("files", dir.files.iter().map(|f| f.name.as_str()).collect()),
        (
            "directories",
            dir.directories.iter().map(|d| d.name.as_str()).collect(),
        ),
        (
            "symlinks",
            dir.symlinks.iter().map(|s| s.name.as_str()).collect(),
        ),
    ];
    for (kind, names) in &lists {
        for (i, name) in names.iter().enumerate() {
            validate_name(name)?;
            if i > 0 && names[i - 1] >= *name {
                return Err(StoreError::invalid(format!(
                    "{kind} are not sorted by name or contain duplicates: {:?} comes before {name:?}",
                    names[i - 1]
                )));
            }
            if !seen.insert(name) {
                return Err(StoreError::invalid(format!(
                    "duplicate entry name {name:?} in a directory"
                )));
            }
        }
    }
    // The field is named only on failure: formatting it for every entry cost an allocation
    // per file on every hit.
    let check = |d: Option<&remexec::Digest>, field: &dyn Fn() -> String| {
        if require_digest("", d).is_ok() {
            return Ok(());
        }
        require_digest(&field(), d)
            .map(|_| ())
            .map_err(|e| StoreError::invalid(e.to_string()))
    };
    for f in &dir.files {
        check(f.digest.as_ref(), &|| format!("files[{}].digest", f.name))?;
    }
    for d in &dir.directories {
        check(d.digest.as_ref(), &|| {
            format!("directories[{}].digest", d.name)
        })?;
    }
    for s in &dir.symlinks {
        if s.target.is_empty() {
            return Err(StoreError::invalid(format!(
                "symlink {:?} has an empty target",
                s.name
            )));
        }
    }
    Ok(())
}

/// Decodes and validates a Directory message.
pub fn decode_directory(bytes: &[u8]) -> Result<remexec::Directory, StoreError> {
    let dir = remexec::Directory::decode(bytes)
        .map_err(|e| StoreError::invalid(format!("undecodable Directory message: {e}")))?;
    validate_directory(&dir)?;
    Ok(dir)
}

/// The most symlinks one resolution may follow before it is refused as a loop (Linux's own
/// limit).
pub const MAX_SYMLINK_FOLLOWS: usize = 40;

/// What a tree holds at a path, for [`symlink_resolves_inside`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeEntry {
    /// A directory.
    Dir,
    /// A file.
    File,
    /// A symlink with this target.
    Symlink(String),
    /// Nothing in this tree (the path is resolved lexically from here on).
    Absent,
}

/// The symlink rule, applied everywhere a symlink is accepted (capture, materialize, a cached
/// ActionResult, sandbox outputs): a symlink at `link_dir/<name>` (relative to the root of its
/// tree) with `target` must resolve inside that root **as the kernel would resolve it**, walking
/// the target one component at a time through the tree itself:
///
/// - a component that is a symlink in the tree is followed (its target replaces it, resolved
///   from the directory holding it), at most [`MAX_SYMLINK_FOLLOWS`] times, so a loop is refused;
/// - `..` goes to the parent of where the walk *is*, not of the text before it, so `a/a/../..`
///   with `a -> .` climbs two levels from the link's directory;
/// - a component the tree does not hold is taken as a plain directory name (lexically);
/// - an absolute target, or a walk that climbs above the root, is refused.
///
/// `lookup(path)` tells what the tree holds at `path` (relative to the root). The error says why.
///
/// ```
/// use std::path::Path;
/// use store::directory::{TreeEntry, symlink_resolves_inside};
/// // gen/a -> .   and   gen/b -> a/a/../..  : textually inside, really two levels up.
/// let lookup = |p: &Path| match p.to_str() {
///     Some("gen") => TreeEntry::Dir,
///     Some("gen/a") => TreeEntry::Symlink(".".into()),
///     _ => TreeEntry::Absent,
/// };
/// assert!(symlink_resolves_inside(Path::new("gen"), "a/x", &lookup).is_ok());
/// assert!(symlink_resolves_inside(Path::new("gen"), "a/a/../..", &lookup).is_err());
/// ```
pub fn symlink_resolves_inside(
    link_dir: &Path,
    target: &str,
    lookup: &dyn Fn(&Path) -> TreeEntry,
) -> Result<(), String> {
    if target.starts_with('/') {
        return Err("absolute targets are not allowed".into());
    }
    let mut at: PathBuf = link_dir.to_path_buf();
    let mut pending: VecDeque<String> = target_components(target);
    let mut follows = 0usize;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            if !at.pop() {
                return Err("it leaves the root".into());
            }
            continue;
        }
        at.push(&c);
        match lookup(&at) {
            TreeEntry::Dir | TreeEntry::Absent => {}
            // A file in the middle of a path stops the kernel's walk (ENOTDIR): nothing escapes.
            TreeEntry::File => return Ok(()),
            TreeEntry::Symlink(t) => {
                follows += 1;
                if follows > MAX_SYMLINK_FOLLOWS {
                    return Err(format!(
                        "it follows more than {MAX_SYMLINK_FOLLOWS} symlinks (a loop)"
                    ));
                }
                if t.starts_with('/') {
                    return Err(format!(
                        "it goes through {} -> {t:?}, an absolute target",
                        at.display()
                    ));
                }
                at.pop();
                for (i, part) in target_components(&t).into_iter().enumerate() {
                    pending.insert(i, part);
                }
            }
        }
    }
    Ok(())
}

fn target_components(target: &str) -> VecDeque<String> {
    target
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_owned)
        .collect()
}

/// Every entry of a stored directory tree by path, for materializing and for symlink checks.
#[derive(Debug, Default)]
struct TreeIndex {
    /// Directories, parents first (BFS order), the root (`""`) included.
    dirs: Vec<PathBuf>,
    /// Files: path, content, executable, recorded modification time.
    files: Vec<(PathBuf, Digest, bool, Option<SystemTime>)>,
    links: Vec<(PathBuf, String)>,
    entries: HashMap<PathBuf, TreeEntry>,
    /// Recorded modification times of directories.
    dir_mtimes: Vec<(PathBuf, SystemTime)>,
}

impl TreeIndex {
    /// Applies [`symlink_resolves_inside`] to every symlink of the tree.
    fn check_links(&self, root_name: &dyn Fn() -> String) -> Result<(), StoreError> {
        let lookup = |p: &Path| self.entries.get(p).cloned().unwrap_or(TreeEntry::Absent);
        for (path, target) in &self.links {
            let dir = path.parent().unwrap_or(Path::new(""));
            symlink_resolves_inside(dir, target, &lookup).map_err(|why| {
                StoreError::invalid(format!(
                    "symlink {} -> {target:?} would point outside {}: {why}",
                    path.display(),
                    root_name()
                ))
            })?;
        }
        Ok(())
    }
}

impl LocalStore {
    /// Loads and validates the Directory message `digest`.
    pub fn load_directory(&self, digest: Digest) -> Result<remexec::Directory, StoreError> {
        let bytes = self
            .load_bytes(digest)?
            .ok_or_else(|| StoreError::missing(digest).context("loading a directory"))?;
        if Digest::of_bytes(&bytes) != digest {
            return Err(StoreError::invalid(format!(
                "stored directory {digest} does not match its digest"
            )));
        }
        decode_directory(&bytes).map_err(|e| e.context(format!("directory {digest}")))
    }

    /// Whether the whole tree under `root` is stored: every Directory message (valid) and
    /// every file blob. `Err` when a message is invalid.
    pub fn directory_complete(&self, root: Digest) -> Result<bool, StoreError> {
        Ok(self.tree_digests(root)?.is_some())
    }

    /// Every digest of the tree under `root`, its Directory messages and its file blobs, when
    /// the whole tree is stored; `None` when any of it is missing. `Err` when a message is
    /// invalid.
    pub fn tree_digests(&self, root: Digest) -> Result<Option<Vec<Digest>>, StoreError> {
        let mut queue = vec![root];
        let mut seen = HashSet::new();
        let mut files = Vec::new();
        while let Some(d) = queue.pop() {
            if !seen.insert(d) {
                continue;
            }
            let dir = match self.load_directory(d) {
                Ok(dir) => dir,
                Err(e) if matches!(e.kind(), crate::ErrorKind::MissingDigest(_)) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            for f in &dir.files {
                files.push(
                    require_digest("files[].digest", f.digest.as_ref())
                        .map_err(|e| StoreError::invalid(e.to_string()))?,
                );
            }
            for sub in &dir.directories {
                queue.push(
                    require_digest("directories[].digest", sub.digest.as_ref())
                        .map_err(|e| StoreError::invalid(e.to_string()))?,
                );
            }
        }
        if !self.missing(files.iter().copied()).is_empty() {
            return Ok(None);
        }
        files.extend(seen);
        Ok(Some(files))
    }

    /// Stores a Directory message (after validating it) and returns its digest.
    pub fn store_directory(&self, dir: &remexec::Directory) -> Result<Digest, StoreError> {
        validate_directory(dir)?;
        self.store_bytes(&dir.encode_to_vec())
    }

    /// Captures the directory at `path` into the store: every file (large ones into the pool,
    /// hashed across cores), executable bits, symlinks (kept as links, never followed). Returns
    /// the digest of the root `Directory` message.
    ///
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn capture_directory(&self, path: &Path) -> Result<Digest, StoreError> {
        self.capture_directory_excluding(path, &[])
    }

    /// [`capture_directory`](Self::capture_directory), leaving out the entries at the relative
    /// paths `exclude` (files or whole directories; absent ones are ignored) without reading
    /// them: e.g. a command's declared outputs, or a cache directory inside a workspace.
    pub fn capture_directory_excluding(
        &self,
        path: &Path,
        exclude: &[PathBuf],
    ) -> Result<Digest, StoreError> {
        self.capture_walk(path, exclude, false, None, &mut Vec::new())
    }

    /// [`capture_directory`](Self::capture_directory) as `options` say (exclusions, recorded
    /// modification times); returns the root's digest and every digest of the tree (files and
    /// Directory messages, a blob as often as it occurs).
    ///
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn capture_directory_with(
        &self,
        path: &Path,
        options: &CaptureOptions,
    ) -> Result<(Digest, Vec<Digest>), StoreError> {
        let mut digests = Vec::new();
        let root = self.capture_walk(
            path,
            &options.exclude,
            options.mtimes,
            options.known.as_deref(),
            &mut digests,
        )?;
        Ok((root, digests))
    }

    /// [`capture_directory_excluding`](Self::capture_directory_excluding), then leases every
    /// blob of the tree (across processes, see [`LocalStore::lease`]) and checks that all are
    /// still stored. `None` when another process's GC took one between its capture and the
    /// lease: capture again. Cheaper than capturing and then
    /// [`lease_tree`](LocalStore::lease_tree): the digests are known, no message is read back.
    pub fn capture_directory_leased(
        &self,
        path: &Path,
        exclude: &[PathBuf],
    ) -> Result<Option<(Digest, crate::Lease)>, StoreError> {
        let mut digests = Vec::new();
        let root = self.capture_walk(path, exclude, false, None, &mut digests)?;
        let lease = self.lease(digests.iter().copied());
        if self.missing(digests).is_empty() {
            Ok(Some((root, lease)))
        } else {
            Ok(None)
        }
    }

    /// Captures `path` (minus `exclude`), adding every digest of the tree to `digests`.
    fn capture_walk(
        &self,
        path: &Path,
        exclude: &[PathBuf],
        mtimes: bool,
        known: Option<&dyn KnownFiles>,
        digests: &mut Vec<Digest>,
    ) -> Result<Digest, StoreError> {
        // 1. Walk, collecting the shape and the list of files.
        let mut files: Vec<(PathBuf, FileStamp)> = Vec::new();
        let exclude: HashSet<&Path> = exclude.iter().map(PathBuf::as_path).collect();
        // A name REAPI cannot represent is reported relative to `path` (the caller names it).
        let root = walk(path, Path::new(""), &exclude, mtimes, &mut files).map_err(|e| match e
            .kind()
        {
            crate::ErrorKind::Unrepresentable => e,
            _ => e.context(format!("capturing {}", path.display())),
        })?;
        // 2. Store every file, in parallel when there are enough to pay for the thread pool.
        let store_one = |(rel, stamp): &(PathBuf, FileStamp)| {
            if let Some(d) = known.and_then(|k| k.lookup(rel, stamp))
                && self.contains(d)
            {
                return Ok(d);
            }
            let d = self
                .store_file(&path.join(rel), false)
                .map_err(|e| e.context(format!("storing {}", path.join(rel).display())))?;
            if let Some(k) = known {
                k.record(rel, *stamp, d);
            }
            Ok(d)
        };
        let stored: Vec<Result<Digest, StoreError>> = if files.len() < PARALLEL_MIN_FILES {
            files.iter().map(store_one).collect()
        } else {
            files.par_iter().map(store_one).collect()
        };
        let mut by_path: HashMap<&Path, Digest> = HashMap::with_capacity(files.len());
        for ((rel, _), d) in files.iter().zip(stored) {
            let d = d?;
            digests.push(d);
            by_path.insert(rel.as_path(), d);
        }
        // 3. Build Directory messages bottom-up.
        self.store_walked(&root, &by_path, digests)
    }

    fn store_walked(
        &self,
        dir: &Walked,
        files: &HashMap<&Path, Digest>,
        digests: &mut Vec<Digest>,
    ) -> Result<Digest, StoreError> {
        let mut msg = remexec::Directory {
            node_properties: mtime_properties(dir.mtime),
            ..Default::default()
        };
        for (name, rel, exec, mtime) in &dir.files {
            let digest = files
                .get(rel.as_path())
                .ok_or_else(|| StoreError::new(ErrorKind::Other, "captured file lost"))?;
            msg.files.push(remexec::FileNode {
                name: name.clone(),
                digest: Some((*digest).into()),
                is_executable: *exec,
                node_properties: mtime_properties(*mtime),
            });
        }
        for (name, sub) in &dir.dirs {
            let digest = self.store_walked(sub, files, digests)?;
            msg.directories.push(remexec::DirectoryNode {
                name: name.clone(),
                digest: Some(digest.into()),
            });
        }
        for (name, target) in &dir.symlinks {
            msg.symlinks.push(remexec::SymlinkNode {
                name: name.clone(),
                target: target.clone(),
                node_properties: None,
            });
        }
        let digest = self.store_directory(&msg)?;
        digests.push(digest);
        Ok(digest)
    }

    /// Writes the directory `digest` to `dest` (created if missing; must be empty or absent).
    ///
    /// Pool-sized files are hardlinked from the pool (read-only) unless `options.mutable` or the
    /// file is executable (a hardlink shares the pool file's mode), falling back to a copy when a
    /// link cannot be made (e.g. across filesystems). Small files are written. Symlinks are
    /// created only when they resolve inside `dest`. Everything is validated before the first
    /// byte is written.
    ///
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn materialize_directory(
        &self,
        digest: Digest,
        dest: &Path,
        options: MaterializeOptions,
    ) -> Result<(), StoreError> {
        // 1. Load and validate every Directory, collecting what to create; check every symlink
        //    against the whole tree.
        let index = self
            .index_tree(digest)
            .map_err(|e| e.context(format!("materializing {}", dest.display())))?;
        index.check_links(&|| dest.display().to_string())?;
        let TreeIndex {
            dirs,
            files,
            links,
            dir_mtimes,
            ..
        } = index;
        for (_, d, _, _) in &files {
            if !self.contains(*d) {
                return Err(
                    StoreError::missing(*d).context(format!("materializing {}", dest.display()))
                );
            }
        }
        // 2. Create directories (parents first: BFS order), then files in parallel, then links.
        for rel in &dirs {
            let p = dest.join(rel);
            fs::create_dir_all(&p)
                .map_err(|e| StoreError::io(format!("creating {}", p.display()), e))?;
        }
        // A file's time is set on the handle that wrote it (no second open).
        let write_one = |(rel, d, exec, mtime): &(PathBuf, Digest, bool, Option<SystemTime>)| {
            let mtime = if options.mtimes { *mtime } else { None };
            self.write_file(*d, &dest.join(rel), *exec, options, mtime)
        };
        if files.len() < PARALLEL_MIN_FILES {
            files.iter().try_for_each(write_one)?;
        } else {
            files.par_iter().try_for_each(write_one)?;
        }
        for (rel, target) in &links {
            let p = dest.join(rel);
            std::os::unix::fs::symlink(target, &p)
                .map_err(|e| StoreError::io(format!("creating symlink {}", p.display()), e))?;
        }
        if options.mtimes {
            // Directories once everything in them exists, deeper ones before their parents:
            // setting a time never disturbs one already set.
            let mut mtimes = dir_mtimes;
            mtimes.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
            for (rel, t) in mtimes {
                let p = dest.join(&rel);
                fs::File::open(&p)
                    .and_then(|f| f.set_modified(t))
                    .map_err(|e| {
                        StoreError::io(format!("setting the time of {}", p.display()), e)
                    })?;
            }
        }
        Ok(())
    }

    /// Writes one file blob to `path` (which must not exist).
    pub fn materialize_file(
        &self,
        digest: Digest,
        path: &Path,
        executable: bool,
        options: MaterializeOptions,
    ) -> Result<(), StoreError> {
        self.write_file(digest, path, executable, options, None)
    }

    /// [`materialize_file`](Self::materialize_file), and with `mtime` sets the file's
    /// modification time. Mode and time are set through the handle that wrote the bytes: one
    /// open per file (a second open per file to set its time was most of a warm job-cache
    /// restore's system calls).
    fn write_file(
        &self,
        digest: Digest,
        path: &Path,
        executable: bool,
        options: MaterializeOptions,
        mtime: Option<SystemTime>,
    ) -> Result<(), StoreError> {
        let mode = match (options.mutable, executable) {
            (true, true) => 0o755,
            (true, false) => 0o644,
            (false, true) => 0o555,
            (false, false) => 0o444,
        };
        let io_err = |what: &str, e| StoreError::io(format!("{what} {}", path.display()), e);
        let out = if let Some(pool_path) = self.load_file(digest)? {
            let link = !options.mutable && !options.mtimes && !executable;
            if link && fs::hard_link(&pool_path, path).is_ok() {
                return Ok(());
            }
            let mut src = fs::File::open(&pool_path)
                .map_err(|e| StoreError::io(format!("opening {}", pool_path.display()), e))?;
            let mut out = fs::File::create(path).map_err(|e| io_err("creating", e))?;
            // File to file: the kernel copies (copy_file_range), as fs::copy does.
            io::copy(&mut src, &mut out).map_err(|e| io_err("copying to", e))?;
            out
        } else {
            let bytes = self
                .load_bytes(digest)?
                .ok_or_else(|| StoreError::missing(digest))?;
            let mut out = fs::File::create(path).map_err(|e| io_err("creating", e))?;
            io::Write::write_all(&mut out, &bytes).map_err(|e| io_err("writing", e))?;
            out
        };
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("setting the mode of", e))?;
        if let Some(t) = mtime {
            out.set_modified(t)
                .map_err(|e| io_err("setting the time of", e))?;
        }
        Ok(())
    }

    /// Loads (and validates) every Directory of the tree `digest` into a [`TreeIndex`].
    fn index_tree(&self, digest: Digest) -> Result<TreeIndex, StoreError> {
        let mut index = TreeIndex {
            dirs: vec![PathBuf::new()],
            ..Default::default()
        };
        index.entries.insert(PathBuf::new(), TreeEntry::Dir);
        let mut queue = VecDeque::from([(PathBuf::new(), digest)]);
        while let Some((rel, d)) = queue.pop_front() {
            let dir = self.load_directory(d)?;
            if let Some(t) = recorded_mtime(dir.node_properties.as_ref()) {
                index.dir_mtimes.push((rel.clone(), t));
            }
            for f in dir.files {
                let fd = require_digest("files[].digest", f.digest.as_ref())
                    .map_err(|e| StoreError::invalid(e.to_string()))?;
                let p = rel.join(&f.name);
                let mtime = recorded_mtime(f.node_properties.as_ref());
                index.entries.insert(p.clone(), TreeEntry::File);
                index.files.push((p, fd, f.is_executable, mtime));
            }
            for s in dir.symlinks {
                let p = rel.join(&s.name);
                index
                    .entries
                    .insert(p.clone(), TreeEntry::Symlink(s.target.clone()));
                index.links.push((p, s.target));
            }
            for sub in dir.directories {
                let sd = require_digest("directories[].digest", sub.digest.as_ref())
                    .map_err(|e| StoreError::invalid(e.to_string()))?;
                let p = rel.join(&sub.name);
                index.entries.insert(p.clone(), TreeEntry::Dir);
                index.dirs.push(p.clone());
                queue.push_back((p, sd));
            }
        }
        Ok(index)
    }

    /// Checks every symlink in the stored directory `digest` against the symlink rule (see
    /// [`symlink_resolves_inside`]), with the directory itself as the root. The error names the
    /// first offending link.
    pub fn check_symlinks(&self, digest: Digest) -> Result<(), StoreError> {
        self.index_tree(digest)?
            .check_links(&|| "its directory tree".to_owned())
    }

    /// Builds a REAPI `Tree` (root plus every distinct descendant) for the directory `digest`.
    pub fn build_tree(&self, digest: Digest) -> Result<remexec::Tree, StoreError> {
        let root = self.load_directory(digest)?;
        let mut children = Vec::new();
        let mut seen = HashSet::new();
        let mut queue: VecDeque<Digest> = VecDeque::new();
        let enqueue = |dir: &remexec::Directory, queue: &mut VecDeque<Digest>| {
            for sub in &dir.directories {
                if let Some(Ok(d)) = sub.digest.as_ref().map(Digest::try_from) {
                    queue.push_back(d);
                }
            }
        };
        enqueue(&root, &mut queue);
        while let Some(d) = queue.pop_front() {
            if !seen.insert(d) {
                continue;
            }
            let dir = self.load_directory(d)?;
            enqueue(&dir, &mut queue);
            children.push(dir);
        }
        Ok(remexec::Tree {
            root: Some(root),
            children,
        })
    }

    /// Validates an untrusted `Tree`, stores every Directory in it, and returns the root's
    /// digest. Fails (storing nothing) if any directory is invalid or a referenced subdirectory is
    /// absent from the tree.
    pub fn expand_tree(&self, tree: &remexec::Tree) -> Result<Digest, StoreError> {
        let root = tree
            .root
            .as_ref()
            .ok_or_else(|| StoreError::invalid("Tree has no root directory"))?;
        let mut by_digest: HashMap<Digest, &remexec::Directory> = HashMap::new();
        for child in &tree.children {
            validate_directory(child).map_err(|e| e.context("Tree child"))?;
            by_digest.insert(Digest::of_bytes(&child.encode_to_vec()), child);
        }
        validate_directory(root).map_err(|e| e.context("Tree root"))?;
        for dir in std::iter::once(root).chain(tree.children.iter()) {
            for sub in &dir.directories {
                let d = require_digest("directories[].digest", sub.digest.as_ref())
                    .map_err(|e| StoreError::invalid(e.to_string()))?;
                if !by_digest.contains_key(&d) {
                    return Err(StoreError::invalid(format!(
                        "Tree is incomplete: subdirectory {:?} ({d}) is not among its children",
                        sub.name
                    )));
                }
            }
        }
        for child in by_digest.values() {
            self.store_bytes(&child.encode_to_vec())?;
        }
        self.store_bytes(&root.encode_to_vec())
    }

    /// The digests of every file blob in the directory `digest` (recursively), without loading
    /// the blobs themselves.
    pub fn file_digests(&self, digest: Digest) -> Result<Vec<Digest>, StoreError> {
        let tree = self.build_tree(digest)?;
        let mut out = Vec::new();
        for dir in tree.root.iter().chain(tree.children.iter()) {
            for f in &dir.files {
                if let Some(Ok(d)) = f.digest.as_ref().map(Digest::try_from) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }
}

/// How to materialize files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterializeOptions {
    /// Give the caller writable copies instead of read-only hardlinks into the pool.
    pub mutable: bool,
    /// Set the modification times the tree records (`NodeProperties.mtime` of files and
    /// Directory messages; entries without one keep the time of writing). Files are then
    /// copies, never hardlinks (a hardlink shares one inode's time between paths).
    pub mtimes: bool,
}

/// A walked directory: (name, relative path, executable, modification time if asked) files,
/// subdirs, symlinks; sorted; its own modification time if asked.
#[derive(Debug, Default)]
struct Walked {
    files: Vec<(String, PathBuf, bool, Option<Mtime>)>,
    dirs: Vec<(String, Walked)>,
    symlinks: Vec<(String, String)>,
    mtime: Option<Mtime>,
}

/// A modification time as REAPI records it (`NodeProperties.mtime`).
type Mtime = reapi::google::protobuf::Timestamp;

/// `meta`'s modification time as a [`Mtime`].
fn mtime_of(meta: &fs::Metadata) -> Option<Mtime> {
    use std::os::unix::fs::MetadataExt;
    Some(Mtime {
        seconds: meta.mtime(),
        nanos: i32::try_from(meta.mtime_nsec()).ok()?,
    })
}

/// Node properties carrying only `mtime`.
fn mtime_properties(mtime: Option<Mtime>) -> Option<remexec::NodeProperties> {
    mtime.map(|m| remexec::NodeProperties {
        mtime: Some(m),
        ..Default::default()
    })
}

/// The modification time a node's properties record, if a valid one.
fn recorded_mtime(props: Option<&remexec::NodeProperties>) -> Option<std::time::SystemTime> {
    let m = props?.mtime.as_ref()?;
    let nanos = u32::try_from(m.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    let since = std::time::Duration::new(m.seconds.unsigned_abs(), nanos);
    if m.seconds >= 0 {
        std::time::UNIX_EPOCH.checked_add(since)
    } else {
        std::time::UNIX_EPOCH.checked_sub(since)
    }
}

/// How to capture a directory ([`LocalStore::capture_directory_with`]).
#[derive(Clone, Default)]
pub struct CaptureOptions {
    /// Relative paths left out without being read (files or whole directories).
    pub exclude: Vec<PathBuf>,
    /// Record every file's and directory's modification time (`NodeProperties.mtime`), as
    /// tools that compare them need (cargo's freshness check). Changes the tree's digests.
    pub mtimes: bool,
    /// Digests already known for files by their [`FileStamp`]: a file whose stamp is known and
    /// whose blob the store holds is not read again (what makes re-capturing a large, mostly
    /// unchanged tree cost a `stat` per file). Every file read is reported back to it.
    pub known: Option<std::sync::Arc<dyn KnownFiles>>,
}

impl std::fmt::Debug for CaptureOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureOptions")
            .field("exclude", &self.exclude)
            .field("mtimes", &self.mtimes)
            .field("known", &self.known.is_some())
            .finish()
    }
}

/// What identifies a file's content without reading it, as git's index does: any write
/// changes its ctime (which a user cannot set), a replacement its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    /// Length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub device: u64,
}

impl FileStamp {
    /// The stamp of a file's metadata.
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }
}

/// Digests of files seen before, by relative path and [`FileStamp`] (see
/// [`CaptureOptions::known`]).
pub trait KnownFiles: Send + Sync {
    /// The digest the file at `rel` had when it had this stamp, if known.
    fn lookup(&self, rel: &Path, stamp: &FileStamp) -> Option<Digest>;
    /// The file at `rel`, with this stamp, was read and holds `digest`.
    fn record(&self, rel: &Path, stamp: FileStamp, digest: Digest);
}

fn walk(
    root: &Path,
    rel: &Path,
    exclude: &HashSet<&Path>,
    mtimes: bool,
    files: &mut Vec<(PathBuf, FileStamp)>,
) -> Result<Walked, StoreError> {
    let dir = root.join(rel);
    let io_err =
        |what: &str, p: &Path, e: io::Error| StoreError::io(format!("{what} {}", p.display()), e);
    let mut entries: Vec<(String, fs::DirEntry)> = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))? {
        let entry = entry.map_err(|e| io_err("listing", &dir, e))?;
        let name = entry.file_name().into_string().map_err(|n| {
            StoreError::new(
                crate::ErrorKind::Unrepresentable,
                format!(
                    "the file name {:?} is not UTF-8, which REAPI cannot represent, so it \
                     cannot be cached",
                    rel.join(n)
                ),
            )
        })?;
        entries.push((name, entry));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Walked::default();
    if mtimes {
        let meta = fs::metadata(&dir).map_err(|e| io_err("inspecting", &dir, e))?;
        out.mtime = mtime_of(&meta);
    }
    for (name, entry) in entries {
        let path = entry.path();
        let child_rel = rel.join(&name);
        if exclude.contains(child_rel.as_path()) {
            continue;
        }
        let meta = fs::symlink_metadata(&path).map_err(|e| io_err("inspecting", &path, e))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| io_err("reading symlink", &path, e))?;
            let target = target.into_os_string().into_string().map_err(|t| {
                StoreError::new(
                    crate::ErrorKind::Unrepresentable,
                    format!(
                        "the symlink {child_rel:?} points to {t:?}, which is not UTF-8 (REAPI \
                         cannot represent it), so it cannot be cached"
                    ),
                )
            })?;
            out.symlinks.push((name, target));
        } else if ft.is_dir() {
            out.dirs
                .push((name, walk(root, &child_rel, exclude, mtimes, files)?));
        } else if ft.is_file() {
            let exec = meta.permissions().mode() & 0o111 != 0;
            files.push((child_rel.clone(), FileStamp::of(&meta)));
            let mtime = if mtimes { mtime_of(&meta) } else { None };
            out.files.push((name, child_rel, exec, mtime));
        } else {
            return Err(StoreError::invalid(format!(
                "{} is neither a file, a directory nor a symlink (sockets, FIFOs and devices cannot be captured)",
                path.display()
            )));
        }
    }
    Ok(out)
}

/// Assembles a directory from entries at relative paths (`a/b/file`), e.g. the declared outputs
/// of a process or the outputs listed in an ActionResult, and stores its Directory messages.
///
/// Paths are untrusted: each component must pass [`validate_name`] (so no absolute paths, `..`,
/// `.` or empty components), and two entries may not claim the same path. An entry below an
/// already added directory digest merges into it.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let store = store::LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
/// let hello = store.store_bytes(b"hello").unwrap();
/// let mut b = store::directory::DirectoryBuilder::new(&store);
/// b.add_file("out/greeting.txt", hello, false).unwrap();
/// assert!(b.add_file("../escape", hello, false).is_err());
/// let root = b.build().unwrap();
/// assert_eq!(store.file_digests(root).unwrap(), vec![hello]);
/// ```
#[derive(Debug)]
pub struct DirectoryBuilder<'a> {
    store: &'a LocalStore,
    root: Node,
}

#[derive(Debug, Clone)]
enum Node {
    File {
        digest: Digest,
        executable: bool,
        mtime: Option<Mtime>,
    },
    Symlink(String),
    Stored(Digest),
    Dir(std::collections::BTreeMap<String, Node>),
}

impl<'a> DirectoryBuilder<'a> {
    /// An empty directory.
    pub fn new(store: &'a LocalStore) -> DirectoryBuilder<'a> {
        DirectoryBuilder {
            store,
            root: Node::Dir(Default::default()),
        }
    }

    fn components(path: &str) -> Result<Vec<&str>, StoreError> {
        if path.is_empty() {
            return Ok(vec![]);
        }
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts {
            validate_name(p).map_err(|e| e.context(format!("path {path:?}")))?;
        }
        Ok(parts)
    }

    /// Expands a stored directory into editable nodes.
    fn expand(&self, digest: Digest) -> Result<Node, StoreError> {
        let dir = self.store.load_directory(digest)?;
        let mut map = std::collections::BTreeMap::new();
        for f in dir.files {
            let d = require_digest("files[].digest", f.digest.as_ref())
                .map_err(|e| StoreError::invalid(e.to_string()))?;
            map.insert(
                f.name,
                Node::File {
                    digest: d,
                    executable: f.is_executable,
                    mtime: f.node_properties.and_then(|p| p.mtime),
                },
            );
        }
        for s in dir.directories {
            let d = require_digest("directories[].digest", s.digest.as_ref())
                .map_err(|e| StoreError::invalid(e.to_string()))?;
            map.insert(s.name, Node::Stored(d));
        }
        for l in dir.symlinks {
            map.insert(l.name, Node::Symlink(l.target));
        }
        Ok(Node::Dir(map))
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), StoreError> {
        let parts = Self::components(path)?;
        let Some((last, parents)) = parts.split_last() else {
            // The root itself: only a directory may be placed there, and only once.
            return match (&self.root, node) {
                (Node::Dir(m), Node::Stored(d)) if m.is_empty() => {
                    self.root = Node::Stored(d);
                    Ok(())
                }
                _ => Err(StoreError::invalid(format!(
                    "path {path:?}: only a directory may be the root, and nothing else may be added with it"
                ))),
            };
        };
        let mut cur = std::mem::replace(&mut self.root, Node::Dir(Default::default()));
        let result = self.insert_at(&mut cur, parents, last, node, path);
        self.root = cur;
        result
    }

    fn insert_at(
        &self,
        cur: &mut Node,
        parents: &[&str],
        last: &str,
        node: Node,
        path: &str,
    ) -> Result<(), StoreError> {
        if let Node::Stored(d) = cur {
            *cur = self.expand(*d)?;
        }
        let Node::Dir(map) = cur else {
            return Err(StoreError::invalid(format!(
                "path {path:?} goes through a file or symlink"
            )));
        };
        match parents.split_first() {
            None => {
                if map.contains_key(last) {
                    return Err(StoreError::invalid(format!(
                        "path {path:?} is declared twice"
                    )));
                }
                map.insert(last.to_owned(), node);
                Ok(())
            }
            Some((first, rest)) => {
                let child = map
                    .entry((*first).to_owned())
                    .or_insert_with(|| Node::Dir(Default::default()));
                self.insert_at(child, rest, last, node, path)
            }
        }
    }

    /// Starts from the stored directory `digest` (to add to it or remove from it).
    pub fn from_directory(store: &'a LocalStore, digest: Digest) -> DirectoryBuilder<'a> {
        DirectoryBuilder {
            store,
            root: Node::Stored(digest),
        }
    }

    /// Removes the entry at `path` (file, symlink or directory); absent is fine.
    pub fn remove(&mut self, path: &str) -> Result<(), StoreError> {
        let parts = Self::components(path)?;
        let Some((last, parents)) = parts.split_last() else {
            return Err(StoreError::invalid("cannot remove the root"));
        };
        let mut cur = std::mem::replace(&mut self.root, Node::Dir(Default::default()));
        let result = self.remove_at(&mut cur, parents, last);
        self.root = cur;
        result
    }

    fn remove_at(&self, node: &mut Node, parents: &[&str], last: &str) -> Result<(), StoreError> {
        if let Node::Stored(d) = node {
            *node = self.expand(*d)?;
        }
        let Node::Dir(map) = node else {
            return Ok(()); // the path goes through a file: nothing to remove
        };
        match parents.split_first() {
            None => {
                map.remove(last);
                Ok(())
            }
            Some((first, rest)) => match map.get_mut(*first) {
                Some(child) => self.remove_at(child, rest, last),
                None => Ok(()),
            },
        }
    }

    /// Adds a file.
    pub fn add_file(
        &mut self,
        path: &str,
        digest: Digest,
        executable: bool,
    ) -> Result<(), StoreError> {
        self.add_file_at(path, digest, executable, None)
    }

    /// Adds a file with a recorded modification time (`NodeProperties.mtime`, set back by
    /// [`MaterializeOptions::mtimes`]).
    pub fn add_file_at(
        &mut self,
        path: &str,
        digest: Digest,
        executable: bool,
        mtime: Option<std::time::SystemTime>,
    ) -> Result<(), StoreError> {
        if path.is_empty() {
            return Err(StoreError::invalid("an output file needs a non-empty path"));
        }
        let mtime = mtime.and_then(|t| {
            let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(Mtime {
                seconds: i64::try_from(since.as_secs()).ok()?,
                nanos: i32::try_from(since.subsec_nanos()).ok()?,
            })
        });
        self.insert(
            path,
            Node::File {
                digest,
                executable,
                mtime,
            },
        )
    }

    /// Adds a stored directory (its Directory message must be in the store).
    pub fn add_directory(&mut self, path: &str, digest: Digest) -> Result<(), StoreError> {
        self.insert(path, Node::Stored(digest))
    }

    /// Adds a symlink; its target is validated when materializing.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), StoreError> {
        if path.is_empty() || target.is_empty() {
            return Err(StoreError::invalid(format!(
                "symlink {path:?} -> {target:?} needs a path and a target"
            )));
        }
        self.insert(path, Node::Symlink(target.to_owned()))
    }

    /// Stores the Directory messages (in one transaction) and returns the root's digest.
    pub fn build(self) -> Result<Digest, StoreError> {
        let mut encoded: Vec<(Digest, Vec<u8>)> = Vec::new();
        let root = encode_node(&self.root, &mut encoded)?;
        let items: Vec<(Digest, &[u8])> = encoded.iter().map(|(d, b)| (*d, &b[..])).collect();
        if items.iter().all(|(d, _)| self.store.is_small(d.size_bytes)) {
            self.store.put_small_batch(&items)?;
        } else {
            for (_, bytes) in &items {
                self.store.store_bytes(bytes)?;
            }
        }
        Ok(root)
    }
}

/// Encodes `node`'s Directory messages bottom-up into `out` (validated), returning its digest.
fn encode_node(node: &Node, out: &mut Vec<(Digest, Vec<u8>)>) -> Result<Digest, StoreError> {
    match node {
        Node::Stored(d) => Ok(*d),
        Node::Dir(map) => {
            let mut msg = remexec::Directory::default();
            for (name, child) in map {
                match child {
                    Node::File {
                        digest,
                        executable,
                        mtime,
                    } => msg.files.push(remexec::FileNode {
                        name: name.clone(),
                        digest: Some((*digest).into()),
                        is_executable: *executable,
                        node_properties: mtime_properties(*mtime),
                    }),
                    Node::Symlink(target) => msg.symlinks.push(remexec::SymlinkNode {
                        name: name.clone(),
                        target: target.clone(),
                        node_properties: None,
                    }),
                    Node::Stored(_) | Node::Dir(_) => {
                        msg.directories.push(remexec::DirectoryNode {
                            name: name.clone(),
                            digest: Some(encode_node(child, out)?.into()),
                        })
                    }
                }
            }
            // No validate_directory here: every name was validated on insert, a BTreeMap keeps
            // them sorted and unique, and every digest is a typed Digest already.
            let bytes = msg.encode_to_vec();
            let digest = Digest::of_bytes(&bytes);
            out.push((digest, bytes));
            Ok(digest)
        }
        Node::File { .. } | Node::Symlink(_) => {
            Err(StoreError::invalid("the root must be a directory"))
        }
    }
}
