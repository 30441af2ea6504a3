//! PIL's antialiased resize (`Image.resize` with BILINEAR or BICUBIC), computing only the part
//! of the result that a crop keeps.
//!
//! PIL resamples 8-bit images with a separable convolution whose support grows with the
//! downscale factor (antialiasing), one axis after the other, rounding to 8 bits between the
//! passes and at the end. `fast_image_resize`'s `Convolution` algorithm uses the same filters and
//! the same coefficient formula (it is a port of Pillow-SIMD), but picks its own pass order (for
//! 8-bit images, vertical first), and the order changes the intermediate rounding. So each pass
//! is asked for separately here, in Pillow's order: horizontal first unless the height shrinks
//! by more than twice as many pixels as the width (Pillow 13's rule, read in its
//! `Resample.c`; earlier Pillows always go horizontal first).
//!
//! Resize-then-crop costs a full resize for a kept window of (crop_pct)^2 of it (77% at 0.875),
//! and squash or small crops keep less. Each output pixel of PIL's resize depends only on its
//! own source window (filter centred at `(x + 0.5) * scale`, clipped to the image), so the
//! window is computed alone by giving `fast_image_resize` a source crop box that starts at
//! `x0 * scale`: its coefficients clip at the real image edges, as PIL's do, not at the box.
//! The first pass runs only over the rows (or columns) the second pass reads.

use std::cell::RefCell;

use anyhow::{anyhow, Result};
use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, IntoImageView, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::decode::DecodedImage;

/// The resampling filter, as torchvision's `InterpolationMode` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Interpolation {
    /// PIL's BILINEAR (triangle filter, antialiased): torchvision's default
    #[default]
    Bilinear,
    /// PIL's BICUBIC (Keys cubic, a = -0.5, antialiased): timm's usual choice
    Bicubic,
}

impl Interpolation {
    fn filter(self) -> FilterType {
        match self {
            Interpolation::Bilinear => FilterType::Bilinear,
            // Catmull-Rom is the Keys cubic with a = -0.5, PIL's bicubic kernel.
            Interpolation::Bicubic => FilterType::CatmullRom,
        }
    }

    /// The filter's half-width in source pixels at scale 1.
    fn support(self) -> f64 {
        match self {
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Interpolation::Bilinear => "bilinear",
            Interpolation::Bicubic => "bicubic",
        }
    }
}

/// A rectangle of a (virtual) resized image, in its pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

thread_local! {
    // A resizer keeps scratch buffers: one per worker thread, reused across images.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// The `window` of `src` resized to `full_width x full_height` with PIL's filter and rounding.
pub fn resize_window(
    src: &DecodedImage,
    full_width: u32,
    full_height: u32,
    window: Window,
    interp: Interpolation,
) -> Result<DecodedImage> {
    let (w, h) = (src.width(), src.height());
    assert!(
        window.x + window.width <= full_width && window.y + window.height <= full_height,
        "window {window:?} outside {full_width}x{full_height}"
    );
    let pixel_type = match src.channels() {
        1 => PixelType::U8,
        _ => PixelType::U8x3,
    };
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(interp.filter()));
    let scale_x = w as f64 / full_width as f64;
    let scale_y = h as f64 / full_height as f64;
    // The window in source coordinates (clamped against rounding past the edge).
    let left = window.x as f64 * scale_x;
    let width = (window.width as f64 * scale_x).min(w as f64 - left);
    let top = window.y as f64 * scale_y;
    let height = (window.height as f64 * scale_y).min(h as f64 - top);
    let src_ref = ImageRef::new(w, h, src.pixels(), pixel_type).map_err(|e| anyhow!("{e}"))?;
    let out = if vertical_first(w, h, full_width, full_height) {
        // Vertical pass over the columns the horizontal pass reads, then the horizontal pass.
        let (c0, c1) = source_span(w, full_width, window.x, window.width, interp);
        let cols = CroppedImage::new(&src_ref, c0, 0, c1 - c0, h).map_err(|e| anyhow!("{e}"))?;
        let mut tmp = Image::new(c1 - c0, window.height, pixel_type);
        pass(&cols, &mut tmp, &opts, (0.0, top, (c1 - c0) as f64, height))?;
        let mut out = Image::new(window.width, window.height, pixel_type);
        let left = left - c0 as f64;
        let width = width.min((c1 - c0) as f64 - left);
        pass(
            &tmp,
            &mut out,
            &opts,
            (left, 0.0, width, window.height as f64),
        )?;
        out
    } else {
        // Horizontal pass over the rows the vertical pass reads, then the vertical pass.
        let (r0, r1) = source_span(h, full_height, window.y, window.height, interp);
        let rows = CroppedImage::new(&src_ref, 0, r0, w, r1 - r0).map_err(|e| anyhow!("{e}"))?;
        let mut tmp = Image::new(window.width, r1 - r0, pixel_type);
        pass(&rows, &mut tmp, &opts, (left, 0.0, width, (r1 - r0) as f64))?;
        let mut out = Image::new(window.width, window.height, pixel_type);
        let top = top - r0 as f64;
        let height = height.min((r1 - r0) as f64 - top);
        pass(
            &tmp,
            &mut out,
            &opts,
            (0.0, top, window.width as f64, height),
        )?;
        out
    };
    let pixels = out.into_vec();
    Ok(match src.channels() {
        1 => DecodedImage::grey(window.width, window.height, pixels),
        _ => DecodedImage::rgb(window.width, window.height, pixels),
    })
}

/// One resize from the crop box `(left, top, width, height)` of `from` to the whole of `to`.
fn pass(
    from: &impl IntoImageView,
    to: &mut Image,
    opts: &ResizeOptions,
    (left, top, width, height): (f64, f64, f64, f64),
) -> Result<()> {
    RESIZER.with(|r| {
        r.borrow_mut()
            .resize(from, to, &opts.crop(left, top, width, height))
    })?;
    Ok(())
}

/// Pillow's choice of pass order (since Pillow 13): vertical first when the height shrinks by
/// more than twice as many pixels as the width does; horizontal first otherwise (always, before
/// Pillow 13). The order changes the rounding between the passes, by one level at most.
fn vertical_first(w: u32, h: u32, full_width: u32, full_height: u32) -> bool {
    let dh = h as i64 - full_height as i64;
    let dw = w as i64 - full_width as i64;
    dh > 0 && dh > 2 * dw
}

/// The source pixels `[first, last)` along one axis (of `n` pixels, resized to `full`) that the
/// output pixels `[start, start + len)` read, with one pixel of margin against rounding. Pixels
/// outside a filter's support get no weight, and clipping only happens at the image's real
/// edges, so a wider span computes the same values.
fn source_span(n: u32, full: u32, start: u32, len: u32, interp: Interpolation) -> (u32, u32) {
    if n == full {
        return (start, start + len);
    }
    let scale = n as f64 / full as f64;
    let radius = interp.support() * scale.max(1.0);
    let first = (start as f64 + 0.5) * scale - radius;
    let last = ((start + len) as f64 - 0.5) * scale + radius;
    (
        (first.floor() - 1.0).max(0.0) as u32,
        ((last.ceil() + 1.0) as u32).min(n),
    )
}

/// A rectangle of `src` copied out (PIL's `crop` inside the image).
pub fn crop(src: &DecodedImage, x: u32, y: u32, width: u32, height: u32) -> DecodedImage {
    let c = src.channels();
    let stride = src.width() as usize * c;
    let mut pixels = Vec::with_capacity(width as usize * height as usize * c);
    for row in y..y + height {
        let start = row as usize * stride + x as usize * c;
        pixels.extend_from_slice(&src.pixels()[start..start + width as usize * c]);
    }
    match c {
        1 => DecodedImage::grey(width, height, pixels),
        _ => DecodedImage::rgb(width, height, pixels),
    }
}
