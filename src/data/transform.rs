//! Decoded images -> normalised NCHW tensors: the eval transform of torchvision and timm, a
//! train-like transform for BatchNorm recalibration, and one decode feeding several sizes.
//!
//! Eval (`EvalTransform`), with `scale = floor(size / crop_pct)` (f64 division, as Python's
//! `math.floor(img_size / crop_pct)` in timm):
//!
//! - `center` (timm's default, torchvision's `Resize(scale) + CenterCrop(size)`): the shorter
//!   side becomes `scale` and the longer `int(scale * long / short)` (torchvision's
//!   `_compute_resized_output_size`: truncation, not rounding); an image already that size is
//!   not resampled.
//! - `squash` (timm): both sides become `scale`, aspect ratio not kept.
//! - then `CenterCrop(size)`: offsets `int(round((n - size) / 2))` with Python's round (half to
//!   even: 4.5 -> 4, 5.5 -> 6). When a side is shorter than `size` (crop_pct > 1) torchvision
//!   pads it with zeros, `(size - n) // 2` before, and so does ckpt (zero is black before
//!   normalisation).
//! - `ToTensor` (`u8 / 255` in f32) and `Normalize` (`(x - mean) / std` in f32): done through a
//!   per-channel table of the 256 possible results computed with the same f32 operations in the
//!   same order, so equal u8 pixels give bit-identical tensors.
//!
//! Resizing and cropping happen on 8-bit pixels, as in PIL, and only the kept window is
//! resampled (see [`super::resize`]).
//!
//! Train (`TrainTransform`): torchvision's/timm's `RandomResizedCrop(size, scale=(0.08, 1),
//! ratio=(3/4, 4/3))` and `RandomHorizontalFlip(0.5)`, drawing from a ChaCha8 generator seeded
//! by `(seed, image index)`, so an image gets the same crop whatever the thread count, batch
//! size, shard or order (a training loop mixes the epoch into the seed, `train::epoch_transform`,
//! for new crops every epoch). The crop box follows torchvision's `get_params` exactly (ten tries,
//! `int(round(..))` sizes, then the central fallback); the random numbers are ckpt's own, not
//! torch's.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::decode::DecodedImage;
use super::resize::{self, Interpolation, Window};

/// ImageNet's channel means and standard deviations, torchvision's and timm's default.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `Normalize(mean, std)` after `ToTensor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize {
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl Normalize {
    /// The tensor value of each u8 level, per channel: `(v as f32 / 255 - mean) / std` in f32,
    /// the operations torchvision performs.
    pub fn table(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        t
    }

    fn check(&self) -> Result<()> {
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || self.mean.iter().any(|m| !m.is_finite())
        {
            bail!(
                "normalisation needs finite means and positive standard deviations, got mean {:?} std {:?}",
                self.mean,
                self.std
            );
        }
        Ok(())
    }
}

/// How the eval transform fits an image into the square crop (timm's `crop_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CropMode {
    /// Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre
    #[default]
    Center,
    /// Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre
    Squash,
}

/// timm's and torchvision's eval transform (see the module doc for the formulas).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalTransform {
    /// Side of the square output.
    pub size: u32,
    /// Fraction of the resized image the crop keeps (0.875: resize to 256, crop 224).
    pub crop_pct: f64,
    pub interpolation: Interpolation,
    pub crop_mode: CropMode,
    pub normalize: Normalize,
}

impl Default for EvalTransform {
    fn default() -> Self {
        EvalTransform {
            size: 224,
            crop_pct: 0.875,
            interpolation: Interpolation::Bilinear,
            crop_mode: CropMode::Center,
            normalize: Normalize::default(),
        }
    }
}

/// Where an image goes on its way through [`EvalTransform`]: the size it is resized to, the
/// window of the resized image the crop keeps, and where that window lands in the output
/// (non-zero only when the crop pads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalPlan {
    pub resized_width: u32,
    pub resized_height: u32,
    pub window: Window,
    pub pad_left: u32,
    pub pad_top: u32,
}

impl EvalTransform {
    /// `floor(size / crop_pct)`: the side (shorter side, in center mode) images are resized to.
    pub fn scale_size(&self) -> u32 {
        (self.size as f64 / self.crop_pct).floor() as u32
    }

    /// Checks the parameters once, so that applying the transform cannot fail on them.
    pub fn check(&self) -> Result<()> {
        if self.size == 0 {
            bail!("image size must be at least 1");
        }
        if !(self.crop_pct.is_finite() && self.crop_pct > 0.0) {
            bail!("crop_pct must be a positive number, got {}", self.crop_pct);
        }
        if self.scale_size() == 0 {
            bail!(
                "size {} / crop_pct {} is below one pixel",
                self.size,
                self.crop_pct
            );
        }
        self.normalize.check()
    }

    /// The plan for an image of `width x height`.
    pub fn plan(&self, width: u32, height: u32) -> EvalPlan {
        let scale = self.scale_size();
        let (rw, rh) = match self.crop_mode {
            CropMode::Squash => (scale, scale),
            CropMode::Center => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(requested_new_short * long / short), a true division then
                // truncation; both products are exact in f64 for any real image size.
                let new_long = ((scale as u64 * long as u64) as f64 / short as f64) as u32;
                if width <= height {
                    (scale, new_long)
                } else {
                    (new_long, scale)
                }
            }
        };
        let (x, w, pad_left) = center_crop_axis(rw, self.size);
        let (y, h, pad_top) = center_crop_axis(rh, self.size);
        EvalPlan {
            resized_width: rw,
            resized_height: rh,
            window: Window {
                x,
                y,
                width: w,
                height: h,
            },
            pad_left,
            pad_top,
        }
    }

    /// Resize and crop in 8 bits: the PIL image torchvision has before `ToTensor`
    /// (`size x size`; grey input stays grey).
    pub fn apply_u8(&self, img: &DecodedImage) -> Result<DecodedImage> {
        let plan = self.plan(img.width(), img.height());
        let kept = resize::resize_window(
            img,
            plan.resized_width,
            plan.resized_height,
            plan.window,
            self.interpolation,
        )?;
        Ok(place(&kept, self.size, plan.pad_left, plan.pad_top))
    }

    /// The normalised `3 x size x size` tensor (CHW) written into `out`.
    pub fn apply_into(&self, img: &DecodedImage, out: &mut [f32]) -> Result<()> {
        let u8img = self.apply_u8(img)?;
        to_chw(&u8img, &self.normalize.table(), out);
        Ok(())
    }

    /// The normalised `3 x size x size` tensor (CHW).
    pub fn apply(&self, img: &DecodedImage) -> Result<Vec<f32>> {
        let mut out = vec![0f32; tensor_len(self.size)];
        self.apply_into(img, &mut out)?;
        Ok(out)
    }
}

/// One image through several eval transforms (a resolution sweep decodes each image once):
/// one `3 x size x size` tensor per transform, in the order given.
pub fn transform_many(img: &DecodedImage, transforms: &[EvalTransform]) -> Result<Vec<Vec<f32>>> {
    transforms.iter().map(|t| t.apply(img)).collect()
}

/// Elements of one `3 x size x size` image tensor.
pub fn tensor_len(size: u32) -> usize {
    3 * size as usize * size as usize
}

/// torchvision's `center_crop` on one axis of length `n`: (offset into the resized image,
/// length kept, zero padding before).
fn center_crop_axis(n: u32, size: u32) -> (u32, u32, u32) {
    if n >= size {
        let offset = ((n - size) as f64 / 2.0).round_ties_even() as u32;
        (offset, size, 0)
    } else {
        (0, n, (size - n) / 2)
    }
}

/// `kept` placed at (`left`, `top`) on a black `size x size` canvas.
fn place(kept: &DecodedImage, size: u32, left: u32, top: u32) -> DecodedImage {
    if kept.width() == size && kept.height() == size {
        return kept.clone();
    }
    let c = kept.channels();
    let stride = size as usize * c;
    let mut pixels = vec![0u8; size as usize * stride];
    let row_len = kept.width() as usize * c;
    for (r, row) in kept.pixels().chunks_exact(row_len).enumerate() {
        let start = (top as usize + r) * stride + left as usize * c;
        pixels[start..start + row_len].copy_from_slice(row);
    }
    match c {
        1 => DecodedImage::grey(size, size, pixels),
        _ => DecodedImage::rgb(size, size, pixels),
    }
}

/// Interleaved 8-bit pixels -> planar normalised f32 (CHW) through `table`.
fn to_chw(img: &DecodedImage, table: &[[f32; 256]; 3], out: &mut [f32]) {
    let plane = img.width() as usize * img.height() as usize;
    assert_eq!(out.len(), 3 * plane, "output tensor has the wrong length");
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let px = img.pixels();
    if img.channels() == 1 {
        for i in 0..plane {
            let v = px[i] as usize;
            r[i] = table[0][v];
            g[i] = table[1][v];
            b[i] = table[2][v];
        }
    } else {
        for (i, p) in px.chunks_exact(3).enumerate() {
            r[i] = table[0][p[0] as usize];
            g[i] = table[1][p[1] as usize];
            b[i] = table[2][p[2] as usize];
        }
    }
}

/// A crop box and flip drawn by [`TrainTransform::params`] (torchvision's `(i, j, h, w)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CropParams {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
    pub flip: bool,
}

/// `RandomResizedCrop` + `RandomHorizontalFlip`, seeded per image (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainTransform {
    pub size: u32,
    /// Range of the crop's area as a fraction of the image's (timm: 0.08 to 1).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio w/h, sampled log-uniformly (timm: 3/4 to 4/3).
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub hflip: f64,
    pub interpolation: Interpolation,
    pub normalize: Normalize,
    pub seed: u64,
}

impl Default for TrainTransform {
    fn default() -> Self {
        TrainTransform {
            size: 224,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: 0.5,
            interpolation: Interpolation::Bilinear,
            normalize: Normalize::default(),
            seed: 0,
        }
    }
}

impl TrainTransform {
    pub fn check(&self) -> Result<()> {
        if self.size == 0 {
            bail!("image size must be at least 1");
        }
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        let valid = 0.0 < s0 && s0 <= s1 && s1 <= 1.0 && 0.0 < r0 && r0 <= r1;
        if !valid {
            bail!(
                "random crop needs 0 < scale min <= max <= 1 and 0 < ratio min <= max, got scale {:?} ratio {:?}",
                self.scale,
                self.ratio
            );
        }
        self.normalize.check()
    }

    /// The crop box and flip for image number `index` of size `width x height`
    /// (torchvision's `RandomResizedCrop.get_params`, then the flip).
    pub fn params(&self, width: u32, height: u32, index: u64) -> CropParams {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        let area = width as f64 * height as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        let mut found = None;
        for _ in 0..10 {
            let target_area = area * uniform(&mut rng, self.scale.0, self.scale.1);
            let aspect = uniform(&mut rng, lr0, lr1).exp();
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if 0.0 < w && w <= width as f64 && 0.0 < h && h <= height as f64 {
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                found = Some((top, left, h, w));
                break;
            }
        }
        let (top, left, h, w) = found.unwrap_or_else(|| {
            let in_ratio = width as f64 / height as f64;
            let (w, h) = if in_ratio < self.ratio.0 {
                (
                    width,
                    (width as f64 / self.ratio.0).round_ties_even() as u32,
                )
            } else if in_ratio > self.ratio.1 {
                (
                    (height as f64 * self.ratio.1).round_ties_even() as u32,
                    height,
                )
            } else {
                (width, height)
            };
            ((height - h) / 2, (width - w) / 2, h, w)
        });
        let flip = rng.random::<f64>() < self.hflip;
        CropParams {
            top,
            left,
            height: h,
            width: w,
            flip,
        }
    }

    /// `resized_crop(img, top, left, h, w, size)` then the flip, in 8 bits.
    pub fn apply_u8_with(&self, img: &DecodedImage, p: &CropParams) -> Result<DecodedImage> {
        let region = resize::crop(img, p.left, p.top, p.width, p.height);
        let full = Window {
            x: 0,
            y: 0,
            width: self.size,
            height: self.size,
        };
        let out = resize::resize_window(&region, self.size, self.size, full, self.interpolation)?;
        Ok(if p.flip { flip_horizontal(&out) } else { out })
    }

    /// The normalised tensor of image number `index`, written into `out`.
    pub fn apply_into(&self, img: &DecodedImage, index: u64, out: &mut [f32]) -> Result<()> {
        let p = self.params(img.width(), img.height(), index);
        let u8img = self.apply_u8_with(img, &p)?;
        to_chw(&u8img, &self.normalize.table(), out);
        Ok(())
    }
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn flip_horizontal(img: &DecodedImage) -> DecodedImage {
    let c = img.channels();
    let row_len = img.width() as usize * c;
    let mut pixels = Vec::with_capacity(img.pixels().len());
    for row in img.pixels().chunks_exact(row_len) {
        for px in row.chunks_exact(c).rev() {
            pixels.extend_from_slice(px);
        }
    }
    match c {
        1 => DecodedImage::grey(img.width(), img.height(), pixels),
        _ => DecodedImage::rgb(img.width(), img.height(), pixels),
    }
}

/// What a pass's images went through, in a form a file's metadata can hold and a later pass can
/// compare: `ckpt logits --data` records it as `ckpt.transform`, and `ckpt distill --targets`
/// refuses logits made from other pixels than its own. Everything that changes a pixel is in it
/// (the EXIF turn too); the train transform's seed as well, though no two train passes compare
/// equal in the sense that matters (see `train::targets`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransformRecord {
    /// `eval` or `train`.
    pub kind: String,
    pub size: u32,
    /// The eval transform's crop fraction (none for train).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_pct: Option<f64>,
    /// The eval transform's crop mode, `center` or `squash` (none for train).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_mode: Option<String>,
    pub interpolation: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Images turned by their EXIF orientation before the transform.
    pub exif_transpose: bool,
    /// The train transform's seed (none for eval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl TransformRecord {
    pub fn new(transform: &Transform, exif_transpose: bool) -> TransformRecord {
        match transform {
            Transform::Eval(t) => TransformRecord {
                kind: "eval".into(),
                size: t.size,
                crop_pct: Some(t.crop_pct),
                crop_mode: Some(
                    match t.crop_mode {
                        CropMode::Center => "center",
                        CropMode::Squash => "squash",
                    }
                    .into(),
                ),
                interpolation: t.interpolation.name().into(),
                mean: t.normalize.mean,
                std: t.normalize.std,
                exif_transpose,
                seed: None,
            },
            Transform::Train(t) => TransformRecord {
                kind: "train".into(),
                size: t.size,
                crop_pct: None,
                crop_mode: None,
                interpolation: t.interpolation.name().into(),
                mean: t.normalize.mean,
                std: t.normalize.std,
                exif_transpose,
                seed: Some(t.seed),
            },
        }
    }

    /// The fields in which `self` and `other` differ, each as `NAME A here, B there`, in field
    /// order (empty when they are the same).
    pub fn differences(&self, other: &TransformRecord, here: &str, there: &str) -> Vec<String> {
        let fields = |r: &TransformRecord| match serde_json::to_value(r) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let show = |v: Option<&serde_json::Value>| match v {
            None => "none".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            // 1, not serde's 1.0: as the flags are written.
            Some(serde_json::Value::Number(n)) if n.is_f64() => {
                n.as_f64().map_or(n.to_string(), |x| x.to_string())
            }
            Some(v) => v.to_string(),
        };
        let (a, b) = (fields(self), fields(other));
        [
            "kind",
            "size",
            "crop_pct",
            "crop_mode",
            "interpolation",
            "mean",
            "std",
            "exif_transpose",
            "seed",
        ]
        .iter()
        .filter(|n| a.get(**n) != b.get(**n))
        .map(|n| {
            format!(
                "{n} {} {here}, {} {there}",
                show(a.get(*n)),
                show(b.get(*n))
            )
        })
        .collect()
    }
}

/// The transform of a data pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transform {
    Eval(EvalTransform),
    Train(TrainTransform),
}

impl Transform {
    pub fn size(&self) -> u32 {
        match self {
            Transform::Eval(t) => t.size,
            Transform::Train(t) => t.size,
        }
    }

    pub fn check(&self) -> Result<()> {
        match self {
            Transform::Eval(t) => t.check(),
            Transform::Train(t) => t.check(),
        }
    }

    /// The normalised tensor of image number `index` (which seeds the train transform).
    pub fn apply_into(&self, img: &DecodedImage, index: u64, out: &mut [f32]) -> Result<()> {
        match self {
            Transform::Eval(t) => t.apply_into(img, out),
            Transform::Train(t) => t.apply_into(img, index, out),
        }
    }
}
