//! Shapeworld: procedural images whose truth is known. Each sample is 1–4 shapes (kind, colour,
//! size, position, depth order) on a background, with a class mask, a depth map, a dense true
//! caption and a web-like alt-text drawn from a recorded noise model. Everything follows from
//! (seed, index), so a world is reproducible bit for bit.

use std::io::Write;
use std::path::Path;

use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
pub const COLORS: [(&str, [u8; 3]); 7] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [240, 140, 30]),
    ("white", [245, 245, 245]),
];
pub const BACKGROUNDS: [(&str, [u8; 3]); 4] =
    [("gray", [128, 128, 128]), ("black", [20, 20, 24]), ("beige", [215, 200, 170]), ("teal", [30, 110, 110])];
pub const SIZES: [(&str, f32); 3] = [("small", 0.12), ("medium", 0.2), ("large", 0.3)];
pub const NOISE_KINDS: [&str; 6] = ["clean", "partial", "wrong_attribute", "unrelated", "spam", "filename"];

/// One shape in a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: String,
    pub color: String,
    pub size: String,
    /// Where its centre is: left, center or right; top, middle or bottom.
    pub position: String,
    /// Centre in pixels.
    pub cx: f32,
    pub cy: f32,
    /// Half-extent in pixels.
    pub radius: f32,
    /// Distance from the camera in metres (the depth map's unit); nearer shapes occlude farther.
    pub depth: f32,
}

/// A sample's truth, one JSON line of `samples.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: u64,
    /// Image path relative to the world directory.
    pub file: String,
    pub mask: String,
    pub depth: String,
    pub width: u32,
    pub height: u32,
    pub background: String,
    /// Front to back.
    pub objects: Vec<Object>,
    /// Dense, true description.
    pub caption: String,
    /// Web-like alt-text.
    pub alt_text: String,
    /// Which noise made the alt-text (one of [`NOISE_KINDS`]).
    pub noise: String,
    /// The image file is deliberately corrupt (undecodable).
    pub corrupt: bool,
    /// A planted duplicate: the id of the sample whose scene it shows (`WorldSpec::duplicates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<u64>,
    /// `exact` (the same file bytes) or `near` (the scene re-encoded at another JPEG quality,
    /// slightly brighter: another SHA-256, a phash a few bits away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<String>,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldSpec {
    pub count: u64,
    pub seed: u64,
    /// Smallest and largest image sizes; each sample draws a scale between them (aspect kept).
    pub min_size: (u32, u32),
    pub max_size: (u32, u32),
    /// Fraction of images written as PNG (the rest JPEG).
    pub png_fraction: f64,
    /// Number of samples whose file is corrupt.
    pub corrupt: u64,
    /// Weights of the alt-text noise kinds, in [`NOISE_KINDS`] order.
    pub noise_weights: [f64; 6],
    /// The last this-many samples are duplicates of earlier ones, alternately exact (the same
    /// bytes and alt-text: a repost) and near (re-encoded, its own alt-text): what `recap dedup`
    /// should find.
    pub duplicates: u64,
    /// Photo-like files: the scene under uneven light with fine texture and sensor-like noise,
    /// so JPEGs carry a real photo's entropy (a bench web; masks, depth and eval rows are the
    /// clean scene's).
    pub photo: bool,
}

impl Default for WorldSpec {
    fn default() -> Self {
        WorldSpec {
            count: 100,
            seed: 0,
            min_size: (200, 150),
            max_size: (1600, 1200),
            png_fraction: 0.1,
            corrupt: 0,
            noise_weights: [0.3, 0.2, 0.2, 0.1, 0.1, 0.1],
            duplicates: 0,
            photo: false,
        }
    }
}

impl WorldSpec {
    /// Parse `clean=0.3,partial=0.2,...` (missing kinds get 0).
    pub fn parse_noise(s: &str) -> std::result::Result<[f64; 6], String> {
        let mut w = [0.0; 6];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected kind=weight"))?;
            let i = NOISE_KINDS
                .iter()
                .position(|n| *n == k.trim())
                .ok_or_else(|| format!("unknown noise kind {k:?}; expected one of {}", NOISE_KINDS.join(", ")))?;
            w[i] = v.trim().parse().map_err(|_| format!("{v:?} is not a number"))?;
        }
        if w.iter().sum::<f64>() <= 0.0 {
            return Err("noise weights sum to zero".into());
        }
        Ok(w)
    }
}

fn rng_for(seed: u64, id: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(stream);
    r
}

fn describe(o: &Object) -> String {
    format!("a {} {} {} at the {}", o.size, o.color, o.shape, o.position)
}

fn caption(objects: &[Object], background: &str) -> String {
    let parts: Vec<String> = objects.iter().map(describe).collect();
    let list = match parts.len() {
        1 => parts[0].clone(),
        _ => format!("{} and {}", parts[..parts.len() - 1].join(", "), parts[parts.len() - 1]),
    };
    format!("{list}, on a {background} background")
}

fn random_objects(rng: &mut ChaCha8Rng, w: u32, h: u32) -> Vec<Object> {
    let n = rng.random_range(1..=4);
    let mut objects: Vec<Object> = (0..n)
        .map(|_| {
            let shape = SHAPES[rng.random_range(0..SHAPES.len())];
            let color = COLORS[rng.random_range(0..COLORS.len())].0;
            let (size, frac) = SIZES[rng.random_range(0..SIZES.len())];
            let radius = frac * w.min(h) as f32;
            let cx = rng.random_range(radius.min(w as f32 / 2.0)..=(w as f32 - radius).max(w as f32 / 2.0));
            let cy = rng.random_range(radius.min(h as f32 / 2.0)..=(h as f32 - radius).max(h as f32 / 2.0));
            let col = ["left", "center", "right"][((cx / w as f32 * 3.0) as usize).min(2)];
            let row = ["top", "middle", "bottom"][((cy / h as f32 * 3.0) as usize).min(2)];
            let position = if row == "middle" && col == "center" { "center".to_string() } else { format!("{row} {col}") };
            Object {
                shape: shape.into(),
                color: color.into(),
                size: size.into(),
                position,
                cx,
                cy,
                radius,
                depth: rng.random_range(1.0..9.0),
            }
        })
        .collect();
    objects.sort_by(|a, b| a.depth.partial_cmp(&b.depth).unwrap_or(std::cmp::Ordering::Equal));
    objects
}

fn alt_text(rng: &mut ChaCha8Rng, noise: &str, objects: &[Object], background: &str, id: u64) -> String {
    match noise {
        "clean" => {
            let names: Vec<String> = objects.iter().map(|o| format!("{} {}", o.color, o.shape)).collect();
            names.join(" and ")
        }
        "partial" => {
            let o = &objects[rng.random_range(0..objects.len())];
            format!("{} {}", o.color, o.shape)
        }
        "wrong_attribute" => {
            let mut objs = objects.to_vec();
            let i = rng.random_range(0..objs.len());
            if rng.random_bool(0.5) {
                let others: Vec<&str> = COLORS.iter().map(|c| c.0).filter(|c| *c != objs[i].color).collect();
                objs[i].color = others[rng.random_range(0..others.len())].to_string();
            } else {
                let others: Vec<&str> = SHAPES.iter().copied().filter(|s| *s != objs[i].shape).collect();
                objs[i].shape = others[rng.random_range(0..others.len())].to_string();
            }
            let names: Vec<String> = objs.iter().map(|o| format!("{} {}", o.color, o.shape)).collect();
            names.join(" and ")
        }
        "unrelated" => {
            let other = random_objects(rng, 100, 100);
            let bg = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())].0;
            let _ = background;
            caption(&other, bg)
        }
        "spam" => {
            const SPAM: [&str; 4] = [
                "BEST DEALS on wall art!!! free shipping, click here",
                "buy now cheap posters 50% off limited offer",
                "download free wallpapers hd 4k no signup",
                "top 10 shapes you won't believe #7",
            ];
            SPAM[rng.random_range(0..SPAM.len())].to_string()
        }
        _ => {
            const PREFIX: [&str; 3] = ["IMG_", "DSC", "photo-"];
            let ext = if rng.random_bool(0.5) { "jpg" } else { "JPG" };
            format!("{}{:05}.{ext}", PREFIX[rng.random_range(0..PREFIX.len())], (id * 7919) % 100_000)
        }
    }
}

fn inside(shape: &str, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        "diamond" => dx.abs() + dy.abs() <= r,
        _ => {
            // Upward triangle inscribed in the radius.
            let top = -r;
            let bottom = r * 0.8;
            if dy < top || dy > bottom {
                return false;
            }
            let half = (dy - top) / (bottom - top) * r;
            dx.abs() <= half
        }
    }
}

/// Render a sample: RGB image, class mask (0 = background, 1 + shape index) and depth map (mm).
pub fn render(sample: &Sample) -> (RgbImage, GrayImage, ImageBuffer<Luma<u16>, Vec<u16>>) {
    let (w, h) = (sample.width, sample.height);
    let bg = BACKGROUNDS.iter().find(|b| b.0 == sample.background).map(|b| b.1).unwrap_or([128, 128, 128]);
    // A soft vertical gradient and a fixed texture, so the JPEGs are not trivially flat.
    let mut img = RgbImage::from_fn(w, h, |x, y| {
        let g = (y as f32 / h as f32 - 0.5) * 24.0;
        let t = (((x.wrapping_mul(73) ^ y.wrapping_mul(151)) & 7) as f32) - 3.5;
        Rgb(bg.map(|c| (c as f32 + g + t).clamp(0.0, 255.0) as u8))
    });
    let mut mask = GrayImage::new(w, h);
    let mut depth = ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(w, h, Luma([10_000]));
    // Paint back to front so nearer shapes cover farther ones.
    for o in sample.objects.iter().rev() {
        let color = COLORS.iter().find(|c| c.0 == o.color).map(|c| c.1).unwrap_or([255, 0, 0]);
        let class = 1 + SHAPES.iter().position(|s| *s == o.shape).unwrap_or(0) as u8;
        let x0 = (o.cx - o.radius).floor().max(0.0) as u32;
        let x1 = ((o.cx + o.radius).ceil() as u32).min(w.saturating_sub(1));
        let y0 = (o.cy - o.radius).floor().max(0.0) as u32;
        let y1 = ((o.cy + o.radius).ceil() as u32).min(h.saturating_sub(1));
        let d = (o.depth * 1000.0) as u16;
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = (x as f32 + 0.5 - o.cx, y as f32 + 0.5 - o.cy);
                if inside(&o.shape, dx, dy, o.radius) {
                    img.put_pixel(x, y, Rgb(color));
                    mask.put_pixel(x, y, Luma([class]));
                    depth.put_pixel(x, y, Luma([d]));
                }
            }
        }
    }
    (img, mask, depth)
}

/// The truth of sample `id` (no pixels).
pub fn sample(spec: &WorldSpec, id: u64) -> Sample {
    let mut rng = rng_for(spec.seed, id, 0);
    let t: f64 = rng.random_range(0.0..=1.0);
    let lerp = |a: u32, b: u32| (a as f64 + (b as f64 - a as f64) * t).round() as u32;
    let (w, h) = (lerp(spec.min_size.0, spec.max_size.0).max(8), lerp(spec.min_size.1, spec.max_size.1).max(8));
    let png = rng.random_bool(spec.png_fraction.clamp(0.0, 1.0));
    let background = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())].0.to_string();
    let objects = random_objects(&mut rng, w, h);
    let total: f64 = spec.noise_weights.iter().sum();
    let mut pick = rng.random_range(0.0..total);
    let mut noise = NOISE_KINDS[0];
    for (k, wgt) in NOISE_KINDS.iter().zip(spec.noise_weights) {
        if pick < wgt {
            noise = k;
            break;
        }
        pick -= wgt;
    }
    let mut text_rng = rng_for(spec.seed, id, 1);
    let alt = alt_text(&mut text_rng, noise, &objects, &background, id);
    // The corrupt samples are spread evenly through the world.
    let corrupt = spec.corrupt > 0 && (id * spec.corrupt / spec.count.max(1)) != ((id + 1) * spec.corrupt / spec.count.max(1));
    Sample {
        id,
        file: format!("images/{id:06}.{}", if png { "png" } else { "jpg" }),
        mask: format!("masks/{id:06}.png"),
        depth: format!("depth/{id:06}.png"),
        width: w,
        height: h,
        caption: caption(&objects, &background),
        background,
        objects,
        alt_text: alt,
        noise: noise.into(),
        corrupt,
        duplicate_of: None,
        duplicate: None,
    }
}

/// Sample `id`, planted as a duplicate when it is among the last `spec.duplicates`: the scene of
/// an earlier, non-corrupt sample (chosen by the seed), under its own name and alt-text.
pub fn planned_sample(spec: &WorldSpec, id: u64) -> Sample {
    let own = sample(spec, id);
    let base = spec.count.saturating_sub(spec.duplicates);
    if id < base || base == 0 {
        return own;
    }
    let mut rng = rng_for(spec.seed, id, 3);
    let mut src = rng.random_range(0..base);
    while sample(spec, src).corrupt {
        src = (src + 1) % base;
    }
    let mut s = sample(spec, src);
    let exact = (id - base).is_multiple_of(2);
    let ext = if exact { s.file.rsplit('.').next().unwrap_or("jpg").to_string() } else { "jpg".to_string() };
    s.id = id;
    s.file = format!("images/{id:06}.{ext}");
    s.mask = format!("masks/{id:06}.png");
    s.depth = format!("depth/{id:06}.png");
    // An exact copy is a repost (same image, same alt-text); a near copy carries its own alt-text.
    if !exact {
        s.alt_text = own.alt_text;
        s.noise = own.noise;
    }
    s.corrupt = false;
    s.duplicate_of = Some(src);
    s.duplicate = Some(if exact { "exact" } else { "near" }.to_string());
    s
}

/// Encode a rendered sample's image as its file format (or corrupt bytes).
pub fn image_bytes(sample: &Sample, img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if sample.duplicate.as_deref() == Some("near") {
        let brighter = RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y).0;
            image::Rgb(p.map(|c| c.saturating_add(6)))
        });
        jpeg_encoder::Encoder::new(&mut out, 70)
            .encode(brighter.as_raw(), img.width() as u16, img.height() as u16, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| Error::Internal(format!("jpeg encode: {e}")))?;
        return Ok(out);
    }
    if sample.file.ends_with(".png") {
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new_with_quality(
            &mut out,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Sub,
        )
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Internal(format!("png encode: {e}")))?;
    } else {
        jpeg_encoder::Encoder::new(&mut out, 90)
            .encode(img.as_raw(), img.width() as u16, img.height() as u16, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| Error::Internal(format!("jpeg encode: {e}")))?;
    }
    if sample.corrupt {
        // Keep the magic bytes so the server and sniffers see "an image", then garbage.
        let mut rng = rng_for(0, sample.id, 2);
        let keep = 4.min(out.len());
        out.truncate(keep);
        out.extend((0..2048).map(|_| rng.random::<u8>()));
    }
    Ok(out)
}

/// The scene as a camera would give it: a smooth light falloff across the frame, two faint
/// oriented textures and per-pixel noise (σ ≈ 3 levels, per channel). The JPEG at
/// quality 90 is ~1.9 bits per pixel, as web photos are, against ~0.2 for the flat scene.
pub fn photo_like(img: &RgbImage, seed: u64, id: u64) -> RgbImage {
    let mut rng = rng_for(seed, id, 4);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let (cx, cy) = (rng.random_range(0.2..0.8) * w, rng.random_range(0.2..0.8) * h);
    let f1 = (rng.random_range(0.05f32..0.3), rng.random_range(0.05f32..0.3));
    let f2 = (rng.random_range(0.3f32..0.9), rng.random_range(-0.9f32..-0.3));
    let mut state = rng.random::<u64>() | 1;
    let diag2 = w * w + h * h;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let light = 1.15 - 0.45 * ((xf - cx).powi(2) + (yf - cy).powi(2)) / diag2;
        let texture = 6.0 * (xf * f1.0 + yf * f1.1).sin() + 4.0 * (xf * f2.0 + yf * f2.1).sin();
        let p = img.get_pixel(x, y).0;
        image::Rgb(std::array::from_fn(|c| {
            // xorshift64*: cheap per-pixel noise; a sum of four uniforms is near-Gaussian.
            let mut noise = 0.0f32;
            for _ in 0..4 {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                noise += (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            (p[c] as f32 * light + texture + noise * 5.0).clamp(0.0, 255.0) as u8
        }))
    })
}

/// Write a world: images, masks, depth maps and `samples.jsonl`, rendering on all cores.
pub fn generate(dir: &Path, spec: &WorldSpec) -> Result<Vec<Sample>> {
    use rayon::prelude::*;
    for sub in ["images", "masks", "depth"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io("cannot create", &d, e))?;
    }
    let made: Vec<(Sample, Option<EvalRow>)> = (0..spec.count)
        .into_par_iter()
        .map(|id| -> Result<(Sample, Option<EvalRow>)> {
            let s = planned_sample(spec, id);
            let (img, mask, depth) = render(&s);
            let bytes = if spec.photo { image_bytes(&s, &photo_like(&img, spec.seed, id))? } else { image_bytes(&s, &img)? };
            let eval = if s.corrupt { None } else { Some(eval_row(&img, &mask, &depth)?) };
            let p = dir.join(&s.file);
            std::fs::write(&p, bytes).map_err(|e| Error::io("cannot write", &p, e))?;
            let mp = dir.join(&s.mask);
            mask.save(&mp).map_err(|e| Error::Internal(format!("{}: {e}", mp.display())))?;
            let dp = dir.join(&s.depth);
            depth.save(&dp).map_err(|e| Error::Internal(format!("{}: {e}", dp.display())))?;
            Ok((s, eval))
        })
        .collect::<Result<_>>()?;
    write_eval(&dir.join("eval.parquet"), &made)?;
    write_dense(&dir.join("dense.parquet"), &made)?;
    let samples: Vec<Sample> = made.into_iter().map(|(s, _)| s).collect();
    let path = dir.join("samples.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| Error::io("cannot create", &path, e))?);
    for s in &samples {
        serde_json::to_writer(&mut f, s).map_err(|e| Error::Internal(e.to_string()))?;
        f.write_all(b"\n").map_err(|e| Error::io("cannot write", &path, e))?;
    }
    f.flush().map_err(|e| Error::io("cannot write", &path, e))?;
    let spec_path = dir.join("world.json");
    let spec_json = serde_json::json!({
        "count": spec.count, "seed": spec.seed, "min_size": spec.min_size, "max_size": spec.max_size,
        "png_fraction": spec.png_fraction, "corrupt": spec.corrupt, "duplicates": spec.duplicates, "photo": spec.photo,
        "noise": NOISE_KINDS.iter().zip(spec.noise_weights).map(|(k, w)| (k.to_string(), w)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec_json).expect("json")).map_err(|e| Error::io("cannot write", &spec_path, e))?;
    Ok(samples)
}

/// Longer side of the images in `eval.parquet`.
pub const EVAL_SIDE: u32 = 256;

/// A sample as the evaluation sets hold it: the image with its aspect kept and its longer side at
/// most [`EVAL_SIDE`] (JPEG quality 90), and its mask and depth map resized to match (nearest:
/// labels are not blended), as PNGs.
struct EvalRow {
    image: Vec<u8>,
    mask: Vec<u8>,
    depth: Vec<u8>,
}

fn eval_row(img: &RgbImage, mask: &GrayImage, depth: &ImageBuffer<Luma<u16>, Vec<u16>>) -> Result<EvalRow> {
    let (w, h) = img.dimensions();
    let scale = (EVAL_SIDE as f32 / w.max(h) as f32).min(1.0);
    let (nw, nh) = (((w as f32 * scale).round() as u32).max(1), ((h as f32 * scale).round() as u32).max(1));
    let small = crate::imaging::resize_rgb(img, nw, nh, None, crate::config::model::ResizeFilter::Box).map_err(Error::Internal)?;
    let mut image = Vec::new();
    jpeg_encoder::Encoder::new(&mut image, 90)
        .encode(small.as_raw(), nw as u16, nh as u16, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| Error::Internal(format!("jpeg encode: {e}")))?;
    let nearest = image::imageops::FilterType::Nearest;
    let m = image::imageops::resize(mask, nw, nh, nearest);
    let d = image::imageops::resize(depth, nw, nh, nearest);
    let m: Vec<u32> = m.into_raw().into_iter().map(u32::from).collect();
    Ok(EvalRow { image, mask: crate::train::dense::encode_mask(&m, nw, nh)?, depth: crate::train::dense::encode_depth(d.as_raw(), nw, nh)? })
}

/// The world's dense dataset (`dense.parquet`, layout in `recap::train::dense`): every
/// non-corrupt sample with its class mask (background and the four shapes) and depth map
/// (millimetres; the background wall at 10 m).
fn write_dense(path: &Path, made: &[(Sample, Option<EvalRow>)]) -> Result<()> {
    use crate::train::dense::{write_dense_set, DenseSpec};
    let mut classes = vec!["background".to_string()];
    classes.extend(SHAPES.iter().map(|s| s.to_string()));
    let spec = DenseSpec { version: 1, classes, ignore_index: None, depth_scale: 0.001, depth_unit: Some("mm".into()) };
    let rows: Vec<(Vec<u8>, String, Option<Vec<u8>>, Option<Vec<u8>>)> =
        made.iter().filter_map(|(s, e)| e.as_ref().map(|e| (e.image.clone(), s.file.clone(), Some(e.mask.clone()), Some(e.depth.clone())))).collect();
    write_dense_set(path, &spec, &rows)
}

/// The world's evaluation set (`eval.parquet`, layout in `recap::train::eval`): tasks `shape`
/// and `color` on images with one object, `background` and `count` on all, and the true
/// captions for retrieval. Corrupt samples are left out.
fn write_eval(path: &Path, made: &[(Sample, Option<EvalRow>)]) -> Result<()> {
    use crate::train::eval::{write_eval_set, EvalSpec, TaskSpec};
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let counts = ["one shape", "two shapes", "three shapes", "four shapes"];
    let spec = EvalSpec {
        version: 1,
        tasks: vec![
            TaskSpec { name: "shape".into(), classes: strs(&SHAPES), templates: strs(&["a {}.", "a photo of a {}.", "a {} on a background.", "a picture of a {} shape."]) },
            TaskSpec {
                name: "color".into(),
                classes: strs(&COLORS.map(|c| c.0)),
                templates: strs(&["a {} shape.", "a photo of a {} shape.", "a {} object.", "something {}."]),
            },
            TaskSpec {
                name: "background".into(),
                classes: strs(&BACKGROUNDS.map(|c| c.0)),
                templates: strs(&["a shape on a {} background.", "a photo with a {} background.", "on a {} background.", "something on a {} background."]),
            },
            TaskSpec { name: "count".into(), classes: strs(&counts), templates: strs(&["{}.", "a picture of {}.", "an image with {}.", "{} on a background."]) },
        ],
        caption_column: Some("caption".into()),
    };
    let kept: Vec<(&Sample, &Vec<u8>)> = made.iter().filter_map(|(s, e)| e.as_ref().map(|e| (s, &e.image))).collect();
    let idx = |list: &[&str], x: &str| list.iter().position(|c| *c == x).map(|i| i as u32);
    let single = |s: &Sample| s.objects.len() == 1;
    let labels = vec![
        kept.iter().map(|(s, _)| if single(s) { idx(&SHAPES, &s.objects[0].shape) } else { None }).collect(),
        kept.iter().map(|(s, _)| if single(s) { idx(&COLORS.map(|c| c.0), &s.objects[0].color) } else { None }).collect(),
        kept.iter().map(|(s, _)| idx(&BACKGROUNDS.map(|c| c.0), &s.background)).collect(),
        kept.iter().map(|(s, _)| (s.objects.len() as u32).checked_sub(1).filter(|c| *c < 4)).collect(),
    ];
    let images: Vec<(Vec<u8>, String)> = kept.iter().map(|(s, e)| ((*e).clone(), s.file.clone())).collect();
    let captions: Vec<Option<String>> = kept.iter().map(|(s, _)| Some(s.caption.clone())).collect();
    write_eval_set(path, &spec, &images, &labels, Some(&captions))
}

/// Read `samples.jsonl` back.
pub fn load_samples(dir: &Path) -> Result<Vec<Sample>> {
    let path = dir.join("samples.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("cannot read", &path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::input(&path, e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_masks_match_objects() {
        let spec = WorldSpec { count: 10, seed: 7, min_size: (64, 48), max_size: (128, 96), ..Default::default() };
        assert_eq!(sample(&spec, 3), sample(&spec, 3));
        assert_ne!(sample(&spec, 3), sample(&spec, 4));
        let s = sample(&spec, 3);
        let (img, mask, depth) = render(&s);
        assert_eq!(img.dimensions(), (s.width, s.height));
        let front = &s.objects[0];
        let (x, y) = (front.cx as u32, front.cy as u32);
        assert_eq!(mask.get_pixel(x, y).0[0], 1 + SHAPES.iter().position(|k| *k == front.shape).unwrap() as u8);
        assert_eq!(depth.get_pixel(x, y).0[0], (front.depth * 1000.0) as u16);
        assert!(s.caption.contains(&front.color));
    }
}
