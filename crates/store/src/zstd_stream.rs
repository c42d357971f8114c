//! Streaming zstd decoding into a [`LoadDestination`], for compressed downloads. Concatenated
//! frames (as servers send them, one per chunk) decode as one stream.

use tokio::io::AsyncWriteExt;

use crate::destination::LoadDestination;
use crate::error::{ErrorKind, StoreError};

/// Decoded bytes held at most at once.
const ZSTD_OUT_BUFFER: usize = 1024 * 1024;

/// Streaming zstd decoder with a bounded output buffer: a hostile stream cannot make it hold more
/// than `ZSTD_OUT_BUFFER` bytes, and the destination refuses anything past the expected size.
pub struct ZstdStream {
    decoder: zstd::stream::raw::Decoder<'static>,
    out: Vec<u8>,
}

impl ZstdStream {
    /// A decoder ready for the first frame.
    pub fn new() -> Result<ZstdStream, StoreError> {
        Ok(ZstdStream {
            decoder: zstd::stream::raw::Decoder::new()
                .map_err(|e| StoreError::new(ErrorKind::Other, format!("zstd decoder: {e}")))?,
            out: vec![0u8; ZSTD_OUT_BUFFER],
        })
    }

    /// Decodes `input` (any amount, any frame boundaries) into `dest`.
    pub async fn feed(
        &mut self,
        mut input: &[u8],
        dest: &mut dyn LoadDestination,
    ) -> std::io::Result<()> {
        use zstd::stream::raw::Operation;
        let bad = |e: std::io::Error| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("undecodable zstd stream: {e}"),
            )
        };
        loop {
            let status = self
                .decoder
                .run_on_buffers(input, &mut self.out)
                .map_err(bad)?;
            input = &input[status.bytes_read..];
            if status.bytes_written > 0 {
                dest.write_all(&self.out[..status.bytes_written]).await?;
            }
            if input.is_empty() && status.bytes_written < self.out.len() {
                return Ok(());
            }
        }
    }

    /// Flushes what the decoder still holds.
    pub async fn finish(&mut self, dest: &mut dyn LoadDestination) -> std::io::Result<()> {
        self.feed(&[], dest).await
    }
}
