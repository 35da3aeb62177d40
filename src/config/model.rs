//! The pipeline file, as serde structs. Every field is documented here: this is the user
//! reference, and `schemas/pipeline.schema.json` is generated from it (`recap schema pipeline`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units::{ByteSize, HumanDuration};

/// A recap pipeline: where the URL list is, how to download and process images, where shards go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "recap pipeline")]
pub struct PipelineConfig {
    /// The URL + alt-text list.
    pub input: InputConfig,
    /// HTTP download settings.
    #[serde(default)]
    pub download: DownloadConfig,
    /// Decoding, checks, resizing and encoding of images.
    #[serde(default)]
    pub image: ImageConfig,
    /// Synthetic captions from an ONNX captioner (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<super::stages::CaptionConfig>,
    /// Teacher CLIP ensemble: embeddings of views and captions, CLIP scores (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<super::stages::ScoreConfig>,
    /// Thresholds on scores, caption length and image size (optional; needs `score` for scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<super::stages::FilterConfig>,
    /// Where and how shards are written.
    pub output: OutputConfig,
    /// Parallelism of the engine itself.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Object store settings for `s3://`, `gs://`, `az://` input and output paths (optional; the
    /// usual environment variables are read too). Never written into shard metadata.
    #[serde(default, skip_serializing)]
    pub storage: StorageConfig,
}

/// Object store settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// object_store configuration keys and values, over the environment's: e.g. `aws_endpoint:
    /// http://127.0.0.1:9000`, `aws_allow_http: "true"`, `aws_region: us-east-1`,
    /// `google_service_account: /path/key.json`, `azure_storage_account_name: acct`.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Shard files larger than this go up as multipart uploads (default 16MB).
    #[serde(default = "default_multipart_threshold")]
    pub multipart_threshold: ByteSize,
    /// Part size of multipart uploads (default 8MB; S3 needs at least 5MiB but for the last part).
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { options: Default::default(), multipart_threshold: default_multipart_threshold(), part_size: default_part_size() }
    }
}

fn default_multipart_threshold() -> ByteSize {
    ByteSize(16_000_000)
}
fn default_part_size() -> ByteSize {
    ByteSize(8_000_000)
}

/// Input file format; detected from the file extension when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    Parquet,
    Csv,
    Tsv,
    Jsonl,
}

/// The URL list: one or more files read in name order; rows are cut into input shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// A file (`.parquet`, `.csv`, `.tsv`, `.jsonl`, each optionally `.gz` except Parquet), a glob
    /// such as `lists/*.parquet`, or a directory whose files of those kinds are read in name order.
    /// Relative paths are relative to the current directory. Object store URLs (`s3://b/lists/`,
    /// `s3://b/lists/*.parquet`, `gs://...`) are downloaded to a local staging directory first,
    /// and so is one file at an `https://` URL.
    pub path: String,
    /// Format of the files; by default taken from each file's extension.
    #[serde(default)]
    pub format: Option<InputFormat>,
    /// Column holding the image URL.
    #[serde(default = "default_url_column")]
    pub url_column: String,
    /// Column holding the alt-text; `null` when the list has none.
    #[serde(default = "default_caption_column")]
    pub caption_column: Option<String>,
    /// Input columns copied unchanged to the output shards, after `caption`.
    #[serde(default)]
    pub passthrough: Vec<String>,
    /// Rows per input shard; input shard i becomes output shard i.
    #[serde(default = "default_rows_per_shard")]
    #[schemars(range(min = 1))]
    pub rows_per_shard: u64,
    /// The pipeline's `storage` block, copied here when the file is read (not a key of `input`).
    #[serde(skip)]
    #[schemars(skip)]
    pub storage: StorageConfig,
}

fn default_url_column() -> String {
    "url".into()
}
fn default_caption_column() -> Option<String> {
    Some("caption".into())
}
fn default_rows_per_shard() -> u64 {
    1000
}

/// HTTP download settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// Requests in flight at once, all hosts together.
    #[schemars(range(min = 1))]
    pub concurrency: u32,
    /// Requests in flight at once to one host (default 16, or `concurrency` when that is lower
    /// and per_host is not written).
    #[schemars(range(min = 1))]
    pub per_host: u32,
    /// Requests started per second to one host (a token bucket holding up to one second of
    /// requests, at most `per_host`); `null` for no rate limit.
    #[schemars(range(min = 0.01))]
    pub rate_per_host: Option<f64>,
    /// Adapt each host's requests in flight to how it answers: halved on 429, 503 or a timeout
    /// (at most once a second), grown back by one per window of successes up to `per_host`.
    pub adaptive_concurrency: bool,
    /// Fetch each site's robots.txt once, and refuse URLs it disallows for our User-Agent's
    /// product token (row status `opted_out`, the rule as reason). A robots.txt answering 429 or
    /// 5xx disallows the whole site (RFC 9309); a missing one (4xx) allows everything.
    pub respect_robots_txt: bool,
    /// Time allowed for one attempt: connecting, headers and body.
    pub timeout: HumanDuration,
    /// Further attempts for retryable failures (timeouts, connection errors, 5xx, 408, 429).
    #[schemars(range(max = 20))]
    pub retries: u32,
    /// First back-off between attempts; doubled each retry, with jitter. A `Retry-After` header wins.
    pub backoff: HumanDuration,
    /// The longest `Retry-After` honoured; a server asking for more fails the row as `http_error`.
    pub max_retry_after: HumanDuration,
    /// Bodies larger than this are cut and the row gets `too_large`.
    pub max_bytes: ByteSize,
    /// Redirects followed before the row gets `too_many_redirects`.
    #[schemars(range(max = 50))]
    pub max_redirects: u32,
    /// The User-Agent header sent with every request.
    pub user_agent: String,
    /// Honour `X-Robots-Tag` opt-out directives (row status `opted_out`).
    pub respect_opt_out: bool,
    /// The `X-Robots-Tag` directives that mean "do not use" when `respect_opt_out` is set.
    pub opt_out_directives: Vec<String>,
    /// Allow targets on loopback, private, link-local and other non-public addresses; by default
    /// they are refused (row status `blocked`) so a URL list cannot reach into your network.
    pub allow_private_networks: bool,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            concurrency: 64,
            per_host: 16,
            rate_per_host: Some(50.0),
            adaptive_concurrency: true,
            respect_robots_txt: false,
            timeout: HumanDuration(std::time::Duration::from_secs(10)),
            retries: 2,
            backoff: HumanDuration(std::time::Duration::from_millis(500)),
            max_retry_after: HumanDuration(std::time::Duration::from_secs(60)),
            max_bytes: ByteSize(20_000_000),
            max_redirects: 5,
            user_agent: "recap/0.1 (+https://example.org/recap)".into(),
            respect_opt_out: true,
            opt_out_directives: vec!["noai".into(), "noimageai".into()],
            allow_private_networks: false,
        }
    }
}

/// How an image is brought to `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Keep the original size.
    None,
    /// Resize the shorter side to `size`, then cut the centre `size`×`size` square.
    CenterCrop,
    /// Resize the shorter side to `size`, keeping the aspect ratio.
    KeepRatio,
    /// Resize the longer side to `size`, keeping the aspect ratio.
    KeepRatioLargest,
    /// Resize the longer side to `size`, then pad to `size`×`size` with a white border.
    Border,
}

/// Encoding of the stored images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Jpeg,
    Png,
    /// Lossless WebP (`quality` does not apply).
    Webp,
}

/// Resampling filter of the resizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    /// `box` (area average) when shrinking, `lanczos3` when enlarging: img2dataset's
    /// INTER_AREA / INTER_LANCZOS4 choice.
    Auto,
    Nearest,
    Box,
    Bilinear,
    Hamming,
    CatmullRom,
    Mitchell,
    Lanczos3,
}

/// Decoding, checks, resizing and encoding of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Target size in pixels (see `resize`).
    #[schemars(range(min = 1, max = 16384))]
    pub size: u32,
    /// How the image is brought to `size`.
    pub resize: ResizeMode,
    /// Resampling filter.
    pub filter: ResizeFilter,
    /// Encoding of the stored image.
    pub format: ImageFormat,
    /// JPEG quality, 1–100.
    #[schemars(range(min = 1, max = 100))]
    pub quality: u8,
    /// Images whose shorter side is below this get `too_small`.
    pub min_size: u32,
    /// Images whose longer/shorter side ratio is above this get `bad_aspect`.
    #[schemars(range(min = 1.0))]
    pub max_aspect_ratio: f64,
    /// Images whose header declares more pixels than this are refused before decoding (`too_many_pixels`).
    #[schemars(range(min = 1))]
    pub max_pixels: u64,
    /// Decode JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain when the target is that much
    /// smaller (as libjpeg-turbo does): most of the decode time saved, no visible change at `size`.
    pub reduced_decode: bool,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            size: 256,
            resize: ResizeMode::CenterCrop,
            filter: ResizeFilter::Auto,
            format: ImageFormat::Jpeg,
            quality: 90,
            min_size: 64,
            max_aspect_ratio: 3.0,
            max_pixels: 100_000_000,
            reduced_decode: true,
        }
    }
}

/// Parquet compression codec of the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    Zstd,
    Snappy,
    Gzip,
    None,
}

/// Where and how shards are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Directory of the shards: `NNNNN.parquet`, `NNNNN.stats.json` and the completion marker
    /// `NNNNN.done` per shard. Created if missing. Or an object store prefix (`s3://bucket/run1`,
    /// `gs://...`, `az://...`): shards are staged locally and uploaded, the marker last.
    pub path: String,
    /// Parquet compression codec.
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// zstd level (1–22) or gzip level (0–9); the codec's default when absent.
    #[serde(default)]
    pub compression_level: Option<u32>,
    /// The pipeline's `storage` block, copied here when the file is read (not a key of `output`).
    #[serde(skip)]
    #[schemars(skip)]
    pub storage: StorageConfig,
}

fn default_compression() -> Compression {
    Compression::Zstd
}

/// Parallelism of the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Threads decoding, resizing and encoding images; 0 means one per CPU core.
    pub cpu_threads: u32,
    /// Shards processed at once; more than one hides the tail of each shard.
    #[schemars(range(min = 1, max = 64))]
    pub shards_in_flight: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { cpu_threads: 0, shards_in_flight: 2 }
    }
}
