//! The lake's object store: create-only puts (a rewrite after a crash is
//! refused, never a silent overwrite), capped concurrency, and listing.
//! Any `object_store` backend works ([`Lake::new`]); the hub configures
//! the local file system.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::partition::LakePath;

/// What a create-only put found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The file was created.
    Created,
    /// A file with this name already existed and was left alone.
    AlreadyExists,
}

/// An object store holding the lake.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    permits: Arc<Semaphore>,
    /// The directory of a local lake ([`Lake::local`]).
    local: Option<Arc<std::path::Path>>,
}

/// Unfinished uploads removed by [`Lake::sweep_abandoned_uploads`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// The files removed.
    pub files: Vec<std::path::PathBuf>,
    /// Their bytes.
    pub bytes: u64,
}

/// An unfinished upload's file in a local lake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long since it was last written (`None`: its time is in the
    /// future, or unknown).
    pub idle: Option<std::time::Duration>,
}

/// How long an unfinished upload's file must have gone unwritten before
/// [`Lake::sweep_abandoned_uploads`] takes it for abandoned (by a hub
/// that crashed during the put). A put in progress writes to its file
/// all along; another hub sharing the lake may be putting one now.
pub const ABANDONED_UPLOAD_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

fn store_err(path: &str) -> impl FnOnce(object_store::Error) -> Error + '_ {
    move |e| Error::Store { path: path.to_owned(), source: Box::new(e) }
}

/// The bucket and the prefix (without slashes at its ends) of an
/// `s3://bucket[/prefix]` URL.
///
/// # Errors
/// [`Error::Config`] saying what is wrong with the URL.
pub fn parse_s3_url(url: &str) -> Result<(&str, &str)> {
    let bad =
        |why: &str| Error::Config(format!("lake URL {url:?}: {why} (s3://bucket or s3://bucket/prefix)"));
    let rest = url.strip_prefix("s3://").ok_or_else(|| bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid_bucket {
        return Err(bad("the bucket name must be 3 to 63 characters of a-z, 0-9, '.' and '-'"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.contains("//") || prefix.contains(['?', '#']) {
        return Err(bad("the prefix holds an empty segment, '?' or '#'"));
    }
    Ok((bucket, prefix))
}

impl Lake {
    /// A lake on `store`, with at most `concurrency` requests in flight.
    #[must_use]
    pub fn new(store: Arc<dyn ObjectStore>, concurrency: usize) -> Self {
        Self { store, permits: Arc::new(Semaphore::new(concurrency.max(1))), local: None }
    }

    /// A lake in a local directory (created if missing).
    ///
    /// A put returns once the file, and every directory entry leading to
    /// it (new partition directories included), is fsynced: as with S3, a
    /// file that was put survives a power loss. Without it the commit log
    /// could record a file whose data was still only in the page cache,
    /// and the WAL segment holding its events would then be deleted.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Store`] when the directory is unusable.
    pub fn local(dir: &std::path::Path, concurrency: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(store_err(&dir.display().to_string()))?
            .with_automatic_cleanup(true)
            .with_fsync(true);
        Ok(Self { local: Some(dir.into()), ..Self::new(Arc::new(fs), concurrency) })
    }

    /// A lake in S3 or an S3-compatible store, at `url`
    /// (`s3://bucket[/prefix]`). Credentials, region and endpoint come
    /// from the `AWS_*` environment variables as `object_store` reads them
    /// (static keys, a web identity, an ECS task or EC2 instance role);
    /// `endpoint` and `region`, when given, win. An `http://` endpoint
    /// (a local S3-compatible server) is allowed. Create-only puts use
    /// S3's conditional `If-None-Match: *`.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that is not `s3://bucket[/prefix]`;
    /// [`Error::Store`] when the client cannot be built.
    pub fn s3(url: &str, endpoint: Option<&str>, region: Option<&str>, concurrency: usize) -> Result<Self> {
        let (bucket, prefix) = parse_s3_url(url)?;
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = region {
            builder = builder.with_region(region);
        }
        let s3 = builder.build().map_err(store_err(url))?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        };
        Ok(Self::new(store, concurrency))
    }

    /// One listing of the lake's top level (its tables), to find at once
    /// a lake that cannot be used: for S3, a missing bucket, refused
    /// credentials or an unreachable endpoint.
    ///
    /// # Errors
    /// [`Error::Store`] with what the store answered.
    pub async fn check(&self) -> Result<()> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        self.store.list_with_delimiter(None).await.map_err(store_err("the lake root"))?;
        Ok(())
    }

    /// Remove the files of uploads a crash left unfinished, once no write
    /// has touched them for `older_than`: `object_store`'s local store
    /// writes a put to `<name>#<n>` and renames it when whole, and a hub
    /// killed in between leaves that file. Listings skip such names, so
    /// nothing else ever removes them, and readers that take every file
    /// of a partition directory (Spark) fail on the partial Parquet. A
    /// lake elsewhere has nothing to sweep here (S3 keeps unfinished
    /// multipart uploads apart from objects; a bucket lifecycle rule
    /// aborts them). Blocking: run it off the runtime's threads.
    ///
    /// # Errors
    /// [`Error::Io`] when the lake's directory cannot be read; a file that
    /// cannot be removed is logged and left.
    pub fn sweep_abandoned_uploads(&self, older_than: std::time::Duration) -> Result<Swept> {
        let mut swept = Swept::default();
        for u in self.unfinished_uploads()? {
            if u.idle.is_none_or(|idle| idle < older_than) {
                continue;
            }
            match std::fs::remove_file(&u.path) {
                Ok(()) => {
                    swept.bytes += u.bytes;
                    swept.files.push(u.path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %u.path.display(), error = %e, "cannot remove an unfinished upload")
                }
            }
        }
        Ok(swept)
    }

    /// The files of unfinished uploads in a local lake (see
    /// [`Lake::sweep_abandoned_uploads`]): puts in progress, and those a
    /// crash cut short. Blocking.
    ///
    /// # Errors
    /// [`Error::Io`] when the lake's directory cannot be read.
    pub fn unfinished_uploads(&self) -> Result<Vec<Unfinished>> {
        let mut found = Vec::new();
        let Some(root) = &self.local else { return Ok(found) };
        let now = std::time::SystemTime::now();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                // A partition directory removed meanwhile (a merge's
                // cleanup) has nothing left to find.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != **root => continue,
                Err(source) => return Err(Error::Io { path: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| Error::Io { path: dir.clone(), source })?;
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                if !kind.is_file() || !is_unfinished_upload(&entry.file_name()) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let idle = meta.modified().ok().and_then(|m| now.duration_since(m).ok());
                found.push(Unfinished { path: entry.path(), bytes: meta.len(), idle });
            }
        }
        Ok(found)
    }

    /// The underlying store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Put `bytes` at `path` only if nothing is there.
    ///
    /// # Errors
    /// [`Error::Store`] on any failure other than "already exists".
    pub async fn put_create(&self, path: &LakePath, bytes: Bytes) -> Result<Put> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(&ObjPath::from(path.0.as_str()), PutPayload::from(bytes), opts).await {
            Ok(_) => Ok(Put::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::AlreadyExists),
            Err(e) => Err(store_err(&path.0)(e)),
        }
    }

    /// Delete a file; one already gone counts as deleted.
    ///
    /// # Errors
    /// [`Error::Store`] on failures other than "not found".
    pub async fn delete(&self, path: &str) -> Result<()> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        match self.store.delete(&ObjPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(path)(e)),
        }
    }

    /// Whether a file exists.
    ///
    /// # Errors
    /// [`Error::Store`] on failures other than "not found".
    pub async fn exists(&self, path: &LakePath) -> Result<bool> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        match self.store.head(&ObjPath::from(path.0.as_str())).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(&path.0)(e)),
        }
    }

    /// Every object under `prefix` (or the whole lake).
    ///
    /// # Errors
    /// [`Error::Store`] when listing fails.
    pub async fn list(&self, prefix: Option<&str>) -> Result<Vec<ObjectMeta>> {
        let p = prefix.map(ObjPath::from);
        self.store.list(p.as_ref()).try_collect().await.map_err(store_err(prefix.unwrap_or("")))
    }

    /// Read bytes `range` of an object.
    ///
    /// # Errors
    /// [`Error::Store`] when the read fails.
    pub async fn get_range(&self, path: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        self.store.get_range(&ObjPath::from(path), range).await.map_err(store_err(path))
    }

    /// Read a whole object.
    ///
    /// # Errors
    /// [`Error::Store`] when the read fails.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        let _permit = self.permits.acquire().await.expect("semaphore is never closed");
        let r = self.store.get(&ObjPath::from(path)).await.map_err(store_err(path))?;
        r.bytes().await.map_err(store_err(path))
    }
}

/// Whether `name` is an unfinished upload of `object_store`'s local
/// store: `<name>#<digits>`.
fn is_unfinished_upload(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.rsplit_once('#'))
        .is_some_and(|(base, n)| !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local lake's puts are fsynced (file and directories) before they
    /// return, as the commit log relies on.
    #[test]
    fn s3_urls_name_a_bucket_and_a_prefix() {
        assert_eq!(super::parse_s3_url("s3://my-lake").unwrap(), ("my-lake", ""));
        assert_eq!(super::parse_s3_url("s3://my.lake/events/prod/").unwrap(), ("my.lake", "events/prod"));
        for (url, why) in [
            ("/srv/lake", "not an s3:// URL"),
            ("s3://", "the bucket name"),
            ("s3://My_Lake/x", "the bucket name"),
            ("s3://lake/a//b", "empty segment"),
        ] {
            let e = super::parse_s3_url(url).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(url), "{url}: {e}");
        }
    }

    #[tokio::test]
    async fn a_local_lake_fsyncs_its_puts() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(dir.path(), 1).unwrap();
        let store = format!("{:?}", lake.store());
        assert!(store.contains("fsync: true"), "{store}");
        let path = LakePath("t/account=1/date=2024-01-01/hour=00/a.parquet".into());
        assert_eq!(lake.put_create(&path, Bytes::from_static(b"x")).await.unwrap(), Put::Created);
        assert_eq!(lake.put_create(&path, Bytes::from_static(b"y")).await.unwrap(), Put::AlreadyExists);
        assert_eq!(&lake.get(&path.0).await.unwrap()[..], b"x");
    }

    /// What a crash during a put leaves (`<name>#<n>`, invisible to
    /// listings) is removed once it has gone unwritten long enough; an
    /// upload still being written, a finished file, and names that only
    /// look alike are left.
    #[tokio::test]
    async fn unfinished_uploads_left_by_a_crash_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(dir.path(), 1).unwrap();
        let done = LakePath("t/account=1/date=2024-01-01/hour=00/done.parquet".into());
        lake.put_create(&done, Bytes::from_static(b"PAR1")).await.unwrap();
        let part = dir.path().join("t/account=1/date=2024-01-01/hour=00");
        let other = dir.path().join("t/account=2/date=2024-01-01/hour=07");
        std::fs::create_dir_all(&other).unwrap();
        let hour_ago =
            std::time::SystemTime::now() - ABANDONED_UPLOAD_AGE - std::time::Duration::from_secs(5);
        let file = |path: std::path::PathBuf, bytes: usize, old: bool| {
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(bytes as u64).unwrap();
            if old {
                f.set_modified(hour_ago).unwrap();
            }
            path
        };
        let abandoned =
            [file(part.join("a.parquet#1"), 100, true), file(other.join("b.parquet#17"), 20, true)];
        let writing = file(part.join("c.parquet#2"), 7, false);
        let alike = [file(part.join("d.parquet#x1"), 1, true), file(part.join("#3"), 1, true)];

        assert_eq!(lake.unfinished_uploads().unwrap().len(), 3, "every upload's file, in progress or not");
        let swept = lake.sweep_abandoned_uploads(ABANDONED_UPLOAD_AGE).unwrap();
        let mut files = swept.files.clone();
        files.sort();
        assert_eq!((files, swept.bytes), (abandoned.to_vec(), 120));
        assert!(abandoned.iter().all(|p| !p.exists()));
        assert!(writing.exists() && alike.iter().all(|p| p.exists()));
        assert_eq!(&lake.get(&done.0).await.unwrap()[..], b"PAR1");

        let swept = lake.sweep_abandoned_uploads(std::time::Duration::ZERO).unwrap();
        assert_eq!(swept.files, vec![writing]);
        let elsewhere = Lake::new(Arc::new(object_store::memory::InMemory::new()), 1);
        assert_eq!(elsewhere.sweep_abandoned_uploads(std::time::Duration::ZERO).unwrap(), Swept::default());
    }
}
