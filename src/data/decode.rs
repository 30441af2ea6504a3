//! Image files -> 8-bit RGB (or grey) pixels, exactly as torchvision's loader sees them.
//!
//! torchvision's `pil_loader` is `Image.open(f).convert("RGB")`. PNG, WebP and BMP are decoded
//! by the `image` crate (png, image-webp, its BMP decoder), JPEG by `jpeg-decoder`; this module
//! then maps each pixel layout to what PIL's `convert("RGB")` gives, which is not always what the
//! `image` crate's own conversions give.
//!
//! Why `jpeg-decoder` and not `image`'s zune-jpeg, which decodes about 1.6x faster: PIL decodes
//! with libjpeg-turbo, whose "fancy" chroma upsampling (4:2:0 photographs, nearly all of them)
//! rounds once; zune-jpeg rounds after each direction. On a 4:2:0 photograph zune-jpeg is off by
//! 0.23 levels on average and 4 at most, and still by 4 after resizing to 128 (beyond the bound
//! ckpt keeps); `jpeg-decoder` ports libjpeg's upsampling: 0.09 on average, 3 at most, before
//! resizing. Decoding stays well below PIL's whole transform in time (`benches/data_bench.py`).
//!
//! What PIL does, measured with Pillow 13 (see `fixtures/make_image_fixtures.py`, whose
//! references `tests/data.rs` checks):
//!
//! - grey, grey + alpha: the grey value in all three channels; alpha is dropped.
//! - RGBA, palette with transparency: alpha is dropped, not composited on any background.
//! - 1-bit and 2/4-bit grey PNG: scaled to 0/255 (and 0, 85, 170, 255 ...), as the png crate
//!   expands them.
//! - 16-bit grey PNG (PIL mode `I;16`): **clipped** to 255, not scaled: a value of 300 becomes
//!   255 and one of 40000 too, so most 16-bit grey photographs come out nearly white. That is
//!   what a PyTorch model fed by torchvision's loader sees, so ckpt does the same.
//! - 16-bit RGB, RGBA and grey + alpha PNG: PIL keeps the high byte (`v >> 8`), where the `image`
//!   crate would round (`(v + 128) / 257`).
//! - CMYK (and YCCK) JPEG: PIL always assumes Adobe's inverted polarity, as `jpeg-decoder` does,
//!   and converts with `R = (255 - C) * (255 - K) / 255`, rounded as PIL's `MULDIV255`.
//! - EXIF orientation is ignored by the loader; with `exif_transpose` it is applied as
//!   `ImageOps.exif_transpose` does.
//!
//! One known difference: a 16-bit grey PNG with a `tRNS` transparent colour reaches us as grey +
//! alpha and gets the high byte, where PIL opens it as `I;16` and clips. Such files are rare.
//!
//! Grey images stay one channel here (and through resizing, which is per channel and therefore
//! identical) and become three identical channels only when written as a tensor: a third of the
//! resizing work for grey data sets.

use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

/// An image decoded and converted as PIL's `convert("RGB")` would: 8 bits per channel,
/// interleaved rows, one channel if grey (the three RGB channels would be equal) or three.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    width: u32,
    height: u32,
    channels: usize,
    pixels: Vec<u8>,
}

impl DecodedImage {
    /// An RGB image from interleaved pixels (`width * height * 3` bytes).
    pub fn rgb(width: u32, height: u32, pixels: Vec<u8>) -> DecodedImage {
        assert_eq!(pixels.len(), width as usize * height as usize * 3);
        DecodedImage {
            width,
            height,
            channels: 3,
            pixels,
        }
    }

    /// A grey image (`width * height` bytes).
    pub fn grey(width: u32, height: u32, pixels: Vec<u8>) -> DecodedImage {
        assert_eq!(pixels.len(), width as usize * height as usize);
        DecodedImage {
            width,
            height,
            channels: 1,
            pixels,
        }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// 1 (grey) or 3 (RGB).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The pixels, row after row, `channels()` bytes each.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Interleaved RGB bytes (grey replicated into three channels).
    pub fn to_rgb(&self) -> Vec<u8> {
        if self.channels == 3 {
            return self.pixels.clone();
        }
        self.pixels.iter().flat_map(|&g| [g, g, g]).collect()
    }
}

/// How files are decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Apply the EXIF orientation (`ImageOps.exif_transpose`); torchvision's loader does not.
    pub exif_transpose: bool,
}

/// Reads and decodes one image file. Errors name the file: `<path>: cannot read: ...` or
/// `<path>: cannot decode: ...`.
pub fn decode_file(path: &Path, opts: &DecodeOptions) -> Result<DecodedImage> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    decode_bytes(&bytes, path, opts).with_context(|| format!("{}: cannot decode", path.display()))
}

/// Decodes an image held in memory; `name` only guides the format when the content does not
/// say (the content wins, as with PIL, so a PNG named `.jpg` still decodes).
pub fn decode_bytes(bytes: &[u8], name: &Path, opts: &DecodeOptions) -> Result<DecodedImage> {
    let format = image::guess_format(bytes)
        .ok()
        .or_else(|| ImageFormat::from_path(name).ok())
        .ok_or_else(|| anyhow!("not a JPEG, PNG, WebP or BMP file"))?;
    let (mut img, orientation) = if format == ImageFormat::Jpeg {
        decode_jpeg(bytes, opts)?
    } else {
        let mut decoder = ImageReader::with_format(Cursor::new(bytes), format).into_decoder()?;
        let orientation = if opts.exif_transpose {
            decoder.orientation()?
        } else {
            Orientation::NoTransforms
        };
        (DynamicImage::from_decoder(decoder)?, orientation)
    };
    img.apply_orientation(orientation);
    Ok(pil_convert_rgb(img))
}

/// Decoding never allocates more than this for one image (the `image` crate's default limit),
/// so a forged header cannot exhaust memory.
const MAX_DECODE_BYTES: usize = 512 << 20;

fn decode_jpeg(bytes: &[u8], opts: &DecodeOptions) -> Result<(DynamicImage, Orientation)> {
    use jpeg_decoder::PixelFormat;

    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder.set_max_decoding_buffer_size(MAX_DECODE_BYTES);
    let pixels = decoder.decode()?;
    let info = decoder
        .info()
        .ok_or_else(|| anyhow!("no image in the JPEG stream"))?;
    let (w, h) = (info.width as u32, info.height as u32);
    let bad_size = || anyhow!("decoded data does not match the {w}x{h} header");
    let img = match info.pixel_format {
        PixelFormat::L8 => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, pixels).ok_or_else(bad_size)?)
        }
        PixelFormat::RGB24 => {
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, pixels).ok_or_else(bad_size)?)
        }
        PixelFormat::CMYK32 => {
            let rgb = pixels
                .chunks_exact(4)
                .flat_map(|p| {
                    let k = 255 - p[3];
                    [0, 1, 2].map(|c| muldiv255(255 - p[c], k))
                })
                .collect();
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, rgb).ok_or_else(bad_size)?)
        }
        PixelFormat::L16 => bail!("12-bit JPEG is not supported"),
    };
    let orientation = match decoder.exif_data() {
        Some(exif) if opts.exif_transpose => {
            Orientation::from_exif_chunk(exif).unwrap_or(Orientation::NoTransforms)
        }
        _ => Orientation::NoTransforms,
    };
    Ok((img, orientation))
}

/// `a * b / 255` rounded, in PIL's integer form (`MULDIV255`).
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = a as u32 * b as u32 + 128;
    ((t + (t >> 8)) >> 8) as u8
}

/// PIL's `convert("RGB")` of what PIL would have opened (see the module doc).
fn pil_convert_rgb(img: DynamicImage) -> DecodedImage {
    let (w, h) = (img.width(), img.height());
    let high_byte = |v: &u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageLuma8(b) => DecodedImage::grey(w, h, b.into_raw()),
        DynamicImage::ImageLumaA8(b) => {
            DecodedImage::grey(w, h, b.into_raw().chunks_exact(2).map(|p| p[0]).collect())
        }
        DynamicImage::ImageRgb8(b) => DecodedImage::rgb(w, h, b.into_raw()),
        DynamicImage::ImageRgba8(b) => DecodedImage::rgb(w, h, drop_alpha(b.as_raw())),
        DynamicImage::ImageLuma16(b) => {
            DecodedImage::grey(w, h, b.iter().map(|&v| v.min(255) as u8).collect())
        }
        DynamicImage::ImageLumaA16(b) => {
            DecodedImage::grey(w, h, b.chunks_exact(2).map(|p| high_byte(&p[0])).collect())
        }
        DynamicImage::ImageRgb16(b) => DecodedImage::rgb(w, h, b.iter().map(high_byte).collect()),
        DynamicImage::ImageRgba16(b) => DecodedImage::rgb(
            w,
            h,
            b.chunks_exact(4)
                .flat_map(|p| [high_byte(&p[0]), high_byte(&p[1]), high_byte(&p[2])])
                .collect(),
        ),
        // Float images come from none of the enabled decoders.
        other => DecodedImage::rgb(w, h, other.to_rgb8().into_raw()),
    }
}

fn drop_alpha(rgba: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for p in rgba.chunks_exact(4) {
        out.extend_from_slice(&p[..3]);
    }
    out
}
