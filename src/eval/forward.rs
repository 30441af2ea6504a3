//! The one forward loop: every batch a loader yields, through every model that should see it, in
//! the context the caller asks for; what the outputs mean is the caller's.
//!
//! Evaluation, logits, resolution sweeps and BN calibration differ only in the context a forward
//! pass runs in (eval, or calibrate with an observer) and in what they keep from the output
//! (accuracy, logits, nothing), so they share this loop through a [`Visitor`]. A step is one
//! batch per point: a plain pass has one point, a sweep one per (size, crop_pct), each decoded
//! once and resized per point by the multi-transform loader.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;

use crate::data::Batch;
use crate::models::{Ctx, Model};

/// What a step feeds a model: a loader's batch, or a slice of a batch tensor given as input.
pub enum Feed {
    Images(Batch),
    Tensor(Tensor),
}

impl Feed {
    /// The input as a tensor [n, 3, H, W] on `device`, taken out of the feed (a batch's pixels
    /// move, see [`super::batch_tensor`]; the feed keeps its labels and paths).
    pub fn take_tensor(&mut self, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Feed::Images(b) => super::batch_tensor(b, device),
            Feed::Tensor(t) => Ok(t.to_device(device)?),
        }
    }
    /// Images in the step.
    pub fn len(&self) -> usize {
        match self {
            Feed::Images(b) => b.n,
            Feed::Tensor(t) => t.dims().first().copied().unwrap_or(0),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The loader's batch, when the feed came from images.
    pub fn batch(&self) -> Option<&Batch> {
        match self {
            Feed::Images(b) => Some(b),
            Feed::Tensor(_) => None,
        }
    }
}

/// The caller's side of the loop.
pub trait Visitor {
    /// The context model `model` runs in at point `point`.
    fn ctx(&mut self, model: usize, point: usize) -> Ctx<'_>;
    /// Model `model`'s logits at point `point` for `feed`, and the seconds its forward pass
    /// took (the conversion of its output included).
    fn output(
        &mut self,
        model: usize,
        point: usize,
        feed: &Feed,
        logits: &Tensor,
        secs: f64,
    ) -> Result<()>;
}

/// Runs `models[m][p]` (model `m` at point `p`) over each step of `steps`, whose `p`-th feed is
/// point `p`'s, telling `visitor` each output: within a step, point by point, and at each point
/// the models in order.
pub fn run<I>(steps: I, models: &[Vec<&Model>], visitor: &mut dyn Visitor) -> Result<()>
where
    I: Iterator<Item = Result<Vec<Feed>>>,
{
    for step in steps {
        // Point by point, so that each point's input is freed once its models have seen it: a
        // sweep's step holds a batch per size, and the larger ones are most of the step.
        for (p, mut feed) in step?.into_iter().enumerate() {
            let mut x: Option<Tensor> = None;
            for (m, per_point) in models.iter().enumerate() {
                let Some(model) = per_point.get(p) else {
                    continue;
                };
                let input = match &x {
                    Some(x) => x.to_device(&model.device)?,
                    None => x.insert(feed.take_tensor(&model.device)?).clone(),
                };
                let t0 = Instant::now();
                let y = {
                    let mut ctx = visitor.ctx(m, p);
                    model.forward(&input, &mut ctx)?
                };
                drop(input);
                let y = y.to_dtype(candle_core::DType::F32)?;
                let secs = t0.elapsed().as_secs_f64();
                visitor.output(m, p, &feed, &y, secs)?;
            }
        }
    }
    Ok(())
}

/// A single-point loader's batches as steps.
pub fn single<L>(loader: L) -> impl Iterator<Item = Result<Vec<Feed>>>
where
    L: Iterator<Item = Result<Batch>>,
{
    loader.map(|b| b.map(|b| vec![Feed::Images(b)]))
}

/// A multi-point loader's steps as feeds.
pub fn multi<L>(loader: L) -> impl Iterator<Item = Result<Vec<Feed>>>
where
    L: Iterator<Item = Result<Vec<Batch>>>,
{
    loader.map(|s| s.map(|bs| bs.into_iter().map(Feed::Images).collect()))
}
