//! Decode, check, resize, encode and hash one downloaded image. This is where a run spends its
//! CPU, so it avoids work it can: the checks read only the header (a decompression bomb is
//! refused before a pixel is decoded), and JPEGs much larger than the target are decoded at
//! 1/2, 1/4 or 1/8 scale in the DCT domain, as libjpeg-turbo's scaled decoding does.

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
    let format = image::guess_format(bytes).map_err(|_| {
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
        let mut d = jpeg_decoder::Decoder::new(Cursor::new(bytes));
        d.read_info().map_err(|e| e.to_string())?;
        let info = d.info().ok_or("no frame header")?;
        return Ok((info.width as u32, info.height as u32));
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
        // jpeg-decoder's scaled path only pays off from 1/4 down: at 1/2 its Huffman decoding
        // costs more than zune-jpeg's full decode (criterion, 800x600 -> 256: 5.6 ms at 1/2 vs
        // 4.2 ms full; 1600x1200: 9.7 ms at 1/4 vs 15.1 ms full).
        if k <= 2 {
            if let Some(d) = decode_jpeg_scaled(bytes, w, h, k)? {
                return Ok(d);
            }
        }
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(cfg.max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    img.apply_orientation(orientation);
    let (ow, oh) = (img.width(), img.height());
    Ok(Decoded { rgb: to_rgb_on_white(img), original_width: ow, original_height: oh })
}

/// Scaled JPEG decode; `None` when the JPEG's colour type needs the general decoder (CMYK, 16-bit).
fn decode_jpeg_scaled(bytes: &[u8], w: u32, h: u32, k: u32) -> Result<Option<Decoded>, String> {
    let mut d = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    d.read_info().map_err(|e| e.to_string())?;
    let fmt = d.info().ok_or("no frame header")?.pixel_format;
    if !matches!(fmt, jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8) {
        return Ok(None);
    }
    let req = |len: u32| (len * k).div_ceil(8).min(u16::MAX as u32) as u16;
    let (sw, sh) = d.scale(req(w), req(h)).map_err(|e| e.to_string())?;
    let pixels = d.decode().map_err(|e| e.to_string())?;
    let (sw, sh) = (sw as u32, sh as u32);
    let rgb = match fmt {
        jpeg_decoder::PixelFormat::L8 => {
            let mut out = Vec::with_capacity(pixels.len() * 3);
            for p in pixels {
                out.extend_from_slice(&[p, p, p]);
            }
            out
        }
        _ => pixels,
    };
    let img = RgbImage::from_raw(sw, sh, rgb).ok_or("decoded buffer has the wrong size")?;
    let orientation = d
        .exif_data()
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
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

fn fir_alg(f: ResizeFilter) -> fir::ResizeAlg {
    use fir::FilterType as F;
    match f {
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
}

/// Resize `src` into a `dw`×`dh` image, optionally from a crop box of the source.
pub fn resize_rgb(src: &RgbImage, dw: u32, dh: u32, crop: Option<(f64, f64, f64, f64)>, filter: ResizeFilter) -> Result<RgbImage, String> {
    let (sw, sh) = src.dimensions();
    if crop.is_none() && (sw, sh) == (dw, dh) {
        return Ok(src.clone());
    }
    let src_view = fir::images::ImageRef::new(sw, sh, src.as_raw(), fir::PixelType::U8x3).map_err(|e| e.to_string())?;
    let mut dst = fir::images::Image::new(dw, dh, fir::PixelType::U8x3);
    let mut opts = fir::ResizeOptions::new().resize_alg(fir_alg(filter));
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
    match cfg.resize {
        ResizeMode::None => Ok(src),
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
            let inner = resize_rgb(&src, iw, ih, None, cfg.filter)?;
            let mut canvas = RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255]));
            image::imageops::replace(&mut canvas, &inner, ((size - iw) / 2) as i64, ((size - ih) / 2) as i64);
            Ok(canvas)
        }
    }
}

/// Encode to the configured format.
pub fn encode(img: &RgbImage, cfg: &ImageConfig) -> Result<(Vec<u8>, &'static str), String> {
    let (w, h) = img.dimensions();
    let mut out = Vec::with_capacity((w * h / 4) as usize);
    match cfg.format {
        ImageFormat::Jpeg => {
            if w > u16::MAX as u32 || h > u16::MAX as u32 {
                return Err(format!("{w}x{h} is too large for JPEG (at most 65535 per side)"));
            }
            let enc = jpeg_encoder::Encoder::new(&mut out, cfg.quality);
            enc.encode(img.as_raw(), w as u16, h as u16, jpeg_encoder::ColorType::Rgb).map_err(|e| e.to_string())?;
            Ok((out, "jpg"))
        }
        ImageFormat::Png => {
            use image::ImageEncoder;
            let enc = image::codecs::png::PngEncoder::new_with_quality(
                &mut out,
                image::codecs::png::CompressionType::Fast,
                image::codecs::png::FilterType::Adaptive,
            );
            enc.write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8).map_err(|e| e.to_string())?;
            Ok((out, "png"))
        }
        ImageFormat::Webp => {
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            enc.encode(img.as_raw(), w, h, image::ExtendedColorType::Rgb8).map_err(|e| e.to_string())?;
            Ok((out, "webp"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
