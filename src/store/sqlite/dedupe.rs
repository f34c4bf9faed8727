//! The loop guard's dedupe keys on SQLite: an index of the keys taken,
//! kept off the database file, and the log on disk it is rebuilt from.
//!
//! Why two. A key is a commit's repo, ref and sha, and a sha is random: in
//! a B-tree on disk ordered by key, each webhook's key landed on a leaf of
//! its own, which every commit then wrote whole to the WAL and the
//! checkpoint copied again, about 10 KB a webhook of the 26 relay wrote
//! (schema V13). Now the lookup goes to an index in a private temporary
//! database attached to the writer's connection (`dedupe_index`), whose
//! pages stay in a bounded cache of their own ([`INDEX_CACHE_KIB`]) and
//! spill, past it, to an unlinked file that is never synced. What is
//! durable is the log (`main.dedupe`, schema V14): one row a key taken,
//! appended in rowid order, so a commit's keys share the table's last
//! leaf. Opening the store reads back into the index the keys of the log
//! still open at the caller's `now`; the purge trims the log.
//!
//! The index holds a digest of each target and key (16 bytes of SHA-256),
//! not their text. Its pages stay dirty in its cache while they fit there,
//! and SQLite walks every dirty page of a database at the end of each
//! transaction that wrote it: with the text, ten minutes of keys at 100
//! pushes a second took three times the pages, and a webhook sent alone
//! inside such a window cost the store two to three times the CPU of one
//! on an empty index. With the digest, and the writer's batches leaving
//! the index out of their transaction unless they take a key, about 1.1
//! times (the store's bench, `quiet`).
//!
//! The index is in the writer's transactions like any table: a batch that
//! rolls back, or one operation's savepoint, takes its keys back with it.
//! Its journal is kept in memory and it is never synced, so a commit
//! waits on nothing of it; what it spills, the kernel writes back to its
//! file when it chooses.
//!
//! What this module must never do: answer whether a key is held from
//! anything but the index, take a key without logging it in the same
//! transaction, or decide by a clock of its own (times come from the
//! caller).

use std::time::{Duration, SystemTime};

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, params};

use super::tally::Tx;
use super::{to_millis, unavailable};
use crate::store::{ForgottenKeys, StoreError};

/// The index's page cache, in KiB. Past it, pages spill to the index's
/// temporary file: about 300,000 keys (a window of 50 minutes at 100
/// pushes a second) stay in memory.
pub(super) const INDEX_CACHE_KIB: i64 = 8 * 1024;

/// Attaches the index to the writer's connection and fills it from the
/// log with the keys whose window is still open at `now`, each by its
/// [`digest`]; how many keys it holds. Once a connection, outside any
/// transaction, after the migrations.
///
/// The log keeps a key until the purge forgets it, up to an hour after its
/// window closed (the purge runs every quarter of the retention, an hour
/// at most): read back whole, a restart after a busy hour rebuilt the
/// index from several times the keys that still count. A key left out has
/// closed for every caller too, whose `now` is no earlier than this one.
pub(super) fn open_index(conn: &Connection, now: SystemTime) -> rusqlite::Result<u64> {
    // An empty file name attaches a private temporary database. Under
    // `temp_store = MEMORY` (the writer's, for statement journals) SQLite
    // would keep it in memory whole, without bound; with `FILE` it spills
    // past its cache. The setting is read only when the database is
    // attached, so the writer's own goes back at once.
    conn.pragma_update(None, "temp_store", "FILE")?;
    let attached = conn.execute("ATTACH DATABASE '' AS dedupe_index", []);
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    attached?;
    conn.pragma_update(Some("dedupe_index"), "cache_size", -INDEX_CACHE_KIB)?;
    // Rolled back with the writer's batches, never synced: nothing of a
    // crash is to be recovered here, the log is.
    conn.pragma_update(Some("dedupe_index"), "journal_mode", "MEMORY")?;
    conn.pragma_update(Some("dedupe_index"), "synchronous", "OFF")?;
    conn.execute_batch(
        "CREATE TABLE dedupe_index.keys (
             digest     BLOB PRIMARY KEY,
             expires_at INTEGER NOT NULL
         ) WITHOUT ROWID;",
    )?;
    // One statement, as SQLite reads the log: a row at a time through
    // rusqlite took the read-back of 60,000 open keys from 75 ms to 270.
    conn.create_scalar_function(
        "relay_dedupe_digest",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let (target, key) = (ctx.get_raw(0).as_str()?, ctx.get_raw(1).as_str()?);
            Ok(digest(target, key).to_vec())
        },
    )?;
    conn.execute(
        "INSERT INTO dedupe_index.keys (digest, expires_at)
             SELECT relay_dedupe_digest(target, key), expires_at FROM main.dedupe WHERE expires_at > ?1
             ON CONFLICT (digest) DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)",
        [to_millis(now)],
    )?;
    let keys: i64 = conn.query_row("SELECT COUNT(*) FROM dedupe_index.keys", [], |r| r.get(0))?;
    Ok(keys.unsigned_abs())
}

/// Takes `key` for `target` until `now + window`, unless an earlier take's
/// window is still open; whether it was taken.
pub(super) fn take(
    conn: &Tx<'_>,
    target: &str,
    key: &str,
    now: SystemTime,
    window: Duration,
) -> Result<bool, StoreError> {
    let expires_at = to_millis(now + window);
    let taken = conn
        .statement(
            "INSERT INTO dedupe_index.keys (digest, expires_at) VALUES (?1, ?2)
             ON CONFLICT (digest) DO UPDATE SET expires_at = excluded.expires_at
             WHERE dedupe_index.keys.expires_at <= ?3",
        )
        .and_then(|mut stmt| stmt.execute(params![&digest(target, key)[..], expires_at, to_millis(now)]))
        .map_err(|e| unavailable(&e))?
        > 0;
    if taken {
        conn.statement("INSERT INTO main.dedupe (target, key, expires_at) VALUES (?1, ?2, ?3)")
            .and_then(|mut stmt| stmt.execute(params![target, key, expires_at]))
            .map_err(|e| unavailable(&e))?;
    }
    Ok(taken)
}

/// Where the retention purge's sweep stands in the index (the first
/// `(target, key)` its next batch looks at) and in the log (the first
/// rowid). One that reaches its end waits there for the other, so a sweep
/// ends: the next begins both from the start.
#[derive(Debug, Clone, Default)]
pub(super) struct SweepFrom {
    index: Cursor<Vec<u8>>,
    log: Cursor<i64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
enum Cursor<T> {
    #[default]
    Start,
    At(T),
    End,
}

impl<T> Cursor<T> {
    fn after(next: Option<T>) -> Cursor<T> {
        next.map_or(Cursor::End, Cursor::At)
    }
}

/// Looks at the next `limit` keys of the index from `from`, in key order,
/// and at the next `limit` rows of the log, in the order they were taken,
/// and forgets those whose window closed by `now`. A batch of the log is
/// neighbouring rows, so it writes a few pages. Counts what it deleted from
/// the log, one row a window a key was taken for: the index holds only the
/// keys taken since the store opened and those still open then, so the
/// log is what a closed key surely leaves behind. Says where the next
/// batch starts, and whether the sweep has more to look at.
pub(super) fn forget(
    conn: &Connection,
    now: SystemTime,
    limit: usize,
    from: &SweepFrom,
) -> Result<(ForgottenKeys, SweepFrom), StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let now = to_millis(now);
    let index = match &from.index {
        Cursor::End => Cursor::End,
        Cursor::Start => forget_from_index(conn, now, limit, &[])?,
        Cursor::At(first) => forget_from_index(conn, now, limit, first)?,
    };
    let (forgotten, log) = match from.log {
        Cursor::End => (0, Cursor::End),
        Cursor::Start => forget_from_log(conn, now, limit, 0)?,
        Cursor::At(first) => forget_from_log(conn, now, limit, first)?,
    };
    let next = if index == Cursor::End && log == Cursor::End {
        SweepFrom::default()
    } else {
        SweepFrom { index, log }
    };
    let more = !(next.index == Cursor::Start && next.log == Cursor::Start);
    Ok((ForgottenKeys { forgotten, more }, next))
}

/// Forgets the expired keys among the index's next `limit` from `first`;
/// where the next batch starts.
fn forget_from_index(
    conn: &Connection,
    now: i64,
    limit: i64,
    first: &[u8],
) -> Result<Cursor<Vec<u8>>, StoreError> {
    let next: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT digest FROM dedupe_index.keys WHERE digest >= ?1 ORDER BY digest LIMIT 1 OFFSET ?2",
        )
        .and_then(|mut stmt| stmt.query_row(params![first, limit], |r| r.get(0)).optional())
        .map_err(|e| unavailable(&e))?;
    match &next {
        Some(next) => conn
            .prepare_cached(
                "DELETE FROM dedupe_index.keys WHERE digest >= ?1 AND digest < ?2 AND expires_at <= ?3",
            )
            .and_then(|mut stmt| stmt.execute(params![first, next, now])),
        None => conn
            .prepare_cached("DELETE FROM dedupe_index.keys WHERE digest >= ?1 AND expires_at <= ?2")
            .and_then(|mut stmt| stmt.execute(params![first, now])),
    }
    .map_err(|e| unavailable(&e))?;
    Ok(Cursor::after(next))
}

/// What the index holds for `key` taken for `target`: the first 16 bytes
/// of a SHA-256 of both, the target's length first so no pair runs into
/// another. A key comes from the payload; a cryptographic hash is what
/// keeps a crafted one from landing on another commit's or target's.
fn digest(target: &str, key: &str) -> [u8; 16] {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update((target.len() as u64).to_le_bytes());
    hash.update(target.as_bytes());
    hash.update(key.as_bytes());
    let full = hash.finalize();
    let mut short = [0; 16];
    short.copy_from_slice(&full[..16]);
    short
}

/// Deletes the expired rows among the log's next `limit` from rowid
/// `first`; how many, and where the next batch starts.
fn forget_from_log(
    conn: &Connection,
    now: i64,
    limit: i64,
    first: i64,
) -> Result<(u64, Cursor<i64>), StoreError> {
    let next: Option<i64> = conn
        .prepare_cached("SELECT rowid FROM main.dedupe WHERE rowid >= ?1 ORDER BY rowid LIMIT 1 OFFSET ?2")
        .and_then(|mut stmt| stmt.query_row(params![first, limit], |r| r.get(0)).optional())
        .map_err(|e| unavailable(&e))?;
    let forgotten = conn
        .prepare_cached("DELETE FROM main.dedupe WHERE rowid >= ?1 AND rowid < ?2 AND expires_at <= ?3")
        .and_then(|mut stmt| stmt.execute(params![first, next.unwrap_or(i64::MAX), now]))
        .map_err(|e| unavailable(&e))?;
    Ok((forgotten as u64, Cursor::after(next)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use uuid::Uuid;

    use super::*;
    use crate::store::sqlite::{from_millis, schema};

    fn writer_at(path: &Path) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        conn
    }

    fn at(ms: i64) -> SystemTime {
        from_millis(ms)
    }

    fn commit_key() -> String {
        format!("acme/api\nrefs/heads/main\n{}", Uuid::new_v4().simple())
    }

    /// Opening the store rebuilds the index from the log: each key with
    /// the window of its latest take, held and freed as before.
    #[test]
    fn the_index_is_rebuilt_from_the_log_with_each_keys_latest_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        {
            let conn = writer_at(&path);
            let tx = Tx::immediate(&conn);
            let ms = Duration::from_millis;
            assert!(take(&tx, "ci", "a", at(0), ms(100)).unwrap());
            assert!(!take(&tx, "ci", "a", at(50), ms(100)).unwrap());
            assert!(
                take(&tx, "ci", "a", at(200), ms(100)).unwrap(),
                "taken again once closed"
            );
            assert!(
                take(&tx, "gl", "a", at(50), ms(1_000)).unwrap(),
                "a key is per target"
            );
        }
        let conn = writer_at(&path);
        let tx = Tx::immediate(&conn);
        let held =
            |target: &str, now: i64| !take(&tx, target, "a", at(now), Duration::from_millis(1)).unwrap();
        assert!(held("ci", 250), "the latest take's window, not the first's");
        assert!(held("gl", 1_000));
        assert!(!held("ci", 300), "closed at 300");
        assert!(!held("gl", 1_050), "closed at 1,050");
    }

    /// A restart reads back only the keys whose window is still open: the
    /// log keeps closed ones until the purge, up to an hour of them.
    #[test]
    fn a_restart_reads_back_only_the_keys_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        {
            let conn = writer_at(&path);
            let tx = Tx::immediate(&conn);
            let ms = Duration::from_millis;
            for n in 0..50 {
                assert!(take(&tx, "ci", &format!("closed-{n}"), at(0), ms(100)).unwrap());
            }
            assert!(take(&tx, "ci", "open", at(0), ms(1_000)).unwrap());
            assert!(take(&tx, "ci", "reopened", at(0), ms(100)).unwrap());
            assert!(take(&tx, "ci", "reopened", at(200), ms(1_000)).unwrap());
        }
        let mut conn = Connection::open(&path).unwrap();
        schema::prepare(&mut conn, at(500)).unwrap();
        let read_back: Vec<(Vec<u8>, i64)> = conn
            .prepare("SELECT digest, expires_at FROM dedupe_index.keys ORDER BY expires_at")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            read_back,
            vec![
                (digest("ci", "open").to_vec(), 1_000),
                (digest("ci", "reopened").to_vec(), 1_200)
            ]
        );
        let logged: i64 = conn
            .query_row("SELECT COUNT(*) FROM main.dedupe", [], |r| r.get(0))
            .unwrap();
        assert_eq!(logged, 53, "the log is the purge's to trim");
        let (batch, _) = forget(&conn, at(500), 100, &SweepFrom::default()).unwrap();
        assert_eq!(
            batch.forgotten, 51,
            "the purge counts the closed windows the log kept, read back or not"
        );
        let tx = Tx::immediate(&conn);
        assert!(!take(&tx, "ci", "open", at(999), Duration::from_millis(1)).unwrap());
        assert!(take(&tx, "ci", "closed-7", at(600), Duration::from_millis(1)).unwrap());
    }

    /// The index is in the writer's transactions: a batch that rolls back,
    /// or one operation's savepoint, gives its keys back, in the index and
    /// in the log alike.
    #[test]
    fn a_take_rolled_back_leaves_the_key_free() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let window = Duration::from_secs(60);
        let tx = Tx::immediate(&conn);
        conn.execute_batch("BEGIN").unwrap();
        assert!(take(&tx, "ci", "a", at(0), window).unwrap());
        conn.execute_batch("ROLLBACK").unwrap();
        conn.execute_batch("BEGIN; SAVEPOINT one").unwrap();
        assert!(
            take(&tx, "ci", "a", at(0), window).unwrap(),
            "the batch gave it back"
        );
        assert!(take(&tx, "ci", "b", at(0), window).unwrap());
        conn.execute_batch("ROLLBACK TO one; RELEASE one").unwrap();
        assert!(
            take(&tx, "ci", "b", at(0), window).unwrap(),
            "the savepoint gave it back"
        );
        conn.execute_batch("COMMIT").unwrap();
        let count = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!((count("dedupe_index.keys"), count("main.dedupe")), (1, 1));
    }

    /// A commit's keys are appended to the log's last leaf, and the index
    /// writes nothing to the database file: 21 random keys, as one commit
    /// of relay at 32 connections takes, add a few pages to the WAL (the
    /// last leaf, a new one and their parent, the file's header) where an
    /// index on disk (schema V13) added 32.
    #[test]
    fn taking_a_commits_keys_writes_a_few_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let conn = writer_at(&path);
        let tx = Tx::immediate(&conn);
        let window = Duration::from_secs(600);
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..20_000 {
            assert!(take(&tx, "ci", &commit_key(), at(0), window).unwrap());
        }
        conn.execute_batch("COMMIT").unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..21 {
            assert!(take(&tx, "ci", &commit_key(), at(0), window).unwrap());
        }
        conn.execute_batch("COMMIT").unwrap();
        let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
        let page = u64::try_from(page).unwrap();
        let wal = std::fs::metadata(dir.path().join("relay.db-wal")).unwrap().len();
        let frames = wal / (page + 24);
        assert!(frames <= 5, "a commit of 21 keys wrote {frames} pages");
    }

    /// Ten minutes of commits at 100 pushes a second fit in a quarter of
    /// the index's cache: the pages SQLite walks at the end of every
    /// transaction that takes a key. With each target and key as text, the
    /// same keys took 1,254 pages of 4 KB, against 407.
    #[test]
    fn a_busy_windows_keys_take_a_quarter_of_the_index_cache() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let window = Duration::from_secs(600);
        let tx = Tx::immediate(&conn);
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..60_000 {
            assert!(take(&tx, "circleci", &commit_key(), at(0), window).unwrap());
        }
        conn.execute_batch("COMMIT").unwrap();
        let pages: i64 = conn
            .pragma_query_value(Some("dedupe_index"), "page_count", |r| r.get(0))
            .unwrap();
        let page_size: i64 = conn
            .pragma_query_value(Some("dedupe_index"), "page_size", |r| r.get(0))
            .unwrap();
        assert!(
            pages * page_size <= INDEX_CACHE_KIB * 1024 / 4,
            "60,000 keys took {pages} pages of {page_size} bytes"
        );
    }

    /// Keys that differ in their target, or only where one's target ends
    /// and its key begins, are different keys.
    #[test]
    fn a_key_is_its_target_and_its_text() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let window = Duration::from_secs(60);
        let tx = Tx::immediate(&conn);
        assert!(take(&tx, "ci", "ab", at(0), window).unwrap());
        assert!(take(&tx, "cia", "b", at(0), window).unwrap());
        assert!(take(&tx, "gl", "ab", at(0), window).unwrap());
        assert!(!take(&tx, "ci", "ab", at(1), window).unwrap(), "held");
    }

    /// A sweep ends: the index and the log each wait at their end for the
    /// other, then both begin again.
    #[test]
    fn a_sweep_ends_when_the_index_and_the_log_both_have() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let tx = Tx::immediate(&conn);
        for n in 0..30 {
            assert!(take(&tx, "ci", &format!("{n:02}"), at(n), Duration::ZERO).unwrap());
        }
        // Renewals: the log has rows the index does not, so it ends later.
        for n in 0..30 {
            assert!(take(&tx, "ci", &format!("{n:02}"), at(100 + n), Duration::ZERO).unwrap());
        }
        let mut from = SweepFrom::default();
        let mut batches = Vec::new();
        loop {
            let (batch, next) = forget(&conn, at(1_000), 10, &from).unwrap();
            batches.push(batch.forgotten);
            from = next;
            if !batch.more {
                break;
            }
            assert!(batches.len() < 20, "the sweep does not end: {batches:?}");
        }
        assert_eq!(
            batches,
            [10, 10, 10, 10, 10, 10],
            "the log's 60 rows, a window each, take 6 batches"
        );
        let left = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(left("main.dedupe"), 0, "the log");
        assert_eq!(
            left("dedupe_index.keys"),
            0,
            "the index, which the count leaves out"
        );
        let (batch, _) = forget(&conn, at(1_000), 10, &from).unwrap();
        assert_eq!(
            (batch.forgotten, batch.more),
            (0, false),
            "the next sweep begins again"
        );
    }
}
