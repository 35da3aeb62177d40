//! Decode, check, resize, encode and hash one downloaded image. This is where a run spends its
//! CPU, so it avoids work it can: the checks read only the header (a decompression bomb is
//! refused before a pixel is decoded), and JPEGs much larger than the target are decoded at
//! 1/2, 1/4 or 1/8 scale in the DCT domain by libjpeg-turbo (`jpeg.rs`).

pub mod jpeg;
pub mod tiff;
pub mod phash;

use std::cell::RefCell;
use std::io::Cursor;
use std::time::Instant;

use fast_image_resize as fir;
use image::{DynamicImage, ImageDecoder, ImageFormat as CodecFormat, ImageReader, RgbImage};

use crate::config::{ImageConfig, ImageFormat, ResizeFilter, ResizeMode};
use crate::outcome::{ImageData, StageSeconds, Status};

/// A processed image and what was measured on the way.
#[derive(Debug, Clone)]
pub struct Processed {
    pub image: ImageData,
    pub original_width: u32,
    pub original_height: u32,
    pub seconds: StageSeconds,
}

/// Why an image was refused, with the size of the source when its header could be read.
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: Status,
    pub reason: String,
    pub original: Option<(u32, u32)>,
    pub seconds: StageSeconds,
}

fn refuse(status: Status, reason: impl Into<String>, original: Option<(u32, u32)>, seconds: StageSeconds) -> Refused {
    Refused { status, reason: reason.into(), original, seconds }
}

/// Decode, check, resize, encode and hash. Never panics on bad input: decoders run under
/// `catch_unwind` by the caller as well, but every error path here is an ordinary `Refused`.
pub fn process(bytes: &[u8], cfg: &ImageConfig) -> Result<Processed, Refused> {
    let mut secs = StageSeconds::default();
    let t0 = Instant::now();
    let format = image::guess_format(bytes).or_else(|e| if tiff::is_tiff(bytes) { Ok(CodecFormat::Tiff) } else { Err(e) }).map_err(|_| {
        let head: String = bytes.iter().take(16).map(|b| if b.is_ascii_graphic() { *b as char } else { '.' }).collect();
        refuse(Status::DecodeFailed, format!("not a recognised image format (starts with {head:?})"), None, secs)
    })?;
    let (w, h) = header_size(bytes, format)
        .map_err(|e| refuse(Status::DecodeFailed, format!("{} header: {e}", format_name(format)), None, secs))?;
    let dims = Some((w, h));
    let pixels = w as u64 * h as u64;
    if pixels > cfg.max_pixels {
        return Err(refuse(
            Status::TooManyPixels,
            format!("{w}x{h} = {pixels} pixels, more than image.max_pixels ({})", cfg.max_pixels),
            dims,
            secs,
        ));
    }
    if w.min(h) < cfg.min_size {
        return Err(refuse(Status::TooSmall, format!("{w}x{h} is smaller than image.min_size ({})", cfg.min_size), dims, secs));
    }
    let aspect = w.max(h) as f64 / w.min(h).max(1) as f64;
    if aspect > cfg.max_aspect_ratio {
        return Err(refuse(
            Status::BadAspect,
            format!("{w}x{h} has aspect ratio {aspect:.2}, more than image.max_aspect_ratio ({})", cfg.max_aspect_ratio),
            dims,
            secs,
        ));
    }
    let decoded = decode(bytes, format, (w, h), cfg)
        .map_err(|e| refuse(Status::DecodeFailed, format!("{}: {e}", format_name(format)), dims, secs))?;
    secs.decode = t0.elapsed().as_secs_f64();
    let (ow, oh) = (decoded.original_width, decoded.original_height);

    let t1 = Instant::now();
    let rgb = decoded.rgb;
    let phash = phash::phash(&rgb);
    let resized = resize(rgb, cfg).map_err(|e| refuse(Status::DecodeFailed, format!("resize: {e}"), Some((ow, oh)), secs))?;
    secs.resize = t1.elapsed().as_secs_f64();

    let t2 = Instant::now();
    let (bytes, extension) = encode(&resized, cfg)
        .map_err(|e| refuse(Status::EncodeFailed, e, Some((ow, oh)), secs))?;
    secs.encode = t2.elapsed().as_secs_f64();
    Ok(Processed {
        image: ImageData { bytes, extension, width: resized.width(), height: resized.height(), phash },
        original_width: ow,
        original_height: oh,
        seconds: secs,
    })
}

fn format_name(f: CodecFormat) -> &'static str {
    f.extensions_str().first().copied().unwrap_or("image")
}

/// Width and height from the header alone.
fn header_size(bytes: &[u8], format: CodecFormat) -> Result<(u32, u32), String> {
    if format == CodecFormat::Jpeg {
        return jpeg::header_size(bytes);
    }
    if format == CodecFormat::Tiff {
        // Our own IFD read: BigTIFF, and TIFFs whose colour type `image` refuses, still have a size.
        return tiff::header_size(bytes);
    }
    ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(|e| e.to_string())
}

struct Decoded {
    rgb: RgbImage,
    /// Size of the full-resolution image after EXIF orientation.
    original_width: u32,
    original_height: u32,
}

/// The smallest decoded size the resize mode needs, as (shorter side, longer side) minimums.
fn needed_side(cfg: &ImageConfig) -> Option<(bool, u32)> {
    match cfg.resize {
        ResizeMode::None => None,
        ResizeMode::CenterCrop | ResizeMode::KeepRatio => Some((true, cfg.size)),
        ResizeMode::KeepRatioLargest | ResizeMode::Border => Some((false, cfg.size)),
    }
}

/// The DCT scale numerator (1, 2 or 4 over 8) that still leaves enough pixels, or 8 for full size.
pub fn dct_scale(w: u32, h: u32, cfg: &ImageConfig) -> u32 {
    if !cfg.reduced_decode {
        return 8;
    }
    let Some((shorter, need)) = needed_side(cfg) else { return 8 };
    let scaled = |len: u32, k: u32| (len * k).div_ceil(8);
    for k in [1, 2, 4] {
        let (sw, sh) = (scaled(w, k), scaled(h, k));
        let side = if shorter { sw.min(sh) } else { sw.max(sh) };
        // As PIL's `draft()` and libjpeg-turbo's scaled decoding are used: the smallest scale
        // that still covers the target. The DCT-domain reduction is itself an area average, so
        // the resampler downstream only finishes the job.
        if side >= need {
            return k;
        }
    }
    8
}

fn decode(bytes: &[u8], format: CodecFormat, (w, h): (u32, u32), cfg: &ImageConfig) -> Result<Decoded, String> {
    if format == CodecFormat::Jpeg {
        let k = dct_scale(w, h, cfg);
        // Reduced sizes go through libjpeg-turbo's scaled IDCT (PIL's `draft()`). Full size too
        // when libjpeg-turbo has its SIMD code (5% faster than zune-jpeg on photo-like JPEGs:
        // 10.2 vs 10.7 ms at 2048x1536, benches/imaging.rs `photo`); without SIMD, zune-jpeg.
        if k < 8 || jpeg::simd() {
            if let Some(d) = decode_jpeg_scaled(bytes, w, h, k)? {
                return Ok(d);
            }
        }
    }
    let general = || -> Result<(DynamicImage, image::metadata::Orientation), String> {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(cfg.max_pixels.saturating_mul(8).max(64 << 20));
        reader.limits(limits);
        // YCbCr-JPEG, CIELab, 12-bit and other depths: libtiff reads them, so do we.
        let tiff_fallback = |e: String| match tiff::decode(bytes, cfg.max_pixels) {
            Ok(rgb) => Ok((DynamicImage::ImageRgb8(rgb), image::metadata::Orientation::NoTransforms)),
            Err(own) => Err(format!("{e}; recap's own TIFF reader: {own}")),
        };
        let mut decoder = match reader.into_decoder() {
            Ok(d) => d,
            Err(e) if format == CodecFormat::Tiff => return tiff_fallback(e.to_string()),
            Err(e) => return Err(e.to_string()),
        };
        let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
        match DynamicImage::from_decoder(decoder) {
            Ok(img) => Ok((img, orientation)),
            Err(e) if format == CodecFormat::Gif && e.to_string().contains("no color table") => {
                Ok((gif_without_palette(bytes, cfg)?, image::metadata::Orientation::NoTransforms))
            }
            Err(e) if format == CodecFormat::Tiff => tiff_fallback(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    let (mut img, orientation) = match general() {
        Ok(r) => r,
        // zune-jpeg is stricter than libjpeg on some odd files (a short Adobe APP14 segment, ...)
        // that libjpeg, and so PIL, read: give libjpeg-turbo the file at full size before refusing.
        Err(e) if format == CodecFormat::Jpeg => match decode_jpeg_scaled(bytes, w, h, 8) {
            Ok(Some(d)) => return Ok(d),
            _ => return Err(e),
        },
        Err(e) => return Err(e),
    };
    // zune-jpeg pads a cut file with grey rows and says nothing: refuse it as the scaled path
    // (and PIL) do, so both paths agree on what is truncated. Checked after decoding, so that
    // damaged headers keep the decoder's own message.
    if format == CodecFormat::Jpeg && !jpeg::is_complete(bytes) {
        return Err("premature end of JPEG data (truncated file)".into());
    }
    img.apply_orientation(orientation);
    let (ow, oh) = (img.width(), img.height());
    Ok(Decoded { rgb: to_rgb_on_white(img), original_width: ow, original_height: oh })
}

/// A GIF whose frame has neither a local nor a global colour table, read as PIL reads it (each
/// index a grey level): the same bytes with a grey-ramp global colour table put in, decoded as
/// usual (transparency, disposal and all).
fn gif_without_palette(bytes: &[u8], cfg: &ImageConfig) -> Result<DynamicImage, String> {
    const SCREEN: usize = 13; // "GIF8?a", width, height, packed, background, aspect
    if bytes.len() < SCREEN || bytes[10] & 0x80 != 0 {
        return Err("no color table available for current frame".into());
    }
    let mut patched = Vec::with_capacity(bytes.len() + 768);
    patched.extend_from_slice(&bytes[..SCREEN]);
    patched[10] |= 0x80 | 0x07; // a global colour table of 2^(7+1) = 256 entries
    patched.extend((0..=255u8).flat_map(|v| [v, v, v]));
    patched.extend_from_slice(&bytes[SCREEN..]);
    let mut reader = ImageReader::with_format(Cursor::new(patched), CodecFormat::Gif);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(cfg.max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| e.to_string())
}

/// JPEG decoded at `k`/8 scale by libjpeg-turbo; `None` when the colour space needs the general
/// decoder (CMYK, YCCK).
fn decode_jpeg_scaled(bytes: &[u8], w: u32, h: u32, k: u32) -> Result<Option<Decoded>, String> {
    let buffer = PIXELS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let Some((img, orientation)) = jpeg::decode_scaled_opts(bytes, k, false, buffer)? else { return Ok(None) };
    let sw = img.width();
    let mut dynimg = DynamicImage::ImageRgb8(img);
    dynimg.apply_orientation(orientation);
    let swapped = dynimg.width() != sw;
    let (ow, oh) = if swapped { (h, w) } else { (w, h) };
    Ok(Some(Decoded { rgb: dynimg.into_rgb8(), original_width: ow, original_height: oh }))
}

/// Any decoded image to 8-bit RGB; transparent pixels are composited on white.
pub fn to_rgb_on_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for p in rgba.pixels() {
        let a = p.0[3] as u32;
        for c in 0..3 {
            let v = (p.0[c] as u32 * a + 255 * (255 - a) + 127) / 255;
            out.push(v as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("sizes match")
}

fn fir_alg(f: ResizeFilter, shrinking: bool) -> fir::ResizeAlg {
    use fir::FilterType as F;
    match f {
        ResizeFilter::Auto if shrinking => fir::ResizeAlg::Convolution(F::Box),
        ResizeFilter::Auto => fir::ResizeAlg::Convolution(F::Lanczos3),
        ResizeFilter::Nearest => fir::ResizeAlg::Nearest,
        ResizeFilter::Box => fir::ResizeAlg::Convolution(F::Box),
        ResizeFilter::Bilinear => fir::ResizeAlg::Convolution(F::Bilinear),
        ResizeFilter::Hamming => fir::ResizeAlg::Convolution(F::Hamming),
        ResizeFilter::CatmullRom => fir::ResizeAlg::Convolution(F::CatmullRom),
        ResizeFilter::Mitchell => fir::ResizeAlg::Convolution(F::Mitchell),
        ResizeFilter::Lanczos3 => fir::ResizeAlg::Convolution(F::Lanczos3),
    }
}

thread_local! {
    static RESIZER: RefCell<fir::Resizer> = RefCell::new(fir::Resizer::new());
    /// The last decoded image's pixel buffer, kept for the next decode on this thread. A fresh
    /// buffer per image is fresh memory per image: the allocator returns freed pages to the OS a
    /// while later and the next image faults new ones in (zeroed by the kernel), so a run's
    /// memory rose and fell with its throughput. One buffer per CPU thread, at most
    /// [`KEPT_PIXELS`] bytes.
    static PIXELS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The largest pixel buffer a CPU thread keeps between images (a 2,300×2,300 RGB image).
const KEPT_PIXELS: usize = 16 << 20;

/// Give a decoded image's buffer back for the next decode on this thread.
fn recycle(img: RgbImage) {
    let buf = img.into_raw();
    if buf.capacity() <= KEPT_PIXELS {
        PIXELS.with(|p| {
            let mut kept = p.borrow_mut();
            if buf.capacity() > kept.capacity() {
                *kept = buf;
            }
        });
    }
}

/// Resize `src` into a `dw`×`dh` image, optionally from a crop box of the source.
pub fn resize_rgb(src: &RgbImage, dw: u32, dh: u32, crop: Option<(f64, f64, f64, f64)>, filter: ResizeFilter) -> Result<RgbImage, String> {
    let (sw, sh) = src.dimensions();
    if crop.is_none() && (sw, sh) == (dw, dh) {
        return Ok(src.clone());
    }
    let src_view = fir::images::ImageRef::new(sw, sh, src.as_raw(), fir::PixelType::U8x3).map_err(|e| e.to_string())?;
    let mut dst = fir::images::Image::new(dw, dh, fir::PixelType::U8x3);
    let (cw, ch) = crop.map_or((sw as f64, sh as f64), |c| (c.2, c.3));
    let shrinking = (dw as f64) < cw && (dh as f64) < ch;
    let mut opts = fir::ResizeOptions::new().resize_alg(fir_alg(filter, shrinking));
    if let Some((x, y, cw, ch)) = crop {
        opts = opts.crop(x, y, cw, ch);
    }
    RESIZER.with(|r| r.borrow_mut().resize(&src_view, &mut dst, &opts)).map_err(|e| e.to_string())?;
    RgbImage::from_raw(dw, dh, dst.into_vec()).ok_or_else(|| "resizer returned a wrong-sized buffer".into())
}

/// Bring a decoded image to the configured size.
pub fn resize(src: RgbImage, cfg: &ImageConfig) -> Result<RgbImage, String> {
    let (w, h) = src.dimensions();
    let size = cfg.size;
    let scaled = |s: f64, len: u32| ((len as f64 * s).round() as u32).max(1);
    let out = match cfg.resize {
        ResizeMode::None => return Ok(src),
        ResizeMode::CenterCrop => {
            let side = w.min(h);
            let crop = ((w - side) as f64 / 2.0, (h - side) as f64 / 2.0, side as f64, side as f64);
            resize_rgb(&src, size, size, Some(crop), cfg.filter)
        }
        ResizeMode::KeepRatio => {
            let s = size as f64 / w.min(h) as f64;
            resize_rgb(&src, scaled(s, w), scaled(s, h), None, cfg.filter)
        }
        ResizeMode::KeepRatioLargest => {
            let s = size as f64 / w.max(h) as f64;
            resize_rgb(&src, scaled(s, w), scaled(s, h), None, cfg.filter)
        }
        ResizeMode::Border => {
            let s = size as f64 / w.max(h) as f64;
            let (iw, ih) = (scaled(s, w).min(size), scaled(s, h).min(size));
            resize_rgb(&src, iw, ih, None, cfg.filter).map(|inner| {
                let mut canvas = RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255]));
                image::imageops::replace(&mut canvas, &inner, ((size - iw) / 2) as i64, ((size - ih) / 2) as i64);
                canvas
            })
        }
    };
    recycle(src);
    out
}

/// Encode to the configured format.
pub fn encode(img: &RgbImage, cfg: &ImageConfig) -> Result<(Vec<u8>, &'static str), String> {
    let (w, h) = img.dimensions();
    // The JPEG encoder allocates its own output; only the `image` encoders write into this.
    let out = || Vec::with_capacity((w * h / 4) as usize);
    match cfg.format {
        ImageFormat::Jpeg => {
            if w > u16::MAX as u32 || h > u16::MAX as u32 {
                return Err(format!("{w}x{h} is too large for JPEG (at most 65535 per side)"));
            }
            Ok((jpeg::encode(img, cfg.quality)?, "jpg"))
        }
        ImageFormat::Png => {
            use image::ImageEncoder;
            let mut out = out();
            let enc = image::codecs::png::PngEncoder::new_with_quality(
                &mut out,
                image::codecs::png::CompressionType::Fast,
                image::codecs::png::FilterType::Adaptive,
            );
            enc.write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8).map_err(|e| e.to_string())?;
            Ok((out, "png"))
        }
        ImageFormat::Webp => {
            let mut out = out();
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            enc.encode(img.as_raw(), w, h, image::ExtendedColorType::Rgb8).map_err(|e| e.to_string())?;
            Ok((out, "webp"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GIF with no colour table at all (neither global nor local) that PIL reads as grey
    /// levels: each index is its grey value (img2dataset decodes these; image's GIF decoder
    /// refuses them).
    fn gif_with_no_colour_table(w: u16, h: u16) -> Vec<u8> {
        // Written by hand: encoders refuse a frame without a palette. LZW with a clear code every
        // 200 literals keeps every code 9 bits wide.
        let pixels: Vec<u16> = (0..w as usize * h as usize).map(|i| (i * 7 % 256) as u16).collect();
        let mut codes = Vec::new();
        for chunk in pixels.chunks(200) {
            codes.push(256u16);
            codes.extend_from_slice(chunk);
        }
        codes.push(257);
        let (mut data, mut acc, mut nbits) = (Vec::new(), 0u32, 0u32);
        for c in codes {
            acc |= (c as u32) << nbits;
            nbits += 9;
            while nbits >= 8 {
                data.push(acc as u8);
                acc >>= 8;
                nbits -= 8;
            }
        }
        if nbits > 0 {
            data.push(acc as u8);
        }
        let mut out = b"GIF89a".to_vec();
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0]); // no global colour table, background 0, aspect 0
        out.push(0x2C);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.push(0); // no local colour table
        out.push(8); // LZW minimum code size
        for block in data.chunks(255) {
            out.push(block.len() as u8);
            out.extend_from_slice(block);
        }
        out.extend_from_slice(&[0, 0x3B]);
        out
    }

    /// A JPEG with an Adobe APP14 segment shorter than its 12 bytes: libjpeg (and so PIL) reads
    /// it and ignores the segment.
    fn jpeg_with_short_app14() -> Vec<u8> {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
        let mut j = Vec::new();
        jpeg_encoder::Encoder::new(&mut j, 90).encode(img.as_raw(), 64, 48, jpeg_encoder::ColorType::Rgb).unwrap();
        let mut out = j[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xEE, 0x00, 0x07, b'A', b'd', b'o', b'b', b'e']);
        out.extend_from_slice(&j[2..]);
        out
    }

    #[test]
    fn a_jpeg_with_a_short_app14_segment_decodes() {
        let bytes = jpeg_with_short_app14();
        let d = decode(&bytes, CodecFormat::Jpeg, (64, 48), &ImageConfig::default()).unwrap();
        assert_eq!((d.original_width, d.original_height), (64, 48));
        let p = d.rgb.get_pixel(40, 20).0;
        assert!((p[0] as i32 - 160).abs() <= 4 && (p[1] as i32 - 100).abs() <= 4 && (p[2] as i32 - 128).abs() <= 4, "{p:?}");
    }

    #[test]
    fn a_gif_without_a_colour_table_decodes_as_grey() {
        let bytes = gif_with_no_colour_table(80, 60);
        assert!(image::load_from_memory(&bytes).is_err(), "image's decoder refuses it (what this covers)");
        let d = decode(&bytes, CodecFormat::Gif, (80, 60), &ImageConfig::default()).unwrap();
        assert_eq!((d.original_width, d.original_height), (80, 60));
        for (i, p) in d.rgb.pixels().enumerate() {
            let v = (i * 7 % 256) as u8;
            assert_eq!(p.0, [v, v, v], "pixel {i}");
        }
        // RECAP_WRITE_GIF=DIR writes the file to check against PIL, which reads it as mode L with
        // the same values: `np.asarray(Image.open(f))[y, x] == (y * 80 + x) * 7 % 256` (checked).
        if let Ok(dir) = std::env::var("RECAP_WRITE_GIF") {
            std::fs::write(std::path::Path::new(&dir).join("no-colour-table.gif"), &bytes).unwrap();
        }
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let cfg = ImageConfig { format: ImageFormat::Jpeg, ..Default::default() };
        encode(&img, &cfg).unwrap().0
    }

    #[test]
    fn center_crop_gives_a_square_of_size() {
        let cfg = ImageConfig { size: 64, min_size: 10, ..Default::default() };
        let p = process(&jpeg(400, 300), &cfg).unwrap();
        assert_eq!((p.image.width, p.image.height), (64, 64));
        assert_eq!((p.original_width, p.original_height), (400, 300));
        assert!(image::load_from_memory(&p.image.bytes).is_ok());
    }

    #[test]
    fn resize_modes_give_the_documented_sizes() {
        let src = RgbImage::new(400, 200);
        let mk = |mode| ImageConfig { size: 100, resize: mode, ..Default::default() };
        assert_eq!(resize(src.clone(), &mk(ResizeMode::KeepRatio)).unwrap().dimensions(), (200, 100));
        assert_eq!(resize(src.clone(), &mk(ResizeMode::KeepRatioLargest)).unwrap().dimensions(), (100, 50));
        assert_eq!(resize(src.clone(), &mk(ResizeMode::Border)).unwrap().dimensions(), (100, 100));
        assert_eq!(resize(src.clone(), &mk(ResizeMode::None)).unwrap().dimensions(), (400, 200));
    }

    #[test]
    fn a_recycled_pixel_buffer_gives_the_same_images_as_a_fresh_one() {
        // One thread decodes a large image, then smaller ones, a truncated one and the large one
        // again, each into the buffer the one before left: every result must equal that of a
        // thread that decodes only that image (nothing of an earlier picture may show through).
        let cfg = ImageConfig { size: 64, min_size: 1, ..Default::default() };
        let mut cut = smooth_jpeg(640, 480, None);
        cut.truncate(cut.len() / 2);
        let inputs = [smooth_jpeg(1024, 768, None), jpeg(200, 150), smooth_jpeg(300, 500, Some(6)), cut, jpeg(90, 90), smooth_jpeg(1024, 768, None)];
        let alone = |bytes: Vec<u8>, cfg: ImageConfig| {
            std::thread::spawn(move || process(&bytes, &cfg).map(|p| (p.image.bytes, p.image.phash)).map_err(|r| r.reason)).join().unwrap()
        };
        let reused = std::thread::spawn({
            let (inputs, cfg) = (inputs.clone(), cfg.clone());
            move || {
                let out: Vec<_> = inputs.iter().map(|b| process(b, &cfg).map(|p| (p.image.bytes, p.image.phash)).map_err(|r| r.reason)).collect();
                let kept = PIXELS.with(|p| p.borrow().capacity());
                (out, kept)
            }
        })
        .join()
        .unwrap();
        let (out, kept) = reused;
        assert!(out[3].as_ref().is_err_and(|reason| reason.contains("truncated")), "{:?}", out[3].as_ref().err());
        assert!(out.iter().enumerate().all(|(i, r)| r.is_ok() == (i != 3)));
        for (i, (got, bytes)) in out.into_iter().zip(inputs).enumerate() {
            assert_eq!(got, alone(bytes, cfg.clone()), "image {i}");
        }
        // The thread kept the largest buffer it decoded into: 1024x768 at 1/8 scale (128x96 RGB).
        assert_eq!(kept, 128 * 96 * 3);
    }

    #[test]
    fn dct_scale_keeps_enough_pixels() {
        let cfg = ImageConfig { size: 256, ..Default::default() };
        // Numerators over 8: 1200 * 1/8 = 150 < 256, 1200 * 2/8 = 300 >= 256: decode at 1/4.
        assert_eq!(dct_scale(1600, 1200, &cfg), 2);
        assert_eq!(dct_scale(2048, 2048, &cfg), 1);
        assert_eq!(dct_scale(600, 520, &cfg), 4);
        assert_eq!(dct_scale(300, 300, &cfg), 8);
    }

    #[test]
    fn refusals_have_statuses() {
        let cfg = ImageConfig { min_size: 64, ..Default::default() };
        assert_eq!(process(b"<html>nope</html>", &cfg).unwrap_err().status, Status::DecodeFailed);
        assert_eq!(process(&jpeg(40, 40), &cfg).unwrap_err().status, Status::TooSmall);
        assert_eq!(process(&jpeg(400, 100), &cfg).unwrap_err().status, Status::BadAspect);
        let small = ImageConfig { max_pixels: 1000, min_size: 1, ..Default::default() };
        assert_eq!(process(&jpeg(100, 100), &small).unwrap_err().status, Status::TooManyPixels);
        let mut truncated = jpeg(200, 200);
        truncated.truncate(300);
        assert_eq!(process(&truncated, &cfg).unwrap_err().status, Status::DecodeFailed);
    }

    fn smooth_jpeg(w: u32, h: u32, exif_orientation: Option<u16>) -> Vec<u8> {
        let wave = |x: u32, y: u32| 128.0 + 100.0 * (x as f32 / 90.0).sin() * (y as f32 / 70.0).cos();
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, wave(x, y) as u8]));
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
        if let Some(o) = exif_orientation {
            // A minimal little-endian TIFF with one IFD entry: Orientation (0x0112), SHORT, 1 value.
            let mut exif = b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
            exif.extend_from_slice(&o.to_le_bytes());
            exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            enc.add_app_segment(1, exif).unwrap();
        }
        enc.encode(img.as_raw(), w as u16, h as u16, jpeg_encoder::ColorType::Rgb).unwrap();
        out
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        let da = image::load_from_memory(a).unwrap().into_rgb8();
        let db = image::load_from_memory(b).unwrap().into_rgb8();
        assert_eq!(da.dimensions(), db.dimensions());
        da.as_raw().iter().zip(db.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / da.as_raw().len() as f64
    }

    #[test]
    fn scaled_decode_gives_the_full_decode_picture() {
        let bytes = smooth_jpeg(1024, 768, None);
        let scaled = ImageConfig { size: 128, min_size: 1, ..Default::default() };
        assert_eq!(dct_scale(1024, 768, &scaled), 2);
        let full = ImageConfig { reduced_decode: false, ..scaled.clone() };
        let (a, b) = (process(&bytes, &scaled).unwrap(), process(&bytes, &full).unwrap());
        assert_eq!((a.original_width, a.original_height), (1024, 768));
        let d = mean_abs_diff(&a.image.bytes, &b.image.bytes);
        assert!(d < 3.0, "scaled and full decodes differ by {d} on average");
        let hd = phash::distance(a.image.phash, b.image.phash);
        assert!(hd <= 4, "phash distance {hd}");
    }

    #[test]
    fn exif_orientation_is_applied_on_both_decode_paths() {
        // Orientation 6: the stored 800x400 picture is shown rotated 90 degrees clockwise, 400x800.
        let bytes = smooth_jpeg(800, 400, Some(6));
        for reduced in [true, false] {
            let cfg = ImageConfig { size: 100, min_size: 1, resize: ResizeMode::KeepRatio, reduced_decode: reduced, ..Default::default() };
            let p = process(&bytes, &cfg).unwrap();
            assert_eq!((p.original_width, p.original_height), (400, 800), "reduced decode {reduced}");
            assert_eq!((p.image.width, p.image.height), (100, 200), "reduced decode {reduced}");
        }
    }

    #[test]
    fn truncated_jpegs_are_refused_on_both_decode_paths() {
        for reduced in [true, false] {
            let cfg = ImageConfig { size: 128, min_size: 1, reduced_decode: reduced, ..Default::default() };
            let whole = smooth_jpeg(1024, 768, Some(6));
            assert!(jpeg::is_complete(&whole));
            process(&whole, &cfg).unwrap();
            // Trailing bytes after the end-of-image marker are kept.
            let mut trailing = whole.clone();
            trailing.extend_from_slice(b"\0\0junk");
            process(&trailing, &cfg).unwrap();
            for cut in [whole.len() / 2, whole.len() - 2, whole.len() - 1] {
                let r = process(&whole[..cut], &cfg).unwrap_err();
                assert_eq!(r.status, Status::DecodeFailed);
                assert!(r.reason.contains("truncated"), "reduced {reduced}, cut at {cut}: {}", r.reason);
            }
        }
    }

    #[test]
    fn jpeg_completeness_follows_progressive_scans_and_restart_markers() {
        let img = RgbImage::from_fn(300, 200, |x, y| image::Rgb([(x % 256) as u8, (y * 7 % 256) as u8, ((x ^ y) % 256) as u8]));
        let encode = |progressive: bool, restart: u16| {
            let mut out = Vec::new();
            let mut enc = jpeg_encoder::Encoder::new(&mut out, 95);
            enc.set_progressive(progressive);
            enc.set_restart_interval(restart);
            enc.encode(img.as_raw(), 300, 200, jpeg_encoder::ColorType::Rgb).unwrap();
            out
        };
        let turbo = jpeg::encode(&img, 90).unwrap();
        for bytes in [encode(false, 0), encode(true, 0), encode(false, 4), turbo] {
            assert!(jpeg::is_complete(&bytes));
            for cut in [2, 20, bytes.len() / 3, bytes.len() * 2 / 3, bytes.len() - 1] {
                assert!(!jpeg::is_complete(&bytes[..cut]), "cut at {cut} of {}", bytes.len());
            }
        }
        assert!(!jpeg::is_complete(b"GIF89a"));
    }

    #[test]
    fn truncated_and_corrupt_jpegs_are_refused_on_the_scaled_path() {
        let cfg = ImageConfig { size: 128, min_size: 1, ..Default::default() };
        let mut bytes = smooth_jpeg(1024, 768, None);
        bytes.truncate(bytes.len() / 2);
        let r = process(&bytes, &cfg).unwrap_err();
        assert_eq!(r.status, Status::DecodeFailed);
        assert!(r.reason.contains("truncated"), "{}", r.reason);
        let mut bytes = smooth_jpeg(1024, 768, None);
        // A frame header claiming 0 components: libjpeg's fatal error, caught and reported.
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bytes[sof + 9] = 0;
        let r = process(&bytes, &cfg).unwrap_err();
        assert_eq!(r.status, Status::DecodeFailed);
        assert!(r.reason.starts_with("jpg"), "{}", r.reason);
        let mut bytes = smooth_jpeg(1024, 768, None);
        bytes.truncate(200);
        let r = process(&bytes, &cfg).unwrap_err();
        assert_eq!(r.status, Status::DecodeFailed);
        assert!(r.reason.contains("missing SOS marker"), "{}", r.reason);
        // A marker segment longer than the file (what `recap synth --corrupt` writes, in short).
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF];
        bytes.extend([0u8; 100]);
        let r = process(&bytes, &cfg).unwrap_err();
        assert_eq!(r.status, Status::DecodeFailed);
        assert!(r.reason.contains("damaged or cut file"), "{}", r.reason);
        // Without its end-of-image marker the last rows' data cannot be told from a cut: refused,
        // as PIL refuses it.
        let mut bytes = smooth_jpeg(1024, 768, None);
        assert_eq!(bytes[bytes.len() - 2..], [0xFF, 0xD9]);
        bytes.truncate(bytes.len() - 2);
        let r = process(&bytes, &cfg).unwrap_err();
        assert!(r.reason.contains("truncated"), "{}", r.reason);
    }
}
