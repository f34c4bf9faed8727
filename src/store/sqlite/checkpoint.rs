//! Copies the write-ahead log into the database file on a connection and a
//! thread of its own. SQLite's automatic checkpoint runs inside the commit
//! that crosses its threshold, so every webhook in that batch waited while
//! it copied pages and synced the file: the longest waits under load, and
//! 60 ms spikes while the retention purge deleted. Here the writer only
//! says that it committed; the copy runs beside it (WAL lets a checkpoint
//! and a writer work at once).
//!
//! What this module must never do: write anything but a checkpoint, or
//! wait on the writer or a reader (`PASSIVE` copies what no reader still
//! needs, and stops).

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use rusqlite::Connection;
use tracing::warn;

/// Commits gathered into one checkpoint: under load the log grows by a few
/// MB between two, which the copy turns into fewer, larger writes.
const PACE: Duration = Duration::from_millis(100);

/// The writer's side: a nudge after each commit.
#[derive(Debug)]
pub(super) struct Checkpointer {
    nudge: SyncSender<()>,
}

impl Checkpointer {
    /// Opens a connection to the database at `path` and starts the thread
    /// that checkpoints on it. It ends when the `Checkpointer` is dropped.
    pub(super) fn spawn(path: &Path) -> Result<Checkpointer, String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        // The checkpoint syncs the log before copying and the database
        // after, whatever the writer's own setting of the moment.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| e.to_string())?;
        // One pending nudge is enough: it stands for every commit since.
        let (nudge, nudged) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("relay-checkpoint".to_owned())
            .spawn(move || checkpoints(&conn, &nudged))
            .map_err(|e| e.to_string())?;
        Ok(Checkpointer { nudge })
    }

    /// Says the writer committed; never waits.
    pub(super) fn committed(&self) {
        match self.nudge.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                warn!("store: the checkpoint thread is gone; the write-ahead log is copied only at close");
            }
        }
    }
}

// A thread of its own, never a runtime's: sleeping blocks nothing else.
#[allow(clippy::disallowed_methods)]
fn checkpoints(conn: &Connection, nudged: &Receiver<()>) {
    while nudged.recv().is_ok() {
        std::thread::sleep(PACE);
        // The nudges of the commits made meanwhile are this checkpoint's too.
        while nudged.try_recv().is_ok() {}
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            warn!(error = %e, "store: cannot copy the write-ahead log into the database; will try again");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::guard::JobLimits;
    use crate::store::sqlite::queue_cost::{event, job};
    use crate::store::{Queue, SqliteStore};

    /// The writer never copies the log itself: the database file grows only
    /// because this thread copied the commits into it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_reach_the_database_file_without_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let empty = std::fs::metadata(&path).unwrap().len();
        // Random, so that no packing shrinks it: 4 MB of pages in all.
        let random: Vec<u8> = (0..512).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect();
        let body = bytes::Bytes::from(random);
        let mut committed = Vec::new();
        for _ in 0..500 {
            let store = store.clone();
            let mut event = event(vec![job("live", JobLimits::default(), None)]);
            event.body = body.clone();
            event.content_type = "application/octet-stream".to_owned();
            committed.push(tokio::spawn(async move { store.ingest(event).await }));
        }
        for ingest in committed {
            ingest.await.unwrap().unwrap();
        }
        let waited = crate::clock::stopwatch();
        let mut size = empty;
        while size < empty + 2 * 1024 * 1024 && waited.elapsed() < std::time::Duration::from_secs(20) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            size = std::fs::metadata(&path).unwrap().len();
        }
        assert!(
            size >= empty + 2 * 1024 * 1024,
            "the database file stayed at {size} bytes (from {empty}): the log was not copied into it"
        );
    }
}
