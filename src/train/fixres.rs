//! FixRes (Touvron et al., 2019): fine-tuning a classifier's head at the test resolution.
//!
//! The seed's recipe, for any family: every parameter frozen except the classifier (the
//! family's [`Head`]); the model in eval mode except the last BN before global pooling, which
//! runs in train mode (batch statistics, running statistics moved with the family's BN momentum
//! or `bn_momentum`), as `model.eval(); bn.train()`; optionally that BN's affine trained too;
//! SGD on cross-entropy over a labelled folder seen through the eval transform at the test
//! size. The result is a set of replaced tensors (classifier, that BN's statistics,
//! `num_batches_tracked` advanced by the steps taken, and its affine when trained), each in its
//! stored dtype; every other tensor of the checkpoint is left as it is.
//!
//! Cost: the model runs in two parts ([`Model::forward_trunk`], [`Model::forward_head`]). On the
//! CPU's fast kernels the trunk, everything before the trained BN, is a forward pass without an
//! autograd graph (nothing upstream is trained), and only the head (the BN, the residual sum,
//! the activation, the pool and the classifier) is differentiated. The trunk's output is the
//! same every epoch, so when the whole set's fits `cache_bytes` it is kept after the first
//! epoch ([`super::cache`]) and later epochs run only the head: same batches, same tensors, no
//! decoding. This loop calls the model's two halves itself rather than going through
//! `eval::forward`, whose passes run whole models over loader batches.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::cache::{Decision, HeadCache};
use super::{
    check_labels, counted_up, cross_entropy, epoch_order, stored, Optimizer, OptimizerConfig,
    Schedule,
};
use crate::checkpoint::Checkpoint;
use crate::data::{DataConfig, Loader, Transform};
use crate::models::{
    detect, shapes_of, BnMode, BuildOptions, Ctx, Head, HeadInput, Kernels, Model,
};
use crate::report::{human_bytes, Reporter};

/// A FixRes fine-tune.
#[derive(Clone, Debug)]
pub struct Config {
    /// The labelled training folder and its transform (the eval transform at the test size).
    pub data: DataConfig,
    pub epochs: usize,
    /// `None`: the folder's order every epoch; else a shuffle per epoch from this seed.
    pub shuffle_seed: Option<u64>,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    /// Momentum of the trained BN's running update instead of the family's.
    pub bn_momentum: Option<f64>,
    /// Also train the last BN's weight and bias.
    pub train_bn_affine: bool,
    pub kernels: Kernels,
    /// Most bytes the trunk's output may take to be kept across epochs (see the module doc).
    pub cache_bytes: usize,
}

impl Config {
    /// Refuses settings that cannot train, before any pass over the images.
    pub fn check(&self) -> Result<()> {
        let cfg = self;
        if cfg.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if !(cfg.schedule.lr.is_finite() && cfg.schedule.lr > 0.0) {
            bail!("--lr must be a positive number, not {}", cfg.schedule.lr);
        }
        if let Some(m) = cfg.bn_momentum.filter(|m| !(0.0..=1.0).contains(m)) {
            bail!("--bn-momentum must be between 0 and 1, not {m}");
        }
        self.optimizer.check()
    }
}

/// What a fine-tune changed, and how it went.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// New bytes of each replaced tensor, by checkpoint key, in its stored dtype.
    pub tensors: HashMap<String, Vec<u8>>,
    pub head: Head,
    /// The loss of every step, in order.
    pub losses: Vec<f64>,
    /// Mean loss per epoch (over images).
    pub epoch_losses: Vec<f64>,
    /// Images per epoch.
    pub images: usize,
    pub steps: usize,
    /// `ckpt.fixres.*` entries describing the run, for the output's metadata.
    pub metadata: BTreeMap<String, String>,
}

/// One step's worth of state: the optimiser, the schedule, the losses so far.
struct Trainer<'a> {
    model: &'a Model,
    modes: Vec<BnMode>,
    momentum: Option<f64>,
    opt: Optimizer,
    schedule: Schedule,
    total_steps: usize,
    losses: Vec<f64>,
    epoch_sum: f64,
    epoch_images: usize,
    classes: usize,
    bar: &'a indicatif::ProgressBar,
}

impl Trainer<'_> {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            layer_modes: Some(&self.modes),
            momentum: self.momentum,
            ..Ctx::default()
        }
    }

    /// The trunk's output for a batch of images.
    fn trunk(&self, x: &Tensor) -> Result<HeadInput> {
        let mut ctx = self.ctx();
        self.model.forward_trunk(x, &mut ctx)
    }

    /// One optimiser step on a batch's trunk output.
    fn step(&mut self, input: &HeadInput, labels: &[i64], paths: &[PathBuf]) -> Result<()> {
        check_labels(labels, paths, self.classes)?;
        let logits = {
            let mut ctx = self.ctx();
            self.model.forward_head(input, &mut ctx)?
        };
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        let loss = cross_entropy(&logits, labels)?;
        let grads = loss.backward()?;
        let lr = self.schedule.at(self.losses.len(), self.total_steps);
        self.opt.step(&grads, lr)?;
        let l = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !l.is_finite() {
            bail!(
                "the loss became {l} at step {} (learning rate {lr}); try a smaller --lr",
                self.losses.len() + 1
            );
        }
        let n = labels.len();
        self.losses.push(l);
        self.epoch_sum += l * n as f64;
        self.epoch_images += n;
        self.bar.inc(n as u64);
        self.bar.set_message(format!(
            "fine-tuning, loss {:.4}",
            self.epoch_sum / self.epoch_images as f64
        ));
        Ok(())
    }
}

/// Fine-tunes `ck`'s head as [`Config`] says; returns the replaced tensors without writing.
pub fn fine_tune(
    ck: &Checkpoint,
    arch: Option<&str>,
    device: &Device,
    cfg: &Config,
    rep: &Reporter,
) -> Result<Outcome> {
    cfg.check()?;
    let config = detect(&shapes_of(ck), arch).with_context(|| ck.path.display().to_string())?;
    // Module paths here; the model's head below gives checkpoint keys.
    let paths = config.head();
    let Some(last_bn) = paths.last_bn.clone() else {
        bail!(
            "{}: {} has no BatchNorm layer before its pooling: FixRes's recipe trains one",
            ck.path.display(),
            config.name()
        );
    };
    let affine = cfg.train_bn_affine;
    let mut picked = vec![
        format!("{}.weight", paths.classifier),
        format!("{}.bias", paths.classifier),
    ];
    if affine {
        picked.push(format!("{last_bn}.weight"));
        picked.push(format!("{last_bn}.bias"));
    }
    let pick = |p: &str| picked.iter().any(|q| q == p);
    let opts = BuildOptions {
        trainable: Some(&pick),
        overrides: None,
    };
    let model = Model::load_with(ck, arch, device, &opts)?.with_kernels(cfg.kernels);
    let (head, bn_index) = model.head()?;
    let params: Vec<_> = model.trainable().to_vec();
    if params.len() != picked.len() {
        bail!(
            "{}: the model has no parameters {}",
            ck.path.display(),
            picked.join(", ")
        );
    }
    let ds = cfg.data.scan()?;
    if !ds.is_labelled() {
        bail!(
            "{}: no class folders; fine-tuning needs a labelled folder (ImageFolder layout)",
            ds.root.display()
        );
    }
    let classes = model.config.num_classes();
    if ds.classes.len() > classes {
        bail!(
            "{}: {} class folders, but the model has {classes} classes",
            ds.root.display(),
            ds.classes.len()
        );
    }
    let bs = cfg.data.loader.batch_size.max(1);
    let steps_per_epoch = ds.len().div_ceil(bs);
    let mut modes = vec![BnMode::Eval; model.bn.len()];
    modes[bn_index] = BnMode::Train;
    rep.note(format!(
        "fine-tuning {}{} over {} images of {}, {} epoch(s) of {steps_per_epoch} steps; {} in train mode (momentum {})",
        head.classifier,
        if affine { " and the BN's affine" } else { "" },
        ds.len(),
        ds.root.display(),
        cfg.epochs,
        head.last_bn,
        cfg.bn_momentum.unwrap_or(model.bn[bn_index].momentum),
    ));
    let bar = rep.images_bar((ds.len() * cfg.epochs) as u64, "fine-tuning");
    let mut t = Trainer {
        model: &model,
        modes,
        momentum: cfg.bn_momentum,
        opt: Optimizer::new(params, cfg.optimizer)?,
        schedule: cfg.schedule,
        total_steps: steps_per_epoch * cfg.epochs,
        losses: Vec::new(),
        epoch_sum: 0.0,
        epoch_images: 0,
        classes,
        bar: &bar,
    };
    // One epoch reads its images once whatever happens: nothing to keep.
    let budget = if cfg.epochs > 1 { cfg.cache_bytes } else { 0 };
    let mut cache = HeadCache::new(budget, ds.len());
    let mut epoch_losses = Vec::new();
    for epoch in 0..cfg.epochs {
        let order = epoch_order(&ds, cfg.shuffle_seed, epoch);
        t.epoch_sum = 0.0;
        t.epoch_images = 0;
        if cache.complete() {
            for chunk in order.items.chunks(bs) {
                let Some((input, items)) = cache.batch(chunk)? else {
                    continue;
                };
                let labels: Vec<i64> = items.iter().map(|i| i.label.unwrap_or(-1)).collect();
                let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
                t.step(&input, &labels, &paths)?;
            }
        } else {
            let mut loader = Loader::new(&order, cfg.data.transform, &cfg.data.loader, rep)?;
            for b in loader.by_ref() {
                let mut b = b?;
                let pixels = crate::eval::batch_tensor(&mut b, &model.device)?;
                let labels = b
                    .labels
                    .as_deref()
                    .context("the training folder has no labels")?;
                let input = t.trunk(&pixels)?;
                drop(pixels);
                if epoch == 0 && cfg.epochs > 1 {
                    match cache.offer(&b.indices, &input)? {
                        Some(Decision::Keep { bytes }) => rep.note(format!(
                            "keeping the backbone's output in memory ({}) for the {} epoch(s) after the first",
                            human_bytes(bytes as u64),
                            cfg.epochs - 1
                        )),
                        Some(Decision::TooBig { bytes, budget }) => rep.note(format!(
                            "the backbone's output ({} for {} images) is over --cache-mb ({}): it is recomputed every epoch",
                            human_bytes(bytes as u64),
                            ds.len(),
                            human_bytes(budget as u64)
                        )),
                        None => {}
                    }
                }
                t.step(&input, labels, &b.paths)?;
            }
            if epoch == 0 {
                cache.end_pass();
            }
            for s in &loader.summary().skipped {
                rep.note(format!("skipped {}", s.error));
            }
        }
        if t.epoch_images == 0 {
            bail!("{}: no images were read", ds.root.display());
        }
        epoch_losses.push(t.epoch_sum / t.epoch_images as f64);
    }
    bar.finish_and_clear();

    let mut tensors = HashMap::new();
    for (key, var) in t.opt.params() {
        let v: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        tensors.insert(key.clone(), stored(ck, key, &v)?);
    }
    let bn = &model.bn[bn_index];
    let r = bn.running();
    for (what, v) in [("running_mean", &r.mean), ("running_var", &r.var)] {
        let key = format!("{}.{what}", head.last_bn);
        tensors.insert(key.clone(), stored(ck, &key, v)?);
    }
    let nbt = format!("{}.num_batches_tracked", head.last_bn);
    if let Some(bytes) = counted_up(ck, &nbt, r.batches)? {
        tensors.insert(nbt, bytes);
    }
    let steps = t.losses.len();
    let metadata = metadata(cfg, &head, steps, &epoch_losses);
    Ok(Outcome {
        tensors,
        head,
        losses: t.losses,
        epoch_losses,
        images: ds.len(),
        steps,
        metadata,
    })
}

fn metadata(
    cfg: &Config,
    head: &Head,
    steps: usize,
    epoch_losses: &[f64],
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("ckpt.fixres.{k}"), v);
    };
    if let Transform::Eval(e) = &cfg.data.transform {
        put("size", e.size.to_string());
        put("crop_pct", e.crop_pct.to_string());
    }
    put("transform", format!("{:?}", cfg.data.transform));
    put("data", cfg.data.dir.display().to_string());
    put("dataset", format!("{:?}", cfg.data.dataset));
    put("epochs", cfg.epochs.to_string());
    put("steps", steps.to_string());
    put("batch_size", cfg.data.loader.batch_size.to_string());
    put(
        "shuffle",
        cfg.shuffle_seed
            .map_or("none".into(), |s| format!("seed {s}")),
    );
    put("lr", cfg.schedule.lr.to_string());
    put("lr_schedule", cfg.schedule.kind.to_string());
    put("warmup_steps", cfg.schedule.warmup_steps.to_string());
    for (k, v) in cfg.optimizer.describe() {
        put(k, v);
    }
    put(
        "bn_momentum",
        cfg.bn_momentum.map_or("family".into(), |b| b.to_string()),
    );
    put("train_bn_affine", cfg.train_bn_affine.to_string());
    put("classifier", head.classifier.clone());
    put("last_bn", head.last_bn.clone());
    put(
        "epoch_losses",
        epoch_losses
            .iter()
            .map(|l| format!("{l:.6}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    m
}
