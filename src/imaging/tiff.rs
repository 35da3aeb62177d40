//! TIFFs the `image` crate refuses but libtiff (and so OpenCV in img2dataset, and PIL for most)
//! reads: JPEG-compressed YCbCr (the `tiff` crate decodes it but hands back YCbCr samples),
//! CIE L*a*b*, and bit depths other than 8 and 16 (12-bit scanner files, 1/2/4-bit). The first
//! goes through the `tiff` crate; the others through a small strip/tile reader here: the first
//! IFD of a classic or BigTIFF file, compression none, LZW, Deflate or PackBits, chunky or
//! planar, any depth from 1 to 16 bits, gray, RGB or CIELab, to 8-bit RGB.

use std::io::{Cursor, Read};

use image::RgbImage;

/// TIFF magic: classic (`II*\0`, `MM\0*`) or BigTIFF (`II+\0`, `MM\0+`).
pub fn is_tiff(bytes: &[u8]) -> bool {
    matches!(bytes.get(..4), Some(b"II*\0" | b"MM\0*" | b"II+\0" | b"MM\0+"))
}

/// The first image's fields we need.
#[derive(Debug, Default)]
struct Ifd {
    width: u32,
    height: u32,
    bits: Vec<u16>,
    samples: u16,
    photometric: u16,
    compression: u16,
    planar: u16,
    predictor: u16,
    sample_format: u16,
    rows_per_strip: u32,
    tile: Option<(u32, u32)>,
    offsets: Vec<u64>,
    counts: Vec<u64>,
}

struct Reader<'a> {
    b: &'a [u8],
    le: bool,
}

impl Reader<'_> {
    fn bytes(&self, at: u64, n: usize) -> Result<&[u8], String> {
        let at = usize::try_from(at).map_err(|_| "offset out of range")?;
        self.b.get(at..at.checked_add(n).ok_or("offset out of range")?).ok_or_else(|| format!("the file ends before byte {}", at + n))
    }
    fn u16(&self, at: u64) -> Result<u16, String> {
        let s: [u8; 2] = self.bytes(at, 2)?.try_into().expect("2 bytes");
        Ok(if self.le { u16::from_le_bytes(s) } else { u16::from_be_bytes(s) })
    }
    fn u32(&self, at: u64) -> Result<u32, String> {
        let s: [u8; 4] = self.bytes(at, 4)?.try_into().expect("4 bytes");
        Ok(if self.le { u32::from_le_bytes(s) } else { u32::from_be_bytes(s) })
    }
    fn u64(&self, at: u64) -> Result<u64, String> {
        let s: [u8; 8] = self.bytes(at, 8)?.try_into().expect("8 bytes");
        Ok(if self.le { u64::from_le_bytes(s) } else { u64::from_be_bytes(s) })
    }
}

/// Parse the first IFD (classic or BigTIFF).
fn first_ifd(bytes: &[u8]) -> Result<Ifd, String> {
    if !is_tiff(bytes) {
        return Err("not a TIFF file".into());
    }
    let r = Reader { b: bytes, le: bytes[0] == b'I' };
    let big = r.u16(2)? == 43;
    let (mut at, count) = if big {
        let at = r.u64(8)?;
        (at.saturating_add(8), r.u64(at)?)
    } else {
        let at = r.u32(4)? as u64;
        (at.saturating_add(2), r.u16(at)? as u64)
    };
    if count > 4096 {
        return Err(format!("{count} IFD entries; a damaged file"));
    }
    let mut ifd = Ifd { samples: 1, compression: 1, planar: 1, predictor: 1, sample_format: 1, rows_per_strip: u32::MAX, ..Ifd::default() };
    let mut tile_w = None;
    let mut tile_h = None;
    for _ in 0..count {
        let tag = r.u16(at)?;
        let typ = r.u16(at.saturating_add(2))?;
        let n = if big { r.u64(at.saturating_add(4))? } else { r.u32(at.saturating_add(4))? as u64 };
        let value_at = at.saturating_add(if big { 12 } else { 8 });
        let size: u64 = match typ {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            16..=18 => 8,
            _ => 0,
        };
        let inline = if big { 8 } else { 4 };
        let data_at = if size.saturating_mul(n) <= inline {
            value_at
        } else if big {
            r.u64(value_at)?
        } else {
            r.u32(value_at)? as u64
        };
        let values = |max: u64| -> Result<Vec<u64>, String> {
            if n > max {
                return Err(format!("tag {tag} has {n} values; a damaged file"));
            }
            (0..n)
                .map(|i| match size {
                    1 => r.bytes(data_at.saturating_add(i), 1).map(|b| b[0] as u64),
                    2 => r.u16(data_at.saturating_add(2 * i)).map(u64::from),
                    4 => r.u32(data_at.saturating_add(4 * i)).map(u64::from),
                    8 => r.u64(data_at.saturating_add(8 * i)),
                    _ => Err(format!("tag {tag} has an unknown type {typ}")),
                })
                .collect()
        };
        let first = || -> Result<u64, String> { values(1 << 24)?.first().copied().ok_or_else(|| format!("tag {tag} has no value")) };
        match tag {
            256 => ifd.width = first()? as u32,
            257 => ifd.height = first()? as u32,
            258 => ifd.bits = values(64)?.into_iter().map(|v| v as u16).collect(),
            259 => ifd.compression = first()? as u16,
            262 => ifd.photometric = first()? as u16,
            273 | 324 => ifd.offsets = values(1 << 24)?,
            277 => ifd.samples = first()? as u16,
            278 => ifd.rows_per_strip = first()?.min(u32::MAX as u64) as u32,
            279 | 325 => ifd.counts = values(1 << 24)?,
            284 => ifd.planar = first()? as u16,
            317 => ifd.predictor = first()? as u16,
            322 => tile_w = Some(first()? as u32),
            323 => tile_h = Some(first()? as u32),
            339 => ifd.sample_format = first()? as u16,
            _ => {}
        }
        at = at.saturating_add(if big { 20 } else { 12 });
    }
    if let (Some(w), Some(h)) = (tile_w, tile_h) {
        ifd.tile = Some((w, h));
    }
    if ifd.width == 0 || ifd.height == 0 {
        return Err("the image has no width or height".into());
    }
    if ifd.bits.is_empty() {
        ifd.bits = vec![1];
    }
    Ok(ifd)
}

/// Width and height from the first IFD, for any TIFF (BigTIFF included).
pub fn header_size(bytes: &[u8]) -> Result<(u32, u32), String> {
    first_ifd(bytes).map(|i| (i.width, i.height))
}

/// Does the `image` crate's TIFF path need to be bypassed for this file?
fn needs_own_reader(ifd: &Ifd) -> bool {
    ifd.photometric == 8 || ifd.bits.iter().any(|b| !matches!(b, 8 | 16))
}

/// Decode what `image` refused, bounded by `max_pixels`.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    let ifd = first_ifd(bytes)?;
    if ifd.width as u64 * ifd.height as u64 > max_pixels {
        return Err(format!("{}x{} is more pixels than image.max_pixels", ifd.width, ifd.height));
    }
    if needs_own_reader(&ifd) {
        return own(bytes, &ifd);
    }
    if ifd.photometric == 6 {
        return ycbcr(bytes, &ifd);
    }
    Err(format!(
        "unsupported TIFF (photometric {}, {} bits, compression {})",
        ifd.photometric,
        ifd.bits.first().copied().unwrap_or(0),
        ifd.compression
    ))
}

/// YCbCr (JPEG-compressed TIFFs): the `tiff` crate decodes and upsamples it; we convert with
/// the JFIF full-range matrix, as libjpeg does for JPEG-in-TIFF.
fn ycbcr(bytes: &[u8], ifd: &Ifd) -> Result<RgbImage, String> {
    let mut d = tiff::decoder::Decoder::new(Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let tiff::decoder::DecodingResult::U8(data) = d.read_image().map_err(|e| e.to_string())? else {
        return Err("YCbCr TIFF with more than 8 bits per sample".into());
    };
    let n = ifd.width as usize * ifd.height as usize;
    if data.len() < n * 3 {
        return Err(format!("YCbCr TIFF decoded to {} bytes, expected {}", data.len(), n * 3));
    }
    let mut out = RgbImage::new(ifd.width, ifd.height);
    for (px, s) in out.pixels_mut().zip(data.chunks_exact(3)) {
        let (y, cb, cr) = (s[0] as f32, s[1] as f32 - 128.0, s[2] as f32 - 128.0);
        let c = |v: f32| v.round().clamp(0.0, 255.0) as u8;
        px.0 = [c(y + 1.402 * cr), c(y - 0.344_136 * cb - 0.714_136 * cr), c(y + 1.772 * cb)];
    }
    Ok(out)
}

/// Decompress one strip or tile.
fn inflate(compression: u16, src: &[u8], expected: usize) -> Result<Vec<u8>, String> {
    let mut out = match compression {
        1 => src.to_vec(),
        5 => {
            let mut dec = weezl::decode::Decoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
            let mut out = Vec::with_capacity(expected);
            let r = dec.into_vec(&mut out).decode(src);
            // A strip may end without an end code; what came out is what there is.
            if let Err(e) = r.status {
                if out.len() < expected {
                    return Err(format!("LZW: {e}"));
                }
            }
            out
        }
        8 | 32946 => {
            let mut out = Vec::with_capacity(expected);
            flate2::read::ZlibDecoder::new(src).take(expected as u64).read_to_end(&mut out).map_err(|e| format!("Deflate: {e}"))?;
            out
        }
        32773 => {
            let mut out = Vec::with_capacity(expected);
            let mut i = 0;
            while i < src.len() && out.len() < expected {
                let n = src[i] as i8;
                i += 1;
                if n >= 0 {
                    let len = n as usize + 1;
                    out.extend_from_slice(src.get(i..i + len).ok_or("PackBits: literal run past the end")?);
                    i += len;
                } else if n != -128 {
                    let v = *src.get(i).ok_or("PackBits: repeat past the end")?;
                    out.extend(std::iter::repeat_n(v, 1 - n as isize as usize));
                    i += 1;
                }
            }
            out
        }
        c => return Err(format!("TIFF compression {c} is not supported for this sample layout")),
    };
    if out.len() < expected {
        return Err(format!("a strip decompressed to {} bytes, expected {expected}", out.len()));
    }
    out.truncate(expected);
    Ok(out)
}

/// Strips or tiles, chunky or planar, samples of 1–16 bits (MSB-first packing, rows padded to a
/// byte), scaled to 8 bits; gray, RGB or CIELab to RGB.
fn own(bytes: &[u8], ifd: &Ifd) -> Result<RgbImage, String> {
    let bits = ifd.bits[0] as u32;
    if ifd.bits.iter().any(|&b| b as u32 != bits) || !(1..=16).contains(&bits) {
        return Err(format!("TIFF with {:?} bits per sample is not supported", ifd.bits));
    }
    if ifd.sample_format != 1 && !(ifd.photometric == 8 && ifd.sample_format == 2) {
        return Err(format!("TIFF sample format {} is not supported at {bits} bits", ifd.sample_format));
    }
    if ifd.predictor != 1 {
        return Err(format!("TIFF predictor {} is not supported at {bits} bits", ifd.predictor));
    }
    let color = match ifd.photometric {
        0 | 1 => 1usize,
        2 | 8 => 3,
        p => return Err(format!("TIFF photometric interpretation {p} is not supported at {bits} bits")),
    };
    let spp = ifd.samples as usize;
    if spp < color {
        return Err(format!("{spp} samples per pixel for a {color}-channel image"));
    }
    let planar = ifd.planar == 2;
    let (w, h) = (ifd.width as usize, ifd.height as usize);
    let (cw, ch) = match ifd.tile {
        Some((tw, th)) => (tw as usize, th as usize),
        None => (w, (ifd.rows_per_strip as usize).clamp(1, h)),
    };
    if cw == 0 || ch == 0 {
        return Err("zero tile size".into());
    }
    let across = w.div_ceil(cw);
    let down = h.div_ceil(ch);
    let per_plane = across * down;
    let planes = if planar { spp } else { 1 };
    if ifd.offsets.len() < per_plane * planes || ifd.counts.len() < ifd.offsets.len() {
        return Err(format!("{} strips/tiles listed, {} needed", ifd.offsets.len().min(ifd.counts.len()), per_plane * planes));
    }
    let r = Reader { b: bytes, le: bytes[0] == b'I' };
    let chunk_spp = if planar { 1 } else { spp };
    let row_bytes = (cw * chunk_spp * bits as usize).div_ceil(8);
    // 8-bit samples per channel: full scale to 0..=255; CIELab a*/b* offset by 128.
    let mut samples = vec![0u8; w * h * color];
    let max = ((1u32 << bits) - 1) as f32;
    let lab = ifd.photometric == 8;
    for plane in 0..planes {
        if planar && plane >= color {
            break; // alpha / extra planes
        }
        for cy in 0..down {
            for cx in 0..across {
                let idx = plane * per_plane + cy * across + cx;
                // Strips at the bottom may hold fewer rows; tiles are always full size.
                let rows = if ifd.tile.is_some() { ch } else { ch.min(h - cy * ch) };
                let raw = r.bytes(ifd.offsets[idx], ifd.counts[idx] as usize)?;
                let data = inflate(ifd.compression, raw, row_bytes * rows)?;
                for y in 0..rows {
                    let iy = cy * ch + y;
                    if iy >= h {
                        break;
                    }
                    let row = &data[y * row_bytes..(y + 1) * row_bytes];
                    for x in 0..cw {
                        let ix = cx * cw + x;
                        if ix >= w {
                            break;
                        }
                        for s in 0..chunk_spp {
                            let channel = if planar { plane } else { s };
                            if channel >= color {
                                continue;
                            }
                            let i = (x * chunk_spp + s) * bits as usize;
                            let v = if bits == 16 {
                                let pair = [row[i / 8], row[i / 8 + 1]];
                                (if r.le { u16::from_le_bytes(pair) } else { u16::from_be_bytes(pair) }) as u32
                            } else {
                                read_bits(row, i, bits)
                            };
                            // CIELab a* and b* are signed (two's complement at the sample depth).
                            let value = if lab && channel > 0 && bits >= 8 {
                                let signed = if v >= 1 << (bits - 1) { v as i32 - (1 << bits) } else { v as i32 };
                                ((signed >> (bits - 8)) + 128).clamp(0, 255) as u8
                            } else {
                                (v as f32 * 255.0 / max).round() as u8
                            };
                            samples[(iy * w + ix) * color + channel] = value;
                        }
                    }
                }
            }
        }
    }
    if lab && bits < 8 {
        return Err(format!("CIELab TIFF at {bits} bits per sample is not supported"));
    }
    if color == 3 && !lab {
        return RgbImage::from_raw(ifd.width, ifd.height, samples).ok_or_else(|| "buffer size".to_string());
    }
    let mut out = RgbImage::new(ifd.width, ifd.height);
    for (px, s) in out.pixels_mut().zip(samples.chunks_exact(color)) {
        px.0 = match ifd.photometric {
            0 => [255 - s[0]; 3],
            1 => [s[0]; 3],
            _ => lab_to_srgb(s[0] as f32 * 100.0 / 255.0, s[1] as f32 - 128.0, s[2] as f32 - 128.0),
        };
    }
    Ok(out)
}

/// `bits` bits at bit offset `at`, most significant first.
fn read_bits(row: &[u8], at: usize, bits: u32) -> u32 {
    let mut v = 0u32;
    for k in 0..bits as usize {
        let bit = at + k;
        v = (v << 1) | ((row[bit / 8] >> (7 - bit % 8)) & 1) as u32;
    }
    v
}

/// CIE L*a*b* (D65 white, as PIL's and sRGB's) to 8-bit sRGB.
fn lab_to_srgb(l: f32, a: f32, b: f32) -> [u8; 3] {
    let fy = (l + 16.0) / 116.0;
    let fx = fy + a / 500.0;
    let fz = fy - b / 200.0;
    let finv = |t: f32| if t > 6.0 / 29.0 { t * t * t } else { 3.0 * (6.0f32 / 29.0).powi(2) * (t - 4.0 / 29.0) };
    let (x, y, z) = (0.950_47 * finv(fx), finv(fy), 1.088_83 * finv(fz));
    let lin = [
        3.240_454_2 * x - 1.537_138_5 * y - 0.498_531_4 * z,
        -0.969_266 * x + 1.876_010_8 * y + 0.041_556 * z,
        0.055_643_4 * x - 0.204_025_9 * y + 1.057_225_2 * z,
    ];
    lin.map(|c| {
        let c = c.clamp(0.0, 1.0);
        let s = if c <= 0.003_130_8 { 12.92 * c } else { 1.055 * c.powf(1.0 / 2.4) - 0.055 };
        (s * 255.0).round() as u8
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_read_msb_first() {
        // 0xABC, 0x123 packed in 3 bytes.
        let row = [0xAB, 0xC1, 0x23];
        assert_eq!(read_bits(&row, 0, 12), 0xABC);
        assert_eq!(read_bits(&row, 12, 12), 0x123);
        assert_eq!(read_bits(&row, 0, 4), 0xA);
    }

    #[test]
    fn lab_white_black_and_red() {
        assert_eq!(lab_to_srgb(100.0, 0.0, 0.0), [255, 255, 255]);
        assert_eq!(lab_to_srgb(0.0, 0.0, 0.0), [0, 0, 0]);
        // sRGB red is L 53.24, a 80.09, b 67.20 (D65).
        let r = lab_to_srgb(53.24, 80.09, 67.20);
        assert!(r[0] >= 253 && r[1] <= 3 && r[2] <= 3, "{r:?}");
    }

    #[test]
    fn damaged_headers_are_errors_not_panics() {
        assert!(first_ifd(b"II*\0\xff\xff\xff\x7f").is_err());
        assert!(first_ifd(b"II+\0\x08\0\0\0").is_err());
        let mut f = b"II*\0\x08\0\0\0".to_vec();
        f.extend_from_slice(&[1, 0, 0x11, 0x01, 4, 0, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0]);
        assert!(first_ifd(&f).is_err());
    }
}
