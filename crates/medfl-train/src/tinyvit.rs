//! The TinyViT image encoder of LiteMedSAM (a segment-anything model distilled for medical
//! images), loaded from its own weights by their own names (`image_encoder.*`).
//!
//! The network, as LiteMedSAM ships it:
//! - a patch embedding of two 1×1 convolutions (stride 1: the resolution is kept);
//! - stage 0: MBConv blocks (1×1 expand, 3×3 depthwise, 1×1 project, residual) at full
//!   resolution, then a patch merging (1×1, 3×3 depthwise with stride 2, 1×1);
//! - stages 1 to 3: TinyViT blocks — windowed attention with a learned bias per head and
//!   relative offset (windows padded with zeros at the bottom and right, the padding attended
//!   to), a depthwise 3×3 "local" convolution, then an MLP — each stage but the last ending in
//!   a patch merging (stride 1 into the 320-wide last stage);
//! - a neck: 1×1 convolution, channel layer norm, 3×3 convolution, channel layer norm.
//!
//! Convolutions carry batch norms (inference statistics); GELU is the exact (erf) one. An input
//! of 3×S×S gives 256×(S/4)×(S/4).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, D};

use crate::ops;
use crate::TrainError;

/// Where LiteMedSAM keeps the encoder's tensors.
pub const PREFIX: &str = "image_encoder.";

/// The encoder's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyVitConfig {
    /// Input channels.
    pub in_chans: usize,
    /// Width of each stage.
    pub embed_dims: [usize; 4],
    /// Blocks in each stage.
    pub depths: [usize; 4],
    /// Attention heads of stages 1 to 3 (stage 0 is convolutional).
    pub num_heads: [usize; 4],
    /// Attention window side of stages 1 to 3.
    pub window_sizes: [usize; 4],
    /// MLP width over the stage width.
    pub mlp_ratio: usize,
    /// MBConv expansion of stage 0.
    pub mbconv_expand_ratio: usize,
    /// Channels out of the neck.
    pub out_chans: usize,
}

impl TinyVitConfig {
    /// LiteMedSAM's TinyViT-5M.
    pub fn lite_medsam() -> Self {
        Self {
            in_chans: 3,
            embed_dims: [64, 128, 160, 320],
            depths: [2, 2, 6, 2],
            num_heads: [2, 4, 5, 10],
            window_sizes: [7, 7, 14, 7],
            mlp_ratio: 4,
            mbconv_expand_ratio: 4,
            out_chans: 256,
        }
    }
}

/// Batch-norm epsilon (PyTorch's default).
const BN_EPS: f64 = 1e-5;
/// Layer-norm epsilon of the transformer blocks (PyTorch's default).
const LN_EPS: f64 = 1e-5;
/// Epsilon of the neck's channel layer norms (SAM's `LayerNorm2d`).
const LN2D_EPS: f64 = 1e-6;

/// Named tensors, checked for shape as they are taken.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    device: &'a Device,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, TrainError> {
        let full = format!("{PREFIX}{name}");
        let t = self
            .tensors
            .get(&full)
            .ok_or_else(|| TrainError::Weights(format!("missing tensor `{full}`")))?;
        crate::params::checked_f32(t, &full, shape, "TinyViT expects", self.device)
    }

    /// A convolution without bias followed by a batch norm (`{prefix}.c`, `{prefix}.bn`).
    fn conv_bn(
        &self,
        prefix: &str,
        (out, inp, k): (usize, usize, usize),
        stride: usize,
        groups: usize,
    ) -> Result<ConvBn, TrainError> {
        let weight = self.get(&format!("{prefix}.c.weight"), &[out, inp / groups, k, k])?;
        let bn = |what: &str| self.get(&format!("{prefix}.bn.{what}"), &[out]);
        let (gamma, beta) = (bn("weight")?, bn("bias")?);
        let (mean, var) = (bn("running_mean")?, bn("running_var")?);
        // Inference batch norm as one scale and shift per channel.
        let scale = gamma.broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        let shift = (beta - mean.broadcast_mul(&scale)?)?;
        Ok(ConvBn {
            weight,
            scale: scale.reshape((1, out, 1, 1))?,
            shift: shift.reshape((1, out, 1, 1))?,
            stride,
            padding: k / 2,
            groups,
        })
    }

    fn layer_norm(&self, prefix: &str, width: usize) -> Result<(Tensor, Tensor), TrainError> {
        Ok((
            self.get(&format!("{prefix}.weight"), &[width])?,
            self.get(&format!("{prefix}.bias"), &[width])?,
        ))
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear, TrainError> {
        Ok(Linear {
            weight: self.get(&format!("{prefix}.weight"), &[out, inp])?,
            bias: self.get(&format!("{prefix}.bias"), &[out])?,
        })
    }
}

/// A convolution and its batch norm.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = if self.groups > 1 && self.groups == self.weight.dim(0)? {
            ops::depthwise_conv2d(x, &self.weight, self.stride, self.padding)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?
        };
        y.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}

#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::dense(x, &self.weight, Some(&self.bias), None)
    }
}

/// Stage 0's block: expand, depthwise, project, add, GELU.
#[derive(Debug, Clone)]
struct MbConv {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl MbConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = ops::gelu_erf(&self.conv1.forward(x)?)?;
        let h = ops::gelu_erf(&self.conv2.forward(&h)?)?;
        ops::gelu_erf(&(self.conv3.forward(&h)? + x)?)
    }
}

/// Between stages: 1×1, depthwise 3×3 (stride 2, or 1 into the last stage), 1×1.
#[derive(Debug, Clone)]
struct PatchMerging {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl PatchMerging {
    fn load(w: &Weights<'_>, prefix: &str, dim: usize, out: usize) -> Result<Self, TrainError> {
        // TinyViT keeps the resolution into its widest stages.
        let stride = if [320, 448, 576].contains(&out) { 1 } else { 2 };
        Ok(Self {
            conv1: w.conv_bn(&format!("{prefix}.conv1"), (out, dim, 1), 1, 1)?,
            conv2: w.conv_bn(&format!("{prefix}.conv2"), (out, out, 3), stride, out)?,
            conv3: w.conv_bn(&format!("{prefix}.conv3"), (out, out, 1), 1, 1)?,
        })
    }

    /// `(B, C, H, W)` in, `(B, C', H', W')` out.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = ops::gelu_erf(&self.conv1.forward(x)?)?;
        let h = ops::gelu_erf(&self.conv2.forward(&h)?)?;
        self.conv3.forward(&h)
    }
}

/// Windowed multi-head attention with a learned bias per head and relative offset.
#[derive(Debug, Clone)]
struct Attention {
    norm: (Tensor, Tensor),
    qkv: Linear,
    proj: Linear,
    /// `(heads, N, N)`: the bias between every pair of window positions.
    bias: Tensor,
    heads: usize,
    key_dim: usize,
}

impl Attention {
    fn load(
        w: &Weights<'_>,
        prefix: &str,
        dim: usize,
        heads: usize,
        window: usize,
    ) -> Result<Self, TrainError> {
        let key_dim = dim / heads;
        let n = window * window;
        let biases = w.get(&format!("{prefix}.attention_biases"), &[heads, n])?;
        // Offsets are numbered in order of first appearance, which for the first position
        // (0, 0) is row-major over (|dy|, |dx|): offset (a, b) is a·window + b.
        let mut idx = Vec::with_capacity(n * n);
        for p in 0..n {
            for q in 0..n {
                let (dy, dx) = (
                    (p / window).abs_diff(q / window),
                    (p % window).abs_diff(q % window),
                );
                idx.push((dy * window + dx) as u32);
            }
        }
        let idx = Tensor::from_vec(idx, n * n, w.device)?;
        let bias = biases.index_select(&idx, 1)?.reshape((heads, n, n))?;
        Ok(Self {
            norm: w.layer_norm(&format!("{prefix}.norm"), dim)?,
            qkv: w.linear(&format!("{prefix}.qkv"), 3 * dim, dim)?,
            proj: w.linear(&format!("{prefix}.proj"), dim, dim)?,
            bias,
            heads,
            key_dim,
        })
    }

    /// `(windows, N, C)` in and out.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let x = ops::layer_norm(x, None, &self.norm.0, &self.norm.1, LN_EPS)?;
        // Per head: q, k, v side by side (the checkpoint's layout).
        let qkv = self
            .qkv
            .forward(&x)?
            .reshape((b, n, self.heads, 3 * self.key_dim))?;
        let part = |i: usize| {
            qkv.narrow(3, i * self.key_dim, self.key_dim)?
                .permute((0, 2, 1, 3))?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scale = (self.key_dim as f64).powf(-0.5);
        let attn = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&self.bias)?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }
}

/// A TinyViT block: windowed attention, depthwise local convolution, MLP.
#[derive(Debug, Clone)]
struct Block {
    attn: Attention,
    local_conv: ConvBn,
    mlp_norm: (Tensor, Tensor),
    fc1: Linear,
    fc2: Linear,
    window: usize,
}

impl Block {
    fn load(
        w: &Weights<'_>,
        prefix: &str,
        dim: usize,
        heads: usize,
        window: usize,
        mlp_ratio: usize,
    ) -> Result<Self, TrainError> {
        Ok(Self {
            attn: Attention::load(w, &format!("{prefix}.attn"), dim, heads, window)?,
            local_conv: w.conv_bn(&format!("{prefix}.local_conv"), (dim, dim, 3), 1, dim)?,
            mlp_norm: w.layer_norm(&format!("{prefix}.mlp.norm"), dim)?,
            fc1: w.linear(&format!("{prefix}.mlp.fc1"), dim * mlp_ratio, dim)?,
            fc2: w.linear(&format!("{prefix}.mlp.fc2"), dim, dim * mlp_ratio)?,
            window,
        })
    }

    /// `(B, H, W, C)` in and out.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let ws = self.window;
        let (pad_b, pad_r) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
        // Zero padding at the bottom and right, attended to like any position.
        let padded = x.pad_with_zeros(1, 0, pad_b)?.pad_with_zeros(2, 0, pad_r)?;
        let (ph, pw) = (h + pad_b, w + pad_r);
        let (nh, nw) = (ph / ws, pw / ws);
        let windows = padded
            .reshape((b, nh, ws, nw, ws, c))?
            .transpose(2, 3)?
            .reshape((b * nh * nw, ws * ws, c))?;
        let attended = self
            .attn
            .forward(&windows)?
            .reshape((b, nh, nw, ws, ws, c))?
            .transpose(2, 3)?
            .reshape((b, ph, pw, c))?
            .narrow(1, 0, h)?
            .narrow(2, 0, w)?;
        let x = (x + attended)?;
        let local = self
            .local_conv
            .forward(&x.permute((0, 3, 1, 2))?.contiguous()?)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let h = ops::layer_norm(&local, None, &self.mlp_norm.0, &self.mlp_norm.1, LN_EPS)?;
        let h = ops::gelu_dense(
            &self.fc1.forward(&h)?,
            &self.fc2.weight,
            Some(&self.fc2.bias),
        )?;
        local + h
    }
}

/// SAM's `LayerNorm2d`: a layer norm over the channels of `(B, C, H, W)`.
fn layer_norm_2d(x: &Tensor, (weight, bias): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    let normed = centred.broadcast_div(&(var + LN2D_EPS)?.sqrt()?)?;
    let c = weight.dim(0)?;
    normed
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

/// LiteMedSAM's image encoder.
#[derive(Debug, Clone)]
pub struct TinyVit {
    config: TinyVitConfig,
    patch_embed: (ConvBn, ConvBn),
    mbconv: Vec<MbConv>,
    /// Stages 1 to 3: their blocks.
    stages: Vec<Vec<Block>>,
    /// The merging after stages 0 to 2.
    merges: Vec<PatchMerging>,
    neck_conv1: Tensor,
    neck_norm1: (Tensor, Tensor),
    neck_conv2: Tensor,
    neck_norm2: (Tensor, Tensor),
}

impl TinyVit {
    /// Loads the encoder from a LiteMedSAM safetensors file (its `image_encoder.*` tensors;
    /// the rest is ignored). The file is read, not mapped, as for the text encoders.
    pub fn load(path: &Path, config: TinyVitConfig, device: &Device) -> Result<Self, TrainError> {
        crate::params::from_weights_file(path, device, |tensors| {
            Self::from_tensors(config, tensors, device)
        })
    }

    /// Builds the encoder from tensors named as LiteMedSAM names them (`image_encoder.…`).
    pub fn from_tensors(
        config: TinyVitConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let w = Weights { tensors, device };
        // A checkpoint with more blocks than the config would silently lose them.
        for (s, depth) in config.depths.iter().enumerate() {
            let extra = format!("{PREFIX}layers.{s}.blocks.{depth}.");
            if tensors.keys().any(|k| k.starts_with(&extra)) {
                return Err(TrainError::Weights(format!(
                    "stage {s} has more than the {depth} blocks the config gives it"
                )));
            }
        }
        let d = config.embed_dims;
        let half = d[0] / 2;
        let patch_embed = (
            w.conv_bn("patch_embed.seq.0", (half, config.in_chans, 1), 1, 1)?,
            w.conv_bn("patch_embed.seq.2", (d[0], half, 1), 1, 1)?,
        );
        let hidden = d[0] * config.mbconv_expand_ratio;
        let mbconv = (0..config.depths[0])
            .map(|i| {
                let p = format!("layers.0.blocks.{i}");
                Ok(MbConv {
                    conv1: w.conv_bn(&format!("{p}.conv1"), (hidden, d[0], 1), 1, 1)?,
                    conv2: w.conv_bn(&format!("{p}.conv2"), (hidden, hidden, 3), 1, hidden)?,
                    conv3: w.conv_bn(&format!("{p}.conv3"), (d[0], hidden, 1), 1, 1)?,
                })
            })
            .collect::<Result<_, TrainError>>()?;
        let merges = (0..3)
            .map(|s| PatchMerging::load(&w, &format!("layers.{s}.downsample"), d[s], d[s + 1]))
            .collect::<Result<_, _>>()?;
        let stages = (1..4)
            .map(|s| {
                (0..config.depths[s])
                    .map(|i| {
                        Block::load(
                            &w,
                            &format!("layers.{s}.blocks.{i}"),
                            d[s],
                            config.num_heads[s],
                            config.window_sizes[s],
                            config.mlp_ratio,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        let out = config.out_chans;
        Ok(Self {
            patch_embed,
            mbconv,
            stages,
            merges,
            neck_conv1: w.get("neck.0.weight", &[out, d[3], 1, 1])?,
            neck_norm1: w.layer_norm("neck.1", out)?,
            neck_conv2: w.get("neck.2.weight", &[out, out, 3, 3])?,
            neck_norm2: w.layer_norm("neck.3", out)?,
            config,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &TinyVitConfig {
        &self.config
    }

    /// `(B, 3, S, S)` images (S a multiple of 4) to `(B, 256, S/4, S/4)` features.
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let x = ops::gelu_erf(&self.patch_embed.0.forward(images)?)?;
        let mut x = self.patch_embed.1.forward(&x)?;
        for block in &self.mbconv {
            x = block.forward(&x)?;
        }
        for (merge, blocks) in self.merges.iter().zip(&self.stages) {
            // Merging works on (B, C, H, W), the blocks on (B, H, W, C).
            x = merge.forward(&x)?.permute((0, 2, 3, 1))?.contiguous()?;
            for block in blocks {
                x = block.forward(&x)?;
            }
            x = x.permute((0, 3, 1, 2))?.contiguous()?;
        }
        let x = x.conv2d(&self.neck_conv1, 0, 1, 1, 1)?;
        let x = layer_norm_2d(&x, &self.neck_norm1)?;
        let x = x.conv2d(&self.neck_conv2, 1, 1, 1, 1)?;
        layer_norm_2d(&x, &self.neck_norm2)
    }

    /// Mean and max over the feature map: `(B, 2 × 256)` embeddings for a classifier.
    pub fn pooled(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let features = self.forward(images)?.flatten_from(2)?;
        let mean = features.mean(D::Minus1)?;
        let max = features.max(D::Minus1)?;
        Tensor::cat(&[mean, max], 1)
    }
}
