//! `ckpt logits`: a model's eval-mode logits for an input batch, as distillation targets or to
//! check ckpt against PyTorch.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::checkpoint::provenance;
use crate::checkpoint::write::{check_outputs, write_owned, OwnedTensor};
use crate::checkpoint::{Checkpoint, DType};
use crate::cli::{GlobalArgs, OpenArgs};
use crate::device;
use crate::eval;
use crate::models::Model;
use crate::report::Reporter;

/// Compute a model's logits for a batch of images
///
/// With --input, a safetensors (or torch.save) file whose tensor `input` is an N x 3 x H x W
/// batch, already normalised; writes `logits` (N x classes, f32), or with --top-k the
/// `topk_values` and `topk_indices` (offline distillation targets). The model is recognised
/// from the checkpoint's tensor names and shapes.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model checkpoint
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// File holding the input batch as tensor `input` (see --input-key)
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Name of the input tensor
    #[arg(long, default_value = "input", value_name = "NAME")]
    pub input_key: String,
    /// Output safetensors file
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// Store only the K largest logits per image and their class indices
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Images per forward pass
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub batch_size: usize,
    /// Architecture, instead of recognising it (e.g. resnet50, mobilenet_v2, efficientnet_b0)
    #[arg(long, value_name = "NAME")]
    pub arch: Option<String>,
    #[command(flatten)]
    pub open: OpenArgs,
}

pub fn run(args: LogitsArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let ck = Checkpoint::open(&args.model, &args.open.options())?;
    if let Some(n) = ck.origin_note() {
        rep.note(n);
    }
    let input_ck = Checkpoint::open(&args.input, &Default::default())?;
    check_outputs(
        std::slice::from_ref(&args.output),
        &[ck.files.clone(), input_ck.files.clone()].concat(),
        args.force,
    )?;
    let dev = device::resolve(global.device, |m| rep.note(m))?;
    let model = Model::load(&ck, args.arch.as_deref(), &dev)?;
    rep.note(format!("{}: {}", args.model.display(), model.config));
    let x = eval::read_input_batch(&input_ck, &args.input_key, &model)?;
    let t0 = std::time::Instant::now();
    let logits = eval::logits(&model, &x, args.batch_size.max(1), &rep)?;
    let secs = t0.elapsed().as_secs_f64();
    let (n, classes) = logits.dims2()?;
    rep.note(format!(
        "forward: {n} images in {secs:.2} s ({:.1} images/s)",
        n as f64 / secs
    ));
    let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tensors = match args.top_k {
        Some(k) => {
            let k = k.clamp(1, classes);
            let (vals, idx) = eval::top_k(&values, classes, k);
            vec![
                OwnedTensor {
                    name: "topk_values".into(),
                    dtype: DType::F32,
                    shape: vec![n, k],
                    data: f32_bytes(&vals),
                },
                OwnedTensor {
                    name: "topk_indices".into(),
                    dtype: DType::I64,
                    shape: vec![n, k],
                    data: idx.iter().flat_map(|x| x.to_le_bytes()).collect(),
                },
            ]
        }
        None => vec![OwnedTensor {
            name: "logits".into(),
            dtype: DType::F32,
            shape: vec![n, classes],
            data: f32_bytes(&values),
        }],
    };
    let mut meta = provenance::metadata(&provenance::command_line(), &[ck, input_ck])?;
    meta.insert("ckpt.arch".into(), model.config.name());
    write_owned(&args.output, &tensors, &meta, args.force)?;
    println!(
        "wrote {} ({n} images, {classes} classes)",
        args.output.display()
    );
    Ok(())
}
