//! The shard's Arrow schema, loaded from `schemas/shard.schema.json`: that file is the single
//! source of truth, read by the code and by people, and printed by `recap schema shard`.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use serde::Deserialize;

pub const SHARD_SCHEMA_JSON: &str = include_str!("../../schemas/shard.schema.json");
pub const REINFORCED_SCHEMA_JSON: &str = include_str!("../../schemas/reinforced.schema.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    #[allow(dead_code)]
    name: String,
    version: u32,
    #[allow(dead_code)]
    description: String,
    passthrough_after: String,
    fields: Vec<FieldSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReinforcedFile {
    #[allow(dead_code)]
    name: String,
    version: u32,
    #[allow(dead_code)]
    description: String,
    #[allow(dead_code)]
    after: String,
    fields: Vec<FieldSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldSpec {
    name: String,
    #[serde(rename = "type")]
    ty: TypeSpec,
    nullable: bool,
    #[serde(default)]
    description: String,
    /// Which stage adds the column (reinforced columns only).
    #[serde(default)]
    stage: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TypeSpec {
    Named(String),
    Struct { r#struct: Vec<FieldSpec> },
    List { list: Box<FieldSpec> },
}

fn to_field(f: &FieldSpec) -> Field {
    to_field_dim(f, 0)
}

/// `dim` is the size of the `embedding` type (a fixed-size list of float16).
fn to_field_dim(f: &FieldSpec, dim: i32) -> Field {
    let mut field = Field::new(&f.name, to_type(&f.ty, dim), f.nullable);
    if !f.description.is_empty() {
        field = field.with_metadata([("description".to_string(), f.description.clone())].into());
    }
    field
}

fn to_type(t: &TypeSpec, dim: i32) -> DataType {
    match t {
        TypeSpec::Named(n) if n == "embedding" => DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float16, false)), dim),
        TypeSpec::Named(n) => match n.as_str() {
            "utf8" => DataType::Utf8,
            "binary" => DataType::Binary,
            "bool" => DataType::Boolean,
            "uint8" => DataType::UInt8,
            "uint16" => DataType::UInt16,
            "uint32" => DataType::UInt32,
            "uint64" => DataType::UInt64,
            "int32" => DataType::Int32,
            "int64" => DataType::Int64,
            "float16" => DataType::Float16,
            "float32" => DataType::Float32,
            "float64" => DataType::Float64,
            other => panic!("schemas/shard.schema.json: unknown type {other:?}"),
        },
        TypeSpec::Struct { r#struct } => DataType::Struct(Fields::from(r#struct.iter().map(|f| to_field_dim(f, dim)).collect::<Vec<_>>())),
        TypeSpec::List { list } => DataType::List(Arc::new(to_field_dim(list, dim))),
    }
}

/// The fixed shard schema and where passthrough columns go.
pub struct ShardSchema {
    pub version: u32,
    pub fields: Vec<Field>,
    /// Passthrough columns are inserted after this many fixed fields.
    pub passthrough_at: usize,
}

/// The shard schema (parsed once; the file is embedded at build time and checked by a test).
pub fn shard_schema() -> &'static ShardSchema {
    static S: OnceLock<ShardSchema> = OnceLock::new();
    S.get_or_init(|| {
        let file: SchemaFile = serde_json::from_str(SHARD_SCHEMA_JSON).expect("schemas/shard.schema.json parses");
        let fields: Vec<Field> = file.fields.iter().map(to_field).collect();
        let passthrough_at = fields
            .iter()
            .position(|f| f.name() == &file.passthrough_after)
            .expect("passthrough_after names a field")
            + 1;
        ShardSchema { version: file.version, fields, passthrough_at }
    })
}

/// The full Arrow schema of a shard with these passthrough columns.
pub fn with_passthrough(passthrough: &[Field]) -> SchemaRef {
    let s = shard_schema();
    let mut fields = s.fields[..s.passthrough_at].to_vec();
    fields.extend(passthrough.iter().cloned());
    fields.extend(s.fields[s.passthrough_at..].iter().cloned());
    Arc::new(Schema::new(fields))
}

/// Version of the reinforced columns' layout.
pub fn reinforced_version() -> u32 {
    reinforced_file().version
}

fn reinforced_file() -> &'static ReinforcedFile {
    static S: OnceLock<ReinforcedFile> = OnceLock::new();
    S.get_or_init(|| serde_json::from_str(REINFORCED_SCHEMA_JSON).expect("schemas/reinforced.schema.json parses"))
}

/// The reinforced columns the configured stages add, with embeddings of width `dim`.
pub fn reinforced_fields(caption: bool, score: bool, dim: usize) -> Vec<Field> {
    reinforced_file()
        .fields
        .iter()
        .filter(|f| match f.stage.as_deref() {
            Some("caption") => caption,
            Some("score") => score,
            _ => false,
        })
        .map(|f| to_field_dim(f, dim as i32))
        .collect()
}

/// Hugging Face `datasets` features for a shard schema, as the `huggingface` schema metadata
/// (`{"info": {"features": ...}}`) that `datasets.load_dataset("parquet", ...)` reads: `image`
/// as an `Image` feature (decoded to PIL), strings as strings, embeddings as fixed-length lists.
pub fn huggingface_features(schema: &arrow::datatypes::Schema) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    fn feature(name: &str, t: &DataType) -> Value {
        match t {
            DataType::Struct(fields) if name == "image" && fields.iter().map(|f| f.name().as_str()).eq(["bytes", "path"]) => {
                json!({"_type": "Image"})
            }
            DataType::Struct(fields) => {
                let m: Map<String, Value> = fields.iter().map(|f| (f.name().clone(), feature(f.name(), f.data_type()))).collect();
                Value::Object(m)
            }
            DataType::List(f) | DataType::LargeList(f) => json!({"feature": feature(f.name(), f.data_type()), "_type": "List"}),
            DataType::FixedSizeList(f, n) => json!({"feature": feature(f.name(), f.data_type()), "length": n, "_type": "List"}),
            t => {
                let dtype = match t {
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string",
                    DataType::Binary | DataType::LargeBinary => "binary",
                    DataType::Boolean => "bool",
                    DataType::Float16 => "float16",
                    DataType::Float32 => "float32",
                    DataType::Float64 => "float64",
                    DataType::Int8 => "int8",
                    DataType::Int16 => "int16",
                    DataType::Int32 => "int32",
                    DataType::Int64 => "int64",
                    DataType::UInt8 => "uint8",
                    DataType::UInt16 => "uint16",
                    DataType::UInt32 => "uint32",
                    DataType::UInt64 => "uint64",
                    DataType::Null => "null",
                    _ => "string",
                };
                json!({"dtype": dtype, "_type": "Value"})
            }
        }
    }
    let features: Map<String, Value> = schema.fields().iter().map(|f| (f.name().clone(), feature(f.name(), f.data_type()))).collect();
    json!({"info": {"features": features}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_loads_and_has_the_documented_columns() {
        let s = with_passthrough(&[Field::new("width_in", DataType::Int64, true)]);
        let names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(&names[..5], &["key", "uid", "url", "caption", "width_in"]);
        assert!(names.contains(&"phash"));
        for n in crate::source::RESERVED_COLUMNS {
            assert!(names.contains(n), "{n} is reserved but not in the schema");
        }
    }
}
