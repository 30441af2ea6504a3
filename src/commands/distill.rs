//! `ckpt distill`: knowledge distillation of teachers, or of their stored logits (`--targets`,
//! read by `train::targets`), into a student checkpoint (the engine is `train::distill`).

use std::io::Write;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::bn::apply;
use crate::checkpoint::write::check_outputs;
use crate::checkpoint::{provenance, Checkpoint};
use crate::cli::{DistillArgs, GlobalArgs};
use crate::commands::common;
use crate::report::Reporter;
use crate::train::distill::Teacher;
use crate::train::resume::Progress;
use crate::train::{self, Schedule};

pub fn run(mut args: DistillArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let ck = Checkpoint::open(&args.model.model, &args.model.open.options())?;
    if let Some(n) = ck.origin_note() {
        rep.note(n);
    }
    // A student model folder's architecture and preprocessing (the teachers see the same
    // batches, so theirs are not applied).
    let arch = super::model_arch(args.model.arch.get(), &ck)?;
    super::model_data_defaults(&mut args.data.opts, &ck, &rep)?;
    let force = args.out.force;
    let targets = match (&args.targets, args.teachers.is_empty()) {
        (Some(f), false) => bail!(
            "--targets {}: give either teachers to run (--teacher) or their stored logits (--targets), not both",
            f.display()
        ),
        (None, true) => bail!(
            "no teacher: give --teacher T (run on every batch) or --targets FILE (logits stored by ckpt logits --data)"
        ),
        (Some(f), true) => Some(train::targets::Targets::open(f)?),
        (None, false) => None,
    };
    let teacher_cks = args
        .teachers
        .iter()
        .map(|t| super::open_for_model(t, &args.model.open, None))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs = ck.files.clone();
    inputs.extend(teacher_cks.iter().flat_map(|t| t.files.clone()));
    inputs.extend(args.targets.clone());
    check_outputs(std::slice::from_ref(&args.out.output), &inputs, force)?;
    common::check_json(&args.json, &inputs, force)?;
    let data = args.data.config(global.threads)?;
    let ds = data.scan()?;
    let steps_per_epoch = ds.len().div_ceil(data.loader.batch_size.max(1));
    let cfg = train::distill::Config {
        data,
        epochs: args.epochs,
        shuffle_seed: (!args.no_shuffle).then_some(args.data.opts.seed),
        opt: common::optimizer_config(
            args.optimizer,
            args.momentum,
            args.weight_decay,
            args.nesterov,
        )?,
        decay_all: args.decay_all,
        schedule: Schedule {
            lr: args.lr,
            kind: args.schedule,
            warmup_steps: args.warmup_epochs * steps_per_epoch,
        },
        temperature: args.temperature,
        alpha: args.alpha,
        save_every: args.save_every,
        kernels: global.kernels,
    };
    cfg.check()?;
    let state_path = resume_path(&args.out.output);
    let resuming = if args.resume {
        let p = Progress::load(&state_path).with_context(|| {
            if state_path.exists() {
                String::new()
            } else {
                format!(
                    "--resume: no saved state {} (--save-every writes it)",
                    state_path.display()
                )
            }
        })?;
        Some(p)
    } else {
        if state_path.exists() && !force {
            bail!(
                "{}: the saved state of an earlier run; --resume to continue it, or --force to start again",
                state_path.display()
            );
        }
        None
    };
    let teachers = teacher_cks
        .iter()
        .zip(&args.teachers)
        .map(|(t, path)| {
            let arch = super::model_arch(None, t)?;
            let m = super::load_model(t, arch.as_deref(), global, &rep)?;
            rep.note(format!("teacher {}: {}", path.display(), m.config));
            Ok(m)
        })
        .collect::<Result<Vec<_>>>()?;
    let dev = super::device(global, &rep)?;
    let refs: Vec<&crate::models::Model> = teachers.iter().collect();
    let teacher = match &targets {
        Some(t) => Teacher::Targets(t),
        None => Teacher::Models(&refs),
    };
    let t0 = std::time::Instant::now();
    let mut settings = train::distill::settings(&cfg, &teacher);
    settings.insert("student".into(), args.model.model.display().to_string());
    settings.insert(
        "teacher_files".into(),
        serde_json::to_string(&args.teachers)?,
    );
    if let Some(p) = &resuming {
        p.check_settings(&state_path, &settings)?;
    }
    let mut save = |mut p: Progress| -> Result<()> {
        p.settings = settings.clone();
        p.save(&state_path)?;
        rep.note(format!(
            "saved the run after epoch {} to {}",
            p.epochs_done,
            state_path.display()
        ));
        crate::report::test_pause("saved");
        Ok(())
    };
    let out = train::distill::distill(
        &ck,
        arch.as_deref(),
        teacher,
        &dev,
        &cfg,
        &rep,
        train::distill::Saves {
            resume: resuming.as_ref(),
            save: &mut save,
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();

    let mut meta = provenance::metadata(&provenance::command_line(), std::slice::from_ref(&ck))?;
    meta.extend(out.metadata.clone());
    meta.insert(
        "ckpt.distill.teacher_files".into(),
        serde_json::to_string(
            &args
                .teachers
                .iter()
                .map(|t| t.display().to_string())
                .collect::<Vec<_>>(),
        )?,
    );
    if let Some(t) = &args.targets {
        meta.insert("ckpt.distill.targets_file".into(), t.display().to_string());
    }
    let replacement = apply::Replacement {
        tensors: out.tensors.clone(),
        changes: Vec::new(),
    };
    let (layout, folder) = common::model_output(&args.out.output, &ck, force)?;
    apply::write(&ck, &replacement, &layout, &meta, force)?;
    if let Some(f) = folder {
        f.commit()?;
    }

    if state_path.exists() {
        std::fs::remove_file(&state_path)
            .with_context(|| format!("{}: cannot remove", state_path.display()))?;
    }

    let images: usize = out.steps.iter().map(|s| s.images).sum();
    let agree: usize = out.steps.iter().map(|s| s.agree).sum();
    // The speed of this process's steps only, on a resumed run.
    let earlier = resuming
        .as_ref()
        .and_then(|p| p.steps.as_array().map(Vec::len))
        .unwrap_or(0);
    let images_now: usize = out.steps.iter().skip(earlier).map(|s| s.images).sum();
    let report = serde_json::json!({
        "output": args.out.output.display().to_string(),
        "teachers": args.teachers.iter().map(|t| t.display().to_string()).collect::<Vec<_>>(),
        "targets": targets.as_ref().map(|t| serde_json::json!({
            "file": t.path.display().to_string(),
            "stored": t.stored.to_string(),
            "model": t.arch,
            "rows": t.len(),
        })),
        "images": out.images,
        "epochs": args.epochs,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "steps": out.steps,
        "agreement": 100.0 * agree as f64 / images.max(1) as f64,
        "seconds": secs,
        "images_per_second": images_now as f64 / secs.max(1e-9),
    });
    common::emit_json(&args.json, &report, force)?;
    if !args.json.to_stdout() {
        let last = out.steps.last();
        writeln!(
            std::io::stdout().lock(),
            "wrote {}: {} steps over {} images x {} epoch(s); last step loss {:.4} (KD {:.4}); student agreed with the {} on {:.1} % of the images seen ({:.1} images/s)",
            args.out.output.display(),
            out.steps.len(),
            out.images,
            args.epochs,
            last.map_or(f64::NAN, |s| s.loss),
            last.map_or(f64::NAN, |s| s.kd),
            if targets.is_some() {
                "stored targets"
            } else {
                "teacher(s)"
            },
            100.0 * agree as f64 / images.max(1) as f64,
            images_now as f64 / secs.max(1e-9)
        )?;
    }
    Ok(())
}

/// Where `--save-every` keeps a run's state: next to the output, `OUT.resume` (`DIR.resume` for
/// a model folder `-o DIR/`).
fn resume_path(out: &Path) -> PathBuf {
    let mut p = out.components().as_path().as_os_str().to_owned();
    p.push(".resume");
    PathBuf::from(p)
}
