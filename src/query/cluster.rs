//! Distributed SQL on Apache DataFusion Ballista (cargo feature `cluster`).
//!
//! `recap cluster scheduler` and `recap cluster executor` start Ballista's scheduler and
//! executors through its library API, in this binary, so that recap's functions run where the
//! plan runs. `recap query --cluster df://HOST:PORT` plans on the client as a local query does
//! (the same `shards` and `stats` tables, the same functions) and sends the plan to the scheduler.
//!
//! What crosses the wire: plans are protobuf (datafusion-proto). A recap function goes with a
//! payload naming the teachers it was made for ([`udf::wire_payload`]), so the scheduler and the
//! executors rebuild it without reading the shards' footers; the `stats` table (in memory on the
//! client) goes as Arrow IPC inside the plan. The shards are read by the executors from the
//! paths the client resolved: on more than one machine they must be on a shared file system
//! (or read through `recap query`'s object-store cache on a shared volume).

use std::any::Any;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use ballista::prelude::SessionContextExt;
use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result as DfResult, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::datasource::MemTable;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan, ScalarUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use super::{udf, ShardInfo};
use crate::error::{Error, Result};

/// Ballista's logical codec, plus recap's functions and in-memory tables (`stats`).
#[derive(Debug, Default)]
pub struct LogicalCodec {
    inner: BallistaLogicalExtensionCodec,
}

const MEM_TAG: &[u8] = b"recap-memtable/1:";

fn encode_mem(mem: &MemTable, buf: &mut Vec<u8>) -> DfResult<()> {
    let schema = TableProvider::schema(mem);
    let mut ipc = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut ipc, &schema)?;
        for part in &mem.batches {
            let batches = part
                .try_read()
                .map_err(|_| DataFusionError::Execution("an in-memory table is being written while a plan is sent".into()))?;
            for b in batches.iter() {
                w.write(b)?;
            }
        }
        w.finish()?;
    }
    buf.extend_from_slice(MEM_TAG);
    buf.extend(ipc);
    Ok(())
}

fn decode_mem(ipc: &[u8]) -> DfResult<MemTable> {
    let reader = StreamReader::try_new(std::io::Cursor::new(ipc), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    MemTable::try_new(schema, vec![batches])
}

/// Append a recap function's payload to `buf`; false (nothing written) for another function.
fn encode_udf(node: &ScalarUDF, buf: &mut Vec<u8>) -> bool {
    match udf::wire_payload(node) {
        Some(p) => {
            buf.extend(p);
            true
        }
        None => false,
    }
}

fn decode_udf(name: &str, buf: &[u8]) -> Option<DfResult<Arc<ScalarUDF>>> {
    udf::from_wire(name, buf).map(|r| r.map(Arc::new))
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(&self, buf: &[u8], inputs: &[LogicalPlan], ctx: &TaskContext) -> DfResult<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: arrow::datatypes::SchemaRef,
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn TableProvider>> {
        match buf.strip_prefix(MEM_TAG) {
            Some(ipc) => Ok(Arc::new(decode_mem(ipc)?)),
            None => self.inner.try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(&self, table_ref: &TableReference, node: Arc<dyn TableProvider>, buf: &mut Vec<u8>) -> DfResult<()> {
        let any: &dyn Any = node.as_ref();
        match any.downcast_ref::<MemTable>() {
            Some(mem) => encode_mem(mem, buf),
            None => self.inner.try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(&self, buf: &[u8], ctx: &TaskContext) -> DfResult<Arc<dyn FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(&self, buf: &mut Vec<u8>, node: Arc<dyn FileFormatFactory>) -> DfResult<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<ScalarUDF>> {
        decode_udf(name, buf).unwrap_or_else(|| self.inner.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        if encode_udf(node, buf) {
            return Ok(());
        }
        self.inner.try_encode_udf(node, buf)
    }
}

/// Ballista's physical codec (shuffles), plus recap's functions.
#[derive(Debug, Default)]
pub struct PhysicalCodec {
    inner: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.inner.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(&self, node: Arc<dyn ExecutionPlan>, buf: &mut Vec<u8>, proto_converter: &dyn PhysicalProtoConverterExtension) -> DfResult<()> {
        self.inner.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<ScalarUDF>> {
        decode_udf(name, buf).unwrap_or_else(|| self.inner.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        if encode_udf(node, buf) {
            return Ok(());
        }
        self.inner.try_encode_udf(node, buf)
    }
}

/// `df://host:port` (Ballista's form) or `host:port`, checked and normalised.
pub fn scheduler_url(url: &str) -> Result<String> {
    match host_port(url) {
        Some((host, port)) => Ok(format!("df://{host}:{port}")),
        None => Err(Error::Usage(format!("--cluster {url:?}: expected df://HOST:PORT (the address `recap cluster scheduler` listens on)"))),
    }
}

/// (host, port) of `df://host:port` or `host:port`; `None` unless both are there and the port
/// is 1-65535.
fn host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.strip_prefix("df://").unwrap_or(addr).rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    (!host.is_empty() && !host.contains('/')).then_some((host, port))
}

/// A statement's error as a user should read it: a scheduler that cannot be reached is said so,
/// with what to do; other errors are left as they are.
pub fn explain(e: Error, url: &str) -> Error {
    let msg = e.to_string();
    if !(msg.contains("tcp connect error") || msg.contains("transport error") || msg.contains("Transport")) {
        return e;
    }
    let why = ["Connection refused", "timed out", "No route to host", "failed to lookup address", "dns error"]
        .into_iter()
        .find(|w| msg.contains(w))
        .map(|w| w.to_lowercase())
        .unwrap_or(msg);
    Error::Data {
        context: format!("cannot reach the Ballista scheduler at {url}; is `recap cluster scheduler --bind HOST:PORT` running there?"),
        source: Box::new(std::io::Error::other(why)),
    }
}

/// A session whose plans run on the Ballista cluster at `url`, with the shards `spec` names.
/// The scheduler is not contacted until the first statement runs.
pub async fn session(spec: &Path, url: &str) -> Result<(SessionContext, ShardInfo)> {
    let url = scheduler_url(url)?;
    let info = super::inspect(spec)?;
    let config = SessionConfig::new_with_ballista()
        .with_information_schema(true)
        .with_ballista_logical_extension_codec(Arc::new(LogicalCodec::default()))
        .with_ballista_physical_extension_codec(Arc::new(PhysicalCodec::default()))
        .with_ballista_job_name("recap query");
    let state = SessionStateBuilder::new().with_config(config).with_default_features().build();
    let ctx = SessionContext::remote_with_state(&url, state).await.map_err(|e| Error::data(format!("cannot set up a session on {url}"), e))?;
    let info = super::register(&ctx, info).await?;
    Ok((ctx, info))
}

/// Run a Ballista scheduler on `bind` until the process is stopped.
pub async fn run_scheduler(bind: SocketAddr) -> Result<()> {
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        bind_port: bind.port(),
        external_host: bind.ip().to_string(),
        override_logical_codec: Some(Arc::new(LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(PhysicalCodec::default())),
        ..Default::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(|e| Error::Internal(format!("scheduler: {e}")))?;
    tracing::info!(%bind, "ballista scheduler listening");
    eprintln!("recap cluster scheduler: listening on {bind} (clients: recap query --cluster df://{bind} ...)");
    ballista_scheduler::scheduler_process::start_server(cluster, bind, Arc::new(config))
        .await
        .map_err(|e| Error::Internal(format!("scheduler on {bind}: {e}")))
}

/// Where an executor listens and whom it serves.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// `host:port` of the scheduler.
    pub scheduler: String,
    /// Address to listen on (Arrow Flight: the shuffle and result data).
    pub bind: SocketAddr,
    /// Port of the executor's gRPC service (tasks from the scheduler).
    pub grpc_port: u16,
    /// Tasks run at once.
    pub concurrent_tasks: usize,
    /// Where shuffle files go (a temporary directory when not set).
    pub work_dir: Option<PathBuf>,
}

/// The functions an executor resolves by name: Ballista's default registry lacks DataFusion's
/// nested (array) functions, which a local session has (`array_max` and the like), so every
/// function of a default session is added. recap's own come with the plan ([`udf::wire_payload`]).
fn function_registry() -> ballista_core::registry::BallistaFunctionRegistry {
    use datafusion::execution::SessionStateDefaults;
    let mut r = ballista_core::registry::BallistaFunctionRegistry::default();
    for f in SessionStateDefaults::default_scalar_functions() {
        r.scalar_functions.insert(f.name().to_string(), f);
    }
    for f in SessionStateDefaults::default_aggregate_functions() {
        r.aggregate_functions.insert(f.name().to_string(), f);
    }
    for f in SessionStateDefaults::default_window_functions() {
        r.window_functions.insert(f.name().to_string(), f);
    }
    r
}

/// Run a Ballista executor registered with the scheduler until the process is stopped.
pub async fn run_executor(o: ExecutorOptions) -> Result<()> {
    use ballista_executor::executor_process::{start_executor_process, ExecutorProcessConfig};
    let (host, port) = host_port(&o.scheduler).ok_or_else(|| Error::Usage(format!("--scheduler {:?}: expected HOST:PORT", o.scheduler)))?;
    if o.concurrent_tasks == 0 {
        return Err(Error::Usage("--concurrent-tasks must be at least 1".into()));
    }
    let config = ExecutorProcessConfig {
        bind_host: o.bind.ip().to_string(),
        external_host: (!o.bind.ip().is_unspecified()).then(|| o.bind.ip().to_string()),
        port: o.bind.port(),
        grpc_port: o.grpc_port,
        scheduler_host: host.to_string(),
        scheduler_port: port,
        scheduler_connect_timeout_seconds: 30,
        vcores: o.concurrent_tasks,
        work_dir: o.work_dir.map(|p| p.display().to_string()),
        print_thread_info: false,
        override_logical_codec: Some(Arc::new(LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(PhysicalCodec::default())),
        override_function_registry: Some(Arc::new(function_registry())),
        ..Default::default()
    };
    eprintln!(
        "recap cluster executor: flight on {}, grpc on port {}, scheduler {}:{}, {} task(s) at once",
        o.bind, o.grpc_port, config.scheduler_host, config.scheduler_port, o.concurrent_tasks
    );
    start_executor_process(Arc::new(config)).await.map_err(|e| Error::Internal(format!("executor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{RecordBatch, StringArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn scheduler_urls() {
        assert_eq!(scheduler_url("df://127.0.0.1:50050").unwrap(), "df://127.0.0.1:50050");
        assert_eq!(scheduler_url("localhost:1").unwrap(), "df://localhost:1");
        for bad in ["df://", "df://host", "http://x:1/", "df://:50050", "df://h:0", "df://h:99999"] {
            assert!(scheduler_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn memtable_round_trips_through_the_codec() {
        let schema = Arc::new(Schema::new(vec![Field::new("shard", DataType::UInt64, false), Field::new("file", DataType::Utf8, false)]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(UInt64Array::from(vec![0, 1])), Arc::new(StringArray::from(vec!["a.parquet", "b.parquet"]))],
        )
        .unwrap();
        let mem: Arc<dyn TableProvider> = Arc::new(MemTable::try_new(schema.clone(), vec![vec![b.clone()]]).unwrap());
        let codec = LogicalCodec::default();
        let mut buf = Vec::new();
        codec.try_encode_table_provider(&TableReference::bare("stats"), mem, &mut buf).unwrap();
        let ctx = TaskContext::default();
        let back = codec.try_decode_table_provider(&buf, &TableReference::bare("stats"), schema.clone(), &ctx).unwrap();
        let any: &dyn Any = back.as_ref();
        let mem = any.downcast_ref::<MemTable>().unwrap();
        let got = mem.batches[0].try_read().unwrap().clone();
        assert_eq!(got, vec![b]);
    }

    #[test]
    fn recap_functions_round_trip_with_their_teachers() {
        let teachers = vec![crate::train::data::Teacher { model: "models/a.onnx".into(), dim: 8 }];
        let codec = PhysicalCodec::default();
        for f in udf::all(&teachers) {
            let mut buf = Vec::new();
            codec.try_encode_udf(&f, &mut buf).unwrap();
            assert!(!buf.is_empty(), "{} sent without a payload", f.name());
            let back = codec.try_decode_udf(f.name(), &buf).unwrap();
            assert_eq!(back.name(), f.name());
            // Rebuilt from the payload: the same teachers, so the same return type.
            let args = [DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float16, false)), 8), DataType::Utf8];
            if f.name() == "embed_text" {
                assert_eq!(back.return_type(&args[1..]).unwrap(), f.return_type(&args[1..]).unwrap());
            }
        }
        // Not recap's: left to Ballista's codec (which knows none), not claimed.
        assert!(udf::from_wire("abs", b"other").is_none());
        assert!(udf::from_wire("nope", b"recap-udf/1:[]").unwrap().is_err());
    }
}
