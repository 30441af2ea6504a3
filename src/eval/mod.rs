//! Forward passes over data and what is measured from them: logits, top-k, accuracy. Results
//! are data; commands format them.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::checkpoint::dtype as ckdtype;
use crate::checkpoint::Checkpoint;
use crate::models::{Ctx, Model};
use crate::report::Reporter;

/// Reads tensor `name` of `ck` as an f32 batch [N, 3, H, W] on the model's device.
pub fn read_input_batch(ck: &Checkpoint, name: &str, model: &Model) -> Result<Tensor> {
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
    let bytes = ck.bytes(t);
    let v: Vec<f32> = (0..t.numel())
        .map(|i| ckdtype::read_f64(&bytes, t.dtype, i) as f32)
        .collect();
    Ok(Tensor::from_vec(v, t.shape.clone(), &model.device)?)
}

/// Eval-mode logits [N, classes] in f32, computed `batch` images at a time.
pub fn logits(model: &Model, input: &Tensor, batch: usize, rep: &Reporter) -> Result<Tensor> {
    let n = input.dim(0)?;
    let bar = rep.items_bar(n as u64, "logits");
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let x = input.narrow(0, start, len)?;
        parts.push(model.forward(&x, &mut Ctx::eval())?.to_dtype(DType::F32)?);
        bar.inc(len as u64);
        start += len;
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&parts, 0)?)
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
