//! The engine: input shards in, output shards out, streaming. A reader thread cuts the input
//! into shards and hands them over a bounded channel; up to `engine.shards_in_flight` shards are
//! processed at once; inside a shard, rows wait on one global limit of requests in flight, are
//! downloaded on tokio and decoded/resized/encoded on a CPU pool. Memory is bounded by the
//! channel, the shards in flight and the requests in flight, whatever the input size.

pub mod worker;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, RecordBatch, StringArray};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::{ImageConfig, Plan};
use crate::error::{Error, Result};
use crate::fetch::Fetcher;
use crate::imaging;
use crate::outcome::{Outcome, StageSeconds, Status};
use crate::reinforce::{StageTimes, Stages};
use crate::sink::{self, schema, ShardFile, ShardStats, ShardWriter};
use crate::source::InputShard;

pub use worker::Worker;

/// How to run a plan.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub worker: Worker,
    /// Also re-attempt retryable failures in shards already complete.
    pub retry_failed: bool,
    /// Draw progress bars (only ever drawn on a terminal).
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub worker: Option<Worker>,
    pub shards_total: u64,
    /// Shards this worker processed from the input.
    pub shards_written: Vec<u64>,
    /// Shards this worker found complete and left alone.
    pub shards_skipped: Vec<u64>,
    /// Complete shards rewritten by `--retry-failed`.
    pub shards_retried: Vec<u64>,
    /// Rows in the shards written or retried, per status.
    pub status: BTreeMap<String, u64>,
    pub rows: u64,
    pub rows_retried: u64,
    pub rows_recovered: u64,
    pub bytes_downloaded: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub output_dir: String,
}

enum Job {
    Fresh(InputShard),
    Retry(u64),
}

struct Ctx {
    fetcher: Fetcher,
    /// The model stages (caption, score, filter), when the pipeline has any.
    stages: Option<Arc<Stages>>,
    /// `filter.sql`, compiled against the shard schema.
    sql_filter: Option<Arc<SqlFilter>>,
    global: Arc<Semaphore>,
    /// Shards written as their rows arrive take turns at starting their rows.
    turns: tokio::sync::Mutex<()>,
    pool: rayon::ThreadPool,
    image: Arc<ImageConfig>,
    progress: ProgressBar,
}

struct ShardDone {
    shard: u64,
    retried: bool,
    stats: ShardStats,
    rows_retried: u64,
    rows_recovered: u64,
}

/// Turn the kernel's transparent huge pages off for this process; `recap run` calls it first.
/// A run allocates and frees many small, short-lived buffers (one image each) on several
/// threads. Where transparent huge pages are on (`always`, or `madvise`, which mimalloc asks
/// for), every page the allocator returns and touches again comes back as a fresh 2 MiB page the
/// kernel zeroes: measured on the shapes web, 11% of the CPU in the kernel's `clear_page`, 5% more
/// wall time and 20% more peak memory, and a peak that jumped by tens of MB from run to run. The
/// trainer, whose large tensor buffers live long, keeps them. Returns whether the kernel agreed.
pub fn without_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Hand the memory freed so far back to the OS now; called as each slice of a shard has been
/// built (its rows' images dropped) and once the shard is committed. The binary's allocator
/// (mimalloc 3) otherwise keeps freed pages for 1 s before it returns them, so a run held what it
/// had allocated and freed in the last second: building and encoding a shard lifted anonymous
/// memory by ~8 MB for 25 ms, mimalloc kept that, and a run's peak was the worst coincidence over
/// its shards, which grew with the number of shards (download-only bench, 1000-row shards: 1M
/// rows 84 MB, 3k 61-65). With this, the slices ([`encode_shard`]) and smaller image pages
/// (`sink::shard_properties`), 1M rows peak at 57-60 MB and 3k at 49-53. Nine calls per 1000-row
/// shard cost nothing measurable (shapes bench: wall 1.04x and 0.98x in two turns of 8-10 pairs),
/// unlike a purge on every free (`MIMALLOC_PURGE_DELAY=0`: 12% slower). Under another allocator,
/// or with purging turned off (the trainer), it does nothing.
fn release_freed_memory() {
    // SAFETY: mi_collect takes a flag and only touches the allocator's own state.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Rows encoded at a time when a shard is written (a quarter of a row group).
const WRITE_SLICE: usize = 128;

/// Encode a shard a slice of rows at a time: each slice's batch is built, then its rows' images
/// and reinforcement data (which the batch has copied) are dropped and the memory handed back
/// before the slice is encoded. The shard's images thus exist twice only a slice at a time; a
/// batch of the whole shard built up front held them twice, plus the encoded row group, at every
/// shard write (the largest transient left in a download-only run). `filter.sql` runs per slice:
/// its condition is per row. The outcomes keep their final status and reason, for the stats;
/// the caller commits the file.
#[allow(clippy::too_many_arguments)]
fn encode_shard<'w>(
    writer: &'w ShardWriter,
    stages: Option<&Stages>,
    sql: Option<&SqlFilter>,
    input_fields: &[arrow::datatypes::Field],
    index: u64,
    rps: u64,
    rows: &RecordBatch,
    outcomes: &mut [Outcome],
    reinforced: &mut [Option<crate::reinforce::Reinforcement>],
) -> Result<ShardFile<'w>> {
    let n = rows.num_rows();
    if outcomes.len() != n || !(reinforced.is_empty() || reinforced.len() == n) {
        return Err(Error::Internal(format!("shard {index}: {} outcomes and {} reinforced rows for {n} rows", outcomes.len(), reinforced.len())));
    }
    let mut file: Option<ShardFile<'w>> = None;
    let mut start = 0;
    loop {
        let end = (start + WRITE_SLICE).min(n);
        // Without model stages there is no reinforcement data at all (an empty list).
        let r: &mut [Option<crate::reinforce::Reinforcement>] = if reinforced.is_empty() { &mut [] } else { &mut reinforced[start..end] };
        encode_slice(writer, &mut file, stages, sql, input_fields, index, rps, rows, start, &mut outcomes[start..end], r)?;
        start = end;
        if start >= n {
            break;
        }
    }
    Ok(file.expect("a shard has at least one slice"))
}

/// One slice of a shard, the shard's rows from `first` on (as many as `outcomes`): its batch is
/// built and filtered, its rows' images and reinforcement data dropped and the memory handed back,
/// then it is encoded into `file` (begun with the shard's first slice).
#[allow(clippy::too_many_arguments)]
fn encode_slice<'w>(
    writer: &'w ShardWriter,
    file: &mut Option<ShardFile<'w>>,
    stages: Option<&Stages>,
    sql: Option<&SqlFilter>,
    input_fields: &[arrow::datatypes::Field],
    index: u64,
    rps: u64,
    rows: &RecordBatch,
    first: usize,
    outcomes: &mut [Outcome],
    reinforced: &mut [Option<crate::reinforce::Reinforcement>],
) -> Result<()> {
    let batch = filtered_batch(stages, sql, input_fields, index, rps, first as u64, &rows.slice(first, outcomes.len()), outcomes, reinforced)?;
    for o in outcomes.iter_mut() {
        o.image = None;
    }
    reinforced.iter_mut().for_each(|x| *x = None);
    release_freed_memory();
    let f = match file {
        Some(f) => f,
        None => file.insert(writer.begin(index, &batch.schema())?),
    };
    f.append(&batch)
}

/// Commit an encoded shard with its stats, and hand back what its writing freed.
fn commit_shard(file: ShardFile<'_>, stats: &mut ShardStats) -> Result<()> {
    file.commit(stats)?;
    release_freed_memory();
    Ok(())
}

/// Run a validated plan to completion (or to the first infrastructure error).
pub async fn run(plan: &Plan, opts: &RunOptions) -> Result<RunSummary> {
    let start = Instant::now();
    let cfg = &plan.config;
    // Models load (and are checked) before any row is fetched.
    let stages = Stages::load(cfg, &plan.file)?.map(Arc::new);
    let sql_filter = sql_filter(plan, stages.as_deref())?;
    let extra = stages.as_ref().map(|s| s.metadata()).unwrap_or_default();
    let worker = opts.worker;
    let run_name = format!("worker-{}-of-{}", worker.index, worker.count);
    let writer = Arc::new(ShardWriter::new(
        &cfg.output,
        &plan.config_hash,
        &plan.config_json,
        schema::shard_schema().version,
        extra,
        &run_name,
        move |s| worker.owns(s),
    )?);
    let fetcher = Fetcher::new(&cfg.download).map_err(Error::Internal)?;
    let threads = match cfg.engine.cpu_threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n as usize,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("recap-cpu-{i}"))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the CPU pool: {e}")))?;

    let input = plan.input.clone();
    let total_rows = tokio::task::spawn_blocking(move || input.count_rows())
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let rps = plan.input.rows_per_shard;
    let shards_total = total_rows.div_ceil(rps);
    // Shards past the input's end come from an earlier, longer input: their rows are not in this
    // one, and readers of the output still see them. Said, not deleted.
    let beyond: Vec<u64> = writer.completed_from(shards_total).into_iter().filter(|&s| worker.owns(s)).collect();
    if let (Some(first), Some(last)) = (beyond.first(), beyond.last()) {
        tracing::warn!(
            "{} holds {} committed shard(s) past the input's {shards_total} ({first:05} to {last:05}), written from a longer input; their rows are not in this input, and queries of the output still read them: delete them if the input was cut on purpose",
            writer.location(),
            beyond.len()
        );
    }

    let progress = if opts.progress && std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} rows {rate} ETA {eta} {msg}")
            .expect("valid template")
            .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&rate(state.per_sec()));
            })
            .progress_chars("=> "),
    );

    // Decide which shards to run before counting the work for the progress bar.
    let mut mine_rows = 0u64;
    for s in 0..shards_total {
        if worker.owns(s) && (!writer.is_complete(s) || opts.retry_failed) {
            mine_rows += rps.min(total_rows - s * rps);
        }
    }
    progress.set_length(mine_rows);

    let ctx = Arc::new(Ctx {
        fetcher,
        stages,
        sql_filter,
        global: Arc::new(Semaphore::new(cfg.download.concurrency as usize)),
        turns: tokio::sync::Mutex::new(()),
        pool,
        image: Arc::new(cfg.image.clone()),
        progress: progress.clone(),
    });

    // The reader thread: cuts the input into shards and sends this worker's share.
    let (tx, mut rx) = mpsc::channel::<Result<Job>>(1);
    let reader_plan = plan.input.clone();
    let reader_writer = writer.clone();
    let retry_failed = opts.retry_failed;
    let config_hash = plan.config_hash.clone();
    let mut summary = RunSummary { worker: Some(worker), shards_total, output_dir: cfg.output.path.clone(), ..Default::default() };
    let (skip_tx, skip_rx) = std::sync::mpsc::channel::<u64>();
    let reader = std::thread::Builder::new()
        .name("recap-reader".into())
        .spawn(move || {
            for shard in reader_plan.shards() {
                let job = match shard {
                    Err(e) => Err(e),
                    Ok(s) if !worker.owns(s.index) => continue,
                    Ok(s) => {
                        let marker = if reader_writer.is_complete(s.index) { reader_writer.marker(s.index) } else { None };
                        // A completed shard whose input rows changed since (rows appended to the
                        // list, or edited) is written again: skipping it would lose those rows.
                        let changed = marker.as_ref().and_then(|m| m.input_changed(s.rows.num_rows() as u64, &sink::input_fingerprint(&s.rows)));
                        if let Some(why) = &changed {
                            tracing::warn!(shard = s.index, "shard was completed but {why}: writing it again");
                        }
                        if reader_writer.is_complete(s.index) && changed.is_none() {
                            if let Some(m) = &marker {
                                if m.config_hash != config_hash {
                                    tracing::warn!(shard = s.index, old = %m.config_hash, new = %config_hash,
                                        "shard was completed with a different pipeline config; kept (delete it to redo)");
                                }
                            }
                            if retry_failed {
                                Ok(Job::Retry(s.index))
                            } else {
                                let _ = skip_tx.send(s.index);
                                continue;
                            }
                        } else {
                            Ok(Job::Fresh(s))
                        }
                    }
                };
                let stop = job.is_err();
                if tx.blocking_send(job).is_err() || stop {
                    break;
                }
            }
        })
        .map_err(|e| Error::Internal(format!("cannot start the reader thread: {e}")))?;

    let mut tasks = tokio::task::JoinSet::new();
    let in_flight = cfg.engine.shards_in_flight.max(1) as usize;
    let mut first_error: Option<Error> = None;
    let mut input_done = false;
    loop {
        // Keep up to `in_flight` shards going; collect finished ones as they come.
        while !input_done && tasks.len() < in_flight && first_error.is_none() {
            match rx.recv().await {
                None => input_done = true,
                Some(Err(e)) => first_error = Some(e),
                Some(Ok(job)) => {
                    let ctx = ctx.clone();
                    let writer = writer.clone();
                    let plan = plan.clone();
                    tasks.spawn(async move {
                        match job {
                            Job::Fresh(s) => run_shard(ctx, writer, &plan, s).await,
                            Job::Retry(idx) => retry_shard(ctx, writer, &plan, idx).await,
                        }
                    });
                }
            }
        }
        let Some(joined) = tasks.join_next().await else {
            if input_done || first_error.is_some() {
                break;
            }
            continue;
        };
        match joined {
            Err(e) => first_error.get_or_insert(Error::Internal(format!("shard task failed: {e}"))),
            Ok(Err(e)) => first_error.get_or_insert(e),
            Ok(Ok(done)) => {
                if done.retried {
                    summary.shards_retried.push(done.shard);
                    summary.rows_retried += done.rows_retried;
                    summary.rows_recovered += done.rows_recovered;
                } else {
                    summary.shards_written.push(done.shard);
                }
                summary.rows += done.stats.rows;
                for (k, v) in &done.stats.status {
                    *summary.status.entry(k.clone()).or_default() += v;
                }
                summary.bytes_downloaded += done.stats.bytes_downloaded;
                summary.bytes_written += done.stats.bytes_written;
                let ok = summary.status.get("ok").copied().unwrap_or(0);
                progress.set_message(format!(
                    "| {} shards done | ok {:.1}%",
                    summary.shards_written.len() + summary.shards_retried.len(),
                    100.0 * ok as f64 / summary.rows.max(1) as f64
                ));
                continue;
            }
        };
        // An error: stop taking new shards, let running ones finish so their work is kept.
        rx.close();
    }
    drop(rx);
    let _ = reader.join();
    progress.finish_and_clear();
    if let Some(e) = first_error {
        return Err(e);
    }
    summary.shards_skipped = skip_rx.try_iter().collect();
    summary.shards_written.sort_unstable();
    summary.shards_retried.sort_unstable();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

async fn run_shard(ctx: Arc<Ctx>, writer: Arc<ShardWriter>, plan: &Plan, shard: InputShard) -> Result<ShardDone> {
    if ctx.stages.is_none() {
        return stream_shard(ctx, writer, plan, shard).await;
    }
    let start = Instant::now();
    let urls = url_column(&shard.rows)?;
    let outcomes: Vec<Outcome> = futures::future::join_all(urls.into_iter().map(|u| process_row(ctx.clone(), u))).await;
    let rps = plan.input.rows_per_shard;
    let index = shard.index;
    let config_hash = plan.config_hash.clone();
    let input_fields = plan.input.schema.fields()[2..].iter().map(|f| f.as_ref().clone()).collect::<Vec<_>>();
    let stages = ctx.stages.clone();
    let sql = ctx.sql_filter.clone();
    let stats = tokio::task::spawn_blocking(move || -> Result<ShardStats> {
        let mut outcomes = outcomes;
        let (mut reinforced, times) = run_stages(stages.as_deref(), &shard.rows, &mut outcomes)?;
        let t = Instant::now();
        let file = encode_shard(&writer, stages.as_deref(), sql.as_deref(), &input_fields, index, rps, &shard.rows, &mut outcomes, &mut reinforced)?;
        let mut stats = ShardStats::from_outcomes(index, &outcomes, &config_hash);
        stats.input_sha256 = Some(sink::input_fingerprint(&shard.rows));
        drop((outcomes, reinforced));
        stats.seconds.caption = times.caption;
        stats.seconds.score = times.score;
        stats.seconds.write = t.elapsed().as_secs_f64();
        stats.seconds.wall = start.elapsed().as_secs_f64();
        commit_shard(file, &mut stats)?;
        Ok(stats)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(ShardDone { shard: index, retried: false, stats, rows_retried: 0, rows_recovered: 0 })
}

/// A shard without model stages, written as its rows arrive: each slice of [`WRITE_SLICE`] rows
/// goes to the shard's writer (a blocking task) as soon as all its rows are done, in order, and
/// the writer builds, filters and encodes it exactly as [`encode_shard`] would, so the file is
/// the same. A shard in flight thus holds its rows in flight, those finished ahead of the first
/// unfinished one and the row group being encoded, not every finished row's image until its last
/// row is done; and a row's task exists only once the global limit has let it start, not from the
/// shard's start. Both grew with `rows_per_shard` (30k rows in 10,000-row shards peaked at
/// 107 MB, 84 MB this way). Model stages batch over the whole shard, so shards with stages are
/// written by [`run_shard`] once every row is in.
async fn stream_shard(ctx: Arc<Ctx>, writer: Arc<ShardWriter>, plan: &Plan, shard: InputShard) -> Result<ShardDone> {
    let start = Instant::now();
    let urls = url_column(&shard.rows)?;
    let n = urls.len();
    let rps = plan.input.rows_per_shard;
    let index = shard.index;
    let config_hash = plan.config_hash.clone();
    let input_fields = plan.input.schema.fields()[2..].iter().map(|f| f.as_ref().clone()).collect::<Vec<_>>();
    let sql = ctx.sql_filter.clone();
    let rows = shard.rows;
    let fingerprint = sink::input_fingerprint(&rows);
    let (slices, mut incoming) = mpsc::channel::<Vec<Outcome>>(2);
    let write = tokio::task::spawn_blocking(move || -> Result<ShardStats> {
        let mut file: Option<ShardFile<'_>> = None;
        // The shard's stats, counted as its slices are written (the rows themselves are dropped).
        let mut tally = sink::StatsTally::new(index, &config_hash);
        let mut write_seconds = 0.0;
        while let Some(mut slice) = incoming.blocking_recv() {
            let t = Instant::now();
            encode_slice(&writer, &mut file, None, sql.as_deref(), &input_fields, index, rps, &rows, tally.rows() as usize, &mut slice, &mut [])?;
            for o in &slice {
                tally.add(o);
            }
            drop(slice);
            write_seconds += t.elapsed().as_secs_f64();
        }
        let Some(file) = file.filter(|_| tally.rows() == n as u64) else {
            return Err(Error::Internal(format!("shard {index}: {} of its {n} rows reached the writer", tally.rows())));
        };
        let mut stats = tally.finish();
        stats.input_sha256 = Some(fingerprint);
        stats.seconds.write = write_seconds;
        stats.seconds.wall = start.elapsed().as_secs_f64();
        commit_shard(file, &mut stats)?;
        Ok(stats)
    });

    // The rows start in order, each as the global limit lets it (its task is made only then), and
    // the shards in flight take turns: one starts all its rows before the next starts any (the
    // limit's queue is first come, first served), so they finish one after another.
    let (finish, mut finished_rows) = mpsc::unbounded_channel::<(usize, Outcome)>();
    let starter = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _turn = ctx.turns.lock().await;
            for (i, url) in urls.into_iter().enumerate() {
                let permit = ctx.global.clone().acquire_owned().await.expect("semaphore never closed");
                let (ctx, finish) = (ctx.clone(), finish.clone());
                tokio::spawn(async move {
                    let o = row_outcome(&ctx, url).await;
                    drop(permit);
                    let _ = finish.send((i, o));
                });
            }
        })
    };
    // The rows from the first one not yet handed to the writer (`sent`) to the last one finished:
    // at most the rows in flight and a slice, not a slot per row of the shard.
    let mut window: std::collections::VecDeque<Option<Outcome>> = std::collections::VecDeque::new();
    // Rows handed to the writer, and rows finished from the first one on without a gap.
    let (mut sent, mut finished) = (0usize, 0usize);
    // A shard of no rows still gets its (empty) file.
    if n == 0 {
        let _ = slices.send(Vec::new()).await;
    }
    'rows: while sent < n {
        let Some((i, o)) = finished_rows.recv().await else {
            // Every row task has ended without all rows in (one panicked): the writer sees fewer
            // rows than the shard has and says so.
            break;
        };
        // Row i finishes once and rows before `sent` have all finished, so i >= sent.
        let k = i - sent;
        if window.len() <= k {
            window.resize_with(k + 1, || None);
        }
        window[k] = Some(o);
        while finished < n && window.get(finished - sent).is_some_and(Option::is_some) {
            finished += 1;
        }
        while finished - sent >= WRITE_SLICE || (finished == n && sent < n) {
            let end = (sent + WRITE_SLICE).min(finished);
            let slice: Vec<Outcome> = window.drain(..end - sent).map(|s| s.expect("finished rows have outcomes")).collect();
            sent = end;
            if slices.send(slice).await.is_err() {
                break 'rows;
            }
        }
    }
    // Rows not started yet are not started (the writer failed); rows running finish unheard.
    starter.abort();
    drop(slices);
    let stats = write.await.map_err(|e| Error::Internal(e.to_string()))??;
    Ok(ShardDone { shard: index, retried: false, stats, rows_retried: 0, rows_recovered: 0 })
}

/// Run the model stages over a shard's rows (input columns: url, caption, ...).
fn run_stages(stages: Option<&Stages>, rows: &RecordBatch, outcomes: &mut [Outcome]) -> Result<(Vec<Option<crate::reinforce::Reinforcement>>, StageTimes)> {
    let Some(stages) = stages else { return Ok((Vec::new(), StageTimes::default())) };
    let uids: Vec<Option<String>> = url_column(rows)?.iter().map(|u| u.as_deref().map(sink::url_uid)).collect();
    let alts = rows.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Internal("caption column is not utf8".into()))?;
    let alts: Vec<Option<String>> = (0..alts.len()).map(|i| alts.is_valid(i).then(|| alts.value(i).to_string())).collect();
    stages.run(&uids, &alts, outcomes)
}

/// A shard's record batch (or a slice of it from row `first_row`): the plain columns, then the
/// reinforced ones when there are stages.
#[allow(clippy::too_many_arguments)]
fn shard_batch(
    stages: Option<&Stages>,
    input_fields: &[arrow::datatypes::Field],
    index: u64,
    rps: u64,
    first_row: u64,
    rows: &RecordBatch,
    outcomes: &[Outcome],
    reinforced: &[Option<crate::reinforce::Reinforcement>],
) -> Result<RecordBatch> {
    let schema = sink::schema::with_passthrough(input_fields);
    let batch = sink::build_batch(&schema, index, rps, first_row, rows, outcomes)?;
    let Some(stages) = stages else { return Ok(batch) };
    let mut fields: Vec<arrow::datatypes::FieldRef> = schema.fields().iter().cloned().collect();
    fields.extend(stages.fields().into_iter().map(Arc::new));
    let mut cols = batch.columns().to_vec();
    cols.extend(stages.columns(reinforced, outcomes)?);
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), cols).map_err(|e| Error::data(format!("building shard {index}"), e))
}

/// A progress rate as people read it: whole rows per second, one decimal below 10.
fn rate(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        "0 rows/s".into()
    } else if per_sec < 10.0 {
        format!("{per_sec:.1} rows/s")
    } else {
        format!("{per_sec:.0} rows/s")
    }
}

/// The shard's batch (or slice) after `filter.sql`: ok rows for which the condition is not true become
/// `filtered` (image dropped, as the other filters do) and the batch is rebuilt.
#[allow(clippy::too_many_arguments)]
fn filtered_batch(
    stages: Option<&Stages>,
    sql: Option<&SqlFilter>,
    input_fields: &[arrow::datatypes::Field],
    index: u64,
    rps: u64,
    first_row: u64,
    rows: &RecordBatch,
    outcomes: &mut [Outcome],
    reinforced: &[Option<crate::reinforce::Reinforcement>],
) -> Result<RecordBatch> {
    let batch = shard_batch(stages, input_fields, index, rps, first_row, rows, outcomes, reinforced)?;
    let Some(f) = sql else { return Ok(batch) };
    let keep = f.keep(&batch).map_err(|e| Error::Internal(format!("shard {index}: {e}")))?;
    let mut changed = false;
    for (o, k) in outcomes.iter_mut().zip(keep) {
        if o.status == Status::Ok && !k {
            o.status = Status::Filtered;
            o.reason = Some(format!("filter.sql: {}", f.sql()));
            o.image = None;
            changed = true;
        }
    }
    if !changed {
        return Ok(batch);
    }
    shard_batch(stages, input_fields, index, rps, first_row, rows, outcomes, reinforced)
}

#[cfg(feature = "query")]
pub use crate::query::filter::SqlFilter;

/// Without the `query` feature there is no SQL engine; a pipeline with `filter.sql` is refused.
#[cfg(not(feature = "query"))]
#[derive(Debug)]
pub enum SqlFilter {}

#[cfg(not(feature = "query"))]
impl SqlFilter {
    fn keep(&self, _: &RecordBatch) -> std::result::Result<Vec<bool>, String> {
        match *self {}
    }
    fn sql(&self) -> &str {
        match *self {}
    }
}

/// `filter.sql` compiled against the shard schema these stages write (None without one); a
/// condition that does not parse, names no column or is not a condition is a problem at
/// `filter.sql`, with the shard's columns listed.
pub fn sql_filter(plan: &Plan, stages: Option<&Stages>) -> Result<Option<Arc<SqlFilter>>> {
    let Some(sql) = plan.config.filter.as_ref().and_then(|f| f.sql.as_ref()) else { return Ok(None) };
    let problem = |m: String| Error::Config {
        file: plan.file.clone(),
        problems: crate::error::Problems(vec![crate::error::Problem { path: "filter.sql".into(), message: m }]),
    };
    #[cfg(feature = "query")]
    {
        let input_fields = plan.input.schema.fields()[2..].iter().map(|f| f.as_ref().clone()).collect::<Vec<_>>();
        let schema = schema::with_passthrough(&input_fields);
        let mut fields: Vec<arrow::datatypes::FieldRef> = schema.fields().iter().cloned().collect();
        let mut teachers = Vec::new();
        if let Some(s) = stages {
            fields.extend(s.fields().into_iter().map(Arc::new));
            teachers = s.teachers.iter().map(|(m, d)| crate::train::data::Teacher { model: m.clone(), dim: *d }).collect();
        }
        SqlFilter::compile(sql, &arrow::datatypes::Schema::new(fields), &teachers).map(|f| Some(Arc::new(f))).map_err(problem)
    }
    #[cfg(not(feature = "query"))]
    {
        let _ = (sql, stages);
        Err(problem("needs DataFusion, and this recap was built without the `query` feature (cargo build --features query)".into()))
    }
}

async fn retry_shard(ctx: Arc<Ctx>, writer: Arc<ShardWriter>, plan: &Plan, index: u64) -> Result<ShardDone> {
    let start = Instant::now();
    let w = writer.clone();
    tokio::task::spawn_blocking(move || w.fetch(index)).await.map_err(|e| Error::Internal(e.to_string()))??;
    let paths = writer.paths(index);
    let p = paths.parquet.clone();
    let (batch, _) = tokio::task::spawn_blocking(move || sink::read_shard(&p)).await.map_err(|e| Error::Internal(e.to_string()))??;
    let mut outcomes = sink::outcomes_from_batch(&batch)?;
    let old_stats: ShardStats = std::fs::read(&paths.stats).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let redo: Vec<usize> = (0..outcomes.len()).filter(|&i| outcomes[i].is_retryable()).collect();
    ctx.progress.inc((outcomes.len() - redo.len()) as u64);
    if redo.is_empty() {
        let mut stats = old_stats;
        stats.rows = outcomes.len() as u64;
        stats.bytes_downloaded = 0;
        stats.bytes_written = 0;
        stats.status = ShardStats::from_outcomes(index, &outcomes, &plan.config_hash).status;
        return Ok(ShardDone { shard: index, retried: true, stats, rows_retried: 0, rows_recovered: 0 });
    }
    let urls = url_column(&batch)?;
    let fresh: Vec<Outcome> =
        futures::future::join_all(redo.iter().map(|&i| process_row(ctx.clone(), urls[i].clone()))).await;
    let recovered = fresh.iter().filter(|o| o.status == Status::Ok).count() as u64;
    let mut new_bytes = 0;
    let mut new_secs = StageSeconds::default();
    for (&i, o) in redo.iter().zip(fresh) {
        new_bytes += o.bytes_downloaded;
        new_secs += o.seconds;
        outcomes[i] = o;
    }
    let input_rows = sink::input_rows_from_batch(&batch, &plan.input.schema)?;
    // Its input did not change (else the shard is written afresh, not retried).
    let fingerprint = old_stats.input_sha256.clone().unwrap_or_else(|| sink::input_fingerprint(&input_rows));
    let input_fields = plan.input.schema.fields()[2..].iter().map(|f| f.as_ref().clone()).collect::<Vec<_>>();
    let rps = plan.input.rows_per_shard;
    let attempted = redo.len() as u64;
    let config_hash = plan.config_hash.clone();
    let stages = ctx.stages.clone();
    let sql = ctx.sql_filter.clone();
    let stats = tokio::task::spawn_blocking(move || -> Result<ShardStats> {
        let mut outcomes = outcomes;
        // The model stages run again over every ok row: seeded by uid, kept rows get the same
        // captions and views, and shard-level filters see the recovered rows.
        let (mut reinforced, times) = run_stages(stages.as_deref(), &input_rows, &mut outcomes)?;
        let t = Instant::now();
        let file = encode_shard(&writer, stages.as_deref(), sql.as_deref(), &input_fields, index, rps, &input_rows, &mut outcomes, &mut reinforced)?;
        let mut stats = ShardStats::from_outcomes(index, &outcomes, &config_hash);
        drop((outcomes, reinforced));
        stats.bytes_downloaded = old_stats.bytes_downloaded + new_bytes;
        stats.seconds = old_stats.seconds;
        stats.seconds.stages += new_secs;
        stats.seconds.caption += times.caption;
        stats.seconds.score += times.score;
        stats.seconds.write += t.elapsed().as_secs_f64();
        stats.seconds.wall += start.elapsed().as_secs_f64();
        stats.retried.attempted = old_stats.retried.attempted + attempted;
        stats.retried.recovered = old_stats.retried.recovered + recovered;
        stats.input_sha256 = Some(fingerprint);
        commit_shard(file, &mut stats)?;
        Ok(stats)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    let mut reported = stats;
    reported.bytes_downloaded = new_bytes;
    Ok(ShardDone { shard: index, retried: true, stats: reported, rows_retried: attempted, rows_recovered: recovered })
}

fn url_column(batch: &RecordBatch) -> Result<Vec<Option<String>>> {
    let urls = batch
        .column_by_name("url")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| Error::Internal("rows have no utf8 url column".into()))?;
    Ok((0..urls.len()).map(|i| urls.is_valid(i).then(|| urls.value(i).to_string())).collect())
}

/// Download and process one row when the global limit lets it. Always returns an outcome.
async fn process_row(ctx: Arc<Ctx>, url: Option<String>) -> Outcome {
    let _permit = ctx.global.acquire().await.expect("semaphore never closed");
    row_outcome(&ctx, url).await
}

/// Download and process one row (the caller holds its place in the global limit).
async fn row_outcome(ctx: &Ctx, url: Option<String>) -> Outcome {
    let outcome = match ctx.fetcher.fetch(url.as_deref()).await {
        Err(f) => {
            let mut o = Outcome::failed(f.status, f.reason);
            o.http_status = f.http_status;
            o.attempts = f.attempts;
            o.bytes_downloaded = f.bytes;
            o.seconds.download = f.seconds;
            o
        }
        Ok(body) => {
            let (tx, rx) = oneshot::channel();
            let cfg = ctx.image.clone();
            let bytes = body.bytes.clone();
            ctx.pool.spawn(move || {
                let sha = hex::encode(Sha256::digest(&bytes));
                let r = crate::panics::quietly(|| imaging::process(&bytes, &cfg));
                let _ = tx.send((sha, r));
            });
            let mut o = match rx.await {
                Ok((sha, Ok(Ok(p)))) => Outcome {
                    status: Status::Ok,
                    reason: None,
                    http_status: Some(body.http_status),
                    image: Some(p.image),
                    original_width: Some(p.original_width),
                    original_height: Some(p.original_height),
                    sha256: Some(sha),
                    bytes_downloaded: 0,
                    attempts: 0,
                    seconds: p.seconds,
                },
                Ok((sha, Ok(Err(refused)))) => {
                    let mut reason = refused.reason;
                    if refused.status == Status::DecodeFailed {
                        if let Some(ct) = body.content_type.as_deref().filter(|ct| !ct.starts_with("image/")) {
                            reason.push_str(&format!(" (Content-Type: {ct})"));
                        }
                    }
                    let mut o = Outcome::failed(refused.status, reason);
                    o.http_status = Some(body.http_status);
                    o.sha256 = Some(sha);
                    o.original_width = refused.original.map(|d| d.0);
                    o.original_height = refused.original.map(|d| d.1);
                    o.seconds = refused.seconds;
                    o
                }
                Ok((sha, Err(panic))) => {
                    let mut o = Outcome::failed(Status::DecodeFailed, format!("the image decoder failed on this input (it panicked: {panic})"));
                    o.http_status = Some(body.http_status);
                    o.sha256 = Some(sha);
                    o
                }
                Err(_) => Outcome::failed(Status::DecodeFailed, "the CPU pool dropped the task"),
            };
            o.bytes_downloaded = body.bytes.len() as u64;
            o.attempts = body.attempts;
            o.seconds.download = body.seconds;
            o
        }
    };
    ctx.progress.inc(1);
    outcome
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_turned_off_for_the_process() {
        assert!(super::without_huge_pages());
        // Linux 5.0+ reports the flag in /proc/self/status.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }

    #[test]
    fn rates_read_as_rows_per_second() {
        assert_eq!(super::rate(1234.5678), "1235 rows/s");
        assert_eq!(super::rate(3.125), "3.1 rows/s");
        assert_eq!(super::rate(f64::NAN), "0 rows/s");
    }
}
