//! Streaming weighted averages of checkpoints: SWA, EMA over saved steps, uniform or weighted
//! soups, several outputs from one pass.
//!
//! Each output tensor is cut into chunks of [`CHUNK`] elements; worker threads take chunks, read
//! the inputs' elements straight from their memory maps, accumulate `w_i * x_i` in f64, round once
//! into the output dtype and write the bytes at their place in the output file. Anonymous memory
//! is therefore a few chunk-sized buffers per thread, whatever the size of the checkpoints or of
//! any one tensor. Integer tensors (`num_batches_tracked`) are never averaged: an [`IntPolicy`]
//! picks or combines them exactly, in their own dtype.
//!
//! An output goes to a [`Target`]: a checkpoint file (streamed, committed atomically at the end)
//! or memory, where it becomes an in-memory [`Checkpoint`] that a model can be built from and
//! judged before anything is written (BN recalibration of an average, soups). The arithmetic is
//! the same for both, so an average written later from memory is byte-identical to one written
//! straight to a file. An input whose weight in an output is zero takes no part in it (it is not
//! read for it, and integer tensors are taken from the others), so a soup of some of the inputs
//! is their average, whatever the rest hold.

pub mod select;
pub mod weights;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::checkpoint::dtype::{self, DType};
use crate::checkpoint::write::{CheckpointWriter, OutputLayout, PlannedTensor};
use crate::checkpoint::Checkpoint;
use crate::report::Reporter;

/// Elements per unit of work: 256 KiB of f64 accumulator per output, which stays in a core's L2
/// cache while every input is added to it.
pub const CHUNK: usize = 1 << 15;

/// What to do with integer (and bool) tensors, which are never averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IntPolicy {
    /// Take the oldest snapshot's value
    First,
    /// Take the newest snapshot's value
    #[default]
    Last,
    /// Element-wise maximum
    Max,
    /// Element-wise sum (an error if it overflows the dtype)
    Sum,
    /// Refuse integer tensors
    Error,
}

#[derive(Clone, Debug, Default)]
pub struct Config {
    pub int_policy: IntPolicy,
    /// Output dtype for floating tensors (default: each tensor's input dtype).
    pub dtype: Option<DType>,
    /// Average a tensor over the snapshots that have it, instead of refusing missing tensors.
    pub allow_missing: bool,
    /// Average NaN and infinite values instead of refusing them.
    pub allow_nonfinite: bool,
    pub force: bool,
}

/// Where an output of an averaging pass goes.
#[derive(Clone, Debug)]
pub enum Target {
    File(OutputLayout),
    /// An in-memory checkpoint, named in messages by the path given.
    Memory(std::path::PathBuf),
}

/// One output of an averaging pass.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    pub target: Target,
    /// One weight per input, summing to 1.
    pub weights: Vec<f64>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
}

/// One tensor of the output: where it comes from and what it becomes.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub in_dtype: DType,
    pub out_dtype: DType,
    pub shape: Vec<usize>,
    /// Indices of the inputs that hold it (all of them unless `allow_missing`).
    pub holders: Vec<usize>,
    kind: Kind,
}

/// The checked correspondence between the inputs' tensors.
#[derive(Debug)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// Tensors missing from some inputs (only with `allow_missing`): name and the holders.
    pub partial: Vec<String>,
}

impl Plan {
    pub fn planned_tensors(&self) -> Vec<PlannedTensor> {
        self.entries
            .iter()
            .map(|e| PlannedTensor {
                name: e.name.clone(),
                dtype: e.out_dtype,
                shape: e.shape.clone(),
            })
            .collect()
    }

    pub fn num_int(&self) -> usize {
        self.entries.iter().filter(|e| e.kind == Kind::Int).count()
    }
}

fn file_name(ck: &Checkpoint) -> String {
    ck.path.display().to_string()
}

/// Checks that the inputs hold the same tensors with the same shapes and dtypes, and decides
/// each output tensor. Cheap: reads headers only.
pub fn plan(inputs: &[Checkpoint], cfg: &Config) -> Result<Plan> {
    if inputs.is_empty() {
        bail!("no snapshots given");
    }
    // Output order: the first input's order, then tensors only later inputs have.
    let mut names: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for ck in inputs {
        for t in ck.tensors() {
            if seen.insert(t.name.as_str()) {
                names.push(&t.name);
            }
        }
    }
    let mut entries = Vec::with_capacity(names.len());
    let mut partial = Vec::new();
    for name in names {
        let holders: Vec<usize> = (0..inputs.len())
            .filter(|&i| inputs[i].get(name).is_some())
            .collect();
        let r = &inputs[holders[0]];
        let rt = r.get(name).unwrap();
        if holders.len() != inputs.len() {
            if !cfg.allow_missing {
                let missing = (0..inputs.len()).find(|i| !holders.contains(i)).unwrap();
                bail!(
                    "tensor {name} is in {} but not in {} (--allow-missing averages it over the snapshots that have it)",
                    file_name(r),
                    file_name(&inputs[missing])
                );
            }
            partial.push(name.to_string());
        }
        for &i in &holders[1..] {
            let t = inputs[i].get(name).unwrap();
            if t.shape != rt.shape {
                bail!(
                    "tensor {name} has shape {:?} in {} but {:?} in {}",
                    t.shape,
                    file_name(&inputs[i]),
                    rt.shape,
                    file_name(r)
                );
            }
            if t.dtype != rt.dtype {
                bail!(
                    "tensor {name} is {} in {} but {} in {}",
                    t.dtype,
                    file_name(&inputs[i]),
                    rt.dtype,
                    file_name(r)
                );
            }
        }
        let (kind, out_dtype) = if rt.dtype.is_arithmetic_float() {
            (Kind::Float, cfg.dtype.unwrap_or(rt.dtype))
        } else if rt.dtype.is_float() {
            bail!(
                "tensor {name} in {}: averaging {} is not supported",
                file_name(r),
                rt.dtype
            );
        } else {
            if cfg.int_policy == IntPolicy::Error {
                bail!(
                    "tensor {name} in {} is an integer tensor ({}) and --int error was given",
                    file_name(r),
                    rt.dtype
                );
            }
            (Kind::Int, rt.dtype)
        };
        entries.push(Entry {
            name: name.to_string(),
            in_dtype: rt.dtype,
            out_dtype,
            shape: rt.shape.clone(),
            holders,
            kind,
        });
    }
    Ok(Plan { entries, partial })
}

#[derive(Debug, Default)]
pub struct Stats {
    pub tensors: usize,
    pub averaged: usize,
    pub integer: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub elapsed: Duration,
}

struct Item {
    entry: usize,
    start: usize,
    end: usize,
}

/// Receives an output's bytes: tensor `i`'s bytes from `byte_offset` on, in any order, from
/// any thread.
trait Sink: Sync {
    fn write(&self, i: usize, byte_offset: usize, bytes: &[u8]) -> Result<()>;
}

impl Sink for CheckpointWriter {
    fn write(&self, i: usize, byte_offset: usize, bytes: &[u8]) -> Result<()> {
        CheckpointWriter::write(self, i, byte_offset, bytes)
    }
}

/// An output held in memory: one buffer per tensor.
struct MemorySink {
    tensors: Vec<std::sync::Mutex<Vec<u8>>>,
}

impl Sink for MemorySink {
    fn write(&self, i: usize, byte_offset: usize, bytes: &[u8]) -> Result<()> {
        let mut t = self.tensors[i].lock().unwrap_or_else(|e| e.into_inner());
        t[byte_offset..byte_offset + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

enum Writer {
    File(CheckpointWriter),
    Memory(MemorySink),
}

impl Writer {
    fn sink(&self) -> &dyn Sink {
        match self {
            Writer::File(w) => w,
            Writer::Memory(m) => m,
        }
    }
}

/// Runs the averaging pass and commits every file output, or leaves none behind on error.
/// Returns the statistics and, for each output in order, its in-memory checkpoint when its
/// target was memory.
pub fn run(
    inputs: &[Checkpoint],
    plan: &Plan,
    outputs: &[OutputSpec],
    cfg: &Config,
    rep: &Reporter,
) -> Result<(Stats, Vec<Option<Checkpoint>>)> {
    let t0 = Instant::now();
    for o in outputs {
        if o.weights.len() != inputs.len() {
            bail!(
                "internal error: {} weights for {} inputs",
                o.weights.len(),
                inputs.len()
            );
        }
    }
    let planned = plan.planned_tensors();
    let writers = outputs
        .iter()
        .map(|o| match &o.target {
            Target::File(layout) => Ok(Writer::File(CheckpointWriter::create(
                layout,
                planned.clone(),
                &o.metadata,
                cfg.force,
            )?)),
            Target::Memory(_) => Ok(Writer::Memory(MemorySink {
                tensors: planned
                    .iter()
                    .map(|t| std::sync::Mutex::new(vec![0u8; t.nbytes()]))
                    .collect(),
            })),
        })
        .collect::<Result<Vec<_>>>()?;
    crate::report::test_pause("average");

    let mut items = Vec::new();
    let mut total_read = 0u64;
    // Items of each tensor still to do: the last one lets the tensor's pages of every mapped
    // input leave resident memory, which would otherwise hold every input whole by the end.
    // (Per tensor, not per item: a call per 32768 elements made a small `swa` 25 % slower.)
    let mut left: Vec<usize> = vec![0; plan.entries.len()];
    let read_by_some = |i: usize| outputs.iter().any(|o| o.weights[i] != 0.0);
    for (ei, e) in plan.entries.iter().enumerate() {
        let n: usize = e.shape.iter().product();
        let read = e.holders.iter().filter(|&&i| read_by_some(i)).count();
        total_read += (n * e.in_dtype.size() * read) as u64;
        if n == 0 {
            continue;
        }
        let step = if e.kind == Kind::Int { n } else { CHUNK };
        let mut s = 0;
        while s < n {
            let end = (s + step).min(n);
            items.push(Item {
                entry: ei,
                start: s,
                end,
            });
            left[ei] += 1;
            s = end;
        }
    }
    let left: Vec<AtomicUsize> = left.into_iter().map(AtomicUsize::new).collect();
    let release = |e: &Entry| {
        for &i in &e.holders {
            if read_by_some(i) {
                let ck = &inputs[i];
                let t = ck.get(&e.name).unwrap();
                ck.release_elements(t, 0, t.shape.iter().product());
            }
        }
    };
    let bar = rep.bytes_bar(total_read, "averaging");
    items.par_iter().try_for_each_init(
        || (Vec::<Vec<f64>>::new(), Vec::<u8>::new()),
        |(accs, out), item| -> Result<()> {
            let e = &plan.entries[item.entry];
            let n = item.end - item.start;
            match e.kind {
                Kind::Float => {
                    accs.resize_with(outputs.len(), Vec::new);
                    for acc in accs.iter_mut() {
                        acc.clear();
                        acc.resize(n, 0.0);
                    }
                    for (k, o) in outputs.iter().enumerate() {
                        let wsum: f64 = e.holders.iter().map(|&i| o.weights[i]).sum();
                        for &i in &e.holders {
                            if o.weights[i] == 0.0 {
                                continue; // takes no part in this output: not even read
                            }
                            let ck = &inputs[i];
                            let t = ck.get(&e.name).unwrap();
                            let bytes = ck.elements(t, item.start, item.end);
                            let w = if wsum > 0.0 { o.weights[i] / wsum } else { 0.0 };
                            let bad = dtype::accumulate(&mut accs[k], &bytes, e.in_dtype, w);
                            if let (Some(j), false) = (bad, cfg.allow_nonfinite) {
                                let x = dtype::read_f64(&bytes, e.in_dtype, j);
                                bail!(
                                    "{}: tensor {} has {x} at element {} (use --allow-nonfinite to average it anyway)",
                                    file_name(ck),
                                    e.name,
                                    item.start + j
                                );
                            }
                            if outputs[..k].iter().all(|o| o.weights[i] == 0.0) {
                                bar.inc(bytes.len() as u64); // the first output to read it
                            }
                        }
                        out.resize(n * e.out_dtype.size(), 0);
                        dtype::store(&accs[k], e.out_dtype, out);
                        writers[k].sink().write(
                            item.entry,
                            item.start * e.out_dtype.size(),
                            out,
                        )?;
                    }
                }
                Kind::Int => {
                    let mut done: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
                    for (w, o) in writers.iter().zip(outputs) {
                        let holders = taking_part(&e.holders, &o.weights);
                        let k = match done.iter().position(|(h, _)| *h == holders) {
                            Some(k) => k,
                            None => {
                                let bytes = combine_ints(inputs, e, &holders, cfg.int_policy)?;
                                bar.inc((bytes.len() * holders.len()) as u64);
                                done.push((holders, bytes));
                                done.len() - 1
                            }
                        };
                        w.sink().write(item.entry, 0, &done[k].1)?;
                    }
                }
            }
            if left[item.entry].fetch_sub(1, Ordering::AcqRel) == 1 {
                release(e);
            }
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let written: u64 =
        planned.iter().map(|t| t.nbytes() as u64).sum::<u64>() * outputs.len() as u64;
    let mut memory = Vec::new();
    for (w, o) in writers.into_iter().zip(outputs) {
        memory.push(match (w, &o.target) {
            (Writer::File(w), _) => {
                w.commit()?;
                None
            }
            (Writer::Memory(m), Target::Memory(label)) => {
                let bytes = m
                    .tensors
                    .into_iter()
                    .map(|t| t.into_inner().unwrap_or_else(|e| e.into_inner()));
                Some(Checkpoint::from_memory(
                    label,
                    planned.iter().cloned().zip(bytes).collect(),
                    o.metadata.clone(),
                )?)
            }
            (Writer::Memory(_), Target::File(_)) => unreachable!("writers follow their targets"),
        });
    }
    let stats = Stats {
        tensors: plan.entries.len(),
        averaged: plan.entries.len() - plan.num_int(),
        integer: plan.num_int(),
        bytes_read: total_read,
        bytes_written: written,
        elapsed: t0.elapsed(),
    };
    Ok((stats, memory))
}

/// The holders of a tensor that take part in an output: those with a non-zero weight (all of
/// them when every weight is zero, as for a tensor only zero-weight inputs hold).
fn taking_part(holders: &[usize], weights: &[f64]) -> Vec<usize> {
    let h: Vec<usize> = holders
        .iter()
        .copied()
        .filter(|&i| weights[i] != 0.0)
        .collect();
    if h.is_empty() {
        holders.to_vec()
    } else {
        h
    }
}

fn combine_ints(
    inputs: &[Checkpoint],
    e: &Entry,
    holders: &[usize],
    policy: IntPolicy,
) -> Result<Vec<u8>> {
    let get = |i: usize| {
        let ck = &inputs[i];
        ck.bytes(ck.get(&e.name).unwrap())
    };
    match policy {
        IntPolicy::First => Ok(get(holders[0]).into_owned()),
        IntPolicy::Last => Ok(get(*holders.last().unwrap()).into_owned()),
        IntPolicy::Max | IntPolicy::Sum => {
            let n: usize = e.shape.iter().product();
            let all: Vec<_> = holders.iter().map(|&i| get(i)).collect();
            let mut out = vec![0u8; n * e.in_dtype.size()];
            for j in 0..n {
                let vals = all.iter().map(|b| dtype::read_int(b, e.in_dtype, j));
                let v = if policy == IntPolicy::Max {
                    vals.max().unwrap()
                } else {
                    vals.sum()
                };
                dtype::write_int(&mut out, e.in_dtype, j, v).with_context(|| {
                    format!(
                        "tensor {}: --int sum gives {v}, which does not fit {}",
                        e.name, e.in_dtype
                    )
                })?;
            }
            Ok(out)
        }
        IntPolicy::Error => bail!(
            "tensor {} is an integer tensor and --int error was given",
            e.name
        ),
    }
}

impl std::fmt::Display for IntPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IntPolicy::First => "first",
            IntPolicy::Last => "last",
            IntPolicy::Max => "max",
            IntPolicy::Sum => "sum",
            IntPolicy::Error => "error",
        })
    }
}
