//! `ckpt ema`: exponential moving average over saved snapshots.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::average::select::step_number;
use crate::average::weights::{self, EmaSchedule, Warmup};
use crate::average::{self, OutputSpec};
use crate::cli::{AverageArgs, GlobalArgs, OutputArgs, SnapshotArgs};
use crate::commands::average_common as common;
use crate::report::Reporter;

/// Exponential moving average over saved snapshots, several decays in one pass
///
/// v_1 = x_1, v_t = B * v_{t-1} + (1 - B) * x_t over the snapshots, oldest first. This is a
/// weighted average with weights w_t = (1 - d_t) * prod_{s>t} d_s, so every decay asked for is
/// written from one pass over the inputs.
#[derive(Args, Debug)]
#[command(mut_arg("max_images", |a| a.default_value("8192")), mut_arg("batch_size", |a| a.default_value("64")))]
pub struct EmaArgs {
    #[command(flatten)]
    pub snapshots: SnapshotArgs,
    /// Decay(s) B in [0, 1); several give several outputs (name them with {decay} in -o)
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "B[,B2,...]"
    )]
    pub decay: Vec<String>,
    /// Use the step numbers in the file names: a gap of g steps decays by B^g, as if the
    /// snapshot's weights had been seen at each of those g steps
    #[arg(long)]
    pub per_step: bool,
    /// timm ModelEmaV3's warmup: the decay at step s is min(B, 1 - (1 + (s - 1) / gamma)^-power)
    /// with gamma 1 and power 2/3 (s: the file's step number with --per-step, else its position)
    #[arg(long)]
    pub warmup: bool,
    #[command(flatten)]
    pub average: AverageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub recal: common::RecalArgs,
}

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
    for (text, d) in &decays {
        let w = weights::ema(*d, inputs.len(), &sched)?;
        let path = PathBuf::from(template.replace("{decay}", text));
        outputs.push(OutputSpec {
            layout: common::layout(&path, &args.output, &inputs),
            weights: w,
            metadata: [
                ("ckpt.method".to_string(), "ema".to_string()),
                ("ckpt.decay".to_string(), text.clone()),
            ]
            .into(),
        });
    }
    common::write_outputs(&inputs, &plan, outputs, &cfg, &args.recal, global, &rep)
}
