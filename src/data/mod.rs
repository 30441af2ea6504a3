//! Folders of images -> normalised batches, as the user's PyTorch eval code would build them.
//!
//! Every data pass of ckpt (eval, logits, BatchNorm recalibration, resolution sweeps) reads a
//! folder through this module, and the accuracy ckpt reports is only the user's accuracy if the
//! tensors are torchvision's. So each step copies a PyTorch reference:
//!
//! - [`dataset`]: the folder's images in `ImageFolder` order with its class indices (or a flat,
//!   unlabelled folder), a seeded subset, a shard.
//! - [`labels`]: which of the model's classes a class folder is (`--class-map`, ImageNet-1k
//!   synsets, or the folder order), with a warning when they cannot be the model's.
//! - [`decode`]: files -> 8-bit pixels as `PIL.Image.open(f).convert("RGB")` gives them.
//! - [`resize`]: PIL's antialiased bilinear/bicubic resampling, on 8-bit data, computing only the
//!   pixels the crop keeps.
//! - [`transform`]: `Resize(floor(S/P)) + CenterCrop(S) + ToTensor + Normalize` (timm's `center`
//!   and `squash` crop modes), `RandomResizedCrop + RandomHorizontalFlip` for recalibration, and
//!   one decode feeding several sizes.
//! - [`loader`]: parallel decoding (rayon) with a bounded prefetch, batches in data-set order.
//! - [`cache`]: a folder's batches decoded once and replayed, for commands that pass over the
//!   same images many times.
//!
//! ## Fidelity (measured; `tests/data.rs` holds the bounds)
//!
//! Against torchvision 0.29 + Pillow 13 (libjpeg-turbo 3.2, libwebp 1.6), in 8-bit levels before
//! normalisation (1 level = 1/255), mean and max absolute difference per image:
//!
//! - Decoding, on the 15 fixture images of `fixtures/make_image_fixtures.py` (JPEG 4:2:0, grey,
//!   CMYK, EXIF; PNG of every mode; BMP; lossless and lossy WebP) and on 500 photo-sized JPEGs
//!   (`benches/data_bench.py`): identical.
//! - Resize + centre crop, bilinear and bicubic, at 32, 64 and 128 on the fixtures: mean at most
//!   0.05 (an 8x8 digit upscaled), 0.005 on the photographs; max 1. Squash, padding
//!   (crop_pct > 1) and resized crop alike. The 1 comes from fixed-point filter coefficients
//!   (`fast_image_resize` keeps 16 bits, PIL 22).
//! - The whole eval transform at 224 on the 500 JPEGs: bilinear mean 0.001 (worst image 0.054),
//!   max 2 (one image; 1 on 433, 0 on 66); bicubic mean 0.003 (worst 0.014), max 2 (59 images).
//! - `ToTensor + Normalize` of equal 8-bit pixels: bit-identical.
//!
//! The issue asks for a mean below 1 level and a max below 4.
//!
//! ## Speed (`benches/data_bench.py`)
//!
//! Decode + resize + crop + normalise of 500 photo-sized JPEGs (430x391 on average) at 224 on a
//! 2-core Zen 3 machine, 2 threads, batches of 32, median of 3 passes: 1247 images/s, against
//! 583 for a PyTorch 2.15 `DataLoader` with 2 workers doing torchvision's transform (2.1x).
//! libjpeg-turbo was built without `nasm` (its C code); with `nasm` present at build time its
//! SIMD code decodes faster still.

pub mod cache;
pub mod dataset;
pub mod decode;
pub mod labels;
pub mod loader;
pub mod resize;
pub mod transform;

use std::path::PathBuf;

use anyhow::Result;

pub use cache::Batches;
pub use dataset::{Dataset, DatasetOptions, Item, ScanSkipped, Shard, IMAGE_EXTENSIONS};
pub use decode::{decode_file, DecodeOptions, DecodedImage};
pub use labels::{LabelOptions, Labelling, Labels};
pub use loader::{
    sweep_loader, Batch, LoadSummary, Loader, LoaderOptions, MultiLoader, SkippedImage,
};
pub use resize::Interpolation;
pub use transform::{
    transform_many, CropMode, CropParams, EvalTransform, Normalize, TrainTransform, Transform,
    TransformRecord, IMAGENET_MEAN, IMAGENET_STD,
};

use crate::report::Reporter;

/// Everything a data pass needs: which folder, which images, how they become tensors.
#[derive(Clone, Debug)]
pub struct DataConfig {
    pub dir: PathBuf,
    pub dataset: DatasetOptions,
    pub transform: Transform,
    pub loader: LoaderOptions,
}

impl DataConfig {
    /// Scans the folder.
    pub fn scan(&self) -> Result<Dataset> {
        Dataset::scan(&self.dir, &self.dataset)
    }

    /// What this pass's images go through (the transform and the EXIF turn), as a file's
    /// `ckpt.transform` records it.
    pub fn transform_record(&self) -> TransformRecord {
        TransformRecord::new(&self.transform, self.loader.decode.exif_transpose)
    }

    /// Scans the folder and starts loading it.
    pub fn open(&self, rep: &Reporter) -> Result<(Dataset, Loader)> {
        let ds = self.scan()?;
        let loader = Loader::new(&ds, self.transform, &self.loader, rep)?;
        Ok((ds, loader))
    }
}
