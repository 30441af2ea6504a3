//! A folder's batches decoded once and replayed: for commands that pass over the same images
//! many times with the same deterministic transform (a soup judges every candidate on the same
//! validation and recalibration images).
//!
//! The batches are kept when their tensors fit the memory budget the caller gives (the size is
//! known from the image count and the transform before anything is decoded); otherwise every
//! pass decodes the folder again, and [`Batches::cached`] says so. Replayed batches are the
//! loader's own, byte for byte, in the same order, so a pass gives the same result either way.

use anyhow::Result;

use super::dataset::Dataset;
use super::loader::{Batch, LoadSummary, Loader, LoaderOptions};
use super::transform::{tensor_len, Transform};
use crate::report::Reporter;

/// A folder's batches at one transform, held in memory or decoded again per pass.
pub struct Batches {
    dataset: Dataset,
    transform: Transform,
    opts: LoaderOptions,
    kept: Option<Vec<Batch>>,
    summary: LoadSummary,
}

impl Batches {
    /// Bytes the decoded tensors of `dataset` at `transform` take (f32).
    pub fn bytes_needed(dataset: &Dataset, transform: &Transform) -> u64 {
        (dataset.len() * tensor_len(transform.size()) * 4) as u64
    }

    /// Prepares the batches of `dataset`; when they fit `budget` bytes they are decoded now
    /// (once) and `budget` shrinks by their size, else nothing is decoded until [`Batches::pass`].
    /// `rep` shows the decoding progress.
    pub fn new(
        dataset: Dataset,
        transform: Transform,
        opts: &LoaderOptions,
        budget: &mut u64,
        rep: &Reporter,
    ) -> Result<Batches> {
        let need = Self::bytes_needed(&dataset, &transform);
        let mut b = Batches {
            dataset,
            transform,
            opts: *opts,
            kept: None,
            summary: LoadSummary::default(),
        };
        if need <= *budget {
            let mut loader = Loader::new(&b.dataset, b.transform, &b.opts, rep)?;
            let kept = loader.by_ref().collect::<Result<Vec<_>>>()?;
            b.summary = loader.summary().clone();
            b.kept = Some(kept);
            *budget -= need;
        }
        Ok(b)
    }

    /// Whether the batches are held in memory.
    pub fn cached(&self) -> bool {
        self.kept.is_some()
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Images per pass (those read, when held; the folder's, before the first streamed pass).
    pub fn images(&self) -> usize {
        match &self.kept {
            Some(_) => self.summary.images,
            None => self.dataset.len(),
        }
    }

    /// The decode of the held batches (images read, skipped ones, time); empty when streamed.
    pub fn summary(&self) -> &LoadSummary {
        &self.summary
    }

    /// One pass over the batches: the held ones, or a fresh decode with a quiet loader.
    pub fn pass(&self) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        match &self.kept {
            Some(kept) => Ok(Box::new(kept.iter().cloned().map(Ok))),
            None => Ok(Box::new(Loader::new(
                &self.dataset,
                self.transform,
                &self.opts,
                &Reporter::new(true),
            )?)),
        }
    }
}
