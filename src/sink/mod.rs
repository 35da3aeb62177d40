//! Parquet shard writer. A shard is written to a hidden temporary name, synced, and renamed into
//! place; its stats JSON follows the same way, and the completion marker `NNNNN.done` is written
//! last. A shard without its marker is redone on the next run, so a crash never leaves a
//! half-written shard that a rerun would trust.

pub mod schema;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, RecordBatch, StringArray, StringBuilder, StructArray, UInt16Array, UInt32Array,
    UInt64Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{GzipLevel, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Compression, OutputConfig};
use crate::error::{Error, Result};
use crate::outcome::{ImageData, Outcome, StageSeconds, Status};

/// Paths of one shard's files.
#[derive(Debug, Clone)]
pub struct ShardPaths {
    pub parquet: PathBuf,
    pub stats: PathBuf,
    pub done: PathBuf,
}

impl ShardPaths {
    pub fn new(dir: &Path, shard: u64) -> Self {
        ShardPaths {
            parquet: dir.join(format!("{shard:05}.parquet")),
            stats: dir.join(format!("{shard:05}.stats.json")),
            done: dir.join(format!("{shard:05}.done")),
        }
    }

    /// The stats file and completion marker that go with a shard file (`NNNNN.parquet` →
    /// `NNNNN.stats.json`, `NNNNN.done`), wherever it lies.
    pub fn beside(parquet: &Path) -> Self {
        let name = parquet.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let stem = name.strip_suffix(".parquet").unwrap_or(name);
        ShardPaths {
            parquet: parquet.to_path_buf(),
            stats: parquet.with_file_name(format!("{stem}.stats.json")),
            done: parquet.with_file_name(format!("{stem}.done")),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.done.is_file() && self.parquet.is_file()
    }
}

/// The completion marker's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneMarker {
    pub rows: u64,
    pub config_hash: String,
    /// [`input_fingerprint`] of the input shard it was written from (absent in older markers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_sha256: Option<String>,
}

impl DoneMarker {
    /// How the input shard (`rows` rows, `fingerprint`) differs from the one this shard was
    /// written from, if it does: rows appended to a list, or rows edited.
    pub fn input_changed(&self, rows: u64, fingerprint: &str) -> Option<String> {
        if self.rows != rows {
            Some(format!("it was written from {} input rows and the input now has {rows} there", self.rows))
        } else if self.input_sha256.as_deref().is_some_and(|f| f != fingerprint) {
            Some(format!("its {rows} input rows have other URLs or captions now"))
        } else {
            None
        }
    }
}

/// A fingerprint of an input shard: the first 16 hex digits of SHA-256 over each row's URL and
/// caption (the first two columns of a source batch), so a rerun can tell when the rows behind a
/// completed shard changed. Other passthrough columns are left out: adding one to a pipeline
/// does not make every shard stale.
pub fn input_fingerprint(rows: &RecordBatch) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for col in rows.columns().iter().take(2) {
        let strings = arrow::compute::cast(col, &DataType::Utf8).ok();
        let strings = strings.as_ref().and_then(|a| a.as_any().downcast_ref::<StringArray>());
        for i in 0..rows.num_rows() {
            match strings.filter(|s| s.is_valid(i)) {
                Some(s) => {
                    h.update([1u8]);
                    h.update((s.value(i).len() as u64).to_le_bytes());
                    h.update(s.value(i).as_bytes());
                }
                None => h.update([0u8]),
            }
        }
    }
    hex::encode(&h.finalize()[..8])
}

pub fn read_marker(paths: &ShardPaths) -> Option<DoneMarker> {
    serde_json::from_slice(&std::fs::read(&paths.done).ok()?).ok()
}

/// Per-shard statistics, written as `NNNNN.stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    pub shard: u64,
    pub rows: u64,
    /// Rows per status.
    pub status: BTreeMap<String, u64>,
    /// Rows per `status: reason` (the 50 most frequent; the rest under "other").
    pub reasons: BTreeMap<String, u64>,
    /// Rows per HTTP status of the last response.
    pub http_status: BTreeMap<String, u64>,
    pub bytes_downloaded: u64,
    pub bytes_written: u64,
    /// Seconds summed over rows per stage, plus the shard's wall time and Parquet write time.
    pub seconds: SecondsStats,
    pub config_hash: String,
    /// [`input_fingerprint`] of the input shard, copied into the completion marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_sha256: Option<String>,
    /// Runs of `--retry-failed` on this shard: rows re-attempted and rows that came back ok.
    #[serde(default)]
    pub retried: RetryStats,
    /// Rows `recap dedup` marked duplicate in this shard, by kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupStats>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupStats {
    pub exact: u64,
    pub near: u64,
    pub semantic: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SecondsStats {
    #[serde(flatten)]
    pub stages: StageSeconds,
    /// Model stages, for the whole shard (batched, so not per row).
    #[serde(default)]
    pub caption: f64,
    #[serde(default)]
    pub score: f64,
    pub write: f64,
    pub wall: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryStats {
    pub attempted: u64,
    pub recovered: u64,
}

impl ShardStats {
    /// Counts from the outcomes of every row of the shard.
    pub fn from_outcomes(shard: u64, outcomes: &[Outcome], config_hash: &str) -> Self {
        let mut tally = StatsTally::new(shard, config_hash);
        for o in outcomes {
            tally.add(o);
        }
        tally.finish()
    }
}

/// A shard's stats counted a row at a time, so that a shard written as its rows arrive need not
/// keep every finished row (with its reason and hash strings) until its last row is in.
#[derive(Debug)]
pub struct StatsTally {
    stats: ShardStats,
    reasons: BTreeMap<String, u64>,
}

impl StatsTally {
    pub fn new(shard: u64, config_hash: &str) -> Self {
        StatsTally { stats: ShardStats { shard, config_hash: config_hash.to_string(), ..Default::default() }, reasons: BTreeMap::new() }
    }

    /// Rows counted so far.
    pub fn rows(&self) -> u64 {
        self.stats.rows
    }

    pub fn add(&mut self, o: &Outcome) {
        let s = &mut self.stats;
        s.rows += 1;
        *s.status.entry(o.status.to_string()).or_default() += 1;
        if let Some(r) = &o.reason {
            let mut key = format!("{}: {r}", o.status);
            if key.len() > 160 {
                let mut cut = 157;
                while !key.is_char_boundary(cut) {
                    cut -= 1;
                }
                key.truncate(cut);
                key.push_str("...");
            }
            *self.reasons.entry(key).or_default() += 1;
        }
        if let Some(h) = o.http_status {
            *s.http_status.entry(h.to_string()).or_default() += 1;
        }
        s.bytes_downloaded += o.bytes_downloaded;
        s.seconds.stages += o.seconds;
    }

    /// The stats, with the 50 most frequent reasons by name and the rest as `other`.
    pub fn finish(self) -> ShardStats {
        let mut s = self.stats;
        let mut by_count: Vec<(String, u64)> = self.reasons.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (i, (k, v)) in by_count.into_iter().enumerate() {
            if i < 50 {
                s.reasons.insert(k, v);
            } else {
                *s.reasons.entry("other".into()).or_default() += v;
            }
        }
        s
    }
}

/// Row key: shard (5 digits) then row within the shard (at least 4 digits, more when shards are larger).
pub fn row_key(shard: u64, row: u64, rows_per_shard: u64) -> String {
    let width = (rows_per_shard.saturating_sub(1)).to_string().len().max(4);
    format!("{shard:05}{row:0width$}")
}

/// Stable id of a URL.
pub fn url_uid(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..16])
}

/// Build a shard's batch, or a slice of it whose first row is the shard's row `first_row`: the
/// input rows (url, caption, passthrough) and one outcome per row.
pub fn build_batch(
    schema: &SchemaRef,
    shard: u64,
    rows_per_shard: u64,
    first_row: u64,
    input: &RecordBatch,
    outcomes: &[Outcome],
) -> Result<RecordBatch> {
    let n = input.num_rows();
    if outcomes.len() != n {
        return Err(Error::Internal(format!("shard {shard}: {} outcomes for {n} rows", outcomes.len())));
    }
    let urls = input.column(0).as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Internal("url column is not utf8".into()))?;
    let key: StringArray = (0..n).map(|i| Some(row_key(shard, first_row + i as u64, rows_per_shard))).collect();
    let uid: StringArray = (0..n).map(|i| urls.is_valid(i).then(|| url_uid(urls.value(i)))).collect();
    let status: StringArray = outcomes.iter().map(|o| Some(o.status.as_str())).collect();
    let reason: StringArray = outcomes.iter().map(|o| o.reason.as_deref()).collect();
    let http: UInt16Array = outcomes.iter().map(|o| o.http_status).collect();
    // Sized once: collected, the shard's largest column grew by doubling, copying every image
    // into fresh memory several times per shard.
    let image_bytes: usize = outcomes.iter().filter_map(|o| o.image.as_ref()).map(|i| i.bytes.len()).sum();
    let mut builder = arrow::array::BinaryBuilder::with_capacity(n, image_bytes);
    for o in outcomes {
        builder.append_option(o.image.as_ref().map(|i| i.bytes.as_slice()));
    }
    let bytes: BinaryArray = builder.finish();
    let mut paths = StringBuilder::new();
    for (i, o) in outcomes.iter().enumerate() {
        match &o.image {
            Some(img) => paths.append_value(format!("{}.{}", row_key(shard, first_row + i as u64, rows_per_shard), img.extension)),
            None => paths.append_null(),
        }
    }
    let image_field = schema.field_with_name("image").map_err(|e| Error::data("shard schema", e))?;
    let DataType::Struct(image_fields) = image_field.data_type() else {
        return Err(Error::Internal("image column is not a struct".into()));
    };
    let validity = NullBuffer::from(outcomes.iter().map(|o| o.image.is_some()).collect::<Vec<bool>>());
    let image = StructArray::try_new(
        image_fields.clone(),
        vec![Arc::new(bytes) as ArrayRef, Arc::new(paths.finish()) as ArrayRef],
        Some(validity),
    )
    .map_err(|e| Error::data("building image column", e))?;
    let width: UInt32Array = outcomes.iter().map(|o| o.image.as_ref().map(|i| i.width)).collect();
    let height: UInt32Array = outcomes.iter().map(|o| o.image.as_ref().map(|i| i.height)).collect();
    let ow: UInt32Array = outcomes.iter().map(|o| o.original_width).collect();
    let oh: UInt32Array = outcomes.iter().map(|o| o.original_height).collect();
    let sha: StringArray = outcomes.iter().map(|o| o.sha256.as_deref()).collect();
    let phash: UInt64Array = outcomes.iter().map(|o| o.image.as_ref().map(|i| i.phash)).collect();

    let mut cols: Vec<ArrayRef> = vec![Arc::new(key), Arc::new(uid)];
    // url, caption, passthrough: as read.
    cols.extend(input.columns().iter().cloned());
    cols.extend([
        Arc::new(status) as ArrayRef,
        Arc::new(reason),
        Arc::new(http),
        Arc::new(image),
        Arc::new(width),
        Arc::new(height),
        Arc::new(ow),
        Arc::new(oh),
        Arc::new(sha),
        Arc::new(phash),
    ]);
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::data(format!("building shard {shard}"), e))
}

/// Read back the outcomes stored in a shard (what `--retry-failed` keeps for rows it does not redo).
pub fn outcomes_from_batch(batch: &RecordBatch) -> Result<Vec<Outcome>> {
    fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
        b.column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or_else(|| Error::Internal(format!("shard has no column {name} of the expected type")))
    }
    let status = col::<StringArray>(batch, "status")?;
    let reason = col::<StringArray>(batch, "reason")?;
    let http = col::<UInt16Array>(batch, "http_status")?;
    let image = col::<StructArray>(batch, "image")?;
    let bytes = image.column(0).as_any().downcast_ref::<BinaryArray>().ok_or_else(|| Error::Internal("image.bytes".into()))?;
    let paths = image.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Internal("image.path".into()))?;
    let width = col::<UInt32Array>(batch, "width")?;
    let height = col::<UInt32Array>(batch, "height")?;
    let ow = col::<UInt32Array>(batch, "original_width")?;
    let oh = col::<UInt32Array>(batch, "original_height")?;
    let sha = col::<StringArray>(batch, "sha256")?;
    let phash = col::<UInt64Array>(batch, "phash")?;
    let opt_str = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
    let opt_u32 = |a: &UInt32Array, i: usize| a.is_valid(i).then(|| a.value(i));
    (0..batch.num_rows())
        .map(|i| {
            let st = Status::parse(status.value(i))
                .ok_or_else(|| Error::Internal(format!("unknown status {:?} in shard", status.value(i))))?;
            let img = (image.is_valid(i) && bytes.is_valid(i)).then(|| ImageData {
                bytes: bytes.value(i).to_vec(),
                extension: match paths.value(i).rsplit('.').next() {
                    Some("png") => "png",
                    Some("webp") => "webp",
                    _ => "jpg",
                },
                width: width.value(i),
                height: height.value(i),
                phash: phash.value(i),
            });
            Ok(Outcome {
                status: st,
                reason: opt_str(reason, i),
                http_status: http.is_valid(i).then(|| http.value(i)),
                image: img,
                original_width: opt_u32(ow, i),
                original_height: opt_u32(oh, i),
                sha256: opt_str(sha, i),
                bytes_downloaded: 0,
                attempts: 0,
                seconds: StageSeconds::default(),
            })
        })
        .collect()
}

/// A shard file opened for reading: its footer is read, and a file that is not Parquet is a
/// clear error naming it.
pub fn open_shard(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::io("cannot open shard", path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::input(path, format!("not a readable Parquet file: {e}")))
}

/// A shard file's key-value metadata (`recap.*`), by key.
pub fn kv_metadata(b: &ParquetRecordBatchReaderBuilder<File>) -> BTreeMap<String, String> {
    b.metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|m| m.iter().filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v))).collect())
        .unwrap_or_default()
}

/// Batches of some top-level columns of one shard file, nothing else read: every `required`
/// column (a file without one is an error whose message `missing(column)` gives) and those of
/// `optional` the file has.
pub fn read_columns(
    path: &Path,
    required: &[&str],
    optional: &[&str],
    batch: usize,
    missing: impl Fn(&str) -> String,
) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    let b = open_shard(path)?;
    let mut roots = Vec::with_capacity(required.len() + optional.len());
    for c in required {
        roots.push(b.schema().index_of(c).map_err(|_| Error::input(path, missing(c)))?);
    }
    roots.extend(optional.iter().filter_map(|c| b.schema().index_of(c).ok()));
    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), roots);
    let reader = b.with_projection(mask).with_batch_size(batch).build().map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
    let p = path.to_path_buf();
    Ok(reader.map(move |r| r.map_err(|e| Error::input(&p, format!("cannot read: {e}")))))
}

/// Read a whole shard file.
pub fn read_shard(path: &Path) -> Result<(RecordBatch, SchemaRef)> {
    let b = open_shard(path)?;
    let schema = b.schema().clone();
    let reader = b.build().map_err(|e| Error::data(format!("reading {}", path.display()), e))?;
    let batches: Vec<RecordBatch> =
        reader.collect::<std::result::Result<_, _>>().map_err(|e| Error::data(format!("reading {}", path.display()), e))?;
    let batch = arrow::compute::concat_batches(&schema, &batches).map_err(|e| Error::data("concatenating shard", e))?;
    Ok((batch, schema))
}

/// The passthrough input columns of a shard batch, with url and caption first: the input rows back.
pub fn input_rows_from_batch(batch: &RecordBatch, input_schema: &SchemaRef) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = input_schema
        .fields()
        .iter()
        .map(|f| batch.column_by_name(f.name()).cloned().ok_or_else(|| Error::Internal(format!("shard lacks column {}", f.name()))))
        .collect::<Result<_>>()?;
    RecordBatch::try_new(input_schema.clone(), cols).map_err(|e| Error::data("shard input columns", e))
}

/// How shard files are written: `compression` for every column but the image bytes, which are
/// encoded images that do not compress (no codec, dictionary or min/max statistics for them);
/// row groups of 512 rows; `kv` as the file's key-value metadata. The image bytes go in pages of
/// 128-256 KiB (parquet cuts each write so that it adds at most the limit to a page): with one
/// page per row group the encoder grew a buffer by doubling to the whole row group's images and
/// then copied it into the page, a transient of about three copies of them at every shard write
/// (the largest left in a download-only run).
fn shard_properties(compression: parquet::basic::Compression, kv: Vec<KeyValue>) -> WriterProperties {
    let image_bytes = parquet::schema::types::ColumnPath::new(vec!["image".into(), "bytes".into()]);
    WriterProperties::builder()
        .set_compression(compression)
        .set_column_compression(image_bytes.clone(), parquet::basic::Compression::UNCOMPRESSED)
        .set_column_dictionary_enabled(image_bytes.clone(), false)
        .set_column_statistics_enabled(image_bytes.clone(), parquet::file::properties::EnabledStatistics::None)
        .set_column_data_page_size_limit(image_bytes, IMAGE_PAGE_BYTES)
        .set_max_row_group_row_count(Some(512))
        .set_key_value_metadata(Some(kv))
        .build()
}

/// Target size of a data page of the image bytes column.
const IMAGE_PAGE_BYTES: usize = 128 * 1024;

/// Writes shards into one directory, or stages them in one and uploads them to an object store
/// prefix (the marker last).
pub struct ShardWriter {
    dir: PathBuf,
    props: WriterProperties,
    remote: Option<crate::storage::Remote>,
    /// Shards whose marker is in the object store (listed at start, added to as shards commit).
    remote_done: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The run lock, held while the writer lives (released by the OS if the process dies).
    _lock: Option<std::fs::File>,
}

/// Lock `.recap-RUN.lock` in `dir` for this process, or say which run holds it. Where the file
/// system cannot lock, a warning, and the run goes on unguarded.
fn take_run_lock(dir: &Path, run: &str, location: &str) -> Result<Option<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(format!(".recap-{run}.lock"));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("cannot create", &path, e))?;
    match f.try_lock() {
        Ok(()) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "this machine".into());
            let holder = format!("pid {} on {host}, started {}", std::process::id(), humantime::format_rfc3339_seconds(std::time::SystemTime::now()));
            // What a refused run shows; the lock, not the text, is what guards.
            let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| f.write_all(holder.as_bytes()));
            Ok(Some(f))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = if holder.trim().is_empty() { "another process".to_string() } else { holder.trim().to_string() };
            let shards = match run.strip_prefix("worker-").and_then(|w| w.split_once("-of-")) {
                Some((_, "1")) | None => "these shards".to_string(),
                Some((i, n)) => format!("worker {i}/{n}'s shards"),
            };
            Err(Error::Usage(format!(
                "another recap run ({holder}) is writing {shards} to {location}: wait for it to end or stop it, then run again (two runs of the same shards undo each other's work)"
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(path = %path.display(), "cannot lock ({e}); a second run on this output would not be stopped");
            Ok(None)
        }
    }
}

impl ShardWriter {
    /// `owns` says which shards this process runs (`--worker I/N`): a killed run's open uploads
    /// are aborted only for those, never for a shard another worker may be uploading now.
    /// `run` names them (`worker-0-of-4`) for the run lock: a second run of the same shards on
    /// this output (from this machine, for an object store) is refused while the first runs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &OutputConfig,
        config_hash: &str,
        config_json: &str,
        schema_version: u32,
        extra: Vec<(String, String)>,
        run: &str,
        owns: impl Fn(u64) -> bool + Send + Sync,
    ) -> Result<Self> {
        let remote = if crate::storage::is_url(&cfg.path) { Some(crate::storage::Remote::open(&cfg.path, &cfg.storage)?) } else { None };
        let dir = match &remote {
            Some(_) => crate::storage::staging_dir(&cfg.path, "shards")?,
            None => PathBuf::from(&cfg.path),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create output directory", &dir, e))?;
        // Before anything is aborted or written: another run of the same shards would undo this
        // one's work (its uploads aborted, its temporary files renamed away).
        let lock = take_run_lock(&dir, run, &cfg.path)?;
        let remote_done = match &remote {
            Some(remote) => {
                // A killed run may have left multipart uploads open: abort them before anything else.
                let r = remote.clone();
                let (aborted, done) = crate::storage::blocking(async move {
                    // Shard objects are named NNNNN.<ext>; anything else under the prefix is not ours.
                    let mine = |name: &str| name.split('.').next().and_then(|i| i.parse::<u64>().ok()).is_some_and(&owns);
                    let aborted = r.abort_interrupted(&mine).await?;
                    Ok::<_, Error>((aborted, r.completed().await?))
                })?;
                for a in aborted {
                    tracing::warn!(object = %a, "aborted a multipart upload an interrupted run left open");
                }
                done
            }
            None => Default::default(),
        };
        let compression = match cfg.compression {
            Compression::Zstd => parquet::basic::Compression::ZSTD(
                ZstdLevel::try_new(cfg.compression_level.map(|l| l as i32).unwrap_or(3)).map_err(|e| Error::data("zstd level", e))?,
            ),
            Compression::Gzip => parquet::basic::Compression::GZIP(
                GzipLevel::try_new(cfg.compression_level.unwrap_or(6)).map_err(|e| Error::data("gzip level", e))?,
            ),
            Compression::Snappy => parquet::basic::Compression::SNAPPY,
            Compression::None => parquet::basic::Compression::UNCOMPRESSED,
        };
        let props = shard_properties(
            compression,
            vec![
                KeyValue::new("recap.version".into(), env!("CARGO_PKG_VERSION").to_string()),
                KeyValue::new("recap.schema_version".into(), schema_version.to_string()),
                KeyValue::new("recap.config_hash".into(), config_hash.to_string()),
                KeyValue::new("recap.pipeline".into(), config_json.to_string()),
            ]
            .into_iter()
            .chain(extra.into_iter().map(|(k, v)| KeyValue::new(k, v)))
            .collect(),
        );
        Ok(ShardWriter { dir, props, remote, remote_done: std::sync::Mutex::new(remote_done), _lock: lock })
    }

    /// Local paths of a shard (the staging copy when the output is an object store).
    pub fn paths(&self, shard: u64) -> ShardPaths {
        ShardPaths::new(&self.dir, shard)
    }

    /// Has this shard been committed (marker present, locally or in the object store)?
    pub fn is_complete(&self, shard: u64) -> bool {
        match &self.remote {
            Some(_) => self.remote_done.lock().expect("remote set").contains(&shard),
            None => self.paths(shard).is_complete(),
        }
    }

    /// Committed shards with an index at or past `n` (an output written from a longer input).
    pub fn completed_from(&self, n: u64) -> Vec<u64> {
        let mut v: Vec<u64> = match &self.remote {
            Some(_) => self.remote_done.lock().expect("remote set").iter().copied().filter(|&s| s >= n).collect(),
            None => std::fs::read_dir(&self.dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".done")?.parse::<u64>().ok())
                        .filter(|&s| s >= n && self.paths(s).is_complete())
                        .collect()
                })
                .unwrap_or_default(),
        };
        v.sort_unstable();
        v
    }

    /// The completion marker of a committed shard.
    pub fn marker(&self, shard: u64) -> Option<DoneMarker> {
        match &self.remote {
            Some(r) => {
                let path = r.child(&format!("{shard:05}.done"));
                let r = r.clone();
                let bytes = crate::storage::blocking(async move { r.get(&path).await }).ok()?;
                serde_json::from_slice(&bytes).ok()
            }
            None => read_marker(&self.paths(shard)),
        }
    }

    /// Bring a committed shard's files into the local directory (for `--retry-failed`); a no-op
    /// for local output.
    pub fn fetch(&self, shard: u64) -> Result<()> {
        let Some(r) = &self.remote else { return Ok(()) };
        let paths = self.paths(shard);
        let r = r.clone();
        crate::storage::blocking(async move {
            r.download(&format!("{shard:05}.parquet"), &paths.parquet).await?;
            r.download(&format!("{shard:05}.stats.json"), &paths.stats).await?;
            r.download(&format!("{shard:05}.done"), &paths.done).await
        })
    }

    /// Where shards end up, for messages.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(r) => r.url.to_string(),
            None => self.dir.display().to_string(),
        }
    }

    /// Start writing a shard whose rows will come as batches of `schema` ([`ShardFile::append`]);
    /// nothing is visible to readers until [`ShardFile::commit`]. A rewrite takes the shard's old
    /// marker away first, so a stale one is not trusted while the new data lands.
    pub fn begin(&self, shard: u64, schema: &SchemaRef) -> Result<ShardFile<'_>> {
        let paths = self.paths(shard);
        let _ = std::fs::remove_file(&paths.done);
        let tmp = self.dir.join(format!(".{shard:05}.parquet.tmp"));
        let file = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        // The file's metadata also goes on the Arrow schema, where pyarrow, polars and
        // `datasets` look for it (they read ARROW:schema, not the Parquet key-value pairs).
        let mut meta: std::collections::HashMap<String, String> = self
            .props
            .key_value_metadata()
            .map(|kv| kv.iter().filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v))).collect())
            .unwrap_or_default();
        meta.insert("huggingface".into(), schema::huggingface_features(schema).to_string());
        let schema = Arc::new(schema.as_ref().clone().with_metadata(meta));
        let w = ArrowWriter::try_new(file, schema.clone(), Some(self.props.clone()))
            .map_err(|e| Error::data(format!("opening {}", tmp.display()), e))?;
        Ok(ShardFile { owner: self, shard, paths, tmp, schema, w, rows: 0 })
    }
}

/// A shard being written (from [`ShardWriter::begin`]): its rows are appended in order, each
/// batch encoded as it comes, so a caller can free a slice's rows before building the next;
/// dropped without [`commit`](ShardFile::commit), it leaves only a hidden temporary that the next
/// attempt overwrites.
pub struct ShardFile<'a> {
    owner: &'a ShardWriter,
    shard: u64,
    paths: ShardPaths,
    tmp: PathBuf,
    schema: SchemaRef,
    w: ArrowWriter<File>,
    rows: u64,
}

impl ShardFile<'_> {
    /// Encode the next rows (row groups are cut at 512 rows whatever the batches' sizes).
    pub fn append(&mut self, batch: &RecordBatch) -> Result<()> {
        let batch = batch.clone().with_schema(self.schema.clone()).map_err(|e| Error::data("shard schema metadata", e))?;
        self.w.write(&batch).map_err(|e| Error::data(format!("writing {}", self.tmp.display()), e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Finish the file, move it into place with its stats, then write the completion marker
    /// (uploading all three, the marker last, when the output is an object store). Returns the
    /// bytes written.
    pub fn commit(self, stats: &mut ShardStats) -> Result<u64> {
        let ShardFile { owner, shard, paths, tmp, w, rows, .. } = self;
        let file = w.into_inner().map_err(|e| Error::data(format!("finishing {}", tmp.display()), e))?;
        file.sync_all().map_err(|e| Error::io("cannot sync", &tmp, e))?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        drop(file);
        std::fs::rename(&tmp, &paths.parquet).map_err(|e| Error::io("cannot rename into place", &paths.parquet, e))?;
        stats.bytes_written = bytes;
        write_atomic(&paths.stats, &serde_json::to_vec_pretty(stats).expect("stats serialise"))?;
        let marker = DoneMarker { rows, config_hash: stats.config_hash.clone(), input_sha256: stats.input_sha256.clone() };
        write_atomic(&paths.done, &serde_json::to_vec(&marker).expect("marker serialises"))?;
        if let Some(r) = &owner.remote {
            // No rename in an object store: the marker, uploaded last, is the commit point. A
            // rewrite takes the old marker away first, as the local path does.
            let r = r.clone();
            let p = paths.clone();
            crate::storage::blocking(async move {
                r.delete(&format!("{shard:05}.done")).await?;
                r.upload_file(&p.parquet, &format!("{shard:05}.parquet")).await?;
                r.upload_file(&p.stats, &format!("{shard:05}.stats.json")).await?;
                r.upload_file(&p.done, &format!("{shard:05}.done")).await
            })?;
            owner.remote_done.lock().expect("remote set").insert(shard);
            for f in [&paths.parquet, &paths.stats, &paths.done] {
                let _ = std::fs::remove_file(f);
            }
        }
        tracing::info!(shard, rows, bytes, "shard committed");
        Ok(bytes)
    }
}

/// The shard files a `--shards` argument names: a directory's `*.parquet` (hidden temporaries
/// skipped), a glob, or one file; sorted. None found is an error that says what was expected.
pub fn list_shards(spec: &str) -> Result<Vec<PathBuf>> {
    if let Some(p) = crate::storage::unsupported_scheme(spec, false) {
        return Err(Error::Usage(p));
    }
    if crate::storage::is_url(spec) {
        // Readers trust only committed shards: those with their marker, brought to a local cache.
        let dir = crate::storage::stage_committed_shards(spec)?;
        return list_shards(&dir.display().to_string());
    }
    let p = Path::new(spec);
    let mut files: Vec<PathBuf> = if p.is_dir() {
        std::fs::read_dir(p)
            .map_err(|e| Error::io("cannot list shards in", p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "parquet") && !f.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect()
    } else if spec.contains(['*', '?', '[']) {
        glob::glob(spec).map_err(|e| Error::Usage(format!("{spec}: not a valid glob: {e}")))?.filter_map(|r| r.ok()).filter(|f| f.is_file()).collect()
    } else if p.is_file() {
        vec![p.to_path_buf()]
    } else {
        return Err(Error::input(p, "no such directory or file; expected a directory of shards (the output.path of `recap run`)"));
    };
    files.sort();
    if files.is_empty() {
        return Err(Error::input(p, "holds no shards (*.parquet); expected the output directory of `recap run`"));
    }
    Ok(files)
}

/// Rewrite an existing shard file with `batch` (same rows, some values changed), atomically as
/// a run writes one: the completion marker is removed, the Parquet file written under a hidden
/// temporary name with the original's key-value metadata, schema metadata and compression, then
/// renamed into place; `update_stats` edits its `NNNNN.stats.json` (when there is one), and the
/// marker is written back last. A crash midway leaves a shard without its marker, which the
/// next `recap run` redoes.
pub fn rewrite_shard(path: &Path, batch: &RecordBatch, update_stats: impl FnOnce(&mut ShardStats)) -> Result<u64> {
    let file = File::open(path).map_err(|e| Error::io("cannot open shard", path, e))?;
    let reader = parquet::file::reader::SerializedFileReader::new(file).map_err(|e| Error::data(format!("reading {}", path.display()), e))?;
    let md = parquet::file::reader::FileReader::metadata(&reader);
    let kv: Vec<KeyValue> =
        md.file_metadata().key_value_metadata().map(|m| m.iter().filter(|kv| kv.key != "ARROW:schema").cloned().collect()).unwrap_or_default();
    let compression = (0..md.num_row_groups())
        .flat_map(|g| md.row_group(g).columns().iter().map(|c| (c.column_path().string(), c.compression())).collect::<Vec<_>>())
        .find(|(p, _)| p != "image.bytes")
        .map(|(_, c)| c)
        .unwrap_or(parquet::basic::Compression::ZSTD(ZstdLevel::default()));
    drop(reader);
    let props = shard_properties(compression, kv);
    let ShardPaths { stats: stats_path, done: done_path, .. } = ShardPaths::beside(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("shard.parquet").to_string();
    let marker = std::fs::read(&done_path).ok();
    let _ = std::fs::remove_file(&done_path);
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let f = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props)).map_err(|e| Error::data(format!("opening {}", tmp.display()), e))?;
    w.write(batch).map_err(|e| Error::data(format!("writing {}", tmp.display()), e))?;
    let f = w.into_inner().map_err(|e| Error::data(format!("finishing {}", tmp.display()), e))?;
    f.sync_all().map_err(|e| Error::io("cannot sync", &tmp, e))?;
    let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot rename into place", path, e))?;
    if let Ok(raw) = std::fs::read(&stats_path) {
        let mut st: ShardStats = serde_json::from_slice(&raw).map_err(|e| Error::input(&stats_path, format!("not a stats file: {e}")))?;
        update_stats(&mut st);
        st.bytes_written = bytes;
        write_atomic(&stats_path, &serde_json::to_vec_pretty(&st).expect("stats serialise"))?;
    }
    if let Some(m) = marker {
        write_atomic(&done_path, &m)?;
    }
    Ok(bytes)
}

/// Write a small file under a temporary name and rename it into place.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    f.write_all(data).map_err(|e| Error::io("cannot write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("cannot sync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot rename into place", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image bytes of a shard go in pages of about `IMAGE_PAGE_BYTES`, not one page per row
    /// group: the encoder's buffer (and the copy into the page) is what a shard write holds.
    #[test]
    fn image_bytes_are_written_in_small_pages_and_read_back_whole() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let n = 1000;
        let urls: StringArray = (0..n).map(|i| Some(format!("http://h/{i}.jpg"))).collect();
        let caps: StringArray = (0..n).map(|i| Some(format!("caption {i}"))).collect();
        let input = RecordBatch::try_from_iter([("url", Arc::new(urls) as ArrayRef), ("caption", Arc::new(caps) as ArrayRef)]).unwrap();
        // 2,000-4,000 bytes each, no two alike: ~3 MB in all, ~1.5 MB per 512-row row group.
        let image = |i: usize| -> Vec<u8> { (0..2000 + (i * 37) % 2000).map(|j| ((i * 131 + j * 7) % 251) as u8).collect() };
        let outcomes: Vec<Outcome> = (0..n)
            .map(|i| {
                let mut o = Outcome::failed(crate::outcome::Status::Ok, "");
                o.reason = None;
                o.image = Some(crate::outcome::ImageData { bytes: image(i), extension: "jpg", width: 8, height: 8, phash: i as u64 });
                o
            })
            .collect();
        let schema = schema::with_passthrough(&[]);
        let batch = build_batch(&schema, 4, 1000, 0, &input, &outcomes).unwrap();
        let props = shard_properties(parquet::basic::Compression::ZSTD(Default::default()), vec![]);
        let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        let bytes = bytes::Bytes::from(w.into_inner().unwrap());

        let reader = SerializedFileReader::new(bytes.clone()).unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.num_row_groups(), 2, "512-row row groups");
        let col = meta.file_metadata().schema_descr().columns().iter().position(|c| c.path().string() == "image.bytes").unwrap();
        let mut pages = 0;
        for rg in 0..meta.num_row_groups() {
            for page in reader.get_row_group(rg).unwrap().get_column_page_reader(col).unwrap() {
                let page = page.unwrap();
                pages += 1;
                // Parquet cuts a write into parts of at most the limit and closes a page once
                // it reaches the limit: under twice the limit (and one image), against ~1.5 MB
                // for a row group in one page.
                assert!(page.buffer().len() <= 2 * IMAGE_PAGE_BYTES + 4000 + 64, "page of {} bytes", page.buffer().len());
            }
        }
        assert!(pages >= 12, "{pages} pages for ~3 MB of images");

        let back: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap().collect::<std::result::Result<_, _>>().unwrap();
        let back = arrow::compute::concat_batches(&back[0].schema(), &back).unwrap();
        let images = back.column_by_name("image").unwrap().as_any().downcast_ref::<StructArray>().unwrap();
        let data = images.column_by_name("bytes").unwrap().as_any().downcast_ref::<BinaryArray>().unwrap();
        assert_eq!(data.len(), n);
        for i in 0..n {
            assert_eq!(data.value(i), image(i).as_slice(), "row {i}");
        }
    }

    #[test]
    fn keys_sort_and_widen() {
        assert_eq!(row_key(3, 7, 1000), "000030007");
        assert_eq!(row_key(3, 7, 100_000), "0000300007");
        assert_eq!(url_uid("http://a/b").len(), 32);
    }
}
