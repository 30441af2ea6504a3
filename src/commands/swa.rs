//! `ckpt swa`: average saved snapshots.

use anyhow::Result;
use clap::Args;

use crate::average::{self, weights, OutputSpec};
use crate::cli::{AverageArgs, GlobalArgs, OutputArgs, SnapshotArgs};
use crate::commands::average_common as common;
use crate::report::Reporter;

/// Average snapshots (stochastic weight averaging), streaming, in f64
///
/// The uniform average of the chosen snapshots, or a weighted one with --weights. Floating
/// tensors are accumulated in f64 and rounded once into their stored dtype (or --dtype);
/// integer tensors follow --int. BatchNorm running statistics are averaged like the weights and
/// do not fit the averaged weights: --recal-bn DIR recomputes them before writing.
#[derive(Args, Debug)]
#[command(mut_arg("max_images", |a| a.default_value("8192")), mut_arg("batch_size", |a| a.default_value("64")))]
pub struct SwaArgs {
    #[command(flatten)]
    pub snapshots: SnapshotArgs,
    /// Weights, one per chosen snapshot (oldest first), normalised to sum 1: 1,1,2 gives
    /// 0.25,0.25,0.5
    #[arg(long, value_delimiter = ',', value_name = "W1,W2,...")]
    pub weights: Option<Vec<f64>>,
    #[command(flatten)]
    pub average: AverageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub recal: common::RecalArgs,
}

pub fn run(args: SwaArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (_paths, inputs) = common::open_snapshots(&args.snapshots, &rep)?;
    let w = match &args.weights {
        Some(w) => weights::normalised(w, inputs.len())?,
        None => weights::uniform(inputs.len()),
    };
    let cfg = common::config(&args.average, &args.output);
    let plan = average::plan(&inputs, &cfg)?;
    let out = OutputSpec {
        layout: common::layout(&args.output.output, &args.output, &inputs),
        weights: w,
        metadata: [("ckpt.method".to_string(), "swa".to_string())].into(),
    };
    common::write_outputs(&inputs, &plan, vec![out], &cfg, &args.recal, global, &rep)
}
