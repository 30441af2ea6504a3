//! `ckpt ema`: exponential moving average over saved snapshots.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::average::select::step_number;
use crate::average::weights::{self, EmaSchedule, Warmup};
use crate::average::{self, OutputSpec, Target};
use crate::cli::{EmaArgs, GlobalArgs};
use crate::commands::common;
use crate::report::Reporter;

pub fn run(args: EmaArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let decays = args
        .decay
        .iter()
        .map(|s| match s.trim().parse::<f64>() {
            Ok(d) => Ok((s.trim().to_string(), d)),
            Err(_) => bail!("--decay {s}: not a number"),
        })
        .collect::<Result<Vec<_>>>()?;
    let template = args.output.output.to_string_lossy().to_string();
    if decays.len() > 1 && !template.contains("{decay}") {
        bail!("{template}: several decays need {{decay}} in the output name, e.g. -o 'ema_{{decay}}.safetensors'");
    }
    let (paths, inputs) = common::open_snapshots(&args.snapshots, &rep)?;
    let steps = if args.per_step {
        let s = paths
            .iter()
            .map(|p| {
                step_number(p).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: --per-step needs a step number in the file name",
                        p.display()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Some(s)
    } else {
        None
    };
    let sched = EmaSchedule {
        steps,
        warmup: args.warmup.then(Warmup::default),
    };
    let cfg = common::config(&args.average, &args.output);
    let plan = average::plan(&inputs, &cfg)?;
    let mut outputs = Vec::new();
    let mut folders = Vec::new();
    for (text, d) in &decays {
        let w = weights::ema(*d, inputs.len(), &sched)?;
        let path = PathBuf::from(template.replace("{decay}", text));
        let (layout, folder) = common::layout(&path, &args.output, &inputs);
        folders.extend(folder);
        outputs.push(OutputSpec {
            target: Target::File(layout),
            weights: w,
            metadata: [
                ("ckpt.method".to_string(), "ema".to_string()),
                ("ckpt.decay".to_string(), text.clone()),
            ]
            .into(),
        });
    }
    common::write_outputs(
        &inputs,
        &plan,
        outputs,
        folders,
        &cfg,
        &args.recal,
        global,
        &rep,
    )
}
