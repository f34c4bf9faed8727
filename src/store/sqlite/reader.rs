//! Read-only connections for what a person reads: the admin API, the pages,
//! `/metrics`. They run beside the writer (WAL lets readers and one writer
//! work at once), so a page that reads for 200 ms over a big store does not
//! hold every webhook's commit for 200 ms, as it did on the writer's
//! connection.
//!
//! A reader sees everything committed before it starts: a caller answered
//! by the writer finds its work here.
//!
//! What this module must never do: write (the connections are opened
//! read-only), or hold more than [`READERS`] connections (each has a page
//! cache of its own, and two cores gain nothing from more).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use crate::store::StoreError;

/// The most reads that run at once; more wait their turn.
pub(super) const READERS: usize = 2;

/// Each reader's page cache, in KiB (SQLite's negative `cache_size`): the
/// pages a person reads are mostly recent, and the OS caches the rest.
const READER_CACHE_KIB: i64 = 4 * 1024;

/// The read-only connections of one store, opened when first needed.
#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    turns: Semaphore,
}

impl Readers {
    pub(super) fn new(path: &Path) -> Readers {
        Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::with_capacity(READERS)),
            turns: Semaphore::new(READERS),
        }
    }

    /// Runs `work` on a read-only connection on tokio's blocking pool.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _turn = self.turns.acquire().await.map_err(|_| StoreError::Closed)?;
        let conn = match self.idle.lock().map_err(|_| StoreError::Closed)?.pop() {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = work(&conn);
            (conn, result)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("a read of the store failed: {e}")))?;
        // A connection that failed is not trusted again: the next read opens
        // a new one (the file may have been replaced, or its disk gone).
        if result.is_ok()
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(conn);
        }
        result
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let fail =
        |e: rusqlite::Error| StoreError::Unavailable(format!("cannot open {} to read: {e}", path.display()));
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)
        .map_err(fail)?;
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(fail)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;

    use super::*;
    use crate::guard::JobLimits;
    use crate::store::sqlite::queue_cost::{event, job};
    use crate::store::{Inspect, JobFilter, Queue, SqliteStore};

    /// A read that has not finished holds no commit: the writer commits
    /// while it waits, and the next read sees what was committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_read_holds_no_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db"), std::time::UNIX_EPOCH).unwrap());
        let (release, held) = mpsc::channel::<()>();
        let (started, reading) = tokio::sync::oneshot::channel();
        let reader = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .read(move |conn| {
                        let jobs: i64 = conn
                            .query_row("SELECT COUNT(*) FROM jobs", [], |row| row.get(0))
                            .map_err(|e| super::super::unavailable(&e))?;
                        let _ = started.send(());
                        // Held until the commit below has been answered.
                        let _ = held.recv();
                        Ok(jobs)
                    })
                    .await
            })
        };
        reading.await.unwrap();
        // Were reads on the writer's connection, this would wait for the
        // read, which waits for this: the guard's timeout would fire.
        let ingested = tokio::time::timeout(
            Duration::from_secs(30),
            store.ingest(event(vec![job("live", JobLimits::default(), None)])),
        )
        .await
        .expect("the commit waited for the read")
        .unwrap();
        assert!(matches!(ingested, crate::store::Ingested::Accepted { .. }));
        release.send(()).unwrap();
        assert_eq!(
            reader.await.unwrap().unwrap(),
            0,
            "the read's snapshot began before the commit"
        );
        let jobs = store
            .jobs(JobFilter {
                limit: 50,
                ..JobFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1, "a read after the answer sees the commit");
    }
}
