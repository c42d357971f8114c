//! Unpacking a downloaded archive (`.tar`, `.tar.gz`, `.zip`) into a Directory tree in the
//! store, for Remote Asset's `FetchDirectory`.
//!
//! The same path rules as action outputs: an entry with an absolute path or a `..` component
//! is refused (naming it), names are validated by [`store::directory::DirectoryBuilder`], and
//! every symlink must resolve inside the tree ([`LocalStore::check_symlinks`]). Hard links,
//! devices and other special entries are refused. Nothing is recorded for an archive that
//! breaks a rule (blobs already stored are unreferenced and age out).
//!
//! An archive is hostile until unpacked, so what it costs is bounded whatever it holds:
//! - memory: every entry streams into the store ([`LocalStore::store_stream`]: at most the
//!   pool threshold in memory, a larger file straight into the pool), and a zip is read in
//!   place from the stored archive (its index is at its end), never copied into memory;
//! - work: empty directories are found from a set of every entry's ancestors, linear in the
//!   entries (a scan per directory took 40 s for 160 000 of them);
//! - size: [`Limits`] caps the unpacked bytes and the entries, checked while unpacking (a zip's
//!   entry count before its index is parsed), so a 3 MB archive of 3 GiB of zeros stops at the
//!   cap instead of filling the disk.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};

use hashing::Digest;
use store::LocalStore;
use store::directory::DirectoryBuilder;

/// Default cap on the bytes one archive unpacks to.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 4 << 30;

/// Default cap on the entries (files, directories, symlinks) of one archive.
pub const DEFAULT_MAX_ENTRIES: u64 = 500_000;

/// What one archive may unpack to; both are checked while unpacking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content, all entries together. Default [`DEFAULT_MAX_UNPACKED_BYTES`].
    pub max_bytes: u64,
    /// Entries of every kind. Default [`DEFAULT_MAX_ENTRIES`].
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: DEFAULT_MAX_UNPACKED_BYTES,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

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
    /// Directory entries, in archive order: kept (empty) unless something lands under them.
    dirs: Vec<String>,
    /// Every file and symlink path and every proper ancestor of any entry: a directory entry
    /// found here holds something (or is taken by a file).
    taken: HashSet<String>,
    entries: u64,
    bytes: u64,
    limits: Limits,
}

impl<'a> Tree<'a> {
    fn new(store: &'a LocalStore, limits: Limits) -> Tree<'a> {
        Tree {
            store,
            builder: DirectoryBuilder::new(store),
            dirs: Vec::new(),
            taken: HashSet::new(),
            entries: 0,
            bytes: 0,
            limits,
        }
    }

    /// Counts one more entry against the cap.
    fn count(&mut self) -> Result<(), ArchiveError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(refuse(format!(
                "it has more than {} entries",
                self.limits.max_entries
            )));
        }
        Ok(())
    }

    /// Marks `path`'s ancestors as holding something (and `path` itself when `itself`). Stops
    /// at the first ancestor already marked (its own ancestors are too): linear overall.
    fn take(&mut self, path: &str, itself: bool) {
        if itself && !self.taken.insert(path.to_owned()) {
            return;
        }
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            if !self.taken.insert(p.to_owned()) {
                break;
            }
        }
    }

    fn dir(&mut self, path: String) -> Result<(), ArchiveError> {
        self.count()?;
        self.take(&path, false);
        self.dirs.push(path);
        Ok(())
    }

    fn file(
        &mut self,
        path: String,
        content: &mut dyn Read,
        exec: bool,
    ) -> Result<(), ArchiveError> {
        self.count()?;
        let left = self.limits.max_bytes.saturating_sub(self.bytes);
        let d = self.store.store_stream(content, left).map_err(|e| {
            if matches!(e.kind(), store::ErrorKind::InvalidData) {
                refuse(format!(
                    "it unpacks to more than {} bytes",
                    self.limits.max_bytes
                ))
            } else {
                refuse(format!("storing entry {path:?}: {e}"))
            }
        })?;
        self.bytes += d.size_bytes;
        self.builder
            .add_file(&path, d, exec)
            .map_err(|e| refuse(format!("entry {path:?}: {e}")))?;
        self.take(&path, true);
        Ok(())
    }

    fn symlink(&mut self, path: String, target: &str) -> Result<(), ArchiveError> {
        self.count()?;
        self.builder
            .add_symlink(&path, target)
            .map_err(|e| refuse(format!("entry {path:?}: {e}")))?;
        self.take(&path, true);
        Ok(())
    }

    fn finish(mut self) -> Result<Digest, ArchiveError> {
        // Directories that hold nothing else are kept, empty.
        let empty = self
            .store
            .store_directory(&Default::default())
            .map_err(|e| refuse(e.to_string()))?;
        for dir in std::mem::take(&mut self.dirs) {
            if self.taken.insert(dir.clone()) {
                self.builder
                    .add_directory(&dir, empty)
                    .map_err(|e| refuse(format!("entry {dir:?}: {e}")))?;
            }
        }
        let root = self.builder.build().map_err(|e| refuse(e.to_string()))?;
        self.store
            .check_symlinks(root)
            .map_err(|e| refuse(format!("a symlink leaves the archive: {e}")))?;
        Ok(root)
    }
}

/// Unpacks the stored archive `archive` of `kind` into the store within `limits`; returns the
/// root Directory's digest.
pub fn unpack(
    store: &LocalStore,
    archive: Digest,
    kind: ArchiveKind,
    limits: Limits,
) -> Result<Digest, ArchiveError> {
    let mut reader = crate::blob_reader(store, archive)
        .map_err(|e| refuse(format!("reading the archive: {e}")))?
        .ok_or_else(|| refuse(format!("the archive {archive} is not in the store")))?;
    let mut tree = Tree::new(store, limits);
    match kind {
        ArchiveKind::Tar => unpack_tar(&mut tree, &mut reader)?,
        ArchiveKind::TarGz => unpack_tar(&mut tree, &mut flate2::read::GzDecoder::new(reader))?,
        ArchiveKind::Zip => unpack_zip(&mut tree, reader)?,
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
            tree.dir(path)?;
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

/// The entry count a zip's end-of-central-directory record declares (the zip64 one when the
/// classic field says "see zip64"), read before the index itself is parsed.
fn zip_declared_entries(r: &mut (impl Read + Seek)) -> Result<u64, ArchiveError> {
    let io = |e: std::io::Error| refuse(format!("reading the zip: {e}"));
    let len = r.seek(SeekFrom::End(0)).map_err(io)?;
    // The record is 22 bytes plus a comment of at most 65 535.
    let tail_len = len.min(22 + 65_535);
    r.seek(SeekFrom::Start(len - tail_len)).map_err(io)?;
    let mut tail = vec![0u8; tail_len as usize];
    r.read_exact(&mut tail).map_err(io)?;
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u64_at = |b: &[u8], i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&p| tail[p..p + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| refuse("not a zip archive: no end of central directory"))?;
    let entries = u16_at(&tail, eocd + 10);
    if entries != 0xFFFF {
        return Ok(u64::from(entries));
    }
    // Zip64: a 20-byte locator right before the record points at the zip64 record.
    let locator = eocd
        .checked_sub(20)
        .filter(|&l| tail[l..l + 4] == [0x50, 0x4b, 0x06, 0x07])
        .ok_or_else(|| refuse("a zip64 archive without its zip64 locator"))?;
    r.seek(SeekFrom::Start(u64_at(&tail, locator + 8)))
        .map_err(io)?;
    let mut record = [0u8; 56];
    r.read_exact(&mut record).map_err(io)?;
    if record[..4] != [0x50, 0x4b, 0x06, 0x06] {
        return Err(refuse("a zip64 locator that points at no zip64 record"));
    }
    Ok(u64_at(&record, 32))
}

fn unpack_zip(tree: &mut Tree<'_>, mut reader: impl Read + Seek) -> Result<(), ArchiveError> {
    let declared = zip_declared_entries(&mut reader)?;
    if declared > tree.limits.max_entries {
        return Err(refuse(format!(
            "it has more than {} entries ({declared})",
            tree.limits.max_entries
        )));
    }
    let mut zip =
        zip::ZipArchive::new(reader).map_err(|e| refuse(format!("not a zip archive: {e}")))?;
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
            tree.dir(path)?;
        } else if mode & 0o170000 == 0o120000 {
            let mut target = String::new();
            (&mut f)
                .take(4096)
                .read_to_string(&mut target)
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

    fn limits(max_bytes: u64) -> Limits {
        Limits {
            max_bytes,
            ..Limits::default()
        }
    }

    /// Stores `archive` and unpacks it.
    fn unpack_bytes(
        store: &LocalStore,
        archive: &[u8],
        kind: ArchiveKind,
        limits: Limits,
    ) -> Result<Digest, ArchiveError> {
        let d = store.store_bytes(archive).unwrap();
        unpack(store, d, kind, limits)
    }

    #[test]
    fn a_tar_unpacks_and_hostile_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
        let good = tar_of(
            &[("pkg/bin/tool", b"#!/bin/sh\n"), ("./pkg/README", b"hi")],
            &[("pkg/link", "README")],
        );
        let root = unpack_bytes(&store, &good, ArchiveKind::Tar, limits(1 << 20)).unwrap();
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
            let e = unpack_bytes(&store, &bad, ArchiveKind::Tar, limits(1 << 20)).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        let big = tar_of(&[("a", &[0u8; 2000])], &[]);
        let e = unpack_bytes(&store, &big, ArchiveKind::Tar, limits(1000)).unwrap_err();
        assert!(e.to_string().contains("more than 1000 bytes"), "{e}");
    }

    fn dir_tar(dirs: &[String]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for d in dirs {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o755);
            b.append_data(&mut h, format!("{d}/"), std::io::empty())
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn entries_past_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
        let dirs: Vec<String> = (0..11).map(|i| format!("d{i}")).collect();
        let tar = dir_tar(&dirs);
        let capped = Limits {
            max_entries: 10,
            ..Limits::default()
        };
        let e = unpack_bytes(&store, &tar, ArchiveKind::Tar, capped).unwrap_err();
        assert!(e.to_string().contains("more than 10 entries"), "{e}");
        let ok = Limits {
            max_entries: 11,
            ..Limits::default()
        };
        unpack_bytes(&store, &tar, ArchiveKind::Tar, ok).unwrap();

        // A zip says how many entries it has before its index is parsed.
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for i in 0..11 {
            zip.add_directory(format!("z{i}/"), zip::write::SimpleFileOptions::default())
                .unwrap();
        }
        let zip = zip.finish().unwrap().into_inner();
        let e = unpack_bytes(&store, &zip, ArchiveKind::Zip, capped).unwrap_err();
        assert!(e.to_string().contains("more than 10 entries (11)"), "{e}");
        let root = unpack_bytes(&store, &zip, ArchiveKind::Zip, ok).unwrap();
        let tree = store.build_tree(root).unwrap();
        assert_eq!(tree.root.unwrap().directories.len(), 11);
    }

    /// Empty directories were found by scanning every path for each directory: 160 000 of
    /// them took 40 s of CPU. Now it is one set lookup each; a deadline, not a timing claim.
    #[test]
    fn many_empty_directories_unpack_in_linear_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(store::LocalStoreOptions::new(dir.path())).unwrap();
        let mut dirs = Vec::new();
        for i in 0..40 {
            dirs.push(format!("top{i}"));
            for j in 0..2000 {
                dirs.push(format!("top{i}/sub{i}_{j}"));
            }
        }
        let tar = dir_tar(&dirs);
        let d = store.store_bytes(&tar).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        drop(store);
        std::thread::spawn(move || {
            let store = LocalStore::open(store::LocalStoreOptions::new(path)).unwrap();
            let root = unpack(&store, d, ArchiveKind::Tar, Limits::default());
            let _ = tx.send(root.map(|r| store.build_tree(r).unwrap()));
        });
        let tree = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            // ≈ 2.5 s in a debug build; a scan per directory is ≈ 3 × 10⁹ comparisons here.
            .expect("80 040 directory entries unpack well within 30 s")
            .unwrap();
        assert_eq!(tree.root.unwrap().directories.len(), 40);
        assert_eq!(
            tree.children.len(),
            41,
            "40 tops and the one empty directory"
        );
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
