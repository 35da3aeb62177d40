//! URL lists: Parquet, CSV, TSV and JSON Lines files (the text formats optionally gzipped), one
//! file, a glob or a directory, read in name order and cut into input shards of
//! `rows_per_shard` rows. Input shard i becomes output shard i, so the cut must be the same on
//! every run and on every worker: it depends only on the files and the row order inside them.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::{InputConfig, InputFormat};
use crate::error::{Error, Problem, Result};

/// Output column names that input columns may not be copied onto.
pub const RESERVED_COLUMNS: &[&str] = &[
    "key", "uid", "url", "caption", "status", "reason", "http_status", "image", "width", "height",
    "original_width", "original_height", "sha256", "phash",
];

/// One input file and how to read it.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: InputFormat,
    pub gzip: bool,
}

/// The input, resolved and checked: files, and the schema of the rows the engine sees
/// (`url`, `caption`, then the passthrough columns with their input types).
#[derive(Debug, Clone)]
pub struct InputPlan {
    pub files: Vec<InputFile>,
    pub url_column: String,
    pub caption_column: Option<String>,
    pub passthrough: Vec<String>,
    /// `url: Utf8, caption: Utf8, <passthrough…>`.
    pub schema: SchemaRef,
    pub rows_per_shard: u64,
}

/// One input shard: its index and its rows (in [`InputPlan::schema`]).
#[derive(Debug, Clone)]
pub struct InputShard {
    pub index: u64,
    pub rows: RecordBatch,
}

fn problem(path: &str, message: impl Into<String>) -> Problem {
    Problem { path: path.into(), message: message.into() }
}

fn detect(path: &Path, forced: Option<InputFormat>) -> Option<(InputFormat, bool)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, gzip) = match name.strip_suffix(".gz") {
        Some(s) => (s.to_string(), true),
        None => (name, false),
    };
    let format = match forced {
        Some(f) => f,
        None => {
            let ext = Path::new(&stem).extension()?.to_str()?;
            match ext {
                "parquet" | "pq" => InputFormat::Parquet,
                "csv" => InputFormat::Csv,
                "tsv" => InputFormat::Tsv,
                "jsonl" | "ndjson" | "json" => InputFormat::Jsonl,
                _ => return None,
            }
        }
    };
    Some((format, gzip))
}

impl InputPlan {
    /// Resolve the files and check that every named column exists, reporting every problem.
    pub fn open(cfg: &InputConfig) -> std::result::Result<InputPlan, Vec<Problem>> {
        let files = resolve_files(cfg)?;
        let mut problems = Vec::new();
        let mut first: Option<SchemaRef> = None;
        for f in &files {
            match read_schema(f) {
                Ok(s) => {
                    if let Some(first_schema) = &first {
                        for name in needed_columns(cfg) {
                            let a = first_schema.field_with_name(&name).ok();
                            let b = s.field_with_name(&name).ok();
                            if a.is_some() && b.is_none() {
                                problems.push(problem(
                                    "input.path",
                                    format!("{} has no column {name:?}, which {} has", f.path.display(), files[0].path.display()),
                                ));
                            }
                        }
                    } else {
                        first = Some(s);
                    }
                }
                Err(e) => problems.push(problem("input.path", format!("cannot read {}: {e}", f.path.display()))),
            }
        }
        let Some(schema) = first else { return Err(problems) };
        if schema.fields().is_empty() {
            problems.push(problem(
                "input.path",
                format!("{} has no columns: the file is empty or has no header row", files[0].path.display()),
            ));
            return Err(problems);
        }
        let columns = schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
        let find = |name: &str, path: &str, problems: &mut Vec<Problem>| -> Option<Field> {
            match schema.field_with_name(name) {
                Ok(f) => Some(f.clone()),
                Err(_) => {
                    problems.push(problem(
                        path,
                        format!("no column {name:?} in {}; its columns are: {columns}", files[0].path.display()),
                    ));
                    None
                }
            }
        };
        let mut fields = vec![Field::new("url", DataType::Utf8, true), Field::new("caption", DataType::Utf8, true)];
        find(&cfg.url_column, "input.url_column", &mut problems);
        if let Some(c) = &cfg.caption_column {
            find(c, "input.caption_column", &mut problems);
        }
        for (i, name) in cfg.passthrough.iter().enumerate() {
            let path = format!("input.passthrough[{i}]");
            if RESERVED_COLUMNS.contains(&name.as_str()) {
                problems.push(problem(
                    &path,
                    format!("{name:?} is an output column of recap; rename it in the input to copy it through"),
                ));
                continue;
            }
            if cfg.passthrough[..i].contains(name) {
                problems.push(problem(&path, format!("{name:?} is listed twice")));
                continue;
            }
            if let Some(f) = find(name, &path, &mut problems) {
                fields.push(Field::new(name, f.data_type().clone(), true));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(InputPlan {
            files,
            url_column: cfg.url_column.clone(),
            caption_column: cfg.caption_column.clone(),
            passthrough: cfg.passthrough.clone(),
            schema: Arc::new(Schema::new(fields)),
            rows_per_shard: cfg.rows_per_shard,
        })
    }

    /// Total rows over all files (Parquet from metadata; text formats by reading them).
    pub fn count_rows(&self) -> Result<u64> {
        let mut n = 0u64;
        for f in &self.files {
            if f.format == InputFormat::Parquet {
                let file = File::open(&f.path).map_err(|e| Error::io("cannot open", &f.path, e))?;
                let b = ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| Error::input(&f.path, e.to_string()))?;
                n += b.metadata().file_metadata().num_rows() as u64;
            } else {
                for batch in self.read_file(f)? {
                    n += batch.map_err(|e| Error::input(&f.path, e.to_string()))?.num_rows() as u64;
                }
            }
        }
        Ok(n)
    }

    /// The input shards, in order.
    pub fn shards(&self) -> ShardIter<'_> {
        ShardIter { plan: self, file_idx: 0, current: None, pending: std::collections::VecDeque::new(), pending_rows: 0, next_index: 0, done: false }
    }

    fn read_file(&self, f: &InputFile) -> Result<Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send>> {
        open_reader(f, Some(self))
    }

    /// Bring a raw batch to the plan's schema: pick and rename the columns, cast types.
    fn normalise(&self, f: &InputFile, batch: &RecordBatch) -> Result<RecordBatch> {
        let err = |m: String| Error::input(&f.path, m);
        let rows = batch.num_rows();
        let col = |name: &str| -> Result<ArrayRef> {
            batch.column_by_name(name).cloned().ok_or_else(|| err(format!("no column {name:?}")))
        };
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        cols.push(cast(&col(&self.url_column)?, &DataType::Utf8).map_err(|e| err(format!("column {:?}: {e}", self.url_column)))?);
        cols.push(match &self.caption_column {
            Some(c) => cast(&col(c)?, &DataType::Utf8).map_err(|e| err(format!("column {c:?}: {e}")))?,
            None => arrow::array::new_null_array(&DataType::Utf8, rows),
        });
        for field in self.schema.fields().iter().skip(2) {
            let a = col(field.name())?;
            cols.push(cast(&a, field.data_type()).map_err(|e| err(format!("column {:?}: {e}", field.name())))?);
        }
        RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| err(e.to_string()))
    }
}

fn needed_columns(cfg: &InputConfig) -> Vec<String> {
    let mut v = vec![cfg.url_column.clone()];
    v.extend(cfg.caption_column.clone());
    v.extend(cfg.passthrough.iter().cloned());
    v
}

/// An object store input (a file, a prefix, or a glob over one prefix's names) downloaded to a
/// local staging directory (files already there at the same size are kept); the local path.
fn stage_remote_input(cfg: &InputConfig) -> crate::Result<String> {
    use crate::storage::{blocking, staging_dir, Remote};
    let url = cfg.path.as_str();
    let dir = staging_dir(url, "input")?;
    let (base, pattern) = match url.rsplit_once('/') {
        Some((base, last)) if last.contains(['*', '?', '[']) => (base, Some(last)),
        _ => (url.trim_end_matches('/'), None),
    };
    let pattern = pattern
        .map(|p| glob::Pattern::new(p).map_err(|e| crate::Error::Usage(format!("input.path: bad glob {p:?}: {e}"))))
        .transpose()?;
    let remote = Remote::open(base, &cfg.storage)?;
    let dir2 = dir.clone();
    blocking(async move {
        // One object, or the names under a prefix.
        if pattern.is_none() {
            if let Ok(meta) = object_store::ObjectStoreExt::head(&remote.store, &remote.prefix).await {
                let name = remote.prefix.filename().unwrap_or("input").to_string();
                let local = dir2.join(&name);
                if std::fs::metadata(&local).map(|m| m.len()).ok() != Some(meta.size) {
                    let bytes = remote.get(&remote.prefix).await?;
                    crate::storage::write_whole(&local, &bytes)?;
                }
                return Ok(local.display().to_string());
            }
        }
        let names = remote.list_names().await?;
        let mut n = 0;
        for (name, size) in names {
            if name.starts_with('.') || pattern.as_ref().is_some_and(|p| !p.matches(&name)) {
                continue;
            }
            let local = dir2.join(&name);
            if std::fs::metadata(&local).map(|m| m.len()).ok() != Some(size) {
                remote.download(&name, &local).await?;
            }
            n += 1;
        }
        if n == 0 {
            return Err(crate::Error::Usage(format!("{url} names no objects")));
        }
        Ok(dir2.display().to_string())
    })
}

fn resolve_files(cfg: &InputConfig) -> std::result::Result<Vec<InputFile>, Vec<Problem>> {
    if let Some(p) = crate::storage::unsupported_scheme(&cfg.path, true) {
        return Err(vec![problem("input.path", p)]);
    }
    if crate::storage::is_http(&cfg.path) {
        // One file over HTTP (a `?` there is the query, not a glob).
        let local = crate::storage::stage_http_file(&cfg.path).map_err(|e| vec![problem("input.path", e.to_string())])?;
        let mut staged = cfg.clone();
        staged.path = local.display().to_string();
        return resolve_files(&staged);
    }
    if crate::storage::is_url(&cfg.path) {
        let local = stage_remote_input(cfg).map_err(|e| vec![problem("input.path", e.to_string())])?;
        let mut staged = cfg.clone();
        staged.path = local;
        return resolve_files(&staged);
    }
    let p = Path::new(&cfg.path);
    let mut paths: Vec<PathBuf> = Vec::new();
    let is_glob = cfg.path.contains(['*', '?', '[']);
    if is_glob {
        let entries = glob::glob(&cfg.path).map_err(|e| vec![problem("input.path", format!("bad glob {:?}: {e}", cfg.path))])?;
        paths.extend(entries.filter_map(|e| e.ok()).filter(|p| p.is_file()));
        if paths.is_empty() {
            return Err(vec![problem("input.path", format!("the glob {:?} matches no files", cfg.path))]);
        }
    } else if p.is_dir() {
        let rd = std::fs::read_dir(p).map_err(|e| vec![problem("input.path", format!("cannot list {}: {e}", p.display()))])?;
        paths.extend(
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file() && detect(p, cfg.format).is_some())
                .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))),
        );
        if paths.is_empty() {
            return Err(vec![problem(
                "input.path",
                format!("the directory {} holds no .parquet, .csv, .tsv or .jsonl files", p.display()),
            )]);
        }
    } else if p.is_file() {
        paths.push(p.to_path_buf());
    } else {
        // Relative paths are read from the current directory, not the YAML's: say which it was.
        let from = match std::env::current_dir() {
            Ok(cwd) if p.is_relative() => format!(" (relative to the current directory, {})", cwd.display()),
            _ => String::new(),
        };
        return Err(vec![problem(
            "input.path",
            format!("{} does not exist{from}; expected a file, a glob or a directory", cfg.path),
        )]);
    }
    paths.sort();
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match detect(&path, cfg.format) {
            Some((InputFormat::Parquet, true)) => problems.push(problem(
                "input.path",
                format!("{}: gzipped Parquet is not supported; Parquet compresses its own pages", path.display()),
            )),
            Some((format, gzip)) => files.push(InputFile { path, format, gzip }),
            None => problems.push(problem(
                "input.path",
                format!("{}: unknown file type; expected .parquet, .csv, .tsv or .jsonl (optionally .gz), or set input.format", path.display()),
            )),
        }
    }
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

fn open_text(f: &InputFile) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(&f.path).map_err(|e| Error::io("cannot open", &f.path, e))?;
    let inner: Box<dyn Read + Send> = if f.gzip { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) };
    Ok(Box::new(BufReader::with_capacity(1 << 16, inner)))
}

/// A JSON Lines error with the line it is on. Arrow's reader reports serde's position inside
/// one line ("line 1 column 2") whatever the line, so on this (error) path the file is scanned
/// again for the first line that is not a JSON object.
fn json_error(f: &InputFile, e: ArrowError) -> Error {
    let located = open_text(f).ok().and_then(|r| {
        r.lines().enumerate().find_map(|(i, line)| match line {
            Err(io) => Some(format!("line {}: {io}", i + 1)),
            Ok(l) if l.trim().is_empty() => None,
            Ok(l) => match serde_json::from_str::<serde_json::Value>(&l) {
                Ok(serde_json::Value::Object(_)) => None,
                Ok(_) => Some(format!("line {}: not a JSON object", i + 1)),
                Err(je) => {
                    let msg = je.to_string();
                    let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m);
                    Some(format!("line {}, column {}: not valid JSON: {msg}", i + 1, je.column()))
                }
            },
        })
    });
    match located {
        Some(m) => Error::input(&f.path, m),
        None => Error::input(&f.path, e.to_string()),
    }
}

/// The schema of one file, with every column as the file has it (text formats inferred, with
/// strings kept as strings).
fn read_schema(f: &InputFile) -> Result<SchemaRef> {
    match f.format {
        InputFormat::Parquet => {
            let file = File::open(&f.path).map_err(|e| Error::io("cannot open", &f.path, e))?;
            let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::input(&f.path, e.to_string()))?;
            Ok(b.schema().clone())
        }
        InputFormat::Csv | InputFormat::Tsv => {
            let delim = if f.format == InputFormat::Tsv { b'\t' } else { b',' };
            let fmt = arrow::csv::reader::Format::default().with_header(true).with_delimiter(delim);
            let (schema, _) = fmt.infer_schema(open_text(f)?, Some(1000)).map_err(|e| Error::input(&f.path, e.to_string()))?;
            Ok(Arc::new(schema))
        }
        InputFormat::Jsonl => {
            let (schema, _) = arrow::json::reader::infer_json_schema(open_text(f)?, Some(1000))
                .map_err(|e| json_error(f, e))?;
            Ok(Arc::new(schema))
        }
    }
}

fn open_reader(
    f: &InputFile,
    plan: Option<&InputPlan>,
) -> Result<Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send>> {
    // Rows per reader batch. A batch's string columns live until the last of its rows has been
    // cut into a shard, i.e. across several shards' work. At 8192 rows a 40-byte url column is
    // ~330 KB, an object of mimalloc's large class, which shares 4 MiB pages with the shard
    // writer's short-lived page buffers: each such long-lived block kept a whole page's touched
    // memory resident, and a run's anonymous memory stepped up by ~4.5 MB somewhere in its first
    // ~40k rows (download-only bench, 100k rows: 27 MB against 15 MB at 3k). At 1024 rows the
    // columns are ~40 KB, in 512 KiB medium pages, and the step is gone (21-22 MB at 100k).
    const BATCH: usize = 1024;
    // The columns we read: the url and caption as text, passthrough with their planned types.
    let wanted: Vec<String> = match plan {
        Some(p) => {
            let mut v = vec![p.url_column.clone()];
            v.extend(p.caption_column.clone());
            v.extend(p.passthrough.iter().cloned());
            v
        }
        None => Vec::new(),
    };
    match f.format {
        InputFormat::Parquet => {
            let file = File::open(&f.path).map_err(|e| Error::io("cannot open", &f.path, e))?;
            let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::input(&f.path, e.to_string()))?;
            let mask = if wanted.is_empty() {
                ProjectionMask::all()
            } else {
                let schema = b.parquet_schema();
                let roots: Vec<usize> = b
                    .schema()
                    .fields()
                    .iter()
                    .enumerate()
                    .filter(|(_, fld)| wanted.contains(fld.name()))
                    .map(|(i, _)| i)
                    .collect();
                ProjectionMask::roots(schema, roots)
            };
            let r = b.with_projection(mask).with_batch_size(BATCH).build().map_err(|e| Error::input(&f.path, e.to_string()))?;
            Ok(Box::new(r))
        }
        InputFormat::Csv | InputFormat::Tsv => {
            let schema = text_schema(f, plan)?;
            let delim = if f.format == InputFormat::Tsv { b'\t' } else { b',' };
            let r = arrow::csv::ReaderBuilder::new(schema)
                .with_header(true)
                .with_delimiter(delim)
                .with_batch_size(BATCH)
                .build(open_text(f)?)
                .map_err(|e| Error::input(&f.path, e.to_string()))?;
            Ok(Box::new(r))
        }
        InputFormat::Jsonl => {
            let schema = text_schema(f, plan)?;
            let r = arrow::json::ReaderBuilder::new(schema)
                .with_batch_size(BATCH)
                .with_coerce_primitive(true)
                .build(open_text(f)?)
                .map_err(|e| Error::input(&f.path, e.to_string()))?;
            Ok(Box::new(r))
        }
    }
}

/// Inferred schema of a text file, with the url and caption columns forced to Utf8 so that a
/// caption such as "2024" is not read as a number.
fn text_schema(f: &InputFile, plan: Option<&InputPlan>) -> Result<SchemaRef> {
    let inferred = read_schema(f)?;
    let is_text = |name: &str| plan.is_some_and(|p| p.url_column == name || p.caption_column.as_deref() == Some(name));
    let fields: Vec<Field> = inferred
        .fields()
        .iter()
        .map(|fld| {
            if is_text(fld.name()) {
                Field::new(fld.name(), DataType::Utf8, true)
            } else {
                fld.as_ref().clone().with_nullable(true)
            }
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

/// Iterator over input shards; see [`InputPlan::shards`].
pub struct ShardIter<'a> {
    plan: &'a InputPlan,
    file_idx: usize,
    current: Option<(usize, Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send>)>,
    /// Rows read and not yet cut into a shard: the tail of a reader batch, then whole ones.
    pending: std::collections::VecDeque<RecordBatch>,
    pending_rows: u64,
    next_index: u64,
    done: bool,
}

impl ShardIter<'_> {
    /// Cut the next shard from the front of `pending`. The shard's rows are copied into a batch of
    /// their own, so a shard in flight holds its rows only, not the reader batch (1024 rows) it was
    /// cut from; what is left of that batch stays a zero-copy slice until later shards take it.
    fn take_shard(&mut self) -> Result<InputShard> {
        let n = self.plan.rows_per_shard.min(self.pending_rows) as usize;
        let mut parts = Vec::new();
        let mut need = n;
        while need > 0 {
            let b = self.pending.pop_front().expect("pending holds pending_rows rows");
            if b.num_rows() > need {
                parts.push(b.slice(0, need));
                self.pending.push_front(b.slice(need, b.num_rows() - need));
                need = 0;
            } else {
                need -= b.num_rows();
                parts.push(b);
            }
        }
        // concat of one part is a zero-copy slice: copy that one by a take of all its rows.
        let rows = match parts.as_slice() {
            [one] => arrow::compute::take_record_batch(one, &arrow::array::UInt64Array::from_iter_values(0..n as u64)),
            _ => concat_batches(&self.plan.schema, &parts),
        }
        .map_err(|e| Error::data("cutting input rows into a shard", e))?;
        self.pending_rows -= n as u64;
        let index = self.next_index;
        self.next_index += 1;
        Ok(InputShard { index, rows })
    }
}

impl Iterator for ShardIter<'_> {
    type Item = Result<InputShard>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if self.pending_rows >= self.plan.rows_per_shard {
                return Some(self.take_shard());
            }
            if self.current.is_none() {
                if self.file_idx >= self.plan.files.len() {
                    self.done = true;
                    return if self.pending_rows > 0 { Some(self.take_shard()) } else { None };
                }
                let f = &self.plan.files[self.file_idx];
                match self.plan.read_file(f) {
                    Ok(r) => self.current = Some((self.file_idx, r)),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                self.file_idx += 1;
            }
            let (fi, reader) = self.current.as_mut().expect("set above");
            let fi = *fi;
            match reader.next() {
                None => self.current = None,
                Some(Err(e)) => {
                    self.done = true;
                    let f = &self.plan.files[fi];
                    return Some(Err(if f.format == InputFormat::Jsonl { json_error(f, e) } else { Error::input(&f.path, e.to_string()) }));
                }
                Some(Ok(batch)) => match self.plan.normalise(&self.plan.files[fi], &batch) {
                    Ok(b) => {
                        self.pending_rows += b.num_rows() as u64;
                        self.pending.push_back(b);
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            }
        }
    }
}
