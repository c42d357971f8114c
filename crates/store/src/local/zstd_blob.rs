//! Pool files compressed at rest (`PoolCompression::Zstd`, what `recache serve` uses).
//!
//! A file is a valid `.zst` stream that explains itself:
//!
//! ```text
//! [zstd frame: logical bytes 0 .. 1 MiB) [frame: 1 MiB .. 2 MiB) … [last frame]
//! [skippable frame 0x184D2A5E: offsets of every frame (u64 LE each), end of the last frame,
//!                              chunk size u32, chunk count u32, logical size u64, "RCZ1"]
//! ```
//!
//! Every chunk is an independent frame, so a read at any offset decodes at most the chunks it
//! touches, never the file from the start; the seek table rides in a skippable frame at the end
//! (any zstd decoder skips it, so `zstd -d` on the file gives the blob back, and a client
//! asking for `compressed-blobs/zstd/…` from offset 0 gets the stored bytes without a
//! recompress). The table is at the end so a writer streams without knowing the size first;
//! its fixed-size tail (the last 20 bytes) says how long it is. The logical size is also in the
//! file name (`<hash>-<size>`), so nothing is opened to learn it.
//!
//! A blob whose first megabyte does not compress (already compressed archives, images, random
//! data) is stored plain instead: no frames, no table, exactly its bytes. Compressing it again
//! would cost time on every write and read for nothing.
//!
//! Which of the two a file is, is recorded in its name when it is committed (`<hash>-<size>.zst`
//! for frames, `<hash>-<size>` for plain; see [`super::pool::Stored`]) and never guessed from
//! its bytes: a plain blob is whatever a client uploaded, and a client can upload bytes that end
//! in a perfectly valid seek table. [`Layout::open`] takes the recorded kind and checks the file
//! against it (a plain file must have the blob's length; a framed one a table of the blob's
//! size whose every frame decodes to exactly its share).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

pub(crate) use super::pool::Stored;

/// Logical bytes per frame.
pub(crate) const CHUNK_BYTES: usize = 1024 * 1024;
/// zstd level at rest: level 1 compresses source ≈ 5× at ≈ 0.35 GB/s here.
const LEVEL: i32 = 1;
/// Skippable-frame magic (any of 0x184D2A50..=0x184D2A5F).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Marks the seek table's tail.
const TABLE_MAGIC: &[u8; 4] = b"RCZ1";
/// chunk size u32 + chunk count u32 + logical size u64 + magic.
const TAIL_BYTES: usize = 4 + 4 + 8 + 4;

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// A first chunk that compresses to more than this fraction (in 1/32) is stored plain.
const PLAIN_ABOVE_32THS: usize = 30;

/// Compresses what is written into 1 MiB frames, then appends the seek table on `finish`; or,
/// if the first chunk does not compress, writes everything plain.
#[derive(Debug)]
pub(crate) struct Writer<W: Write> {
    out: W,
    /// Decided at the first full (or final) chunk: `Some(true)` = plain passthrough.
    plain: Option<bool>,
    chunk: Vec<u8>,
    /// File offset where each frame starts.
    offsets: Vec<u64>,
    written: u64,
    logical: u64,
}

impl<W: Write> Writer<W> {
    pub(crate) fn new(out: W) -> Writer<W> {
        Writer {
            out,
            plain: None,
            chunk: Vec::with_capacity(CHUNK_BYTES),
            offsets: Vec::new(),
            written: 0,
            logical: 0,
        }
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let frame = zstd::bulk::compress(&self.chunk, LEVEL)?;
        if self.plain.is_none() {
            let plain = frame.len() * 32 > self.chunk.len() * PLAIN_ABOVE_32THS;
            self.plain = Some(plain);
        }
        if self.plain == Some(true) {
            self.out.write_all(&self.chunk)?;
            self.written += self.chunk.len() as u64;
            self.chunk.clear();
            return Ok(());
        }
        self.offsets.push(self.written);
        self.out.write_all(&frame)?;
        self.written += frame.len() as u64;
        self.chunk.clear();
        Ok(())
    }

    /// Writes the last frame and the seek table; returns the inner writer and how the blob was
    /// stored (which the caller records in the file's name).
    pub(crate) fn finish(mut self) -> io::Result<(W, Stored)> {
        self.flush_chunk()?;
        if self.plain == Some(true) {
            self.out.flush()?;
            return Ok((self.out, Stored::Plain));
        }
        let mut payload = Vec::with_capacity(8 * (self.offsets.len() + 1) + TAIL_BYTES);
        for o in &self.offsets {
            payload.extend_from_slice(&o.to_le_bytes());
        }
        payload.extend_from_slice(&self.written.to_le_bytes());
        payload.extend_from_slice(&(CHUNK_BYTES as u32).to_le_bytes());
        let count = u32::try_from(self.offsets.len()).map_err(|_| bad("too many chunks"))?;
        payload.extend_from_slice(&count.to_le_bytes());
        payload.extend_from_slice(&self.logical.to_le_bytes());
        payload.extend_from_slice(TABLE_MAGIC);
        self.out.write_all(&SKIPPABLE_MAGIC.to_le_bytes())?;
        let len = u32::try_from(payload.len()).map_err(|_| bad("seek table too large"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&payload)?;
        self.out.flush()?;
        Ok((self.out, Stored::Frames))
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.plain == Some(true) {
            // Decided: plain. Straight through.
            self.out.write_all(buf)?;
            self.written += buf.len() as u64;
            self.logical += buf.len() as u64;
            return Ok(buf.len());
        }
        let n = buf.len().min(CHUNK_BYTES - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..n]);
        self.logical += n as u64;
        if self.chunk.len() == CHUNK_BYTES {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A compressed pool file's seek table.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    /// Start of each frame, then the end of the last one.
    bounds: Vec<u64>,
    chunk: u64,
    /// The blob's size.
    pub logical: u64,
}

impl Table {
    /// Reads the table from the end of `file`, checking it against `expected_logical`.
    pub(crate) fn read(file: &mut File, expected_logical: u64) -> io::Result<Table> {
        let len = file.seek(SeekFrom::End(0))?;
        if len < (TAIL_BYTES + 8) as u64 {
            return Err(bad("too short for a seek table"));
        }
        let mut tail = [0u8; TAIL_BYTES];
        file.seek(SeekFrom::End(-(TAIL_BYTES as i64)))?;
        file.read_exact(&mut tail)?;
        if &tail[16..20] != TABLE_MAGIC {
            return Err(bad("no recache seek table (not a compressed pool file)"));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([tail[i], tail[i + 1], tail[i + 2], tail[i + 3]]);
        let chunk = u64::from(u32_at(0));
        let count = u64::from(u32_at(4));
        let mut logical = [0u8; 8];
        logical.copy_from_slice(&tail[8..16]);
        let logical = u64::from_le_bytes(logical);
        if logical != expected_logical || chunk == 0 || count != logical.div_ceil(chunk) {
            return Err(bad(format!(
                "seek table says {logical} bytes in {count} chunks of {chunk}; expected {expected_logical}"
            )));
        }
        let table_bytes = 8 * (count + 1);
        if len < table_bytes + TAIL_BYTES as u64 + 8 {
            return Err(bad("truncated seek table"));
        }
        let mut raw = vec![0u8; usize::try_from(table_bytes).map_err(|_| bad("huge table"))?];
        file.seek(SeekFrom::End(-((table_bytes + TAIL_BYTES as u64) as i64)))?;
        file.read_exact(&mut raw)?;
        let bounds: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                u64::from_le_bytes(a)
            })
            .collect();
        if bounds.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad("seek table offsets go backwards"));
        }
        Ok(Table {
            bounds,
            chunk,
            logical,
        })
    }

    /// Decodes chunk `i` (verified to be exactly its logical length).
    fn chunk(&self, file: &mut File, i: usize) -> io::Result<Vec<u8>> {
        let (start, end) = (self.bounds[i], self.bounds[i + 1]);
        let mut frame = vec![0u8; usize::try_from(end - start).map_err(|_| bad("huge frame"))?];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut frame)?;
        let want = (self.logical - i as u64 * self.chunk).min(self.chunk);
        let data = zstd::bulk::decompress(&frame, want as usize)?;
        if data.len() as u64 != want {
            return Err(bad(format!(
                "chunk {i} decodes to {} bytes, not {want}",
                data.len()
            )));
        }
        Ok(data)
    }

    /// Logical bytes `offset .. offset + len` (clipped to the blob), decoding only the chunks
    /// they fall in.
    pub(crate) fn read_range(&self, file: &mut File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.logical);
        let mut out = Vec::with_capacity(usize::try_from(end.saturating_sub(offset)).unwrap_or(0));
        let mut pos = offset;
        while pos < end {
            let i = (pos / self.chunk) as usize;
            let data = self.chunk(file, i)?;
            let from = (pos - i as u64 * self.chunk) as usize;
            let to = ((end - i as u64 * self.chunk) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
            pos = i as u64 * self.chunk + to as u64;
        }
        Ok(out)
    }
}

/// How one file of a compressed pool is laid out.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// Frames and a seek table.
    Frames(Table),
    /// The blob's bytes as they are (it did not compress).
    Plain,
}

impl Layout {
    /// Reads the layout of `file`, which was committed as `stored` and must hold a blob of
    /// `logical` bytes. A file that does not match what was recorded is `InvalidData`: frames
    /// without a table of that size, or a plain file of another length.
    pub(crate) fn open(file: &mut File, logical: u64, stored: Stored) -> io::Result<Layout> {
        match stored {
            Stored::Frames => Table::read(file, logical).map(Layout::Frames),
            Stored::Plain => {
                let len = file.seek(SeekFrom::End(0))?;
                if len == logical {
                    Ok(Layout::Plain)
                } else {
                    Err(bad(format!(
                        "a plain blob of {logical} bytes is stored as {len} bytes"
                    )))
                }
            }
        }
    }

    /// Logical bytes `offset .. offset + len`, clipped to the blob.
    pub(crate) fn read_range(
        &self,
        file: &mut File,
        logical: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<u8>> {
        match self {
            Layout::Frames(t) => t.read_range(file, offset, len),
            Layout::Plain => {
                let end = offset.saturating_add(len).min(logical);
                let mut buf = vec![0u8; usize::try_from(end.saturating_sub(offset)).unwrap_or(0)];
                file.seek(SeekFrom::Start(offset))?;
                file.read_exact(&mut buf)?;
                Ok(buf)
            }
        }
    }
}

/// Streams every logical byte of a pool file committed as `stored` into `out`, one chunk at a
/// time.
pub(crate) fn decode_into(
    file: &mut File,
    logical: u64,
    stored: Stored,
    out: &mut dyn Write,
) -> io::Result<()> {
    match Layout::open(file, logical, stored)? {
        Layout::Frames(table) => {
            for i in 0..table.bounds.len().saturating_sub(1) {
                out.write_all(&table.chunk(file, i)?)?;
            }
        }
        Layout::Plain => {
            file.seek(SeekFrom::Start(0))?;
            io::copy(&mut file.take(logical), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let mut i = 0u64;
        while v.len() < len {
            v.extend_from_slice(format!("fn item_{i}() -> u64 {{ {i} }}\n").as_bytes());
            i += 1;
        }
        v.truncate(len);
        v
    }

    fn store(data: &[u8]) -> (tempfile::NamedTempFile, File, Stored) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = Writer::new(f.reopen().unwrap());
        // Odd write sizes, so chunk boundaries fall inside writes.
        for part in data.chunks(300_007) {
            w.write_all(part).unwrap();
        }
        let (_, stored) = w.finish().unwrap();
        let file = f.reopen().unwrap();
        (f, file, stored)
    }

    #[test]
    fn a_compressed_file_is_plain_zstd_and_reads_at_any_offset() {
        let data = text(3 * CHUNK_BYTES + 12_345);
        let (tmp, mut file, stored) = store(&data);
        assert_eq!(stored, Stored::Frames);
        // Any zstd decoder gives the blob back (the seek table is a skippable frame).
        let raw = std::fs::read(tmp.path()).unwrap();
        assert_eq!(zstd::stream::decode_all(&raw[..]).unwrap(), data);
        assert!(
            raw.len() < data.len() / 3,
            "source compresses: {} of {}",
            raw.len(),
            data.len()
        );
        let table = Table::read(&mut file, data.len() as u64).unwrap();
        for (offset, len) in [
            (0, 10),
            (CHUNK_BYTES as u64 - 5, 10),
            (2 * CHUNK_BYTES as u64, CHUNK_BYTES as u64),
            (3 * CHUNK_BYTES as u64 + 12_000, 1000),
            (17, 3 * CHUNK_BYTES as u64),
        ] {
            let got = table.read_range(&mut file, offset, len).unwrap();
            let end = (offset + len).min(data.len() as u64) as usize;
            assert_eq!(
                got,
                &data[offset as usize..end],
                "offset {offset} len {len}"
            );
        }
        let mut all = Vec::new();
        decode_into(&mut file, data.len() as u64, Stored::Frames, &mut all).unwrap();
        assert_eq!(all, data);
    }

    #[test]
    fn a_blob_that_does_not_compress_is_stored_plain() {
        let data = testutil::data::pseudo_random(2 * CHUNK_BYTES + 77, 5);
        let (tmp, mut file, stored) = store(&data);
        assert_eq!(stored, Stored::Plain);
        assert_eq!(
            std::fs::read(tmp.path()).unwrap(),
            data,
            "exactly its bytes"
        );
        let layout = Layout::open(&mut file, data.len() as u64, Stored::Plain).unwrap();
        assert!(matches!(layout, Layout::Plain));
        let got = layout
            .read_range(&mut file, data.len() as u64, CHUNK_BYTES as u64 - 3, 10)
            .unwrap();
        assert_eq!(got, &data[CHUNK_BYTES - 3..CHUNK_BYTES + 7]);
        let mut all = Vec::new();
        decode_into(&mut file, data.len() as u64, Stored::Plain, &mut all).unwrap();
        assert_eq!(all, data);
        let wrong_size = Layout::open(&mut file, data.len() as u64 + 1, Stored::Plain);
        assert_eq!(wrong_size.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    /// A plain blob is whatever a client sent: bytes that end in a well-formed seek table are
    /// still read as themselves, because the layout comes from the name, not the bytes.
    #[test]
    fn a_plain_blob_that_ends_in_a_seek_table_reads_as_itself() {
        let data = testutil::data::forged_framed_blob(CHUNK_BYTES);
        let (_tmp, mut file, stored) = store(&data);
        assert_eq!(stored, Stored::Plain, "random bytes do not compress");
        assert!(
            Table::read(&mut file, data.len() as u64).is_ok(),
            "the forgery does carry a valid table"
        );
        let mut all = Vec::new();
        decode_into(&mut file, data.len() as u64, stored, &mut all).unwrap();
        assert_eq!(all, data);
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let data = text(CHUNK_BYTES + 10);
        let (tmp, mut file, _) = store(&data);
        assert!(
            Table::read(&mut file, data.len() as u64 + 1).is_err(),
            "wrong size"
        );
        let mut raw = std::fs::read(tmp.path()).unwrap();
        raw.truncate(raw.len() - 3);
        std::fs::write(tmp.path(), &raw).unwrap();
        let mut file = tmp.reopen().unwrap();
        assert!(
            Table::read(&mut file, data.len() as u64).is_err(),
            "truncated"
        );
        std::fs::write(tmp.path(), &data).unwrap();
        let mut file = tmp.reopen().unwrap();
        assert!(
            Table::read(&mut file, data.len() as u64).is_err(),
            "not compressed"
        );
    }
}
