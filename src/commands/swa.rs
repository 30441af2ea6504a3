//! `ckpt swa`: average saved snapshots.

use anyhow::Result;

use crate::average::{self, weights, OutputSpec, Target};
use crate::cli::{GlobalArgs, SwaArgs};
use crate::commands::common;
use crate::report::Reporter;

pub fn run(args: SwaArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (_paths, inputs) = common::open_snapshots(&args.snapshots, &rep)?;
    let w = match &args.weights {
        Some(w) => weights::normalised(w, inputs.len())?,
        None => weights::uniform(inputs.len()),
    };
    let cfg = common::config(&args.average, &args.output);
    let plan = average::plan(&inputs, &cfg)?;
    let (layout, folder) = common::layout(&args.output.output, &args.output, &inputs);
    let out = OutputSpec {
        target: Target::File(layout),
        weights: w,
        metadata: [("ckpt.method".to_string(), "swa".to_string())].into(),
    };
    common::write_outputs(
        &inputs,
        &plan,
        vec![out],
        folder.into_iter().collect(),
        &cfg,
        &args.recal,
        global,
        &rep,
    )
}
