//! Data set -> batches of normalised tensors, decoded and resized in parallel ahead of the
//! model, always in the data set's order.
//!
//! A producer thread walks the data set a batch at a time; within a batch, a rayon pool of its
//! own (`threads` workers) decodes and transforms the images, each written straight into its
//! fixed slot of the batch tensor, so a batch holds the same images and bytes whatever the
//! thread count, and no copy follows. Finished
//! batches wait in a bounded channel (`prefetch` batches, and at most [`PREFETCH_BYTES`] of them):
//! the producer runs ahead of the consumer by at most that much memory and blocks when it is
//! full; the consumer waits only when decoding is slower than the model. Dropping the loader
//! stops the producer.
//!
//! A file that cannot be read or decoded ends the pass with an error naming it, unless
//! `skip_bad`: then it is left out of its batch (which comes out short) and listed in the
//! [`LoadSummary`]. The batch boundaries stay those of the data set, so the batches are the same
//! whatever the thread count in that case too.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;

use super::dataset::{Dataset, Item};
use super::decode::{decode_file, DecodeOptions};
use super::transform::{tensor_len, EvalTransform, Transform};
use crate::report::{one_line, Reporter};

/// How a pass reads its images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Decoding threads (default: one per core).
    pub threads: Option<usize>,
    /// Batches decoded ahead of the consumer (fewer where they would pass [`PREFETCH_BYTES`]).
    pub prefetch: usize,
    /// Leave out unreadable or corrupt images (counted) instead of failing.
    pub skip_bad: bool,
    pub decode: DecodeOptions,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 32,
            threads: None,
            prefetch: 4,
            skip_bad: false,
            decode: DecodeOptions::default(),
        }
    }
}

/// Most bytes of finished steps waiting for the consumer. A resolution sweep's step holds a batch
/// per size (six sizes from 160 to 320 px at batch 32: 140 MB), so a count of steps alone let
/// the queue reach most of a sweep's peak memory (issue 21); where one step is over this, none
/// waits: the producer decodes the next step while the consumer runs the current one, and hands
/// it over when asked.
pub const PREFETCH_BYTES: usize = 128 << 20;

/// Steps the channel holds: `prefetch`, but no more than fit in [`PREFETCH_BYTES`] (zero: the
/// step being decoded is handed over directly).
pub fn prefetch_steps(transforms: &[Transform], opts: &LoaderOptions) -> usize {
    let step: usize = transforms
        .iter()
        .map(|t| tensor_len(t.size()) * opts.batch_size * std::mem::size_of::<f32>())
        .sum();
    opts.prefetch.min(PREFETCH_BYTES / step.max(1))
}

/// A batch of images at one size.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `n x 3 x size x size` (NCHW), normalised.
    pub images: Vec<f32>,
    pub n: usize,
    pub size: u32,
    /// Class indices (ImageFolder), `None` for a flat folder.
    pub labels: Option<Vec<i64>>,
    pub paths: Vec<PathBuf>,
    /// Each image's [`Item::index`] (position in the folder's listing).
    pub indices: Vec<usize>,
}

/// An image left out by `skip_bad`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedImage {
    pub path: PathBuf,
    /// The error, on one line (it names the file).
    pub error: String,
}

/// What a pass read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSummary {
    pub images: usize,
    pub skipped: Vec<SkippedImage>,
    pub elapsed: Duration,
}

impl LoadSummary {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One step of a pass: the same images at each requested transform.
struct Step {
    batches: Vec<Batch>,
    skipped: Vec<SkippedImage>,
}

/// The batches of a pass at several sizes from one decode per image (a resolution sweep):
/// each step yields one [`Batch`] per transform, in the order given, holding the same images.
pub struct MultiLoader {
    rx: Option<Receiver<Result<Step>>>,
    producer: Option<JoinHandle<()>>,
    bar: ProgressBar,
    summary: LoadSummary,
    started: Instant,
    failed: bool,
}

impl MultiLoader {
    pub fn new(
        dataset: &Dataset,
        transforms: &[Transform],
        opts: &LoaderOptions,
        rep: &Reporter,
    ) -> Result<MultiLoader> {
        if transforms.is_empty() {
            bail!("no image transform given");
        }
        for t in transforms {
            t.check()?;
        }
        if opts.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("ckpt-data-{i}"));
        if let Some(n) = opts.threads {
            pool = pool.num_threads(n.max(1));
        }
        let pool = pool.build().context("starting image decoding threads")?;

        let (tx, rx) = sync_channel(prefetch_steps(transforms, opts));
        let items = dataset.items.clone();
        let labelled = dataset.is_labelled();
        let transforms = transforms.to_vec();
        let opts = *opts;
        let producer = std::thread::Builder::new()
            .name("ckpt-data".into())
            .spawn(move || {
                for chunk in items.chunks(opts.batch_size) {
                    let step = pool.install(|| load_step(chunk, labelled, &transforms, &opts));
                    let failed = step.is_err();
                    // A closed channel means the consumer is gone: stop.
                    if tx.send(step).is_err() || failed {
                        return;
                    }
                }
            })
            .context("starting the image loader thread")?;
        Ok(MultiLoader {
            rx: Some(rx),
            producer: Some(producer),
            bar: rep.images_bar(dataset.len() as u64, "images"),
            summary: LoadSummary::default(),
            started: Instant::now(),
            failed: false,
        })
    }

    /// What has been read so far (everything, once the iterator is exhausted).
    pub fn summary(&self) -> &LoadSummary {
        &self.summary
    }

    fn finish(&mut self) {
        self.rx = None;
        if let Some(h) = self.producer.take() {
            // The producer only panics on a bug; surface it here rather than lose it.
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        self.summary.elapsed = self.started.elapsed();
        self.bar.finish_and_clear();
    }
}

impl Iterator for MultiLoader {
    type Item = Result<Vec<Batch>>;

    fn next(&mut self) -> Option<Result<Vec<Batch>>> {
        loop {
            if self.failed {
                return None;
            }
            let received = self.rx.as_ref()?.recv();
            match received {
                Ok(Ok(step)) => {
                    let n = step.batches[0].n;
                    self.summary.images += n;
                    self.bar.inc((n + step.skipped.len()) as u64);
                    self.summary.skipped.extend(step.skipped);
                    self.summary.elapsed = self.started.elapsed();
                    // A batch whose every image was skipped is not handed out.
                    if n > 0 {
                        return Some(Ok(step.batches));
                    }
                }
                Ok(Err(e)) => {
                    self.failed = true;
                    self.finish();
                    return Some(Err(e));
                }
                Err(_) => {
                    self.finish();
                    return None;
                }
            }
        }
    }
}

impl Drop for MultiLoader {
    fn drop(&mut self) {
        // Closing the channel unblocks the producer, which then stops.
        self.rx = None;
        if let Some(h) = self.producer.take() {
            let _ = h.join();
        }
        self.bar.finish_and_clear();
    }
}

/// The batches of a pass at one size.
pub struct Loader {
    inner: MultiLoader,
}

impl Loader {
    pub fn new(
        dataset: &Dataset,
        transform: Transform,
        opts: &LoaderOptions,
        rep: &Reporter,
    ) -> Result<Loader> {
        Ok(Loader {
            inner: MultiLoader::new(dataset, &[transform], opts, rep)?,
        })
    }

    pub fn summary(&self) -> &LoadSummary {
        self.inner.summary()
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        self.inner
            .next()
            .map(|r| r.map(|mut v| v.pop().expect("one transform, one batch")))
    }
}

/// A [`MultiLoader`] over eval transforms (the usual resolution sweep).
pub fn sweep_loader(
    dataset: &Dataset,
    transforms: &[EvalTransform],
    opts: &LoaderOptions,
    rep: &Reporter,
) -> Result<MultiLoader> {
    let t: Vec<Transform> = transforms.iter().map(|t| Transform::Eval(*t)).collect();
    MultiLoader::new(dataset, &t, opts, rep)
}

/// Decodes and transforms one batch's items in parallel (on the current rayon pool), each
/// worker writing its image straight into its place in the batch tensors.
fn load_step(
    items: &[Item],
    labelled: bool,
    transforms: &[Transform],
    opts: &LoaderOptions,
) -> Result<Step> {
    let lens: Vec<usize> = transforms.iter().map(|t| tensor_len(t.size())).collect();
    // Zeroed allocations come from fresh pages: the workers' writes fault them in, in parallel.
    let mut buffers: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0f32; items.len() * l]).collect();
    // Per item, its slot in each transform's tensor.
    let mut slots: Vec<Vec<&mut [f32]>> = (0..items.len()).map(|_| Vec::new()).collect();
    for (buf, &len) in buffers.iter_mut().zip(&lens) {
        for (slot, chunk) in slots.iter_mut().zip(buf.chunks_exact_mut(len)) {
            slot.push(chunk);
        }
    }
    let results: Vec<Result<()>> = items
        .par_iter()
        .zip(slots.into_par_iter())
        .map(|(item, mut outs)| {
            let img = decode_file(&item.path, &opts.decode)?;
            for (t, out) in transforms.iter().zip(outs.iter_mut()) {
                t.apply_into(&img, item.index as u64, out)
                    .with_context(|| format!("{}: cannot resize", item.path.display()))?;
            }
            Ok(())
        })
        .collect();

    let mut kept = Vec::with_capacity(items.len());
    let mut skipped = Vec::new();
    for (k, (item, result)) in items.iter().zip(results).enumerate() {
        match result {
            Ok(()) => kept.push(k),
            Err(e) if opts.skip_bad => skipped.push(SkippedImage {
                path: item.path.clone(),
                error: one_line(&e),
            }),
            Err(e) => return Err(e),
        }
    }
    let batches = buffers
        .into_iter()
        .zip(transforms.iter().zip(&lens))
        .map(|(mut images, (t, &len))| {
            if kept.len() < items.len() {
                // Close the gaps of skipped images, keeping the order.
                for (to, &from) in kept.iter().enumerate() {
                    if to != from {
                        images.copy_within(from * len..(from + 1) * len, to * len);
                    }
                }
                images.truncate(kept.len() * len);
            }
            Batch {
                images,
                n: kept.len(),
                size: t.size(),
                labels: labelled
                    .then(|| kept.iter().map(|&k| items[k].label.unwrap_or(-1)).collect()),
                paths: kept.iter().map(|&k| items[k].path.clone()).collect(),
                indices: kept.iter().map(|&k| items[k].index).collect(),
            }
        })
        .collect();
    Ok(Step { batches, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(size: u32) -> Transform {
        Transform::Eval(EvalTransform {
            size,
            ..Default::default()
        })
    }

    #[test]
    fn regression_21_prefetch_is_bounded_in_bytes() {
        let opts = LoaderOptions::default();
        // An eval pass at 224, batch 32: 19 MB a step, the usual four steps ahead.
        assert_eq!(prefetch_steps(&[eval(224)], &opts), 4);
        // A six-size sweep's step is 140 MB: none waits beside the one being decoded.
        let sweep: Vec<Transform> = [160, 192, 224, 256, 288, 320].map(eval).to_vec();
        assert_eq!(prefetch_steps(&sweep, &opts), 0);
        // Two sizes at batch 32 (17 MB): four again; at batch 256, one.
        let two = [eval(160), eval(192)];
        assert_eq!(prefetch_steps(&two, &opts), 4);
        let big = LoaderOptions {
            batch_size: 256,
            ..opts
        };
        assert_eq!(prefetch_steps(&two, &big), 0);
        assert_eq!(prefetch_steps(&[eval(128)], &big), 2);
    }
}
