//! `filter: { sql: "..." }` in a pipeline: a SQL predicate, evaluated by DataFusion on each
//! shard's rows as they are about to be written (every column, the reinforced ones and the
//! embedding functions included). Ok rows for which it is not true (false or null) become
//! `filtered`, with the predicate as the reason.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Schema};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

use crate::train::data::Teacher;

/// A compiled predicate.
#[derive(Debug)]
pub struct SqlFilter {
    pub sql: String,
    expr: Arc<dyn PhysicalExpr>,
}

impl SqlFilter {
    /// Parse and type-check `sql` against the shard schema; the message says what is wrong.
    pub fn compile(sql: &str, schema: &Schema, teachers: &[Teacher]) -> std::result::Result<SqlFilter, String> {
        let ctx = SessionContext::new();
        super::udf::register(&ctx, teachers);
        let df_schema = DFSchema::try_from(schema.clone()).map_err(|e| e.to_string())?;
        let sql_q = super::quote_view_calls(sql);
        let logical = ctx.parse_sql_expr(&sql_q, &df_schema).map_err(|e| {
            let m = e.to_string();
            if m.contains("No field named") {
                let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                format!("{}; the shard's columns are: {}", m.split("Valid fields are").next().unwrap_or(&m).trim_end(), cols.join(", "))
            } else {
                m
            }
        })?;
        let expr = ctx.create_physical_expr(logical, &df_schema).map_err(|e| e.to_string())?;
        match expr.data_type(schema).map_err(|e| e.to_string())? {
            DataType::Boolean => Ok(SqlFilter { sql: sql.trim().to_string(), expr }),
            t => Err(format!("{sql:?} is a {t} expression; a filter needs a condition (true keeps the row), e.g. clip_score > 0.28 AND width >= 200")),
        }
    }

    /// The condition as written.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Whether each row passes (null counts as not passing).
    pub fn keep(&self, batch: &RecordBatch) -> std::result::Result<Vec<bool>, String> {
        let v = self.expr.evaluate(batch).map_err(|e| format!("filter.sql {:?}: {e}", self.sql))?;
        let a = v.into_array(batch.num_rows()).map_err(|e| e.to_string())?;
        let b = a.as_boolean();
        Ok((0..b.len()).map(|i| b.is_valid(i) && b.value(i)).collect())
    }
}
