//! The frozen backbone's output, kept across the epochs of a head fine-tune.
//!
//! In a head fine-tune nothing before the head BN is trained and the transform is
//! deterministic (the eval transform), so what the trunk computes for an image
//! ([`HeadInput`]: the head BN's input, and the shortcut added after it) is the same every
//! epoch. The first epoch keeps each image's rows, keyed by the image's position in the
//! folder's listing; later epochs build their batches from them in the epoch's order, with no
//! decoding and no trunk. A batch is the same images whichever way it is made: the epoch's
//! order cut into `batch_size` chunks, less the images the first pass skipped (`--skip-bad`),
//! as the loader makes them. Each cached row is a view of the batch the trunk produced (no
//! copy); a cached batch is one concatenation of its rows.
//!
//! It is kept only when the whole set fits the budget, known from the first batch (every image
//! has the same size at one transform); otherwise the trunk runs every epoch and the cache says
//! why once.

use std::collections::HashMap;

use anyhow::Result;

use crate::data::Item;
use crate::models::HeadInput;

/// What the cache decided after the first batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// The whole set takes `bytes`; kept.
    Keep { bytes: usize },
    /// The whole set would take `bytes`, more than the budget: recomputed every epoch.
    TooBig { bytes: usize, budget: usize },
}

/// The per-image trunk outputs of one fine-tune.
pub struct HeadCache {
    budget: usize,
    images: usize,
    rows: HashMap<usize, HeadInput>,
    bytes: usize,
    decision: Option<Decision>,
    /// Set once a whole pass has been stored.
    complete: bool,
}

impl HeadCache {
    /// A cache of at most `budget` bytes for a set of `images` images.
    pub fn new(budget: usize, images: usize) -> HeadCache {
        HeadCache {
            budget,
            images,
            rows: HashMap::new(),
            bytes: 0,
            decision: None,
            complete: false,
        }
    }

    /// Offers the trunk's output for the images of one batch (`indices`: their
    /// [`Item::index`]); returns the decision when this batch made it (the first batch).
    pub fn offer(&mut self, indices: &[usize], input: &HeadInput) -> Result<Option<Decision>> {
        let mut decided = None;
        if self.decision.is_none() && !input.is_empty() {
            let per_image = input.bytes().div_ceil(input.len());
            let bytes = per_image.saturating_mul(self.images);
            let d = if bytes <= self.budget {
                Decision::Keep { bytes }
            } else {
                Decision::TooBig {
                    bytes,
                    budget: self.budget,
                }
            };
            self.decision = Some(d.clone());
            decided = Some(d);
        }
        if !self.keeping() {
            return Ok(decided);
        }
        for (row, &index) in indices.iter().enumerate() {
            self.rows.insert(index, input.row(row)?);
        }
        self.bytes += input.bytes();
        Ok(decided)
    }

    fn keeping(&self) -> bool {
        matches!(self.decision, Some(Decision::Keep { .. }))
    }

    /// Marks the end of the first pass: from here on, batches come from the cache if it kept
    /// everything.
    pub fn end_pass(&mut self) {
        self.complete = self.keeping();
    }

    /// Whether the next epochs can be served from memory.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The batch of `chunk` (a `batch_size` chunk of an epoch's order): the rows of its images
    /// the first pass read, stacked, with those images' items; `None` when it read none of
    /// them.
    pub fn batch<'a>(&self, chunk: &'a [Item]) -> Result<Option<(HeadInput, Vec<&'a Item>)>> {
        let (rows, items): (Vec<&HeadInput>, Vec<&Item>) = chunk
            .iter()
            .filter_map(|it| self.rows.get(&it.index).map(|r| (r, it)))
            .unzip();
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some((HeadInput::stack(&rows)?, items)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::path::PathBuf;

    fn input(first: f32, n: usize) -> HeadInput {
        let x: Vec<f32> = (0..n * 2).map(|i| first + i as f32).collect();
        let x = Tensor::from_vec(x, (n, 2, 1, 1), &Device::Cpu).unwrap();
        HeadInput {
            residual: Some((&x * 10.0).unwrap()),
            x,
        }
    }

    fn item(index: usize) -> Item {
        Item {
            path: PathBuf::from(format!("{index}.png")),
            label: Some(index as i64 % 2),
            index,
        }
    }

    /// Rows go back into batches by image, in the order asked, skipping what was not read.
    #[test]
    fn batches_are_the_rows_of_their_images() {
        let mut c = HeadCache::new(1 << 20, 4);
        let d = c.offer(&[0, 1], &input(0.0, 2)).unwrap();
        // 16 bytes an image (2 channels of x and of the residual, f32), 4 images.
        assert_eq!(d, Some(Decision::Keep { bytes: 4 * 16 }));
        assert_eq!(c.offer(&[3], &input(100.0, 1)).unwrap(), None);
        c.end_pass();
        assert!(c.complete());
        let chunk = [item(3), item(2), item(0)];
        let (b, items) = c.batch(&chunk).unwrap().unwrap();
        assert_eq!(items.iter().map(|i| i.index).collect::<Vec<_>>(), [3, 0]);
        let x: Vec<f32> = b.x.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, [100.0, 101.0, 0.0, 1.0]);
        let r: Vec<f32> = b
            .residual
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r, [1000.0, 1010.0, 0.0, 10.0]);
        assert!(c.batch(&[item(2)]).unwrap().is_none());
    }

    /// A set that does not fit is not kept, and says so once.
    #[test]
    fn too_big_is_not_kept() {
        let mut c = HeadCache::new(50, 4);
        let d = c.offer(&[0, 1], &input(0.0, 2)).unwrap();
        assert_eq!(
            d,
            Some(Decision::TooBig {
                bytes: 64,
                budget: 50
            })
        );
        assert_eq!(c.offer(&[2, 3], &input(0.0, 2)).unwrap(), None);
        c.end_pass();
        assert!(!c.complete());
        assert_eq!(c.bytes(), 0);
    }
}
