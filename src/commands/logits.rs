//! `ckpt logits`: a model's eval-mode logits for an input batch, as distillation targets (read
//! back by `train::targets`) or to check ckpt against PyTorch.

use anyhow::Result;

use crate::checkpoint::provenance;
use crate::checkpoint::write::{check_outputs, write_owned, OwnedTensor};
use crate::checkpoint::{Checkpoint, DType};
use crate::cli::{GlobalArgs, LogitsArgs};
use crate::eval;
use crate::report::Reporter;

pub fn run(mut args: LogitsArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let ck = super::open_for_model(&args.model.model, &args.model.open, args.model.arch.get())?;
    if let Some(n) = ck.origin_note() {
        rep.note(n);
    }
    if args.data.is_some() {
        super::model_data_defaults(&mut args.data_opts, &ck, &rep)?;
    }
    let input_ck = match &args.input {
        Some(p) => Some(Checkpoint::open(p, &Default::default())?),
        None => None,
    };
    let mut inputs = ck.files.clone();
    if let Some(i) = &input_ck {
        inputs.extend(i.files.clone());
    }
    check_outputs(
        std::slice::from_ref(&args.out.output),
        &inputs,
        args.out.force,
    )?;
    let arch = super::model_arch(args.model.arch.get(), &ck)?;
    let model = super::load_model(&ck, arch.as_deref(), global, &rep)?;
    rep.note(format!("{}: {}", args.model.model.display(), model.config));
    let x = match &input_ck {
        Some(input_ck) => Some((input_ck, eval::input_batch(input_ck, &args.input_key)?)),
        None => None,
    };
    // With --input, the forward passes and reading each batch of the input; with --data,
    // decoding too (it overlaps).
    let t0 = std::time::Instant::now();
    let mut extra_meta = Vec::new();
    let mut labels = None;
    let (values, n, classes) = match (&x, &args.data) {
        (Some((input_ck, t)), _) => {
            let batch = args.data_opts.batch_size.max(1);
            let logits = eval::input_logits(&model, input_ck, t, batch, &rep)?;
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
            let rel: Vec<String> = pass.paths.iter().map(|p| ds.relative_name(p)).collect();
            extra_meta.push(("ckpt.images".to_string(), serde_json::to_string(&rel)?));
            extra_meta.push(("ckpt.data".to_string(), ds.root.display().to_string()));
            // What `distill --targets` checks its own pass against.
            extra_meta.push((
                "ckpt.transform".to_string(),
                serde_json::to_string(&cfg.transform_record())?,
            ));
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
    meta.insert("ckpt.num_classes".into(), classes.to_string());
    meta.extend(extra_meta);
    write_owned(&args.out.output, &tensors, &meta, args.out.force)?;
    println!(
        "wrote {} ({n} images, {classes} classes)",
        args.out.output.display()
    );
    Ok(())
}
