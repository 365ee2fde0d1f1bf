//! The one [`Aggregator`] behind every strategy of a run spec, over plain `f32` blocks.
//!
//! Updates arrive one at a time through [`Aggregator::admit`], which applies the run's norm bound
//! (refusing the update, or clipping it towards the global model) and then either folds it into
//! running sums (FedAvg, FedProx and the server optimizers: one model's worth of sums, whatever
//! the number of sites) or tells the caller to hold it (robust rules, which need every update at
//! the close). [`Aggregator::finish`] then reads the round's starting model, the optimizer state
//! and the held updates a block of coordinates at a time, every held update in lockstep, and
//! writes the new global model (and the optimizer's new state) block by block to a [`ModelSink`].
//! Callers implement [`BlockSource`] and [`ModelSink`] over wherever their models live.
//!
//! ```
//! use medfl_core::aggregator::{Aggregator, Disposition, MemorySink, Output, RoundStart};
//! use medfl_core::spec::StrategySpec;
//! use medfl_core::{ModelParams, NamedTensor};
//!
//! let model = |w: f32| {
//!     ModelParams::new(vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![w, -w] }])
//! };
//! let mut agg = Aggregator::new(&StrategySpec::Fedavg, model(0.0)?.schema())?;
//! for (w, examples) in [(1.0, 10.0), (4.0, 30.0)] {
//!     let admitted = agg.admit(examples, &mut model(w)?, None)?;
//!     assert_eq!(admitted.disposition, Disposition::Folded);
//! }
//! let mut out = MemorySink::default();
//! let mut held: Vec<ModelParams> = Vec::new();
//! agg.finish(RoundStart::new(1), &mut held, &mut out)?;
//! assert_eq!(out.values(Output::Global), Some(&[3.25, -3.25][..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::client_dp::ClientDp;
use crate::fedavg::FedAvg;
use crate::spec::{DefenseSpec, NormAction, StrategySpec};
use crate::strategy::robust::{
    bulyan_block, bulyan_select, krum_select, median_block, trimmed_mean_block,
    weighted_mean_block, PairwiseDistances,
};
use crate::strategy::server_opt::ServerOptimizer;
use crate::{CoreError, ModelParams, ModelSchema, NamedTensor};

/// Coordinates read at once from each source.
pub const BLOCK: usize = 1 << 16;

/// Random access to a model's values by schema tensor: an update, the global model or optimizer
/// state, wherever it is stored.
pub trait BlockSource {
    /// What a failed read reports.
    type Error;

    /// Reads `out.len()` values of schema tensor `tensor` from element `offset`.
    fn read(&mut self, tensor: usize, offset: usize, out: &mut [f32]) -> Result<(), Self::Error>;
}

/// One of the models a round's aggregation writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Output {
    /// The new global model.
    Global,
    /// The server optimizer's first moment (momentum buffer).
    FirstMoment,
    /// The server optimizer's second moment.
    SecondMoment,
}

/// Where [`Aggregator::finish`] writes its outputs. Each output it produces is started once, then
/// receives all its values in schema order; the outputs' blocks are interleaved.
pub trait ModelSink {
    /// What a failed write reports.
    type Error;

    /// Starts `output`; its values follow.
    fn start(&mut self, output: Output) -> Result<(), Self::Error>;

    /// Appends the next `values` of `output`.
    fn write(&mut self, output: Output, values: &[f32]) -> Result<(), Self::Error>;
}

/// What a round starts from, as block sources.
pub struct RoundStart<'a, S> {
    /// Server step number: the round, from 1 (FedAdam's bias correction).
    pub step: u64,
    /// The round's starting global model: needed by the server optimizers and to clip held
    /// updates.
    pub global: Option<&'a mut S>,
    /// The optimizer's first moment after the previous round; zeros when absent.
    pub first_moment: Option<&'a mut S>,
    /// The optimizer's second moment after the previous round; zeros when absent.
    pub second_moment: Option<&'a mut S>,
}

impl<S> RoundStart<'_, S> {
    /// Step `step` with no sources yet.
    pub fn new(step: u64) -> Self {
        Self {
            step,
            global: None,
            first_moment: None,
            second_moment: None,
        }
    }
}

/// What the aggregator did with an admitted update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Folded into the running sums: the caller may let the update go.
    Folded,
    /// To be handed back, with every other held update in admission order, at
    /// [`Aggregator::finish`].
    Held,
}

/// An admitted update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admitted {
    /// Factor it was clipped by towards the global model (1 within the norm bound).
    pub scale: f32,
    /// Folded now or held for the close.
    pub disposition: Disposition,
}

/// Why [`Aggregator::admit`] did not take an update.
#[derive(Debug)]
pub enum AdmitError<E> {
    /// Refused before anything changed: over the norm bound, a bad weight, or unreadable.
    Refused(E),
    /// Failed part-way through folding: the sums are unusable, so the round must be redone with a
    /// new aggregator.
    Broken(E),
}

impl<E> AdmitError<E> {
    /// The underlying error.
    pub fn into_inner(self) -> E {
        match self {
            Self::Refused(e) | Self::Broken(e) => e,
        }
    }
}

impl<E: std::fmt::Display> std::fmt::Display for AdmitError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(e) => write!(f, "update refused: {e}"),
            Self::Broken(e) => write!(f, "folding broke off part-way: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for AdmitError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Refused(e) | Self::Broken(e) => Some(e),
        }
    }
}

/// A robust rule over every update of the round (Flower's `aggregate_*`).
#[derive(Debug, Clone, Copy)]
enum Robust {
    Median,
    TrimmedMean { beta: f64 },
    Krum { f: usize },
    MultiKrum { f: usize, keep: usize },
    Bulyan { f: usize },
}

impl Robust {
    /// Whether the rule first chooses updates by their pairwise distances.
    fn selects(self) -> bool {
        matches!(
            self,
            Self::Krum { .. } | Self::MultiKrum { .. } | Self::Bulyan { .. }
        )
    }

    /// The updates the rule keeps, from their pairwise distances.
    fn select(self, d: &PairwiseDistances) -> Result<Vec<usize>, CoreError> {
        match self {
            Self::Median | Self::TrimmedMean { .. } => Ok((0..d.len()).collect()),
            Self::Krum { f } => krum_select(d, f, 0),
            Self::MultiKrum { f, keep } => krum_select(d, f, keep),
            Self::Bulyan { f } => bulyan_select(d, f),
        }
    }

    /// One block of the result from the kept updates' `rows` (with their `weights`).
    fn block(self, rows: &[&[f32]], weights: &[f64], out: &mut [f32]) -> Result<(), CoreError> {
        match self {
            Self::Median => median_block(rows, out),
            Self::TrimmedMean { beta } => trimmed_mean_block(rows, beta, out)?,
            Self::Krum { .. } => {
                let best = rows.first().ok_or(CoreError::Empty)?;
                out.copy_from_slice(best);
            }
            Self::MultiKrum { .. } => weighted_mean_block(rows, weights, out),
            Self::Bulyan { f } => bulyan_block(rows, f, out)?,
        }
        Ok(())
    }
}

/// An update held for the close.
#[derive(Debug, Clone, Copy)]
struct Held {
    weight: f64,
    scale: f32,
}

/// How the strategy combines updates.
enum Rule {
    /// Folded into running sums; the result is their average, or a server optimizer's step on it.
    Average {
        sums: FedAvg,
        optimizer: Option<ServerOptimizer>,
    },
    /// Held until the close, then combined by a robust rule.
    Robust { rule: Robust, held: Vec<Held> },
}

/// A round's aggregation: every strategy of [`StrategySpec`], with the run's norm bound.
pub struct Aggregator {
    schema: ModelSchema,
    rule: Rule,
    norm_bound: Option<(f64, NormAction)>,
    /// Client-level DP-FedAvg: unweighted, clipped, noised, over a fixed denominator.
    client_dp: Option<ClientDp>,
    /// Coordinates per block ([`BLOCK`]; smaller in tests).
    block: usize,
    /// Set when folding failed part-way: the sums are unusable.
    broken: bool,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rule, updates): (String, usize) = match &self.rule {
            Rule::Average { sums, optimizer } => {
                (format!("average, {optimizer:?}"), sums.updates())
            }
            Rule::Robust { rule, held } => (format!("{rule:?}"), held.len()),
        };
        f.debug_struct("Aggregator")
            .field("rule", &rule)
            .field("updates", &updates)
            .field("norm_bound", &self.norm_bound)
            .field("client_dp", &self.client_dp)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Aggregator {
    /// An empty aggregator for `strategy` over models of `schema`. Errors name the offending
    /// strategy field.
    pub fn new(strategy: &StrategySpec, schema: ModelSchema) -> Result<Self, CoreError> {
        let average = |optimizer| Rule::Average {
            sums: FedAvg::new(schema.clone()),
            optimizer,
        };
        let robust = |rule| Rule::Robust {
            rule,
            held: Vec::new(),
        };
        let rule = match *strategy {
            StrategySpec::Fedavg | StrategySpec::Fedprox { .. } => average(None),
            StrategySpec::Fedavgm { .. }
            | StrategySpec::Fedadam(_)
            | StrategySpec::Fedyogi(_)
            | StrategySpec::Fedadagrad { .. } => {
                let opt = strategy.server_optimizer().ok_or_else(|| {
                    CoreError::Aggregation(format!("{} has no server optimizer", strategy.name()))
                })?;
                opt.validate()?;
                average(Some(opt))
            }
            StrategySpec::Median => robust(Robust::Median),
            StrategySpec::TrimmedMean { beta } => {
                if !(0.0..0.5).contains(&beta) {
                    return Err(CoreError::spec(
                        "strategy.beta",
                        format!("must be in [0, 0.5), got {beta}"),
                    ));
                }
                robust(Robust::TrimmedMean { beta })
            }
            StrategySpec::Krum { f } => robust(Robust::Krum { f: f as usize }),
            StrategySpec::MultiKrum { f, keep } => robust(Robust::MultiKrum {
                f: f as usize,
                keep: keep as usize,
            }),
            StrategySpec::Bulyan { f } => robust(Robust::Bulyan { f: f as usize }),
        };
        Ok(Self {
            schema,
            rule,
            norm_bound: None,
            client_dp: None,
            block: BLOCK,
            broken: false,
        })
    }

    /// Applies the run's norm bound (`defense.max_update_norm`, `defense.norm_action`) to every
    /// update admitted from now on.
    pub fn with_defense(mut self, defense: &DefenseSpec) -> Self {
        self.norm_bound = defense
            .max_update_norm
            .map(|bound| (bound, defense.norm_action));
        self
    }

    /// Applies client-level DP-FedAvg to the round: every update counts once, clipped to the
    /// round's C, and the sum is noised and divided by the expected number of sampled sites.
    /// Refused for robust rules, which have no sensitivity bound.
    pub fn with_client_dp(mut self, dp: ClientDp) -> Result<Self, CoreError> {
        if let Rule::Robust { rule, .. } = &self.rule {
            return Err(CoreError::Aggregation(format!(
                "client-level DP needs a rule that sums updates, not {rule:?}"
            )));
        }
        self.client_dp = Some(dp);
        Ok(self)
    }

    /// The round's client-level DP, when on: to count the sites' clip indicators and draw the
    /// next round's clipping norm.
    pub fn client_dp_mut(&mut self) -> Option<&mut ClientDp> {
        self.client_dp.as_mut()
    }

    /// Whether [`Self::finish`] needs the round's starting global model: a server optimizer
    /// steps from it, clipped held updates are rebuilt from it, and client-level DP adds the
    /// noised sum of differences to it.
    pub fn needs_global(&self) -> bool {
        if self.client_dp.is_some() {
            return true;
        }
        match &self.rule {
            Rule::Average { optimizer, .. } => optimizer.is_some(),
            Rule::Robust { held, .. } => held.iter().any(|h| h.scale < 1.0),
        }
    }

    /// Takes an update of `weight` (its example count): checks its distance to `global` against
    /// the norm bound, if any (refusing it, or clipping it to `global + scale * (update -
    /// global)`), then folds it in or asks the caller to hold it. `global` is the round's
    /// starting model; it is read only under a norm bound.
    pub fn admit<S>(
        &mut self,
        weight: f64,
        update: &mut S,
        mut global: Option<&mut S>,
    ) -> Result<Admitted, AdmitError<S::Error>>
    where
        S: BlockSource,
        S::Error: From<CoreError>,
    {
        let refuse = |e: CoreError| AdmitError::Refused(e.into());
        if self.broken {
            return Err(refuse(CoreError::Aggregation(
                "an earlier update broke off part-way through folding".into(),
            )));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(refuse(CoreError::Aggregation(format!(
                "update weight must be positive, got {weight}"
            ))));
        }
        let mut scale = 1.0f32;
        let dp_clips = self.client_dp.as_ref().is_some_and(|dp| dp.clips);
        if self.norm_bound.is_some() || dp_clips {
            let global = global.as_deref_mut().ok_or_else(|| {
                refuse(CoreError::Aggregation(
                    "the norm bound and client-level clipping need the round's global model".into(),
                ))
            })?;
            let norm = self.distance(update, global).map_err(AdmitError::Refused)?;
            if let Some((bound, action)) = self.norm_bound {
                if norm > bound {
                    match action {
                        NormAction::Reject => {
                            return Err(refuse(CoreError::NormBound { norm, bound }))
                        }
                        NormAction::Clip => scale = (bound / norm) as f32,
                    }
                }
            }
            if let Some(dp) = &self.client_dp {
                scale = scale.min(dp.scale(norm));
            }
        }
        // Under client-level DP every site counts once: its example count is not protected.
        let weight = if self.client_dp.is_some() {
            1.0
        } else {
            weight
        };
        let disposition = match &mut self.rule {
            Rule::Average { sums, .. } => {
                let len = buffer_len(&self.schema, self.block);
                let (mut values, mut scratch) = (vec![0f32; len], Vec::new());
                // Until the first block is added the sums are untouched: an update that cannot
                // be read from its start is refused, not a reason to redo the attempt.
                let mut touched = false;
                let folded = blocks(&self.schema, self.block).try_for_each(|b| {
                    let values = &mut values[..b.len];
                    update.read(b.tensor, b.offset, values)?;
                    if scale < 1.0 {
                        let global = global.as_deref_mut().ok_or_else(no_global)?;
                        scratch.resize(b.len, 0.0);
                        global.read(b.tensor, b.offset, &mut scratch)?;
                        clip(values, &scratch, scale);
                    }
                    touched = true;
                    sums.add_values(b.tensor, b.offset, values, weight)?;
                    Ok(())
                });
                match folded {
                    Err(e) if !touched => return Err(AdmitError::Refused(e)),
                    Err(e) => {
                        self.broken = true;
                        return Err(AdmitError::Broken(e));
                    }
                    Ok(()) => {}
                }
                sums.count(weight);
                Disposition::Folded
            }
            Rule::Robust { held, .. } => {
                held.push(Held { weight, scale });
                Disposition::Held
            }
        };
        Ok(Admitted { scale, disposition })
    }

    /// The L2 norm of `update - global`.
    fn distance<S: BlockSource>(&self, update: &mut S, global: &mut S) -> Result<f64, S::Error> {
        let len = buffer_len(&self.schema, self.block);
        let (mut u, mut g) = (vec![0f32; len], vec![0f32; len]);
        let mut sum = 0f64;
        for b in blocks(&self.schema, self.block) {
            update.read(b.tensor, b.offset, &mut u[..b.len])?;
            global.read(b.tensor, b.offset, &mut g[..b.len])?;
            sum += u[..b.len]
                .iter()
                .zip(&g[..b.len])
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>();
        }
        Ok(sum.sqrt())
    }

    /// Writes the round's result to `sink`: the new global model, plus the server optimizer's
    /// new moments. `held` are the updates [`Self::admit`] asked to hold, in admission order
    /// (none for folding strategies); they are read a block at a time, all in lockstep.
    pub fn finish<S, K>(
        mut self,
        start: RoundStart<'_, S>,
        held: &mut [S],
        sink: &mut K,
    ) -> Result<(), S::Error>
    where
        S: BlockSource,
        S::Error: From<CoreError>,
        K: ModelSink<Error = S::Error>,
    {
        if self.broken {
            return Err(CoreError::Aggregation(
                "an update broke off part-way through folding".into(),
            )
            .into());
        }
        match &self.rule {
            Rule::Average { sums, optimizer } => {
                if !held.is_empty() {
                    return Err(CoreError::Aggregation(format!(
                        "this strategy holds no updates, but {} were handed back",
                        held.len()
                    ))
                    .into());
                }
                if let Some(dp) = self.client_dp.take() {
                    // A round without updates still publishes the noise: who took part must not
                    // show in the model.
                    return self.private_step(dp, optimizer.as_ref(), sums, start, sink);
                }
                if sums.updates() == 0 {
                    return Err(CoreError::Empty.into());
                }
                match optimizer {
                    None => self.write_average(sums, sink),
                    Some(opt) => self.server_step(opt, sums, start, sink),
                }
            }
            Rule::Robust { rule, held: kept } => self.robust(*rule, kept, start, held, sink),
        }
    }

    /// Plain averaging: the average of the sums.
    fn write_average<K>(&self, sums: &FedAvg, sink: &mut K) -> Result<(), K::Error>
    where
        K: ModelSink,
        K::Error: From<CoreError>,
    {
        sink.start(Output::Global)?;
        let mut out = vec![0f32; buffer_len(&self.schema, self.block)];
        for b in blocks(&self.schema, self.block) {
            let out = &mut out[..b.len];
            sums.average_into(b.tensor, b.offset, out)?;
            sink.write(Output::Global, out)?;
        }
        Ok(())
    }

    /// One server-optimizer step from the round's starting model towards the average.
    fn server_step<S, K>(
        &self,
        opt: &ServerOptimizer,
        sums: &FedAvg,
        start: RoundStart<'_, S>,
        sink: &mut K,
    ) -> Result<(), S::Error>
    where
        S: BlockSource,
        S::Error: From<CoreError>,
        K: ModelSink<Error = S::Error>,
    {
        self.step_from_global(Some(opt), start, sink, |b, _, avg| {
            sums.average_into(b.tensor, b.offset, avg)
        })
    }

    /// Client-level DP: the noised average of the clipped differences over the fixed
    /// denominator, added to the global model, or stepped towards by the server optimizer.
    fn private_step<S, K>(
        &self,
        mut dp: ClientDp,
        optimizer: Option<&ServerOptimizer>,
        sums: &FedAvg,
        start: RoundStart<'_, S>,
        sink: &mut K,
    ) -> Result<(), S::Error>
    where
        S: BlockSource,
        S::Error: From<CoreError>,
        K: ModelSink<Error = S::Error>,
    {
        let mut sum = vec![0f64; buffer_len(&self.schema, self.block)];
        let n = sums.updates();
        self.step_from_global(optimizer, start, sink, |b, global, avg| {
            let sum = &mut sum[..b.len];
            sums.sum_into(b.tensor, b.offset, sum)?;
            dp.noised_average(global, sum, n, avg);
            Ok(())
        })
    }

    /// Writes the new global model block by block from the round's starting model and the
    /// block's `average` (filled from the global block): the average itself, or the server
    /// optimizer's step towards it with its new moments.
    fn step_from_global<S, K, A>(
        &self,
        optimizer: Option<&ServerOptimizer>,
        start: RoundStart<'_, S>,
        sink: &mut K,
        mut average: A,
    ) -> Result<(), S::Error>
    where
        S: BlockSource,
        S::Error: From<CoreError>,
        K: ModelSink<Error = S::Error>,
        A: FnMut(Block, &[f32], &mut [f32]) -> Result<(), CoreError>,
    {
        let RoundStart {
            step,
            global,
            first_moment: mut m_prev,
            second_moment: mut v_prev,
        } = start;
        let global = global.ok_or_else(no_global)?;
        let (use_m, use_v) = optimizer.map_or((false, false), |o| {
            (o.uses_first_moment(), o.uses_second_moment())
        });
        sink.start(Output::Global)?;
        if use_m {
            sink.start(Output::FirstMoment)?;
        }
        if use_v {
            sink.start(Output::SecondMoment)?;
        }
        let len = buffer_len(&self.schema, self.block);
        let (mut x, mut avg) = (vec![0f32; len], vec![0f32; len]);
        let (mut m, mut v) = (vec![0f32; len], vec![0f32; len]);
        for b in blocks(&self.schema, self.block) {
            let (x, avg) = (&mut x[..b.len], &mut avg[..b.len]);
            global.read(b.tensor, b.offset, x)?;
            average(b, x, avg)?;
            let Some(opt) = optimizer else {
                sink.write(Output::Global, avg)?;
                continue;
            };
            let m = &mut m[..if use_m { b.len } else { 0 }];
            let v = &mut v[..if use_v { b.len } else { 0 }];
            match m_prev.as_deref_mut() {
                Some(prev) if use_m => prev.read(b.tensor, b.offset, m)?,
                _ => m.fill(0.0),
            }
            match v_prev.as_deref_mut() {
                Some(prev) if use_v => prev.read(b.tensor, b.offset, v)?,
                _ => v.fill(0.0),
            }
            opt.step_block(step, x, avg, m, v);
            sink.write(Output::Global, x)?;
            if use_m {
                sink.write(Output::FirstMoment, m)?;
            }
            if use_v {
                sink.write(Output::SecondMoment, v)?;
            }
        }
        Ok(())
    }

    /// A robust rule over every held update: Krum-style rules first choose updates by their
    /// pairwise distances (one pass over all of them), then the kept ones are combined block by
    /// block.
    fn robust<S, K>(
        &self,
        rule: Robust,
        kept: &[Held],
        start: RoundStart<'_, S>,
        held: &mut [S],
        sink: &mut K,
    ) -> Result<(), S::Error>
    where
        S: BlockSource,
        S::Error: From<CoreError>,
        K: ModelSink<Error = S::Error>,
    {
        let n = held.len();
        if n != kept.len() {
            return Err(CoreError::Aggregation(format!(
                "{} updates were held, {n} handed back",
                kept.len()
            ))
            .into());
        }
        if n == 0 {
            return Err(CoreError::Empty.into());
        }
        let mut global = start.global;
        if kept.iter().any(|h| h.scale < 1.0) && global.is_none() {
            return Err(no_global().into());
        }
        let len = buffer_len(&self.schema, self.block);
        let mut rows = vec![vec![0f32; len]; n];
        let mut scratch = Vec::new();
        let all: Vec<usize> = (0..n).collect();
        let selected = if rule.selects() {
            let mut d = PairwiseDistances::new(n);
            for b in blocks(&self.schema, self.block) {
                read_held(
                    b,
                    &all,
                    held,
                    kept,
                    global.as_deref_mut(),
                    &mut scratch,
                    &mut rows,
                )?;
                let views: Vec<&[f32]> = rows.iter().map(|r| &r[..b.len]).collect();
                d.add_block(&views);
            }
            rule.select(&d)?
        } else {
            all
        };
        let weights: Vec<f64> = selected.iter().map(|&i| kept[i].weight).collect();
        sink.start(Output::Global)?;
        let mut out = vec![0f32; len];
        for b in blocks(&self.schema, self.block) {
            read_held(
                b,
                &selected,
                held,
                kept,
                global.as_deref_mut(),
                &mut scratch,
                &mut rows,
            )?;
            let views: Vec<&[f32]> = selected.iter().map(|&i| &rows[i][..b.len]).collect();
            let out = &mut out[..b.len];
            rule.block(&views, &weights, out)?;
            sink.write(Output::Global, out)?;
        }
        Ok(())
    }
}

/// A contiguous run of coordinates inside one tensor.
#[derive(Debug, Clone, Copy)]
struct Block {
    tensor: usize,
    offset: usize,
    len: usize,
}

/// The blocks of at most `size` coordinates covering `schema`, tensor by tensor in schema order.
fn blocks(schema: &ModelSchema, size: usize) -> impl Iterator<Item = Block> + '_ {
    let size = size.max(1);
    schema
        .tensors
        .iter()
        .enumerate()
        .flat_map(move |(tensor, spec)| {
            let n = spec.numel();
            (0..n).step_by(size).map(move |offset| Block {
                tensor,
                offset,
                len: size.min(n - offset),
            })
        })
}

/// The longest block of `schema` in blocks of `size`.
fn buffer_len(schema: &ModelSchema, size: usize) -> usize {
    schema
        .tensors
        .iter()
        .map(|t| t.numel())
        .max()
        .unwrap_or(0)
        .min(size.max(1))
}

fn no_global() -> CoreError {
    CoreError::Aggregation(
        "clipped updates and server optimizers need the round's global model".into(),
    )
}

/// `global + scale * (update - global)`, in place.
fn clip(values: &mut [f32], global: &[f32], scale: f32) {
    for (u, g) in values.iter_mut().zip(global) {
        *u = g + scale * (*u - g);
    }
}

/// Reads block `b` of the held updates `which` into their `rows`, clipping those admitted with a
/// scale below 1 towards `global`.
fn read_held<S>(
    b: Block,
    which: &[usize],
    held: &mut [S],
    kept: &[Held],
    mut global: Option<&mut S>,
    scratch: &mut Vec<f32>,
    rows: &mut [Vec<f32>],
) -> Result<(), S::Error>
where
    S: BlockSource,
    S::Error: From<CoreError>,
{
    let mut global_read = false;
    for &i in which {
        let row = &mut rows[i][..b.len];
        held[i].read(b.tensor, b.offset, row)?;
        let scale = kept[i].scale;
        if scale < 1.0 {
            if !global_read {
                let global = global.as_deref_mut().ok_or_else(no_global)?;
                scratch.resize(b.len, 0.0);
                global.read(b.tensor, b.offset, scratch)?;
                global_read = true;
            }
            clip(row, scratch, scale);
        }
    }
    Ok(())
}

/// An in-memory model reads as itself: tensor `i` of the schema is `tensors[i]`.
impl BlockSource for ModelParams {
    type Error = CoreError;

    fn read(&mut self, tensor: usize, offset: usize, out: &mut [f32]) -> Result<(), CoreError> {
        let values = self
            .tensors
            .get(tensor)
            .and_then(|t| t.data.get(offset..offset.saturating_add(out.len())))
            .ok_or_else(|| CoreError::Format(format!("values past the end of tensor {tensor}")))?;
        out.copy_from_slice(values);
        Ok(())
    }
}

/// A [`ModelSink`] that keeps every output in memory (tests, small models).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemorySink {
    outputs: [Option<Vec<f32>>; 3],
}

impl MemorySink {
    fn slot(output: Output) -> usize {
        match output {
            Output::Global => 0,
            Output::FirstMoment => 1,
            Output::SecondMoment => 2,
        }
    }

    /// Every value written to `output`, in schema order; `None` if it was never started.
    pub fn values(&self, output: Output) -> Option<&[f32]> {
        self.outputs[Self::slot(output)].as_deref()
    }

    /// `output` as a model of `schema`; `None` if it was never started or is incomplete.
    pub fn model(&self, output: Output, schema: &ModelSchema) -> Option<ModelParams> {
        let values = self.values(output)?;
        if values.len() != schema.numel() {
            return None;
        }
        let mut rest = values;
        let tensors = schema
            .tensors
            .iter()
            .map(|spec| {
                let (data, tail) = rest.split_at(spec.numel());
                rest = tail;
                NamedTensor {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    data: data.to_vec(),
                }
            })
            .collect();
        ModelParams::new(tensors).ok()
    }
}

impl ModelSink for MemorySink {
    type Error = CoreError;

    fn start(&mut self, output: Output) -> Result<(), CoreError> {
        self.outputs[Self::slot(output)] = Some(Vec::new());
        Ok(())
    }

    fn write(&mut self, output: Output, values: &[f32]) -> Result<(), CoreError> {
        self.outputs[Self::slot(output)]
            .as_mut()
            .ok_or_else(|| CoreError::Aggregation(format!("{output:?} written before it started")))?
            .extend_from_slice(values);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::selection::SplitMix64;
    use crate::spec::AdaptiveParams;
    use crate::strategy::robust::tests as flower;
    use crate::strategy::server_opt::tests as flower_opt;

    /// The reference layout: `layer0` [2, 2] then `layer1` [2], flattened in schema order.
    fn model(values: &[f32]) -> ModelParams {
        ModelParams::new(vec![
            NamedTensor {
                name: "layer0".into(),
                shape: vec![2, 2],
                data: values[..4].to_vec(),
            },
            NamedTensor {
                name: "layer1".into(),
                shape: vec![2],
                data: values[4..].to_vec(),
            },
        ])
        .unwrap()
    }

    fn aggregator(strategy: &StrategySpec, block: usize) -> Aggregator {
        let mut agg = Aggregator::new(strategy, model(&[0.0; 6]).schema()).unwrap();
        agg.block = block;
        agg
    }

    /// Admits `updates` (values, weight) in order, keeping what the aggregator asks to hold, then
    /// finishes from `global` and the optimizer `state` (first, second moment) at `step`.
    fn round(
        mut agg: Aggregator,
        updates: &[(&[f32], f64)],
        global: Option<&[f32]>,
        state: [Option<&[f32]>; 2],
        step: u64,
    ) -> Result<(MemorySink, Vec<Admitted>), CoreError> {
        let mut global = global.map(model);
        let (mut held, mut admitted) = (Vec::new(), Vec::new());
        for (values, weight) in updates {
            let mut update = model(values);
            let a = agg
                .admit(*weight, &mut update, global.as_mut())
                .map_err(AdmitError::into_inner)?;
            if a.disposition == Disposition::Held {
                held.push(update);
            }
            admitted.push(a);
        }
        let [mut m, mut v] = state.map(|s| s.map(model));
        let mut sink = MemorySink::default();
        let start = RoundStart {
            step,
            global: global.as_mut(),
            first_moment: m.as_mut(),
            second_moment: v.as_mut(),
        };
        agg.finish(start, &mut held, &mut sink)?;
        Ok((sink, admitted))
    }

    fn reference_updates() -> Vec<(&'static [f32], f64)> {
        flower::CLIENTS
            .iter()
            .map(|c| c.as_slice())
            .zip(flower::EXAMPLES)
            .collect()
    }

    fn global_of(sink: &MemorySink) -> Vec<f32> {
        sink.values(Output::Global).unwrap().to_vec()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            // f32 results against f64 references: 1e-6 relative to the magnitude.
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn folding_strategies_fold_every_update_and_match_flower() {
        let (l0, l1) = crate::fedavg::tests::FLOWER_FEDAVG;
        let want: Vec<f64> = l0.iter().chain(&l1).copied().collect();
        let identity_avgm = StrategySpec::Fedavgm {
            server_learning_rate: 1.0,
            momentum: 0.0,
        };
        for strategy in [
            StrategySpec::Fedavg,
            StrategySpec::Fedprox { mu: 0.01 },
            identity_avgm,
        ] {
            let whole = round(
                aggregator(&strategy, BLOCK),
                &reference_updates(),
                Some(&[0.0; 6]),
                [None, None],
                1,
            )
            .unwrap();
            assert_close(&global_of(&whole.0), &want);
            assert!(whole
                .1
                .iter()
                .all(|a| a.disposition == Disposition::Folded && a.scale == 1.0));
            // FedAvgM with learning rate 1 and no momentum keeps no state.
            assert_eq!(whole.0.values(Output::FirstMoment), None);
            for block in 1..6 {
                let (sink, _) = round(
                    aggregator(&strategy, block),
                    &reference_updates(),
                    Some(&[0.0; 6]),
                    [None, None],
                    1,
                )
                .unwrap();
                assert_eq!(sink, whole.0, "{strategy:?} in blocks of {block}");
            }
        }
    }

    #[test]
    fn robust_rules_hold_every_update_and_match_flower() {
        let cases = [
            (StrategySpec::Median, flower::FLOWER_MEDIAN),
            (
                StrategySpec::TrimmedMean { beta: 0.2 },
                flower::FLOWER_TRIMMED_MEAN_0_2,
            ),
            (StrategySpec::Krum { f: 1 }, flower::FLOWER_KRUM_F1),
            (
                StrategySpec::MultiKrum { f: 1, keep: 3 },
                flower::FLOWER_MULTIKRUM_F1_KEEP3,
            ),
        ];
        for (strategy, want) in cases {
            let (whole, admitted) = round(
                aggregator(&strategy, BLOCK),
                &reference_updates(),
                None,
                [None, None],
                1,
            )
            .unwrap();
            assert_close(&global_of(&whole), &want);
            assert!(admitted.iter().all(|a| a.disposition == Disposition::Held));
            for block in 1..6 {
                let (sink, _) = round(
                    aggregator(&strategy, block),
                    &reference_updates(),
                    None,
                    [None, None],
                    1,
                )
                .unwrap();
                assert_eq!(sink, whole, "{strategy:?} in blocks of {block}");
            }
        }
    }

    /// Every robust strategy, driven through the aggregator in small blocks, equals its kernels
    /// called on whole models.
    #[test]
    fn robust_rules_equal_their_kernels_on_random_updates() {
        let mut rng = SplitMix64::new(29);
        let (n, f) = (8, 1);
        let rows: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                (0..6)
                    .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
                    .collect()
            })
            .collect();
        let weights: Vec<f64> = (1..=n).map(|i| i as f64 * 7.0).collect();
        let views: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let mut d = PairwiseDistances::new(n);
        d.add_block(&views);
        let pick = |idx: &[usize]| -> Vec<&[f32]> { idx.iter().map(|&i| views[i]).collect() };
        let mut want = vec![vec![0f32; 6]; 5];
        median_block(&views, &mut want[0]);
        trimmed_mean_block(&views, 0.25, &mut want[1]).unwrap();
        want[2] = views[krum_select(&d, f, 0).unwrap()[0]].to_vec();
        let multi = krum_select(&d, f, 4).unwrap();
        let multi_w: Vec<f64> = multi.iter().map(|&i| weights[i]).collect();
        weighted_mean_block(&pick(&multi), &multi_w, &mut want[3]);
        bulyan_block(&pick(&bulyan_select(&d, f).unwrap()), f, &mut want[4]).unwrap();
        let strategies = [
            StrategySpec::Median,
            StrategySpec::TrimmedMean { beta: 0.25 },
            StrategySpec::Krum { f: 1 },
            StrategySpec::MultiKrum { f: 1, keep: 4 },
            StrategySpec::Bulyan { f: 1 },
        ];
        let updates: Vec<(&[f32], f64)> = views.iter().copied().zip(weights.clone()).collect();
        for (strategy, want) in strategies.iter().zip(&want) {
            for block in [1, 3, 4, BLOCK] {
                let (sink, _) =
                    round(aggregator(strategy, block), &updates, None, [None, None], 1).unwrap();
                assert_eq!(&global_of(&sink), want, "{strategy:?} in blocks of {block}");
            }
        }
    }

    /// Two FedAdam rounds with Flower's defaults: each round starts from the last one's global
    /// model and moments, as the coordinator chains them.
    #[test]
    fn server_optimizers_step_from_the_global_and_carry_their_state() {
        let adam = StrategySpec::Fedadam(AdaptiveParams {
            eta: 0.1,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-9,
        });
        let updates: Vec<(&[f32], f64)> = flower_opt::CLIENTS_012
            .iter()
            .map(|c| c.as_slice())
            .zip(flower_opt::WEIGHTS_012)
            .collect();
        for block in [1, 4, BLOCK] {
            let (mut x, mut m, mut v) = (flower_opt::X0.to_vec(), None, None);
            let mut steps = Vec::new();
            for step in 1..=2 {
                let (sink, admitted) = round(
                    aggregator(&adam, block),
                    &updates,
                    Some(&x),
                    [m.as_deref(), v.as_deref()],
                    step,
                )
                .unwrap();
                assert!(admitted
                    .iter()
                    .all(|a| a.disposition == Disposition::Folded));
                x = global_of(&sink);
                m = sink.values(Output::FirstMoment).map(<[f32]>::to_vec);
                v = sink.values(Output::SecondMoment).map(<[f32]>::to_vec);
                steps.push([x.clone(), m.clone().unwrap(), v.clone().unwrap()]);
            }
            flower_opt::check_adam(&steps, &flower_opt::FLOWER_ADAM);
        }
    }

    /// Each optimizer writes the state it keeps, and steps exactly as its kernel does.
    #[test]
    fn server_optimizers_write_the_state_they_keep() {
        let updates: Vec<(&[f32], f64)> = reference_updates();
        let global = [0.5f32, -0.5, 1.0, 2.0, 0.0, 0.25];
        let prev_m = [0.1f32; 6];
        let prev_v = [0.2f32; 6];
        let mut avg = vec![0f32; 6];
        let views: Vec<&[f32]> = updates.iter().map(|u| u.0).collect();
        let weights: Vec<f64> = updates.iter().map(|u| u.1).collect();
        weighted_mean_block(&views, &weights, &mut avg);
        let cases = [
            (
                StrategySpec::Fedavgm {
                    server_learning_rate: 0.7,
                    momentum: 0.9,
                },
                true,
                false,
            ),
            (
                StrategySpec::Fedyogi(AdaptiveParams {
                    eta: 0.01,
                    beta_1: 0.9,
                    beta_2: 0.99,
                    tau: 1e-3,
                }),
                true,
                true,
            ),
            (
                StrategySpec::Fedadagrad {
                    eta: 0.1,
                    tau: 1e-9,
                },
                false,
                true,
            ),
        ];
        for (strategy, has_m, has_v) in cases {
            let (sink, _) = round(
                aggregator(&strategy, 4),
                &updates,
                Some(&global),
                [Some(&prev_m), Some(&prev_v)],
                3,
            )
            .unwrap();
            let opt = strategy.server_optimizer().unwrap();
            let (mut x, mut m, mut v) = (global.to_vec(), prev_m.to_vec(), prev_v.to_vec());
            let (m_len, v_len) = (if has_m { 6 } else { 0 }, if has_v { 6 } else { 0 });
            opt.step_block(3, &mut x, &avg, &mut m[..m_len], &mut v[..v_len]);
            assert_eq!(global_of(&sink), x, "{strategy:?}");
            assert_eq!(sink.values(Output::FirstMoment), has_m.then_some(&m[..]));
            assert_eq!(sink.values(Output::SecondMoment), has_v.then_some(&v[..]));
        }
    }

    fn defense(bound: f64, action: NormAction) -> DefenseSpec {
        DefenseSpec {
            max_update_norm: Some(bound),
            norm_action: action,
            ..DefenseSpec::default()
        }
    }

    #[test]
    fn the_norm_bound_refuses_or_clips_towards_the_global() {
        let global = [1.0f32, 1.0, 1.0, 1.0, 0.0, 0.0];
        // Distance 5 from the global model; and one within the bound.
        let far = [4.0f32, 5.0, 1.0, 1.0, 0.0, 0.0];
        let near = [1.5f32, 1.0, 1.0, 1.0, 0.0, 0.0];
        let reject =
            aggregator(&StrategySpec::Fedavg, 3).with_defense(&defense(1.0, NormAction::Reject));
        let mut g = model(&global);
        let mut agg = reject;
        match agg.admit(1.0, &mut model(&far), Some(&mut g)) {
            Err(AdmitError::Refused(CoreError::NormBound { norm, bound })) => {
                assert_eq!((norm, bound), (5.0, 1.0));
            }
            other => panic!("expected a norm refusal, got {other:?}"),
        }
        // Nothing of the refused update was folded.
        let (sink, _) = round(agg, &[(&near, 2.0)], Some(&global), [None, None], 1).unwrap();
        assert_eq!(global_of(&sink), near);

        // Clipped to distance 1: a fifth of the way; folded and held alike.
        let clipped = [1.6f32, 1.8, 1.0, 1.0, 0.0, 0.0];
        for strategy in [StrategySpec::Fedavg, StrategySpec::Median] {
            let agg = aggregator(&strategy, 4).with_defense(&defense(1.0, NormAction::Clip));
            let (sink, admitted) =
                round(agg, &[(&far, 3.0)], Some(&global), [None, None], 1).unwrap();
            assert_eq!(admitted[0].scale, 0.2);
            assert_close(&global_of(&sink), &clipped.map(f64::from));
        }
        // A clipped held update cannot be rebuilt without the global model.
        let mut agg =
            aggregator(&StrategySpec::Median, 4).with_defense(&defense(1.0, NormAction::Clip));
        let mut held = vec![model(&far)];
        agg.admit(1.0, &mut held[0], Some(&mut g)).unwrap();
        assert!(agg.needs_global());
        let err = agg
            .finish(RoundStart::new(1), &mut held, &mut MemorySink::default())
            .unwrap_err();
        assert!(matches!(err, CoreError::Aggregation(_)), "{err}");
        // A norm bound needs the global model to measure against.
        let mut agg =
            aggregator(&StrategySpec::Fedavg, 4).with_defense(&defense(1.0, NormAction::Clip));
        assert!(matches!(
            agg.admit(1.0, &mut model(&near), None),
            Err(AdmitError::Refused(CoreError::Aggregation(_)))
        ));
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let finish =
            |agg: Aggregator, held: &mut [ModelParams], global: Option<&mut ModelParams>| {
                let start = RoundStart {
                    global,
                    ..RoundStart::new(1)
                };
                agg.finish(start, held, &mut MemorySink::default())
            };
        // Nothing admitted.
        for strategy in [StrategySpec::Fedavg, StrategySpec::Median] {
            assert_eq!(
                finish(aggregator(&strategy, 4), &mut [], None),
                Err(CoreError::Empty)
            );
        }
        // Bad weights.
        let mut agg = aggregator(&StrategySpec::Fedavg, 4);
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                agg.admit(w, &mut model(&[1.0; 6]), None),
                Err(AdmitError::Refused(CoreError::Aggregation(_)))
            ));
        }
        // A folding strategy handed held updates; a robust one handed the wrong number.
        agg.admit(1.0, &mut model(&[1.0; 6]), None).unwrap();
        assert!(matches!(
            finish(agg, &mut [model(&[1.0; 6])], None),
            Err(CoreError::Aggregation(_))
        ));
        let mut agg = aggregator(&StrategySpec::Median, 4);
        agg.admit(1.0, &mut model(&[1.0; 6]), None).unwrap();
        assert!(matches!(
            finish(agg, &mut [], None),
            Err(CoreError::Aggregation(_))
        ));
        // A server optimizer without the global model.
        let mut agg = aggregator(
            &StrategySpec::Fedadagrad {
                eta: 0.1,
                tau: 1e-9,
            },
            4,
        );
        assert!(agg.needs_global());
        agg.admit(1.0, &mut model(&[1.0; 6]), None).unwrap();
        assert!(matches!(
            finish(agg, &mut [], None),
            Err(CoreError::Aggregation(_))
        ));
        // Bad hyper-parameters are refused up front, naming the field.
        let field = |s: StrategySpec| match Aggregator::new(&s, model(&[0.0; 6]).schema()) {
            Err(CoreError::Spec { field, .. }) => field,
            other => panic!("{s:?}: expected a spec error, got {other:?}"),
        };
        assert_eq!(
            field(StrategySpec::TrimmedMean { beta: 0.5 }),
            "strategy.beta"
        );
        assert_eq!(
            field(StrategySpec::Fedadagrad { eta: 0.1, tau: 0.0 }),
            "strategy.tau"
        );
        // Too few updates for Krum: the selection's own error.
        let mut agg = aggregator(&StrategySpec::Krum { f: 1 }, 4);
        let mut held = vec![model(&[1.0; 6]), model(&[2.0; 6])];
        for u in &mut held {
            agg.admit(1.0, u, None).unwrap();
        }
        assert!(matches!(
            finish(agg, &mut held, None),
            Err(CoreError::Spec { ref field, .. }) if field == "strategy.f"
        ));
    }

    /// Reads so far, as `(source, tensor, offset)`.
    type Journal = Rc<RefCell<Vec<(usize, usize, usize)>>>;

    /// A source that logs its reads into a shared journal, and can fail at a given read.
    struct Logged {
        id: usize,
        model: ModelParams,
        journal: Journal,
        fail_at: Option<usize>,
    }

    impl BlockSource for Logged {
        type Error = CoreError;

        fn read(&mut self, tensor: usize, offset: usize, out: &mut [f32]) -> Result<(), CoreError> {
            let mut journal = self.journal.borrow_mut();
            if self.fail_at == Some(journal.len()) {
                return Err(CoreError::Format("disk on fire".into()));
            }
            journal.push((self.id, tensor, offset));
            self.model.read(tensor, offset, out)
        }
    }

    fn logged(journal: &Journal, id: usize, v: f32) -> Logged {
        Logged {
            id,
            model: model(&[v, v + 1.0, v + 2.0, v + 3.0, -v, v * v]),
            journal: journal.clone(),
            fail_at: None,
        }
    }

    /// Held updates are read a block at a time, all of them for one block before the next; a
    /// Krum-style rule makes one pass over all of them, then one over the kept ones only.
    #[test]
    fn held_updates_are_read_in_lockstep() {
        let journal = Rc::new(RefCell::new(Vec::new()));
        // Blocks of 3: layer0 [0..3), [3..4), layer1 [0..2).
        let blocks = [(0, 0), (0, 3), (1, 0)];
        for (strategy, passes) in [(StrategySpec::Median, 1), (StrategySpec::Krum { f: 1 }, 2)] {
            journal.borrow_mut().clear();
            let mut agg = aggregator(&strategy, 3);
            let mut held: Vec<Logged> = (0..4).map(|i| logged(&journal, i, i as f32)).collect();
            for u in &mut held {
                assert_eq!(
                    agg.admit(1.0, u, None).unwrap().disposition,
                    Disposition::Held
                );
            }
            // Holding reads nothing.
            assert!(journal.borrow().is_empty());
            let mut sink = MemorySink::default();
            agg.finish(RoundStart::new(1), &mut held, &mut sink)
                .unwrap();
            let mut want: Vec<(usize, usize, usize)> = blocks
                .iter()
                .flat_map(|&(t, o)| (0..4).map(move |i| (i, t, o)))
                .collect();
            if passes == 2 {
                // Krum keeps a single update, and reads only it again.
                let kept = journal.borrow()[want.len()].0;
                want.extend(blocks.iter().map(|&(t, o)| (kept, t, o)));
            }
            assert_eq!(*journal.borrow(), want, "{strategy:?}");
        }
    }

    #[test]
    fn an_update_unreadable_from_its_start_is_refused_and_the_sums_stay_good() {
        let journal = Rc::new(RefCell::new(Vec::new()));
        let mut agg = aggregator(&StrategySpec::Fedavg, 3);
        let mut bad = logged(&journal, 0, 2.0);
        bad.fail_at = Some(0);
        assert!(matches!(
            agg.admit(1.0, &mut bad, None),
            Err(AdmitError::Refused(CoreError::Format(_)))
        ));
        agg.admit(1.0, &mut logged(&journal, 1, 1.0), None)
            .expect("the aggregator is not spoilt");
    }

    #[test]
    fn a_fold_that_breaks_off_spoils_the_round() {
        let journal = Rc::new(RefCell::new(Vec::new()));
        let mut agg = aggregator(&StrategySpec::Fedavg, 3);
        agg.admit(1.0, &mut logged(&journal, 0, 1.0), None).unwrap();
        // The second update fails at its second block, after its first was folded.
        let mut bad = logged(&journal, 1, 2.0);
        bad.fail_at = Some(journal.borrow().len() + 1);
        assert!(matches!(
            agg.admit(1.0, &mut bad, None),
            Err(AdmitError::Broken(CoreError::Format(_)))
        ));
        assert!(matches!(
            agg.admit(1.0, &mut logged(&journal, 2, 3.0), None),
            Err(AdmitError::Refused(CoreError::Aggregation(_)))
        ));
        let mut held: Vec<Logged> = Vec::new();
        assert!(matches!(
            agg.finish(RoundStart::new(1), &mut held, &mut MemorySink::default()),
            Err(CoreError::Aggregation(_))
        ));
    }

    /// Every strategy of the shared reference file, through the aggregator.
    #[test]
    fn every_strategy_matches_the_shared_reference_file_when_present() {
        let Some(text) = crate::fedavg::shared_strategies_reference(
            "aggregator::every_strategy_matches_the_shared_reference_file_when_present",
        ) else {
            return;
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let flat = flower_opt::flat;
        let clients: Vec<Vec<f32>> = json["inputs"]["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| flat(c).into_iter().map(|x| x as f32).collect())
            .collect();
        let examples = flat(&json["inputs"]["num_examples"]);
        let updates: Vec<(&[f32], f64)> = clients.iter().map(Vec::as_slice).zip(examples).collect();
        let cases = [
            (StrategySpec::Fedavg, "fedavg_weighted"),
            (StrategySpec::Median, "median"),
            (
                StrategySpec::TrimmedMean { beta: 0.2 },
                "trimmed_mean_beta_0.2",
            ),
            (StrategySpec::Krum { f: 1 }, "krum_f1_to_keep0"),
            (
                StrategySpec::MultiKrum { f: 1, keep: 3 },
                "multikrum_f1_to_keep3",
            ),
        ];
        for (strategy, key) in cases {
            let (sink, _) =
                round(aggregator(&strategy, 4), &updates, None, [None, None], 1).unwrap();
            assert_close(&global_of(&sink), &flat(&json[key]));
        }
        // FedAdam: the global model starts at client 0's layer0 and a zero layer1; each round
        // aggregates clients 0, 1, 2.
        let opt = &json["server_optimizers"]["fedadam_defaults"];
        let hp = &opt["hyperparams"];
        let p = |k: &str| hp[k].as_f64().unwrap();
        let adam = StrategySpec::Fedadam(AdaptiveParams {
            eta: p("eta"),
            beta_1: p("beta_1"),
            beta_2: p("beta_2"),
            tau: p("tau"),
        });
        let mut x: Vec<f32> = clients[0][..4].iter().copied().chain([0.0, 0.0]).collect();
        let (mut m, mut v): (Option<Vec<f32>>, Option<Vec<f32>>) = (None, None);
        let mut got = Vec::new();
        let mut want = Vec::new();
        for (step, s) in (1..).zip(opt["steps"].as_array().unwrap()) {
            let (sink, _) = round(
                aggregator(&adam, 4),
                &updates[..3],
                Some(&x),
                [m.as_deref(), v.as_deref()],
                step,
            )
            .unwrap();
            x = global_of(&sink);
            m = sink.values(Output::FirstMoment).map(<[f32]>::to_vec);
            v = sink.values(Output::SecondMoment).map(<[f32]>::to_vec);
            got.push([x.clone(), m.clone().unwrap(), v.clone().unwrap()]);
            want.push(["new_params", "m_t", "v_t"].map(|k| {
                let mut a = [0.0; 6];
                a.copy_from_slice(&flat(&s[k]));
                a
            }));
        }
        assert_eq!(got.len(), 2);
        flower_opt::check_adam(&got, &want);
    }

    #[test]
    fn memory_sink_rebuilds_models() {
        let values = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let schema = model(&values).schema();
        let mut sink = MemorySink::default();
        assert!(sink.write(Output::Global, &values).is_err());
        sink.start(Output::Global).unwrap();
        sink.write(Output::Global, &values[..2]).unwrap();
        assert_eq!(sink.model(Output::Global, &schema), None);
        sink.write(Output::Global, &values[2..]).unwrap();
        assert_eq!(sink.model(Output::Global, &schema), Some(model(&values)));
        assert_eq!(sink.model(Output::FirstMoment, &schema), None);
    }

    fn client_spec(
        noise: crate::spec::NoisePlacement,
        count_noise: Option<f64>,
    ) -> crate::spec::ClientPrivacySpec {
        crate::spec::ClientPrivacySpec {
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sample_rate: 0.5,
            noise,
            adaptive_clipping: count_noise.map(|c| crate::spec::AdaptiveClipping {
                target_quantile: 0.5,
                learning_rate: 0.2,
                count_noise_multiplier: c,
            }),
            target_epsilon: None,
            delta: 1e-3,
            accountant: crate::spec::AccountantSpec::Rdp,
        }
    }

    fn client_dp(spec: &crate::spec::ClientPrivacySpec, clip: f64, expected: f64) -> ClientDp {
        ClientDp::new(spec, clip, expected, Box::new(SplitMix64::new(11))).unwrap()
    }

    #[test]
    fn client_dp_counts_each_site_once_over_the_expected_number_of_sites() {
        use crate::spec::NoisePlacement::Distributed;
        // Distributed noise: the sites added it, so the coordinator's arithmetic is exact.
        let spec = client_spec(Distributed, None);
        let global = [1.0f32; 6];
        let (a, b) = ([2.0f32; 6], [3.0f32; 6]);
        let agg = aggregator(&StrategySpec::Fedavg, 4)
            .with_client_dp(client_dp(&spec, 1.0, 4.0))
            .unwrap();
        assert!(agg.needs_global());
        // Example counts do not weigh: (1 + 2) / 4 expected sites, not a weighted mean.
        let (sink, admitted) = round(
            agg,
            &[(&a, 10.0), (&b, 1000.0)],
            Some(&global),
            [None, None],
            1,
        )
        .unwrap();
        assert!(admitted.iter().all(|a| a.scale == 1.0));
        assert_close(&global_of(&sink), &[1.75; 6]);
        // Nobody answered: the round still publishes (here noiseless) the global model.
        let agg = aggregator(&StrategySpec::Fedavg, 4)
            .with_client_dp(client_dp(&spec, 1.0, 4.0))
            .unwrap();
        let (sink, _) = round(agg, &[], Some(&global), [None, None], 1).unwrap();
        assert_close(&global_of(&sink), &[1.0; 6]);
        // A server optimizer steps towards the private average.
        let opt = StrategySpec::Fedavgm {
            server_learning_rate: 1.0,
            momentum: 0.0,
        };
        let agg = aggregator(&opt, 4)
            .with_client_dp(client_dp(&spec, 1.0, 4.0))
            .unwrap();
        let (sink, _) =
            round(agg, &[(&a, 1.0), (&b, 1.0)], Some(&global), [None, None], 1).unwrap();
        assert_close(&global_of(&sink), &[1.75; 6]);
        // Robust rules have no sensitivity bound.
        assert!(aggregator(&StrategySpec::Median, 4)
            .with_client_dp(client_dp(&spec, 1.0, 4.0))
            .is_err());
    }

    #[test]
    fn central_client_dp_clips_each_update_and_adds_z_c_noise_to_the_sum() {
        let spec = client_spec(crate::spec::NoisePlacement::Central, None);
        let n = 40_000;
        let big = |v: f32| {
            ModelParams::new(vec![NamedTensor {
                name: "w".into(),
                shape: vec![n],
                data: vec![v; n],
            }])
            .unwrap()
        };
        let mut agg = Aggregator::new(&StrategySpec::Fedavg, big(0.0).schema())
            .unwrap()
            .with_client_dp(client_dp(&spec, 0.5, 2.0))
            .unwrap();
        let mut global = big(0.0);
        // Norm 0.01·200 = 2 > C = 0.5: scaled by 1/4. Norm 0.001·200 = 0.2: kept.
        let a = agg.admit(5.0, &mut big(0.01), Some(&mut global)).unwrap();
        let b = agg.admit(5.0, &mut big(0.001), Some(&mut global)).unwrap();
        assert!(
            (a.scale - 0.25).abs() < 1e-6 && b.scale == 1.0,
            "{a:?} {b:?}"
        );
        let mut sink = MemorySink::default();
        agg.finish(
            RoundStart {
                global: Some(&mut global),
                ..RoundStart::new(1)
            },
            &mut [],
            &mut sink,
        )
        .unwrap();
        let out = global_of(&sink);
        // Mean (0.0025 + 0.001) / 2; noise sd z·C / 2 = 0.25 per coordinate.
        let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let sd = (out
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        assert!(
            (mean - 0.00175).abs() < 5.0 * 0.25 / (n as f64).sqrt(),
            "{mean}"
        );
        assert!((sd - 0.25).abs() < 0.01, "{sd}");
    }

    #[test]
    fn adaptive_clipping_follows_the_paper_sign() {
        // C ← C·exp(−η(b̄ − γ)) (Andrew et al. 2021, Algorithm 1): when more sites than γ are
        // within the clip, it shrinks; when fewer, it grows. Count noise small against 4 sites.
        let spec = client_spec(crate::spec::NoisePlacement::Central, Some(0.6));
        for (within, grows) in [(4.0, false), (0.0, true)] {
            let mut ratios = Vec::new();
            for seed in 0..200 {
                let mut dp =
                    ClientDp::new(&spec, 2.0, 4.0, Box::new(SplitMix64::new(seed))).unwrap();
                for _ in 0..within as usize {
                    dp.count_indicator(1.0);
                }
                ratios.push((dp.next_clip_norm() / 2.0).ln());
            }
            let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
            // −η(b̄ − γ) with b̄ = within / 4, on average.
            let want = -0.2 * (within / 4.0 - 0.5);
            assert!((mean - want).abs() < 0.01, "{within}: {mean} vs {want}");
            assert_eq!(mean > 0.0, grows);
        }
        // Without adaptive clipping C stays.
        let mut dp = client_dp(
            &client_spec(crate::spec::NoisePlacement::Central, None),
            2.0,
            4.0,
        );
        dp.count_indicator(1.0);
        assert_eq!(dp.next_clip_norm(), 2.0);
    }
}
