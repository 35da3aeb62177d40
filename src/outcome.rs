//! The outcome of one input row: a status, a reason, and (when it worked) the image and its
//! measurements. Every input row gets exactly one, so counts always reconcile.

use serde::{Deserialize, Serialize};

/// What happened to a row. The string forms are what the shard's `status` column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Downloaded, decoded, resized and encoded.
    Ok,
    /// The URL is empty, unparsable or not http(s).
    InvalidUrl,
    /// The target resolves to a loopback, private or link-local address and
    /// `download.allow_private_networks` is false.
    Blocked,
    /// Connection refused or reset, DNS failure, body cut short: the transport failed.
    DownloadFailed,
    /// The request did not complete within `download.timeout`.
    Timeout,
    /// The server answered with a non-2xx status (see `http_status`).
    HttpError,
    /// Redirects went on past `download.max_redirects`, or looped.
    TooManyRedirects,
    /// The body was larger than `download.max_bytes`.
    TooLarge,
    /// The server opted out of AI use (`X-Robots-Tag: noai` / `noimageai`).
    OptedOut,
    /// The bytes are not an image we can decode.
    DecodeFailed,
    /// The image's header declares more than `image.max_pixels` pixels (decompression bomb guard).
    TooManyPixels,
    /// The image's shorter side is below `image.min_size`.
    TooSmall,
    /// The image's aspect ratio is above `image.max_aspect_ratio`.
    BadAspect,
    /// Encoding the resized image failed.
    EncodeFailed,
    /// Processed, then removed by a `filter` threshold (the reason names it); the image is
    /// dropped, captions and scores are kept.
    Filtered,
    /// Marked by `recap dedup`: the same image (sha256), a near copy (phash) or, optionally, a
    /// semantic duplicate (teacher embedding) of the row named in the reason, which is kept.
    Duplicate,
}

impl Status {
    pub const ALL: [Status; 16] = [
        Status::Ok,
        Status::InvalidUrl,
        Status::Blocked,
        Status::DownloadFailed,
        Status::Timeout,
        Status::HttpError,
        Status::TooManyRedirects,
        Status::TooLarge,
        Status::OptedOut,
        Status::DecodeFailed,
        Status::TooManyPixels,
        Status::TooSmall,
        Status::BadAspect,
        Status::EncodeFailed,
        Status::Filtered,
        Status::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::InvalidUrl => "invalid_url",
            Status::Blocked => "blocked",
            Status::DownloadFailed => "download_failed",
            Status::Timeout => "timeout",
            Status::HttpError => "http_error",
            Status::TooManyRedirects => "too_many_redirects",
            Status::TooLarge => "too_large",
            Status::OptedOut => "opted_out",
            Status::DecodeFailed => "decode_failed",
            Status::TooManyPixels => "too_many_pixels",
            Status::TooSmall => "too_small",
            Status::BadAspect => "bad_aspect",
            Status::EncodeFailed => "encode_failed",
            Status::Filtered => "filtered",
            Status::Duplicate => "duplicate",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether trying the same URL again later may succeed: transport failures, timeouts,
    /// 5xx, 408 and 429. This is what `--retry-failed` re-attempts.
    pub fn is_retryable(self, http_status: Option<u16>) -> bool {
        match self {
            Status::Timeout | Status::DownloadFailed => true,
            Status::HttpError => matches!(http_status, Some(s) if s >= 500 || s == 429 || s == 408),
            _ => false,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The processed image of a row that worked.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageData {
    /// The encoded, resized image.
    pub bytes: Vec<u8>,
    /// File extension of `bytes` (`jpg`, `png`, `webp`).
    pub extension: &'static str,
    pub width: u32,
    pub height: u32,
    pub phash: u64,
}

/// Seconds spent per stage on one row; summed into the shard's stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSeconds {
    pub download: f64,
    pub decode: f64,
    pub resize: f64,
    pub encode: f64,
}

impl std::ops::AddAssign for StageSeconds {
    fn add_assign(&mut self, o: Self) {
        self.download += o.download;
        self.decode += o.decode;
        self.resize += o.resize;
        self.encode += o.encode;
    }
}

/// Everything the engine learns about one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: Status,
    pub reason: Option<String>,
    pub http_status: Option<u16>,
    pub image: Option<ImageData>,
    /// Size of the source image (after EXIF orientation), when its header could be read.
    pub original_width: Option<u32>,
    pub original_height: Option<u32>,
    /// SHA-256 (hex) of the downloaded bytes, when a body was downloaded.
    pub sha256: Option<String>,
    /// Bytes downloaded for this row.
    pub bytes_downloaded: u64,
    /// HTTP attempts made (0 when no request was sent).
    pub attempts: u8,
    pub seconds: StageSeconds,
}

impl Outcome {
    pub fn failed(status: Status, reason: impl Into<String>) -> Self {
        Outcome {
            status,
            reason: Some(reason.into()),
            http_status: None,
            image: None,
            original_width: None,
            original_height: None,
            sha256: None,
            bytes_downloaded: 0,
            attempts: 0,
            seconds: StageSeconds::default(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.status.is_retryable(self.http_status)
    }
}
