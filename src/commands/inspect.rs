//! `ckpt inspect`: what a checkpoint holds.

use std::io::Write;

use anyhow::Result;

use crate::bn::part::PartRecord;
use crate::checkpoint::summary::{summarize, Summary};
use crate::checkpoint::Checkpoint;
use crate::cli::{GlobalArgs, InspectArgs};
use crate::commands::common;
use crate::data::labels;
use crate::models::{detect_unwrapped, weight_shapes};
use crate::report::{human_bytes, Reporter};

pub fn run(args: InspectArgs, _global: &GlobalArgs, _rep: Reporter) -> Result<()> {
    let ck = Checkpoint::open(&args.path, &args.open.options())?;
    let mut s = summarize(&ck, args.tensors);
    // A model folder's architecture selects as --arch would; a config that does not fit the
    // weights is said, not refused: inspect is where one looks for why.
    let (arch, config_problem) = match super::model_arch(None, &ck) {
        Ok(a) => (a, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let found = detect_unwrapped(&weight_shapes(&ck), arch.as_deref()).ok();
    s.arch_prefix = found.as_ref().and_then(|(_, p)| p.clone());
    if let Some((c, _)) = &found {
        s.num_classes = Some(c.num_classes());
        s.labelling = Some(labels::default_labellings(c.num_classes()));
    }
    s.arch = found.map(|(c, _)| c.to_string());
    // A recal-bn stats part: the record of the pass it is a shard of (a malformed record is
    // left to the metadata listing; `--merge` says what is wrong with it).
    let part = PartRecord::from_metadata(&ck.metadata).ok().flatten();
    common::check_json(&args.json, &ck.files, args.force)?;
    if !args.json.to_stdout() {
        let mut out = std::io::stdout().lock();
        print_text(&mut out, &s, part.as_ref())?;
        if let Some(f) = &ck.model_folder {
            writeln!(
                out,
                "config      {}: {}",
                f.config_path.display(),
                f.describe()
            )?;
        }
        if let Some(p) = &config_problem {
            writeln!(out, "config does not fit: {p}")?;
        }
    }
    let mut v = serde_json::to_value(&s)?;
    if let Some(f) = &ck.model_folder {
        let config: serde_json::Value = serde_json::from_slice(&f.bytes)?;
        v["config"] = config;
        v["config_path"] = f.config_path.display().to_string().into();
    }
    if let Some(p) = config_problem {
        v["config_problem"] = p.into();
    }
    if let Some(r) = &part {
        let fields: serde_json::Map<String, serde_json::Value> = r
            .fields()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        v["part"] = serde_json::Value::Object(fields);
    }
    common::emit_json(&args.json, &v, args.force)
}

fn print_text(out: &mut impl Write, s: &Summary, part: Option<&PartRecord>) -> Result<()> {
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
    if !s.placeholders.is_empty() {
        writeln!(
            out,
            "not read    {} (classes outside the state dict, left as placeholders; never constructed)",
            s.placeholders.join(", ")
        )?;
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
