//! The job counts `/metrics` and the status page read (`job_counts`), as
//! the statements that insert jobs and move them between states keep them
//! (schema V11 and V16: no trigger counts those). An operation that runs in
//! the writer's batch adds what it moved to the batch's [`Tally`], and the
//! writer writes the tally once, just before the batch commits: one `UPDATE`
//! a state for the whole batch instead of one or two for each webhook,
//! claim and finished send (those were 15,000 instructions a webhook under
//! callgrind, 3% of relay's).
//!
//! What this module must never do: let a count reach the store apart from
//! the rows it counts. A tally is written inside the transaction of the
//! writes it counts, so both commit or neither does; an operation that
//! fails inside a batch takes its part of the tally back with its
//! savepoint (the writer restores the tally it had before).

use std::cell::Cell;
use std::ops::Deref;

use rusqlite::{Connection, params};

use super::shelf::{Shelf, Shelved};
use super::unavailable;
use crate::store::{JobState, StoreError};

/// The connection an operation writes through, and where the job counts it
/// moves go: the writer's batch tally, or straight to `job_counts`. Its
/// [`statement`](Tx::statement)s are kept prepared for as long as it lives
/// (a writer batch: see `shelf`).
pub(super) struct Tx<'c> {
    conn: &'c Connection,
    tally: Option<&'c Cell<Tally>>,
    shelf: Shelf<'c>,
}

impl<'c> Tx<'c> {
    /// Counts written as they are moved, in the caller's transaction: for
    /// work that runs outside the writer's batches (a restart's recovery).
    pub(super) fn immediate(conn: &'c Connection) -> Tx<'c> {
        Tx {
            conn,
            tally: None,
            shelf: Shelf::new(conn),
        }
    }

    /// Counts added to `tally`, which the caller writes before it commits.
    pub(super) fn tallied(conn: &'c Connection, tally: &'c Cell<Tally>) -> Tx<'c> {
        Tx {
            conn,
            tally: Some(tally),
            shelf: Shelf::new(conn),
        }
    }

    /// The statement for `sql`, prepared once for as long as this lives:
    /// for the statements every webhook, claim or finished send of a batch
    /// runs.
    pub(super) fn statement(&self, sql: &str) -> rusqlite::Result<Shelved<'_, 'c>> {
        self.shelf.statement(sql)
    }

    /// How many statements it keeps.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.shelf.kept()
    }

    /// Counts `jobs` inserted in `state`. Every statement that inserts jobs
    /// calls it in the same operation.
    pub(super) fn count_inserted(&self, state: JobState, jobs: usize) -> Result<(), StoreError> {
        self.add(Tally::default().with(state, jobs_delta(jobs)))
    }

    /// Moves `jobs` whose state changed from `from` to `to`. Every statement
    /// that changes jobs' states calls it with the rows it changed.
    pub(super) fn count_moved(&self, from: JobState, to: JobState, jobs: usize) -> Result<(), StoreError> {
        if jobs == 0 || from == to {
            return Ok(());
        }
        let jobs = jobs_delta(jobs);
        self.add(Tally::default().with(from, -jobs).with(to, jobs))
    }

    fn add(&self, moved: Tally) -> Result<(), StoreError> {
        match self.tally {
            Some(tally) => {
                tally.set(tally.get().plus(moved));
                Ok(())
            }
            None => moved.write(self.conn),
        }
    }
}

impl Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// What a batch moved between the job states, by state, in the order of
/// [`STATES`]. Cheap to copy: the writer keeps the one from before each
/// operation to take a failed operation's part back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tally([i64; 4]);

const STATES: [JobState; 4] = [
    JobState::Queued,
    JobState::InFlight,
    JobState::Done,
    JobState::Dead,
];

impl Tally {
    fn with(mut self, state: JobState, jobs: i64) -> Tally {
        let at = match state {
            JobState::Queued => 0,
            JobState::InFlight => 1,
            JobState::Done => 2,
            JobState::Dead => 3,
        };
        self.0[at] = self.0[at].saturating_add(jobs);
        self
    }

    fn plus(self, other: Tally) -> Tally {
        let mut sum = self;
        for (at, jobs) in other.0.into_iter().enumerate() {
            sum.0[at] = sum.0[at].saturating_add(jobs);
        }
        sum
    }

    /// Adds the tally to `job_counts`, one `UPDATE` a state it moved, in
    /// the caller's transaction. One by key for each state: one statement
    /// over several rows (`WHERE state IN (…)`) had SQLite build a temporary
    /// table of the list's keys on every call, three times the instructions.
    pub(super) fn write(self, conn: &Connection) -> Result<(), StoreError> {
        for (state, jobs) in STATES.into_iter().zip(self.0) {
            if jobs != 0 {
                conn.prepare_cached("UPDATE job_counts SET n = n + ?2 WHERE state = ?1")
                    .and_then(|mut stmt| stmt.execute(params![state.as_str(), jobs]))
                    .map_err(|e| unavailable(&e))?;
            }
        }
        Ok(())
    }
}

fn jobs_delta(jobs: usize) -> i64 {
    i64::try_from(jobs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(conn: &Connection) -> Vec<(String, i64)> {
        conn.prepare("SELECT state, n FROM job_counts ORDER BY state")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// An empty store with relay's own schema, its counts all zero.
    fn counts_table() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        conn
    }

    fn expected(queued: i64, in_flight: i64, done: i64, dead: i64) -> Vec<(String, i64)> {
        [
            ("dead", dead),
            ("done", done),
            ("in_flight", in_flight),
            ("queued", queued),
        ]
        .map(|(state, n)| (state.to_owned(), n))
        .to_vec()
    }

    #[test]
    fn a_tallied_move_waits_for_the_write_and_an_immediate_one_does_not() {
        let conn = counts_table();
        let tally = Cell::new(Tally::default());
        let tx = Tx::tallied(&conn, &tally);
        tx.count_inserted(JobState::Queued, 3).unwrap();
        tx.count_moved(JobState::Queued, JobState::InFlight, 2).unwrap();
        tx.count_moved(JobState::InFlight, JobState::Done, 1).unwrap();
        tx.count_moved(JobState::InFlight, JobState::Dead, 1).unwrap();
        assert_eq!(
            kept(&conn),
            expected(0, 0, 0, 0),
            "nothing is written before the batch writes its tally"
        );
        tally.get().write(&conn).unwrap();
        assert_eq!(kept(&conn), expected(1, 0, 1, 1));

        Tx::immediate(&conn)
            .count_moved(JobState::Dead, JobState::Queued, 1)
            .unwrap();
        assert_eq!(kept(&conn), expected(2, 0, 1, 0));
    }

    #[test]
    fn a_move_to_the_same_state_or_of_no_jobs_moves_nothing() {
        let conn = counts_table();
        let tx = Tx::immediate(&conn);
        tx.count_moved(JobState::Queued, JobState::Queued, 5).unwrap();
        tx.count_moved(JobState::Queued, JobState::Done, 0).unwrap();
        assert_eq!(kept(&conn), expected(0, 0, 0, 0));
    }
}
