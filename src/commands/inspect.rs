//! `ckpt inspect`: what a checkpoint holds.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::bn::part::PartRecord;
use crate::checkpoint::summary::{summarize, Summary};
use crate::checkpoint::Checkpoint;
use crate::cli::{GlobalArgs, OpenArgs};
use crate::report::{human_bytes, Reporter};

/// Show a checkpoint's format, tensors, parameter count, BatchNorm layers and provenance
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint: .safetensors, sharded index or its folder, or a torch.save file
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    #[command(flatten)]
    pub open: OpenArgs,
    /// List every tensor with its dtype and shape
    #[arg(long)]
    pub tensors: bool,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs, _global: &GlobalArgs, _rep: Reporter) -> Result<()> {
    let ck = Checkpoint::open(&args.path, &args.open.options())?;
    let s = summarize(&ck, args.tensors);
    // A recal-bn stats part: the record of the pass it is a shard of (a malformed record is
    // left to the metadata listing; `--merge` says what is wrong with it).
    let part = PartRecord::from_metadata(&ck.metadata).ok().flatten();
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        if let Some(r) = &part {
            let fields: serde_json::Map<String, serde_json::Value> = r
                .fields()
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            v["part"] = serde_json::Value::Object(fields);
        }
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &s, part.as_ref())?;
    }
    Ok(())
}

fn print_text(out: &mut impl Write, s: &Summary, part: Option<&PartRecord>) -> Result<()> {
    writeln!(out, "path        {}", s.path)?;
    writeln!(out, "format      {}", s.format)?;
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
        writeln!(out, "prefix      {p} (removed from every key)")?;
    }
    if let Some(a) = &s.arch {
        writeln!(out, "arch        {a}")?;
    }
    if let (Some(n), Some(l)) = (s.num_classes, &s.labelling) {
        let how = if l.len() > 1 {
            "ImageNet-1k synset order for synset-named class folders, else sorted folder order"
        } else {
            "class folders in sorted order"
        };
        writeln!(
            out,
            "classes     {n} (labels: {how}; --class-map FILE overrides)"
        )?;
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
    if let Some(r) = part {
        writeln!(
            out,
            "stats part  shard {} of a recal-bn pass (--merge checks every field)",
            r.shard
        )?;
        let fields = r.fields();
        let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in fields {
            writeln!(out, "  {k:w$}  {v}")?;
        }
    }
    let shown: Vec<(&String, &String)> = s
        .metadata
        .iter()
        .filter(|(k, _)| part.is_none() || !k.starts_with("ckpt.part."))
        .collect();
    if !shown.is_empty() {
        writeln!(out, "metadata")?;
        for (k, v) in shown {
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
