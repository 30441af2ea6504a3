//! Resolution sweeps: accuracy of one or more models at several test sizes and crop fractions,
//! from one decode per image.
//!
//! Each image is decoded once per pass and resized to every (size, crop_pct) point from the
//! decoded pixels (the data pipeline's multi-transform loader); every model is evaluated on every
//! point's batch. With BN re-estimation (FixRes-lite) each point has its own model: the same
//! weights with BN statistics recomputed at that point's size.

use std::time::Instant;

use anyhow::Result;

use crate::data::MultiLoader;
use crate::eval::{batch_tensor, Accuracy};
use crate::models::{Ctx, Model};

/// The accuracy of one model at one point, and its forward time.
#[derive(Clone, Debug, Default)]
pub struct PointResult {
    pub accuracy: Accuracy,
    pub forward_secs: f64,
}

/// Runs `models[m][p]` (model `m` at point `p`) over each step of `loader`, whose `p`-th batch
/// is point `p`'s. Returns results indexed as the models.
pub fn run(models: &[Vec<&Model>], loader: &mut MultiLoader) -> Result<Vec<Vec<PointResult>>> {
    let mut out: Vec<Vec<PointResult>> = models
        .iter()
        .map(|m| vec![PointResult::default(); m.len()])
        .collect();
    for step in loader.by_ref() {
        let batches = step?;
        for (m, per_point) in models.iter().enumerate() {
            for (p, (model, b)) in per_point.iter().zip(&batches).enumerate() {
                let t0 = Instant::now();
                let y = model.forward(&batch_tensor(b, &model.device)?, &mut Ctx::eval())?;
                let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
                out[m][p].forward_secs += t0.elapsed().as_secs_f64();
                if let Some(labels) = &b.labels {
                    out[m][p]
                        .accuracy
                        .add(&v, model.config.num_classes(), labels)?;
                }
            }
        }
    }
    Ok(out)
}
