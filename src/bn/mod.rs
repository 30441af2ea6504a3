//! Precise BatchNorm: estimating each BN layer's running statistics from the batch statistics
//! the model's calibrate mode reports, and writing them into a checkpoint.
//!
//! Two estimators, both from the same per-batch reports (mean, biased variance, element count
//! per channel), accumulated in f64:
//!
//! - `population` (default), fvcore's `update_bn_stats` with its `_PopulationVarianceEstimator`:
//!   every element weighs the same. mean = sum(n_b m_b) / sum(n_b); var = sum(n_b (v_b + m_b^2))
//!   / sum(n_b) - mean^2, where v_b is the batch's biased variance. The stored variance is this
//!   population (biased) variance, as fvcore stores it.
//! - `torch`, `torch.optim.swa_utils.update_bn` (momentum None, a cumulative average): every
//!   batch weighs the same, the short last batch included. mean = sum(m_b) / B; var =
//!   sum(v_b n_b / (n_b - 1)) / B, the mean of unbiased batch variances.
//!
//! The sums are kept, not the running estimates, so that partial passes on several machines
//! merge exactly: [`Stats`] is what `--stats-out` writes and `--merge` adds up; [`part`] owns
//! that file and the record that lets a merge refuse parts that are not one pass.

pub mod apply;
pub mod part;
pub mod pass;

pub use pass::{estimate_metadata, pass, recalibrated, recalibrated_in_memory};

use anyhow::{bail, Context, Result};

use crate::models::{BatchStats, BnObserver};

/// Which estimate of the running statistics to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Estimator {
    /// fvcore's precise BN: statistics of all elements seen, weighted by count
    #[default]
    Population,
    /// torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances
    Torch,
}

impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Estimator::Population => "population",
            Estimator::Torch => "torch",
        })
    }
}

/// Mergeable sums for one BN layer, per channel, in f64.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerSums {
    /// Elements seen per channel, over all batches.
    pub count: f64,
    /// Batches seen.
    pub batches: f64,
    /// sum over batches of n_b * m_b.
    pub sum: Vec<f64>,
    /// sum over batches of n_b * (v_b + m_b^2): the sum of squares.
    pub sum_sq: Vec<f64>,
    /// sum over batches of m_b (for the torch estimator).
    pub sum_batch_mean: Vec<f64>,
    /// sum over batches of the unbiased batch variance (for the torch estimator).
    pub sum_batch_var: Vec<f64>,
}

impl LayerSums {
    fn new(channels: usize) -> LayerSums {
        LayerSums {
            sum: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            sum_batch_mean: vec![0.0; channels],
            sum_batch_var: vec![0.0; channels],
            ..LayerSums::default()
        }
    }

    fn add_batch(&mut self, s: &BatchStats) {
        let n = s.count as f64;
        let bessel = if s.count > 1 { n / (n - 1.0) } else { f64::NAN };
        for c in 0..self.sum.len() {
            let (m, v) = (s.mean[c] as f64, s.var[c] as f64);
            self.sum[c] += n * m;
            self.sum_sq[c] += n * (v + m * m);
            self.sum_batch_mean[c] += m;
            self.sum_batch_var[c] += v * bessel;
        }
        self.count += n;
        self.batches += 1.0;
    }

    fn merge(&mut self, other: &LayerSums) {
        let add = |a: &mut Vec<f64>, b: &Vec<f64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.sum, &other.sum);
        add(&mut self.sum_sq, &other.sum_sq);
        add(&mut self.sum_batch_mean, &other.sum_batch_mean);
        add(&mut self.sum_batch_var, &other.sum_batch_var);
        self.count += other.count;
        self.batches += other.batches;
    }

    /// (running_mean, running_var) under `est`, in f64.
    pub fn estimate(&self, est: Estimator) -> (Vec<f64>, Vec<f64>) {
        match est {
            Estimator::Population => {
                let mean: Vec<f64> = self.sum.iter().map(|s| s / self.count).collect();
                let var = self
                    .sum_sq
                    .iter()
                    .zip(&mean)
                    .map(|(q, m)| (q / self.count - m * m).max(0.0))
                    .collect();
                (mean, var)
            }
            Estimator::Torch => (
                self.sum_batch_mean
                    .iter()
                    .map(|s| s / self.batches)
                    .collect(),
                self.sum_batch_var
                    .iter()
                    .map(|s| s / self.batches)
                    .collect(),
            ),
        }
    }
}

/// The sums of every BN layer of a model, in forward order, with their state-dict prefixes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub layers: Vec<String>,
    pub sums: Vec<LayerSums>,
    /// Batches of images seen (the model's forward passes).
    pub batches: u64,
    /// Images seen.
    pub images: u64,
}

impl Stats {
    pub fn new(layers: Vec<String>) -> Stats {
        Stats {
            sums: vec![LayerSums::default(); layers.len()],
            layers,
            batches: 0,
            images: 0,
        }
    }

    /// Adds another partial pass over other images (a shard) of the same model.
    pub fn merge(&mut self, other: &Stats) -> Result<()> {
        if self.layers != other.layers {
            bail!("the statistics are of different models (their BN layers differ)");
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            if a.sum.is_empty() {
                *a = b.clone();
            } else if !b.sum.is_empty() {
                if a.sum.len() != b.sum.len() {
                    bail!("BN layer channel counts differ between the statistics");
                }
                a.merge(b);
            }
        }
        self.batches += other.batches;
        self.images += other.images;
        Ok(())
    }

    /// Running statistics per layer under `est`, checked to be finite.
    pub fn estimates(&self, est: Estimator) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        self.layers
            .iter()
            .zip(&self.sums)
            .map(|(name, s)| {
                if s.count == 0.0 {
                    bail!("BN layer {name} saw no data");
                }
                let (m, v) = s.estimate(est);
                if let Some(c) = m.iter().chain(&v).position(|x| !x.is_finite()) {
                    bail!(
                        "BN layer {name}: the {est} estimate of channel {} is not finite",
                        c % m.len()
                    );
                }
                Ok((m, v))
            })
            .collect()
    }
}

/// Collects calibrate-mode reports from forward passes into [`Stats`].
pub struct Accumulator {
    pub stats: Stats,
    /// The batch being processed, to name it in errors.
    pub batch: u64,
}

impl Accumulator {
    pub fn new(layers: Vec<String>) -> Accumulator {
        Accumulator {
            stats: Stats::new(layers),
            batch: 0,
        }
    }

    /// Marks the end of a forward pass over `images` images.
    pub fn end_batch(&mut self, images: usize) {
        self.stats.batches += 1;
        self.stats.images += images as u64;
        self.batch += 1;
    }
}

impl BnObserver for Accumulator {
    fn observe(&mut self, layer: usize, s: BatchStats) -> candle_core::Result<()> {
        let name = &self.stats.layers[layer];
        if let Some(c) = s.mean.iter().chain(&s.var).position(|x| !x.is_finite()) {
            candle_core::bail!(
                "BN layer {name}: batch {} gives a non-finite statistic in channel {}",
                self.batch + 1,
                c % s.mean.len()
            );
        }
        let sums = &mut self.stats.sums[layer];
        if sums.sum.is_empty() {
            *sums = LayerSums::new(s.mean.len());
        }
        sums.add_batch(&s);
        Ok(())
    }
}

/// A calibrate pass in the forward loop: every model runs in calibrate mode reporting here, and
/// each output ends a batch.
impl crate::eval::forward::Visitor for Accumulator {
    fn ctx(&mut self, _: usize, _: usize) -> crate::models::Ctx<'_> {
        crate::models::Ctx::calibrate(self)
    }
    fn output(
        &mut self,
        _: usize,
        _: usize,
        feed: &crate::eval::forward::Feed,
        _: &candle_core::Tensor,
        _: f64,
    ) -> Result<()> {
        self.end_batch(feed.len());
        Ok(())
    }
}

/// Names of the tensors a stats file holds for layer `i`.
fn key(i: usize, what: &str) -> String {
    format!("layer{i}.{what}")
}

/// The stats as f64 tensors (`layer{i}.sum`, ... and `layer{i}.count`), with the layer names and
/// totals in the metadata: the `--stats-out` file.
pub fn to_tensors(s: &Stats) -> Vec<(String, Vec<f64>)> {
    let mut out = Vec::new();
    for (i, l) in s.sums.iter().enumerate() {
        out.push((key(i, "count"), vec![l.count, l.batches]));
        out.push((key(i, "sum"), l.sum.clone()));
        out.push((key(i, "sum_sq"), l.sum_sq.clone()));
        out.push((key(i, "sum_batch_mean"), l.sum_batch_mean.clone()));
        out.push((key(i, "sum_batch_var"), l.sum_batch_var.clone()));
    }
    out
}

/// Reads back what [`to_tensors`] wrote, given the layer names and totals from the metadata.
pub fn from_tensors(
    layers: Vec<String>,
    batches: u64,
    images: u64,
    get: impl Fn(&str) -> Option<Vec<f64>>,
) -> Result<Stats> {
    let mut s = Stats::new(layers);
    s.batches = batches;
    s.images = images;
    for i in 0..s.layers.len() {
        let need = |w: &str| get(&key(i, w)).with_context(|| format!("no tensor {}", key(i, w)));
        let count = need("count")?;
        if count.len() != 2 {
            bail!("tensor {} should hold [count, batches]", key(i, "count"));
        }
        s.sums[i] = LayerSums {
            count: count[0],
            batches: count[1],
            sum: need("sum")?,
            sum_sq: need("sum_sq")?,
            sum_batch_mean: need("sum_batch_mean")?,
            sum_batch_var: need("sum_batch_var")?,
        };
    }
    Ok(s)
}

/// Runs every batch of `loader` through `model` in calibrate mode and collects the statistics.
pub fn calibrate(model: &crate::models::Model, loader: &mut crate::data::Loader) -> Result<Stats> {
    calibrate_batches(model, loader.by_ref())
}

/// As [`calibrate`], over any batches (held ones, see [`crate::data::Batches`]).
pub fn calibrate_batches<I>(model: &crate::models::Model, batches: I) -> Result<Stats>
where
    I: Iterator<Item = Result<crate::data::Batch>>,
{
    use crate::eval::forward;
    let mut acc = Accumulator::new(model.bn_layers.clone());
    forward::run(forward::single(batches), &[vec![model]], &mut acc)?;
    if acc.stats.batches == 0 {
        bail!("no images were read");
    }
    Ok(acc.stats)
}

/// Metadata keys of a `--stats-out` file.
pub const META_LAYERS: &str = "ckpt.bn.layers";
pub const META_BATCHES: &str = "ckpt.bn.batches";
pub const META_IMAGES: &str = "ckpt.bn.images";

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(values: &[f32]) -> BatchStats {
        let n = values.len() as f32;
        let m = values.iter().sum::<f32>() / n;
        let v = values.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / n;
        BatchStats {
            mean: vec![m],
            var: vec![v],
            count: values.len(),
        }
    }

    #[test]
    fn population_is_the_statistics_of_all_elements() {
        let mut a = Accumulator::new(vec!["bn".into()]);
        let b1 = [1.0, 2.0, 3.0, 4.0];
        let b2 = [10.0, 20.0];
        a.observe(0, batch(&b1)).unwrap();
        a.observe(0, batch(&b2)).unwrap();
        let (m, v) = a.stats.sums[0].estimate(Estimator::Population);
        let all: Vec<f64> = b1.iter().chain(&b2).map(|&x| x as f64).collect();
        let mean = all.iter().sum::<f64>() / 6.0;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 6.0;
        assert!((m[0] - mean).abs() < 1e-9 && (v[0] - var).abs() < 1e-6);
        // torch: equal-weight mean of batch means and of unbiased variances.
        let (m, v) = a.stats.sums[0].estimate(Estimator::Torch);
        assert!((m[0] - (2.5 + 15.0) / 2.0).abs() < 1e-9);
        assert!((v[0] - (5.0 / 3.0 + 50.0) / 2.0).abs() < 1e-5);
    }

    #[test]
    fn merged_shards_equal_one_pass() {
        let batches = [
            vec![1.0, 5.0, 2.0],
            vec![3.0, 3.5],
            vec![-1.0, 0.0, 8.0, 2.0],
        ];
        let mut one = Accumulator::new(vec!["bn".into()]);
        let mut s1 = Accumulator::new(vec!["bn".into()]);
        let mut s2 = Accumulator::new(vec!["bn".into()]);
        for (i, b) in batches.iter().enumerate() {
            one.observe(0, batch(b)).unwrap();
            let part = if i % 2 == 0 { &mut s1 } else { &mut s2 };
            part.observe(0, batch(b)).unwrap();
        }
        s1.stats.merge(&s2.stats).unwrap();
        for est in [Estimator::Population, Estimator::Torch] {
            let (a, b) = (
                one.stats.sums[0].estimate(est),
                s1.stats.sums[0].estimate(est),
            );
            assert!(
                (a.0[0] - b.0[0]).abs() <= 1e-12 * a.0[0].abs()
                    && (a.1[0] - b.1[0]).abs() <= 1e-12 * a.1[0].abs()
            );
        }
    }
}
