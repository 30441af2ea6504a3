//! Image files -> 8-bit RGB (or grey) pixels, exactly as torchvision's loader sees them.
//!
//! torchvision's `pil_loader` is `Image.open(f).convert("RGB")`. PNG, WebP and BMP are decoded
//! by the `image` crate (png, image-webp, its BMP decoder), JPEG by libjpeg-turbo's decoder
//! (through the `mozjpeg` crate, built from source by cargo); this module then maps each pixel
//! layout to what PIL's `convert("RGB")` gives, which is not always what the `image` crate's own
//! conversions give.
//!
//! Why libjpeg-turbo and not `image`'s pure-Rust zune-jpeg: PIL decodes with libjpeg-turbo, and
//! JPEG decoders differ in their IDCT rounding, chroma upsampling ("fancy" upsampling rounds
//! once in libjpeg; zune-jpeg rounds after each direction) and colour conversion. Measured on 500
//! photo-sized 4:2:0 JPEGs: zune-jpeg differs from PIL by 0.23 levels on average and 4 at most,
//! `jpeg-decoder` by 0.09 and 3-4 (bicubic resizing then turns 3 into 4 on one image in six);
//! mozjpeg's libjpeg-turbo decoder with PIL's settings (islow IDCT, fancy upsampling) gives
//! PIL's pixels exactly, on every one of them, and decodes faster than either. Its SIMD code is
//! used when `nasm` is found at build time, the C code otherwise (same pixels).
//!
//! libjpeg's warnings are ignored, as PIL ignores them, except the end of the file arriving
//! before the end of the image: PIL refuses such a file ("image file is truncated"), so ckpt
//! does too, where libjpeg alone would fill the rest with grey.
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
//! - CMYK (and YCCK) JPEG: PIL always assumes Adobe's inverted polarity (it reads the samples as
//!   `CMYK;I`) and converts with `R = (255 - C) * (255 - K) / 255`, rounded as its `MULDIV255`:
//!   on the samples libjpeg returns, `R = muldiv255(c, k)`.
//! - EXIF orientation is ignored by the loader; with `exif_transpose` it is applied as
//!   `ImageOps.exif_transpose` does.
//!
//! One known difference: a 16-bit grey PNG with a `tRNS` transparent colour reaches us as grey +
//! alpha and gets the high byte, where PIL opens it as `I;16` and clips. Such files are rare.
//!
//! Decompression bombs: a small file can claim an enormous image (a 10 MB PNG of 60000 x 60000
//! pixels decodes to 10.8 GB). PIL refuses an image of more than 2 x `Image.MAX_IMAGE_PIXELS` =
//! 178,956,970 pixels (`DecompressionBombError`) as soon as it has read the header, and so does
//! ckpt, for every format: [`DecodeOptions::max_pixels`] (`--max-image-pixels`) is checked against
//! the dimensions in the header, before any pixel buffer is allocated, and the `image` crate's
//! decoders get limits of their own (no side over the limit; allocations bounded by the limit's
//! worth of 16-bit RGBA pixels), which they check while decoding.
//!
//! Grey images stay one channel here (and through resizing, which is per channel and therefore
//! identical) and become three identical channels only when written as a tensor: a third of the
//! resizing work for grey data sets.

use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

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

/// PIL's decompression-bomb limit: `Image.open` refuses an image of more pixels than this
/// (2 x `Image.MAX_IMAGE_PIXELS`).
pub const PIL_MAX_PIXELS: u64 = 2 * 89_478_485;

/// How files are decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Apply the EXIF orientation (`ImageOps.exif_transpose`); torchvision's loader does not.
    pub exif_transpose: bool,
    /// Refuse an image whose header claims more pixels than this (`None`: no limit).
    pub max_pixels: Option<u64>,
}

impl Default for DecodeOptions {
    fn default() -> DecodeOptions {
        DecodeOptions {
            exif_transpose: false,
            max_pixels: Some(PIL_MAX_PIXELS),
        }
    }
}

/// Refuses `w x h` pixels over the limit.
fn check_pixels(w: u64, h: u64, max_pixels: Option<u64>) -> Result<()> {
    match max_pixels {
        Some(max) if w * h > max => bail!(
            "{w}x{h} pixels ({}) is over the limit of {max} pixels (a decompression bomb? --max-image-pixels sets the limit)",
            w * h
        ),
        _ => Ok(()),
    }
}

/// The `image` crate's decoder limits for a pixel limit: no side longer than the limit, and
/// allocations of at most the limit's worth of 16-bit RGBA pixels (never below the crate's own
/// default, which small images' working buffers are sized for).
fn decoder_limits(max_pixels: Option<u64>) -> Limits {
    let Some(max) = max_pixels else {
        return Limits::no_limits();
    };
    let side = u32::try_from(max).unwrap_or(u32::MAX);
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(max.saturating_mul(8).max(512 << 20));
    limits
}

static DECODED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Image files this process has started to decode (read and decode attempts, failures
/// included): what a command that promises to decode each image once reports.
pub fn files_decoded() -> u64 {
    DECODED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Reads and decodes one image file. Errors name the file: `<path>: cannot read: ...` or
/// `<path>: cannot decode: ...`.
pub fn decode_file(path: &Path, opts: &DecodeOptions) -> Result<DecodedImage> {
    DECODED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    decode_bytes(&bytes, path, opts).with_context(|| format!("{}: cannot decode", path.display()))
}

/// Decodes an image held in memory; `name` only guides the format when the content does not
/// say (the content wins, as with PIL, so a PNG named `.jpg` still decodes). A decoder that
/// panics on a malformed file gives an error for that file instead of ending the pass.
pub fn decode_bytes(bytes: &[u8], name: &Path, opts: &DecodeOptions) -> Result<DecodedImage> {
    std::panic::catch_unwind(|| decode_unguarded(bytes, name, opts))
        .unwrap_or_else(|payload| Err(anyhow!("{}", panic_message(&*payload))))
}

/// The message a panic or libjpeg's unwinding carried.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("the decoder failed")
}

fn decode_unguarded(bytes: &[u8], name: &Path, opts: &DecodeOptions) -> Result<DecodedImage> {
    let format = image::guess_format(bytes)
        .ok()
        .or_else(|| ImageFormat::from_path(name).ok())
        .ok_or_else(|| anyhow!("not a JPEG, PNG, WebP or BMP file"))?;
    let (mut img, orientation) = if format == ImageFormat::Jpeg {
        decode_jpeg(bytes, opts)?
    } else {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        reader.limits(decoder_limits(opts.max_pixels));
        // Reads the header only; a side over the limit is refused by the decoder itself.
        let mut decoder = reader.into_decoder().map_err(|e| match e {
            ImageError::Limits(e) => anyhow!(
                "over the limit of {} pixels ({e}; a decompression bomb? --max-image-pixels sets the limit)",
                opts.max_pixels.unwrap_or(u64::MAX)
            ),
            e => e.into(),
        })?;
        let (w, h) = decoder.dimensions();
        check_pixels(w.into(), h.into(), opts.max_pixels)?;
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

/// libjpeg reports fatal errors by unwinding out of its callbacks (mozjpeg's convention, see
/// [`libjpeg`]); [`decode_bytes`] catches the unwinding and its message becomes the error.
fn decode_jpeg(bytes: &[u8], opts: &DecodeOptions) -> Result<(DynamicImage, Orientation)> {
    use mozjpeg::{ColorSpace, Decompress, Marker};

    let decompress = Decompress::with_err(libjpeg::error_manager())
        .with_markers(&[Marker::APP(1)])
        .from_mem(bytes)?;
    let orientation = if opts.exif_transpose {
        decompress
            .markers()
            .filter(|m| m.marker == Marker::APP(1))
            .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
            .and_then(Orientation::from_exif_chunk)
            .unwrap_or(Orientation::NoTransforms)
    } else {
        Orientation::NoTransforms
    };
    let (w, h) = decompress.size();
    check_pixels(w as u64, h as u64, opts.max_pixels)?;
    let (w32, h32) = (w as u32, h as u32);
    let bad_size = || anyhow!("decoded data does not match the {w}x{h} header");
    let img = match decompress.color_space() {
        ColorSpace::JCS_GRAYSCALE => {
            let mut started = decompress.grayscale()?;
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            DynamicImage::ImageLuma8(
                image::GrayImage::from_raw(w32, h32, pixels).ok_or_else(bad_size)?,
            )
        }
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let mut started = decompress.to_colorspace(ColorSpace::JCS_CMYK)?;
            let cmyk = started.read_scanlines::<u8>()?;
            started.finish()?;
            let rgb = cmyk
                .chunks_exact(4)
                .flat_map(|p| [0, 1, 2].map(|c| muldiv255(p[c], p[3])))
                .collect();
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w32, h32, rgb).ok_or_else(bad_size)?)
        }
        _ => {
            let mut started = decompress.rgb()?;
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            DynamicImage::ImageRgb8(
                image::RgbImage::from_raw(w32, h32, pixels).ok_or_else(bad_size)?,
            )
        }
    };
    Ok((img, orientation))
}

/// A libjpeg error manager that turns fatal errors, and the one warning PIL treats as an error,
/// into unwinding with the message; the other warnings are dropped (libjpeg's default would
/// print them).
mod libjpeg {
    use std::os::raw::c_int;

    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

    pub fn error_manager() -> jpeg_error_mgr {
        // SAFETY: jpeg_error_mgr is a plain C struct (function pointers, integers, pointers to
        // static tables) for which all-zero is a valid value; jpeg_std_error fills it in.
        let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { jpeg_std_error(&mut err) };
        err.error_exit = Some(fatal);
        err.emit_message = Some(message);
        err
    }

    unsafe extern "C-unwind" fn fatal(cinfo: &mut jpeg_common_struct) {
        let msg = format(cinfo);
        // resume_unwind skips the panic hook: nothing is printed.
        std::panic::resume_unwind(Box::new(msg));
    }

    unsafe extern "C-unwind" fn message(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: libjpeg calls this with its own, initialised error manager.
        let code = unsafe { (*cinfo.err).msg_code };
        if level < 0 && code == JWRN_JPEG_EOF {
            std::panic::resume_unwind(Box::new(
                "image file is truncated (premature end of JPEG data)".to_string(),
            ));
        }
    }

    fn format(cinfo: &mut jpeg_common_struct) -> String {
        let mut buffer = [0u8; 80];
        // SAFETY: format_message writes at most JMSG_LENGTH_MAX (80) bytes, NUL included, into
        // the buffer; the binding declares it `&[u8; 80]`, so it is called through a pointer
        // type that admits the write.
        unsafe {
            let err = &*cinfo.err;
            match err.format_message {
                Some(f) => {
                    let f: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
                        std::mem::transmute(f);
                    f(cinfo, buffer.as_mut_ptr());
                }
                None => return format!("libjpeg error {}", err.msg_code),
            }
        }
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    }
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
