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
use std::path::{Component, Path, PathBuf};

use bazel_remote_apis::build::bazel::remote::execution::v2 as remexec;
use hashing::Digest;
use hashing::reapi::require_digest;
use prost::Message;
use rayon::prelude::*;

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
    for f in &dir.files {
        require_digest(&format!("files[{}].digest", f.name), f.digest.as_ref())
            .map_err(|e| StoreError::invalid(e.to_string()))?;
    }
    for d in &dir.directories {
        require_digest(
            &format!("directories[{}].digest", d.name),
            d.digest.as_ref(),
        )
        .map_err(|e| StoreError::invalid(e.to_string()))?;
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

/// Checks that a symlink at `link_dir/…` (relative to the root) with `target` resolves inside the
/// root, lexically. Absolute targets are refused.
pub fn symlink_stays_inside(link_dir: &Path, target: &str) -> bool {
    let target = Path::new(target);
    if target.is_absolute() {
        return false;
    }
    let mut depth: usize = link_dir.components().count();
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
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
        // 1. Walk, collecting the shape and the list of files.
        let mut files: Vec<PathBuf> = Vec::new();
        let root = walk(path, Path::new(""), &mut files)
            .map_err(|e| e.context(format!("capturing {}", path.display())))?;
        // 2. Store every file, in parallel.
        let digests: Vec<Result<Digest, StoreError>> = files
            .par_iter()
            .map(|rel| {
                self.store_file(&path.join(rel), false)
                    .map_err(|e| e.context(format!("storing {}", path.join(rel).display())))
            })
            .collect();
        let mut by_path: HashMap<&Path, Digest> = HashMap::with_capacity(files.len());
        for (rel, d) in files.iter().zip(digests) {
            by_path.insert(rel.as_path(), d?);
        }
        // 3. Build Directory messages bottom-up.
        self.store_walked(&root, &by_path)
    }

    fn store_walked(
        &self,
        dir: &Walked,
        files: &HashMap<&Path, Digest>,
    ) -> Result<Digest, StoreError> {
        let mut msg = remexec::Directory::default();
        for (name, rel, exec) in &dir.files {
            let digest = files
                .get(rel.as_path())
                .ok_or_else(|| StoreError::new(ErrorKind::Other, "captured file lost"))?;
            msg.files.push(remexec::FileNode {
                name: name.clone(),
                digest: Some((*digest).into()),
                is_executable: *exec,
                node_properties: None,
            });
        }
        for (name, sub) in &dir.dirs {
            let digest = self.store_walked(sub, files)?;
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
        self.store_directory(&msg)
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
        // 1. Load and validate every Directory, collecting what to create.
        let mut dirs: Vec<PathBuf> = vec![PathBuf::new()];
        let mut files: Vec<(PathBuf, Digest, bool)> = Vec::new();
        let mut links: Vec<(PathBuf, String)> = Vec::new();
        let mut queue = VecDeque::from([(PathBuf::new(), digest)]);
        while let Some((rel, d)) = queue.pop_front() {
            let dir = self
                .load_directory(d)
                .map_err(|e| e.context(format!("materializing {}", dest.join(&rel).display())))?;
            for f in dir.files {
                let fd = Digest::try_from(f.digest.as_ref().unwrap_or(&Default::default()))
                    .map_err(|e| StoreError::invalid(e.to_string()))?;
                files.push((rel.join(&f.name), fd, f.is_executable));
            }
            for s in dir.symlinks {
                if !symlink_stays_inside(&rel, &s.target) {
                    return Err(StoreError::invalid(format!(
                        "symlink {} -> {:?} would point outside {}",
                        rel.join(&s.name).display(),
                        s.target,
                        dest.display()
                    )));
                }
                links.push((rel.join(&s.name), s.target));
            }
            for sub in dir.directories {
                let sd = Digest::try_from(sub.digest.as_ref().unwrap_or(&Default::default()))
                    .map_err(|e| StoreError::invalid(e.to_string()))?;
                let sub_rel = rel.join(&sub.name);
                dirs.push(sub_rel.clone());
                queue.push_back((sub_rel, sd));
            }
        }
        for (_, d, _) in &files {
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
        files.par_iter().try_for_each(|(rel, d, exec)| {
            self.materialize_file(*d, &dest.join(rel), *exec, options)
        })?;
        for (rel, target) in &links {
            let p = dest.join(rel);
            std::os::unix::fs::symlink(target, &p)
                .map_err(|e| StoreError::io(format!("creating symlink {}", p.display()), e))?;
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
        let mode = match (options.mutable, executable) {
            (true, true) => 0o755,
            (true, false) => 0o644,
            (false, true) => 0o555,
            (false, false) => 0o444,
        };
        let io_err = |what: &str, e| StoreError::io(format!("{what} {}", path.display()), e);
        if let Some(pool_path) = self.load_file(digest)? {
            if !options.mutable && !executable && fs::hard_link(&pool_path, path).is_ok() {
                return Ok(());
            }
            fs::copy(&pool_path, path).map_err(|e| io_err("copying to", e))?;
        } else {
            let bytes = self
                .load_bytes(digest)?
                .ok_or_else(|| StoreError::missing(digest))?;
            fs::write(path, &bytes).map_err(|e| io_err("writing", e))?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("setting the mode of", e))
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
}

/// A walked directory: (name, relative path, executable) files, subdirs, symlinks; sorted.
#[derive(Debug, Default)]
struct Walked {
    files: Vec<(String, PathBuf, bool)>,
    dirs: Vec<(String, Walked)>,
    symlinks: Vec<(String, String)>,
}

fn walk(root: &Path, rel: &Path, files: &mut Vec<PathBuf>) -> Result<Walked, StoreError> {
    let dir = root.join(rel);
    let io_err =
        |what: &str, p: &Path, e: io::Error| StoreError::io(format!("{what} {}", p.display()), e);
    let mut entries: Vec<(String, fs::DirEntry)> = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))? {
        let entry = entry.map_err(|e| io_err("listing", &dir, e))?;
        let name = entry.file_name().into_string().map_err(|n| {
            StoreError::invalid(format!(
                "file name {n:?} in {} is not UTF-8, which REAPI cannot represent",
                dir.display()
            ))
        })?;
        entries.push((name, entry));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Walked::default();
    for (name, entry) in entries {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| io_err("inspecting", &path, e))?;
        let child_rel = rel.join(&name);
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| io_err("reading symlink", &path, e))?;
            let target = target.into_os_string().into_string().map_err(|t| {
                StoreError::invalid(format!(
                    "symlink target {t:?} of {} is not UTF-8",
                    path.display()
                ))
            })?;
            out.symlinks.push((name, target));
        } else if ft.is_dir() {
            out.dirs.push((name, walk(root, &child_rel, files)?));
        } else if ft.is_file() {
            let exec = meta.permissions().mode() & 0o111 != 0;
            files.push(child_rel.clone());
            out.files.push((name, child_rel, exec));
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
    File { digest: Digest, executable: bool },
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
        if path.is_empty() {
            return Err(StoreError::invalid("an output file needs a non-empty path"));
        }
        self.insert(path, Node::File { digest, executable })
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
                    Node::File { digest, executable } => msg.files.push(remexec::FileNode {
                        name: name.clone(),
                        digest: Some((*digest).into()),
                        is_executable: *executable,
                        node_properties: None,
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
            validate_directory(&msg)?;
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
