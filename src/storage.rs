//! Object stores (`s3://`, `gs://`, `az://`, `file://`) through the `object_store` crate, at the
//! version DataFusion builds. Credentials and endpoints come from the usual environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`,
//! ...) and the pipeline's optional `storage.options` (object_store's keys: `aws_endpoint`,
//! `aws_allow_http`, `aws_region`, ...), which win.
//!
//! Object stores have no rename, so a shard's commit point is its completion marker, uploaded
//! last: Parquet first (multipart above `storage.multipart_threshold`, with a `.NNNNN.upload` record
//! naming the upload so a rerun after a kill aborts it), then the stats, then `NNNNN.done`.
//! Readers trust only shards with their marker. A kill can land between the store creating an
//! upload and the record being written, so on S3 a rerun also asks the store itself
//! (ListMultipartUploads, signed with object_store's SigV4 signer) for the open uploads of its own
//! shards and aborts them.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::config::StorageConfig;
use crate::error::{Error, Result};


/// The stores recap opens, by URL scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    S3,
    Gcs,
    Azure,
    Local,
}

impl StoreKind {
    /// The store a URL names (`s3://`, `s3a://`, `gs://`, `az://`, `abfs://`, `abfss://`,
    /// `azure://`, `file://`; the scheme in any case), or None for a local path or another scheme.
    fn of(url: &str) -> Option<StoreKind> {
        let (scheme, _) = url.split_once("://")?;
        Some(match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => StoreKind::S3,
            "gs" => StoreKind::Gcs,
            "az" | "abfs" | "abfss" | "azure" => StoreKind::Azure,
            "file" => StoreKind::Local,
            _ => return None,
        })
    }
}

/// Is this a URL recap should open through an object store (rather than a local path)?
pub fn is_url(s: &str) -> bool {
    StoreKind::of(s).is_some()
}

/// The scheme of a `scheme://...` path, lower-cased (a letter, then letters, digits, `+-.`).
fn scheme(s: &str) -> Option<String> {
    let (scheme, _) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let ok = chars.next()?.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    ok.then(|| scheme.to_ascii_lowercase())
}

/// An `http://` or `https://` URL (an input list read with GET).
pub fn is_http(s: &str) -> bool {
    matches!(scheme(s).as_deref(), Some("http" | "https"))
}

/// What is wrong with a `scheme://` path recap cannot use there, if anything: a scheme that is no
/// store recap opens, or an http(s) URL where shards are listed or written (`http_ok`: an input
/// list, which may be one file at an http(s) URL). A path without a scheme is a local path: None.
pub fn unsupported_scheme(s: &str, http_ok: bool) -> Option<String> {
    let scheme = scheme(s)?;
    let http = scheme == "http" || scheme == "https";
    if StoreKind::of(s).is_some() || (http && http_ok) {
        return None;
    }
    Some(if http {
        format!("{s}: an http(s) URL can be read as one input list, not listed or written; expected s3://, gs://, az://, file:// or a local path")
    } else {
        let http = if http_ok { ", http(s):// (one file)" } else { "" };
        format!("{s}: unsupported scheme {scheme:?}; expected s3://, gs://, az://, file://{http} or a local path")
    })
}

/// An input list at an http(s) URL (its query string kept, so signed URLs work) downloaded into
/// a staging directory, and kept there while a HEAD finds the same size and validator (`ETag`,
/// else `Last-Modified`) as when it was downloaded; the local file, named as the URL's last path
/// segment so its extension says the format.
pub fn stage_http_file(url: &str) -> Result<PathBuf> {
    use reqwest::header::{HeaderMap, CONTENT_LENGTH, ETAG, LAST_MODIFIED};
    use tokio::io::AsyncWriteExt;
    let parsed = url::Url::parse(url).map_err(|e| Error::Usage(format!("{url}: not a URL: {e}")))?;
    let dir = staging_dir(url, "input")?;
    let last = parsed.path_segments().and_then(|mut s| s.next_back()).filter(|n| !n.is_empty()).unwrap_or("input");
    let name: String = last.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let (local, stamp_file) = (dir.join(&name), dir.join(format!(".{name}.source")));
    let part = part_path(&local);
    let fail = |e: &dyn std::fmt::Display| Error::Usage(format!("cannot download the input list {url}: {e}"));
    // The size and validator a response gives for the file, when it gives both.
    let stamp = |h: &HeaderMap| -> Option<String> {
        let validator = h.get(ETAG).or_else(|| h.get(LAST_MODIFIED))?.to_str().ok()?;
        Some(format!("{} {validator}", h.get(CONTENT_LENGTH)?.to_str().ok()?))
    };
    blocking(async {
        let client = reqwest::Client::builder()
            .user_agent(concat!("recap/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(30))
            .read_timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| fail(&e))?;
        if let (Ok(kept), Ok(before)) = (std::fs::metadata(&local), std::fs::read_to_string(&stamp_file)) {
            let now = match client.head(url).send().await {
                Ok(r) if r.status().is_success() => stamp(r.headers()),
                _ => None,
            };
            if now.as_deref() == Some(before.as_str()) && before.split(' ').next() == Some(kept.len().to_string().as_str()) {
                tracing::info!(url, path = %local.display(), "input list unchanged since it was downloaded");
                return Ok(local);
            }
        }
        let mut r = client.get(url).send().await.map_err(|e| fail(&crate::error::chain(&e)))?;
        if !r.status().is_success() {
            return Err(fail(&format!("HTTP {}", r.status())));
        }
        let now = stamp(r.headers());
        let written = async {
            let mut f = tokio::fs::File::create(&part).await.map_err(|e| Error::io("cannot create", &part, e))?;
            while let Some(chunk) = r.chunk().await.map_err(|e| fail(&crate::error::chain(&e)))? {
                f.write_all(&chunk).await.map_err(|e| Error::io("cannot write", &part, e))?;
            }
            f.flush().await.map_err(|e| Error::io("cannot write", &part, e))?;
            drop(f);
            std::fs::rename(&part, &local).map_err(|e| Error::io("cannot move into place", &local, e))
        }
        .await;
        if written.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        written?;
        match now {
            Some(s) => write_whole(&stamp_file, s.as_bytes())?,
            None => {
                let _ = std::fs::remove_file(&stamp_file);
            }
        }
        Ok(local)
    })
}

/// One file named by a URL (an object store object, or an http(s) file) downloaded to a staging
/// directory and kept while unchanged (same size, not older than the object); the local file.
/// For readers of single files: evaluation sets, dense datasets.
pub fn stage_file(url: &str) -> Result<PathBuf> {
    if is_http(url) {
        return stage_http_file(url);
    }
    let remote = Remote::open(url, &StorageConfig::default())?;
    let dir = staging_dir(url, "file")?;
    let local = dir.join(remote.prefix.filename().unwrap_or("file"));
    blocking(async {
        let meta = remote.store.head(&remote.prefix).await.map_err(|e| store_error("cannot read", url, e))?;
        let kept = std::fs::metadata(&local).ok().is_some_and(|m| {
            m.len() == meta.size && m.modified().is_ok_and(|t| t >= std::time::SystemTime::from(meta.last_modified))
        });
        if !kept {
            let bytes = remote.get(&remote.prefix).await?;
            write_whole(&local, &bytes)?;
        }
        Ok(local)
    })
}

/// `path` itself, or for a URL (`s3://`, `gs://`, `az://`, `https://`) a local copy of the file
/// it names ([`stage_file`]).
pub fn local_file(path: &Path) -> Result<std::borrow::Cow<'_, Path>> {
    match path.to_str().filter(|s| is_url(s) || is_http(s)) {
        Some(url) => Ok(std::borrow::Cow::Owned(stage_file(url)?)),
        None => Ok(std::borrow::Cow::Borrowed(path)),
    }
}

/// A store and the prefix a URL names in it.
#[derive(Clone)]
pub struct Remote {
    pub url: url::Url,
    pub store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    /// S3 only: lists the bucket's open multipart uploads.
    s3_uploads: Option<S3Uploads>,
    /// Whether a multipart upload is recorded in `.NAME.upload` for a rerun to abort: not on
    /// Azure, where an upload is blocks staged under the blob's own name, which the next commit
    /// of that name discards (and the service after a week), and abort is a no-op.
    records_uploads: bool,
    pub prefix: ObjPath,
    threshold: usize,
    part: usize,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

/// Send a write again when its connection broke before an answer came: a server closing a pooled
/// keep-alive connection just as it is reused (Node's 5 s idle timeout, as in Azurite; nginx's
/// 75 s) is the usual cause. object_store resends only the requests it knows are idempotent (GET,
/// HEAD); recap's writes are idempotent too (the same bytes to the same name, a part by its number,
/// a delete), so they are resent here, up to 3 more times.
async fn resend<T, Fut>(what: &str, mut send: impl FnMut() -> Fut) -> object_store::Result<T>
where
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut attempt = 1u32;
    loop {
        match send().await {
            Err(e) if attempt < 4 && broken_connection(&e) => {
                tracing::debug!(object = what, attempt, "the connection broke before the store answered; sending again: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Did this request fail on its connection (closed, reset, cut) rather than with an answer?
fn broken_connection(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return matches!(h.kind(), HttpErrorKind::Interrupted | HttpErrorKind::Unknown);
        }
        source = s.source();
    }
    false
}

/// `WHAT URL: the store's error`, its XML error body (S3, GCS, Azure) shortened to `Code:
/// Message`, and for the errors a user fixes in their set-up, what to check, in the store's terms.
fn store_error(what: &str, url: &str, e: impl std::fmt::Display) -> Error {
    let text = tidy_error_body(&e.to_string());
    let has = |codes: &[&str]| codes.iter().any(|c| text.contains(c));
    let refused = has(&["403 Forbidden", "401 Unauthorized"]);
    // With no credentials configured, object_store asks the cloud's instance metadata service
    // (EC2's, GCE's, Azure's managed identity): an error from there means none were given.
    let none_given = has(&["169.254.169.254", "metadata.google.internal"]);
    let hint = match StoreKind::of(url) {
        Some(StoreKind::Azure) if none_given => {
            " (no credentials found: set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY, AZURE_STORAGE_TOKEN) or storage.options; without them the instance metadata service was asked, and gave none)"
        }
        Some(StoreKind::Gcs) if none_given => {
            " (no credentials found: set GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS (a service account key file) or storage.options; without them the instance metadata service was asked, and gave none)"
        }
        Some(StoreKind::S3) if none_given => {
            " (no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.options; without them the instance metadata service was asked, and gave none)"
        }
        Some(StoreKind::Azure) => {
            if has(&["AuthorizationPermissionMismatch", "AuthorizationResourceTypeMismatch"]) {
                " (access denied: the identity's role does not allow this request; check its role assignment on the container)"
            } else if refused || has(&["AuthenticationFailed", "AuthorizationFailure", "InvalidAuthenticationInfo"]) {
                " (the credentials were refused: check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY, AZURE_STORAGE_TOKEN) or storage.options)"
            } else if has(&["ContainerNotFound"]) {
                " (no such container)"
            } else {
                ""
            }
        }
        Some(StoreKind::Gcs) => {
            if refused || has(&["AccessDenied"]) {
                " (the credentials were refused or lack a permission: check GOOGLE_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS or storage.options, and the account's roles on the bucket)"
            } else if has(&["NoSuchBucket"]) {
                " (no such bucket)"
            } else {
                ""
            }
        }
        _ => {
            if has(&["AccessDenied"]) && !has(&["InvalidAccessKeyId", "SignatureDoesNotMatch"]) {
                " (access denied: the key's policy does not allow this request; check its IAM permissions, or AWS_ACCESS_KEY_ID if it is the wrong key)"
            } else if refused || has(&["InvalidAccessKeyId", "SignatureDoesNotMatch"]) {
                " (the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.options)"
            } else if has(&["NoSuchBucket"]) {
                " (no such bucket)"
            } else {
                ""
            }
        }
    };
    Error::Usage(format!("{what} {url}: {text}{hint}"))
}

/// An error text with the store's XML error body in it (`<?xml ...?><Error><Code>X</Code>
/// <Message>Y ...</Message>...</Error>`, as S3, GCS's XML API and Azure answer) with that body
/// replaced by `X: Y` (the message's first line: Azure adds request id and time on later ones).
fn tidy_error_body(text: &str) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else { return text.to_string() };
    let Some(end) = text[start..].find("</Error>").map(|i| start + i + "</Error>".len()) else { return text.to_string() };
    match quick_xml::de::from_str::<ErrorBody>(&text[start..end]) {
        Ok(body) => {
            let message = body.message.lines().next().unwrap_or("").trim();
            format!("{}{}: {}{}", &text[..start], body.code, message, &text[end..])
        }
        Err(_) => text.to_string(),
    }
}

impl Remote {
    /// Open `url` with `storage.options` (object_store config keys) over the environment's.
    pub fn open(url: &str, storage: &StorageConfig) -> Result<Remote> {
        let options: &BTreeMap<String, String> = &storage.options;
        let parsed = url::Url::parse(url).map_err(|e| Error::Usage(format!("{url}: not a URL: {e}")))?;
        let bad_key = |k: &str, e: object_store::Error| Error::Usage(format!("storage.options.{k}: {e}"));
        let mut s3_uploads = None;
        let kind = StoreKind::of(url)
            .ok_or_else(|| Error::Usage(format!("{url}: unsupported scheme {:?}; expected s3, gs, az or file", parsed.scheme())))?;
        let (store, multipart): (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>) = match kind {
            StoreKind::S3 => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad_key(k, e))?, v);
                }
                let s = Arc::new(b.clone().build().map_err(|e| store_error("cannot open", url, e))?);
                s3_uploads = parsed.host_str().and_then(|bucket| S3Uploads::new(&b, bucket, s.clone()));
                (s.clone(), Some(s))
            }
            StoreKind::Gcs => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad_key(k, e))?, v);
                }
                let s = Arc::new(b.build().map_err(|e| store_error("cannot open", url, e))?);
                (s.clone(), Some(s))
            }
            StoreKind::Azure => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad_key(k, e))?, v);
                }
                let s = Arc::new(b.build().map_err(|e| store_error("cannot open", url, e))?);
                (s.clone(), Some(s))
            }
            StoreKind::Local => (Arc::new(object_store::local::LocalFileSystem::new()), None),
        };
        let prefix = ObjPath::from_url_path(parsed.path()).map_err(|e| Error::Usage(format!("{url}: {e}")))?;
        Ok(Remote {
            url: parsed,
            store,
            multipart,
            s3_uploads,
            records_uploads: kind != StoreKind::Azure,
            prefix,
            threshold: storage.multipart_threshold.0 as usize,
            part: (storage.part_size.0 as usize).max(1 << 20),
        })
    }

    /// The object `name` under the prefix.
    pub fn child(&self, name: &str) -> ObjPath {
        self.prefix.clone().join(name)
    }

    /// Object names directly under the prefix (one level, as a directory listing).
    pub async fn list_names(&self) -> Result<Vec<(String, u64)>> {
        Ok(self.list_meta().await?.into_iter().map(|(n, s, _)| (n, s)).collect())
    }

    /// Names, sizes and modification times directly under the prefix.
    pub async fn list_meta(&self) -> Result<Vec<(String, u64, std::time::SystemTime)>> {
        let prefix = if self.prefix.as_ref().is_empty() { None } else { Some(&self.prefix) };
        let list = self.store.list(prefix).try_collect::<Vec<_>>().await.map_err(|e| store_error("cannot list", self.url.as_str(), e))?;
        let mut out: Vec<(String, u64, std::time::SystemTime)> = list
            .into_iter()
            .filter_map(|m| {
                let rest = m.location.prefix_match(&self.prefix)?.map(|p| p.as_ref().to_string()).collect::<Vec<_>>();
                (rest.len() == 1).then(|| (rest[0].clone(), m.size, std::time::SystemTime::from(m.last_modified)))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Shard indices whose completion marker is present.
    pub async fn completed(&self) -> Result<HashSet<u64>> {
        Ok(self
            .list_names()
            .await?
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix(".done").and_then(|s| s.parse::<u64>().ok()))
            .collect())
    }

    pub async fn get(&self, path: &ObjPath) -> Result<bytes::Bytes> {
        let r = self.store.get(path).await.map_err(|e| store_error("cannot read", &format!("{}/{path}", self.base()), e))?;
        r.bytes().await.map_err(|e| store_error("cannot read", &format!("{}/{path}", self.base()), e))
    }

    pub async fn download(&self, name: &str, to: &Path) -> Result<()> {
        let bytes = self.get(&self.child(name)).await?;
        write_whole(to, &bytes)
    }

    fn base(&self) -> String {
        format!("{}://{}", self.url.scheme(), self.url.host_str().unwrap_or(""))
    }

    /// Upload a local file to `name`: one PUT, or a multipart upload recorded in
    /// `.<name>.upload` (the upload id) so a rerun after a kill can abort it (not on Azure: see
    /// `records_uploads`).
    pub async fn upload_file(&self, from: &Path, name: &str) -> Result<()> {
        let data = std::fs::read(from).map_err(|e| Error::io("cannot read", from, e))?;
        let to = self.child(name);
        let url = format!("{}/{}", self.url.as_str().trim_end_matches('/'), name);
        match &self.multipart {
            Some(mp) if data.len() > self.threshold => {
                let record = self.child(&format!(".{name}.upload"));
                // A second upload opened by a resent request whose first try the store did get is
                // under this shard's name: the next run lists and aborts it.
                let id = resend(&url, || mp.create_multipart(&to)).await.map_err(|e| store_error("cannot start a multipart upload to", &url, e))?;
                if self.records_uploads {
                    let record_bytes = PutPayload::from(id.clone().into_bytes());
                    resend(&url, || self.store.put(&record, record_bytes.clone())).await.map_err(|e| store_error("cannot write", &url, e))?;
                }
                let mut parts: Vec<PartId> = Vec::new();
                for (i, chunk) in data.chunks(self.part).enumerate() {
                    let payload = PutPayload::from(bytes::Bytes::copy_from_slice(chunk));
                    let part = resend(&url, || mp.put_part(&to, &id, i, payload.clone())).await.map_err(|e| store_error("cannot upload a part of", &url, e))?;
                    parts.push(part);
                }
                let mut tries = 0;
                let completed = resend(&url, || {
                    tries += 1;
                    mp.complete_multipart(&to, &id, parts.clone())
                })
                .await;
                match completed {
                    Ok(_) => {}
                    // A resent completion the store had already done: the upload is gone and
                    // the object is there, whole.
                    Err(object_store::Error::NotFound { .. })
                        if tries > 1 && self.store.head(&to).await.is_ok_and(|m| m.size == data.len() as u64) => {}
                    Err(e) => return Err(store_error("cannot complete the upload of", &url, e)),
                }
                if self.records_uploads {
                    let _ = self.store.delete(&record).await;
                }
            }
            _ => {
                let payload = PutPayload::from(data);
                resend(&url, || self.store.put(&to, payload.clone())).await.map_err(|e| store_error("cannot write", &url, e))?;
            }
        }
        Ok(())
    }

    /// Abort the multipart uploads a killed run left under the prefix, for the objects `mine`
    /// accepts (by name; the caller's own shards, so that a worker starting up never aborts the
    /// upload another worker has in flight): those named by `.NAME.upload` records (whose records
    /// it deletes), and on S3 every open upload the store lists, which covers a kill between the
    /// upload's creation and its record. Returns the object names aborted.
    pub async fn abort_interrupted(&self, mine: &(dyn Fn(&str) -> bool + Sync)) -> Result<Vec<String>> {
        let mut aborted = std::collections::BTreeSet::new();
        let Some(mp) = &self.multipart else { return Ok(Vec::new()) };
        for (name, _) in self.list_names().await? {
            let Some(target) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".upload")) else { continue };
            if !mine(target) {
                continue;
            }
            let record = self.child(&name);
            let id = String::from_utf8_lossy(&self.get(&record).await?).to_string();
            // An upload the store already forgot (completed or expired) is not an error here.
            let _ = mp.abort_multipart(&self.child(target), &id).await;
            resend(&name, || self.store.delete(&record)).await.map_err(|e| store_error("cannot delete", &format!("{}/{name}", self.url), e))?;
            aborted.insert(target.to_string());
        }
        // The listing is a safety net: a key allowed to write but not to list or abort uploads
        // (s3:ListBucketMultipartUploads, s3:AbortMultipartUpload) still runs, with a warning.
        match self.open_uploads().await {
            Ok(open) => {
                for (name, id) in open.into_iter().filter(|(n, _)| mine(n)) {
                    match mp.abort_multipart(&self.child(&name), &id).await {
                        Ok(()) => {
                            aborted.insert(name);
                        }
                        Err(e) => tracing::warn!(object = %name, "{}", store_error("cannot abort the open upload of", &format!("{}/{name}", self.url), e)),
                    }
                }
            }
            Err(e) => tracing::warn!(
                "{e}; uploads a killed run opened and did not record stay open (a bucket lifecycle rule that aborts incomplete uploads cleans them)"
            ),
        }
        Ok(aborted.into_iter().collect())
    }

    /// Multipart uploads the store has open for objects directly under the prefix: (name,
    /// upload id). S3 only (ListMultipartUploads); empty on other stores.
    pub async fn open_uploads(&self) -> Result<Vec<(String, String)>> {
        let Some(s3) = &self.s3_uploads else { return Ok(Vec::new()) };
        let prefix = if self.prefix.as_ref().is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let open = s3.list(&prefix).await.map_err(|e| store_error("cannot list the open multipart uploads of", self.url.as_str(), e))?;
        Ok(open
            .into_iter()
            .filter_map(|(key, id)| key.strip_prefix(&prefix).filter(|n| !n.is_empty() && !n.contains('/')).map(|n| (n.to_string(), id)))
            .collect())
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let path = self.child(name);
        match resend(name, || self.store.delete(&path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error("cannot delete", &format!("{}/{name}", self.url), e)),
        }
    }
}

/// The committed shards under an object store prefix (those with their `NNNNN.done`), copied to
/// a local cache directory for reading (Parquet, stats and marker; files already there at the same
/// size are kept, shards no longer committed are dropped from the cache). Credentials and
/// endpoint from the environment.
pub fn stage_committed_shards(url: &str) -> Result<PathBuf> {
    let remote = Remote::open(url, &StorageConfig::default())?;
    let dir = staging_dir(url, "read")?;
    let d = dir.clone();
    blocking(async move {
        let names = remote.list_meta().await?;
        let sizes: BTreeMap<String, (u64, std::time::SystemTime)> = names.into_iter().map(|(n, s, t)| (n, (s, t))).collect();
        let committed: Vec<String> = sizes.keys().filter_map(|n| n.strip_suffix(".done").map(str::to_string)).collect();
        if committed.is_empty() {
            return Err(Error::Usage(format!("{url} holds no committed shards (no NNNNN.done markers); expected the output.path of `recap run`")));
        }
        // Drop cached shards that are no longer committed (a rerun took the marker away).
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let stem = name.split('.').next().unwrap_or("").to_string();
                // Hidden files are another process's downloads in progress.
                if !name.starts_with('.') && !committed.contains(&stem) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        for stem in &committed {
            for name in [format!("{stem}.parquet"), format!("{stem}.stats.json"), format!("{stem}.done")] {
                let Some((size, modified)) = sizes.get(&name) else { continue };
                let local = d.join(&name);
                // Kept when the cached copy has the object's size and is newer than it (a shard
                // rewritten in the store since is fetched again).
                let fresh = std::fs::metadata(&local).ok().is_some_and(|m| m.len() == *size && m.modified().is_ok_and(|t| t >= *modified));
                if !fresh {
                    remote.download(&name, &local).await?;
                }
            }
        }
        Ok(())
    })?;
    Ok(dir)
}

/// Run a future to completion from synchronous code, wherever it is called (inside or outside a
/// Tokio runtime): on a scoped thread with its own small runtime.
pub fn blocking<T: Send>(fut: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime").block_on(fut)
        })
        .join()
        .expect("the storage thread does not panic")
    })
}

/// A local directory for what a URL needs on disk (staged shards, downloaded lists): under
/// `RECAP_STAGING` or the system temporary directory, one per URL.
pub fn staging_dir(url: &str, kind: &str) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let base = std::env::var_os("RECAP_STAGING").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let hash = hex::encode(&Sha256::digest(url.as_bytes())[..8]);
    let dir = base.join(format!("recap-{kind}-{hash}"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
    Ok(dir)
}

/// A temporary name beside `to` for writing it whole: hidden (readers of the directory skip
/// dot-files), and unique to this process and call, as processes on one machine (workers, a
/// Slurm array's tasks) share the staging directory.
fn part_path(to: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = to.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    to.with_file_name(format!(".{name}.{}-{n}.part", std::process::id()))
}

/// Write `bytes` to `to` through a temporary file beside it and a rename, so that another process
/// reading `to` sees the old file or the new one, whole, never one being written.
pub fn write_whole(to: &Path, bytes: &[u8]) -> Result<()> {
    let part = part_path(to);
    std::fs::write(&part, bytes).map_err(|e| Error::io("cannot write", &part, e))?;
    std::fs::rename(&part, to).map_err(|e| {
        let _ = std::fs::remove_file(&part);
        Error::io("cannot move into place", to, e)
    })
}

/// S3's ListMultipartUploads, which object_store does not offer: a GET on the bucket signed by
/// object_store's own SigV4 signer with the store's credentials, at the endpoint object_store uses.
#[derive(Clone)]
struct S3Uploads {
    store: Arc<object_store::aws::AmazonS3>,
    bucket_endpoint: String,
    region: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListMultipartUploadsResult {
    #[serde(default)]
    upload: Vec<OpenUpload>,
    #[serde(default)]
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_upload_id_marker: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OpenUpload {
    key: String,
    upload_id: String,
}

impl S3Uploads {
    /// From the builder the store was built from; None for S3 Express (zonal endpoints and
    /// session credentials), where the `.NAME.upload` records are the only cleanup.
    /// `bucket`: the URL's (the builder parses its URL only when it builds).
    fn new(b: &object_store::aws::AmazonS3Builder, bucket: &str, store: Arc<object_store::aws::AmazonS3>) -> Option<S3Uploads> {
        use object_store::aws::AmazonS3ConfigKey as K;
        if b.get_config_value(&K::S3Express).as_deref() == Some("true") {
            return None;
        }
        let region = b.get_config_value(&K::Region).unwrap_or_else(|| "us-east-1".to_string());
        let virtual_hosted = b.get_config_value(&K::VirtualHostedStyleRequest).as_deref() == Some("true");
        // As object_store's builder: the S3 endpoint over the generic one, the bucket in the path
        // unless requests are virtual-hosted (then the endpoint names the bucket).
        let bucket_endpoint = match (b.get_config_value(&K::S3Endpoint).or_else(|| b.get_config_value(&K::Endpoint)), virtual_hosted) {
            (Some(e), true) => e,
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        Some(S3Uploads { store, bucket_endpoint, region })
    }

    /// (key, upload id) of every open upload whose key starts with `prefix`, all pages.
    async fn list(&self, prefix: &str) -> std::result::Result<Vec<(String, String)>, String> {
        let credential = self.store.credentials().get_credential().await.map_err(|e| e.to_string())?;
        // Built here, not when the store is opened: only a run's start-up lists, readers never do.
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut url = url::Url::parse(&self.bucket_endpoint).map_err(|e| format!("{}: {e}", self.bucket_endpoint))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("uploads", "").append_pair("prefix", prefix);
                if let Some((key, id)) = &markers {
                    q.append_pair("key-marker", key).append_pair("upload-id-marker", id);
                }
            }
            let mut req = object_store::client::HttpRequest::new(object_store::client::HttpRequestBody::empty());
            *req.uri_mut() = url.as_str().parse().map_err(|e| format!("{url}: {e}"))?;
            object_store::aws::AwsAuthorizer::new(&credential, "s3", &self.region).authorize(&mut req, None);
            let resp = client.get(url.clone()).headers(req.headers().clone()).send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("{status}: {}", tidy_error_body(body.trim())));
            }
            let page: ListMultipartUploadsResult = quick_xml::de::from_str(&body).map_err(|e| format!("an answer that is not ListMultipartUploadsResult XML: {e}"))?;
            out.extend(page.upload.into_iter().map(|u| (u.key, u.upload_id)));
            match (page.is_truncated, page.next_key_marker, page.next_upload_id_marker) {
                (true, Some(k), Some(u)) if markers.as_ref() != Some(&(k.clone(), u.clone())) => markers = Some((k, u)),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert!(is_url("s3://bucket/prefix") && is_url("gs://b/x") && is_url("az://c/x") && is_url("file:///tmp/x"));
        assert!(!is_url("shards/") && !is_url("/abs/path") && !is_url("http://example.org/x.parquet"));
        let kinds = ["S3://b/x", "s3a://b/x", "gs://b/x", "abfss://c@acct.dfs.core.windows.net/x", "azure://c/x", "FILE:///x"].map(StoreKind::of);
        use StoreKind::*;
        assert_eq!(kinds, [Some(S3), Some(S3), Some(Gcs), Some(Azure), Some(Azure), Some(Local)]);
    }

    #[tokio::test]
    async fn file_urls_list_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/out", dir.path().display());
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        let r = Remote::open(&url, &StorageConfig::default()).unwrap();
        let f = dir.path().join("x.bin");
        std::fs::write(&f, b"hello").unwrap();
        r.upload_file(&f, "00003.done").await.unwrap();
        r.upload_file(&f, "00003.parquet").await.unwrap();
        assert_eq!(r.completed().await.unwrap(), HashSet::from([3]));
        assert_eq!(&r.get(&r.child("00003.parquet")).await.unwrap()[..], b"hello");
        r.delete("00003.done").await.unwrap();
        r.delete("00003.done").await.unwrap();
        assert!(r.completed().await.unwrap().is_empty());
    }

    #[test]
    fn list_multipart_uploads_answer_parses_with_entities_and_paging() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>data</Bucket><KeyMarker/><UploadIdMarker/>
<NextKeyMarker>run/00001.parquet</NextKeyMarker><NextUploadIdMarker>b2</NextUploadIdMarker><MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
<Upload><Key>run/00000.parquet</Key><UploadId>a1</UploadId><Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
<Upload><Key>r&amp;d/00001.parquet</Key><UploadId>b2</UploadId></Upload></ListMultipartUploadsResult>"#;
        let page: ListMultipartUploadsResult = quick_xml::de::from_str(xml).unwrap();
        let got: Vec<(String, String)> = page.upload.into_iter().map(|u| (u.key, u.upload_id)).collect();
        assert_eq!(got, vec![("run/00000.parquet".into(), "a1".into()), ("r&d/00001.parquet".into(), "b2".into())]);
        assert!(page.is_truncated);
        assert_eq!(page.next_key_marker.as_deref(), Some("run/00001.parquet"));
        let empty: ListMultipartUploadsResult =
            quick_xml::de::from_str("<ListMultipartUploadsResult><Bucket>data</Bucket><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>").unwrap();
        assert!(empty.upload.is_empty() && !empty.is_truncated);
    }

    #[test]
    fn no_credentials_at_all_is_said_so() {
        // What object_store says when no key is set and the instance metadata service refuses.
        let imds = "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token in 313µs - Server returned non-2xx status code: 403 Forbidden: resolve_deny: denied destination";
        let e = store_error("cannot list", "s3://b/lists/urls.parquet", imds).to_string();
        assert!(e.contains("(no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") && !e.contains("were refused"), "{e}");
        let gce = "Error performing token request: HTTP error: error sending request for url (http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token)";
        let e = store_error("cannot list", "gs://b/x", gce).to_string();
        assert!(e.contains("(no credentials found: set GOOGLE_SERVICE_ACCOUNT"), "{e}");
        let e = store_error("cannot list", "az://c/x", imds).to_string();
        assert!(e.contains("(no credentials found: set AZURE_STORAGE_ACCOUNT_NAME"), "{e}");
    }

    #[test]
    fn store_errors_show_code_and_message_and_hint_in_the_stores_terms() {
        // As object_store prints Azure's answer to a request signed with the wrong key (Azurite's
        // body; Azure's code is AuthenticationFailed).
        let azure = "Error performing list request: Error performing GET http://127.0.0.1:10000/devstoreaccount1/data?restype=container&comp=list in 13ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<Error>\n  <Code>AuthorizationFailure</Code>\n  <Message>Server failed to authenticate the request.\nRequestId:c503fb96-11ff-4102-9627-766f7326ba1c\nTime:2026-12-07T21:41:43.222Z</Message>\n</Error>";
        let e = store_error("cannot list", "az://data/out", azure).to_string();
        assert!(e.ends_with("403 Forbidden: AuthorizationFailure: Server failed to authenticate the request. (the credentials were refused: check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY, AZURE_STORAGE_TOKEN) or storage.options)"), "{e}");
        assert!(!e.contains("RequestId") && !e.contains("AWS_"), "{e}");
        let missing = "404 Not Found: <?xml version=\"1.0\"?><Error><Code>ContainerNotFound</Code><Message>The specified container does not exist.</Message></Error>";
        assert!(store_error("cannot list", "az://nosuch/out", missing).to_string().ends_with("ContainerNotFound: The specified container does not exist. (no such container)"));
        let s3 = "403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match.</Message><RequestId>1</RequestId></Error>";
        let e = store_error("cannot write", "s3://data/run/x", s3).to_string();
        assert!(e.contains("SignatureDoesNotMatch: The request signature we calculated does not match. (the credentials were refused: check AWS_ACCESS_KEY_ID"), "{e}");
        let gcs = "Server returned non-2xx status code: 401 Unauthorized: {\"error\": {\"code\": 401}}";
        assert!(store_error("cannot list", "gs://b/p", gcs).to_string().contains("check GOOGLE_SERVICE_ACCOUNT"));
        // Text that only looks like a body is left as it is.
        assert_eq!(tidy_error_body("an <Error> with no end"), "an <Error> with no end");
    }
}
