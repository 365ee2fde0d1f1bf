//! ONNX export of a tabular run's model, so a hospital's own tools (onnxruntime, or anything
//! that reads ONNX) can run it: one graph from raw feature values to class probabilities, with
//! the standardisation the model was trained with built in.
//!
//! Only the part of the ONNX protobuf schema the graph needs is declared here (the field
//! numbers are ONNX's own, from `onnx.proto3`), and encoded with prost.

use crate::ModelError;

/// The IR version written: ONNX 1.10's, read by every onnxruntime since 1.10.
const IR_VERSION: i64 = 8;
/// The default-domain operator set the graph uses (Gemm, Relu, Softmax over one axis, ArgMax).
const OPSET: i64 = 13;
/// `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;
/// `TensorProto.DataType.INT64`.
const INT64: i32 = 7;
/// `AttributeProto.AttributeType.INT`.
const ATTR_INT: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(string, tag = "2")]
    producer_name: String,
    #[prost(string, tag = "3")]
    producer_version: String,
    #[prost(string, tag = "6")]
    doc_string: String,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(int32, tag = "20")]
    r#type: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dimension {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

/// What the exported graph computes, and the names it is built from.
#[derive(Debug, Clone)]
pub struct MlpExport<'a> {
    /// The MLP's weights: `layers.{i}.weight` (`[out, in]`) and `layers.{i}.bias`.
    pub params: &'a medfl_core::ModelParams,
    /// Number of layers.
    pub layers: usize,
    /// Feature columns, in input order (the input's second dimension).
    pub features: &'a [String],
    /// Class labels, in output order.
    pub labels: &'a [String],
    /// Each feature's mean and deviation: the graph computes `(x - mean) / std` first.
    pub mean: &'a [f32],
    /// See `mean`.
    pub std: &'a [f32],
    /// Extra `metadata_props` entries (run spec, provenance).
    pub metadata: &'a [(&'a str, &'a str)],
}

/// Names of the graph's inputs and outputs.
pub mod names {
    /// Input: raw feature values, `[rows, features]`, float.
    pub const FEATURES: &str = "features";
    /// Output: class probabilities, `[rows, classes]`, float.
    pub const PROBABILITIES: &str = "probabilities";
    /// Output: the most probable class's index, `[rows]`, int64.
    pub const CLASS: &str = "class";
}

fn tensor(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: FLOAT,
        float_data: data.to_vec(),
        name: name.into(),
    }
}

fn value(name: &str, elem_type: i32, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        }),
    }
}

fn rows() -> Dimension {
    Dimension {
        dim_value: None,
        dim_param: Some("rows".into()),
    }
}

fn fixed(n: usize) -> Dimension {
    Dimension {
        dim_value: Some(n as i64),
        dim_param: None,
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attributes: &[(&str, i64)]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        attribute: attributes
            .iter()
            .map(|(name, i)| AttributeProto {
                name: name.to_string(),
                i: *i,
                r#type: ATTR_INT,
            })
            .collect(),
    }
}

/// The ONNX model of `export`, encoded.
pub fn mlp_onnx(export: &MlpExport<'_>) -> Result<Vec<u8>, ModelError> {
    let d = export.features.len();
    let c = export.labels.len();
    if export.mean.len() != d || export.std.len() != d {
        return Err(ModelError::Weights(format!(
            "standardisation for {} features, the model reads {d}",
            export.mean.len()
        )));
    }
    let mut initializer = vec![
        tensor("mean", &[d], export.mean),
        tensor("std", &[d], export.std),
    ];
    let mut nodes = vec![
        node("Sub", &[names::FEATURES, "mean"], "centred", &[]),
        node("Div", &["centred", "std"], "standardised", &[]),
    ];
    let mut input = "standardised".to_string();
    let mut width = d;
    for i in 0..export.layers {
        let get = |what: &str| {
            let name = format!("layers.{i}.{what}");
            export
                .params
                .get(&name)
                .ok_or_else(|| ModelError::Weights(format!("no tensor `{name}`")))
        };
        let (w, b) = (get("weight")?, get("bias")?);
        if w.shape.len() != 2 || w.shape[1] != width || b.shape != [w.shape[0]] {
            return Err(ModelError::Weights(format!(
                "layer {i}: weight {:?} and bias {:?} do not take {width} inputs",
                w.shape, b.shape
            )));
        }
        initializer.push(tensor(&w.name, &w.shape, &w.data));
        initializer.push(tensor(&b.name, &b.shape, &b.data));
        let last = i + 1 == export.layers;
        let out = if last {
            "logits".to_string()
        } else {
            format!("layers.{i}.output")
        };
        // Gemm with transB: x · Wᵀ + b, as the model's linear layers compute.
        nodes.push(node(
            "Gemm",
            &[&input, &w.name, &b.name],
            &out,
            &[("transB", 1)],
        ));
        input = out;
        if !last {
            let relu = format!("layers.{i}.relu");
            nodes.push(node("Relu", &[&input], &relu, &[]));
            input = relu;
        }
        width = w.shape[0];
    }
    if width != c {
        return Err(ModelError::Weights(format!(
            "the last layer gives {width} outputs for {c} labels"
        )));
    }
    nodes.push(node(
        "Softmax",
        &["logits"],
        names::PROBABILITIES,
        &[("axis", 1)],
    ));
    nodes.push(node(
        "ArgMax",
        &["logits"],
        names::CLASS,
        &[("axis", 1), ("keepdims", 0)],
    ));
    let json = |v: &[String]| serde_json::to_string(v).unwrap_or_default();
    let mut metadata_props = vec![
        StringStringEntryProto {
            key: "medfl.features".into(),
            value: json(export.features),
        },
        StringStringEntryProto {
            key: "medfl.labels".into(),
            value: json(export.labels),
        },
    ];
    metadata_props.extend(export.metadata.iter().map(|(k, v)| StringStringEntryProto {
        key: k.to_string(),
        value: v.to_string(),
    }));
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "medfl".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "Input `features`: [rows, {d}] raw values of {}. Outputs `probabilities` [rows, {c}] \
             over the labels in metadata `medfl.labels`, and `class` [rows], the most probable \
             label's index. The inputs are standardised inside the graph.",
            export.features.join(", ")
        ),
        graph: Some(GraphProto {
            node: nodes,
            name: "medfl_mlp".into(),
            initializer,
            input: vec![value(names::FEATURES, FLOAT, &[rows(), fixed(d)])],
            output: vec![
                value(names::PROBABILITIES, FLOAT, &[rows(), fixed(c)]),
                value(names::CLASS, INT64, &[rows()]),
            ],
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props,
    };
    Ok(prost::Message::encode_to_vec(&model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_core::{ModelParams, NamedTensor};
    use prost::Message;

    fn mlp() -> ModelParams {
        ModelParams::new(vec![
            NamedTensor {
                name: "layers.0.weight".into(),
                shape: vec![3, 2],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
            NamedTensor {
                name: "layers.0.bias".into(),
                shape: vec![3],
                data: vec![0.1, 0.2, 0.3],
            },
            NamedTensor {
                name: "layers.1.weight".into(),
                shape: vec![2, 3],
                data: vec![1.0, 0.0, -1.0, 0.5, 0.5, 0.5],
            },
            NamedTensor {
                name: "layers.1.bias".into(),
                shape: vec![2],
                data: vec![0.0, 1.0],
            },
        ])
        .unwrap()
    }

    #[test]
    fn the_graph_standardises_then_runs_every_layer() {
        let params = mlp();
        let features = vec!["a".to_string(), "b".into()];
        let labels = vec!["B".to_string(), "M".into()];
        let bytes = mlp_onnx(&MlpExport {
            params: &params,
            layers: 2,
            features: &features,
            labels: &labels,
            mean: &[1.0, 2.0],
            std: &[0.5, 4.0],
            metadata: &[("medfl.model", "{}")],
        })
        .unwrap();
        let model = ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(model.ir_version, IR_VERSION);
        assert_eq!(model.opset_import[0].version, OPSET);
        let graph = model.graph.unwrap();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            ["Sub", "Div", "Gemm", "Relu", "Gemm", "Softmax", "ArgMax"]
        );
        assert_eq!(graph.initializer.len(), 6);
        assert_eq!(graph.initializer[0].float_data, vec![1.0, 2.0]);
        assert_eq!(graph.initializer[2].dims, vec![3, 2]);
        assert!(model
            .metadata_props
            .iter()
            .any(|p| p.key == "medfl.labels" && p.value == r#"["B","M"]"#));
        // A model whose shapes do not chain is refused by name.
        let err = mlp_onnx(&MlpExport {
            params: &params,
            layers: 2,
            features: &features[..1],
            labels: &labels,
            mean: &[1.0],
            std: &[1.0],
            metadata: &[],
        })
        .unwrap_err();
        assert!(err.to_string().contains("layer 0"), "{err}");
    }
}
