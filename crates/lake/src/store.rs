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
}

fn store_err(path: &str) -> impl FnOnce(object_store::Error) -> Error + '_ {
    move |e| Error::Store { path: path.to_owned(), source: Box::new(e) }
}

impl Lake {
    /// A lake on `store`, with at most `concurrency` requests in flight.
    #[must_use]
    pub fn new(store: Arc<dyn ObjectStore>, concurrency: usize) -> Self {
        Self { store, permits: Arc::new(Semaphore::new(concurrency.max(1))) }
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
        Ok(Self::new(Arc::new(fs), concurrency))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A local lake's puts are fsynced (file and directories) before they
    /// return, as the commit log relies on.
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
}
