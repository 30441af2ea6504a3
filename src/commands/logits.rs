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
/// batch, already normalised; with --data, a folder of images. Writes `logits` (N x classes,
/// f32), or with --top-k the `topk_values` and `topk_indices` (offline distillation targets).
/// The model is recognised from the checkpoint's tensor names and shapes.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model checkpoint
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// File holding the input batch as tensor `input` (see --input-key)
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "data",
        conflicts_with = "data"
    )]
    pub input: Option<PathBuf>,
    /// Folder of images instead (eval transform, see the data options); also writes `labels`
    /// for an ImageFolder (the model's classes: see --class-map) and records the image paths in
    /// the metadata
    #[arg(long = "data", value_name = "DIR")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub data_opts: crate::cli::DataOptions,
    #[command(flatten)]
    pub labels: crate::cli::LabelArgs,
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
    let input_ck = match &args.input {
        Some(p) => Some(Checkpoint::open(p, &Default::default())?),
        None => None,
    };
    let mut inputs = ck.files.clone();
    if let Some(i) = &input_ck {
        inputs.extend(i.files.clone());
    }
    check_outputs(std::slice::from_ref(&args.output), &inputs, args.force)?;
    let dev = device::resolve(global.device, |m| rep.note(m))?;
    let model = Model::load(&ck, args.arch.as_deref(), &dev)?;
    rep.note(format!("{}: {}", args.model.display(), model.config));
    let x = match &input_ck {
        Some(input_ck) => Some(eval::read_input_batch(input_ck, &args.input_key, &model)?),
        None => None,
    };
    // With --input, the forward passes alone; with --data, decoding too (it overlaps).
    let t0 = std::time::Instant::now();
    let mut extra_meta = Vec::new();
    let mut labels = None;
    let (values, n, classes) = match (&x, &args.data) {
        (Some(x), _) => {
            let logits = eval::logits(&model, x, args.data_opts.batch_size.max(1), &rep)?;
            let (n, classes) = logits.dims2()?;
            (logits.flatten_all()?.to_vec1::<f32>()?, n, classes)
        }
        (None, Some(dir)) => {
            let cfg = args.data_opts.config(dir, global.threads)?;
            let mut ds = cfg.scan()?;
            if ds.is_labelled() {
                let l =
                    super::label_images(&mut ds, model.config.num_classes(), &args.labels, &rep)?;
                extra_meta.push((
                    "ckpt.labelling".to_string(),
                    serde_json::to_string(&l.record())?,
                ));
            }
            let mut loader = crate::data::Loader::new(&ds, cfg.transform, &cfg.loader, &rep)?;
            let pass = eval::eval_pass(&model, &mut loader, true)?;
            let rel: Vec<String> = pass
                .paths
                .iter()
                .map(|p| p.strip_prefix(&ds.root).unwrap_or(p).display().to_string())
                .collect();
            extra_meta.push(("ckpt.images".to_string(), serde_json::to_string(&rel)?));
            extra_meta.push(("ckpt.data".to_string(), ds.root.display().to_string()));
            if ds.is_labelled() {
                extra_meta.push((
                    "ckpt.classes".to_string(),
                    serde_json::to_string(&ds.classes)?,
                ));
                labels = Some(pass.labels.clone());
            }
            let n = pass.paths.len();
            (pass.logits, n, pass.classes)
        }
        (None, None) => unreachable!("clap requires --input or --data"),
    };
    let secs = t0.elapsed().as_secs_f64();
    rep.note(format!(
        "forward: {n} images in {secs:.2} s ({:.1} images/s)",
        n as f64 / secs
    ));
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
    let mut tensors = tensors;
    if let Some(l) = labels {
        tensors.push(OwnedTensor {
            name: "labels".into(),
            dtype: DType::I64,
            shape: vec![n],
            data: l.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
    }
    let mut sources = vec![ck];
    sources.extend(input_ck);
    let mut meta = provenance::metadata(&provenance::command_line(), &sources)?;
    meta.insert("ckpt.arch".into(), model.config.name());
    meta.extend(extra_meta);
    write_owned(&args.output, &tensors, &meta, args.force)?;
    println!(
        "wrote {} ({n} images, {classes} classes)",
        args.output.display()
    );
    Ok(())
}
