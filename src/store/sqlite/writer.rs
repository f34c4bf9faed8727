//! The group-commit writer: one task owns the connection, gathers every
//! operation waiting into one transaction on tokio's blocking pool and
//! commits once, so concurrent webhooks share an fsync. Should one
//! operation fail, the batch runs again with each in its own savepoint, so
//! one failure spoils nothing else. Each caller is answered after its own
//! work is durable ([`Durability::Synced`]) or committed and on disk within
//! [`MAX_UNSYNCED`] ([`Durability::Committed`]). Before a batch with work
//! that waits for the disk, it asks the store's [`Precondition`] once.
//!
//! The job counts the operations move are the one thing it writes itself:
//! each operation adds them to the batch's [`Tally`], written once before
//! the commit (see `tally`).
//!
//! What this module must never do: know what an operation writes (it runs
//! closures), answer a caller before its batch's fate is known, commit a
//! batch without its tally or with a failed operation's part of it, or
//! leave committed work unsynced for longer than [`MAX_UNSYNCED`].

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::tally::{Tally, Tx};
use super::unavailable;
use crate::store::StoreError;

/// Operations waiting beyond this are left for the next transaction, which
/// bounds how long the first caller of a batch waits.
pub const MAX_BATCH: usize = 512;

/// What must hold before work a caller will be told is on disk is
/// committed (the database file still being the one relay opened): asked
/// once a batch, however many webhooks share its fsync, and an error
/// refuses that work, and only that work, with it.
pub(super) type Precondition = Arc<dyn Fn() -> Result<(), StoreError> + Send + Sync>;

/// The writer's queue, as callers see it. Cheap to share: it is a channel
/// to the writer task.
#[derive(Debug)]
pub(super) struct Writer {
    operations: mpsc::Sender<Operation>,
}

impl Writer {
    /// Starts the writer task on `runtime`, with at most `max_batch`
    /// operations per transaction, each batch with synced work checked by
    /// `precondition` first. It ends, closing the database, when the last
    /// handle is gone.
    pub(super) fn spawn(
        runtime: &tokio::runtime::Handle,
        conn: Connection,
        max_batch: usize,
        precondition: Precondition,
    ) -> Writer {
        let (operations, receiver) = mpsc::channel(4 * MAX_BATCH);
        runtime.spawn(writer(conn, receiver, max_batch.max(1), precondition));
        Writer { operations }
    }

    /// Runs `work` inside the writer's next batch; answers once the batch
    /// committed (with `durability`) or with the error that stopped it.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        durability: Durability,
        work: impl FnMut(&Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            work,
            durable: durability == Durability::Synced,
            result: None,
            reply,
        };
        self.operations
            .send(Box::new(call))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// One operation for the writer, boxed so that every kind of call shares
/// one queue.
type Operation = Box<dyn Pending>;

/// An operation waiting in the writer's queue. It may run twice: when one
/// operation of a batch fails, the whole batch is rolled back and run again
/// with each operation in its own savepoint, so that one failure spoils
/// nothing else. (Savepoints around every operation, always, cost a tenth
/// of ingest's time under load; failures are rare.)
trait Pending: Send {
    /// Does the work; false when it failed (its error is kept for the answer).
    fn run(&mut self, tx: &Tx<'_>) -> bool;
    /// Whether the caller may be answered only once the work is on disk.
    fn durable(&self) -> bool;
    /// Answers the caller once the batch's fate is known (`Some` = it failed).
    fn answer(self: Box<Self>, batch_error: Option<StoreError>);
}

/// A closure and the channel its caller waits on.
struct Call<T, F> {
    work: F,
    durable: bool,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Pending for Call<T, F>
where
    T: Send,
    F: FnMut(&Tx<'_>) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, tx: &Tx<'_>) -> bool {
        let result = (self.work)(tx);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn answer(self: Box<Self>, batch_error: Option<StoreError>) {
        let answer = match (batch_error, self.result) {
            (Some(e), _) => Err(e),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Unavailable("the operation did not run".to_owned())),
        };
        // A caller that stopped waiting (its client hung up) is no loss:
        // what was committed stays committed.
        let _ = self.reply.send(answer);
    }
}

/// Whether a caller hears back before or after the fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// Answered once the work is on disk: anything a sender or a person
    /// was told happened.
    Synced,
    /// Answered once committed, before the fsync (WAL with
    /// `synchronous=NORMAL`): lost only with the machine, never with the
    /// process, and on disk within [`MAX_UNSYNCED`] (the next synced commit,
    /// or the writer's own sync once idle or once that long has passed).
    /// Only for records whose loss repeats a send: a claim, a renewal, an
    /// attempt's outcome.
    Committed,
}

/// How long the writer waits, after committing work it has not synced, for
/// more before it syncs on its own (see [`Durability::Committed`]).
const IDLE_SYNC: Duration = Duration::from_millis(50);

/// The longest unsynced work waits for a sync while the writer stays busy
/// with more of the same: the bound on what a power cut can take back.
const MAX_UNSYNCED: Duration = Duration::from_millis(200);

/// Gathers what is waiting into a batch and runs it on the blocking pool;
/// operations that arrive meanwhile form the next batch. Ends, closing the
/// database, when every handle to the store is gone.
async fn writer(
    mut conn: Connection,
    mut operations: mpsc::Receiver<Operation>,
    max_batch: usize,
    precondition: Precondition,
) {
    // Since when committed pages may be only in the OS's cache.
    let mut unsynced_since: Option<std::time::Instant> = None;
    loop {
        let next = if unsynced_since.is_some() {
            tokio::time::timeout(IDLE_SYNC, operations.recv()).await
        } else {
            Ok(operations.recv().await)
        };
        let first = match next {
            Ok(Some(op)) => op,
            Ok(None) => break,
            Err(_idle) => {
                conn = match on_blocking_pool(conn, sync).await {
                    Some((conn, synced)) => {
                        if synced {
                            unsynced_since = None;
                        }
                        conn
                    }
                    None => return,
                };
                continue;
            }
        };
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        take_waiting(&mut operations, &mut batch, max_batch);
        // Let the tasks about to hand in work do so before the batch runs:
        // every batch costs the same fsync and page writes however small,
        // so under load a yield that adds a few operations pays for itself;
        // when nothing else is ready it costs nothing (this task runs again
        // at once).
        while batch.len() < max_batch {
            let before = batch.len();
            tokio::task::yield_now().await;
            take_waiting(&mut operations, &mut batch, max_batch);
            if batch.len() == before {
                break;
            }
        }
        let overdue = unsynced_since.is_some_and(|since| since.elapsed() >= MAX_UNSYNCED);
        let precondition = Arc::clone(&precondition);
        let ran = on_blocking_pool(conn, move |conn| {
            let synced_first = overdue && sync(conn);
            (synced_first, run_batch(conn, batch, &precondition))
        })
        .await;
        conn = match ran {
            Some((conn, (synced_first, committed))) => {
                if synced_first {
                    unsynced_since = None;
                }
                match committed {
                    Some(Durability::Synced) => unsynced_since = None,
                    Some(Durability::Committed) => {
                        unsynced_since.get_or_insert_with(disk_time);
                    }
                    None => {}
                }
                conn
            }
            None => return,
        };
    }
    // The store is closing, and the runtime may be with it: a blocking
    // task queued now can be cancelled before it runs, which reported the
    // writer failed after relay said it stopped. So the last sync runs on
    // this task, once. Were the task dropped first, SQLite's close of the
    // database's last connection checkpoints the log, which syncs it.
    if unsynced_since.is_some() {
        sync(&mut conn);
    }
}

/// Moves what is waiting in the queue into the batch, up to `max_batch`.
fn take_waiting(operations: &mut mpsc::Receiver<Operation>, batch: &mut Vec<Operation>, max_batch: usize) {
    while batch.len() < max_batch {
        match operations.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Runs `work` on the connection on tokio's blocking pool and hands the
/// connection back; `None` when the work panicked (the store is then closed:
/// the callers of that batch saw their reply channels close).
async fn on_blocking_pool<T: Send + 'static>(
    mut conn: Connection,
    work: impl FnOnce(&mut Connection) -> T + Send + 'static,
) -> Option<(Connection, T)> {
    match tokio::task::spawn_blocking(move || {
        let out = work(&mut conn);
        (conn, out)
    })
    .await
    {
        Ok(back) => Some(back),
        Err(e) => {
            error!(error = %e, "store: the writer failed; the store is closed");
            None
        }
    }
}

/// Puts committed pages on disk: the write-ahead log is synced, then
/// checkpointed. False if it could not be synced.
///
/// The checkpoint alone is not enough: it syncs the log only when it has
/// frames to copy, and a reader's snapshot can leave it none (see
/// `reader`), which would leave the newest commits in the OS's cache.
fn sync(conn: &mut Connection) -> bool {
    let synced = conn
        .path()
        .map(|db| format!("{db}-wal"))
        .ok_or_else(|| std::io::Error::other("the database has no file"))
        .and_then(|wal| std::fs::File::open(wal)?.sync_data());
    if let Err(e) = synced {
        warn!(error = %e, "store: cannot sync the write-ahead log; will try again");
        return false;
    }
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        // The log is on disk; the copy into the database waits for the next.
        warn!(error = %e, "store: cannot checkpoint the write-ahead log; will try again");
    }
    true
}

/// Runs a batch in one transaction and answers every caller; returns how
/// the batch was committed, or `None` if nothing was.
fn run_batch(
    conn: &mut Connection,
    batch: Vec<Operation>,
    precondition: &Precondition,
) -> Option<Durability> {
    let mut batch = checked(batch, precondition);
    if batch.is_empty() {
        return None;
    }
    let durability = if batch.iter().any(|op| op.durable()) {
        Durability::Synced
    } else {
        Durability::Committed
    };
    // BEGIN, SAVEPOINT, RELEASE and COMMIT all run as cached statements:
    // parsed once, not once per batch and operation. A deferred BEGIN:
    // IMMEDIATE opens a write transaction on every attached database, and
    // SQLite ends each one by walking that database's dirty pages, the
    // dedupe index's whole cache for a batch that takes no key. This
    // connection is the database's only writer (the lock file keeps out a
    // second relay; reads go through read-only connections), so the first
    // write of a batch takes the write lock as BEGIN IMMEDIATE would.
    let began = set_synchronous(conn, durability).and_then(|()| run_cached(conn, "BEGIN"));
    if let Err(e) = began {
        error!(error = %e, "store: cannot begin a transaction");
        for op in batch {
            op.answer(Some(unavailable(&e)));
        }
        return None;
    }
    let changes_before = conn.total_changes();
    let tally = Cell::new(Tally::default());
    let tx = Tx::tallied(conn, &tally);
    let all_ran = batch.iter_mut().all(|op| op.run(&tx));
    // Its statements go back to rusqlite's cache before the transaction ends.
    drop(tx);
    if !all_ran {
        // Something failed: undo the whole batch and run it again with each
        // operation isolated, so only the failing ones are refused.
        rollback(conn);
        return run_isolated(conn, batch, durability);
    }
    commit(conn, batch, tally.get(), durability, changes_before)
}

/// The batch without its synced work when `precondition` fails; that work
/// is refused with the failure.
fn checked(batch: Vec<Operation>, precondition: &Precondition) -> Vec<Operation> {
    if !batch.iter().any(|op| op.durable()) {
        return batch;
    }
    let Err(refusal) = precondition() else {
        return batch;
    };
    batch
        .into_iter()
        .filter_map(|op| {
            if op.durable() {
                op.answer(Some(refusal.clone()));
                None
            } else {
                Some(op)
            }
        })
        .collect()
}

/// The slow path: every operation in its own savepoint.
fn run_isolated(conn: &mut Connection, batch: Vec<Operation>, durability: Durability) -> Option<Durability> {
    if let Err(e) = run_cached(conn, "BEGIN") {
        error!(error = %e, "store: cannot begin a transaction");
        for op in batch {
            op.answer(Some(unavailable(&e)));
        }
        return None;
    }
    let changes_before = conn.total_changes();
    let tally = Cell::new(Tally::default());
    let tx = Tx::tallied(conn, &tally);
    let mut finished = Vec::with_capacity(batch.len());
    for mut op in batch {
        if let Err(e) = run_cached(conn, "SAVEPOINT op") {
            op.answer(Some(unavailable(&e)));
            continue;
        }
        let before = tally.get();
        let keep = op.run(&tx);
        let closed = if keep {
            run_cached(conn, "RELEASE op")
        } else {
            // The savepoint takes the operation's rows back, and with them
            // its counts (only if it did: rows kept must stay counted).
            run_cached(conn, "ROLLBACK TO op")
                .map(|()| tally.set(before))
                .and_then(|()| run_cached(conn, "RELEASE op"))
        };
        match closed {
            Ok(()) => finished.push(op),
            Err(e) => op.answer(Some(unavailable(&e))),
        }
    }
    drop(tx);
    commit(conn, finished, tally.get(), durability, changes_before)
}

/// Writes the batch's tally, commits and answers: each operation with its
/// own result, or all with the error that stopped the commit. `None` when
/// nothing was committed: the commit failed, or the batch changed no row
/// since `changes_before` (the connection's count then). SQLite writes and
/// syncs nothing for such a commit, so a synced one must not count as the
/// sync of earlier work.
fn commit(
    conn: &mut Connection,
    batch: Vec<Operation>,
    tally: Tally,
    durability: Durability,
    changes_before: u64,
) -> Option<Durability> {
    match tally
        .write(conn)
        .and_then(|()| run_cached(conn, "COMMIT").map_err(|e| unavailable(&e)))
    {
        Ok(()) => {
            for op in batch {
                op.answer(None);
            }
            (conn.total_changes() != changes_before).then_some(durability)
        }
        Err(e) => {
            error!(error = %e, "store: commit failed; the batch was rolled back");
            rollback(conn);
            for op in batch {
                op.answer(Some(e.clone()));
            }
            None
        }
    }
}

fn rollback(conn: &Connection) {
    // SQLite may have rolled back already (a full disk, an I/O error).
    if !conn.is_autocommit() {
        let _ = run_cached(conn, "ROLLBACK");
    }
}

/// `synchronous=FULL` makes a commit fsync the WAL; `NORMAL` leaves that to
/// the next synced commit or checkpoint.
fn set_synchronous(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    run_cached(
        conn,
        match durability {
            Durability::Synced => "PRAGMA synchronous = FULL",
            Durability::Committed => "PRAGMA synchronous = NORMAL",
        },
    )
}

fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// When unsynced work began waiting for the disk. Real time, not the
/// schedule's clock: `MAX_UNSYNCED` bounds what a power cut can take back,
/// and that must hold even where tokio's clock is paused.
#[allow(clippy::disallowed_methods)]
fn disk_time() -> std::time::Instant {
    std::time::Instant::now()
}

// These tests watch the database file in real time.
#[allow(clippy::disallowed_methods)]
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use rusqlite::params;

    use super::*;
    use crate::store::{JobState, SqliteStore};

    /// A batch writes only the databases its work writes: one attached
    /// beside the store's file (the dedupe index) stays out of a batch
    /// that does not touch it, and out of the end of its transaction.
    #[tokio::test]
    async fn a_batch_opens_a_write_only_on_the_databases_it_writes() {
        use rusqlite::TransactionState;
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (key TEXT PRIMARY KEY);
             ATTACH DATABASE '' AS beside; CREATE TABLE beside.u (key TEXT PRIMARY KEY);",
        )
        .unwrap();
        let writer = Writer::spawn(
            &tokio::runtime::Handle::current(),
            conn,
            MAX_BATCH,
            Arc::new(|| Ok(())),
        );
        let states = |conn: &Connection| -> Result<_, StoreError> {
            let state = |db: &str| conn.transaction_state(Some(db)).map_err(|e| unavailable(&e));
            Ok((state("main")?, state("beside")?))
        };
        for (table, written) in [
            ("t", (TransactionState::Write, TransactionState::None)),
            ("beside.u", (TransactionState::None, TransactionState::Write)),
        ] {
            let open = writer
                .run(Durability::Synced, move |conn| {
                    conn.execute(&format!("INSERT INTO {table} (key) VALUES ('a')"), [])
                        .map_err(|e| unavailable(&e))?;
                    states(conn)
                })
                .await
                .unwrap();
            assert_eq!(open, written, "(main, beside) after writing {table}");
        }
    }

    /// The precondition is asked once for a batch of synced work, however
    /// many callers share it; while it fails, synced work is refused with
    /// its error and leaves no trace, and the rest of the batch still runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn synced_work_waits_on_the_precondition_asked_once_a_batch() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (key TEXT PRIMARY KEY);")
            .unwrap();
        let holds = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicUsize::new(0));
        let precondition: Precondition = {
            let (holds, asked) = (holds.clone(), asked.clone());
            Arc::new(move || {
                asked.fetch_add(1, Ordering::SeqCst);
                if holds.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(StoreError::Unavailable("the file is gone".to_owned()))
                }
            })
        };
        let writer = Arc::new(Writer::spawn(
            &tokio::runtime::Handle::current(),
            conn,
            MAX_BATCH,
            precondition,
        ));
        let write = |key: String| {
            move |conn: &Tx<'_>| {
                conn.execute("INSERT INTO t (key) VALUES (?1)", params![key])
                    .map_err(|e| unavailable(&e))
            }
        };
        // Holds the writer (unsynced, so not asked), so that what follows
        // queues up into one batch.
        let queue_behind_a_busy_writer = |durabilities: Vec<(String, Durability)>| {
            let writer = writer.clone();
            async move {
                let busy = writer.run(Durability::Committed, |_| {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(0)
                });
                let calls: Vec<_> = durabilities
                    .into_iter()
                    .map(|(key, durability)| {
                        let writer = writer.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            writer.run(durability, write(key)).await
                        })
                    })
                    .collect();
                busy.await.unwrap();
                let mut answers = Vec::new();
                for call in calls {
                    answers.push(call.await.unwrap());
                }
                answers
            }
        };
        let answers = queue_behind_a_busy_writer(vec![
            ("synced-1".to_owned(), Durability::Synced),
            ("committed".to_owned(), Durability::Committed),
            ("synced-2".to_owned(), Durability::Synced),
        ])
        .await;
        assert!(
            matches!(&answers[0], Err(StoreError::Unavailable(m)) if m == "the file is gone"),
            "{answers:?}"
        );
        assert!(matches!(answers[1], Ok(1)), "{answers:?}");
        assert!(
            matches!(&answers[2], Err(StoreError::Unavailable(_))),
            "{answers:?}"
        );
        assert_eq!(asked.load(Ordering::SeqCst), 1, "asked once for the batch");

        holds.store(true, Ordering::SeqCst);
        let answers = queue_behind_a_busy_writer(
            (0..5)
                .map(|n| (format!("later-{n}"), Durability::Synced))
                .collect(),
        )
        .await;
        assert!(answers.iter().all(|a| matches!(a, Ok(1))), "{answers:?}");
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "five synced writes, one question"
        );
        let keys = writer
            .run(Durability::Committed, |conn| {
                let mut stmt = conn.prepare("SELECT key FROM t ORDER BY key").unwrap();
                let keys = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
                Ok(keys.map(Result::unwrap).collect::<Vec<_>>())
            })
            .await
            .unwrap();
        assert_eq!(
            keys,
            ["committed", "later-0", "later-1", "later-2", "later-3", "later-4"]
        );
    }

    /// Operations queued while the writer is busy share the next batch;
    /// one that fails leaves no trace and spoils none of the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_operation_spoils_nothing_else_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(
            SqliteStore::open(&dir.path().join("relay.db"), std::time::UNIX_EPOCH).unwrap(),
        );
        // Each also counts a queued job, as an ingest would: the counts
        // must move with the rows, the failing operation's with its row.
        let write = |key: String| {
            move |conn: &Tx<'_>| {
                conn.count_inserted(JobState::Queued, 1)?;
                conn.execute("INSERT INTO meta (key, value) VALUES (?1, 'x')", params![key])
                    .map_err(|e| unavailable(&e))
            }
        };
        let queued = || async {
            store
                .run(Durability::Committed, |conn| {
                    conn.query_row("SELECT n FROM job_counts WHERE state = 'queued'", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .map_err(|e| unavailable(&e))
                })
                .await
                .unwrap()
        };
        // Holds the writer, so the calls below queue up into one batch.
        let busy = store.run(Durability::Synced, |_| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        });
        let mut calls = Vec::new();
        for n in 0..6 {
            let store = store.clone();
            let key = format!("k{n}");
            calls.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if n == 3 {
                    // Writes, then fails: its row must not survive.
                    store
                        .run(Durability::Synced, move |conn| {
                            write(key.clone())(conn)?;
                            Err::<usize, _>(StoreError::Corrupt("refused on purpose".to_owned()))
                        })
                        .await
                } else {
                    store.run(Durability::Committed, write(key)).await
                }
            }));
        }
        busy.await.unwrap();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        for (n, answer) in answers.iter().enumerate() {
            match (n, answer) {
                (3, Err(StoreError::Corrupt(reason))) => assert_eq!(reason, "refused on purpose"),
                (3, other) => panic!("the failing operation answered {other:?}"),
                (_, Ok(1)) => {}
                (_, other) => panic!("operation {n} answered {other:?}"),
            }
        }
        let keys = store
            .run(Durability::Committed, |conn| {
                let mut stmt = conn
                    .prepare("SELECT key FROM meta WHERE key LIKE 'k%' ORDER BY key")
                    .unwrap();
                let keys = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
                Ok(keys.map(Result::unwrap).collect::<Vec<_>>())
            })
            .await
            .unwrap();
        assert_eq!(keys, ["k0", "k1", "k2", "k4", "k5"]);
        assert_eq!(
            queued().await,
            5,
            "the failing operation's count went with its row"
        );

        // A batch where nothing fails writes its tally on the fast path.
        let busy = store.run(Durability::Synced, |_| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        });
        let calls: Vec<_> = (6..9)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    store.run(Durability::Committed, write(format!("k{n}"))).await
                })
            })
            .collect();
        busy.await.unwrap();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), 1);
        }
        assert_eq!(queued().await, 8);
    }

    /// Whether `marker` has reached the database file itself, which only a
    /// checkpoint (a sync of the WAL, then a copy) writes to.
    fn in_main_file(path: &Path, marker: &str) -> bool {
        std::fs::read(path).is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
    }

    /// Waits for `marker` to reach the database file itself (synced, then
    /// checkpointed), failing after 5 s.
    async fn synced_within_5s(path: &Path, marker: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !in_main_file(path, marker) {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A fresh store in a temporary directory holding `marker`, committed
    /// but not yet synced; the directory, the database's path and the store.
    async fn store_with_unsynced_marker(marker: &str) -> (tempfile::TempDir, PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = SqliteStore::open(&path, std::time::UNIX_EPOCH).unwrap();
        write_unsynced(&store, marker.to_owned()).await;
        (dir, path, store)
    }

    async fn write_unsynced(store: &SqliteStore, key: String) {
        write_marker(store, Durability::Committed, key).await;
    }

    /// Inserts `key` into `meta` with `durability`; a key already there is
    /// left as it is (the statement then changes no row).
    async fn write_marker(store: &SqliteStore, durability: Durability, key: String) {
        store
            .run(durability, move |conn| {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, 'x') ON CONFLICT (key) DO NOTHING",
                    params![key],
                )
                .map_err(|e| unavailable(&e))
            })
            .await
            .unwrap();
    }

    /// Work answered before its fsync is put on disk by the writer once it
    /// has nothing else to do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsynced_work_is_synced_once_the_writer_is_idle() {
        let (_dir, path, _store) = store_with_unsynced_marker("marker-idle-5c1e").await;
        synced_within_5s(&path, "marker-idle-5c1e").await;
    }

    /// A synced batch that changes nothing (a duplicate delivery's ingest)
    /// writes nothing, so SQLite syncs nothing: the work committed before
    /// it is still put on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_synced_batch_that_changes_nothing_leaves_earlier_work_to_sync() {
        let (_dir, path, store) = store_with_unsynced_marker("marker-noop-7a2d").await;
        write_marker(&store, Durability::Synced, "marker-noop-7a2d".to_owned()).await;
        synced_within_5s(&path, "marker-noop-7a2d").await;
    }

    /// A writer that never goes idle still syncs unsynced work within
    /// MAX_UNSYNCED.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsynced_work_is_synced_in_time_under_steady_load() {
        let (_dir, path, store) = store_with_unsynced_marker("marker-busy-0000").await;
        // A write every 10 ms: never the 50 ms the idle sync waits for.
        let started = std::time::Instant::now();
        let mut n = 0;
        while !in_main_file(&path, "marker-busy-0000") {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "never synced while busy"
            );
            n += 1;
            write_unsynced(&store, format!("steady-{n}")).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            n >= 5,
            "synced after only {n} writes: the test did not keep the writer busy"
        );
    }
}
