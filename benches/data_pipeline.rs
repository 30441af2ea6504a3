//! The Rust side of `benches/data_bench.py` (not a test): one timed pass, or several, of
//! `ckpt::data`'s loader over a folder, printed as one JSON line; optionally the 8-bit eval crops
//! of every image, for the script's fidelity comparison against torchvision.
//!
//!     cargo bench --bench data_pipeline -- DIR [--threads N] [--batch-size B] [--size S]
//!         [--crop-pct P] [--interpolation bilinear|bicubic] [--passes K] [--dump-u8 FILE]

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ckpt::data::{
    decode_file, Dataset, DatasetOptions, DecodeOptions, EvalTransform, Interpolation, Loader,
    LoaderOptions, Transform,
};
use ckpt::report::Reporter;

fn main() -> Result<()> {
    let mut dir = None;
    let mut threads = None;
    let mut batch_size = 32;
    let mut passes = 3;
    let mut dump = None;
    let mut t = EvalTransform::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().context("missing value");
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--threads" => threads = Some(value()?.parse()?),
            "--batch-size" => batch_size = value()?.parse()?,
            "--size" => t.size = value()?.parse()?,
            "--crop-pct" => t.crop_pct = value()?.parse()?,
            "--interpolation" => {
                t.interpolation = match value()?.as_str() {
                    "bilinear" => Interpolation::Bilinear,
                    "bicubic" => Interpolation::Bicubic,
                    other => bail!("unknown interpolation {other}"),
                }
            }
            "--passes" => passes = value()?.parse()?,
            "--dump-u8" => dump = Some(PathBuf::from(value()?)),
            _ if !a.starts_with("--") => dir = Some(PathBuf::from(a)),
            _ => bail!("unknown option {a}"),
        }
    }
    let dir = dir.context("usage: data_pipeline DIR [options]")?;
    let ds = Dataset::scan(&dir, &DatasetOptions::default())?;

    if let Some(path) = dump {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for item in &ds.items {
            let img = decode_file(&item.path, &DecodeOptions::default())?;
            out.write_all(&t.apply_u8(&img)?.to_rgb())?;
        }
        out.flush()?;
    }

    let opts = LoaderOptions {
        batch_size,
        threads,
        ..LoaderOptions::default()
    };
    let mut rates = Vec::new();
    for _ in 0..passes {
        let start = Instant::now();
        let mut n = 0;
        let mut checksum = 0f64;
        for batch in Loader::new(&ds, Transform::Eval(t), &opts, &Reporter::new(true))? {
            let batch = batch?;
            n += batch.n;
            checksum += batch.images[0] as f64;
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(checksum);
        rates.push(n as f64 / secs);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    let median = rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{{\"images\": {}, \"threads\": {}, \"batch_size\": {batch_size}, \"size\": {}, \"rates\": {:?}, \"median\": {}}}",
        ds.len(),
        threads.unwrap_or_else(rayon::current_num_threads),
        t.size,
        rates,
        if median.is_nan() { "null".to_string() } else { median.to_string() }
    );
    Ok(())
}
