//! Knowledge distillation (Hinton et al., 2015), as the seed does it: a student fine-tuned on
//! `CE(s, y) + KD(s, t)`, or `(1 - alpha) CE + alpha KD`, where KD is the seed's KLSoftLoss,
//! `KL(softmax(t / T) || softmax(s / T))` averaged over the batch ("batchmean") times `T^2`.
//!
//! Every student parameter trains, with the student in train mode (BN batch statistics, running
//! statistics moved with the family's momentum) on the train kernels (`Kernels::Train`: the fast
//! CPU kernels with backward passes; candle's ops on other devices); the teachers run
//! in eval mode, forward only, on their own kernels, on the same batch, and several teachers'
//! logits are averaged (an ensemble teacher). SGD or AdamW as torch's, in two parameter groups:
//! weight decay on the weights, none on biases and one-dimensional parameters (BN's) unless
//! `decay_all`. The result is every trained parameter and every BN layer's statistics
//! (`num_batches_tracked` advanced by the steps), each in its stored dtype.
//!
//! The teacher may also be offline ([`Teacher::Targets`]): logits stored by `ckpt logits`, looked
//! up by image path (see [`super::targets`]), so that no teacher runs. Dense stored logits go
//! through the very operations a live teacher's logits do ([`SoftTargets::from_logits`]): the
//! same f32 logits give the same student, bit for bit. Top-k logits give the softmax of the k
//! stored values at T, renormalised over the stored classes and zero elsewhere
//! ([`SoftTargets::from_top_k`]), so that the KL sums over the stored classes only
//! (`0 log 0 = 0`).

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use super::resume::Progress;
use super::targets::{Rows, Targets};
use super::{
    check_labels, counted_up, cross_entropy, epoch_order, epoch_transform, stored, Optimizer,
    OptimizerConfig, Schedule,
};
use crate::checkpoint::Checkpoint;
use crate::data::{DataConfig, Dataset, Loader, Transform};
use crate::eval::forward::{self, Feed};
use crate::models::{BuildOptions, Ctx, Kernels, Model};
use crate::report::Reporter;

/// A distillation run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The training folder and its transform.
    pub data: DataConfig,
    pub epochs: usize,
    /// `None`: the folder's order every epoch; else a shuffle per epoch from this seed.
    pub shuffle_seed: Option<u64>,
    pub opt: OptimizerConfig,
    /// Weight decay on biases and one-dimensional parameters too.
    pub decay_all: bool,
    pub schedule: Schedule,
    /// The softening temperature T.
    pub temperature: f64,
    /// `None`: CE + KD (the seed's sum); `Some(a)`: (1 - a) CE + a KD.
    pub alpha: Option<f64>,
    /// Hand the run's [`Progress`] to the caller after every this many epochs (not after the
    /// last, whose result is the output).
    pub save_every: Option<usize>,
    /// The student's kernels follow this choice (`--kernels`): candle's ops for
    /// `Kernels::Candle`, the train kernels otherwise.
    pub kernels: Kernels,
}

impl Config {
    /// Refuses settings that cannot train, before any pass over the images.
    pub fn check(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if !(self.schedule.lr.is_finite() && self.schedule.lr > 0.0) {
            bail!("--lr must be a positive number, not {}", self.schedule.lr);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "--temperature must be a positive number, not {}",
                self.temperature
            );
        }
        if let Some(a) = self.alpha.filter(|a| !(0.0..=1.0).contains(a)) {
            bail!("--alpha must be between 0 and 1, not {a}");
        }
        if self.save_every == Some(0) {
            bail!("--save-every must be at least 1 (epochs)");
        }
        self.opt.check()
    }

    /// Whether the loss needs labels (any weight on the cross-entropy).
    pub fn needs_labels(&self) -> bool {
        self.alpha != Some(1.0)
    }
}

/// Where the teacher's logits come from.
#[derive(Clone, Copy)]
pub enum Teacher<'a> {
    /// Models run forward, in eval mode, on every batch the student sees (several: their
    /// logits averaged). Any family; the student's class count.
    Models(&'a [&'a Model]),
    /// Logits stored by `ckpt logits --data`, looked up by image path: no teacher runs.
    Targets(&'a Targets),
}

impl Teacher<'_> {
    fn models(&self) -> &[&Model] {
        match self {
            Teacher::Models(m) => m,
            Teacher::Targets(_) => &[],
        }
    }

    /// The teacher in a few words: the models' names, or the targets file and what it holds.
    pub fn describe(&self) -> String {
        match self {
            Teacher::Models(m) => m
                .iter()
                .map(|t| t.config.name())
                .collect::<Vec<_>>()
                .join(","),
            Teacher::Targets(t) => format!(
                "offline: {} of {} in {}",
                t.stored,
                t.arch.as_deref().unwrap_or("an unrecorded model"),
                t.path.display()
            ),
        }
    }
}

/// A batch's teacher distribution at temperature T, as the KD loss needs it: its
/// log-probabilities and probabilities [n, classes] (both zero where the teacher gives a class
/// no mass), and each image's top-1 class.
pub struct SoftTargets {
    log_p: Tensor,
    p: Tensor,
    top1: Vec<u32>,
}

impl SoftTargets {
    /// `softmax(logits / T)` (the logits of a live teacher, or dense stored ones).
    pub fn from_logits(logits: &Tensor, temperature: f64) -> Result<SoftTargets> {
        let log_p = candle_nn::ops::log_softmax(&(logits.detach() / temperature)?, D::Minus1)?;
        Ok(SoftTargets {
            p: log_p.exp()?,
            log_p,
            top1: argmax_rows(logits)?,
        })
    }

    /// The softmax at T of each row's k stored logits `values` [n, k], renormalised over their
    /// classes `indices` (row-major) and zero for the other classes of `classes`.
    pub fn from_top_k(
        values: &Tensor,
        indices: &[usize],
        classes: usize,
        temperature: f64,
    ) -> Result<SoftTargets> {
        let (n, k) = values.dims2()?;
        let log_pk = candle_nn::ops::log_softmax(&(values.detach() / temperature)?, D::Minus1)?;
        let dense = |t: &Tensor| -> Result<Tensor> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let mut out = vec![0f32; n * classes];
            for (i, (&c, x)) in indices.iter().zip(v).enumerate() {
                out[(i / k) * classes + c] = x;
            }
            Ok(Tensor::from_vec(out, (n, classes), values.device())?)
        };
        let top1 = argmax_rows(values)?
            .into_iter()
            .enumerate()
            .map(|(i, j)| indices[i * k + j as usize] as u32)
            .collect();
        Ok(SoftTargets {
            p: dense(&log_pk.exp()?)?,
            log_p: dense(&log_pk)?,
            top1,
        })
    }
}

/// The seed's KLSoftLoss: `KL(softmax(teacher / T) || softmax(student / T))` summed over classes,
/// averaged over the batch, times `T^2`; differentiable in `student` only.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    soft_kd_loss(
        student,
        &SoftTargets::from_logits(teacher, temperature)?,
        temperature,
    )
}

/// [`kd_loss`] against a teacher distribution at T: `sum p (log p - log_softmax(student / T))`
/// over the classes, averaged over the batch, times `T^2`.
pub fn soft_kd_loss(student: &Tensor, teacher: &SoftTargets, temperature: f64) -> Result<Tensor> {
    let n = student.dim(0)?;
    let log_ps = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let kl = (&teacher.p * (&teacher.log_p - log_ps)?)?.sum_all()?;
    Ok((kl * (temperature * temperature / n as f64))?)
}

/// One step's losses.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StepLoss {
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// The cross-entropy (NaN without labels; JSON writes it as null).
    #[serde(deserialize_with = "nan_if_null")]
    pub ce: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub kd: f64,
    /// Images of the batch on which the student's top-1 agrees with the teachers'.
    pub agree: usize,
    pub images: usize,
}

/// JSON's null (how serde_json writes a NaN) read back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let v: Option<f64> = serde::Deserialize::deserialize(d)?;
    Ok(v.unwrap_or(f64::NAN))
}

/// What a run changed, and how it went.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// New bytes of each replaced tensor, by checkpoint key, in its stored dtype.
    pub tensors: HashMap<String, Vec<u8>>,
    pub steps: Vec<StepLoss>,
    pub images: usize,
    /// `ckpt.distill.*` entries describing the run, for the output's metadata.
    pub metadata: BTreeMap<String, String>,
}

struct Trainer<'a> {
    /// Teacher models run before the student (model indices below their count).
    teacher: Teacher<'a>,
    teacher_sum: Option<Tensor>,
    ds: &'a Dataset,
    cfg: &'a Config,
    groups: Vec<Optimizer>,
    total_steps: usize,
    steps: Vec<StepLoss>,
    classes: usize,
    bar: &'a indicatif::ProgressBar,
}

impl Trainer<'_> {
    /// Whether model `model` of the forward loop is a teacher (the student comes last).
    fn is_teacher(&self, model: usize) -> bool {
        model < self.teacher.models().len()
    }
}

fn argmax_rows(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.argmax(D::Minus1)?.to_vec1()?)
}

impl forward::Visitor for Trainer<'_> {
    fn ctx(&mut self, model: usize, _: usize) -> Ctx<'_> {
        if self.is_teacher(model) {
            Ctx::eval()
        } else {
            Ctx::train()
        }
    }

    fn output(&mut self, model: usize, _: usize, feed: &Feed, y: &Tensor, _: f64) -> Result<()> {
        if self.is_teacher(model) {
            let y = y.detach();
            self.teacher_sum = Some(match self.teacher_sum.take() {
                None => y,
                Some(s) => (s + y)?,
            });
            return Ok(());
        }
        let b = feed.batch().context("distillation over a tensor")?;
        let temperature = self.cfg.temperature;
        let teacher = match self.teacher {
            Teacher::Models(m) => {
                let mean = (self
                    .teacher_sum
                    .take()
                    .context("internal error: no teacher logits")?
                    / m.len() as f64)?;
                SoftTargets::from_logits(&mean, temperature)?
            }
            Teacher::Targets(t) => match t.rows(self.ds, &b.paths, y.device())? {
                Rows::Logits(l) => SoftTargets::from_logits(&l, temperature)?,
                Rows::TopK { values, indices } => {
                    SoftTargets::from_top_k(&values, &indices, self.classes, temperature)?
                }
            },
        };
        let kd = soft_kd_loss(y, &teacher, temperature)?;
        let (loss, ce) = if self.cfg.needs_labels() {
            let labels = b
                .labels
                .as_deref()
                .context("the training folder has no labels (--alpha 1 needs none)")?;
            check_labels(labels, &b.paths, self.classes)?;
            let ce = cross_entropy(y, labels)?;
            let loss = match self.cfg.alpha {
                None => (&ce + &kd)?,
                Some(a) => ((&ce * (1.0 - a))? + (&kd * a)?)?,
            };
            (loss, Some(ce))
        } else {
            (kd.clone(), None)
        };
        let grads = loss.backward()?;
        let lr = self.cfg.schedule.at(self.steps.len(), self.total_steps);
        for g in &mut self.groups {
            g.step(&grads, lr)?;
        }
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar()?) };
        let l = scalar(&loss)?;
        if !l.is_finite() {
            bail!(
                "the loss became {l} at step {} (learning rate {lr}); try a smaller --lr",
                self.steps.len() + 1
            );
        }
        let agree = argmax_rows(y)?
            .iter()
            .zip(&teacher.top1)
            .filter(|(a, b)| a == b)
            .count();
        self.steps.push(StepLoss {
            loss: l,
            ce: ce.as_ref().map_or(Ok(f64::NAN), scalar)?,
            kd: scalar(&kd)?,
            agree,
            images: b.n,
        });
        self.bar.inc(b.n as u64);
        self.bar.set_message(format!("distilling, loss {l:.4}"));
        Ok(())
    }
}

/// A run's saves. With `resume` (a [`Progress`] of the same run, its settings already
/// checked), the run goes on after its last whole epoch: the student's values, BN statistics and
/// counts, the optimisers' buffers and the steps taken come from it. `save` gets the run's
/// progress every `cfg.save_every` epochs.
pub struct Saves<'a> {
    pub resume: Option<&'a Progress>,
    pub save: &'a mut dyn FnMut(Progress) -> Result<()>,
}

/// Distils `teacher` into the student `ck`; returns the replaced tensors without writing. The
/// student is built here, every parameter trainable, on the train kernels (see
/// [`Config::kernels`]). Offline targets need a deterministic transform, the file's own when it
/// records one (a warning when it does not), and a row for every image.
///
/// See [`Saves`] for continuing a saved run and saving this one.
pub fn distill(
    ck: &Checkpoint,
    arch: Option<&str>,
    teacher: Teacher,
    device: &Device,
    cfg: &Config,
    rep: &Reporter,
    saves: Saves,
) -> Result<Outcome> {
    let Saves { resume, save } = saves;
    cfg.check()?;
    let teachers = teacher.models();
    if let Teacher::Targets(t) = teacher {
        if let Transform::Train(_) = cfg.data.transform {
            bail!(
                "--targets {}: stored logits fit only a deterministic transform, not --transform train (its random crops and flips are not the pixels the logits were made from); use --transform eval",
                t.path.display()
            );
        }
        if !t.check_transform(&cfg.data.transform_record())? {
            rep.warn(format!(
                "{}: records no transform (ckpt.transform: made by an older ckpt logits), so nothing checks that its logits were made with this run's data options",
                t.path.display()
            ));
        }
    }
    let pick = |p: &str| {
        !(p.ends_with(".running_mean")
            || p.ends_with(".running_var")
            || p.ends_with(".num_batches_tracked"))
    };
    let saved = resume.map(Progress::tensor_map);
    let opts = BuildOptions {
        trainable: Some(&pick),
        overrides: saved.as_ref(),
    };
    // The train kernels (the fast ones, with backward passes), or candle's ops where
    // `--kernels candle` asks for them (the teachers run on them too).
    let kernels = match cfg.kernels {
        Kernels::Candle => Kernels::Candle,
        _ => Kernels::Train,
    };
    let student = Model::load_with(ck, arch, device, &opts)?.with_kernels(kernels);
    // Each step frees its activations while allocating gradients: the allocator's cache needs
    // more room than a forward job's for the next step to find its blocks (`alloc::training`).
    crate::alloc::training();
    let classes = student.config.num_classes();
    match teacher {
        Teacher::Models([]) => bail!("no teacher given"),
        Teacher::Models(_) => {}
        Teacher::Targets(t) => t.check_classes(classes, &student.config.name())?,
    }
    for t in teachers {
        let n = t.config.num_classes();
        if n != classes {
            bail!(
                "a teacher ({}) has {n} classes, the student ({}) {classes}: distillation needs the same classes",
                t.config.name(),
                student.config.name()
            );
        }
    }
    let ds = cfg.data.scan()?;
    if let Teacher::Targets(t) = teacher {
        let unused = t.match_images(&ds)?;
        if unused > 0 {
            rep.note(format!(
                "{}: {unused} of its {} rows are not images of this run (unused)",
                t.path.display(),
                t.len()
            ));
        }
    }
    if cfg.needs_labels() && !ds.is_labelled() {
        bail!(
            "{}: no class folders; the cross-entropy needs labels (ImageFolder layout), or --alpha 1 distils without them",
            ds.root.display()
        );
    }
    let (mut decay, mut no_decay) = (Vec::new(), Vec::new());
    for (name, var) in student.trainable() {
        if cfg.decay_all || var.as_tensor().rank() > 1 {
            decay.push((name.clone(), var.clone()));
        } else {
            no_decay.push((name.clone(), var.clone()));
        }
    }
    let trained = decay.len() + no_decay.len();
    let mut groups = vec![
        Optimizer::new(decay, cfg.opt)?,
        Optimizer::new(no_decay, cfg.opt.without_weight_decay())?,
    ];
    let mut start = 0;
    let mut steps = Vec::new();
    if let Some(p) = resume {
        let state = p.optimizer_map();
        let mut used = 0;
        for g in &mut groups {
            used += g.restore(&state)?;
        }
        if used != state.len() || p.bn_batches.len() != student.bn.len() {
            bail!("the saved state does not fit this student");
        }
        for (bn, &b) in student.bn.iter().zip(&p.bn_batches) {
            bn.running().batches = b;
        }
        steps = serde_json::from_value(p.steps.clone()).context("the saved steps")?;
        start = p.epochs_done;
    }
    let bs = cfg.data.loader.batch_size.max(1);
    let steps_per_epoch = ds.len().div_ceil(bs);
    rep.note(format!(
        "distilling {} into {} ({trained} parameters trained) over {} images of {}, {} epoch(s) of {steps_per_epoch} steps, T = {}",
        match teacher {
            Teacher::Models(m) => format!("{} teacher(s)", m.len()),
            Teacher::Targets(t) => format!("the {} of {}", t.stored, t.path.display()),
        },
        student.config,
        ds.len(),
        ds.root.display(),
        cfg.epochs,
        cfg.temperature
    ));
    if start > 0 {
        rep.note(format!(
            "resuming after epoch {start} of {} ({} steps taken)",
            cfg.epochs,
            steps.len()
        ));
    }
    let bar = rep.images_bar((ds.len() * cfg.epochs) as u64, "distilling");
    bar.set_position((ds.len() * start.min(cfg.epochs)) as u64);
    let mut t = Trainer {
        teacher,
        teacher_sum: None,
        ds: &ds,
        cfg,
        groups,
        total_steps: steps_per_epoch * cfg.epochs,
        steps,
        classes,
        bar: &bar,
    };
    let mut models: Vec<Vec<&Model>> = teachers.iter().map(|m| vec![*m]).collect();
    models.push(vec![&student]);
    for epoch in start..cfg.epochs {
        let order = epoch_order(&ds, cfg.shuffle_seed, epoch);
        let quiet = Reporter::new(true);
        let transform = epoch_transform(cfg.data.transform, epoch);
        let mut loader = Loader::new(&order, transform, &cfg.data.loader, &quiet)?;
        let before = t.steps.len();
        forward::run(forward::single(loader.by_ref()), &models, &mut t)?;
        for s in &loader.summary().skipped {
            bar.suspend(|| rep.note(format!("skipped {}", s.error)));
        }
        if t.steps.len() == before {
            bail!("{}: no images were read", ds.root.display());
        }
        let done = epoch + 1;
        if cfg.save_every.is_some_and(|n| done % n == 0) && done < cfg.epochs {
            let p = progress(&student, &t.groups, &t.steps, done)?;
            bar.suspend(|| save(p))?;
        }
    }
    bar.finish_and_clear();

    let mut tensors = HashMap::new();
    for g in &t.groups {
        for (key, var) in g.params() {
            let v: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            tensors.insert(key.clone(), stored(ck, key, &v)?);
        }
    }
    for (prefix, bn) in student.bn_layers.iter().zip(&student.bn) {
        let r = bn.running();
        for (what, v) in [("running_mean", &r.mean), ("running_var", &r.var)] {
            let key = format!("{prefix}.{what}");
            tensors.insert(key.clone(), stored(ck, &key, v)?);
        }
        let nbt = format!("{prefix}.num_batches_tracked");
        if let Some(bytes) = counted_up(ck, &nbt, r.batches)? {
            tensors.insert(nbt, bytes);
        }
    }
    let metadata = metadata(cfg, &teacher, &t.steps);
    Ok(Outcome {
        tensors,
        steps: t.steps,
        images: ds.len(),
        metadata,
    })
}

/// The run's state after `epochs_done` epochs, without its settings (the caller's to add: it
/// knows the files).
fn progress(
    student: &Model,
    groups: &[Optimizer],
    steps: &[StepLoss],
    epochs_done: usize,
) -> Result<Progress> {
    let mut tensors = Vec::new();
    let mut optimizer = Vec::new();
    for g in groups {
        for (key, var) in g.params() {
            tensors.push((key.clone(), var.as_tensor().flatten_all()?.to_vec1()?));
        }
        optimizer.extend(g.state()?);
    }
    let mut bn_batches = Vec::new();
    for (prefix, bn) in student.bn_layers.iter().zip(&student.bn) {
        let r = bn.running();
        tensors.push((format!("{prefix}.running_mean"), r.mean.clone()));
        tensors.push((format!("{prefix}.running_var"), r.var.clone()));
        bn_batches.push(r.batches);
    }
    Ok(Progress {
        epochs_done,
        steps: serde_json::to_value(steps)?,
        tensors,
        bn_batches,
        optimizer,
        settings: BTreeMap::new(),
    })
}

/// What a resumed run must share with the run it continues: every setting in the output's
/// metadata but the per-step records.
pub fn settings(cfg: &Config, teacher: &Teacher) -> BTreeMap<String, String> {
    let mut m = metadata(cfg, teacher, &[]);
    for k in ["losses", "steps"] {
        m.remove(&format!("ckpt.distill.{k}"));
    }
    m
}

fn metadata(cfg: &Config, teacher: &Teacher, steps: &[StepLoss]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("ckpt.distill.{k}"), v);
    };
    put("teachers", teacher.describe());
    put("temperature", cfg.temperature.to_string());
    put(
        "alpha",
        cfg.alpha.map_or("none (CE + KD)".into(), |a| a.to_string()),
    );
    put("transform", format!("{:?}", cfg.data.transform));
    put("data", cfg.data.dir.display().to_string());
    put("dataset", format!("{:?}", cfg.data.dataset));
    put("epochs", cfg.epochs.to_string());
    put("steps", steps.len().to_string());
    put("batch_size", cfg.data.loader.batch_size.to_string());
    put(
        "shuffle",
        cfg.shuffle_seed
            .map_or("none".into(), |s| format!("seed {s}")),
    );
    put("lr", cfg.schedule.lr.to_string());
    put("lr_schedule", cfg.schedule.kind.to_string());
    put("warmup_steps", cfg.schedule.warmup_steps.to_string());
    for (k, v) in cfg.opt.describe() {
        put(k, v);
    }
    put("decay_all", cfg.decay_all.to_string());
    put(
        "losses",
        steps
            .iter()
            .map(|s| format!("{:.6}", s.loss))
            .collect::<Vec<_>>()
            .join(","),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KL divergence written out by hand for a batch of two, three classes.
    #[test]
    fn kd_loss_is_klsoftloss() {
        let dev = Device::Cpu;
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &dev).unwrap();
        let t = Tensor::new(&[[2.0f32, 1.0, 0.0], [0.5, 0.5, 1.0]], &dev).unwrap();
        let temp = 2.0;
        let got: f32 = kd_loss(&s, &t, temp).unwrap().to_scalar().unwrap();
        let softmax = |r: [f64; 3]| {
            let z: f64 = r.iter().map(|x| (x / temp).exp()).sum();
            r.map(|x| (x / temp).exp() / z)
        };
        let rows = [
            ([1.0, 2.0, 0.5], [2.0, 1.0, 0.0]),
            ([0.0, -1.0, 3.0], [0.5, 0.5, 1.0]),
        ];
        let want: f64 = rows
            .iter()
            .map(|(s, t)| {
                let (ps, pt) = (softmax(*s), softmax(*t));
                (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>()
            })
            .sum::<f64>()
            / 2.0
            * temp
            * temp;
        assert!((got as f64 - want).abs() < 1e-6 * want, "{got} vs {want}");
        assert!(
            kd_loss(&s, &s, temp)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-6
        );
    }

    /// Top-k targets: the stored classes' softmax renormalised, zero elsewhere; with every class
    /// stored (in any order), the dense teacher's loss.
    #[test]
    fn top_k_targets_renormalise_over_the_stored_classes() {
        let dev = Device::Cpu;
        let temp = 2.0;
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5, -1.0]], &dev).unwrap();
        let t = [3.0f32, 1.0, 0.0, 2.0];
        let top2 = SoftTargets::from_top_k(
            &Tensor::new(&[[3.0f32, 2.0]], &dev).unwrap(),
            &[0, 3],
            4,
            temp,
        )
        .unwrap();
        let p: Vec<f32> = top2.p.flatten_all().unwrap().to_vec1().unwrap();
        let z = (3.0f64 / temp).exp() + (2.0f64 / temp).exp();
        let want = [
            (3.0f64 / temp).exp() / z,
            0.0,
            0.0,
            (2.0f64 / temp).exp() / z,
        ];
        for (g, w) in p.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{p:?} vs {want:?}");
        }
        assert_eq!(top2.top1, vec![0]);
        let loss = |teacher: &SoftTargets| -> f32 {
            soft_kd_loss(&s, teacher, temp)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(loss(&top2).is_finite());
        let all = SoftTargets::from_top_k(
            &Tensor::new(&[[2.0f32, 0.0, 3.0, 1.0]], &dev).unwrap(),
            &[3, 2, 0, 1],
            4,
            temp,
        )
        .unwrap();
        let dense = SoftTargets::from_logits(&Tensor::new(&[t], &dev).unwrap(), temp).unwrap();
        assert!((loss(&all) - loss(&dense)).abs() < 1e-6 * loss(&dense));
        assert_eq!(all.top1, dense.top1);
    }
}
