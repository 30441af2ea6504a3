//! Forward passes over data and what is measured from them: logits, top-k, accuracy,
//! resolution sweeps. Results are data; commands format them. Every pass goes through the one
//! loop in [`forward`].

pub mod forward;
pub mod sweep;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use forward::Feed;

use crate::data::{Batch, LoadSummary, Loader};

use crate::checkpoint::dtype as ckdtype;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::models::{Ctx, Model};
use crate::report::Reporter;

/// Tensor `name` of `ck`, checked to be a float batch [N, 3, H, W].
pub fn input_batch<'a>(ck: &'a Checkpoint, name: &str) -> Result<&'a TensorInfo> {
    let t = ck.get(name).with_context(|| {
        format!(
            "{}: no tensor {name:?} (expected an N x 3 x H x W batch)",
            ck.path.display()
        )
    })?;
    if t.shape.len() != 4 || t.shape[1] != 3 {
        bail!(
            "{}: tensor {name} has shape {:?}, expected [N, 3, H, W]",
            ck.path.display(),
            t.shape
        );
    }
    if !t.dtype.is_arithmetic_float() {
        bail!(
            "{}: tensor {name} is {}, expected a float tensor",
            ck.path.display(),
            t.dtype
        );
    }
    if t.shape.contains(&0) {
        bail!(
            "{}: tensor {name} has shape {:?}: no images",
            ck.path.display(),
            t.shape
        );
    }
    Ok(t)
}

/// Reads tensor `name` of `ck` whole, as an f32 batch [N, 3, H, W] on the model's device
/// (checked as [`input_batch`] does).
pub fn read_input_batch(ck: &Checkpoint, name: &str, model: &Model) -> Result<Tensor> {
    let t = input_batch(ck, name)?;
    let v = ckdtype::to_f32_vec(&ck.bytes(t), t.dtype);
    Ok(Tensor::from_vec(v, t.shape.clone(), &model.device)?)
}

/// Eval-mode logits [N, classes] in f32 of the input batch `t` of `ck` (see [`input_batch`]),
/// `batch` images at a time. Each batch is read from the (mapped) file and converted to f32 on
/// the model's device only when its turn comes, so memory holds one batch of the input, not
/// all of it.
pub fn input_logits(
    model: &Model,
    ck: &Checkpoint,
    t: &TensorInfo,
    batch: usize,
    rep: &Reporter,
) -> Result<Tensor> {
    let n = t.shape[0];
    let per_image: usize = t.shape[1..].iter().product();
    let batch = batch.max(1);
    let steps = (0..n).step_by(batch).map(|start| {
        let len = batch.min(n - start);
        let bytes = ck.elements(t, start * per_image, (start + len) * per_image);
        let v = ckdtype::to_f32_vec(&bytes, t.dtype);
        drop(bytes);
        // The batch's pages of the mapped file have been read: out of resident memory with them
        // (they stay in the page cache), so that the input file's pages do not add up to a
        // second copy of the whole input over the run.
        ck.release_elements(t, start * per_image, (start + len) * per_image);
        let mut shape = t.shape.clone();
        shape[0] = len;
        Ok(vec![Feed::Tensor(Tensor::from_vec(
            v,
            shape,
            &model.device,
        )?)])
    });
    logits_of(model, steps, n, rep)
}

/// Eval-mode logits [N, classes] in f32 of the `n` images the steps feed.
fn logits_of<I>(model: &Model, steps: I, n: usize, rep: &Reporter) -> Result<Tensor>
where
    I: Iterator<Item = Result<Vec<Feed>>>,
{
    struct Keep<'b> {
        parts: Vec<Tensor>,
        bar: &'b indicatif::ProgressBar,
    }
    impl forward::Visitor for Keep<'_> {
        fn ctx(&mut self, _: usize, _: usize) -> Ctx<'_> {
            Ctx::eval()
        }
        fn output(&mut self, _: usize, _: usize, f: &Feed, y: &Tensor, _: f64) -> Result<()> {
            self.parts.push(y.clone());
            self.bar.inc(f.len() as u64);
            Ok(())
        }
    }
    let bar = rep.images_bar(n as u64, "logits");
    let mut keep = Keep {
        parts: Vec::new(),
        bar: &bar,
    };
    forward::run(steps, &[vec![model]], &mut keep)?;
    bar.finish_and_clear();
    Ok(Tensor::cat(&keep.parts, 0)?)
}

/// A loader batch's pixels as a tensor [n, 3, size, size] on `device`, taken out of the batch:
/// they move into the tensor without a copy (on the CPU), and the batch keeps its labels and
/// paths. A second call gives an error.
pub fn batch_tensor(b: &mut Batch, device: &candle_core::Device) -> Result<Tensor> {
    let s = b.size as usize;
    let images = std::mem::take(&mut b.images);
    if images.len() != b.n * 3 * s * s {
        anyhow::bail!("internal error: a batch's pixels were taken twice");
    }
    let t = Tensor::from_vec(images, (b.n, 3, s, s), &candle_core::Device::Cpu)?;
    Ok(t.to_device(device)?)
}

/// What one eval-mode pass over a folder gave.
#[derive(Debug, Default)]
pub struct Pass {
    /// Row-major [images, classes], when asked to keep them.
    pub logits: Vec<f32>,
    pub classes: usize,
    pub labels: Vec<i64>,
    pub paths: Vec<PathBuf>,
    /// For labelled folders.
    pub accuracy: Option<Accuracy>,
    pub summary: LoadSummary,
    /// The teachers' logits, averaged, row-major as `logits` (passes with teachers only).
    pub teacher_logits: Vec<f32>,
}

/// Runs the model in eval mode over every batch of `loader`, measuring accuracy when the folder
/// is labelled and keeping the logits when `keep_logits`.
pub fn eval_pass(model: &Model, loader: &mut Loader, keep_logits: bool) -> Result<Pass> {
    eval_pass_with(model, &[], loader, keep_logits)
}

/// As [`eval_pass`], with `teachers` run on the same batches (each image decoded once) and
/// their averaged logits kept in [`Pass::teacher_logits`].
pub fn eval_pass_with(
    model: &Model,
    teachers: &[&Model],
    loader: &mut Loader,
    keep_logits: bool,
) -> Result<Pass> {
    let mut pass = eval_batches_with(model, teachers, loader.by_ref(), keep_logits)?;
    pass.summary = loader.summary().clone();
    Ok(pass)
}

/// As [`eval_pass`], over any batches (held ones, see [`crate::data::Batches`]); the pass's
/// load summary is left empty.
pub fn eval_batches<I>(model: &Model, batches: I, keep_logits: bool) -> Result<Pass>
where
    I: Iterator<Item = Result<Batch>>,
{
    eval_batches_with(model, &[], batches, keep_logits)
}

fn eval_batches_with<I>(
    model: &Model,
    teachers: &[&Model],
    batches: I,
    keep_logits: bool,
) -> Result<Pass>
where
    I: Iterator<Item = Result<Batch>>,
{
    struct Collect {
        pass: Pass,
        keep_logits: bool,
        teachers: usize,
    }
    impl forward::Visitor for Collect {
        fn ctx(&mut self, _: usize, _: usize) -> Ctx<'_> {
            Ctx::eval()
        }
        fn output(&mut self, m: usize, _: usize, f: &Feed, y: &Tensor, _: f64) -> Result<()> {
            let b = f.batch().context("eval pass over a tensor")?;
            let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
            let pass = &mut self.pass;
            if m > 0 {
                // Teacher m of the batch: the first starts the batch's rows, the rest add in.
                let w = 1.0 / self.teachers as f32;
                let t = &mut pass.teacher_logits;
                if m == 1 {
                    t.extend(v.iter().map(|x| x * w));
                } else {
                    let start = t.len() - v.len();
                    for (a, x) in t[start..].iter_mut().zip(&v) {
                        *a += x * w;
                    }
                }
                return Ok(());
            }
            if let Some(labels) = &b.labels {
                pass.accuracy.get_or_insert_with(Accuracy::default).add(
                    &v,
                    pass.classes,
                    labels,
                )?;
                pass.labels.extend_from_slice(labels);
            }
            if self.keep_logits {
                pass.logits.extend_from_slice(&v);
            }
            pass.paths.extend(b.paths.iter().cloned());
            Ok(())
        }
    }
    let mut c = Collect {
        pass: Pass {
            classes: model.config.num_classes(),
            ..Pass::default()
        },
        keep_logits,
        teachers: teachers.len(),
    };
    let mut models = vec![vec![model]];
    models.extend(teachers.iter().map(|t| vec![*t]));
    forward::run(forward::single(batches), &models, &mut c)?;
    Ok(c.pass)
}

/// The `k` largest values per row and their indices (ties: the lower index first).
pub fn top_k(logits: &[f32], classes: usize, k: usize) -> (Vec<f32>, Vec<i64>) {
    let mut values = Vec::new();
    let mut indices = Vec::new();
    for row in logits.chunks(classes) {
        let mut idx: Vec<usize> = (0..classes).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in idx.iter().take(k) {
            values.push(row[i]);
            indices.push(i as i64);
        }
    }
    (values, indices)
}

/// Running top-1 / top-5 / cross-entropy over labelled batches.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Accuracy {
    pub images: u64,
    pub top1_correct: u64,
    pub top5_correct: u64,
    /// Sum of per-image cross-entropy (natural log), in f64.
    pub loss_sum: f64,
}

impl Accuracy {
    /// Adds a batch of logits [n, classes] (row-major) with their labels.
    pub fn add(&mut self, logits: &[f32], classes: usize, labels: &[i64]) -> Result<()> {
        for (row, &label) in logits.chunks(classes).zip(labels) {
            let l = usize::try_from(label).ok().filter(|&l| l < classes).with_context(|| {
                format!("label {label} is not a class of a model with {classes} outputs (does the folder have more classes than the model?)")
            })?;
            let target = row[l];
            // Rank of the target: how many logits beat it (ties count against it, as torch's
            // topk would place the lower index first only by chance).
            let better = row
                .iter()
                .enumerate()
                .filter(|&(i, &x)| x > target || (x == target && i < l))
                .count();
            self.top1_correct += u64::from(better < 1);
            self.top5_correct += u64::from(better < 5);
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            self.loss_sum += lse - target as f64;
            self.images += 1;
        }
        Ok(())
    }

    /// Top-1 accuracy in percent.
    pub fn top1(&self) -> f64 {
        100.0 * self.top1_correct as f64 / self.images.max(1) as f64
    }
    /// Top-5 accuracy in percent.
    pub fn top5(&self) -> f64 {
        100.0 * self.top5_correct as f64 / self.images.max(1) as f64
    }
    /// Mean cross-entropy.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.images.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_ranks_and_loss() {
        let mut a = Accuracy::default();
        // Two images, 6 classes: the first is right, the second's label ranks third.
        let logits = [5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0, 1.0, 4.0, 0.0];
        a.add(&logits, 6, &[0, 3]).unwrap();
        assert_eq!((a.top1_correct, a.top5_correct, a.images), (1, 2, 2));
        let lse0 = (5f64.exp() + 1f64.exp() + 4.0).ln();
        let lse1 = (1.0 + 3f64.exp() + 2f64.exp() + 1f64.exp() + 4f64.exp() + 1.0).ln();
        assert!((a.loss() - ((lse0 - 5.0) + (lse1 - 1.0)) / 2.0).abs() < 1e-9);
        assert!(a.add(&logits[..6], 6, &[6]).is_err());
    }
}

/// A student's logits against a teacher's over the same images (see [`compare_with_teacher`]).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct TeacherComparison {
    /// The seed's KLSoftLoss over all images: KL(softmax(t / T) || softmax(s / T)) averaged
    /// over the images, times T^2 (distillation's KD term).
    pub kd_loss: f64,
    /// Percentage of images on which the student's top-1 class is the teacher's.
    pub agreement: f64,
    pub images: usize,
}

/// Compares row-major [images, classes] logits of a student and a teacher, in f64.
pub fn compare_with_teacher(
    student: &[f32],
    teacher: &[f32],
    classes: usize,
    temperature: f64,
) -> TeacherComparison {
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let z: Vec<f64> = row.iter().map(|&x| x as f64 / temperature).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        z.iter().map(|x| x - lse).collect()
    };
    let argmax =
        |row: &[f32]| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best });
    let (mut kl, mut agree, mut images) = (0f64, 0usize, 0usize);
    for (s, t) in student
        .chunks_exact(classes.max(1))
        .zip(teacher.chunks_exact(classes.max(1)))
    {
        let (ls, lt) = (log_softmax(s), log_softmax(t));
        kl += lt
            .iter()
            .zip(&ls)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        agree += (argmax(s) == argmax(t)) as usize;
        images += 1;
    }
    let n = images.max(1) as f64;
    TeacherComparison {
        kd_loss: kl / n * temperature * temperature,
        agreement: 100.0 * agree as f64 / n,
        images,
    }
}

#[cfg(test)]
mod teacher_tests {
    use super::*;

    /// Against the KL divergence written out by hand (two images, three classes), and a model
    /// against itself.
    #[test]
    fn compares_as_klsoftloss() {
        let s = [1.0f32, 2.0, 0.5, 0.0, -1.0, 3.0];
        let t = [2.0f32, 1.0, 0.0, 0.5, 0.5, 1.0];
        let temp = 2.0;
        let softmax = |r: &[f32]| {
            let z: f64 = r.iter().map(|&x| (x as f64 / temp).exp()).sum();
            r.iter()
                .map(|&x| (x as f64 / temp).exp() / z)
                .collect::<Vec<_>>()
        };
        let want: f64 = (0..2)
            .map(|i| {
                let (ps, pt) = (softmax(&s[i * 3..][..3]), softmax(&t[i * 3..][..3]));
                (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>()
            })
            .sum::<f64>()
            / 2.0
            * temp
            * temp;
        let got = compare_with_teacher(&s, &t, 3, temp);
        assert!(
            (got.kd_loss - want).abs() < 1e-12 * want,
            "{got:?} vs {want}"
        );
        assert_eq!(got.agreement, 50.0); // image 0: 1 vs 0; image 1: 2 vs 2
        let same = compare_with_teacher(&s, &s, 3, temp);
        assert!(same.kd_loss.abs() < 1e-12 && same.agreement == 100.0);
    }
}
