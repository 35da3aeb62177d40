//! The command line: run, validate, schema, query, dedup, report, export, synth, demo, train, eval, finetune.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config;
use crate::engine::{self, RunOptions, RunSummary, Worker};
use crate::error::{Error, Result};
use crate::synth::{self, ServeOptions, WorldSpec};

/// `recap --version`: the version and whether the JPEG decoder has its SIMD code.
fn long_version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| format!("{}\n{}", env!("CARGO_PKG_VERSION"), crate::imaging::jpeg::simd_note()))
}

/// recap: URL + alt-text lists in, reconciled Parquet shards out.
#[derive(Debug, Parser)]
#[command(name = "recap", version, long_version = long_version(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: download, check, resize and write every input row to shards.
    Run(RunArgs),
    /// Check a pipeline file and its input; report every problem at once.
    Validate(ValidateArgs),
    /// Print the pipeline's JSON Schema or the shard's Arrow schema.
    Schema {
        #[arg(value_enum)]
        which: SchemaKind,
    },
    /// Run SQL over a directory of shards (the table is called `shards`).
    #[cfg(feature = "query")]
    Query(QueryArgs),
    /// Distributed SQL: start a Ballista scheduler or executor (built with `--features cluster`).
    Cluster {
        #[command(subcommand)]
        role: ClusterCommand,
    },
    /// Find exact, near (phash) and optionally semantic duplicates across a run's shards; mark
    /// all but the first of each group `duplicate`, the kept row's key in the reason.
    Dedup(DedupArgs),
    /// Write one self-contained HTML page about a run: funnel, failures, score and size
    /// distributions, sampled thumbnails with captions and scores, duplicates side by side.
    Report(ReportArgs),
    /// Export shards to other formats: `recap export webdataset` (DataCompDR's tar layout).
    Export {
        #[command(subcommand)]
        what: ExportCommand,
    },
    /// Generate a shapeworld (images, masks, depth, captions, URL list), or serve one.
    Synth(SynthArgs),
    /// Generate a small shapeworld, serve it on loopback, run pipelines/demo.yaml on it.
    Demo(DemoArgs),
    /// Train a CLIP student (candle, CPU) from reinforced shards: contrastive + distillation.
    Train(TrainArgs),
    /// Zero-shot classification and retrieval of a student or an ONNX CLIP on an evaluation set.
    Eval(EvalArgs),
    /// Finetune a dense head (segmentation or depth) on a student's patch tokens.
    Finetune(FinetuneArgs),
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The finetuning YAML (see pipelines/finetune-tiny.yaml, `recap schema finetune`).
    pub config: PathBuf,
    /// Override a value, e.g. --set data.fraction=0.1 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Continue from the last checkpoint in output.dir (same seed, task, mode, head and fraction).
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A training run directory, a student model directory (model.safetensors + config.json), or
    /// an ONNX CLIP directory (the teachers).
    #[arg(long)]
    pub model: PathBuf,
    /// The evaluation set (eval.parquet: `recap synth` writes one per world;
    /// tools/eval_from_folders.py makes one from an ImageNet-style folder tree).
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object (zero_shot.<task>.top1, retrieval.image_to_text.r1, ...).
    #[arg(long)]
    pub json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Dense evaluation on a dense dataset (dense.parquet): training-free segmentation from the
    /// class names (MaskCLIP) for a student or a Hugging Face CLIP directory, and the finetuned
    /// head's mIoU or depth errors for a `recap finetune` model.
    #[arg(long)]
    pub dense: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The training YAML (see pipelines/train-tiny.yaml, `recap schema train`).
    pub config: PathBuf,
    /// Override a value, e.g. --set data.shards=out/shards --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest checkpoint in output.dir: same next batch, same loss.
    #[arg(long)]
    pub resume: bool,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SchemaKind {
    Pipeline,
    Shard,
    /// The training file (`recap train`).
    Train,
    /// The finetuning file (`recap finetune`).
    Finetune,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline YAML.
    pub pipeline: PathBuf,
    /// Run only shards s with s % N == I (default: from SLURM_ARRAY_TASK_ID/COUNT or
    /// JOB_COMPLETION_INDEX with RECAP_WORKER_COUNT, else 0/1).
    #[arg(long, value_name = "I/N")]
    pub worker: Option<String>,
    /// Override a pipeline value, e.g. --set download.concurrency=8 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// Also re-attempt retryable failures (timeouts, resets, 5xx, 429) in completed shards.
    #[arg(long)]
    pub retry_failed: bool,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    pub pipeline: PathBuf,
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Directory of shards (or a glob of shard files).
    #[arg(long)]
    pub shards: String,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
    /// Ok rows shown (a seeded random sample).
    #[arg(long, default_value_t = 240)]
    pub sample: usize,
    /// Seed of the sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Webdataset tars in DataCompDR's member layout (<key>.jpg, .txt, .url.txt, .syn.json,
    /// .paug.json, .npz with image_emb and text_emb, .json), for open_clip and `webdataset`.
    Webdataset(ExportWebdatasetArgs),
}

#[derive(Debug, Args)]
pub struct ExportWebdatasetArgs {
    /// Directory of shards (or a glob of shard files).
    #[arg(long)]
    pub shards: String,
    /// Directory for the tar files and manifest.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Samples per tar file.
    #[arg(long, default_value_t = 10_000)]
    pub samples_per_tar: u64,
    /// Rows of these statuses are exported (repeatable; default ok).
    #[arg(long = "status", default_value = "ok")]
    pub statuses: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Directory of shards (or a glob of shard files): all are deduplicated together.
    #[arg(long)]
    pub shards: String,
    /// Near duplicates: perceptual hashes at most this many bits apart (0-15).
    #[arg(long, default_value_t = 4)]
    pub near_bits: u32,
    /// Only exact duplicates (same SHA-256 of the downloaded bytes).
    #[arg(long)]
    pub exact_only: bool,
    /// Also semantic duplicates: the teachers' embeddings of the original images at or above
    /// this cosine (e.g. 0.95), compared within k-means clusters (SemDeDup).
    #[arg(long, value_name = "COSINE")]
    pub semantic: Option<f32>,
    /// Rows per k-means cluster in semantic mode.
    #[arg(long, default_value_t = 1000)]
    pub cluster_size: usize,
    /// Report what would be marked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The SQL statement: the shards are the table `shards`, their stats the table `stats`
    /// (see `\df` in the shell for the embedding functions). Without it: an interactive shell,
    /// or the statements on stdin.
    pub sql: Option<String>,
    /// Directory of shards, a glob of shard files, or one file.
    #[arg(long, default_value = "recap-demo/shards")]
    pub shards: PathBuf,
    /// Output format.
    #[cfg(feature = "query")]
    #[arg(long, value_enum, default_value_t = crate::query::Format::Table)]
    pub format: crate::query::Format,
    /// Write the result to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Print the time taken and the bytes read from the shard files (to stderr).
    #[arg(long)]
    pub timing: bool,
    /// Run the statement on an Apache DataFusion Ballista cluster: df://HOST:PORT of a
    /// `recap cluster scheduler` (needs a recap built with `--features cluster`). The executors
    /// read the shards from the same paths, so they must see the same files.
    #[arg(long, value_name = "df://HOST:PORT")]
    pub cluster: Option<String>,
}

/// `recap cluster`: Ballista's scheduler and executors, with recap's SQL functions.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start a scheduler; `recap query --cluster df://BIND` sends statements to it.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: std::net::SocketAddr,
    },
    /// Start an executor that registers with a scheduler and runs its tasks.
    Executor {
        /// The scheduler's HOST:PORT (or df://HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: String,
        /// Address for the executor's Arrow Flight service (shuffle and result data).
        #[arg(long, default_value = "127.0.0.1:50051")]
        bind: std::net::SocketAddr,
        /// Port of the executor's gRPC service (on the same host as --bind).
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// Tasks run at once (default: the cores there are).
        #[arg(long)]
        concurrent_tasks: Option<usize>,
        /// Directory for shuffle files (default: a temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SynthArgs {
    #[command(subcommand)]
    pub serve: Option<SynthCommand>,
    #[command(flatten)]
    pub generate: SynthGenerate,
}

#[derive(Debug, Subcommand)]
pub enum SynthCommand {
    /// Serve a shapeworld over HTTP on 127.0.0.1 and (re)write its urls.parquet for that address.
    Serve(SynthServe),
}

#[derive(Debug, Args)]
pub struct SynthGenerate {
    /// Directory to write the world into.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Number of samples.
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// Random seed: the same seed gives the same world.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Smallest image size, WxH.
    #[arg(long, default_value = "200x150", value_parser = parse_size)]
    pub min_size: (u32, u32),
    /// Largest image size, WxH.
    #[arg(long, default_value = "1600x1200", value_parser = parse_size)]
    pub max_size: (u32, u32),
    /// Fraction of images written as PNG.
    #[arg(long, default_value_t = 0.1)]
    pub png_fraction: f64,
    /// Number of deliberately corrupt image files.
    #[arg(long, default_value_t = 0)]
    pub corrupt: u64,
    /// Photo-like image files (uneven light, texture, sensor noise: a real photo's JPEG entropy)
    /// instead of flat shapes; masks, depth and eval rows stay the clean scene's.
    #[arg(long)]
    pub photo: bool,
    /// The last N samples are planted duplicates of earlier ones, alternately exact (same bytes)
    /// and near (re-encoded, slightly brighter); urls.parquet's duplicate_of names the original.
    #[arg(long, default_value_t = 0)]
    pub duplicates: u64,
    /// Alt-text noise mix, e.g. clean=0.3,partial=0.2,wrong_attribute=0.2,unrelated=0.1,spam=0.1,filename=0.1
    #[arg(long)]
    pub noise: Option<String>,
    /// Base URL written into urls.parquet.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Faults assigned to rows of the URL list, e.g. 404=10,500=5 (see `recap synth serve --help`).
    #[arg(long, default_value = "")]
    pub faults: String,
}

/// Serve a world. Fault URLs: /f/<fault>/img/<file>, with fault one of 404, 500, flaky, 429,
/// slow, reset, truncated, wrong_type, not_image, redirect, redirect_loop, oversized,
/// oversized_chunked, bomb, opt_out.
#[derive(Debug, Args)]
pub struct SynthServe {
    /// The world directory (from `recap synth --out`).
    pub dir: PathBuf,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Faults assigned to rows of the rewritten URL list, e.g. 404=10,500=5.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// Seed choosing which rows get faults.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Added before every response.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub latency: std::time::Duration,
    /// How long `slow` responses wait.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub slow_delay: std::time::Duration,
    /// Body size of `oversized` responses, in bytes.
    #[arg(long, default_value_t = 25_000_000)]
    pub oversized_bytes: usize,
    /// Side of the `bomb` PNG in pixels.
    #[arg(long, default_value_t = 20_000)]
    pub bomb_side: u32,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory of the demo (world and shards go inside).
    #[arg(long, default_value = "recap-demo")]
    pub dir: PathBuf,
    /// Number of samples in the demo world.
    #[arg(long, default_value_t = 200)]
    pub count: u64,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?}: expected WxH, e.g. 200x150"))?;
    Ok((w.trim().parse().map_err(|_| format!("bad width in {s:?}"))?, h.trim().parse().map_err(|_| format!("bad height in {s:?}"))?))
}

fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    config::units::HumanDuration::parse(s).map(|d| d.0)
}

/// Write to stdout; a closed pipe is reported as an io error the caller treats as success.
macro_rules! out {
    ($($t:tt)*) => {
        writeln!(std::io::stdout().lock(), $($t)*).map_err(|e| Error::io("cannot write", "stdout", e))
    };
}

pub async fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => {
            let plan = config::load(&a.pipeline, &a.set)?;
            let worker = Worker::resolve(a.worker.as_deref(), &|k| std::env::var(k).ok())?;
            let opts = RunOptions { worker, retry_failed: a.retry_failed, progress: !a.no_progress };
            let summary = engine::run(&plan, &opts).await?;
            print_summary(&summary)
        }
        Command::Validate(a) => {
            let label = a.pipeline.display().to_string();
            let text = std::fs::read_to_string(&a.pipeline).map_err(|e| Error::io("cannot read", &a.pipeline, e))?;
            if crate::train::finetune::looks_like_finetune(&text) {
                let cfg = crate::train::finetune::parse_str(&text, &label, &a.set)?;
                return out!("{label}: ok (finetuning file: {:?} head, {:?} encoder, task {:?})", cfg.head.kind, cfg.mode, cfg.task);
            }
            if crate::train::config::looks_like_training(&text) {
                let cfg = crate::train::config::parse_str(&text, &label, &a.set)?;
                let plan = crate::train::plan(cfg, &label)?;
                return out!(
                    "{label}: ok (training file; {} shard file{}, teachers: {}; student {} parameters; {} steps)",
                    plan.shards.files.len(),
                    if plan.shards.files.len() == 1 { "" } else { "s" },
                    plan.shards.teachers.iter().map(|t| format!("{} {}-d", t.model, t.dim)).collect::<Vec<_>>().join(", "),
                    crate::train::model::Clip::expected(&plan.shape)?.values().map(|d| d.iter().product::<usize>()).sum::<usize>(),
                    plan.total_steps
                );
            }
            let cfg = config::parse_file(&a.pipeline, &a.set)?;
            // The input and the model stages (every model loaded, its inputs and outputs
            // checked) are both checked, and their problems reported together.
            let (plan, stages) = match (config::plan(cfg.clone(), &label), crate::reinforce::Stages::load(&cfg, &label)) {
                (Ok(p), Ok(s)) => (p, s),
                (Err(Error::Config { file, problems: mut a }), Err(Error::Config { problems: b, .. })) => {
                    // A path the plan already faulted (a model directory that does not exist) is said once.
                    let said: Vec<String> = a.0.iter().map(|p| p.path.clone()).collect();
                    a.0.extend(b.0.into_iter().filter(|p| !said.contains(&p.path)));
                    return Err(Error::Config { file, problems: a });
                }
                (Err(e), _) | (_, Err(e)) => return Err(e),
            };
            crate::engine::sql_filter(&plan, stages.as_ref())?;
            let models = match stages {
                None => String::new(),
                Some(s) => {
                    let mut parts = Vec::new();
                    if let Some(c) = &plan.config.caption {
                        parts.push(format!("captioner {}", c.model));
                    }
                    parts.extend(s.teachers.iter().map(|(m, d)| format!("teacher {m} ({d}-d)")));
                    format!("; models ok: {}", parts.join(", "))
                }
            };
            if !crate::imaging::jpeg::simd() {
                eprintln!("warning: this recap binary's {}", crate::imaging::jpeg::simd_note());
            }
            out!(
                "{}: ok ({} input file{}, columns: {}; config hash {}{models})",
                a.pipeline.display(),
                plan.input.files.len(),
                if plan.input.files.len() == 1 { "" } else { "s" },
                plan.input.schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
                plan.config_hash
            )
        }
        Command::Schema { which: SchemaKind::Pipeline } => {
            write!(std::io::stdout().lock(), "{}", config::json_schema_text()).map_err(|e| Error::io("cannot write", "stdout", e))
        }
        Command::Eval(a) if a.dense => {
            let report = tokio::task::spawn_blocking(move || -> Result<crate::train::eval::DenseReport> {
                let set = crate::train::dense::DenseSet::open(&a.data)?;
                crate::train::eval::evaluate_dense_zero_shot(&a.model, &set, &crate::train::eval::default_dense_templates(), a.batch_size)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            if a.json {
                out!("{}", serde_json::to_string_pretty(&report).expect("report serialises"))
            } else {
                write!(std::io::stdout().lock(), "{}", crate::train::eval::format_dense_report(&report)).map_err(|e| Error::io("cannot write", "stdout", e))
            }
        }
        Command::Eval(a) => {
            let report = tokio::task::spawn_blocking(move || -> Result<crate::train::eval::EvalReport> {
                let set = crate::train::eval::EvalSet::open(&a.data)?;
                let mut model = crate::train::eval::load_model(&a.model)?;
                let r = crate::train::eval::evaluate(model.as_mut(), &set, a.batch_size)?;
                Ok(r)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            if a.json {
                out!("{}", serde_json::to_string_pretty(&report).expect("report serialises"))
            } else {
                write!(std::io::stdout().lock(), "{}", crate::train::eval::format_report(&report)).map_err(|e| Error::io("cannot write", "stdout", e))
            }
        }
        Command::Schema { which: SchemaKind::Finetune } => write!(std::io::stdout().lock(), "{}", crate::train::finetune::json_schema_text())
            .map_err(|e| Error::io("cannot write", "stdout", e)),
        Command::Finetune(a) => {
            let label = a.config.display().to_string();
            let text = std::fs::read_to_string(&a.config).map_err(|e| Error::io("cannot read", &a.config, e))?;
            let cfg = crate::train::finetune::parse_str(&text, &label, &a.set)?;
            let (progress, resume) = (!a.no_progress, a.resume);
            let s = tokio::task::spawn_blocking(move || crate::train::finetune::run(&cfg, &label, progress, resume)).await.map_err(|e| Error::Internal(e.to_string()))??;
            out!(
                "finetuned {} steps on {} images in {:.1}s, final loss {:.4}{}\nmodel: {}",
                s.steps,
                s.train_images,
                s.seconds,
                s.final_loss,
                match &s.eval {
                    Some(e) => match (&e.segmentation, &e.depth) {
                        (Some(seg), _) => format!("; held-out mIoU {:.3}, pixel accuracy {:.3} ({} images)", seg.miou, seg.pixel_accuracy, e.images),
                        (_, Some(d)) => format!("; held-out depth RMSE {:.3} m, AbsRel {:.3}, δ<1.25 {:.3} ({} images)", d.rmse, d.abs_rel, d.delta1, e.images),
                        _ => String::new(),
                    },
                    None => String::new(),
                },
                s.model_dir
            )
        }
        Command::Schema { which: SchemaKind::Train } => write!(std::io::stdout().lock(), "{}", crate::train::config::json_schema_text())
            .map_err(|e| Error::io("cannot write", "stdout", e)),
        Command::Train(a) => {
            let plan = crate::train::load(&a.config, &a.set)?;
            out!(
                "training {} steps of {} samples on {} shard file{} (teachers: {}) -> {}",
                plan.total_steps,
                plan.config.train.batch_size,
                plan.shards.files.len(),
                if plan.shards.files.len() == 1 { "" } else { "s" },
                plan.shards.teachers.iter().map(|t| format!("{} {}-d", t.model, t.dim)).collect::<Vec<_>>().join(", "),
                plan.config.output.dir
            )?;
            let opts = crate::train::TrainOptions { resume: a.resume, progress: !a.no_progress };
            let s = tokio::task::spawn_blocking(move || crate::train::run(plan, &opts)).await.map_err(|e| Error::Internal(e.to_string()))??;
            out!(
                "trained {} steps ({} samples{}) in {:.1}s: {:.1} samples/s, final loss {:.4}, data wait {:.1}% of wall time{}{}\nmodel: {}",
                s.steps,
                s.samples_seen,
                s.resumed_from.map(|r| format!(", resumed at step {r}")).unwrap_or_default(),
                s.seconds,
                s.samples_per_second,
                s.final_loss,
                100.0 * s.data_wait_share,
                s.last_eval_loss.map(|l| format!(", held-out loss {l:.4}")).unwrap_or_default()
                    + &if s.last_zero_shot.is_empty() {
                        String::new()
                    } else {
                        format!(", zero-shot top-1 {}", s.last_zero_shot.iter().map(|(k, v)| format!("{k} {v:.3}")).collect::<Vec<_>>().join(" "))
                    },
                if s.samples_skipped > 0 { format!(", {} samples skipped (see RECAP_LOG=warn)", s.samples_skipped) } else { String::new() }
                    + &s.filter.as_ref().map(|f| format!("\nCLIP-score filter: {} of {} ok rows have clip_score >= {:.4}", f.kept_rows, f.ok_rows, f.min_clip_score)).unwrap_or_default(),
                s.model_dir
            )
        }
        Command::Schema { which: SchemaKind::Shard } => {
            let schema = crate::sink::schema::with_passthrough(&[]);
            out!("# recap shard schema, version {} (input.passthrough columns go after `caption`)", crate::sink::schema::shard_schema().version)?;
            // Width 0 stands for D, which the models fix at run time.
            let reinforced = crate::sink::schema::reinforced_fields(true, true, 0);
            let mut fields: Vec<arrow::datatypes::Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields.extend(reinforced);
            for (i, f) in fields.iter().enumerate() {
                if i == schema.fields().len() {
                    out!("# reinforced columns, version {} (caption stage: synthetic_captions; score stage: the rest; D = the teachers' dimensions added up)", crate::sink::schema::reinforced_version())?;
                }
                let doc = f.metadata().get("description").cloned().unwrap_or_default();
                out!("{:<22} {:<44} {:<8} {}", f.name(), type_name(f.data_type()), if f.is_nullable() { "null" } else { "not null" }, doc)?;
            }
            Ok(())
        }
        #[cfg(feature = "query")]
        Command::Query(a) => {
            let (ctx, info) = match &a.cluster {
                None => crate::query::session(&a.shards).await?,
                #[cfg(feature = "cluster")]
                Some(url) => crate::query::cluster::session(&a.shards, url).await?,
                #[cfg(not(feature = "cluster"))]
                Some(_) => return Err(no_cluster_feature()),
            };
            match &a.sql {
                Some(sql) => {
                    let t = std::time::Instant::now();
                    let r = match crate::query::execute(&ctx, sql).await {
                        Ok(r) => r,
                        #[cfg(feature = "cluster")]
                        Err(e) if a.cluster.is_some() => return Err(crate::query::cluster::explain(e, a.cluster.as_deref().unwrap_or_default())),
                        Err(e) => return Err(e),
                    };
                    crate::query::write_result(&r, a.format, a.output.as_deref())?;
                    if a.timing {
                        match &a.cluster {
                            None => eprintln!("{:.3}s, {} bytes read from {} shard file(s)", t.elapsed().as_secs_f64(), r.bytes_scanned, info.files.len()),
                            Some(url) => eprintln!("{:.3}s on {url}, {} shard file(s)", t.elapsed().as_secs_f64(), info.files.len()),
                        }
                    }
                    Ok(())
                }
                None => crate::query::shell::run(&ctx, &info, &a.shards, a.format).await,
            }
        }
        #[cfg(feature = "cluster")]
        Command::Cluster { role } => match role {
            ClusterCommand::Scheduler { bind } => crate::query::cluster::run_scheduler(bind).await,
            ClusterCommand::Executor { scheduler, bind, grpc_port, concurrent_tasks, work_dir } => {
                let concurrent_tasks = concurrent_tasks.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
                crate::query::cluster::run_executor(crate::query::cluster::ExecutorOptions { scheduler, bind, grpc_port, concurrent_tasks, work_dir }).await
            }
        },
        #[cfg(not(feature = "cluster"))]
        Command::Cluster { .. } => Err(no_cluster_feature()),
        Command::Report(a) => {
            let opts = crate::report::ReportOptions { sample: a.sample, seed: a.seed, ..Default::default() };
            let (shards, out) = (a.shards.clone(), a.out.clone());
            let t = std::time::Instant::now();
            let s = tokio::task::spawn_blocking(move || crate::report::report(&shards, &out, &opts)).await.map_err(|e| Error::Internal(e.to_string()))??;
            out!(
                "wrote {} ({:.1} MB, {} rows shown of {} in {} shard file(s){}) in {:.1}s",
                a.out.display(),
                s.bytes as f64 / 1e6,
                s.cards,
                s.rows,
                s.files,
                if s.reinforced { "" } else { "; not reinforced: no scores" },
                t.elapsed().as_secs_f64()
            )
        }
        Command::Export { what: ExportCommand::Webdataset(a) } => {
            for st in &a.statuses {
                if crate::outcome::Status::parse(st).is_none() {
                    return Err(Error::Usage(format!("--status {st}: not a status; expected one of {}", crate::outcome::Status::ALL.map(|s| s.as_str()).join(", "))));
                }
            }
            let opts = crate::export::ExportOptions { samples_per_tar: a.samples_per_tar, statuses: a.statuses.clone() };
            let out = a.out.clone();
            let shards = a.shards.clone();
            let s = tokio::task::spawn_blocking(move || crate::export::webdataset(&shards, &out, &opts)).await.map_err(|e| Error::Internal(e.to_string()))??;
            out!(
                "exported {} of {} rows ({}) to {} tar file(s) in {} ({:.1} MB); manifest.json lists them",
                s.samples,
                s.rows,
                a.statuses.join(", "),
                s.tars.len(),
                a.out.display(),
                s.bytes as f64 / 1e6
            )
        }
        Command::Dedup(a) => {
            let opts = crate::dedup::DedupOptions {
                near_bits: (!a.exact_only).then_some(a.near_bits),
                semantic: a.semantic,
                cluster_size: a.cluster_size,
                dry_run: a.dry_run,
            };
            let s = tokio::task::spawn_blocking(move || crate::dedup::dedup(&a.shards, &opts)).await.map_err(|e| Error::Internal(e.to_string()))??;
            out!(
                "{} rows in {} shard file(s), {} ok; duplicates found: {} exact, {} near, {} semantic ({:.2}s)",
                s.rows, s.files, s.ok_rows, s.exact, s.near, s.semantic, s.seconds_find
            )?;
            for f in s.found.iter().take(10) {
                out!("  {}  {}", f.key, f.reason())?;
            }
            if s.found.len() > 10 {
                out!("  ... and {} more (recap query \"SELECT key, reason FROM shards WHERE status = 'duplicate'\")", s.found.len() - 10)?;
            }
            if s.dry_run {
                out!("dry run: nothing written")
            } else if s.shards_rewritten.is_empty() {
                out!("nothing to mark: no shard changed")
            } else {
                out!("marked {} rows duplicate; rewrote {} shard(s) in {:.2}s", s.found.len(), s.shards_rewritten.len(), s.seconds_write)
            }
        }
        Command::Synth(a) => match a.serve {
            Some(SynthCommand::Serve(s)) => serve_world(s).await,
            None => {
                let g = a.generate;
                let out = g.out.ok_or_else(|| Error::Usage("recap synth: --out DIR is required".into()))?;
                let mut spec = WorldSpec {
                    count: g.count,
                    seed: g.seed,
                    min_size: g.min_size,
                    max_size: g.max_size,
                    png_fraction: g.png_fraction,
                    corrupt: g.corrupt,
                    duplicates: g.duplicates,
                    photo: g.photo,
                    ..Default::default()
                };
                if let Some(n) = &g.noise {
                    spec.noise_weights = WorldSpec::parse_noise(n).map_err(|e| Error::Usage(format!("--noise: {e}")))?;
                }
                let faults = synth::parse_faults(&g.faults).map_err(|e| Error::Usage(format!("--faults: {e}")))?;
                let t = std::time::Instant::now();
                let out2 = out.clone();
                let samples = tokio::task::spawn_blocking(move || synth::generate(&out2, &spec))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                let list = synth::write_url_list(&out, &g.base_url, &faults, g.seed)?;
                out!("wrote {} samples to {} in {:.1}s; URL list {}", samples.len(), out.display(), t.elapsed().as_secs_f64(), list.display())
            }
        },
        Command::Demo(a) => demo(a).await,
    }
}

async fn serve_world(s: SynthServe) -> Result<()> {
    let faults = synth::parse_faults(&s.faults).map_err(|e| Error::Usage(format!("--faults: {e}")))?;
    let opts = ServeOptions { latency: s.latency, slow_delay: s.slow_delay, oversized_bytes: s.oversized_bytes, bomb_side: s.bomb_side };
    let server = synth::serve(s.dir.clone(), s.port, opts)
        .await
        .map_err(|e| Error::io("cannot listen on 127.0.0.1 port", s.port.to_string(), e))?;
    let list = synth::write_url_list(&s.dir, &server.base_url(), &faults, s.seed)?;
    out!("serving {} on {} (URL list: {}); Ctrl-C to stop", s.dir.display(), server.base_url(), list.display())?;
    tokio::signal::ctrl_c().await.map_err(|e| Error::io("cannot wait for", "Ctrl-C", e))?;
    server.shutdown();
    Ok(())
}

/// The demo's faults: a few of every kind, so every status shows up.
pub const DEMO_FAULTS: &str =
    "404=4,500=2,flaky=4,429=2,slow=2,reset=2,truncated=2,wrong_type=2,not_image=2,redirect=3,redirect_loop=2,oversized=2,oversized_chunked=1,bomb=2,opt_out=2";

async fn demo(a: DemoArgs) -> Result<()> {
    let world = a.dir.join("world");
    let shards = a.dir.join("shards");
    let spec = WorldSpec {
        count: a.count,
        seed: 42,
        min_size: (160, 120),
        max_size: (640, 480),
        png_fraction: 0.1,
        corrupt: (a.count / 50).max(1),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let w2 = world.clone();
    tokio::task::spawn_blocking(move || synth::generate(&w2, &spec)).await.map_err(|e| Error::Internal(e.to_string()))??;
    out!("1. generated a shapeworld of {} samples in {} ({:.1}s)", a.count, world.display(), t.elapsed().as_secs_f64())?;
    let opts = ServeOptions { latency: std::time::Duration::ZERO, slow_delay: std::time::Duration::from_secs(4), oversized_bytes: 3_000_000, bomb_side: 20_000 };
    let server = synth::serve(world.clone(), 0, opts).await.map_err(|e| Error::io("cannot listen on", "127.0.0.1", e))?;
    let faults = synth::parse_faults(DEMO_FAULTS).map_err(Error::Usage)?;
    let list = synth::write_url_list(&world, &server.base_url(), &faults, 42)?;
    out!("2. serving it on {} with injected faults ({DEMO_FAULTS})", server.base_url())?;
    if shards.exists() {
        std::fs::remove_dir_all(&shards).map_err(|e| Error::io("cannot clear", &shards, e))?;
    }
    let models = fixture_models_dir()?;
    let m = |name: &str| models.join(name).display().to_string();
    let overrides = vec![
        format!("input.path={}", list.display()),
        format!("output.path={}", shards.display()),
        format!("caption.model={}", m("shapeworld-captioner")),
        format!("score.teachers=[{}, {}]", m("shapeworld-clip-a"), m("shapeworld-clip-b")),
    ];
    let config = config::parse_str(DEMO_PIPELINE, "pipelines/demo.yaml", &overrides)?;
    let plan = config::plan(config, "pipelines/demo.yaml")?;
    out!("3. running pipelines/demo.yaml")?;
    let summary = engine::run(&plan, &RunOptions { progress: !a.no_progress, ..Default::default() }).await?;
    server.shutdown();
    print_summary(&summary)?;
    print_examples(&shards, 3)?;
    #[cfg(feature = "query")]
    {
    let sql = "SELECT status, count(*) AS rows, min(reason) AS example_reason FROM shards GROUP BY status ORDER BY rows DESC";
    let (ctx, _) = crate::query::session(&shards).await?;
    let r = crate::query::execute(&ctx, sql).await?;
    out!("\n4. recap query --shards {} \"{sql}\"", shards.display())?;
    out!("{}", crate::query::format_table(&r.batches, &r.schema)?)?;
    // Shapeworld records how each alt-text was made: what did the CLIP-score filter keep?
    let sql = "SELECT noise, count(*) FILTER (WHERE status = 'ok') AS kept, count(*) FILTER (WHERE status = 'filtered') AS filtered, \
               round(avg(clip_score), 3) AS mean_clip_score FROM shards WHERE clip_score IS NOT NULL GROUP BY noise ORDER BY mean_clip_score DESC";
    let r = crate::query::execute(&ctx, sql).await?;
    out!("\n5. the alt-text noise kinds shapeworld recorded, against the CLIP-score filter:\n   recap query --shards {} \"{sql}\"", shards.display())?;
    out!("{}", crate::query::format_table(&r.batches, &r.schema)?)?;
    }
    Ok(())
}

/// The project's fixture models: `models/` in the current directory, or beside an ancestor of
/// the executable (a checkout's target/ directory).
fn fixture_models_dir() -> Result<std::path::PathBuf> {
    crate::models::runtime::in_checkout("models", |d| d.join("shapeworld-captioner").is_dir())
        .map(|d| d.canonicalize().unwrap_or(d))
        .ok_or_else(|| Error::Usage("the fixture models (models/shapeworld-*) were not found: run the demo from a recap checkout".into()))
}

/// A few ok rows of the demo's shards: alt-text, synthetic captions and their CLIP scores.
fn print_examples(shards: &Path, n: usize) -> Result<()> {
    use arrow::array::{Array, Float32Array, ListArray, StringArray};
    let Some(first) = std::fs::read_dir(shards)
        .map_err(|e| Error::io("cannot list", shards, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .min()
    else {
        return Ok(());
    };
    let (b, _) = crate::sink::read_shard(&first)?;
    let col = |name: &str| b.column_by_name(name).cloned();
    let (Some(status), Some(alt), Some(caps), Some(score), Some(syn)) =
        (col("status"), col("caption"), col("synthetic_captions"), col("clip_score"), col("synthetic_clip_scores"))
    else {
        return Ok(());
    };
    let status = status.as_any().downcast_ref::<StringArray>().expect("utf8 status");
    let alt = alt.as_any().downcast_ref::<StringArray>().expect("utf8 caption");
    let caps = caps.as_any().downcast_ref::<ListArray>().expect("list captions");
    let score = score.as_any().downcast_ref::<Float32Array>().expect("f32 score");
    let syn = syn.as_any().downcast_ref::<ListArray>().expect("list scores");
    out!("\nexamples from {}:", first.display())?;
    let mut shown = 0;
    for i in 0..b.num_rows() {
        if status.value(i) != "ok" || shown == n {
            continue;
        }
        shown += 1;
        out!("  alt-text  {:<60} score {:.3}", format!("{:?}", alt.value(i)), score.value(i))?;
        let c = caps.value(i);
        let c = c.as_any().downcast_ref::<StringArray>().expect("utf8");
        let sc = syn.value(i);
        let sc = sc.as_any().downcast_ref::<Float32Array>().expect("f32");
        for j in 0..c.len() {
            out!("  synthetic {:<60} score {:.3}", format!("{:?}", c.value(j)), sc.value(j))?;
        }
        out!("")?;
    }
    Ok(())
}

/// The demo pipeline, built in so `recap demo` works from any directory.
pub const DEMO_PIPELINE: &str = include_str!("../pipelines/demo.yaml");

pub fn print_summary(s: &RunSummary) -> Result<()> {
    let worker = s.worker.map(|w| format!(" (worker {w})")).unwrap_or_default();
    out!(
        "\nrun summary{worker}: {} rows in {:.1}s ({:.0} rows/s)",
        s.rows,
        s.seconds,
        s.rows as f64 / s.seconds.max(1e-9)
    )?;
    out!(
        "  shards: {} in input, {} written, {} already complete (skipped), {} retried",
        s.shards_total,
        s.shards_written.len(),
        s.shards_skipped.len(),
        s.shards_retried.len()
    )?;
    if !s.shards_retried.is_empty() {
        out!("  retried rows: {} re-attempted, {} now ok", s.rows_retried, s.rows_recovered)?;
    }
    let mut by_count: Vec<(&String, &u64)> = s.status.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (k, v) in by_count {
        out!("  {:<20} {:>8}  {:5.1}%", k, v, 100.0 * *v as f64 / s.rows.max(1) as f64)?;
    }
    out!(
        "  downloaded {:.1} MB, wrote {:.1} MB of shards to {}",
        s.bytes_downloaded as f64 / 1e6,
        s.bytes_written as f64 / 1e6,
        Path::new(&s.output_dir).display()
    )
}

/// A compact spelling of an Arrow type for `recap schema shard`: nested fields by name and type
/// (their descriptions live in schemas/), embeddings as `fixed_size_list<float16, D>`.
fn type_name(t: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType as T;
    match t {
        T::Struct(fields) => {
            let inner: Vec<String> = fields.iter().map(|f| format!("{}: {}", f.name(), type_name(f.data_type()))).collect();
            format!("struct<{}>", inner.join(", "))
        }
        T::List(f) | T::LargeList(f) => format!("list<{}>", type_name(f.data_type())),
        T::FixedSizeList(f, n) => {
            let n = if *n == 0 { "D".to_string() } else { n.to_string() };
            format!("fixed_size_list<{}, {n}>", type_name(f.data_type()))
        }
        T::Utf8 | T::LargeUtf8 => "utf8".into(),
        T::Binary | T::LargeBinary => "binary".into(),
        other => other.to_string().to_lowercase(),
    }
}

#[cfg(not(feature = "cluster"))]
fn no_cluster_feature() -> Error {
    Error::Usage("this recap was built without distributed SQL; build it with `cargo build --release --features cluster`".into())
}
