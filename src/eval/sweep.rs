//! Resolution sweeps: accuracy of one or more models at several test sizes and crop fractions,
//! from one decode per image.
//!
//! Each image is decoded once per pass and resized to every (size, crop_pct) point from the
//! decoded pixels (the data pipeline's multi-transform loader); every model is evaluated on every
//! point's batch. With BN re-estimation (FixRes-lite) each point has its own model: the same
//! weights with BN statistics recomputed at that point's size.
//!
//! The results become [`Row`]s (timm's results-CSV columns plus deltas and the best point), a
//! CSV, and a chart.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Tensor;

use crate::data::{EvalTransform, MultiLoader};
use crate::eval::forward::{self, Feed};
use crate::eval::Accuracy;
use crate::models::{Ctx, Model};
use crate::plot::{Chart, Series};

/// The accuracy of one model at one point, and its forward time.
#[derive(Clone, Debug, Default)]
pub struct PointResult {
    pub accuracy: Accuracy,
    pub forward_secs: f64,
}

/// Runs `models[m][p]` (model `m` at point `p`) over each step of `loader`, whose `p`-th batch
/// is point `p`'s. Returns results indexed as the models.
pub fn run(models: &[Vec<&Model>], loader: &mut MultiLoader) -> Result<Vec<Vec<PointResult>>> {
    struct Measure(Vec<Vec<PointResult>>);
    impl forward::Visitor for Measure {
        fn ctx(&mut self, _: usize, _: usize) -> Ctx<'_> {
            Ctx::eval()
        }
        fn output(&mut self, m: usize, p: usize, f: &Feed, y: &Tensor, secs: f64) -> Result<()> {
            let r = &mut self.0[m][p];
            let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
            r.forward_secs += secs;
            if let Some(labels) = f.batch().and_then(|b| b.labels.as_ref()) {
                let classes = y.dims2()?.1;
                r.accuracy.add(&v, classes, labels)?;
            }
            Ok(())
        }
    }
    let mut measure = Measure(
        models
            .iter()
            .map(|m| vec![PointResult::default(); m.len()])
            .collect(),
    );
    forward::run(forward::multi(loader.by_ref()), models, &mut measure)?;
    Ok(measure.0)
}

/// One row of the results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub model: String,
    pub img_size: u32,
    pub resize: u32,
    pub crop_pct: f64,
    pub interpolation: String,
    pub top1: f64,
    pub top5: f64,
    pub images: u64,
    /// Top-1 minus top-1 at the training size (same model and crop_pct), if measured.
    pub delta_top1: Option<f64>,
    pub images_per_second: f64,
    /// Parameters in millions.
    pub param_count: f64,
    pub best: bool,
    pub recal_bn: bool,
    /// Whether the model was fine-tuned at this point (`--fixres`).
    pub fixres: bool,
    /// Where the labels came from (`folder-order`, `class-map`, `imagenet-1k-synsets`).
    pub labelling: &'static str,
}

/// Sizes from 0.75x to 1.5x of `train`, multiples of 32 (always including `train`).
pub fn default_sizes(train: u32) -> Vec<u32> {
    let lo = ((train as f64 * 0.75) as u32 / 32 * 32).max(32);
    let hi = (train as f64 * 1.5) as u32;
    let mut v: Vec<u32> = (lo..=hi).step_by(32).collect();
    if !v.contains(&train) {
        v.push(train);
        v.sort();
    }
    v
}

fn label(p: &Path, all: &[PathBuf]) -> String {
    let stem = p
        .file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .to_string();
    let stem = stem
        .split(".safetensors")
        .next()
        .unwrap_or(&stem)
        .split(".pth")
        .next()
        .unwrap_or(&stem)
        .to_string();
    let clash = all
        .iter()
        .filter(|q| q.file_name() == p.file_name())
        .count()
        > 1;
    if clash {
        p.display().to_string()
    } else {
        stem
    }
}

/// The results as rows, model by model: deltas against the training size and each model's
/// best point marked (highest top-1, then top-5, then the smaller size).
///
/// `models` are the checkpoints' paths as given and their parameter counts; `recal_bn` says
/// whether each point had its own BN statistics, `fixres` its own fine-tuned head, `labelling` where the labels came from.
pub fn rows(
    models: &[(PathBuf, usize)],
    points: &[EvalTransform],
    results: &[Vec<PointResult>],
    train: u32,
    recal_bn: bool,
    fixres: bool,
    labelling: &'static str,
) -> Vec<Row> {
    let paths: Vec<PathBuf> = models.iter().map(|(p, _)| p.clone()).collect();
    let mut rows = Vec::new();
    for (m, (path, params)) in models.iter().enumerate() {
        let name = label(path, &paths);
        let params = *params as f64 / 1e6;
        let start = rows.len();
        for (p, t) in points.iter().enumerate() {
            let r = &results[m][p];
            rows.push(Row {
                model: name.clone(),
                img_size: t.size,
                resize: t.scale_size(),
                crop_pct: t.crop_pct,
                interpolation: t.interpolation.name().to_string(),
                top1: r.accuracy.top1(),
                top5: r.accuracy.top5(),
                images: r.accuracy.images,
                delta_top1: None,
                images_per_second: r.accuracy.images as f64 / r.forward_secs.max(1e-9),
                param_count: params,
                best: false,
                recal_bn,
                fixres,
                labelling,
            });
        }
        let block = &mut rows[start..];
        let at_train: Vec<(f64, f64)> = block
            .iter()
            .filter(|r| r.img_size == train)
            .map(|r| (r.crop_pct, r.top1))
            .collect();
        for r in block.iter_mut() {
            r.delta_top1 = at_train
                .iter()
                .find(|(c, _)| *c == r.crop_pct)
                .map(|(_, t)| r.top1 - t);
        }
        if let Some(b) = (0..block.len()).max_by(|&i, &j| {
            (
                block[i].top1,
                block[i].top5,
                std::cmp::Reverse(block[i].img_size),
            )
                .partial_cmp(&(
                    block[j].top1,
                    block[j].top5,
                    std::cmp::Reverse(block[j].img_size),
                ))
                .unwrap_or(std::cmp::Ordering::Equal)
        }) {
            block[b].best = true;
        }
    }
    rows
}

/// timm's results-imagenet.csv layout; accuracies in percent, parameters in millions.
pub fn to_csv(rows: &[Row]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "model",
        "img_size",
        "top1",
        "top1_err",
        "top5",
        "top5_err",
        "param_count",
        "crop_pct",
        "interpolation",
    ])?;
    for r in rows {
        w.write_record([
            r.model.clone(),
            r.img_size.to_string(),
            format!("{:.3}", r.top1),
            format!("{:.3}", 100.0 - r.top1),
            format!("{:.3}", r.top5),
            format!("{:.3}", 100.0 - r.top5),
            format!("{:.2}", r.param_count),
            format!("{:.3}", r.crop_pct),
            r.interpolation.clone(),
        ])?;
    }
    w.into_inner()
        .map_err(|e| anyhow::anyhow!("writing CSV: {e}"))
}

/// Top-1 against test size, one line per model and crop_pct, the training size marked.
pub fn chart(rows: &[Row], train: u32) -> Chart {
    let mut series: Vec<Series> = Vec::new();
    for r in rows {
        let label = if rows.iter().any(|o| o.crop_pct != r.crop_pct) {
            format!("{} @{}", r.model, r.crop_pct)
        } else {
            r.model.clone()
        };
        match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push((r.img_size as f64, r.top1)),
            None => series.push(Series {
                label,
                points: vec![(r.img_size as f64, r.top1)],
            }),
        }
    }
    Chart {
        title: "top-1 accuracy against test size".into(),
        x_label: "test size (px)".into(),
        y_label: "top-1 %".into(),
        series,
        marker: Some((train as f64, format!("train {train}"))),
    }
}
