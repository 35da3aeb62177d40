//! SQL over shards with DataFusion. A run's shards are the table `shards` (a directory, a glob or
//! one file), their stats files the table `stats` (one row per shard), and the functions in
//! [`udf`] understand the reinforced columns.

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod filter;
pub mod shell;
pub mod udf;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, Float64Array, LargeBinaryArray, RecordBatch, StringArray, StructArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::MemTable;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Error, Result};
use crate::outcome::Status;
use crate::sink::ShardStats;
use crate::train::data::Teacher;

/// What the shards' footers say, checked to agree across files.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    pub files: Vec<PathBuf>,
    /// Column names and types (no field metadata), the same in every file.
    pub schema: SchemaRef,
    pub teachers: Vec<Teacher>,
}

fn footer(path: &Path) -> Result<(SchemaRef, BTreeMap<String, String>)> {
    let b = crate::sink::open_shard(path)?;
    let kv = crate::sink::kv_metadata(&b);
    // Column names and types only: metadata on fields (descriptions) does not make two shards differ.
    let fields: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone().with_metadata(Default::default())).collect();
    Ok((Arc::new(Schema::new(fields)), kv))
}

/// Read every shard's footer; shards written under another schema version, with other columns
/// or other teachers than the first are refused, naming both files.
pub fn inspect(spec: &Path) -> Result<ShardInfo> {
    let files = crate::sink::list_shards(&spec.display().to_string())?;
    let (schema, kv) = footer(&files[0])?;
    for f in &files[1..] {
        let (s, kv2) = footer(f)?;
        let differs = |what: &str, key: &str| -> Result<()> {
            let (a, b) = (kv.get(key).cloned(), kv2.get(key).cloned());
            if a != b {
                return Err(Error::input(spec, format!(
                    "shards of two {what}s: {} has {}, {} has {}; query one run's shards at a time (or rewrite the older run)",
                    files[0].display(),
                    a.unwrap_or_else(|| "none".into()),
                    f.display(),
                    b.unwrap_or_else(|| "none".into())
                )));
            }
            Ok(())
        };
        differs("schema version", "recap.schema_version")?;
        differs("reinforced schema version", "recap.reinforced_schema_version")?;
        differs("teacher ensemble (recap.teachers)", "recap.teachers")?;
        if s.fields() != schema.fields() {
            let names = |s: &Schema| s.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>();
            let (a, b) = (names(&schema), names(&s));
            let only_a: Vec<&String> = a.iter().filter(|x| !b.contains(x)).collect();
            let only_b: Vec<&String> = b.iter().filter(|x| !a.contains(x)).collect();
            return Err(Error::input(spec, format!(
                "shards with different columns: {} has {:?} that {} lacks, and it has {:?}; query one run's shards at a time",
                files[0].display(),
                only_a,
                f.display(),
                only_b
            )));
        }
    }
    let teachers = match kv.get("recap.teachers") {
        Some(t) => serde_json::from_str(t).map_err(|e| Error::input(&files[0], format!("recap.teachers metadata is not valid: {e}")))?,
        None => Vec::new(),
    };
    Ok(ShardInfo { files, schema, teachers })
}

/// A session with `shards`, `stats` and the embedding functions registered.
pub async fn session(spec: &Path) -> Result<(SessionContext, ShardInfo)> {
    let info = inspect(spec)?;
    let config = SessionConfig::new().with_information_schema(true);
    let ctx = SessionContext::new_with_config(config);
    register(&ctx, info).await.map(|info| (ctx, info))
}

/// Register `shards`, `stats` and the functions on `ctx` (a local session, or one whose plans
/// run on a Ballista cluster).
pub async fn register(ctx: &SessionContext, info: ShardInfo) -> Result<ShardInfo> {
    let urls: Vec<ListingTableUrl> = info
        .files
        .iter()
        .map(|f| {
            let abs = f.canonicalize().map_err(|e| Error::io("cannot resolve", f, e))?;
            ListingTableUrl::parse(abs.display().to_string()).map_err(|e| Error::data(format!("shard path {}", f.display()), e))
        })
        .collect::<Result<_>>()?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(info.schema.clone());
    let table = ListingTable::try_new(config).map_err(|e| Error::data("cannot open the shards as a table", e))?;
    ctx.register_table("shards", Arc::new(table)).map_err(|e| Error::data("registering shards", e))?;
    let stats = stats_batch(&info.files)?;
    let mem = MemTable::try_new(stats.schema(), vec![vec![stats]]).map_err(|e| Error::data("stats table", e))?;
    ctx.register_table("stats", Arc::new(mem)).map_err(|e| Error::data("registering stats", e))?;
    udf::register(ctx, &info.teachers);
    Ok(info)
}

/// The stats files beside the shards as one table: a row per shard, a column per status.
pub fn stats_batch(files: &[PathBuf]) -> Result<RecordBatch> {
    let mut rows: Vec<(String, ShardStats)> = Vec::new();
    for f in files {
        let path = crate::sink::ShardPaths::beside(f).stats;
        if let Ok(bytes) = std::fs::read(&path) {
            let s: ShardStats = serde_json::from_slice(&bytes).map_err(|e| Error::input(&path, format!("not a stats file: {e}")))?;
            rows.push((f.display().to_string(), s));
        }
    }
    let mut fields = vec![Field::new("shard", DataType::UInt64, false), Field::new("file", DataType::Utf8, false), Field::new("rows", DataType::UInt64, false)];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.1.shard))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.1.rows))),
    ];
    for st in Status::ALL {
        fields.push(Field::new(st.as_str(), DataType::UInt64, false));
        cols.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.1.status.get(st.as_str()).copied().unwrap_or(0)))));
    }
    let u = |name: &str, f: &dyn Fn(&ShardStats) -> u64, fields: &mut Vec<Field>, cols: &mut Vec<ArrayRef>| {
        fields.push(Field::new(name, DataType::UInt64, false));
        cols.push(Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| f(&r.1)))));
    };
    u("bytes_downloaded", &|s| s.bytes_downloaded, &mut fields, &mut cols);
    u("bytes_written", &|s| s.bytes_written, &mut fields, &mut cols);
    u("retried_attempted", &|s| s.retried.attempted, &mut fields, &mut cols);
    u("retried_recovered", &|s| s.retried.recovered, &mut fields, &mut cols);
    type Sec = fn(&ShardStats) -> f64;
    let secs: [(&str, Sec); 8] = [
        ("seconds_download", |s| s.seconds.stages.download),
        ("seconds_decode", |s| s.seconds.stages.decode),
        ("seconds_resize", |s| s.seconds.stages.resize),
        ("seconds_encode", |s| s.seconds.stages.encode),
        ("seconds_caption", |s| s.seconds.caption),
        ("seconds_score", |s| s.seconds.score),
        ("seconds_write", |s| s.seconds.write),
        ("seconds_wall", |s| s.seconds.wall),
    ];
    for (name, f) in secs {
        fields.push(Field::new(name, DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| f(&r.1)))));
    }
    fields.push(Field::new("reasons", DataType::Utf8, false));
    cols.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| serde_json::to_string(&r.1.reasons).unwrap_or_default()))));
    fields.push(Field::new("config_hash", DataType::Utf8, false));
    cols.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1.config_hash.as_str()))));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| Error::data("stats table", e))
}

/// A DataFusion error as the user should read it: said once, and a mistyped column answered
/// with the columns there are.
pub async fn sql_error(e: datafusion::error::DataFusionError, ctx: &SessionContext) -> Error {
    let msg = e.to_string();
    if msg.contains("No field named") {
        if let Some(cols) = table_columns(ctx, "shards").await {
            let first = msg.split("Valid fields are").next().unwrap_or(&msg).trim_end().to_string();
            return Error::Sql(format!("{first}\ncolumns of shards: {}", cols.join(", ")));
        }
    }
    Error::Sql(msg)
}

/// Column names of a registered table.
pub async fn table_columns(ctx: &SessionContext, table: &str) -> Option<Vec<String>> {
    let t = ctx.table(table).await.ok()?;
    Some(t.schema().fields().iter().map(|f| f.name().clone()).collect())
}

/// The result of a statement and what its scans read.
pub struct QueryResult {
    pub batches: Vec<RecordBatch>,
    pub schema: SchemaRef,
    /// Bytes the Parquet scans read from the shard files (DataFusion's `bytes_scanned`).
    pub bytes_scanned: u64,
}

/// `view` is a SQL keyword: after a comma in a select list the parser refuses `view(...)`. Calls
/// of it (the word `view` right before `(`, outside strings and comments) are quoted as
/// `"view"(...)`, which names the same function; `CREATE VIEW name` is left alone.
pub fn quote_view_calls(sql: &str) -> String {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return sql.to_string();
    };
    if !tokens.iter().any(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("view"))) {
        return sql.to_string();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    for (i, t) in tokens.iter().enumerate() {
        let call = matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("view"))
            && tokens[i + 1..].iter().find(|n| !matches!(n, Token::Whitespace(_))).is_some_and(|n| *n == Token::LParen);
        if call {
            out.push_str("\"view\"");
        } else {
            out.push_str(&t.to_string());
        }
    }
    out
}

/// Run one SQL statement on a session.
pub async fn execute(ctx: &SessionContext, sql: &str) -> Result<QueryResult> {
    let sql = &quote_view_calls(sql);
    let df = match ctx.sql(sql).await {
        Ok(df) => df,
        Err(e) => return Err(sql_error(e, ctx).await),
    };
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let plan = match df.create_physical_plan().await {
        Ok(p) => p,
        Err(e) => return Err(sql_error(e, ctx).await),
    };
    let batches = match datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx()).await {
        Ok(b) => b,
        Err(e) => return Err(sql_error(e, ctx).await),
    };
    Ok(QueryResult { batches, schema, bytes_scanned: bytes_scanned(plan.as_ref()) })
}

fn bytes_scanned(plan: &dyn ExecutionPlan) -> u64 {
    let own = plan
        .metrics()
        .and_then(|m| m.sum_by_name("bytes_scanned"))
        .map(|v| v.as_usize() as u64)
        .unwrap_or(0);
    own + plan.children().iter().map(|c| bytes_scanned(c.as_ref())).sum::<u64>()
}

/// Run one SQL statement over the shards `spec` names.
pub async fn run_sql(spec: &Path, sql: &str) -> Result<Vec<RecordBatch>> {
    let (ctx, _) = session(spec).await?;
    Ok(execute(&ctx, sql).await?.batches)
}

/// How `recap query` writes a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table; binary and embedding columns summarised.
    Table,
    /// CSV with a header; nested values (lists, structs) as JSON text, binary as hex.
    Csv,
    /// One JSON object per line.
    Json,
    /// A Parquet file (needs --output).
    Parquet,
}

/// Write a result in `format` to `out` (a file) or stdout.
pub fn write_result(r: &QueryResult, format: Format, out: Option<&Path>) -> Result<()> {
    use std::io::Write;
    let schema = r.batches.first().map(|b| b.schema()).unwrap_or_else(|| r.schema.clone());
    if format == Format::Parquet {
        let Some(p) = out else {
            return Err(Error::Usage("--format parquet writes a file: give --output FILE".into()));
        };
        let file = File::create(p).map_err(|e| Error::io("cannot create", p, e))?;
        let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).map_err(|e| Error::data("writing Parquet", e))?;
        for b in &r.batches {
            w.write(b).map_err(|e| Error::data("writing Parquet", e))?;
        }
        w.close().map_err(|e| Error::data("writing Parquet", e))?;
        return Ok(());
    }
    let mut sink: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(File::create(p).map_err(|e| Error::io("cannot create", p, e))?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let ctx = |e: arrow::error::ArrowError| Error::data("writing the result", e);
    match format {
        Format::Table => {
            let t = format_table(&r.batches, &schema)?;
            writeln!(sink, "{t}").map_err(|e| Error::io("cannot write", "the result", e))?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut sink);
            for b in &r.batches {
                w.write(&flat_for_csv(b)?).map_err(ctx)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut sink);
            for b in &r.batches {
                w.write(&widen_f16(b)?).map_err(ctx)?;
            }
            w.finish().map_err(ctx)?;
        }
        Format::Parquet => unreachable!("written above"),
    }
    sink.flush().map_err(|e| Error::io("cannot write", out.map(|p| p.display().to_string()).unwrap_or("stdout".into()), e))
}

/// float16 values as float32 (arrow's JSON and CSV writers do not write float16).
fn widen_f16(b: &RecordBatch) -> Result<RecordBatch> {
    fn widen(t: &DataType) -> DataType {
        match t {
            DataType::Float16 => DataType::Float32,
            DataType::FixedSizeList(f, n) => DataType::FixedSizeList(Arc::new(Field::new(f.name(), widen(f.data_type()), f.is_nullable())), *n),
            DataType::List(f) => DataType::List(Arc::new(Field::new(f.name(), widen(f.data_type()), f.is_nullable()))),
            DataType::Struct(fs) => DataType::Struct(Fields::from(
                fs.iter().map(|f| Field::new(f.name(), widen(f.data_type()), f.is_nullable())).collect::<Vec<_>>(),
            )),
            t => t.clone(),
        }
    }
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        let t = widen(f.data_type());
        let c = if &t == f.data_type() { c.clone() } else { arrow::compute::cast(c, &t).map_err(|e| Error::data("widening float16", e))? };
        fields.push(Field::new(f.name(), t, true));
        cols.push(c);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| Error::data("widening float16", e))
}

/// CSV holds flat values: nested columns become JSON text, binary becomes hex.
fn flat_for_csv(b: &RecordBatch) -> Result<RecordBatch> {
    let b = widen_f16(b)?;
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        match f.data_type() {
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) | DataType::Struct(_) | DataType::Map(..) => {
                let one = RecordBatch::try_new(Arc::new(Schema::new(vec![Field::new("v", f.data_type().clone(), true)])), vec![c.clone()])
                    .map_err(|e| Error::data("csv", e))?;
                let mut buf = Vec::new();
                {
                    let mut w = arrow::json::ArrayWriter::new(&mut buf);
                    w.write(&one).map_err(|e| Error::data("csv", e))?;
                    w.finish().map_err(|e| Error::data("csv", e))?;
                }
                let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_slice(&buf).unwrap_or_default();
                let s: StringArray = (0..c.len())
                    .map(|i| if c.is_null(i) { None } else { rows.get(i).and_then(|r| r.get("v")).map(|v| v.to_string()) })
                    .collect();
                fields.push(Field::new(f.name(), DataType::Utf8, true));
                cols.push(Arc::new(s));
            }
            DataType::Binary | DataType::LargeBinary => {
                let s: StringArray = if let Some(a) = c.as_any().downcast_ref::<BinaryArray>() {
                    (0..a.len()).map(|i| a.is_valid(i).then(|| hex::encode(a.value(i)))).collect()
                } else {
                    let a = c.as_any().downcast_ref::<LargeBinaryArray>().expect("large binary");
                    (0..a.len()).map(|i| a.is_valid(i).then(|| hex::encode(a.value(i)))).collect()
                };
                fields.push(Field::new(f.name(), DataType::Utf8, true));
                cols.push(Arc::new(s));
            }
            t => {
                fields.push(Field::new(f.name(), t.clone(), true));
                cols.push(c.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| Error::data("csv", e))
}

/// Binary values as `<N bytes>`, embeddings as `<float16[D]>` and matrices as `<R × float16[D]>`,
/// so a table of shards stays readable.
fn displayable(a: &ArrayRef) -> (ArrayRef, DataType) {
    let summary = |f: &dyn Fn(usize) -> String| -> (ArrayRef, DataType) {
        let s: StringArray = (0..a.len()).map(|i| a.is_valid(i).then(|| f(i))).collect();
        (Arc::new(s), DataType::Utf8)
    };
    match a.data_type() {
        DataType::Binary => {
            let b = a.as_any().downcast_ref::<BinaryArray>().expect("binary");
            summary(&|i| format!("<{} bytes>", b.value(i).len()))
        }
        DataType::FixedSizeList(f, n) if udf::is_float(f.data_type()) && *n > 8 => {
            let t = type_short(f.data_type());
            summary(&|_| format!("<{t}[{n}]>"))
        }
        DataType::List(f) => match f.data_type() {
            DataType::FixedSizeList(g, n) if udf::is_float(g.data_type()) => {
                let l = a.as_any().downcast_ref::<arrow::array::ListArray>().expect("list");
                let t = type_short(g.data_type());
                summary(&|i| format!("<{} × {t}[{n}]>", l.value_length(i)))
            }
            _ => (a.clone(), a.data_type().clone()),
        },
        DataType::Struct(fields) => {
            let s = a.as_any().downcast_ref::<StructArray>().expect("struct");
            let (cols, new_fields): (Vec<ArrayRef>, Vec<Field>) = s
                .columns()
                .iter()
                .zip(fields.iter())
                .map(|(c, f)| {
                    let (c, t) = displayable(c);
                    (c, Field::new(f.name(), t, true))
                })
                .unzip();
            let out = StructArray::new(Fields::from(new_fields.clone()), cols, s.nulls().cloned());
            (Arc::new(out), DataType::Struct(Fields::from(new_fields)))
        }
        t => (a.clone(), t.clone()),
    }
}

fn type_short(t: &DataType) -> &'static str {
    match t {
        DataType::Float16 => "float16",
        DataType::Float32 => "float32",
        _ => "float64",
    }
}

/// Render batches as a text table, binary and embedding columns summarised. With no rows, the
/// header alone.
pub fn format_table(batches: &[RecordBatch], schema: &SchemaRef) -> Result<String> {
    let mut shown: Vec<RecordBatch> = batches
        .iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| {
            let (cols, fields): (Vec<ArrayRef>, Vec<Field>) = b
                .columns()
                .iter()
                .zip(b.schema().fields())
                .map(|(c, f)| {
                    let (c, t) = displayable(c);
                    (c, Field::new(f.name(), t, true))
                })
                .unzip();
            RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| Error::data("formatting", e))
        })
        .collect::<Result<_>>()?;
    if shown.is_empty() {
        shown.push(RecordBatch::new_empty(schema.clone()));
    }
    let rows: usize = shown.iter().map(|b| b.num_rows()).sum();
    let t = arrow::util::pretty::pretty_format_batches(&shown).map_err(|e| Error::data("formatting", e))?.to_string();
    Ok(format!("{t}\n{rows} row{}", if rows == 1 { "" } else { "s" }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn view_calls_are_quoted_and_nothing_else_changes() {
        let q = "SELECT key, view(image_embeddings, 0) AS v, 'view(' AS s FROM shards -- view(\nWHERE x";
        assert_eq!(
            super::quote_view_calls(q),
            "SELECT key, \"view\"(image_embeddings, 0) AS v, 'view(' AS s FROM shards -- view(\nWHERE x"
        );
        assert_eq!(super::quote_view_calls("CREATE VIEW v AS SELECT 1"), "CREATE VIEW v AS SELECT 1");
    }
}
