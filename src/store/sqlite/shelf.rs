//! Statements kept prepared for the length of one writer batch, so that the
//! webhooks, claims and finished sends of a batch that run the same SQL
//! find its statement by comparing text, not through rusqlite's statement
//! cache. That cache hashes the whole SQL text on each take and again on
//! each return, and clears the bindings on return: about 1,800
//! instructions a statement, 12,000 a webhook (callgrind), where the
//! shelf's lookup is a few comparisons of text.
//!
//! What this module must never do: hand out one statement twice at once (a
//! second use while the first is out gets a statement of its own from
//! rusqlite's cache), or keep a statement beyond its batch (the shelf is
//! dropped with the batch's [`Tx`](super::tally::Tx), which gives every
//! statement back to rusqlite's cache, reset).

use std::cell::{OnceCell, RefCell, RefMut};
use std::ops::{Deref, DerefMut};

use rusqlite::{CachedStatement, Connection, Statement};

/// The most statements one shelf keeps; a batch's further texts are
/// prepared through rusqlite's cache as before. A batch of every kind of
/// operation runs about twenty.
const KEPT: usize = 32;

/// The statements a batch has used so far, each in a slot of its own, by
/// its SQL text. Slots are filled once and never emptied, so several
/// statements can be in use at once (an ingest's job insert while its
/// loop guard asks the dedupe index).
pub(super) struct Shelf<'c> {
    conn: &'c Connection,
    slots: [OnceCell<(Box<str>, RefCell<CachedStatement<'c>>)>; KEPT],
}

impl<'c> Shelf<'c> {
    pub(super) fn new(conn: &'c Connection) -> Shelf<'c> {
        Shelf {
            conn,
            slots: std::array::from_fn(|_| OnceCell::new()),
        }
    }

    /// The statement for `sql`: the one kept, prepared by an earlier use in
    /// this batch, or one from rusqlite's cache, kept from now on. A text
    /// whose kept statement is in use already, or one past [`KEPT`], gets
    /// one from rusqlite's cache, not kept.
    pub(super) fn statement(&self, sql: &str) -> rusqlite::Result<Shelved<'_, 'c>> {
        for slot in &self.slots {
            let (text, statement) = match slot.get() {
                Some(kept) => kept,
                None => {
                    let prepared = RefCell::new(self.conn.prepare_cached(sql)?);
                    if slot.set((Box::from(sql), prepared)).is_err() {
                        break;
                    }
                    match slot.get() {
                        Some(kept) => kept,
                        None => break,
                    }
                }
            };
            if **text == *sql {
                return match statement.try_borrow_mut() {
                    Ok(statement) => Ok(Shelved::Kept(statement)),
                    Err(_) => self.conn.prepare_cached(sql).map(Shelved::Loose),
                };
            }
        }
        self.conn.prepare_cached(sql).map(Shelved::Loose)
    }

    /// How many statements it keeps.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.slots.iter().filter(|slot| slot.get().is_some()).count()
    }
}

/// A statement in use: the shelf's (given back when this is dropped), or
/// one of rusqlite's cache.
pub(super) enum Shelved<'s, 'c> {
    Kept(RefMut<'s, CachedStatement<'c>>),
    Loose(CachedStatement<'c>),
}

impl<'c> Deref for Shelved<'_, 'c> {
    type Target = Statement<'c>;

    fn deref(&self) -> &Statement<'c> {
        match self {
            Shelved::Kept(statement) => statement,
            Shelved::Loose(statement) => statement,
        }
    }
}

impl<'c> DerefMut for Shelved<'_, 'c> {
    fn deref_mut(&mut self) -> &mut Statement<'c> {
        match self {
            Shelved::Kept(statement) => statement,
            Shelved::Loose(statement) => statement,
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        conn
    }

    /// Statements a batch uses again are the ones it prepared: rusqlite's
    /// cache is not asked again until the shelf is gone.
    #[test]
    fn a_statement_used_again_is_the_one_kept() {
        let conn = conn();
        let shelf = Shelf::new(&conn);
        let insert = "INSERT INTO t (n) VALUES (?1)";
        for n in 0..3 {
            assert!(matches!(shelf.statement(insert).unwrap(), Shelved::Kept(_)));
            shelf.statement(insert).unwrap().execute(params![n]).unwrap();
        }
        let count = "SELECT COUNT(*), SUM(n) FROM t";
        let read = |shelf: &Shelf<'_>| {
            shelf
                .statement(count)
                .unwrap()
                .query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))
                .unwrap()
        };
        assert_eq!(read(&shelf), (3, 3));
        assert_eq!(shelf.kept(), 2, "one statement a text");
        // Bindings of the last use do not leak into the next: each binds all.
        shelf.statement(insert).unwrap().execute(params![10]).unwrap();
        assert_eq!(read(&shelf), (4, 13));
        drop(shelf);
        // Given back to rusqlite's cache, reset: a write after them commits.
        conn.execute("INSERT INTO t (n) VALUES (1)", []).unwrap();
        assert_eq!(
            conn.query_row("SELECT COUNT(*) FROM t", [], |row| row.get::<_, i64>(0))
                .unwrap(),
            5
        );
    }

    /// A second statement while one is in use comes from rusqlite's cache,
    /// the same text included, and both work.
    #[test]
    fn a_statement_in_use_is_never_handed_out_twice() {
        let conn = conn();
        conn.execute_batch("INSERT INTO t (n) VALUES (1), (2), (3)")
            .unwrap();
        let shelf = Shelf::new(&conn);
        let each = "SELECT n FROM t ORDER BY n";
        let mut outer = shelf.statement(each).unwrap();
        assert!(matches!(outer, Shelved::Kept(_)));
        let mut rows = outer.query([]).unwrap();
        let mut pairs = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            let n: i64 = row.get(0).unwrap();
            let mut inner = shelf.statement(each).unwrap();
            assert!(matches!(inner, Shelved::Loose(_)));
            let first: i64 = inner.query_row([], |row| row.get(0)).unwrap();
            pairs.push((n, first));
        }
        assert_eq!(pairs, [(1, 1), (2, 1), (3, 1)]);
        drop(rows);
        drop(outer);
        assert!(matches!(shelf.statement(each).unwrap(), Shelved::Kept(_)));
    }

    /// Different statements can be in use at once, each the one kept: a
    /// query's rows read while another statement writes.
    #[test]
    fn different_statements_in_use_at_once_are_each_kept() {
        let conn = conn();
        conn.execute_batch("INSERT INTO t (n) VALUES (1), (2)").unwrap();
        let shelf = Shelf::new(&conn);
        let mut each = shelf.statement("SELECT n FROM t ORDER BY n").unwrap();
        assert!(matches!(each, Shelved::Kept(_)));
        let mut rows = each.query([]).unwrap();
        let mut read = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            let n: i64 = row.get(0).unwrap();
            read.push(n);
            let mut count = shelf.statement("SELECT COUNT(*) FROM t WHERE n <= ?1").unwrap();
            assert!(matches!(count, Shelved::Kept(_)));
            let below: i64 = count.query_row([n], |row| row.get(0)).unwrap();
            assert_eq!(below, n);
        }
        assert_eq!(read, [1, 2]);
        drop(rows);
        drop(each);
        assert_eq!(shelf.kept(), 2);
    }

    /// Past its slots, a shelf still answers, from rusqlite's cache.
    #[test]
    fn texts_past_the_slots_are_prepared_and_not_kept() {
        let conn = conn();
        let shelf = Shelf::new(&conn);
        for n in 0..=KEPT {
            let sql = format!("SELECT {n}");
            let statement = shelf.statement(&sql).unwrap();
            assert_eq!(matches!(statement, Shelved::Kept(_)), n < KEPT, "{sql}");
            let mut statement = statement;
            let answer: i64 = statement.query_row([], |row| row.get(0)).unwrap();
            assert_eq!(answer, i64::try_from(n).unwrap());
        }
        assert_eq!(shelf.kept(), KEPT);
    }

    /// A text that does not prepare is an error, and keeps nothing.
    #[test]
    fn sql_that_does_not_prepare_is_refused_and_not_kept() {
        let conn = conn();
        let shelf = Shelf::new(&conn);
        assert!(shelf.statement("SELECT nothing FROM nowhere").is_err());
        assert_eq!(shelf.kept(), 0);
    }
}
