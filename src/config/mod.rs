//! Pipeline files: YAML → JSON value (with `--set` overrides) → checked against the JSON Schema
//! generated from [`model`] (every problem at once, each with its YAML path) → typed config →
//! semantic checks that need the outside world (the input files and their columns) → [`Plan`].

pub mod model;
pub mod stages;
pub mod units;

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use model::*;
pub use stages::*;

use crate::error::{Error, Problem, Problems, Result};
use crate::source::InputPlan;

/// A validated pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: PipelineConfig,
    /// Label of the file it came from, for messages.
    pub file: String,
    /// The resolved config as canonical JSON (stored in shard metadata).
    pub config_json: String,
    /// SHA-256 of `config_json`, first 16 hex digits.
    pub config_hash: String,
    /// The input files and the columns found in them.
    pub input: InputPlan,
    pub output_dir: PathBuf,
}

/// The pipeline's JSON Schema, generated from the config structs.
pub fn json_schema() -> Value {
    let schema = schemars::schema_for!(PipelineConfig);
    serde_json::to_value(schema).expect("schema serialises")
}

/// Pretty JSON text of [`json_schema`], exactly as committed in `schemas/pipeline.schema.json`.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).expect("schema serialises");
    s.push('\n');
    s
}

/// Read, override, check and plan a pipeline file.
pub fn load(path: &Path, overrides: &[String]) -> Result<Plan> {
    let config = parse_file(path, overrides)?;
    plan(config, &path.display().to_string())
}

/// Read a pipeline file and apply the overrides: the typed config, schema-checked but not
/// planned (the input is not opened).
pub fn parse_file(path: &Path, overrides: &[String]) -> Result<PipelineConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read pipeline file", path, e))?;
    parse_str(&text, &path.display().to_string(), overrides)
}

/// YAML text → typed config, reporting every schema problem at once.
pub fn parse_str(text: &str, label: &str, overrides: &[String]) -> Result<PipelineConfig> {
    let mut cfg: PipelineConfig =
        parse_yaml(text, label, overrides, &json_schema(), "input and output (see `recap schema pipeline`)", input_problems_beside)?;
    // A default the user never wrote follows the value they did: `concurrency: 8` alone means
    // at most 8 per host too, not a refusal because the default per_host (16) is larger.
    let per_host_written = overrides.iter().any(|o| o.trim_start().starts_with("download.per_host="))
        || serde_saphyr::from_str::<Value>(text).ok().is_some_and(|v| v.get("download").and_then(|d| d.get("per_host")).is_some());
    if !per_host_written {
        cfg.download.per_host = cfg.download.per_host.min(cfg.download.concurrency);
    }
    cfg.input.storage = cfg.storage.clone();
    cfg.output.storage = cfg.storage.clone();
    Ok(cfg)
}

/// YAML text (+ `--set` overrides) → `T`, checked against `schema` first so that every problem is
/// reported at once with its YAML path. `beside` may add problems found by looking further when
/// the schema check failed. Shared by pipeline and training files.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    label: &str,
    overrides: &[String],
    schema: &Value,
    expected_keys: &str,
    beside: fn(&Value, &[Problem]) -> Vec<Problem>,
) -> Result<T> {
    let config_err = |problems: Vec<Problem>| Error::Config { file: label.to_string(), problems: Problems(problems) };
    let mut value: Value = serde_saphyr::from_str(text).map_err(|e| {
        config_err(vec![Problem { path: String::new(), message: format!("not valid YAML: {e}") }])
    })?;
    if value.is_null() {
        return Err(config_err(vec![Problem {
            path: String::new(),
            message: format!("the file is empty; expected a mapping with {expected_keys}"),
        }]));
    }
    let mut problems = Vec::new();
    for o in overrides {
        if let Err(p) = apply_override(&mut value, o) {
            problems.push(p);
        }
    }
    if !problems.is_empty() {
        return Err(config_err(problems));
    }
    let mut problems = schema_problems(schema, &value);
    if !problems.is_empty() {
        problems.extend(beside(&value, &problems));
        return Err(config_err(problems));
    }
    serde_json::from_value(value).map_err(|e| config_err(vec![Problem { path: String::new(), message: e.to_string() }]))
}

/// When the file has schema problems elsewhere, the input is still opened and its columns
/// checked, so that one `recap validate` shows every problem: the `input` keys that are sound
/// (no problem at their path; unknown keys dropped) are read, and what is wrong with the input
/// they name is added. Nothing is added when `input` itself is unusable.
fn input_problems_beside(value: &Value, found: &[Problem]) -> Vec<Problem> {
    let Some(Value::Object(input)) = value.get("input") else { return Vec::new() };
    if found.iter().any(|p| p.path == "input" || p.path.is_empty()) {
        return Vec::new();
    }
    let faulty = |key: &str| {
        let at = format!("input.{key}");
        found.iter().any(|p| p.path == at || p.path.starts_with(&format!("{at}[")) || p.path.starts_with(&format!("{at}.")))
    };
    // The keys InputConfig has, from its own schema (the struct is the one source of truth).
    let schema = serde_json::to_value(schemars::schema_for!(InputConfig)).expect("schema serialises");
    let known = known_keys(&schema, "");
    let sound: serde_json::Map<String, Value> =
        input.iter().filter(|(k, _)| known.contains(k) && !faulty(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    match serde_json::from_value::<InputConfig>(Value::Object(sound)) {
        Ok(cfg) => InputPlan::open(&cfg).err().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Semantic checks on a typed config: the input exists and has the columns named.
pub fn plan(config: PipelineConfig, label: &str) -> Result<Plan> {
    let mut problems = Vec::new();
    let input = match InputPlan::open(&config.input) {
        Ok(input) => Some(input),
        Err(mut ps) => {
            problems.append(&mut ps);
            None
        }
    };
    if config.download.per_host > config.download.concurrency {
        problems.push(Problem {
            path: "download.per_host".into(),
            message: format!(
                "{} is more than download.concurrency ({}); expected at most the global limit",
                config.download.per_host, config.download.concurrency
            ),
        });
    }
    if config.image.format == ImageFormat::Webp && config.image.quality != ImageConfig::default().quality {
        problems.push(Problem {
            path: "image.quality".into(),
            message: "WebP images are written lossless, so quality has no effect; remove it or choose format: jpeg".into(),
        });
    }
    if let Some(level) = config.output.compression_level {
        let ok = match config.output.compression {
            Compression::Zstd => (1..=22).contains(&level),
            Compression::Gzip => level <= 9,
            _ => false,
        };
        if !ok {
            problems.push(Problem {
                path: "output.compression_level".into(),
                message: format!(
                    "{level} is not a level of {:?} compression; expected 1–22 for zstd, 0–9 for gzip, none for others",
                    config.output.compression
                ),
            });
        }
    }
    stage_problems(&config, &mut problems);
    if config.output.path.trim().is_empty() {
        problems.push(Problem { path: "output.path".into(), message: "empty; expected a directory".into() });
    } else if let Some(p) = crate::storage::unsupported_scheme(&config.output.path, false) {
        problems.push(Problem { path: "output.path".into(), message: p });
    }
    if !problems.is_empty() {
        return Err(Error::Config { file: label.to_string(), problems: Problems(problems) });
    }
    let config_json = serde_json::to_string(&config).expect("config serialises");
    let config_hash = hex::encode(&Sha256::digest(config_json.as_bytes())[..8]);
    Ok(Plan {
        output_dir: PathBuf::from(&config.output.path),
        config,
        file: label.to_string(),
        config_json,
        config_hash,
        input: input.expect("no problems means the input opened"),
    })
}

/// Checks of the model stages that the schema cannot express.
fn stage_problems(config: &PipelineConfig, problems: &mut Vec<Problem>) {
    let mut dir = |path: String, d: &str| {
        if !Path::new(d).is_dir() {
            problems.push(Problem { path, message: format!("{d:?} is not a directory; expected a model directory") });
        }
    };
    if let Some(c) = &config.caption {
        dir("caption.model".into(), &c.model);
    }
    if let Some(s) = &config.score {
        for (i, t) in s.teachers.iter().enumerate() {
            dir(format!("score.teachers[{i}]"), t);
        }
    }
    if let Some(c) = &config.caption {
        if c.decoding == DecodingKind::Greedy && c.num_captions > 1 {
            problems.push(Problem {
                path: "caption.num_captions".into(),
                message: format!("{} captions with greedy decoding would all be the same; expected 1, or decoding: sample or beam", c.num_captions),
            });
        }
        if c.decoding == DecodingKind::Beam && c.num_captions > c.beam_width {
            problems.push(Problem {
                path: "caption.num_captions".into(),
                message: format!("{} is more than caption.beam_width ({}); beam search returns at most beam_width captions", c.num_captions, c.beam_width),
            });
        }
    }
    if let Some(s) = &config.score {
        if s.augment.min_scale > s.augment.max_scale {
            problems.push(Problem { path: "score.augment.min_scale".into(), message: "is more than max_scale".into() });
        }
    }
    if let Some(f) = &config.filter {
        let scores = [("filter.min_alt_score", f.min_alt_score.is_some()), ("filter.min_best_synthetic_score", f.min_best_synthetic_score.is_some()), ("filter.top_percent", f.top_percent.is_some())];
        for (path, set) in scores {
            if set && config.score.is_none() {
                problems.push(Problem { path: path.into(), message: "needs CLIP scores; add a score stage".into() });
            }
        }
        let synthetic = f.min_best_synthetic_score.is_some() || (f.top_percent.is_some() && f.rank_by == RankBy::BestSyntheticScore);
        if synthetic && config.caption.is_none() {
            problems.push(Problem { path: "filter".into(), message: "ranks or thresholds synthetic captions; add a caption stage".into() });
        }
        if let (Some(lo), Some(hi)) = (f.min_caption_words, f.max_caption_words) {
            if lo > hi {
                problems.push(Problem { path: "filter.min_caption_words".into(), message: format!("{lo} is more than max_caption_words ({hi})") });
            }
        }
    }
}

/// Every place where `value` breaks the schema.
fn schema_problems(schema: &Value, value: &Value) -> Vec<Problem> {
    let validator = jsonschema::validator_for(schema).expect("the generated schema is valid");
    let mut problems: Vec<Problem> = validator
        .iter_errors(value)
        .map(|e| {
            let path = pointer_to_path(e.instance_path().as_str());
            let eval = e.evaluation_path().to_string();
            match e.kind() {
                jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                    let known = known_keys(schema, &eval);
                    let keys: Vec<String> = unexpected.iter().map(|k| join_path(&path, k)).collect();
                    // A block written one level too deep (`storage:` under `input:`, say).
                    let top = if path.is_empty() { Vec::new() } else { known_keys(schema, "") };
                    let misplaced: Vec<&String> = unexpected.iter().filter(|k| top.contains(k)).collect();
                    let hint = match misplaced.as_slice() {
                        [] => String::new(),
                        [k] => format!(" (`{k}` is a top-level block, not a key of `{path}`)"),
                        ks => format!(" ({} are top-level blocks, not keys of `{path}`)", ks.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")),
                    };
                    Problem {
                        path: keys.join(", "),
                        message: format!(
                            "unknown key{}; expected one of: {}{hint}",
                            if unexpected.len() == 1 { "" } else { "s" },
                            known.join(", ")
                        ),
                    }
                }
                jsonschema::error::ValidationErrorKind::Required { property } => Problem {
                    path: join_path(&path, property.as_str().unwrap_or("?")),
                    message: "missing; this key is required".into(),
                },
                jsonschema::error::ValidationErrorKind::AnyOf { .. }
                | jsonschema::error::ValidationErrorKind::OneOfNotValid { .. } => {
                    let found = e.instance().to_string();
                    let def = def_at(schema, &eval);
                    let expected = match def.as_deref() {
                        Some("Duration") => "a duration such as 10s, 500ms or 2m".to_string(),
                        Some("ByteSize") => "a size such as 20MB, 512KiB or a number of bytes".to_string(),
                        Some(name) => match enum_values(schema, name) {
                            Some(values) => format!("one of {values}"),
                            None => format!("a {name}"),
                        },
                        None => "another value".into(),
                    };
                    Problem { path, message: format!("{found} is not valid; expected {expected}") }
                }
                _ => Problem { path, message: e.to_string() },
            }
        })
        .collect();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    problems
}

fn enum_values(schema: &Value, def: &str) -> Option<String> {
    let d = schema.get("$defs")?.get(def)?;
    let mut values = Vec::new();
    if let Some(e) = d.get("enum").and_then(Value::as_array) {
        values.extend(e.iter().map(|v| v.to_string()));
    }
    if let Some(one_of) = d.get("oneOf").and_then(Value::as_array) {
        for v in one_of {
            if let Some(c) = v.get("const") {
                values.push(c.to_string());
            }
            if let Some(e) = v.get("enum").and_then(Value::as_array) {
                values.extend(e.iter().map(|v| v.to_string()));
            }
        }
    }
    (!values.is_empty()).then(|| values.join(", "))
}

/// Follow an evaluation path (which names `$ref` hops) through the schema, up to but not including
/// its last segment (the failing keyword). Returns the node reached and the last `$defs` name
/// entered on the way.
fn walk<'a>(schema: &'a Value, eval: &str) -> (&'a Value, Option<String>) {
    let mut node = schema;
    let mut def = None;
    let segs: Vec<&str> = eval.trim_start_matches('/').split('/').collect();
    for seg in &segs[..segs.len().saturating_sub(1)] {
        if *seg == "$ref" {
            if let Some(r) = node.get("$ref").and_then(Value::as_str) {
                let name = r.rsplit('/').next().unwrap_or(r);
                if let Some(n) = schema.get("$defs").and_then(|d| d.get(name)) {
                    node = n;
                    def = Some(name.to_string());
                }
            }
        } else if let Some(n) = node.get(*seg).or_else(|| seg.parse::<usize>().ok().and_then(|k| node.get(k))) {
            node = n;
        }
    }
    (node, def)
}

/// The `$defs` type whose anyOf/oneOf failed; `None` when the keyword is not inside one.
fn def_at(schema: &Value, eval: &str) -> Option<String> {
    let (node, def) = walk(schema, eval);
    // Option<Enum> fields are `anyOf: [{$ref}, {type: null}]`: name the referenced type.
    if let Some(r) = node.get("anyOf").and_then(Value::as_array).and_then(|a| a.iter().find_map(|v| v.get("$ref")?.as_str())) {
        return r.rsplit('/').next().map(str::to_string);
    }
    def
}

/// The property names of the schema object at the evaluation path of an additionalProperties error.
fn known_keys(schema: &Value, eval: &str) -> Vec<String> {
    let (node, _) = walk(schema, eval);
    node.get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn join_path(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

/// `/input/passthrough/1` → `input.passthrough[1]`.
fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// Apply `key.path=value` to the YAML tree; the value is read as YAML (`8`, `true`, `10s`, `[a, b]`).
pub fn apply_override(root: &mut Value, spec: &str) -> std::result::Result<(), Problem> {
    let Some((path, raw)) = spec.split_once('=') else {
        return Err(Problem {
            path: spec.to_string(),
            message: "--set expects key.path=value, e.g. --set download.concurrency=8".into(),
        });
    };
    let path = path.trim();
    let value: Value = if raw.trim().is_empty() {
        Value::String(String::new())
    } else {
        serde_saphyr::from_str(raw).map_err(|e| Problem {
            path: path.to_string(),
            message: format!("--set value {raw:?} is not valid YAML: {e}"),
        })?
    };
    let mut node = root;
    let segs: Vec<&str> = path.split('.').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(Problem { path: path.to_string(), message: "--set key path has an empty segment".into() });
    }
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        if node.is_null() {
            *node = Value::Object(Default::default());
        }
        node = match node {
            Value::Object(map) => {
                if last {
                    map.insert(seg.to_string(), value);
                    return Ok(());
                }
                map.entry(seg.to_string()).or_insert(Value::Null)
            }
            Value::Array(items) => {
                let idx: usize = seg.parse().map_err(|_| Problem {
                    path: path.to_string(),
                    message: format!("{seg:?} is not a list index"),
                })?;
                let len = items.len();
                let slot = items.get_mut(idx).ok_or_else(|| Problem {
                    path: path.to_string(),
                    message: format!("index {idx} is past the end of a list of {len}"),
                })?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => {
                return Err(Problem {
                    path: path.to_string(),
                    message: format!("{:?} is not a mapping, cannot set a key inside it", segs[..i].join(".")),
                })
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_paths() {
        assert_eq!(pointer_to_path("/input/passthrough/1"), "input.passthrough[1]");
        assert_eq!(pointer_to_path(""), "");
    }

    #[test]
    fn overrides_set_nested_values() {
        let mut v: Value = serde_saphyr::from_str("download:\n  concurrency: 4\n").unwrap();
        apply_override(&mut v, "download.concurrency=8").unwrap();
        apply_override(&mut v, "image.size=128").unwrap();
        apply_override(&mut v, "download.timeout=2s").unwrap();
        assert_eq!(v["download"]["concurrency"], 8);
        assert_eq!(v["image"]["size"], 128);
        assert_eq!(v["download"]["timeout"], "2s");
        assert!(apply_override(&mut v, "nonsense").is_err());
    }
}
