//! The safetensors format, as medfl exchanges it: `F32` tensors, encoded whole and decoded one
//! chunk at a time.
//!
//! The streaming decoder is why this is not left to the `safetensors` crate: the coordinator
//! validates and aggregates updates as their chunks arrive, without holding a whole file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{CoreError, ModelParams, ModelSchema, TensorSpec};

/// Largest header the decoder accepts (the header is JSON: names, shapes and offsets).
pub const MAX_HEADER_BYTES: u64 = 64 * 1024 * 1024;

/// Room a model of F32 tensors may take beyond its tensor bytes (header: names, shapes, offsets,
/// metadata): the size bound on an update at the coordinator and on a global model at a site.
pub const HEADER_ALLOWANCE: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Values converted per piece when encoding in chunks.
const ENCODE_CHUNK: usize = 1 << 18;

/// The safetensors header (length prefix and JSON, padded to 8 bytes) of an F32 file holding
/// `schema`'s tensors contiguously in schema (name) order.
pub fn header(schema: &ModelSchema) -> Vec<u8> {
    let mut entries: BTreeMap<&str, HeaderEntry> = BTreeMap::new();
    let mut offset = 0u64;
    for t in &schema.tensors {
        let len = t.numel() as u64 * 4;
        entries.insert(
            &t.name,
            HeaderEntry {
                dtype: "F32".into(),
                shape: t.shape.clone(),
                data_offsets: [offset, offset + len],
            },
        );
        offset += len;
    }
    // Serialising a map of plain structs cannot fail.
    let mut json = serde_json::to_vec(&entries).unwrap_or_default();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Encodes `schema`'s tensors, whose values `values(i)` yields in pieces, handing the file to
/// `emit` a bounded piece at a time, so a large model is never copied whole.
pub fn encode_chunks<E>(
    schema: &ModelSchema,
    mut values: impl FnMut(usize, &mut dyn FnMut(&[f32]) -> Result<(), E>) -> Result<(), E>,
    mut emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    emit(&header(schema))?;
    let mut buf = Vec::with_capacity(ENCODE_CHUNK * 4);
    for i in 0..schema.tensors.len() {
        values(i, &mut |piece: &[f32]| {
            for part in piece.chunks(ENCODE_CHUNK) {
                buf.clear();
                for v in part {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                emit(&buf)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Encodes `params` in bounded pieces handed to `emit`.
pub fn encode_params_chunks<E>(
    params: &ModelParams,
    emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    encode_chunks(
        &params.schema(),
        |i, sink| sink(&params.tensors[i].data),
        emit,
    )
}

/// Encodes `params` as a safetensors file (tensors in name order, header padded to 8 bytes).
pub fn encode(params: &ModelParams) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + params.numel() * 4);
    let _ = encode_params_chunks(params, |b: &[u8]| -> Result<(), ()> {
        out.extend_from_slice(b);
        Ok(())
    });
    out
}

/// Decodes a whole safetensors file held in memory.
pub fn decode(bytes: &[u8]) -> Result<ModelParams, CoreError> {
    let mut collect = Collect::default();
    let mut decoder = StreamDecoder::new(Some(bytes.len() as u64));
    decoder.push(bytes, &mut collect)?;
    decoder.finish()?;
    ModelParams::new(
        collect
            .layout
            .into_iter()
            .zip(collect.data)
            .map(|(spec, data)| crate::NamedTensor {
                name: spec.name,
                shape: spec.shape,
                data,
            })
            .collect(),
    )
}

#[derive(Default)]
struct Collect {
    layout: Vec<TensorSpec>,
    data: Vec<Vec<f32>>,
}

impl TensorSink for Collect {
    fn header(&mut self, layout: &Layout) -> Result<(), CoreError> {
        self.layout = layout.tensors.iter().map(|t| t.spec.clone()).collect();
        self.data = layout
            .tensors
            .iter()
            .map(|t| Vec::with_capacity(t.spec.numel()))
            .collect();
        Ok(())
    }

    fn values(&mut self, tensor: usize, offset: usize, values: &[f32]) -> Result<(), CoreError> {
        let data = &mut self.data[tensor];
        if offset != data.len() {
            return Err(CoreError::Format(format!(
                "values out of order: element {offset} after {}",
                data.len()
            )));
        }
        data.extend_from_slice(values);
        Ok(())
    }
}

/// One tensor's place in the data section.
#[derive(Debug, Clone)]
pub struct LayoutEntry {
    /// Name and shape.
    pub spec: TensorSpec,
    /// Byte offset of the first value in the data section.
    pub start: u64,
}

/// The tensors of a file in data order, as its header describes them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Tensors sorted by their position in the data section.
    pub tensors: Vec<LayoutEntry>,
    /// Length of the data section in bytes.
    pub data_len: u64,
}

impl Layout {
    /// The schema (sorted by name) of the file.
    pub fn schema(&self) -> Result<ModelSchema, CoreError> {
        ModelSchema::new(self.tensors.iter().map(|t| t.spec.clone()).collect())
    }
}

/// Receives a decoded file: first its layout, then its values in data order.
pub trait TensorSink {
    /// Called once, when the header has been read.
    fn header(&mut self, layout: &Layout) -> Result<(), CoreError>;
    /// Called with consecutive values of `tensor` (an index into the layout), starting at element
    /// `offset` of that tensor.
    fn values(&mut self, tensor: usize, offset: usize, values: &[f32]) -> Result<(), CoreError>;
}

enum State {
    HeaderLen,
    Header(u64),
    Data,
}

/// Decodes a safetensors file fed in chunks of any size.
pub struct StreamDecoder {
    state: State,
    layout: Option<Layout>,
    /// Partial header bytes, or the bytes of a value split across two chunks.
    buf: Vec<u8>,
    total: Option<u64>,
    consumed: u64,
    /// Byte position inside the data section.
    pos: u64,
    /// Index of the tensor `pos` falls in.
    cursor: usize,
    scratch: Vec<f32>,
}

impl StreamDecoder {
    /// A decoder for a file of `total` bytes, when the length is known in advance.
    pub fn new(total: Option<u64>) -> Self {
        Self {
            state: State::HeaderLen,
            layout: None,
            buf: Vec::new(),
            total,
            consumed: 0,
            pos: 0,
            cursor: 0,
            scratch: Vec::new(),
        }
    }

    /// The layout, once the header has been read.
    pub fn layout(&self) -> Option<&Layout> {
        self.layout.as_ref()
    }

    /// Feeds the next chunk of the file.
    pub fn push(&mut self, mut chunk: &[u8], sink: &mut dyn TensorSink) -> Result<(), CoreError> {
        self.consumed += chunk.len() as u64;
        if let Some(total) = self.total {
            if self.consumed > total {
                return Err(CoreError::Format(format!(
                    "{} bytes received but the file is {total} bytes",
                    self.consumed
                )));
            }
        }
        while !chunk.is_empty() {
            match self.state {
                State::HeaderLen => {
                    let take = (8 - self.buf.len()).min(chunk.len());
                    self.buf.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.buf.len() == 8 {
                        let mut len = [0u8; 8];
                        len.copy_from_slice(&self.buf);
                        let len = u64::from_le_bytes(len);
                        if len == 0 || len > MAX_HEADER_BYTES {
                            return Err(CoreError::Format(format!(
                                "header length {len} is outside 1..={MAX_HEADER_BYTES}"
                            )));
                        }
                        self.buf.clear();
                        self.state = State::Header(len);
                    }
                }
                State::Header(len) => {
                    let take = ((len as usize) - self.buf.len()).min(chunk.len());
                    self.buf.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.buf.len() as u64 == len {
                        let layout = parse_header(&self.buf)?;
                        if let Some(total) = self.total {
                            let expected = 8 + len + layout.data_len;
                            if expected != total {
                                return Err(CoreError::Format(format!(
                                    "header describes {expected} bytes but the file is {total} bytes"
                                )));
                            }
                        }
                        self.buf.clear();
                        sink.header(&layout)?;
                        self.layout = Some(layout);
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let n = self.feed_data(chunk, sink)?;
                    chunk = &chunk[n..];
                }
            }
        }
        Ok(())
    }

    /// Feeds data-section bytes up to the end of the current tensor; returns how many it used.
    fn feed_data(&mut self, chunk: &[u8], sink: &mut dyn TensorSink) -> Result<usize, CoreError> {
        let Some(layout) = &self.layout else {
            return Err(CoreError::Format("data before header".into()));
        };
        let Some(entry) = layout.tensors.get(self.cursor) else {
            return Err(CoreError::Format(format!(
                "{} bytes past the end of the data section",
                chunk.len()
            )));
        };
        let end = entry.start + entry.spec.numel() as u64 * 4;
        let room = (end - self.pos) as usize;
        let mut bytes = &chunk[..room.min(chunk.len())];
        let used = bytes.len();
        // A value split across chunks starts at floor((pos - start) / 4) either way.
        let first_elem = ((self.pos - entry.start) / 4) as usize;
        self.scratch.clear();
        if !self.buf.is_empty() {
            // Complete a value split across chunks.
            let need = 4 - self.buf.len();
            let take = need.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == 4 {
                let v = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
                self.scratch.push(f32::from_le_bytes(v));
                self.buf.clear();
            }
        }
        let whole = bytes.len() / 4 * 4;
        self.scratch.extend(
            bytes[..whole]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        self.buf.extend_from_slice(&bytes[whole..]);
        self.pos += used as u64;
        if !self.scratch.is_empty() {
            sink.values(self.cursor, first_elem, &self.scratch)?;
        }
        if self.pos == end {
            self.cursor += 1;
        }
        Ok(used)
    }

    /// Checks that the whole file arrived.
    pub fn finish(self) -> Result<(), CoreError> {
        match (&self.state, &self.layout) {
            (State::Data, Some(layout)) if self.pos == layout.data_len => Ok(()),
            (State::Data, Some(layout)) => Err(CoreError::Truncated {
                got: self.consumed,
                expected: self.consumed + (layout.data_len - self.pos),
            }),
            _ => Err(CoreError::Format(format!(
                "file ended inside the header after {} bytes",
                self.consumed
            ))),
        }
    }
}

/// Parses a header's JSON (the bytes after the 8-byte length) into the file's layout.
pub fn parse_header(bytes: &[u8]) -> Result<Layout, CoreError> {
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(bytes)
        .map_err(|e| CoreError::Format(format!("header is not a JSON object: {e}")))?;
    let mut tensors = Vec::new();
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| CoreError::Format(format!("header entry `{name}`: {e}")))?;
        if entry.dtype != "F32" {
            return Err(CoreError::SchemaMismatch(format!(
                "tensor `{name}` has dtype {}; medfl exchanges F32 tensors",
                entry.dtype
            )));
        }
        let numel = entry
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| CoreError::Format(format!("tensor `{name}`: shape overflows")))?;
        let [start, end] = entry.data_offsets;
        if end < start || end - start != numel.saturating_mul(4) {
            return Err(CoreError::Format(format!(
                "tensor `{name}`: offsets {start}..{end} do not fit shape {:?}",
                entry.shape
            )));
        }
        tensors.push(LayoutEntry {
            spec: TensorSpec {
                name,
                shape: entry.shape,
            },
            start,
        });
    }
    tensors.sort_by_key(|t| t.start);
    let mut expected = 0u64;
    for t in &tensors {
        if t.start != expected {
            return Err(CoreError::Format(format!(
                "tensor `{}` starts at byte {} but the previous one ends at {expected}",
                t.spec.name, t.start
            )));
        }
        expected += t.spec.numel() as u64 * 4;
    }
    // Zero-sized tensors would stall the cursor; the format allows them but medfl never sends them.
    if let Some(t) = tensors.iter().find(|t| t.spec.numel() == 0) {
        return Err(CoreError::Format(format!(
            "tensor `{}` is empty",
            t.spec.name
        )));
    }
    Ok(Layout {
        tensors,
        data_len: expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NamedTensor;

    fn sample() -> ModelParams {
        ModelParams::new(vec![
            NamedTensor {
                name: "b".into(),
                shape: vec![3],
                data: vec![1.0, -2.0, 3.5],
            },
            NamedTensor {
                name: "a".into(),
                shape: vec![2, 2],
                data: vec![0.25, 0.5, 0.75, 1.0],
            },
        ])
        .unwrap()
    }

    #[test]
    fn round_trip_whole() {
        let p = sample();
        assert_eq!(decode(&encode(&p)).unwrap(), p);
    }

    #[test]
    fn round_trip_every_chunk_size() {
        let p = sample();
        let bytes = encode(&p);
        for size in 1..bytes.len() {
            let mut sink = Collect::default();
            let mut d = StreamDecoder::new(Some(bytes.len() as u64));
            for c in bytes.chunks(size) {
                d.push(c, &mut sink).unwrap();
            }
            d.finish().unwrap();
            assert_eq!(
                sink.data[0],
                vec![0.25, 0.5, 0.75, 1.0],
                "chunk size {size}"
            );
            assert_eq!(sink.data[1], vec![1.0, -2.0, 3.5], "chunk size {size}");
        }
    }

    #[test]
    fn truncated_is_refused() {
        let bytes = encode(&sample());
        let mut d = StreamDecoder::new(None);
        d.push(&bytes[..bytes.len() - 3], &mut Collect::default())
            .unwrap();
        assert!(matches!(d.finish(), Err(CoreError::Truncated { .. })));
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(decode(b"not a safetensors file at all").is_err());
        let mut bytes = encode(&sample());
        bytes[0] = 0xff;
        assert!(decode(&bytes).is_err());
    }
}
