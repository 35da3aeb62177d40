//! libjpeg-turbo (the decoder inside mozjpeg, built from source by `mozjpeg-sys`) for JPEG headers
//! and DCT-scaled decoding. libjpeg reports fatal errors by calling `error_exit`, which must not
//! return: ours unwinds with the formatted message, and [`run`] catches it at this boundary.
//! A premature end of the image data refuses the image, as PIL does unless told to load truncated
//! images (libjpeg would pad the missing rows with grey). A missing end-of-image marker reads the
//! same to libjpeg, and is refused too.

use std::cell::Cell;
use std::os::raw::c_int;

use image::metadata::Orientation;
use mozjpeg::ColorSpace as C;
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

thread_local! {
    static TRUNCATED: Cell<bool> = const { Cell::new(false) };
}

fn message(cinfo: &mut jpeg_common_struct) -> String {
    let mut buf = [0u8; 80];
    // SAFETY: `err` is the error manager libjpeg was created with, alive for the call.
    unsafe {
        if let Some(format) = (*cinfo.err).format_message {
            // libjpeg writes the message into the buffer, which the binding types as shared.
            type Writes = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]);
            let format: Writes = std::mem::transmute(format);
            format(cinfo, &mut buf);
        } else {
            buf[..4].copy_from_slice(b"code");
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let msg = message(cinfo);
    std::panic::resume_unwind(Box::new(msg));
}

extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as above.
    if level < 0 && unsafe { (*cinfo.err).msg_code } == JWRN_JPEG_EOF {
        TRUNCATED.with(|t| t.set(true));
    }
}

fn error_mgr() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of a zeroed manager (all fields are plain data or
    // nullable function pointers, for which zero is None).
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

/// Runs libjpeg, turning its errors (returned or unwound) into a message.
fn run<T>(f: impl FnOnce() -> std::io::Result<T>) -> Result<T, String> {
    TRUNCATED.with(|t| t.set(false));
    match crate::panics::quietly(f) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(message) => Err(message),
    }
}

extern "C" {
    /// libjpeg-turbo's SIMD dispatch: 1 when the inverse DCT runs on SIMD code, 0 when the
    /// library was built without it (`jsimd_none.c`: no nasm at build time) or the CPU lacks it.
    fn jsimd_can_idct_islow() -> c_int;
}

/// Does the linked libjpeg-turbo decode with SIMD? (It is built by mozjpeg-sys, with SIMD only
/// when `nasm` was found at build time: `scripts/native-env.sh` installs it.)
pub fn simd() -> bool {
    // SAFETY: a C function without arguments that reads CPU flags once and returns a flag.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// One line for `recap --version` and `recap validate`.
pub fn simd_note() -> &'static str {
    if simd() {
        "libjpeg-turbo with SIMD"
    } else {
        "libjpeg-turbo WITHOUT SIMD (nasm was missing at build time: JPEG decode ~2x slower; run scripts/native-env.sh, then `cargo clean -p mozjpeg-sys` and rebuild)"
    }
}

/// Width and height from the JPEG header.
pub fn header_size(bytes: &[u8]) -> Result<(u32, u32), String> {
    run(|| {
        let d = mozjpeg::Decompress::with_err(error_mgr()).from_mem(bytes)?;
        Ok((d.width() as u32, d.height() as u32))
    })
    .map_err(|e| {
        // What libjpeg says when a marker segment runs past the end of the data.
        if e.contains("Input file read error") {
            format!("the data ends inside the header, a damaged or cut file (libjpeg: {e})")
        } else {
            e
        }
    })
}

/// A JPEG decoded at `k`/8 of its size (k in 1..=8) to RGB, with its EXIF orientation; `None`
/// when the colour space needs the general decoder (CMYK, YCCK).
pub fn decode_scaled(bytes: &[u8], k: u32) -> Result<Option<(image::RgbImage, Orientation)>, String> {
    decode_scaled_opts(bytes, k, false, Vec::new())
}

/// [`decode_scaled`] with libjpeg's fast options when `fast` (merged chroma upsampling instead
/// of "fancy" triangle filtering, integer-fast IDCT): for benches/imaging.rs. The pixels are
/// written into `pixels` (cleared first), so that a caller can hand in a buffer it recycles.
pub fn decode_scaled_opts(
    bytes: &[u8],
    k: u32,
    fast: bool,
    mut pixels: Vec<u8>,
) -> Result<Option<(image::RgbImage, Orientation)>, String> {
    let decoded = run(move || {
        let mut d = mozjpeg::Decompress::with_err(error_mgr()).with_markers(&[mozjpeg::Marker::APP(1)]).from_mem(bytes)?;
        if !matches!(d.color_space(), C::JCS_YCbCr | C::JCS_GRAYSCALE | C::JCS_RGB) {
            return Ok(None);
        }
        let orientation = d
            .markers()
            .filter(|m| m.marker == mozjpeg::Marker::APP(1))
            .find_map(|m| m.data.strip_prefix(b"Exif\0\0").and_then(Orientation::from_exif_chunk))
            .unwrap_or(Orientation::NoTransforms);
        d.scale(k.clamp(1, 8) as u8);
        if fast {
            d.do_fancy_upsampling(false);
            d.dct_method(mozjpeg::DctMethod::IntegerFast);
        }
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let size = (w as usize) * (h as usize) * 3;
        pixels.clear();
        pixels.try_reserve_exact(size).map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        let read = started.read_scanlines_into_uninit::<u8>(&mut pixels.spare_capacity_mut()[..size])?.len();
        // SAFETY: libjpeg initialised the first `read` bytes of the spare capacity just above.
        unsafe { pixels.set_len(read) };
        // The data ran out before the last row: libjpeg warned and padded the rest.
        if TRUNCATED.with(|t| t.get()) {
            return Err(std::io::Error::other("premature end of JPEG data (truncated file)"));
        }
        if pixels.len() != size {
            let rows = pixels.len() / (w as usize * 3).max(1);
            return Err(std::io::Error::other(format!("image data ends after {rows} of {h} rows")));
        }
        // Bytes after the end-of-image marker are no reason to refuse the image.
        let _ = started.finish();
        Ok(Some((pixels, w, h, orientation)))
    })?;
    let Some((pixels, w, h, orientation)) = decoded else { return Ok(None) };
    let img = image::RgbImage::from_raw(w, h, pixels).ok_or("decoded buffer has the wrong size")?;
    Ok(Some((img, orientation)))
}

/// RGB to a baseline JPEG (4:2:0, standard Huffman tables) at `quality`, by libjpeg-turbo's
/// encoder with its SIMD colour conversion and DCT: the bytes libjpeg-turbo (and so OpenCV and
/// PIL) would write.
pub fn encode(img: &image::RgbImage, quality: u8) -> Result<Vec<u8>, String> {
    let (w, h) = img.dimensions();
    run(|| {
        let mut c = mozjpeg::Compress::new_err(Box::new(error_mgr()), C::JCS_RGB);
        // libjpeg v6 defaults (no trellis quantisation, no progressive scans): mozjpeg's own
        // defaults make smaller files at several times the CPU.
        c.set_fastest_defaults();
        c.set_size(w as usize, h as usize);
        c.set_quality(quality.clamp(1, 100) as f32);
        let mut started = c.start_compress(Vec::with_capacity((w * h / 4) as usize))?;
        started.write_scanlines(img.as_raw())?;
        started.finish()
    })
}

/// Whether a JPEG's marker structure runs to its end-of-image marker, read without decoding:
/// marker segments are skipped by their lengths (so an EXIF thumbnail's own markers are never
/// seen), and entropy-coded data is scanned for the next marker, where `FF 00` is a stuffed byte
/// and `FF D0..D7` restart markers. A cut file runs out first. This is what tells a truncated
/// file from a whole one for decoders that pad missing rows silently (zune-jpeg); libjpeg's
/// scaled path reports it by itself.
pub fn is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    loop {
        // Fill bytes (any number of FF) may precede a marker.
        while i < bytes.len() && bytes[i] != 0xFF {
            i += 1;
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else { return false };
        i += 1;
        match marker {
            0xD9 => return true,
            // Standalone markers, no length.
            0x01 | 0xD0..=0xD7 | 0xD8 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else { return false };
        if len < 2 || i + len > bytes.len() {
            return false;
        }
        i += len;
        if marker == 0xDA {
            // Entropy-coded data: runs until an FF that is neither stuffing nor a restart marker.
            loop {
                let Some(off) = bytes[i..].iter().position(|&b| b == 0xFF) else { return false };
                i += off;
                match bytes.get(i + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}
