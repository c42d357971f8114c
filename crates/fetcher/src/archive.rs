//! Unpacking a downloaded archive (`.tar`, `.tar.gz`, `.zip`) into a Directory tree in the
//! store, for Remote Asset's `FetchDirectory`.
//!
//! The same path rules as action outputs: an entry with an absolute path or a `..` component
//! is refused (naming it), names are validated by [`store::directory::DirectoryBuilder`], and
//! every symlink must resolve inside the tree ([`LocalStore::check_symlinks`]). Hard links,
//! devices and other special entries are refused. Unpacked bytes are capped. Nothing is
//! recorded for an archive that breaks a rule (blobs already stored are unreferenced and age
//! out).

use std::collections::HashSet;
use std::io::Read;

use hashing::Digest;
use store::LocalStore;
use store::directory::DirectoryBuilder;

/// The archive formats understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A POSIX tar.
    Tar,
    /// A gzip-compressed tar.
    TarGz,
    /// A zip file.
    Zip,
}

impl ArchiveKind {
    /// The kind a `resource_type` qualifier names, else the URI's extension says.
    pub fn detect(resource_type: Option<&str>, uri: &str) -> Option<ArchiveKind> {
        match resource_type {
            Some("application/x-tar") => return Some(ArchiveKind::Tar),
            Some("application/gzip" | "application/x-gzip" | "application/x-compressed-tar") => {
                return Some(ArchiveKind::TarGz);
            }
            Some("application/zip") => return Some(ArchiveKind::Zip),
            _ => {}
        }
        let path = uri.split(['?', '#']).next().unwrap_or(uri);
        if path.ends_with(".tar.gz") || path.ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if path.ends_with(".tar") {
            Some(ArchiveKind::Tar)
        } else if path.ends_with(".zip") {
            Some(ArchiveKind::Zip)
        } else {
            None
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArchiveError(String);

fn refuse(msg: impl Into<String>) -> ArchiveError {
    ArchiveError(msg.into())
}

/// An entry's path, made relative and checked: no absolute paths, no `..`.
fn entry_path(raw: &str) -> Result<Option<String>, ArchiveError> {
    if raw.starts_with('/') {
        return Err(refuse(format!("entry {raw:?} has an absolute path")));
    }
    let parts: Vec<&str> = raw
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(refuse(format!("entry {raw:?} climbs out with `..`")));
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

struct Tree<'a> {
    store: &'a LocalStore,
    builder: DirectoryBuilder<'a>,
    paths: HashSet<String>,
    dirs: Vec<String>,
    bytes: u64,
    max_bytes: u64,
}

impl<'a> Tree<'a> {
    fn new(store: &'a LocalStore, max_bytes: u64) -> Tree<'a> {
        Tree {
            store,
            builder: DirectoryBuilder::new(store),
            paths: HashSet::new(),
            dirs: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn file(
        &mut self,
        path: String,
        content: &mut dyn Read,
        exec: bool,
    ) -> Result<(), ArchiveError> {
        let mut data = Vec::new();
        let budget = self.max_bytes.saturating_sub(self.bytes);
        content
            .take(budget.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| refuse(format!("reading entry {path:?}: {e}")))?;
        self.bytes += data.len() as u64;
        if self.bytes > self.max_bytes {
            return Err(refuse(format!(
                "unpacks to more than {} bytes",
                self.max_bytes
            )));
        }
        let d = self
            .store
            .store_bytes(&data)
            .map_err(|e| refuse(format!("storing entry {path:?}: {e}")))?;
        self.builder
            .add_file(&path, d, exec)
            .map_err(|e| refuse(format!("entry {path:?}: {e}")))?;
        self.paths.insert(path);
        Ok(())
    }

    fn symlink(&mut self, path: String, target: &str) -> Result<(), ArchiveError> {
        self.builder
            .add_symlink(&path, target)
            .map_err(|e| refuse(format!("entry {path:?}: {e}")))?;
        self.paths.insert(path);
        Ok(())
    }

    fn finish(mut self) -> Result<Digest, ArchiveError> {
        // Directories that hold nothing else are kept, empty.
        let empty = self
            .store
            .store_directory(&Default::default())
            .map_err(|e| refuse(e.to_string()))?;
        for dir in std::mem::take(&mut self.dirs) {
            let prefix = format!("{dir}/");
            if !self
                .paths
                .iter()
                .any(|p| p == &dir || p.starts_with(&prefix))
            {
                self.builder
                    .add_directory(&dir, empty)
                    .map_err(|e| refuse(format!("entry {dir:?}: {e}")))?;
                self.paths.insert(dir);
            }
        }
        let root = self.builder.build().map_err(|e| refuse(e.to_string()))?;
        self.store
            .check_symlinks(root)
            .map_err(|e| refuse(format!("a symlink leaves the archive: {e}")))?;
        Ok(root)
    }
}

/// Unpacks the archive `reader` of `kind` into the store; returns the root Directory's digest.
/// A zip is read whole into memory first (its index is at the end), so zips are capped at
/// `max_bytes` too.
pub fn unpack(
    store: &LocalStore,
    reader: &mut dyn Read,
    kind: ArchiveKind,
    max_bytes: u64,
) -> Result<Digest, ArchiveError> {
    let mut tree = Tree::new(store, max_bytes);
    match kind {
        ArchiveKind::Tar => unpack_tar(&mut tree, reader)?,
        ArchiveKind::TarGz => unpack_tar(&mut tree, &mut flate2::read::GzDecoder::new(reader))?,
        ArchiveKind::Zip => unpack_zip(&mut tree, reader, max_bytes)?,
    }
    tree.finish()
}

fn unpack_tar(tree: &mut Tree<'_>, reader: &mut dyn Read) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| refuse(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refuse(format!("a broken tar entry: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(path) = entry_path(&raw)? else {
            continue;
        };
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            tree.dirs.push(path);
        } else if kind.is_file() {
            let exec = entry.header().mode().unwrap_or(0) & 0o111 != 0;
            tree.file(path, &mut entry, exec)?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            tree.symlink(path, &target)?;
        } else if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        } else {
            return Err(refuse(format!(
                "entry {raw:?} is a {kind:?}: only files, directories and symlinks are taken"
            )));
        }
    }
    Ok(())
}

fn unpack_zip(
    tree: &mut Tree<'_>,
    reader: &mut dyn Read,
    max_bytes: u64,
) -> Result<(), ArchiveError> {
    let mut data = Vec::new();
    reader
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| refuse(format!("reading the zip: {e}")))?;
    if data.len() as u64 > max_bytes {
        return Err(refuse(format!("the zip is more than {max_bytes} bytes")));
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data))
        .map_err(|e| refuse(format!("not a zip archive: {e}")))?;
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| refuse(format!("a broken zip entry: {e}")))?;
        let raw = f
            .name()
            .map_err(|e| refuse(format!("zip entry {i} has an unreadable name: {e}")))?
            .into_owned();
        let Some(path) = entry_path(&raw)? else {
            continue;
        };
        let mode = f.unix_mode().unwrap_or(0o644);
        if f.is_dir() {
            tree.dirs.push(path);
        } else if mode & 0o170000 == 0o120000 {
            let mut target = String::new();
            f.read_to_string(&mut target)
                .map_err(|e| refuse(format!("reading entry {raw:?}: {e}")))?;
            tree.symlink(path, &target)?;
        } else {
            tree.file(path, &mut f, mode & 0o111 != 0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; write the name bytes directly, as a hostile archive would.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        for (path, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, path, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_tar_unpacks_and_hostile_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
        let good = tar_of(
            &[("pkg/bin/tool", b"#!/bin/sh\n"), ("./pkg/README", b"hi")],
            &[("pkg/link", "README")],
        );
        let root = unpack(&store, &mut &good[..], ArchiveKind::Tar, 1 << 20).unwrap();
        let tree = store.build_tree(root).unwrap();
        assert_eq!(tree.root.unwrap().directories[0].name, "pkg");

        for (bad, says) in [
            (tar_of(&[("../evil", b"x")], &[]), "climbs out"),
            (tar_of(&[("a/../../evil", b"x")], &[]), "climbs out"),
            (tar_of(&[("/etc/passwd", b"x")], &[]), "absolute"),
            (
                tar_of(&[("a", b"x")], &[("out", "../../etc/passwd")]),
                "symlink",
            ),
        ] {
            let e = unpack(&store, &mut &bad[..], ArchiveKind::Tar, 1 << 20).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        let big = tar_of(&[("a", &[0u8; 2000])], &[]);
        let e = unpack(&store, &mut &big[..], ArchiveKind::Tar, 1000).unwrap_err();
        assert!(e.to_string().contains("more than 1000"), "{e}");
    }

    #[test]
    fn kinds_come_from_the_resource_type_or_the_extension() {
        assert_eq!(
            ArchiveKind::detect(None, "https://h/a.tar.gz?x=1"),
            Some(ArchiveKind::TarGz)
        );
        assert_eq!(
            ArchiveKind::detect(None, "https://h/a.zip"),
            Some(ArchiveKind::Zip)
        );
        assert_eq!(
            ArchiveKind::detect(Some("application/x-tar"), "https://h/a"),
            Some(ArchiveKind::Tar)
        );
        assert_eq!(ArchiveKind::detect(None, "https://h/a.bin"), None);
    }
}
