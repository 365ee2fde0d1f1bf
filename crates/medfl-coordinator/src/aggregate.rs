//! Aggregation from disk. Updates stay in their blobs and are read back a block of coordinates
//! at a time, so memory is bounded by a block per update (robust strategies) or the running sums
//! (FedAvg and the server optimizers), whatever the number of sites.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use medfl_core::fedavg::FedAvg;
use medfl_core::safetensors::{header, parse_header, MAX_HEADER_BYTES};
use medfl_core::spec::StrategySpec;
use medfl_core::strategy::robust::{
    bulyan_block, bulyan_select, krum_select, median_block, trimmed_mean_block,
    weighted_mean_block, PairwiseDistances,
};
use medfl_core::strategy::server_opt::ServerOptimizer;
use medfl_core::validate::match_layout;
use medfl_core::{CoreError, ModelSchema};

use crate::blobs::{BlobStore, Incoming};
use crate::CoordinatorError;

/// Coordinates read at once from each file.
pub const BLOCK: usize = 1 << 16;

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

/// Calls `f(tensor, offset, len)` for every block of every tensor, in schema order.
pub fn for_each_block(
    schema: &ModelSchema,
    mut f: impl FnMut(usize, usize, usize) -> Result<(), CoordinatorError>,
) -> Result<(), CoordinatorError> {
    for (t, spec) in schema.tensors.iter().enumerate() {
        let n = spec.numel();
        let mut offset = 0;
        while offset < n {
            let len = BLOCK.min(n - offset);
            f(t, offset, len)?;
            offset += len;
        }
    }
    Ok(())
}

/// An accepted update as aggregation sees it: its values, optionally clipped towards the global
/// model (`global + scale * (update - global)`), and its example count.
pub struct UpdateSource {
    reader: BlobReader,
    /// The global model and the clipping factor, when the update was clipped.
    clip: Option<(BlobReader, f32)>,
    scratch: Vec<f32>,
    /// Example count.
    pub weight: f64,
}

impl UpdateSource {
    /// An update stored at `path`; with `clip`, the global model it is clipped towards and the
    /// factor.
    pub fn open(
        path: &Path,
        schema: &ModelSchema,
        weight: f64,
        clip: Option<(&Path, f32)>,
    ) -> Result<Self, CoordinatorError> {
        let clip = match clip {
            Some((global, scale)) if scale < 1.0 => {
                Some((BlobReader::open(global, schema)?, scale))
            }
            _ => None,
        };
        Ok(Self {
            reader: BlobReader::open(path, schema)?,
            clip,
            scratch: Vec::new(),
            weight,
        })
    }

    /// Reads a block of the (possibly clipped) update.
    fn read(
        &mut self,
        tensor: usize,
        offset: usize,
        out: &mut [f32],
    ) -> Result<(), CoordinatorError> {
        self.reader.read(tensor, offset, out)?;
        if let Some((global, scale)) = self.clip.as_mut() {
            self.scratch.resize(out.len(), 0.0);
            global.read(tensor, offset, &mut self.scratch)?;
            for (u, g) in out.iter_mut().zip(self.scratch.iter()) {
                *u = g + *scale * (*u - g);
            }
        }
        Ok(())
    }
}

/// The L2 norm of `update - global`.
pub fn distance(
    update: &mut BlobReader,
    global: &mut BlobReader,
    schema: &ModelSchema,
) -> Result<f64, CoordinatorError> {
    let (mut u, mut g) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    let mut sum = 0f64;
    for_each_block(schema, |t, offset, len| {
        update.read(t, offset, &mut u[..len])?;
        global.read(t, offset, &mut g[..len])?;
        sum += u[..len]
            .iter()
            .zip(&g[..len])
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>();
        Ok(())
    })?;
    Ok(sum.sqrt())
}

/// Adds an update to the running sums.
pub fn fold(
    acc: &mut FedAvg,
    update: &mut UpdateSource,
    schema: &ModelSchema,
) -> Result<(), CoordinatorError> {
    let mut block = vec![0f32; BLOCK];
    let weight = update.weight;
    for_each_block(schema, |t, offset, len| {
        update.read(t, offset, &mut block[..len])?;
        acc.add_values(t, offset, &block[..len], weight)?;
        Ok(())
    })?;
    acc.count(weight);
    Ok(())
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

/// Runs a robust strategy over every update of a round and writes the new global model.
pub fn robust(
    strategy: &StrategySpec,
    updates: &mut [UpdateSource],
    schema: &ModelSchema,
    blobs: &BlobStore,
) -> Result<String, CoordinatorError> {
    let n = updates.len();
    if n == 0 {
        return Err(CoreError::Empty.into());
    }
    let mut rows = vec![vec![0f32; BLOCK]; n];
    let read_rows = |updates: &mut [UpdateSource],
                     rows: &mut Vec<Vec<f32>>,
                     t: usize,
                     offset: usize,
                     len: usize|
     -> Result<(), CoordinatorError> {
        for (u, row) in updates.iter_mut().zip(rows.iter_mut()) {
            u.read(t, offset, &mut row[..len])?;
        }
        Ok(())
    };
    // Krum-style strategies first choose updates by their pairwise distances.
    let selected: Vec<usize> = match strategy {
        StrategySpec::Krum { f }
        | StrategySpec::MultiKrum { f, .. }
        | StrategySpec::Bulyan { f } => {
            let mut d = PairwiseDistances::new(n);
            for_each_block(schema, |t, offset, len| {
                read_rows(updates, &mut rows, t, offset, len)?;
                let views: Vec<&[f32]> = rows.iter().map(|r| &r[..len]).collect();
                d.add_block(&views);
                Ok(())
            })?;
            let f = *f as usize;
            match strategy {
                StrategySpec::Krum { .. } => krum_select(&d, f, 0)?,
                StrategySpec::MultiKrum { keep, .. } => krum_select(&d, f, *keep as usize)?,
                _ => bulyan_select(&d, f)?,
            }
        }
        _ => (0..n).collect(),
    };
    let weights: Vec<f64> = selected.iter().map(|&i| updates[i].weight).collect();
    let mut writer = ModelWriter::new(blobs, schema)?;
    let mut out = vec![0f32; BLOCK];
    for_each_block(schema, |t, offset, len| {
        read_rows(updates, &mut rows, t, offset, len)?;
        let views: Vec<&[f32]> = selected.iter().map(|&i| &rows[i][..len]).collect();
        let out = &mut out[..len];
        match strategy {
            StrategySpec::Median => median_block(&views, out),
            StrategySpec::TrimmedMean { beta } => trimmed_mean_block(&views, *beta, out)?,
            StrategySpec::Krum { .. } => out.copy_from_slice(views[0]),
            StrategySpec::MultiKrum { .. } => weighted_mean_block(&views, &weights, out),
            StrategySpec::Bulyan { f } => bulyan_block(&views, *f as usize, out)?,
            other => {
                return Err(CoordinatorError::Internal(format!(
                    "{other:?} is not a robust strategy"
                )))
            }
        }
        writer.write(out)
    })?;
    writer.finish()
}

/// The server optimizer's state files after a step: new global model, first and second moments.
pub struct ServerStep {
    /// The new global model.
    pub global: String,
    /// First-moment (or momentum) state, if the optimizer keeps one.
    pub m: Option<String>,
    /// Second-moment state, if the optimizer keeps one.
    pub v: Option<String>,
}

/// One server-optimizer step (step number `t`, from 1) from the round's FedAvg sums.
#[allow(clippy::too_many_arguments)]
pub fn server_step(
    opt: &ServerOptimizer,
    t: u64,
    acc: &FedAvg,
    global: &mut BlobReader,
    mut m_prev: Option<BlobReader>,
    mut v_prev: Option<BlobReader>,
    schema: &ModelSchema,
    blobs: &BlobStore,
) -> Result<ServerStep, CoordinatorError> {
    let mut x_out = ModelWriter::new(blobs, schema)?;
    let mut m_out = opt
        .uses_first_moment()
        .then(|| ModelWriter::new(blobs, schema))
        .transpose()?;
    let mut v_out = opt
        .uses_second_moment()
        .then(|| ModelWriter::new(blobs, schema))
        .transpose()?;
    let (mut x, mut avg) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    let (mut m, mut v) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    for_each_block(schema, |tensor, offset, len| {
        global.read(tensor, offset, &mut x[..len])?;
        acc.average_into(tensor, offset, &mut avg[..len])?;
        let m = &mut m[..if m_out.is_some() { len } else { 0 }];
        let v = &mut v[..if v_out.is_some() { len } else { 0 }];
        match m_prev.as_mut() {
            Some(r) if !m.is_empty() => r.read(tensor, offset, m)?,
            _ => m.fill(0.0),
        }
        match v_prev.as_mut() {
            Some(r) if !v.is_empty() => r.read(tensor, offset, v)?,
            _ => v.fill(0.0),
        }
        opt.step_block(t, &mut x[..len], &avg[..len], m, v);
        x_out.write(&x[..len])?;
        if let Some(w) = m_out.as_mut() {
            w.write(m)?;
        }
        if let Some(w) = v_out.as_mut() {
            w.write(v)?;
        }
        Ok(())
    })?;
    Ok(ServerStep {
        global: x_out.finish()?,
        m: m_out.map(ModelWriter::finish).transpose()?,
        v: v_out.map(ModelWriter::finish).transpose()?,
    })
}
