//! Shapeworld and its test web: [`world`] generates images with known truth, [`serve`] serves
//! them over loopback HTTP with injected faults, and [`write_url_list`] writes the URL list a
//! pipeline reads, with the faults assigned to chosen rows.

pub mod serve;
pub mod world;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
pub use serve::{serve, ServeOptions, Server, FAULTS};
pub use world::{generate, load_samples, Sample, WorldSpec};

/// Parse `404=10,500=5` into fault counts.
pub fn parse_faults(s: &str) -> std::result::Result<Vec<(String, u64)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected fault=count, e.g. 404=10"))?;
        let k = k.trim();
        if !FAULTS.contains(&k) {
            return Err(format!("unknown fault {k:?}; expected one of {}", FAULTS.join(", ")));
        }
        out.push((k.to_string(), v.trim().parse().map_err(|_| format!("{v:?} is not a count"))?));
    }
    Ok(out)
}

/// Write `<dir>/urls.parquet`: one row per sample (`url`, `caption` = alt-text, `id`, `noise`,
/// `fault`, `true_caption`, `width`, `height`, `duplicate_of`: the sample a planted duplicate copies), URLs under `base_url`, faults on rows chosen with `seed`.
pub fn write_url_list(dir: &Path, base_url: &str, faults: &[(String, u64)], seed: u64) -> Result<PathBuf> {
    let samples = load_samples(dir)?;
    let mut order: Vec<usize> = (0..samples.len()).filter(|&i| !samples[i].corrupt).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xFA17));
    let mut fault_of: Vec<Option<&str>> = vec![None; samples.len()];
    let mut next = order.into_iter();
    for (kind, n) in faults {
        for _ in 0..*n {
            let Some(i) = next.next() else {
                return Err(Error::Usage(format!("more faults than samples ({})", samples.len())));
            };
            fault_of[i] = Some(kind.as_str());
        }
    }
    let base = base_url.trim_end_matches('/');
    let url: StringArray = samples
        .iter()
        .zip(&fault_of)
        .map(|(s, f)| {
            let file = s.file.trim_start_matches("images/");
            Some(match f {
                Some(f) => format!("{base}/f/{f}/img/{file}"),
                None => format!("{base}/img/{file}"),
            })
        })
        .collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(url),
        Arc::new(samples.iter().map(|s| Some(s.alt_text.as_str())).collect::<StringArray>()),
        Arc::new(samples.iter().map(|s| s.id).collect::<UInt64Array>()),
        Arc::new(samples.iter().map(|s| Some(s.noise.as_str())).collect::<StringArray>()),
        Arc::new(fault_of.iter().map(|f| f.or(samples.is_empty().then_some(""))).collect::<StringArray>()),
        Arc::new(samples.iter().map(|s| Some(s.caption.as_str())).collect::<StringArray>()),
        Arc::new(samples.iter().map(|s| s.width).collect::<UInt32Array>()),
        Arc::new(samples.iter().map(|s| s.height).collect::<UInt32Array>()),
        Arc::new(samples.iter().map(|s| s.duplicate_of).collect::<UInt64Array>()),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("url", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("id", DataType::UInt64, false),
        Field::new("noise", DataType::Utf8, false),
        Field::new("fault", DataType::Utf8, true),
        Field::new("true_caption", DataType::Utf8, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("duplicate_of", DataType::UInt64, true),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::data("url list", e))?;
    let path = dir.join("urls.parquet");
    let f = std::fs::File::create(&path).map_err(|e| Error::io("cannot create", &path, e))?;
    let mut w = ArrowWriter::try_new(f, schema, None).map_err(|e| Error::data("url list", e))?;
    w.write(&batch).map_err(|e| Error::data("url list", e))?;
    w.close().map_err(|e| Error::data("url list", e))?;
    Ok(path)
}
