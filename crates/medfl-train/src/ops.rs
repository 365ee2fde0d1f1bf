//! Fused CPU kernels with hand-derived backward passes for the encoder's hot spots: dense layers
//! (with a LoRA term or a GELU input), attention, layer norm and GELU.
//!
//! candle composes these from primitive ops, and its backward pass then gives every primitive a
//! zeroed gradient buffer and an addition, even for frozen weights and constant masks. Each op here
//! is one graph node that returns gradients only for the inputs that take one. They run on the CPU
//! for f32 tensors and frozen weights; elsewhere each function takes its primitive-op path, which
//! the tests use as the reference.
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 1.]], &dev)?;
//! let (w, b) = (Tensor::ones(3, DType::F32, &dev)?, Tensor::zeros(3, DType::F32, &dev)?);
//! let y = medfl_train::ops::layer_norm(&x, None, &w, &b, 1e-12)?; // rows: mean 0, variance 1
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard};

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor, D,
};

/// Whether `x` can take a fused kernel: a non-empty f32 tensor on the CPU.
fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.elem_count() > 0
}

/// Whether none of `tensors` is a variable (a weight being trained).
fn frozen<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> bool {
    tensors.into_iter().all(|t| !t.is_variable())
}

// ---------------------------------------------------------------------------------------------
// Dense layers.

/// A low-rank term added to a dense layer: `scale · (x ⊙ keep) Aᵀ Bᵀ`, with `A` of shape
/// `[rank, in]`, `B` `[out, rank]` and `keep` an optional dropout mask shaped like `x`.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `A`, `[rank, in]`.
    pub a: &'a Tensor,
    /// `B`, `[out, rank]`.
    pub b: &'a Tensor,
    /// The factor on the product (`alpha / rank`).
    pub scale: f64,
    /// Inverted-dropout factors (0 or `1 / (1 - p)`) for the low-rank input, shaped like `x`.
    pub keep: Option<&'a Tensor>,
    /// Where the backward pass also leaves each example's gradient of `A` and `B` (fused path
    /// only).
    pub per_example: Option<&'a PerExampleGrads>,
}

/// Each example's gradient of the low-rank factors, left by the backward passes of the dense
/// layers that share it: what DP-SGD clips one example at a time, without a backward pass per
/// example.
///
/// The layers' rows are `examples` equal runs (a batch of padded sequences, `[examples, seq,
/// in]`), and an example's gradient is the sum over its own rows: for `A`,
/// `Σ_t (scale · g_t B)ᵀ x̃_t`, for `B`, `scale · Σ_t g_tᵀ (x̃_t Aᵀ)`. That holds when the
/// examples do not mix, as in an encoder whose attention masks padding and whose loss is a sum of
/// per-example losses.
#[derive(Debug, Clone, Default)]
pub struct PerExampleGrads {
    state: Arc<Mutex<Collected>>,
}

#[derive(Debug, Default)]
struct Collected {
    examples: usize,
    grads: HashMap<candle_core::TensorId, Tensor>,
}

impl PerExampleGrads {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Collected> {
        // A panic elsewhere while holding the lock leaves nothing half-written worth refusing.
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Starts a batch of `examples`, forgetting what the last one left.
    pub fn start(&self, examples: usize) {
        let mut state = self.lock();
        state.examples = examples;
        state.grads.clear();
    }

    /// The gradients the backward pass left for `factor`, `[examples, ..factor's shape]`.
    pub fn take(&self, factor: &Tensor) -> Option<Tensor> {
        self.lock().grads.remove(&factor.id())
    }

    /// Adds `grads` (`[examples, ..]`) to what `factor` has (a factor used twice gets both).
    fn add(&self, factor: &Tensor, grads: Tensor) -> Result<()> {
        let mut state = self.lock();
        let sum = match state.grads.remove(&factor.id()) {
            Some(before) => (before + grads)?,
            None => grads,
        };
        state.grads.insert(factor.id(), sum);
        Ok(())
    }

    fn examples(&self) -> usize {
        self.lock().examples
    }
}

/// `x Wᵀ + b` on the last dimension of `x`, plus the low-rank term if any; `W` is `[out, in]`.
///
/// Fused when `x` is on the CPU and `W` and `b` are not variables: one node whose backward pass
/// computes `∂x` (when `x` takes a gradient) and `∂A`, `∂B`, and never the gradient of `W` or `b`.
pub fn dense(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    low_rank: Option<LowRank<'_>>,
) -> Result<Tensor> {
    let Some(dense) = Dense::fused(x, weight, bias, false) else {
        return dense_primitive(x, weight, bias, low_rank);
    };
    let x = x.contiguous()?;
    match low_rank {
        None => x.apply_op1(dense),
        Some(l) => x.apply_op3(
            l.a,
            l.b,
            LowRankDense {
                dense,
                scale: l.scale,
                keep: l.keep.map(Tensor::contiguous).transpose()?,
                per_example: l.per_example.cloned(),
            },
        ),
    }
}

/// [`dense`] from differentiable candle ops.
pub fn dense_primitive(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    low_rank: Option<LowRank<'_>>,
) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let rows = x.reshape(((), inp))?;
    let mut y = rows.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    if let Some(l) = low_rank {
        let input = match l.keep {
            Some(keep) => (&rows * keep.reshape(((), inp))?)?,
            None => rows,
        };
        // Two thin products (rows × rank, then rank × out) rather than forming B A.
        let low = input.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
        y = (y + (low * l.scale)?)?;
    }
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    y.reshape(shape)
}

/// [`dense`] on [`gelu_erf`]`(x)`, as the feed-forward block's output layer.
///
/// Fused under the same conditions as [`dense`]; then the activation, the widest tensor of a BERT
/// layer, is neither kept for the backward pass nor given a gradient buffer of its own.
pub fn gelu_dense(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match Dense::fused(x, weight, bias, true) {
        Some(dense) => x.contiguous()?.apply_op1(dense),
        None => dense_primitive(&gelu_erf(x)?, weight, bias, None),
    }
}

/// `x Wᵀ + b` (or `gelu(x) Wᵀ + b`) with a frozen `W` and `b`.
struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
    gelu_input: bool,
}

impl Dense {
    /// The fused layer for `x`, unless `x` is not on the CPU or `W` or `b` is being trained.
    fn fused(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, gelu_input: bool) -> Option<Self> {
        let frozen = frozen([weight].into_iter().chain(bias));
        (fusable(x) && weight.elem_count() > 0 && frozen).then(|| Self {
            weight: weight.clone(),
            bias: bias.cloned(),
            gelu_input,
        })
    }

    /// `(rows, in)` of a contiguous input, and the output shape.
    fn shapes(&self, layout: &Layout) -> Result<((usize, usize), Shape)> {
        let (out, inp) = self.weight.dims2()?;
        let dims = layout.dims();
        if dims.last() != Some(&inp) || !layout.is_contiguous() {
            bail!("dense: input {dims:?} is not a contiguous [.., {inp}]");
        }
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((
            (layout.shape().elem_count() / inp.max(1), inp),
            shape.into(),
        ))
    }

    /// `x Wᵀ + b` (or `gelu(x) Wᵀ + b`) for `x` in `storage` under `layout`.
    fn forward(&self, storage: &CpuStorage, layout: &Layout) -> Result<(Vec<f32>, Shape)> {
        let ((rows, inp), shape) = self.shapes(layout)?;
        let activated = if self.gelu_input {
            let mut a = vec![0f32; rows * inp];
            zip_apply(&mut a, contiguous_values(storage, layout)?, inp, |_, x| {
                gelu(x)
            })?;
            Some(CpuStorage::F32(a))
        } else {
            None
        };
        let (input, offset) = match &activated {
            Some(a) => (a, 0),
            None => (storage, layout.start_offset()),
        };
        let weight = CpuF32::new(&self.weight)?;
        let mut y = f32s(input.matmul(
            weight.storage()?,
            (1, rows, self.weight.dim(0)?, inp),
            &Layout::contiguous_with_offset((rows, inp), offset),
            &weight.layout.transpose(0, 1)?,
        )?)?;
        if let Some(bias) = &self.bias {
            let bias = CpuF32::new(bias)?;
            let bias = bias.values()?;
            par_items(rows, [&mut y], |_, [row]| {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                Ok(())
            })?;
        }
        Ok((y, shape))
    }

    /// `∂x = g W` (times `gelu'(x)` with a GELU input), when `x` takes a gradient.
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let (out, inp) = self.weight.dims2()?;
        let grad = grad.contiguous()?;
        let (g, weight) = (CpuF32::new(&grad)?, CpuF32::new(&self.weight)?);
        let rows = grad.elem_count() / out;
        let mut dx = f32s(g.storage()?.matmul(
            weight.storage()?,
            (1, rows, inp, out),
            &Layout::contiguous_with_offset((rows, out), g.layout.start_offset()),
            weight.layout,
        )?)?;
        if self.gelu_input {
            let x = x.contiguous()?;
            let xs = CpuF32::new(&x)?;
            zip_apply(&mut dx, xs.values()?, inp, |d, x| d * gelu_slope(x))?;
        }
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = self.forward(storage, layout)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.input_grad(x, grad)
    }
}

/// [`Dense`] plus `scale · (x ⊙ keep) Aᵀ Bᵀ`, a node on `(x, A, B)`.
struct LowRankDense {
    dense: Dense,
    scale: f64,
    keep: Option<Tensor>,
    per_example: Option<PerExampleGrads>,
}

impl LowRankDense {
    /// The low-rank input, `x ⊙ keep` (or `x`), as `[rows, in]`.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.reshape(((), self.dense.weight.dim(1)?))?;
        match &self.keep {
            Some(keep) => &rows * keep.reshape(rows.shape())?,
            None => Ok(rows),
        }
    }
}

impl CustomOp3 for LowRankDense {
    fn name(&self) -> &'static str {
        "low-rank-dense"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut y, shape) = self.dense.forward(x, x_layout)?;
        let ((rows, inp), _) = self.dense.shapes(x_layout)?;
        let (out, rank) = b_layout.shape().dims2()?;
        if a_layout.dims() != [rank, inp] {
            bail!(
                "low-rank-dense: A {:?} and B [{out}, {rank}]",
                a_layout.dims()
            );
        }
        // The low-rank input: `x`, or `x ⊙ keep` in a new buffer.
        let dropped = match &self.keep {
            Some(keep) => {
                let keep = CpuF32::new(keep)?;
                let (x, keep) = (contiguous_values(x, x_layout)?, keep.values()?);
                if keep.len() != x.len() {
                    bail!(
                        "low-rank-dense: {} dropout factors for {} inputs",
                        keep.len(),
                        x.len()
                    );
                }
                Some(CpuStorage::F32(
                    x.iter().zip(keep).map(|(x, k)| x * k).collect(),
                ))
            }
            None => None,
        };
        let (input, offset) = match &dropped {
            Some(d) => (d, 0),
            None => (x, x_layout.start_offset()),
        };
        let input_layout = Layout::contiguous_with_offset((rows, inp), offset);
        let h = input.matmul(
            a,
            (1, rows, rank, inp),
            &input_layout,
            &a_layout.transpose(0, 1)?,
        )?;
        let low = f32s(h.matmul(
            b,
            (1, rows, out, rank),
            &Layout::contiguous((rows, rank)),
            &b_layout.transpose(0, 1)?,
        )?)?;
        let scale = self.scale as f32;
        y.iter_mut().zip(&low).for_each(|(y, l)| *y += l * scale);
        Ok((CpuStorage::F32(y), shape))
    }

    /// With `x̃ = x ⊙ keep` and `h = x̃ Aᵀ`: `∂B = scale · gᵀ h`, `∂A = scale · (g B)ᵀ x̃` and
    /// `∂x = g W + (scale · g B A) ⊙ keep`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (lora_a, lora_b) = (a.detach(), b.detach());
        let input = self.dropped(&x.detach())?; // [rows, in]
        let g = grad.reshape(((), lora_b.dim(0)?))?; // [rows, out]
        let g_low = (g.matmul(&lora_b)? * self.scale)?; // ∂(x Aᵀ), [rows, rank]
        let (grad_a, grad_b) = match &self.per_example {
            None => (
                a.track_op()
                    .then(|| g_low.t()?.matmul(&input))
                    .transpose()?,
                b.track_op()
                    .then(|| g.t()?.matmul(&input.matmul(&lora_a.t()?)?)? * self.scale)
                    .transpose()?,
            ),
            Some(per) => {
                let (n, rows) = (per.examples(), input.dim(0)?);
                if n == 0 || rows % n != 0 {
                    bail!("low-rank-dense: {rows} rows are not {n} examples of equal length");
                }
                // [n, seq, ·] views; each example's gradient is a product over its own rows.
                let by_example = |t: &Tensor| t.reshape((n, rows / n, t.dim(1)?));
                let (x3, g3, g_low3) = (by_example(&input)?, by_example(&g)?, by_example(&g_low)?);
                let mut grad_a = None;
                if a.track_op() {
                    let each = g_low3.transpose(1, 2)?.contiguous()?.matmul(&x3)?; // [n, rank, in]
                    grad_a = Some(each.sum(0)?);
                    per.add(a, each)?;
                }
                let mut grad_b = None;
                if b.track_op() {
                    let h3 = by_example(&input.matmul(&lora_a.t()?)?)?;
                    let each = (g3.transpose(1, 2)?.contiguous()?.matmul(&h3)? * self.scale)?;
                    grad_b = Some(each.sum(0)?);
                    per.add(b, each)?;
                }
                (grad_a, grad_b)
            }
        };
        let grad_x = match self.dense.input_grad(x, grad)? {
            Some(through_w) => {
                let mut low = g_low.matmul(&lora_a)?;
                if let Some(keep) = &self.keep {
                    low = (&low * keep.reshape(low.shape())?)?;
                }
                Some((through_w + low.reshape(x.shape())?)?)
            }
            None => None,
        };
        Ok((grad_x, grad_a, grad_b))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// Multi-head scaled dot-product attention of `[batch, seq, hidden]` queries, keys and values,
/// `softmax(q kᵀ / √d + key_bias) v` per head, back in `[batch, seq, hidden]`. `key_bias` holds
/// `batch × seq` values added to every score of the key at that position (0 to keep, a large
/// negative number to mask padding); its shape may carry extra unit dimensions.
///
/// Fused on the CPU: each sequence is done on its own, sequences shared among threads (one
/// sequence's products are too small for candle to spread), and its scores and probabilities
/// live only inside the op (the backward pass computes them again, a small fraction of the
/// layer's work); no gradient is made for the bias.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (batch, seq, hidden) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || key_bias.elem_count() != batch * seq {
        bail!(
            "attention: q {:?}, k {:?}, v {:?}, key bias {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            key_bias.dims()
        );
    }
    if heads == 0 || hidden % heads != 0 {
        bail!("attention: {heads} heads for width {hidden}");
    }
    if !fusable(q) {
        return attention_primitive(q, k, v, key_bias, heads);
    }
    let op = Attention {
        heads: Heads {
            seq,
            heads,
            width: hidden / heads,
        },
        batch,
        key_bias: key_bias.contiguous()?,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention`] from differentiable candle ops.
pub fn attention_primitive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (batch, seq, hidden) = q.dims3()?;
    let width = hidden / heads;
    let split = |t: &Tensor| {
        t.reshape((batch, seq, heads, width))?
            .transpose(1, 2)?
            .contiguous()
    };
    let scores = (split(q)?.matmul(&split(k)?.t()?)? / (width as f64).sqrt())?
        .broadcast_add(&key_bias.reshape((batch, 1, 1, seq))?)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .reshape((batch, seq, hidden))
}

/// The shape of one sequence's multi-head activations: `[seq, heads · width]` outside
/// attention, `[heads, seq, width]` ("head-major") inside.
#[derive(Debug, Clone, Copy)]
struct Heads {
    seq: usize,
    heads: usize,
    width: usize,
}

/// One side of a product batched over heads: blocks of `rows × cols`, stored contiguously as
/// `cols × rows` when `transposed`.
#[derive(Clone, Copy)]
struct Blocks<'a> {
    values: &'a CpuStorage,
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl Blocks<'_> {
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            transposed: !self.transposed,
            ..self
        }
    }
}

impl Heads {
    /// `1 / √width`, as `candle`'s `t / f64` applies it to f32 scores.
    fn scale(&self) -> f32 {
        (1.0 / (self.width as f64).sqrt()) as f32
    }

    /// Values of one sequence, `seq · heads · width`.
    fn len(&self) -> usize {
        self.seq * self.heads * self.width
    }

    /// Head-major `[seq, width]` blocks (queries, keys, values or their gradients).
    fn values<'a>(&self, values: &'a CpuStorage) -> Blocks<'a> {
        Blocks {
            values,
            rows: self.seq,
            cols: self.width,
            transposed: false,
        }
    }

    /// `[seq, seq]` blocks (scores, probabilities or their gradients).
    fn scores<'a>(&self, values: &'a CpuStorage) -> Blocks<'a> {
        Blocks {
            cols: self.seq,
            ..self.values(values)
        }
    }

    /// The blockwise product `lhs · rhs`, `[heads, lhs.rows, rhs.cols]`.
    fn bmm(&self, lhs: Blocks<'_>, rhs: Blocks<'_>) -> Result<Vec<f32>> {
        let n = self.heads;
        let layout = |b: Blocks<'_>| {
            if b.transposed {
                Layout::contiguous((n, b.cols, b.rows)).transpose(1, 2)
            } else {
                Ok(Layout::contiguous((n, b.rows, b.cols)))
            }
        };
        if lhs.cols != rhs.rows {
            bail!(
                "attention: [{}, {}] · [{}, {}]",
                lhs.rows,
                lhs.cols,
                rhs.rows,
                rhs.cols
            );
        }
        f32s(lhs.values.matmul(
            rhs.values,
            (n, lhs.rows, rhs.cols, lhs.cols),
            &layout(lhs)?,
            &layout(rhs)?,
        )?)
    }

    /// One sequence's `[seq, heads, width]` values in head-major order.
    fn split(&self, values: &[f32]) -> CpuStorage {
        let (h, w) = (self.heads, self.width);
        let mut out = Vec::with_capacity(values.len());
        for head in 0..h {
            for token in values.chunks_exact(h * w) {
                out.extend_from_slice(&token[head * w..][..w]);
            }
        }
        CpuStorage::F32(out)
    }

    /// Head-major values back to `[seq, heads, width]` in `out`.
    fn merge(&self, values: &[f32], out: &mut [f32]) {
        let (h, w) = (self.heads, self.width);
        for (head, block) in values.chunks_exact(self.seq * w).enumerate() {
            for (token, row) in out.chunks_exact_mut(h * w).zip(block.chunks_exact(w)) {
                token[head * w..][..w].copy_from_slice(row);
            }
        }
    }
}

/// Scaled, key-masked softmax attention; see [`attention`].
struct Attention {
    heads: Heads,
    batch: usize,
    key_bias: Tensor,
}

impl Attention {
    /// `softmax(q kᵀ / √d + bias)` per head of sequence `i`, from its head-major `q` and `k`.
    fn probabilities(&self, q: &CpuStorage, k: &CpuStorage, i: usize) -> Result<CpuStorage> {
        let h = self.heads;
        let mut scores = h.bmm(h.values(q), h.values(k).t())?;
        let bias = CpuF32::new(&self.key_bias)?;
        let bias = &bias.values()?[i * h.seq..][..h.seq];
        let scale = h.scale();
        for row in scores.chunks_exact_mut(h.seq) {
            row.iter_mut()
                .zip(bias)
                .for_each(|(x, b)| *x = *x * scale + b);
            softmax(row);
        }
        Ok(CpuStorage::F32(scores))
    }

    /// Sequence `i` of `[batch, seq, hidden]` values, head-major.
    fn sequence(&self, values: &[f32], i: usize) -> CpuStorage {
        let len = self.heads.len();
        self.heads.split(&values[i * len..][..len])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = self.heads;
        let (q, k, v) = (
            contiguous_values(q, q_layout)?,
            contiguous_values(k, k_layout)?,
            contiguous_values(v, v_layout)?,
        );
        let mut out = vec![0f32; self.batch * h.len()];
        par_items(self.batch, [&mut out], |i, [out]| {
            let (qh, kh, vh) = (
                self.sequence(q, i),
                self.sequence(k, i),
                self.sequence(v, i),
            );
            let probs = self.probabilities(&qh, &kh, i)?;
            h.merge(&h.bmm(h.scores(&probs), h.values(&vh))?, out);
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    /// With `p` the probabilities and `g` the output gradient of a sequence (head-major):
    /// `∂v = pᵀ g`, `∂s = scale · p ⊙ (g vᵀ − Σ (g vᵀ) ⊙ p)`, `∂q = ∂s k`, `∂k = ∂sᵀ q`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self.heads;
        // Only the inputs that take a gradient get a buffer (and one).
        let mut grads = [q, k, v].map(|t| {
            let len = if t.track_op() { t.elem_count() } else { 0 };
            vec![0f32; len]
        });
        let (q, k, v, grad) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let views = (
            CpuF32::new(&q)?,
            CpuF32::new(&k)?,
            CpuF32::new(&v)?,
            CpuF32::new(&grad)?,
        );
        let (qs, ks, vs, gs) = (
            views.0.values()?,
            views.1.values()?,
            views.2.values()?,
            views.3.values()?,
        );
        let [gq, gk, gv] = &mut grads;
        par_items(self.batch, [gq, gk, gv], |i, [dq, dk, dv]| {
            let (qh, kh, vh, gh) = (
                self.sequence(qs, i),
                self.sequence(ks, i),
                self.sequence(vs, i),
                self.sequence(gs, i),
            );
            let probs = self.probabilities(&qh, &kh, i)?;
            let mut grad_scores = h.bmm(h.values(&gh), h.values(&vh).t())?;
            let rows = grad_scores.chunks_exact_mut(h.seq);
            for (g, p) in rows.zip(probs.as_slice::<f32>()?.chunks_exact(h.seq)) {
                softmax_grad(p, g, h.scale());
            }
            let grad_scores = CpuStorage::F32(grad_scores);
            let products = [
                (dq, h.scores(&grad_scores), h.values(&kh)),
                (dk, h.scores(&grad_scores).t(), h.values(&qh)),
                (dv, h.scores(&probs).t(), h.values(&gh)),
            ];
            for (out, lhs, rhs) in products {
                if !out.is_empty() {
                    h.merge(&h.bmm(lhs, rhs)?, out);
                }
            }
            Ok(())
        })?;
        let [gq, gk, gv] = grads.map(|g| {
            (!g.is_empty())
                .then(|| Tensor::from_vec(g, q.shape(), q.device()))
                .transpose()
        });
        Ok((gq?, gk?, gv?))
    }
}

/// In-place softmax of one row, as `candle_nn::ops::softmax`: `exp(x − max) / Σ exp(x − max)`.
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    row.iter_mut().for_each(|x| *x /= sum);
}

/// Turns `∂y` of a softmax row `y` into `scale · ∂x = scale · y ⊙ (∂y − Σ ∂y ⊙ y)`, in place.
fn softmax_grad(y: &[f32], grad: &mut [f32], scale: f32) {
    let dot: f32 = y.iter().zip(grad.iter()).map(|(y, g)| y * g).sum();
    for (g, y) in grad.iter_mut().zip(y) {
        *g = scale * y * (*g - dot);
    }
}

// ---------------------------------------------------------------------------------------------
// Layer norm.

/// Layer normalisation over the last dimension of `x` (plus `residual`, when given, which is
/// added first): `(x − mean) / √(var + eps) · weight + bias`.
///
/// Fused when `x` is on the CPU and `weight` and `bias` are not variables; then only `x` and
/// `residual` get gradients, both the same.
pub fn layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if !(fusable(x) && frozen([weight, bias])) {
        return layer_norm_primitive(x, residual, weight, bias, eps);
    }
    let (width, x) = (x.dim(D::Minus1)?, x.contiguous()?);
    if weight.dims() != [width] || bias.dims() != [width] {
        bail!("layer norm: weight {:?} for width {width}", weight.dims());
    }
    let op = LayerNorm {
        weight: weight.clone(),
        bias: bias.clone(),
        eps,
    };
    match residual {
        Some(r) if r.dims() != x.dims() => {
            bail!("layer norm: residual {:?} for {:?}", r.dims(), x.dims())
        }
        Some(r) => x.apply_op2(&r.contiguous()?, op),
        None => x.apply_op1(op),
    }
}

/// [`layer_norm`] from differentiable candle ops.
pub fn layer_norm_primitive(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let x = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(variance + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Layer norm with frozen weight and bias; a node on `x` or on `(x, residual)`.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `x (+ residual)` row by row into a new buffer, then `each(row, index)` on each row.
    fn rows(
        &self,
        x: &[f32],
        residual: Option<&[f32]>,
        each: impl Fn(&mut [f32], usize) + Sync,
    ) -> Result<Vec<f32>> {
        let width = self.weight.elem_count();
        let mut out = match residual {
            Some(r) if r.len() == x.len() => x.iter().zip(r).map(|(x, r)| x + r).collect(),
            Some(r) => bail!("layer norm: {} residual values for {}", r.len(), x.len()),
            None => x.to_vec(),
        };
        par_items(out.len() / width, [&mut out], |i, [row]| {
            each(row, i);
            Ok(())
        })?;
        Ok(out)
    }

    fn forward(&self, x: &[f32], residual: Option<&[f32]>) -> Result<CpuStorage> {
        let (weight, bias) = (CpuF32::new(&self.weight)?, CpuF32::new(&self.bias)?);
        let (weight, bias) = (weight.values()?, bias.values()?);
        let y = self.rows(x, residual, |row, _| {
            let (mean, std) = moments(row, self.eps);
            for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
                *x = (*x - mean) / std * w + b;
            }
        })?;
        Ok(CpuStorage::F32(y))
    }

    /// `∂x = (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) / σ` with `ĝ = ∂y ⊙ weight`, `x̂ = (x − mean) / σ`.
    fn input_grad(&self, x: &Tensor, residual: Option<&Tensor>, grad: &Tensor) -> Result<Tensor> {
        let (x_c, grad) = (x.contiguous()?, grad.contiguous()?);
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let (xs, gs, weight) = (
            CpuF32::new(&x_c)?,
            CpuF32::new(&grad)?,
            CpuF32::new(&self.weight)?,
        );
        let rs = residual.as_ref().map(CpuF32::new).transpose()?;
        let (gs, weight) = (gs.values()?, weight.values()?);
        let width = weight.len() as f32;
        let dx = self.rows(
            xs.values()?,
            rs.as_ref().map(CpuF32::values).transpose()?,
            |row, i| {
                let g = &gs[i * row.len()..][..row.len()];
                let (mean, std) = moments(row, self.eps);
                let (mut g_sum, mut gx_sum) = (0f32, 0f32);
                for ((x, g), w) in row.iter().zip(g).zip(weight) {
                    g_sum += g * w;
                    gx_sum += g * w * (x - mean) / std;
                }
                let (g_mean, gx_mean) = (g_sum / width, gx_sum / width);
                for ((x, g), w) in row.iter_mut().zip(g).zip(weight) {
                    *x = (g * w - g_mean - (*x - mean) / std * gx_mean) / std;
                }
            },
        )?;
        Tensor::from_vec(dx, x.shape(), x.device())
    }
}

/// Mean and `√(variance + eps)` of a row, summed in f64.
fn moments(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len().max(1) as f64;
    let mean = (row.iter().map(|&x| f64::from(x)).sum::<f64>() / n) as f32;
    let var = row
        .iter()
        .map(|&x| f64::from(x - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, (var + eps).sqrt() as f32)
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(contiguous_values(storage, layout)?, None)?;
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.input_grad(x, None, grad).map(Some)
    }
}

impl CustomOp2 for LayerNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let residual = contiguous_values(residual, residual_layout)?;
        let y = self.forward(contiguous_values(x, x_layout)?, Some(residual))?;
        Ok((y, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.input_grad(x, Some(residual), grad)?;
        Ok((
            x.track_op().then(|| dx.clone()),
            residual.track_op().then_some(dx),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU.

/// Exact GELU, `x · Φ(x)` with `Φ` the standard normal CDF.
///
/// Fused on the CPU, with erf computed as PyTorch's vectorised CPU kernel does (Abramowitz &
/// Stegun 7.1.26): three times faster than the `erff` of candle's `gelu_erf` and as accurate once
/// multiplied by `x`; the backward pass is one pass over `x` instead of eight primitive ops.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// See [`gelu_erf`].
struct GeluErf;

/// `Φ(x)` and `exp(−x² / 2)`. erf is Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7,
/// a few 1e-7 in f32), as PyTorch's `Vectorized<float>::erf`; the exponential it needs is the
/// one in the normal density, which the backward pass reuses.
fn normal_cdf(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let e = (-z * z).exp();
    let t = 1. / (0.327_591_1 * z.abs() + 1.);
    let r =
        (((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6;
    let erf = (1. - r * t * e).copysign(z);
    ((erf + 1.) * 0.5, e)
}

/// `gelu(x) = x Φ(x)`.
fn gelu(x: f32) -> f32 {
    x * normal_cdf(x).0
}

/// `gelu'(x) = Φ(x) + x φ(x)`, `φ(x) = exp(−x² / 2) / √(2π)`.
fn gelu_slope(x: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let (cdf, e) = normal_cdf(x);
    cdf + x * FRAC_1_SQRT_2PI * e
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, width) = (contiguous_values(storage, layout)?, layout.dims().last());
        let mut y = vec![0f32; x.len()];
        zip_apply(&mut y, x, width.copied().unwrap_or(1), |_, x| gelu(x))?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let xs = CpuF32::new(&x)?;
        let mut dx = CpuF32::new(&grad)?.values()?.to_vec();
        let width = x.dims().last().copied().unwrap_or(1);
        zip_apply(&mut dx, xs.values()?, width, |g, x| g * gelu_slope(x))?;
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Depthwise convolution.

/// A depthwise 2-D convolution of `x` `(B, C, H, W)` with one filter per channel (`weight`
/// `(C, 1, k, k)`), zero `padding` on every side, `stride` in both directions.
///
/// Without a gradient to carry (a frozen encoder's inference), a direct loop over each channel's
/// plane, one thread per run of planes: candle's grouped convolution runs one small im2col
/// convolution per channel, several times slower on TinyViT's 256-channel, 256×256 maps.
/// Otherwise candle's differentiable grouped convolution.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let c = weight.dim(0)?;
    if x.track_op() || !fusable(x) || !frozen([weight]) || weight.dim(1)? != 1 {
        return x.conv2d(weight, padding, stride, 1, c);
    }
    x.contiguous()?.apply_op1_no_bwd(&Depthwise {
        weight: weight.flatten_all()?.to_vec1::<f32>()?,
        k: weight.dim(2)?,
        stride,
        padding,
    })
}

/// See [`depthwise_conv2d`].
struct Depthwise {
    /// `(C, k, k)` values.
    weight: Vec<f32>,
    k: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_values(storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (k, s, p) = (self.k, self.stride, self.padding);
        if self.weight.len() != c * k * k || h + 2 * p < k || w + 2 * p < k || s == 0 {
            bail!(
                "depthwise-conv2d: {c} channels of {h}×{w}, {} weights of a {k}×{k} kernel",
                self.weight.len()
            );
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut y = vec![0f32; b * c * oh * ow];
        // The output columns whose every tap falls inside the row: there the taps are whole
        // slices, which the compiler vectorises; only the border columns check bounds.
        let first = p.div_ceil(s).min(ow);
        let last = if w + p >= k {
            ((w + p - k) / s + 1).clamp(first, ow)
        } else {
            first
        };
        par_items(b * c, [&mut y], |plane, [out]| {
            let channel = plane % c;
            let filter = &self.weight[channel * k * k..(channel + 1) * k * k];
            let input = &x[plane * h * w..(plane + 1) * h * w];
            for oy in 0..oh {
                let out_row = &mut out[oy * ow..(oy + 1) * ow];
                for ky in 0..k {
                    // Rows outside the image are the zero padding.
                    let Some(iy) = (oy * s + ky).checked_sub(p).filter(|iy| *iy < h) else {
                        continue;
                    };
                    let row = &input[iy * w..(iy + 1) * w];
                    for kx in 0..k {
                        let f = filter[ky * k + kx];
                        if s == 1 {
                            // Input column of output `ox` is `ox + kx - p`.
                            let src = &row[first + kx - p..last + kx - p];
                            for (o, v) in out_row[first..last].iter_mut().zip(src) {
                                *o += v * f;
                            }
                        } else {
                            for (ox, o) in out_row.iter_mut().enumerate().take(last).skip(first) {
                                *o += row[ox * s + kx - p] * f;
                            }
                        }
                        for ox in (0..first).chain(last..ow) {
                            if let Some(ix) = (ox * s + kx).checked_sub(p).filter(|ix| *ix < w) {
                                out_row[ox] += row[ix] * f;
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }
}

// ---------------------------------------------------------------------------------------------
// Plumbing.

/// Read access to the values of a contiguous f32 CPU tensor.
struct CpuF32<'a> {
    storage: RwLockReadGuard<'a, Storage>,
    layout: &'a Layout,
}

impl<'a> CpuF32<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        Ok(Self { storage, layout })
    }

    fn storage(&self) -> Result<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s),
            _ => bail!("a fused kernel got a tensor that is not on the CPU"),
        }
    }

    fn values(&self) -> Result<&[f32]> {
        contiguous_values(self.storage()?, self.layout)
    }
}

/// The f32 values of `storage` under a contiguous `layout`.
fn contiguous_values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("a fused kernel got a non-contiguous tensor");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// The values of an f32 storage.
fn f32s(storage: CpuStorage) -> Result<Vec<f32>> {
    match storage {
        CpuStorage::F32(v) => Ok(v),
        other => bail!("expected f32 values, got {:?}", other.dtype()),
    }
}

/// `values[i] = f(values[i], other[i])` for every `i`, rows of `width` shared among threads.
fn zip_apply(
    values: &mut [f32],
    other: &[f32],
    width: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    if other.len() != values.len() || width == 0 || !values.len().is_multiple_of(width) {
        bail!(
            "{} and {} values in rows of {width}",
            values.len(),
            other.len()
        );
    }
    par_items(values.len() / width, [values], |i, [row]| {
        for (v, &o) in row.iter_mut().zip(&other[i * width..]) {
            *v = f(*v, o);
        }
        Ok(())
    })
}

/// Below this many values in all, [`par_items`] runs on the calling thread alone.
const PARALLEL_MIN: usize = 1 << 15;

/// Calls `f(i, parts)` for every item `i < items`, where `parts` holds item `i`'s share of each
/// buffer (each buffer is `items` equal shares; an empty buffer gives empty shares). When the
/// buffers are large, the items are split into runs, one per candle thread.
fn par_items<const N: usize>(
    items: usize,
    mut buffers: [&mut [f32]; N],
    f: impl Fn(usize, [&mut [f32]; N]) -> Result<()> + Sync,
) -> Result<()> {
    let total: usize = buffers.iter().map(|b| b.len()).sum();
    let share = buffers
        .each_ref()
        .map(|b| b.len().checked_div(items).unwrap_or(0));
    // The first `n` items' shares of every buffer, cut off the front of `buffers`.
    fn take<'a, const N: usize>(
        buffers: &mut [&'a mut [f32]; N],
        n: usize,
        share: &[usize; N],
    ) -> [&'a mut [f32]; N] {
        std::array::from_fn(|j| {
            let (front, rest) = std::mem::take(&mut buffers[j]).split_at_mut(n * share[j]);
            buffers[j] = rest;
            front
        })
    }
    let run = |first: usize, count: usize, mut parts: [&mut [f32]; N]| -> Result<()> {
        for i in first..first + count {
            f(i, take(&mut parts, 1, &share))?;
        }
        Ok(())
    };
    let threads = if total < PARALLEL_MIN {
        1
    } else {
        candle_core::utils::get_num_threads().clamp(1, items.max(1))
    };
    let per = items.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let here = take(&mut buffers, per.min(items), &share);
        let others: Vec<_> = (per..items)
            .step_by(per)
            .map(|first| {
                let count = per.min(items - first);
                let (parts, run) = (take(&mut buffers, count, &share), &run);
                scope.spawn(move || run(first, count, parts))
            })
            .collect();
        let mut result = run(0, per.min(items), here);
        for thread in others {
            let done = thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            result = result.and(done);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in about `[-scale, scale]`.
    fn values(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n = shape.iter().product();
        let mut rng = medfl_core::selection::SplitMix64::new(seed);
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() as f32 * 2. - 1.) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let worst = flat(a)
            .iter()
            .zip(flat(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{what}: differs by {worst}");
    }

    /// Runs `f` on `inputs` as variables, fused and primitive, and checks the outputs and the
    /// gradients of a weighted sum of the outputs (so every output gets a different gradient).
    fn check(
        what: &str,
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        primitive: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (y_fused, y_prim) = (fused(&ts).unwrap(), primitive(&ts).unwrap());
        assert_close(what, &y_fused, &y_prim);
        let weights = values(y_fused.dims(), 99, 1.0);
        let grads = |y: &Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g_fused, g_prim) = (grads(&y_fused), grads(&y_prim));
        for (i, t) in ts.iter().enumerate() {
            let (a, b) = (g_fused.get(t).unwrap(), g_prim.get(t).unwrap());
            assert_close(&format!("{what}: gradient of input {i}"), a, b);
        }
    }

    #[test]
    fn depthwise_convolution_matches_candles_grouped_one() {
        let weight = values(&[3, 1, 3, 3], 7, 0.5);
        // Odd and even sides, strides 1 and 2, as TinyViT's local and merging convolutions.
        for (h, w, stride) in [
            (9, 7, 1),
            (8, 8, 2),
            (7, 5, 2),
            (2, 2, 1),
            (1, 3, 1),
            (2, 3, 2),
        ] {
            let x = values(&[2, 3, h, w], 8, 1.0);
            let fast = depthwise_conv2d(&x, &weight, stride, 1).unwrap();
            let slow = x.conv2d(&weight, 1, stride, 1, 3).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-5,
                "{h}×{w} stride {stride}"
            );
        }
        // With a gradient to carry, candle's differentiable convolution runs.
        let x = Var::from_tensor(&values(&[1, 3, 5, 5], 9, 1.0)).unwrap();
        let y = depthwise_conv2d(x.as_tensor(), &weight, 1, 1).unwrap();
        assert!(y.sum_all().unwrap().backward().unwrap().get(&x).is_some());
    }

    #[test]
    fn fused_dense_matches_primitive_ops() {
        let (w, b) = (values(&[5, 4], 1, 0.5), values(&[5], 2, 0.5));
        let x = values(&[2, 3, 4], 3, 1.0);
        check(
            "dense",
            std::slice::from_ref(&x),
            |t| dense(&t[0], &w, Some(&b), None),
            |t| dense_primitive(&t[0], &w, Some(&b), None),
        );
        // Dropout with p = 1/2: factors 0 or 2.
        let dropout = values(&[2, 3, 4], 4, 1.0).ge(0.0).unwrap();
        let dropout = (dropout.to_dtype(DType::F32).unwrap() * 2.0).unwrap();
        fn low<'a>(t: &'a [Tensor], keep: Option<&'a Tensor>) -> LowRank<'a> {
            LowRank {
                a: &t[1],
                b: &t[2],
                scale: 2.0,
                keep,
                per_example: None,
            }
        }
        for keep in [None, Some(&dropout)] {
            check(
                "low-rank dense",
                &[x.clone(), values(&[2, 4], 5, 0.5), values(&[5, 2], 6, 0.5)],
                |t| dense(&t[0], &w, Some(&b), Some(low(t, keep))),
                |t| dense_primitive(&t[0], &w, Some(&b), Some(low(t, keep))),
            );
        }
    }

    #[test]
    fn fused_attention_matches_primitive_ops_with_padding() {
        // [batch, seq, hidden] and heads: a small case, and one large enough to share the
        // sequences among threads. Sequence `i` has `i` padded keys.
        for (batch, seq, hidden, heads) in [(2, 5, 6, 2), (4, 16, 512, 8)] {
            let mask: Vec<f32> = (0..batch * seq)
                .map(|j| if j % seq + j / seq < seq { 1. } else { 0. })
                .collect();
            let bias = Tensor::from_vec(mask, (batch, 1, 1, seq), &Device::Cpu)
                .unwrap()
                .affine(f64::from(f32::MAX), -f64::from(f32::MAX))
                .unwrap();
            let qkv: Vec<Tensor> = (0..3)
                .map(|i| values(&[batch, seq, hidden], 10 + i, 2.0))
                .collect();
            check(
                "attention",
                &qkv,
                |t| attention(&t[0], &t[1], &t[2], &bias, heads),
                |t| attention_primitive(&t[0], &t[1], &t[2], &bias, heads),
            );
        }
    }

    #[test]
    fn fused_layer_norm_matches_primitive_ops() {
        let (w, b) = (values(&[6], 20, 1.0), values(&[6], 21, 1.0));
        let x = values(&[2, 3, 6], 22, 3.0);
        check(
            "layer norm",
            std::slice::from_ref(&x),
            |t| layer_norm(&t[0], None, &w, &b, 1e-12),
            |t| layer_norm_primitive(&t[0], None, &w, &b, 1e-12),
        );
        check(
            "add & layer norm",
            &[x, values(&[2, 3, 6], 23, 1.0)],
            |t| layer_norm(&t[0], Some(&t[1]), &w, &b, 1e-5),
            |t| layer_norm_primitive(&t[0], Some(&t[1]), &w, &b, 1e-5),
        );
    }

    #[test]
    fn fused_gelu_matches_primitive_ops() {
        let x = values(&[3, 7], 30, 4.0);
        check(
            "gelu",
            std::slice::from_ref(&x),
            |t| gelu_erf(&t[0]),
            |t| t[0].gelu_erf(),
        );
        let (w, b) = (values(&[4, 7], 31, 0.5), values(&[4], 32, 0.5));
        check(
            "gelu dense",
            &[x],
            |t| gelu_dense(&t[0], &w, Some(&b)),
            |t| dense_primitive(&t[0].gelu_erf()?, &w, Some(&b), None),
        );
    }

    #[test]
    fn items_get_their_share_of_every_buffer_on_any_thread() {
        for items in [0, 1, 3, PARALLEL_MIN / 2 + 1] {
            let mut rows = vec![0f32; items * 6];
            let mut pairs = vec![0f32; items * 2];
            par_items(
                items,
                [&mut rows, &mut pairs, &mut []],
                |i, [row, pair, none]| {
                    assert!(row.len() == 6 && pair.len() == 2 && none.is_empty());
                    row.fill(i as f32);
                    pair.fill(-(i as f32));
                    Ok(())
                },
            )
            .unwrap();
            let filled = |v: &[f32], n, sign: f32| {
                v.chunks(n)
                    .enumerate()
                    .all(|(i, r)| r.iter().all(|&x| x == sign * i as f32))
            };
            assert!(filled(&rows, 6, 1.) && filled(&pairs, 2, -1.));
        }
        let mut v = vec![0f32; PARALLEL_MIN];
        let failing = par_items(PARALLEL_MIN, [&mut v], |i, _| {
            if i + 1 == PARALLEL_MIN {
                bail!("the last item fails")
            }
            Ok(())
        });
        assert!(failing.is_err());
    }
}
