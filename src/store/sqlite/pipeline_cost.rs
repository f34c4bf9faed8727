//! The pipeline lookup (schema V15): which pipeline event finds which job,
//! what the lookup costs as history grows, and what recording a trigger's
//! pipeline writes. CircleCI's pipeline ids are random; indexed by
//! themselves, every commit's triggers each wrote a leaf of their own.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, params};
use uuid::Uuid;

use super::queue_cost::{Counter, completion, event, event_insert, job};
use super::tally::Tx;
use super::{queue, schema, to_millis};
use crate::clock::wall_time;
use crate::guard::JobLimits;
use crate::pipeline::{Pipeline, PipelineState};
use crate::store::codec;
use crate::store::{Ingested, NextState};

/// Finished jobs in the store's history for the measurements below.
const HISTORY: u64 = 20_000;

/// Triggers one commit of relay at 32 connections records.
const COMMIT: usize = 21;

/// Queues one job for `ci`, claims it and records its trigger's answer.
fn trigger(conn: &Connection, id: &str, number: Option<u64>) {
    let started = claimed(conn, 1);
    finish(conn, &started, |_| (id.to_owned(), number));
}

/// `count` jobs of `ci`, queued and claimed in one transaction.
fn claimed(conn: &Connection, count: usize) -> Vec<crate::store::ClaimedJob> {
    let tx = &Tx::immediate(conn);
    conn.execute_batch("BEGIN").unwrap();
    let mut claimed = Vec::new();
    for _ in 0..count {
        let event = event(vec![job("ci", JobLimits::default(), None)]);
        let packed = codec::pack(&event);
        let Ingested::Accepted { .. } = queue::ingest(tx, &event, &packed).unwrap() else {
            panic!("a new delivery is accepted");
        };
        claimed.extend(queue::claim(tx, "ci", 8, Duration::from_secs(60), wall_time()).unwrap());
    }
    conn.execute_batch("COMMIT").unwrap();
    assert_eq!(claimed.len(), count);
    claimed
}

/// Records each job's trigger answer, the pipeline `named` says, in one
/// transaction.
fn finish(
    conn: &Connection,
    jobs: &[crate::store::ClaimedJob],
    named: impl Fn(usize) -> (String, Option<u64>),
) {
    let tx = &Tx::immediate(conn);
    conn.execute_batch("BEGIN").unwrap();
    for (n, job) in jobs.iter().enumerate() {
        let (id, number) = named(n);
        let pipeline = Pipeline {
            id,
            number,
            url: None,
            state: PipelineState::Created,
        };
        assert!(queue::complete(tx, &completion(job, NextState::Done, Some(pipeline))).unwrap());
    }
    conn.execute_batch("COMMIT").unwrap();
}

fn found(conn: &Connection, id: &str, number: u64) -> bool {
    let tx = &Tx::immediate(conn);
    queue::correlate(tx, id, number, PipelineState::Running, wall_time())
        .unwrap()
        .is_some()
}

#[test]
fn a_random_id_is_found_with_its_number_and_a_plain_number_id_by_itself() {
    let mut conn = Connection::open_in_memory().unwrap();
    schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
    let circleci = Uuid::new_v4().to_string();
    trigger(&conn, &circleci, Some(42));
    // GitLab: the id is a number of its own, the iid another.
    trigger(&conn, "918273", Some(17));
    // An answer that named no number (an odd CI, or a proxy in between).
    let unnumbered = Uuid::new_v4().to_string();
    trigger(&conn, &unnumbered, None);

    assert!(found(&conn, &circleci, 42), "CircleCI's webhook names both");
    assert!(
        !found(&conn, &circleci, 41),
        "another project's pipeline 41 with the same id"
    );
    assert!(
        !found(&conn, &circleci, 0),
        "a random id without its number is not looked for"
    );
    assert!(
        found(&conn, "918273", 0),
        "GitLab's pipeline hook names the id alone"
    );
    assert!(found(&conn, "918273", 17));
    assert!(!found(&conn, "17", 0), "the iid is not the id");
    assert!(found(&conn, &unnumbered, 0));
    assert!(
        found(&conn, &unnumbered, 9),
        "stored without a number, found by the id"
    );
    assert!(
        !found(&conn, &Uuid::new_v4().to_string(), 42),
        "a pipeline relay did not start"
    );
}

/// Finished jobs with the pipelines their triggers named, CircleCI's (a
/// random id, numbers in order) inserted directly: the history retention
/// keeps.
fn pipeline_history(conn: &Connection, count: u64) {
    conn.execute_batch("BEGIN").unwrap();
    let now = to_millis(wall_time());
    let mut insert = event_insert(conn);
    let mut job = conn
        .prepare(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at,
                               created_at, updated_at, repo, sha, pipeline_id, pipeline_number)
             VALUES (?1, ?2, 'builds', 'ci', 'done', '{}', 0, ?3, ?3, ?3, 'acme/api', 'x', ?4, ?5)",
        )
        .unwrap();
    for n in 0..count {
        let event_id = Uuid::now_v7().to_string();
        let at = now - 600_000 + i64::try_from(n).unwrap();
        insert.execute(params![event_id, at]).unwrap();
        let number = i64::try_from(n).unwrap() + 1;
        job.execute(params![
            Uuid::now_v7().to_string(),
            event_id,
            at,
            Uuid::new_v4().to_string(),
            number
        ])
        .unwrap();
    }
    drop((insert, job));
    conn.execute_batch("COMMIT").unwrap();
}

#[test]
fn a_lookup_costs_the_same_however_many_pipelines_are_kept() {
    let counter = Counter::new();
    let (circleci, gitlab) = (Uuid::new_v4().to_string(), "55501".to_owned());
    counter.count(|conn| {
        trigger(conn, &circleci, Some(HISTORY + 10));
        trigger(conn, &gitlab, Some(3));
    });
    let lookups = |conn: &Connection| {
        assert!(found(conn, &circleci, HISTORY + 10));
        assert!(found(conn, &gitlab, 0));
        assert!(!found(conn, &Uuid::new_v4().to_string(), 77));
    };
    counter.count(lookups);
    let few = counter.count(lookups);
    counter.count(|conn| pipeline_history(conn, HISTORY));
    let many = counter.count(lookups);
    assert!(
        many <= few + few / 4,
        "three lookups took {few} SQLite instructions among 2 pipelines and {many} among {HISTORY}: \
         a half of the lookup reads past its index"
    );
}

/// A file store with `HISTORY` CircleCI pipelines kept, its pipeline
/// indexes as `indexes` makes them.
fn store_at(path: &Path, indexes: &str) -> Connection {
    let mut conn = Connection::open(path).unwrap();
    schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
    conn.execute_batch(indexes).unwrap();
    pipeline_history(&conn, HISTORY);
    conn
}

/// The WAL pages one commit writes that records `COMMIT` CircleCI
/// pipelines, each a random id with the project's next number.
fn pages_recording_a_commits_pipelines(indexes: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let conn = store_at(&path, indexes);
    let started = claimed(&conn, COMMIT);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    finish(&conn, &started, |n| {
        (
            Uuid::new_v4().to_string(),
            Some(HISTORY + 1 + u64::try_from(n).unwrap()),
        )
    });
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
    let wal = std::fs::metadata(dir.path().join("relay.db-wal")).unwrap().len();
    wal / (u64::try_from(page).unwrap() + 24)
}

#[test]
fn recording_a_commits_pipelines_writes_a_few_pages() {
    let unindexed =
        pages_recording_a_commits_pipelines("DROP INDEX jobs_pipeline; DROP INDEX jobs_pipeline_numbered;");
    let by_number = pages_recording_a_commits_pipelines("");
    let by_id = pages_recording_a_commits_pipelines(
        "DROP INDEX jobs_pipeline; DROP INDEX jobs_pipeline_numbered;
         CREATE INDEX jobs_pipeline ON jobs (pipeline_id) WHERE pipeline_id IS NOT NULL;",
    );
    assert!(
        by_number <= unindexed + 3,
        "recording {COMMIT} pipelines wrote {by_number} pages, {unindexed} with no pipeline index"
    );
    // What schema V6's index by id wrote: a leaf a pipeline.
    assert!(
        by_id >= unindexed + 12,
        "the random ids' index wrote {by_id} pages, {unindexed} with none"
    );
}
