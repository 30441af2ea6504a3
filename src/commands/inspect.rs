//! `ckpt inspect`: what a checkpoint holds.

use std::io::Write;

use anyhow::Result;

use crate::checkpoint::summary::{summarize, Summary};
use crate::checkpoint::Checkpoint;
use crate::cli::{GlobalArgs, InspectArgs};
use crate::commands::common;
use crate::models::{detect_unwrapped, weight_shapes};
use crate::report::{human_bytes, Reporter};

pub fn run(args: InspectArgs, _global: &GlobalArgs, _rep: Reporter) -> Result<()> {
    let ck = Checkpoint::open(&args.path, &args.open.options())?;
    let mut s = summarize(&ck, args.tensors);
    let found = detect_unwrapped(&weight_shapes(&ck), None).ok();
    s.arch_prefix = found.as_ref().and_then(|(_, p)| p.clone());
    s.arch = found.map(|(c, _)| c.to_string());
    common::check_json(&args.json, &ck.files, args.force)?;
    if !args.json.to_stdout() {
        print_text(&mut std::io::stdout().lock(), &s)?;
    }
    common::emit_json(&args.json, &s, args.force)
}

fn print_text(out: &mut impl Write, s: &Summary) -> Result<()> {
    writeln!(out, "path        {}", s.path)?;
    writeln!(out, "format      {}", s.format)?;
    if let Some(t) = &s.trainer {
        writeln!(out, "written by  {t}")?;
    }
    if s.files.len() > 1 {
        writeln!(out, "files       {}", s.files.len())?;
    }
    if let Some(k) = &s.key {
        let how = if s.key_picked {
            " (picked automatically; --key chooses)"
        } else {
            ""
        };
        writeln!(out, "key         {k}{how}")?;
    }
    if let Some(p) = &s.stripped_prefix {
        writeln!(
            out,
            "prefix      {p} (removed from every key: {})",
            s.prefix_reasons.join(", ")
        )?;
    }
    if let Some(n) = s.n_averaged {
        writeln!(out, "n_averaged  {n} (AveragedModel's count; not a weight)")?;
    }
    if let Some(a) = &s.arch {
        match &s.arch_prefix {
            Some(p) => writeln!(out, "arch        {a}, without the prefix {p}")?,
            None => writeln!(out, "arch        {a}")?,
        }
    }
    writeln!(out, "tensors     {}", s.num_tensors)?;
    writeln!(out, "parameters  {}", group_digits(s.num_params))?;
    writeln!(
        out,
        "bytes       {} ({})",
        human_bytes(s.total_bytes as u64),
        group_digits(s.total_bytes)
    )?;
    let dtypes: Vec<String> = s.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
    writeln!(out, "dtypes      {}", dtypes.join(", "))?;
    writeln!(out, "bn layers   {}", s.bn_layers.len())?;
    for l in &s.bn_layers {
        writeln!(out, "  {l}")?;
    }
    if !s.placeholders.is_empty() {
        writeln!(
            out,
            "not read    {} (classes outside the state dict, left as placeholders; never constructed)",
            s.placeholders.join(", ")
        )?;
    }
    if !s.metadata.is_empty() {
        writeln!(out, "metadata")?;
        for (k, v) in &s.metadata {
            writeln!(out, "  {k} = {v}")?;
        }
    }
    if let Some(rows) = &s.tensors {
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
        writeln!(out, "tensor list")?;
        for r in rows {
            writeln!(out, "  {:w$}  {:8} {:?}", r.name, r.dtype, r.shape)?;
        }
    }
    Ok(())
}

/// 11689512 -> 11,689,512
pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
