//! Streaming a stored blob out as bounded chunks, read from disk as the client consumes them.

use std::io::SeekFrom;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use medfl_proto::v1;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::state::{Shared, Traffic};
use crate::CoordinatorError;

/// Chunks read ahead of the client.
const READ_AHEAD: usize = 4;

/// A stream of `BlobChunk`s of blob `id` from `offset`, each at most the configured chunk size.
/// Bytes sent are added to `traffic` when given.
pub fn blob_stream(
    shared: &Arc<Shared>,
    id: &str,
    offset: u64,
    traffic: Option<Arc<Traffic>>,
) -> Result<ReceiverStream<Result<v1::BlobChunk, Status>>, CoordinatorError> {
    let path = shared.blobs.path(id)?;
    let total = shared.blobs.size(id)?;
    file_stream(shared, path, total, id, offset, traffic)
}

/// [`blob_stream`] of any file of `total` bytes, named `id` in errors.
pub fn file_stream(
    shared: &Arc<Shared>,
    path: std::path::PathBuf,
    total: u64,
    id: &str,
    offset: u64,
    traffic: Option<Arc<Traffic>>,
) -> Result<ReceiverStream<Result<v1::BlobChunk, Status>>, CoordinatorError> {
    if offset > total {
        return Err(CoordinatorError::Invalid(format!(
            "offset {offset} is past the end of the {total}-byte blob"
        )));
    }
    let chunk = shared.config.chunk_size as usize;
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let id = id.to_string();
    tokio::spawn(async move {
        let result: Result<(), CoordinatorError> = async {
            let mut file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| CoordinatorError::io(format!("opening blob {id}"), e))?;
            file.seek(SeekFrom::Start(offset))
                .await
                .map_err(|e| CoordinatorError::io(format!("seeking blob {id}"), e))?;
            let mut pos = offset;
            let mut first = true;
            while pos < total || first {
                let want = chunk.min((total - pos) as usize);
                let mut data = vec![0u8; want];
                file.read_exact(&mut data)
                    .await
                    .map_err(|e| CoordinatorError::io(format!("reading blob {id}"), e))?;
                let msg = v1::BlobChunk {
                    offset: pos,
                    data,
                    total_size: if first { total } else { 0 },
                };
                pos += want as u64;
                first = false;
                if tx.send(Ok(msg)).await.is_err() {
                    // The client went away.
                    return Ok(());
                }
                if let Some(t) = &traffic {
                    t.down.fetch_add(want as u64, Ordering::Relaxed);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e.into())).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}
