//! The small training engine: what fine-tuning part of a model needs, written once (here for
//! `fixres`, next for distillation).
//!
//! - [`optim`]: SGD with momentum, dampening, weight decay and Nesterov as `torch.optim.SGD`
//!   defines them, AdamW as `torch.optim.AdamW`, and learning-rate schedules (constant, cosine,
//!   linear warm-up).
//! - [`cache`]: a frozen trunk's output kept across epochs.
//! - [`cross_entropy`]: the loss on class indices, as `F.cross_entropy` (mean over the batch).
//! - [`fixres`]: the FixRes fine-tune of a model's head at the test resolution.
//! - [`distill`]: knowledge distillation of a whole student from teachers' softened logits.
//! - [`resume`]: a run's state at an epoch's end, saved to continue it exactly.
//! - [`targets`]: a teacher's logits stored by `ckpt logits`, read back by image path (the
//!   offline teacher of distillation).
//!
//! Gradients come from candle's autograd over the parameters a model was built with as `Var`s
//! (`models::BuildOptions::trainable`). What is frozen runs on the model's own kernels: the
//! fast CPU kernels produce tensors without an autograd graph, which is right for a part that
//! nothing trained lies upstream of, and BN layers in train mode, the residual sum, the pool and
//! the classifier run in candle's differentiable ops (see `models::layers`), so only the tail is
//! differentiated (see `fixres` for how the two halves run). Data comes in the loader's order:
//! the folder's, or a seeded shuffle per epoch ([`epoch_order`]).

pub mod cache;
pub mod distill;
pub mod fixres;
pub mod optim;
pub mod resume;
pub mod targets;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::checkpoint::{dtype, Checkpoint};
use crate::data::{Dataset, Transform};

pub use optim::{
    AdamW, AdamWConfig, Optimizer, OptimizerConfig, Schedule, ScheduleKind, Sgd, SgdConfig,
};

/// Mean cross-entropy of `logits` [N, classes] against class indices, as
/// `torch.nn.functional.cross_entropy`: log-softmax (max subtracted) then the mean negative
/// log-likelihood.
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (n, classes) = logits.dims2()?;
    if labels.len() != n {
        bail!("{} labels for a batch of {n}", labels.len());
    }
    if let Some(l) = labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
        bail!("class index {l} is outside the model's {classes} classes");
    }
    let idx: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let target = Tensor::from_vec(idx, n, logits.device())?;
    Ok(candle_nn::loss::cross_entropy(logits, &target)?)
}

/// `values` in the stored dtype of `key`.
pub fn stored(ck: &Checkpoint, key: &str, values: &[f32]) -> Result<Vec<u8>> {
    let t = ck.get(key).with_context(|| format!("no tensor {key}"))?;
    if t.numel() != values.len() || !t.dtype.is_arithmetic_float() {
        bail!(
            "tensor {key} is {} {:?}, expected {} floats",
            t.dtype,
            t.shape,
            values.len()
        );
    }
    let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    let mut bytes = vec![0u8; t.nbytes()];
    dtype::store(&v, t.dtype, &mut bytes);
    Ok(bytes)
}

/// The bytes of integer scalar `key` (a BN layer's `num_batches_tracked`) advanced by `add`, in
/// its own dtype; `None` when the checkpoint has no such tensor.
pub fn counted_up(ck: &Checkpoint, key: &str, add: u64) -> Result<Option<Vec<u8>>> {
    let Some(ti) = ck.get(key) else {
        return Ok(None);
    };
    if !ti.dtype.is_integer() || ti.numel() != 1 {
        bail!(
            "tensor {key} is {} {:?}, expected an integer scalar",
            ti.dtype,
            ti.shape
        );
    }
    let old = dtype::read_int(&ck.bytes(ti), ti.dtype, 0);
    let mut bytes = vec![0u8; ti.dtype.size()];
    dtype::write_int(&mut bytes, ti.dtype, 0, old + add as i128)
        .with_context(|| format!("tensor {key}: the count does not fit {}", ti.dtype))?;
    Ok(Some(bytes))
}

/// Refuses a class index outside a model's `classes`, naming the image (`paths[i]` is label
/// `i`'s).
pub fn check_labels(labels: &[i64], paths: &[std::path::PathBuf], classes: usize) -> Result<()> {
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as usize >= classes)
    {
        bail!(
            "{}: class index {l}, but the model has {classes} classes",
            paths[i].display()
        );
    }
    Ok(())
}

/// The images of epoch `epoch` (0-based): the folder's order, or with `seed` a shuffle seeded
/// by `seed + epoch`, a new order each epoch that the same seed repeats.
pub fn epoch_order(ds: &Dataset, seed: Option<u64>, epoch: usize) -> Dataset {
    match seed {
        None => ds.clone(),
        Some(s) => ds.clone().shuffled(s.wrapping_add(epoch as u64)),
    }
}

/// The transform of epoch `epoch`: a train transform's seed mixed with the epoch, so that an
/// image gets a new random crop and flip every epoch (as a DataLoader's fresh draws give; the
/// crop is seeded by the image's number, which a shuffle does not change), the first epoch
/// keeping the seed as given. Other transforms are returned as they are.
pub fn epoch_transform(t: Transform, epoch: usize) -> Transform {
    match t {
        Transform::Train(mut tt) => {
            tt.seed ^= (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            Transform::Train(tt)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A train transform draws other crops in another epoch, the first epoch's being the
    /// seed's own; an eval transform does not change.
    #[test]
    fn every_epoch_draws_new_crops() {
        let t = Transform::Train(crate::data::TrainTransform::default());
        let Transform::Train(t0) = t else { panic!() };
        let params = |e: usize, i: u64| match epoch_transform(t, e) {
            Transform::Train(tt) => tt.params(640, 480, i),
            Transform::Eval(_) => panic!("a train transform"),
        };
        assert_eq!(params(0, 3), t0.params(640, 480, 3));
        let differ = (0..8u64).filter(|&i| params(1, i) != params(0, i)).count();
        assert!(
            differ >= 6,
            "{differ} of 8 images got another crop in epoch 1"
        );
        assert_ne!(params(1, 0), params(2, 0));
        let e = Transform::Eval(Default::default());
        assert_eq!(epoch_transform(e, 5), e);
    }

    /// log(sum(exp)) - x[label], averaged: checked by hand on a batch of two.
    #[test]
    fn cross_entropy_is_torchs() {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &Device::Cpu).unwrap();
        let got: f32 = cross_entropy(&x, &[2, 0]).unwrap().to_scalar().unwrap();
        let lse = |v: [f64; 3]| v.iter().map(|a| a.exp()).sum::<f64>().ln();
        let want = ((lse([1.0, 2.0, 3.0]) - 3.0) + (lse([0.5, -1.0, 0.0]) - 0.5)) / 2.0;
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        assert!(cross_entropy(&x, &[3, 0]).is_err());
    }
}
