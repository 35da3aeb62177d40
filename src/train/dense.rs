//! Dense datasets: images with a segmentation mask and a depth map, for finetuning and
//! evaluating dense heads on a student.
//!
//! Layout (one Parquet file):
//! - `image`: struct {bytes, path}, the encoded image (as in shards),
//! - `mask`: binary, a PNG (8- or 16-bit grey) holding one class index per pixel, the image's size;
//!   null when the row has no segmentation label,
//! - `depth`: binary, a 16-bit grey PNG of depth in units of `depth_scale` metres, the image's
//!   size, 0 = no measurement; null when the row has no depth label,
//! - file metadata `recap.dense`: `{"version": 1, "classes": [...], "ignore_index": 255 | null,
//!   "depth_scale": 0.001, "depth_unit": "mm"}`.
//!
//! `recap synth` writes `dense.parquet` for every world; `tools/dense_from_folders.py` converts
//! ADE20K-style (image + index-PNG folders) and NYUv2-style (image + depth-PNG folders) trees.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, StringArray, StructArray};
use arrow::datatypes::{DataType, Field};
use image::{ImageBuffer, Luma};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `recap.dense` metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseSpec {
    pub version: u32,
    /// Class names, by index.
    pub classes: Vec<String>,
    /// A mask value that marks unlabelled pixels (ADE20K: 255 after shifting), if any.
    #[serde(default)]
    pub ignore_index: Option<u32>,
    /// Metres per unit of the depth PNGs (0.001 for millimetres).
    #[serde(default = "default_depth_scale")]
    pub depth_scale: f64,
    #[serde(default)]
    pub depth_unit: Option<String>,
}

fn default_depth_scale() -> f64 {
    0.001
}

/// One labelled image, decoded.
#[derive(Debug, Clone)]
pub struct DenseRow {
    pub image: Vec<u8>,
    pub path: String,
    /// Class index per pixel (row-major, the image's size).
    pub mask: Option<Vec<u32>>,
    /// Depth in metres per pixel; 0 = no measurement.
    pub depth: Option<Vec<f32>>,
    pub width: u32,
    pub height: u32,
}

/// A dense dataset in memory (images stay encoded until used).
pub struct DenseSet {
    pub path: PathBuf,
    pub spec: DenseSpec,
    pub rows: Vec<DenseRow>,
}

fn bad(path: &Path, m: impl Into<String>) -> Error {
    Error::input(path, m.into())
}

/// Encode a class mask as an 8-bit PNG (16-bit when there are more than 256 classes).
pub fn encode_mask(mask: &[u32], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if mask.iter().all(|&c| c < 256) {
        let img = image::GrayImage::from_raw(w, h, mask.iter().map(|&c| c as u8).collect()).ok_or_else(|| Error::Internal("mask size".into()))?;
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).map_err(|e| Error::Internal(format!("mask png: {e}")))?;
    } else {
        let img = ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(w, h, mask.iter().map(|&c| c as u16).collect()).ok_or_else(|| Error::Internal("mask size".into()))?;
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).map_err(|e| Error::Internal(format!("mask png: {e}")))?;
    }
    Ok(out)
}

/// Encode depth (in PNG units) as a 16-bit PNG.
pub fn encode_depth(depth: &[u16], w: u32, h: u32) -> Result<Vec<u8>> {
    let img = ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(w, h, depth.to_vec()).ok_or_else(|| Error::Internal("depth size".into()))?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).map_err(|e| Error::Internal(format!("depth png: {e}")))?;
    Ok(out)
}

/// Write a dense dataset: (image bytes, path, mask PNG, depth PNG) per row.
pub fn write_dense_set(path: &Path, spec: &DenseSpec, rows: &[(Vec<u8>, String, Option<Vec<u8>>, Option<Vec<u8>>)]) -> Result<()> {
    let (image, column) = super::eval::image_column(rows.iter().map(|r| (r.0.as_slice(), r.1.as_str())))?;
    let fields = vec![image, Field::new("mask", DataType::Binary, true), Field::new("depth", DataType::Binary, true)];
    let cols: Vec<ArrayRef> = vec![
        column,
        Arc::new(rows.iter().map(|r| r.2.as_deref()).collect::<BinaryArray>()),
        Arc::new(rows.iter().map(|r| r.3.as_deref()).collect::<BinaryArray>()),
    ];
    super::eval::write_labelled(path, "recap.dense", spec, fields, cols)
}

impl DenseSet {
    /// Read and check a dense dataset: every mask and depth map decodes, has its image's size,
    /// and every class index is a declared class (or the ignore index).
    pub fn open(path: &Path) -> Result<DenseSet> {
        // A URL (s3://, gs://, az://, https://): the file is read from a local copy.
        let named = path;
        let local = crate::storage::local_file(path)?;
        let path = local.as_ref();
        if path.is_dir() {
            return Err(bad(path, "is a directory; expected one dense dataset file, as `recap synth` writes it (WORLD/dense.parquet) or tools/dense_from_folders.py makes from folders"));
        }
        let file = File::open(path).map_err(|e| Error::io("cannot open dense dataset", path, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(path, format!("not a readable Parquet file: {e}")))?;
        let raw = super::eval::file_metadata(&b, "recap.dense")
            .ok_or_else(|| bad(path, "has no recap.dense metadata; expected a dense dataset as `recap synth` or tools/dense_from_folders.py writes it"))?;
        let spec: DenseSpec = serde_json::from_str(&raw).map_err(|e| bad(path, format!("recap.dense metadata is not valid: {e}")))?;
        if spec.classes.is_empty() {
            return Err(bad(path, "recap.dense declares no classes"));
        }
        for c in ["image", "mask", "depth"] {
            if b.schema().field_with_name(c).is_err() {
                return Err(bad(path, format!("lacks the {c} column")));
            }
        }
        let reader = b.build().map_err(|e| bad(path, e.to_string()))?;
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| bad(path, format!("cannot read: {e}")))?;
            let img = batch.column_by_name("image").and_then(|c| c.as_any().downcast_ref::<StructArray>()).ok_or_else(|| bad(path, "image is not a struct"))?;
            let bytes = img.column_by_name("bytes").and_then(|c| c.as_any().downcast_ref::<BinaryArray>()).ok_or_else(|| bad(path, "image.bytes is not binary"))?;
            let paths = img.column_by_name("path").and_then(|c| c.as_any().downcast_ref::<StringArray>());
            let bin = |n: &str| batch.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<BinaryArray>()).ok_or_else(|| bad(path, format!("{n} is not binary")));
            let (masks, depths) = (bin("mask")?, bin("depth")?);
            for i in 0..batch.num_rows() {
                let row = rows.len();
                if bytes.is_null(i) {
                    return Err(bad(path, format!("row {row} has no image bytes")));
                }
                let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes.value(i)))
                    .with_guessed_format()
                    .ok()
                    .and_then(|r| r.into_dimensions().ok())
                    .ok_or_else(|| bad(path, format!("row {row}: the image does not decode")))?;
                let name = paths.filter(|p| !p.is_null(i)).map(|p| p.value(i).to_string()).unwrap_or_else(|| format!("row {row}"));
                let at = |what: &str| format!("row {row} ({name}): {what}");
                let mask = if masks.is_null(i) {
                    None
                } else {
                    let m = image::load_from_memory(masks.value(i)).map_err(|e| bad(path, at(&format!("the mask does not decode: {e}"))))?;
                    if (m.width(), m.height()) != (w, h) {
                        return Err(bad(path, at(&format!("the mask is {}x{}, the image {w}x{h}; expected the same size", m.width(), m.height()))));
                    }
                    let v: Vec<u32> = match m {
                        image::DynamicImage::ImageLuma8(g) => g.into_raw().into_iter().map(u32::from).collect(),
                        image::DynamicImage::ImageLuma16(g) => g.into_raw().into_iter().map(u32::from).collect(),
                        _ => return Err(bad(path, at("the mask is not an 8- or 16-bit grey PNG of class indices (a palette or colour PNG is not read as indices)"))),
                    };
                    if let Some(&c) = v.iter().find(|&&c| c as usize >= spec.classes.len() && Some(c) != spec.ignore_index) {
                        return Err(bad(
                            path,
                            at(&format!("mask value {c} is not a class: {} classes are declared (0..{}){}", spec.classes.len(), spec.classes.len() - 1, spec.ignore_index.map(|i| format!(", ignore index {i}")).unwrap_or_default())),
                        ));
                    }
                    Some(v)
                };
                let depth = if depths.is_null(i) {
                    None
                } else {
                    let d = image::load_from_memory(depths.value(i)).map_err(|e| bad(path, at(&format!("the depth map does not decode: {e}"))))?;
                    if (d.width(), d.height()) != (w, h) {
                        return Err(bad(path, at(&format!("the depth map is {}x{}, the image {w}x{h}; expected the same size", d.width(), d.height()))));
                    }
                    if !matches!(d, image::DynamicImage::ImageLuma16(_)) {
                        return Err(bad(path, at("the depth map is not a 16-bit grey PNG")));
                    }
                    Some(d.to_luma16().into_raw().into_iter().map(|v| (v as f64 * spec.depth_scale) as f32).collect())
                };
                rows.push(DenseRow { image: bytes.value(i).to_vec(), path: name, mask, depth, width: w, height: h });
            }
        }
        if rows.is_empty() {
            return Err(bad(path, "has no rows"));
        }
        Ok(DenseSet { path: named.to_path_buf(), spec, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(w, h).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    fn spec() -> DenseSpec {
        DenseSpec { version: 1, classes: vec!["bg".into(), "thing".into()], ignore_index: Some(255), depth_scale: 0.001, depth_unit: Some("mm".into()) }
    }

    #[test]
    fn a_dense_set_round_trips_and_bad_labels_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dense.parquet");
        let mask = encode_mask(&[0, 1, 255, 1, 0, 0], 3, 2).unwrap();
        let depth = encode_depth(&[1000, 2000, 0, 1500, 1000, 500], 3, 2).unwrap();
        write_dense_set(&p, &spec(), &[(png(3, 2), "a.png".into(), Some(mask.clone()), Some(depth.clone())), (png(3, 2), "b.png".into(), None, None)]).unwrap();
        let s = DenseSet::open(&p).unwrap();
        assert_eq!(s.rows.len(), 2);
        assert_eq!(s.rows[0].mask.as_deref(), Some(&[0, 1, 255, 1, 0, 0][..]));
        assert_eq!(s.rows[0].depth.as_ref().unwrap()[1], 2.0);
        assert!(s.rows[1].mask.is_none());
        // A class beyond the declared ones.
        let bad_mask = encode_mask(&[0, 2, 0, 0, 0, 0], 3, 2).unwrap();
        write_dense_set(&p, &spec(), &[(png(3, 2), "c.png".into(), Some(bad_mask), None)]).unwrap();
        let e = DenseSet::open(&p).err().unwrap().to_string();
        assert!(e.contains("row 0 (c.png): mask value 2 is not a class: 2 classes are declared"), "{e}");
        // A depth map of the wrong size.
        write_dense_set(&p, &spec(), &[(png(3, 2), "d.png".into(), Some(mask), Some(encode_depth(&[1; 4], 2, 2).unwrap()))]).unwrap();
        let e = DenseSet::open(&p).err().unwrap().to_string();
        assert!(e.contains("row 0 (d.png): the depth map is 2x2, the image 3x2"), "{e}");
    }
}
