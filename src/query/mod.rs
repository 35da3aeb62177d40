//! SQL over shards with DataFusion: the output directory is registered as the table `shards`.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::error::{Error, Result};

/// A session with `shards` registered over every `*.parquet` in `dir`.
pub async fn session(dir: &Path) -> Result<SessionContext> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{} is not a directory of shards", dir.display())));
    }
    let ctx = SessionContext::new();
    let path = format!("{}/", dir.display());
    ctx.register_parquet("shards", &path, ParquetReadOptions::default())
        .await
        .map_err(|e| Error::data(format!("cannot register {} as table shards", dir.display()), e))?;
    Ok(ctx)
}

/// Run one SQL statement over the shards in `dir`.
pub async fn run_sql(dir: &Path, sql: &str) -> Result<Vec<RecordBatch>> {
    let ctx = session(dir).await?;
    let df = ctx.sql(sql).await.map_err(|e| Error::data("SQL", e))?;
    df.collect().await.map_err(|e| Error::data("SQL", e))
}

/// Binary values shown as `<N bytes>` so a table of images stays readable.
fn displayable(a: &ArrayRef) -> (ArrayRef, DataType) {
    match a.data_type() {
        DataType::Binary => {
            let b = a.as_any().downcast_ref::<BinaryArray>().expect("binary");
            let s: StringArray = (0..b.len()).map(|i| b.is_valid(i).then(|| format!("<{} bytes>", b.value(i).len()))).collect();
            (Arc::new(s), DataType::Utf8)
        }
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

/// Render batches as a text table, binary columns summarised.
pub fn format_table(batches: &[RecordBatch]) -> Result<String> {
    let shown: Vec<RecordBatch> = batches
        .iter()
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
    Ok(arrow::util::pretty::pretty_format_batches(&shown).map_err(|e| Error::data("formatting", e))?.to_string())
}
