//! The coordinator's side of aggregation: models stored as blobs, read and written a block of
//! coordinates at a time for [`medfl_core::aggregator::Aggregator`], so memory is bounded by a
//! block per update (robust strategies) or the running sums (FedAvg and the server optimizers),
//! whatever the number of sites.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use medfl_core::aggregator::{Aggregator, BlockSource, ModelSink, Output, RoundStart};
use medfl_core::safetensors::{header, parse_header, MAX_HEADER_BYTES};
use medfl_core::validate::match_layout;
use medfl_core::{CoreError, ModelSchema};

use crate::blobs::{BlobStore, Incoming};
use crate::CoordinatorError;

/// Random access to the F32 values of a stored safetensors blob, by schema tensor.
pub struct BlobReader {
    file: File,
    path: std::path::PathBuf,
    /// Absolute byte offset of each schema tensor's first value.
    starts: Vec<u64>,
    bytes: Vec<u8>,
}

impl BlobReader {
    /// Opens `path`, checking that its tensors are exactly `schema`'s.
    pub fn open(path: &Path, schema: &ModelSchema) -> Result<Self, CoordinatorError> {
        let io = |e| CoordinatorError::io(format!("reading {}", path.display()), e);
        let mut file = File::open(path).map_err(io)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io)?;
        let header_len = u64::from_le_bytes(len);
        if header_len == 0 || header_len > MAX_HEADER_BYTES {
            return Err(CoreError::Format(format!(
                "{}: header length {header_len} is outside 1..={MAX_HEADER_BYTES}",
                path.display()
            ))
            .into());
        }
        let mut json = vec![0u8; header_len as usize];
        file.read_exact(&mut json).map_err(io)?;
        let named = |e: CoreError| CoordinatorError::Invalid(format!("{}: {e}", path.display()));
        let layout = parse_header(&json).map_err(named)?;
        let map = match_layout(schema, &layout).map_err(named)?;
        let mut starts = vec![0u64; schema.tensors.len()];
        for (entry, &idx) in layout.tensors.iter().zip(&map) {
            starts[idx] = 8 + header_len + entry.start;
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            starts,
            bytes: Vec::new(),
        })
    }

    /// Reads `out.len()` values of schema tensor `tensor` from element `offset`.
    pub fn read(
        &mut self,
        tensor: usize,
        offset: usize,
        out: &mut [f32],
    ) -> Result<(), CoordinatorError> {
        let at = self.starts[tensor] + offset as u64 * 4;
        self.bytes.resize(out.len() * 4, 0);
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.read_exact(&mut self.bytes))
            .map_err(|e| CoordinatorError::io(format!("reading {}", self.path.display()), e))?;
        for (o, b) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}

impl BlockSource for BlobReader {
    type Error = CoordinatorError;

    fn read(
        &mut self,
        tensor: usize,
        offset: usize,
        out: &mut [f32],
    ) -> Result<(), CoordinatorError> {
        BlobReader::read(self, tensor, offset, out)
    }
}

/// A stored model opened (and its header checked) at its first read, so a model the aggregator
/// never reads (an update held for the close, the global model without a norm bound) costs no
/// I/O.
pub struct BlobSource {
    path: PathBuf,
    schema: Arc<ModelSchema>,
    reader: Option<BlobReader>,
}

impl BlobSource {
    /// The model stored at `path`, whose tensors must be `schema`'s.
    pub fn new(path: PathBuf, schema: Arc<ModelSchema>) -> Self {
        Self {
            path,
            schema,
            reader: None,
        }
    }
}

impl BlockSource for BlobSource {
    type Error = CoordinatorError;

    fn read(
        &mut self,
        tensor: usize,
        offset: usize,
        out: &mut [f32],
    ) -> Result<(), CoordinatorError> {
        let reader = match &mut self.reader {
            Some(reader) => reader,
            none => none.insert(BlobReader::open(&self.path, &self.schema)?),
        };
        reader.read(tensor, offset, out)
    }
}

/// A safetensors blob being written tensor by tensor in schema order.
pub struct ModelWriter {
    incoming: Incoming,
    bytes: Vec<u8>,
}

impl ModelWriter {
    /// Starts a blob holding `schema`'s tensors.
    pub fn new(blobs: &BlobStore, schema: &ModelSchema) -> Result<Self, CoordinatorError> {
        let mut incoming = blobs.incoming()?;
        incoming.write(&header(schema))?;
        Ok(Self {
            incoming,
            bytes: Vec::new(),
        })
    }

    /// Appends the next values.
    pub fn write(&mut self, values: &[f32]) -> Result<(), CoordinatorError> {
        self.bytes.clear();
        for v in values {
            self.bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.incoming.write(&self.bytes)
    }

    /// Stores the blob; returns its id.
    pub fn finish(self) -> Result<String, CoordinatorError> {
        self.incoming.finish(None)
    }
}

/// The blobs a round's aggregation wrote, each pinned until its owner is recorded.
pub struct Aggregated {
    /// The new global model.
    pub global: String,
    /// First-moment (or momentum) state, if the strategy's optimizer keeps one.
    pub m: Option<String>,
    /// Second-moment state, if the strategy's optimizer keeps one.
    pub v: Option<String>,
}

/// A [`ModelSink`] writing each output the aggregator starts to a new blob.
pub struct BlobOutputs<'a> {
    blobs: &'a BlobStore,
    schema: &'a ModelSchema,
    global: Option<ModelWriter>,
    m: Option<ModelWriter>,
    v: Option<ModelWriter>,
}

impl<'a> BlobOutputs<'a> {
    /// No outputs yet; they go to `blobs`, as models of `schema`.
    pub fn new(blobs: &'a BlobStore, schema: &'a ModelSchema) -> Self {
        Self {
            blobs,
            schema,
            global: None,
            m: None,
            v: None,
        }
    }

    fn slot(&mut self, output: Output) -> &mut Option<ModelWriter> {
        match output {
            Output::Global => &mut self.global,
            Output::FirstMoment => &mut self.m,
            Output::SecondMoment => &mut self.v,
        }
    }

    /// Stores the written outputs (global model first); returns their ids.
    pub fn finish(self) -> Result<Aggregated, CoordinatorError> {
        let global = self.global.ok_or_else(|| {
            CoordinatorError::Internal("aggregation wrote no global model".into())
        })?;
        Ok(Aggregated {
            global: global.finish()?,
            m: self.m.map(ModelWriter::finish).transpose()?,
            v: self.v.map(ModelWriter::finish).transpose()?,
        })
    }
}

impl ModelSink for BlobOutputs<'_> {
    type Error = CoordinatorError;

    fn start(&mut self, output: Output) -> Result<(), CoordinatorError> {
        let writer = ModelWriter::new(self.blobs, self.schema)?;
        *self.slot(output) = Some(writer);
        Ok(())
    }

    fn write(&mut self, output: Output, values: &[f32]) -> Result<(), CoordinatorError> {
        self.slot(output)
            .as_mut()
            .ok_or_else(|| {
                CoordinatorError::Internal(format!("{output:?} written before it started"))
            })?
            .write(values)
    }
}

/// Finishes `aggregator`'s round into new blobs: the global model and, for server optimizers,
/// their new state. `held` are the updates it asked to hold, in admission order.
pub fn finish<S>(
    aggregator: Aggregator,
    start: RoundStart<'_, S>,
    held: &mut [S],
    blobs: &BlobStore,
    schema: &ModelSchema,
) -> Result<Aggregated, CoordinatorError>
where
    S: BlockSource<Error = CoordinatorError>,
{
    let mut outputs = BlobOutputs::new(blobs, schema);
    aggregator.finish(start, held, &mut outputs)?;
    outputs.finish()
}
