//! Federated averaging as a running, example-weighted sum that updates are folded into one chunk
//! at a time, so the coordinator never holds more than one model's worth of sums. The
//! [`crate::aggregator::Aggregator`] folds FedAvg-family strategies into one.

use crate::safetensors::{Layout, TensorSink};
use crate::validate::match_layout;
use crate::{CoreError, ModelParams, ModelSchema, NamedTensor};

/// Running weighted sum of updates sharing one schema. Sums are `f64` so the order in which
/// sites report does not change the result beyond `f32` rounding.
#[derive(Debug, Clone)]
pub struct FedAvg {
    schema: ModelSchema,
    sums: Vec<Vec<f64>>,
    total_weight: f64,
    updates: usize,
}

impl FedAvg {
    /// An empty accumulator for models of `schema`.
    pub fn new(schema: ModelSchema) -> Self {
        let sums = schema
            .tensors
            .iter()
            .map(|t| vec![0.0; t.numel()])
            .collect();
        Self {
            schema,
            sums,
            total_weight: 0.0,
            updates: 0,
        }
    }

    /// Starts folding one update of `weight` (its example count). Feed the returned sink to a
    /// [`crate::safetensors::StreamDecoder`], then call [`Fold::commit`].
    pub fn fold(&mut self, weight: f64) -> Result<Fold<'_>, CoreError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(CoreError::Format(format!(
                "update weight must be positive, got {weight}"
            )));
        }
        Ok(Fold {
            acc: self,
            weight,
            map: Vec::new(),
        })
    }

    /// Adds `weight * values` to tensor `tensor` (schema index) from element `offset`; call
    /// [`Self::count`] once every value of the update has been added.
    pub fn add_values(
        &mut self,
        tensor: usize,
        offset: usize,
        values: &[f32],
        weight: f64,
    ) -> Result<(), CoreError> {
        let sum = self
            .sums
            .get_mut(tensor)
            .and_then(|s| s.get_mut(offset..offset + values.len()))
            .ok_or_else(|| CoreError::Format(format!("values past the end of tensor {tensor}")))?;
        for (s, v) in sum.iter_mut().zip(values) {
            *s += weight * f64::from(*v);
        }
        Ok(())
    }

    /// Counts an update of `weight` whose values were added with [`Self::add_values`].
    pub fn count(&mut self, weight: f64) {
        self.total_weight += weight;
        self.updates += 1;
    }

    /// The average of tensor `tensor` from element `offset`, into `out`.
    pub fn average_into(
        &self,
        tensor: usize,
        offset: usize,
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        if self.updates == 0 {
            return Err(CoreError::Empty);
        }
        let sum = self
            .sums
            .get(tensor)
            .and_then(|s| s.get(offset..offset + out.len()))
            .ok_or_else(|| CoreError::Format(format!("values past the end of tensor {tensor}")))?;
        for (o, s) in out.iter_mut().zip(sum) {
            *o = (s / self.total_weight) as f32;
        }
        Ok(())
    }

    /// The unweighted-by-total sums of tensor `tensor` from element `offset`, into `out`
    /// (zeros before any update).
    pub fn sum_into(&self, tensor: usize, offset: usize, out: &mut [f64]) -> Result<(), CoreError> {
        let sum = self
            .sums
            .get(tensor)
            .and_then(|s| s.get(offset..offset + out.len()))
            .ok_or_else(|| CoreError::Format(format!("values past the end of tensor {tensor}")))?;
        out.copy_from_slice(sum);
        Ok(())
    }

    /// Folds a whole in-memory update.
    pub fn add(&mut self, update: &ModelParams, weight: f64) -> Result<(), CoreError> {
        if update.schema() != self.schema {
            return Err(CoreError::SchemaMismatch(
                "names or shapes differ from the accumulator's".into(),
            ));
        }
        let mut fold = self.fold(weight)?;
        for (i, t) in update.tensors.iter().enumerate() {
            fold.map.push(i);
            fold.values(i, 0, &t.data)?;
        }
        fold.commit();
        Ok(())
    }

    /// Number of committed updates.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Sum of committed weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The weighted average of the committed updates.
    pub fn finish(&self) -> Result<ModelParams, CoreError> {
        if self.updates == 0 {
            return Err(CoreError::Empty);
        }
        let tensors = self
            .schema
            .tensors
            .iter()
            .zip(&self.sums)
            .map(|(spec, sum)| NamedTensor {
                name: spec.name.clone(),
                shape: spec.shape.clone(),
                data: sum.iter().map(|s| (s / self.total_weight) as f32).collect(),
            })
            .collect();
        ModelParams::new(tensors)
    }
}

/// One update being folded into a [`FedAvg`]. Dropping it without [`Fold::commit`] after values
/// were added leaves partial sums behind, so callers validate an update fully before folding it.
pub struct Fold<'a> {
    acc: &'a mut FedAvg,
    weight: f64,
    map: Vec<usize>,
}

impl Fold<'_> {
    /// Counts the update once all its values were folded.
    pub fn commit(self) {
        self.acc.count(self.weight);
    }
}

impl TensorSink for Fold<'_> {
    fn header(&mut self, layout: &Layout) -> Result<(), CoreError> {
        self.map = match_layout(&self.acc.schema, layout)?;
        Ok(())
    }

    fn values(&mut self, tensor: usize, offset: usize, values: &[f32]) -> Result<(), CoreError> {
        let idx = *self
            .map
            .get(tensor)
            .ok_or_else(|| CoreError::Format("values before header".into()))?;
        self.acc.add_values(idx, offset, values, self.weight)
    }
}

/// The shared strategy reference vectors (`shared/vectors/strategies_reference.json` beside the
/// repository), or `None` with a notice when this checkout has none. With
/// `MEDFL_REQUIRE_ASSETS=1` (CI) a missing file fails the calling test instead.
#[cfg(test)]
#[track_caller]
pub(crate) fn shared_strategies_reference(test: &str) -> Option<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/vectors/strategies_reference.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) => {
            let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: MEDFL_REQUIRE_ASSETS=1 but {} cannot be read: {e}",
                path.display()
            );
            eprintln!("skipping {test}: {} is absent", path.display());
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::safetensors::{encode, StreamDecoder};

    /// Flower 1.42's `aggregate` on the inputs of `strategies_reference.json` (`fedavg_weighted`):
    /// ```python
    /// from flwr.server.strategy.aggregate import aggregate
    /// aggregate([(client_layers, n) for client_layers, n in zip(clients, num_examples)])
    /// ```
    const CLIENTS: [([f32; 4], [f32; 2]); 5] = [
        ([1.0, 2.0, 3.0, 4.0], [0.5, -0.5]),
        ([1.1, 1.9, 3.2, 3.9], [0.4, -0.6]),
        ([0.9, 2.1, 2.8, 4.1], [0.6, -0.4]),
        ([1.05, 2.05, 3.1, 4.2], [0.55, -0.45]),
        ([10.0, -8.0, 30.0, -40.0], [5.0, 9.0]),
    ];
    const EXAMPLES: [f64; 5] = [10.0, 20.0, 30.0, 40.0, 50.0];
    pub(crate) const FLOWER_FEDAVG: ([f64; 4], [f64; 2]) = (
        [
            4.006666666666667,
            -1.3133333333333332,
            12.013333333333334,
            -10.606666666666667,
        ],
        [2.02, 2.6866666666666665],
    );

    fn client(i: usize) -> ModelParams {
        ModelParams::new(vec![
            NamedTensor {
                name: "layer0".into(),
                shape: vec![2, 2],
                data: CLIENTS[i].0.to_vec(),
            },
            NamedTensor {
                name: "layer1".into(),
                shape: vec![2],
                data: CLIENTS[i].1.to_vec(),
            },
        ])
        .unwrap()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            // f32 results against f64 references: 1e-6 relative to the magnitude.
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn matches_flower_reference_streamed_in_small_chunks() {
        let mut acc = FedAvg::new(client(0).schema());
        for (i, examples) in EXAMPLES.iter().enumerate() {
            let bytes = encode(&client(i));
            let mut fold = acc.fold(*examples).unwrap();
            let mut d = StreamDecoder::new(Some(bytes.len() as u64));
            for c in bytes.chunks(7) {
                d.push(c, &mut fold).unwrap();
            }
            d.finish().unwrap();
            fold.commit();
        }
        let avg = acc.finish().unwrap();
        assert_close(&avg.tensors[0].data, &FLOWER_FEDAVG.0);
        assert_close(&avg.tensors[1].data, &FLOWER_FEDAVG.1);
    }

    /// The same check against the shared reference file itself, when it is present.
    #[test]
    fn matches_shared_reference_file_when_present() {
        let Some(text) =
            shared_strategies_reference("fedavg::matches_shared_reference_file_when_present")
        else {
            return;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let flat = |x: &serde_json::Value| -> Vec<f64> {
            let mut out = Vec::new();
            let mut stack = vec![x];
            while let Some(x) = stack.pop() {
                match x {
                    serde_json::Value::Array(items) => stack.extend(items.iter().rev()),
                    other => out.push(other.as_f64().unwrap()),
                }
            }
            out
        };
        let clients = v["inputs"]["clients"].as_array().unwrap();
        let examples = v["inputs"]["num_examples"].as_array().unwrap();
        let mut acc = FedAvg::new(client(0).schema());
        for (c, n) in clients.iter().zip(examples) {
            let layers: Vec<Vec<f32>> = c
                .as_array()
                .unwrap()
                .iter()
                .map(|l| flat(l).into_iter().map(|x| x as f32).collect())
                .collect();
            let update = ModelParams::new(vec![
                NamedTensor {
                    name: "layer0".into(),
                    shape: vec![2, 2],
                    data: layers[0].clone(),
                },
                NamedTensor {
                    name: "layer1".into(),
                    shape: vec![2],
                    data: layers[1].clone(),
                },
            ])
            .unwrap();
            acc.add(&update, n.as_f64().unwrap()).unwrap();
        }
        let avg = acc.finish().unwrap();
        let want = &v["fedavg_weighted"];
        assert_close(&avg.tensors[0].data, &flat(&want[0]));
        assert_close(&avg.tensors[1].data, &flat(&want[1]));
    }

    #[test]
    fn order_does_not_matter() {
        let mut a = FedAvg::new(client(0).schema());
        let mut b = FedAvg::new(client(0).schema());
        for i in 0..5 {
            a.add(&client(i), EXAMPLES[i]).unwrap();
            b.add(&client(4 - i), EXAMPLES[4 - i]).unwrap();
        }
        assert_eq!(a.finish().unwrap(), b.finish().unwrap());
    }

    #[test]
    fn single_update_is_returned_and_empty_is_an_error() {
        let mut acc = FedAvg::new(client(0).schema());
        assert_eq!(acc.finish(), Err(CoreError::Empty));
        acc.add(&client(2), 7.0).unwrap();
        assert_eq!(acc.finish().unwrap(), client(2));
    }

    #[test]
    fn bad_weight_and_schema_are_refused() {
        let mut acc = FedAvg::new(client(0).schema());
        assert!(acc.fold(0.0).is_err());
        assert!(acc.fold(f64::NAN).is_err());
        let other = ModelParams::new(vec![NamedTensor {
            name: "layer0".into(),
            shape: vec![4],
            data: vec![0.0; 4],
        }])
        .unwrap();
        assert!(acc.add(&other, 1.0).is_err());
        assert_eq!(acc.updates(), 0);
    }
}
