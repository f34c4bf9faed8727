//! The store contract, once, run against both backends: every case is an
//! `async fn` taking a fresh [`Fixture`], and `cases!` makes a test of it in
//! `store::sqlite` and in `store::postgres`. The PostgreSQL tests run on the
//! server `RELAY_TEST_POSTGRES` names, else on a cluster the test process
//! starts itself when PostgreSQL's server binaries are installed; without
//! either they say `skipped (PostgreSQL)` (see `support::postgres_database`).
//! A few cases only make sense on a shared store (two relays on one
//! database) and exist for PostgreSQL alone.
//!
//! Windows are short (a few hundred milliseconds) and waited out with real
//! sleeps: PostgreSQL decides with its own clock, which no test can pause.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use relay::config::{Config, StoreSettings};
use relay::guard;
use relay::guard::{Dropped, JobLimits};
use relay::request::{Auth, PreparedRequest, RequestBody};
use relay::store::{
    AttemptRecord, Completion, HeldBack, Ingested, JobFilter, JobState, Lease, NewEvent, NewJob, NextState,
    Requeued, Store, StoreError, Work,
};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::support::{PATIENCE, postgres_client, postgres_database};

/// The short window the timing cases wait out.
const WINDOW: Duration = Duration::from_millis(300);
/// How far a time the store reports may be from the one the test expects:
/// PostgreSQL stamps with its own `now()`, a round trip away.
const SLACK: Duration = Duration::from_millis(100);
const LEASE: Duration = Duration::from_secs(60);

/// A store to test, and what keeps it alive.
struct Fixture {
    store: Arc<dyn Store>,
    settings: StoreSettings,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(&format!("sqlite://{}", dir.path().join("relay.db").display()));
        let store = relay::store::open(&settings, std::time::SystemTime::now())
            .await
            .unwrap();
        Fixture {
            store,
            settings,
            _dir: Some(dir),
        }
    }

    /// `None` (the test then says it is skipped, and returns) without a
    /// test server.
    async fn postgres(case: &str) -> Option<Fixture> {
        let url = postgres_database(case).await?;
        let settings = settings(&url);
        let store = relay::store::open(&settings, std::time::SystemTime::now())
            .await
            .unwrap();
        Some(Fixture {
            store,
            settings,
            _dir: None,
        })
    }

    /// A second store on the same database: another relay.
    async fn another(&self) -> Arc<dyn Store> {
        relay::store::open(&self.settings, std::time::SystemTime::now())
            .await
            .unwrap()
    }

    /// A plain SQL connection to the fixture's PostgreSQL database, for the
    /// tests of the schema itself and of connections relay holds.
    async fn sql(&self) -> tokio_postgres::Client {
        let relay::config::StoreLocation::Postgres(pg) = &self.settings.location else {
            unreachable!("a postgres fixture");
        };
        let (client, connection) = pg.connect.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

fn settings(url: &str) -> StoreSettings {
    let config = Config::from_toml(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[store]\nurl = \"{url}\"\n"
    ))
    .unwrap_or_else(|e| panic!("config for {url}: {e:?}"));
    config.store
}

/// Each case becomes `store::sqlite::<case>` and `store::postgres::<case>`;
/// the `postgres_only` ones only the latter.
macro_rules! cases {
    (both: [$($case:ident),* $(,)?], postgres_only: [$($pg_case:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Fixture::sqlite().await).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    not(relay_postgres_tests),
                    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
                )]
                async fn $case() {
                    if let Some(fixture) = super::Fixture::postgres(concat!(module_path!(), "::", stringify!($case))).await {
                        super::$case(fixture).await;
                    }
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[cfg_attr(
                    not(relay_postgres_tests),
                    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
                )]
                async fn $pg_case() {
                    if let Some(fixture) = super::Fixture::postgres(concat!(module_path!(), "::", stringify!($pg_case))).await {
                        super::$pg_case(fixture).await;
                    }
                }
            )*
        }
    };
}

cases! {
    both: [
        ingest_then_claim,
        duplicate_delivery,
        failed_request_is_stored_dead,
        leased_job_waits_for_its_lease,
        claim_respects_limit_and_reclaims_expired_leases,
        stale_completion_writes_nothing,
        renewal_extends_only_a_lease_still_held,
        a_released_lease_queues_the_job_again_only_with_its_claim,
        complete_moves_the_job,
        retry_waits_until_due,
        next_wakeup_reports_the_earliest,
        dedupe_window,
        burst_limit,
        requeue_one,
        requeue_dead_by_target_and_time,
        purge_deletes_finished_old_events,
        purge_forgets_expired_dedupe_keys_a_batch_at_a_time,
        queue_stats_counts_every_state,
        kept_job_counts_follow_every_change,
        event_body,
        packed_bodies_come_back_byte_for_byte,
        events_view_with_drops,
        webhooks_committed_together_are_answered_one_by_one,
        the_loop_guard_sees_earlier_webhooks_of_its_batch,
        completions_recorded_together_are_answered_one_by_one,
    ],
    postgres_only: [
        queue_decisions_follow_the_databases_clock_not_the_callers,
        concurrent_claims_never_share_a_job,
        work_arrived_wakes_another_relay,
        listener_reconnects,
        concurrent_migrations,
        newer_schema_is_refused,
        connect_errors_hide_the_password,
        schemas_match_between_backends,
        the_purge_folds_the_count_deltas,
        a_claim_is_held_only_in_flight,
        a_claim_reads_only_its_own_targets_queue,
        bodies_stored_before_packing_read_as_stored,
    ],
}

// ---------------------------------------------------------------------------
// Building blocks

fn text_request(n: usize) -> PreparedRequest {
    PreparedRequest {
        url: format!("https://ci.example/api/v2/project/{n}/pipeline"),
        headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
        body: RequestBody::Text(format!(r#"{{"n":{n}}}"#)),
        auth: Auth::Header {
            name: "Circle-Token".to_owned(),
        },
    }
}

fn payload_request() -> PreparedRequest {
    PreparedRequest {
        url: "https://hooks.example/forward".to_owned(),
        headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
        body: RequestBody::Payload,
        auth: Auth::None,
    }
}

fn job(target: &str, request: Result<PreparedRequest, String>) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        route: "builds".to_owned(),
        target: target.to_owned(),
        request: request.map(Arc::new),
        limits: JobLimits::default(),
        lease: None,
        repo: "acme/api".to_owned(),
        sha: "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c".to_owned(),
        shadow: false,
        report: None,
    }
}

fn queued(target: &str) -> NewJob {
    job(target, Ok(text_request(1)))
}

/// A job stored leased to the relay that ingests it (its send slot taken
/// ahead of the commit) until `until`, and the claim it holds.
fn leased_job(target: &str, until: SystemTime) -> (NewJob, Uuid) {
    let claim = Uuid::now_v7();
    let mut job = queued(target);
    job.lease = Some(Lease { claim, until });
    (job, claim)
}

fn with_limits(mut job: NewJob, limits: JobLimits) -> NewJob {
    job.limits = limits;
    job
}

fn event(delivery: &str, jobs: Vec<NewJob>) -> NewEvent {
    NewEvent {
        id: Uuid::now_v7(),
        source: "github".to_owned(),
        delivery: Some(delivery.to_owned()),
        hook: "push".to_owned(),
        content_type: "application/json".to_owned(),
        body: Bytes::from(format!(r#"{{"delivery":"{delivery}"}}"#)),
        payload: None,
        hop: 0,
        received_at: SystemTime::now(),
        summary: r#"{"events":[{"kind":"push"}]}"#.to_owned(),
        jobs,
        drops: Vec::new(),
    }
}

/// Ingests an event none of whose jobs is held back; the jobs that came
/// with a lease must come back leased, and only those.
async fn accept(store: &Arc<dyn Store>, event: NewEvent) {
    let expected: Vec<(Uuid, Uuid)> = event
        .jobs
        .iter()
        .filter(|j| j.request.is_ok())
        .filter_map(|j| j.lease.map(|l| (j.id, l.claim)))
        .collect();
    let Ingested::Accepted { held_back, leased } = store.ingest(event).await.unwrap() else {
        panic!("not accepted");
    };
    assert_eq!(held_back, Vec::new());
    let leased: Vec<(Uuid, Uuid)> = leased.iter().map(|j| (j.id, j.claim)).collect();
    assert_eq!(leased, expected);
}

async fn claim(
    store: &Arc<dyn Store>,
    target: &str,
    limit: usize,
    lease: Duration,
) -> Vec<relay::store::ClaimedJob> {
    store
        .claim(target, limit, lease, SystemTime::now())
        .await
        .unwrap()
}

fn completion(id: Uuid, claim: Uuid, status: u16, next: NextState) -> Completion {
    let at = SystemTime::now();
    Completion {
        job_id: id,
        claim,
        attempt: AttemptRecord {
            started_at: at - Duration::from_millis(40),
            duration: Duration::from_millis(40),
            status: Some(status),
            outcome: if status < 300 { "ok" } else { "http_error" },
            excerpt: format!("answered {status}"),
        },
        pipeline: None,
        next,
        at,
        follow: None,
        reported: false,
    }
}

async fn complete(store: &Arc<dyn Store>, id: Uuid, claim: Uuid, status: u16, next: NextState) -> bool {
    store
        .complete(completion(id, claim, status, next), SystemTime::now())
        .await
        .unwrap()
}

fn all_jobs() -> JobFilter {
    JobFilter {
        limit: 1000,
        ..JobFilter::default()
    }
}

async fn state_of(store: &Arc<dyn Store>, id: Uuid) -> JobState {
    store.job(id).await.unwrap().unwrap().job.state
}

async fn history_len(store: &Arc<dyn Store>, id: Uuid) -> usize {
    store.job(id).await.unwrap().unwrap().history.len()
}

fn ids(jobs: &[relay::store::ClaimedJob]) -> HashSet<Uuid> {
    jobs.iter().map(|j| j.id).collect()
}

/// `actual` within [`SLACK`] of `expected`, either way.
fn assert_near(actual: SystemTime, expected: SystemTime, what: &str) {
    let gap = actual
        .duration_since(expected)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap();
    assert!(gap <= SLACK, "{what}: {actual:?} is {gap:?} from {expected:?}");
}

async fn sleep_until(t: SystemTime) {
    if let Ok(wait) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

/// Claims what falls due at `due`, waiting until `want` jobs came or two
/// seconds passed. The store counts a retry's wait and a lease from its
/// own moment of writing, which on a busy machine comes a scheduling delay
/// after the test read its clock: one claim at `due` plus a fixed slack
/// found the job not yet due once in a loaded CI run.
async fn claim_when_due(
    store: &Arc<dyn Store>,
    target: &str,
    want: usize,
    due: SystemTime,
) -> Vec<relay::store::ClaimedJob> {
    sleep_until(due).await;
    let mut claimed = Vec::new();
    for _ in 0..100 {
        claimed.extend(claim(store, target, 10, LEASE).await);
        if claimed.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    claimed
}

// ---------------------------------------------------------------------------
// Both backends

async fn ingest_then_claim(f: Fixture) {
    let store = &f.store;
    let forms = Bytes::from_static(br#"{"form":"decoded"}"#);
    let mut first = event("d-1", vec![queued("ci"), job("ci", Ok(payload_request()))]);
    first.content_type = "application/x-www-form-urlencoded".to_owned();
    first.body = Bytes::from_static(b"payload=%7B%22form%22%3A%22decoded%22%7D");
    first.payload = Some(forms.clone());
    let (text_job, form_job) = (first.jobs[0].id, first.jobs[1].id);
    let second = event("d-2", vec![job("ci", Ok(payload_request()))]);
    let body_job = second.jobs[0].id;
    let (first_id, second_id, second_body) = (first.id, second.id, second.body.clone());
    accept(store, first).await;
    accept(store, second).await;

    let claimed = claim(store, "ci", 10, LEASE).await;
    assert_eq!(ids(&claimed), HashSet::from([text_job, form_job, body_job]));
    for job in &claimed {
        assert_eq!(job.route, "builds");
        assert_eq!(job.target, "ci");
        assert_eq!((job.attempts, job.maybe_attempts), (0, 0));
        if job.id == text_job {
            assert_eq!(job.event_id, first_id);
            assert_eq!(job.work, Work::Trigger(Arc::new(text_request(1))));
            assert_eq!(job.payload, None, "a composed body needs no payload");
        } else if job.id == form_job {
            assert_eq!(job.event_id, first_id);
            assert_eq!(job.work, Work::Trigger(Arc::new(payload_request())));
            assert_eq!(
                job.payload,
                Some(forms.clone()),
                "the JSON document, not the form body"
            );
        } else {
            assert_eq!(job.event_id, second_id);
            assert_eq!(job.payload, Some(second_body.clone()), "the body is the document");
        }
    }
    assert_eq!(
        claimed.iter().map(|j| j.claim).collect::<HashSet<_>>().len(),
        1,
        "one claim id per claim call"
    );
    assert!(
        claim(store, "ci", 10, LEASE).await.is_empty(),
        "leased jobs are not claimed twice"
    );
    assert!(claim(store, "other", 10, LEASE).await.is_empty());
    let views = store.jobs(all_jobs()).await.unwrap();
    assert_eq!(views.len(), 3);
    assert!(views.iter().all(|v| v.state == JobState::InFlight && v.retryable));
}

/// Holds every commit until released: a transaction beside relay's that
/// takes the lock an ingest's first write needs (SQLite's write lock,
/// PostgreSQL's on the events table) and the one a completion's attempt
/// needs (PostgreSQL's on the attempts table).
enum Hold {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Hold {
    async fn take(f: &Fixture) -> Hold {
        match &f.settings.location {
            relay::config::StoreLocation::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                Hold::Sqlite(conn)
            }
            location @ relay::config::StoreLocation::Postgres(_) => {
                let client = postgres_client(location).await.unwrap();
                client
                    .batch_execute("BEGIN; LOCK TABLE events, attempts IN EXCLUSIVE MODE")
                    .await
                    .unwrap();
                Hold::Postgres(client)
            }
        }
    }

    /// Waits until `n` statements containing `statement` (any, for "")
    /// wait on the hold (on SQLite, a moment: the writer's one connection is
    /// what waits).
    async fn until_waiting(&self, statement: &str, n: i64) {
        match self {
            Hold::Sqlite(_) => tokio::time::sleep(WINDOW).await,
            Hold::Postgres(client) => {
                let started = std::time::Instant::now();
                loop {
                    // A transaction sees one snapshot of the activity unless
                    // told to read it again.
                    client
                        .execute("SELECT pg_stat_clear_snapshot()", &[])
                        .await
                        .unwrap();
                    let waiting: i64 = client
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity
                             WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0",
                            &[&statement],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    if waiting >= n {
                        return;
                    }
                    assert!(
                        started.elapsed() < PATIENCE,
                        "{waiting} statements with {statement:?} wait on the lock, not {n}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn release(self) {
        match self {
            Hold::Sqlite(conn) => conn.execute_batch("COMMIT").unwrap(),
            Hold::Postgres(client) => client.batch_execute("COMMIT").await.unwrap(),
        }
    }
}

/// Webhooks that arrive while the store is busy are committed together
/// (SQLite's writer and PostgreSQL's group commit batch them); each still
/// gets its own answer: a duplicate within the batch is known as one, and
/// a webhook whose rows cannot be written refuses no other.
async fn webhooks_committed_together_are_answered_one_by_one(f: Fixture) {
    let store = &f.store;
    let earlier = queued("ci");
    let taken_id = earlier.id;
    accept(store, event("earlier", vec![earlier])).await;

    let hold = Hold::take(&f).await;
    let spawn = |event: NewEvent| {
        let store = store.clone();
        tokio::spawn(async move { store.ingest(event).await })
    };
    // These take what commits at once (SQLite's writer; PostgreSQL's two
    // batches in flight), one after the other, and wait on the hold ...
    let mut first = Vec::new();
    for (n, delivery) in ["held-a", "held-b"].into_iter().enumerate() {
        first.push(spawn(event(delivery, vec![queued("ci")])));
        hold.until_waiting("relay_ingest", n as i64 + 1).await;
    }
    // ... so these wait in the queue, and are committed together after.
    let batch_events: Vec<NewEvent> = (2..=6)
        .map(|n| event(&format!("batch-{n}"), vec![queued("ci")]))
        .collect();
    let batch_ids: Vec<Uuid> = batch_events.iter().map(|e| e.id).collect();
    let batch: Vec<_> = batch_events.into_iter().map(spawn).collect();
    // batch-1 twice: whichever the batch takes first is the original.
    let (once, twice) = (
        event("batch-1", vec![queued("ci")]),
        event("batch-1", vec![queued("ci")]),
    );
    let pair = [once.id, twice.id];
    let pair_answers = [spawn(once), spawn(twice)];
    // Its job's id is taken: its rows cannot be written.
    let mut broken = event("broken", vec![queued("ci")]);
    broken.jobs[0].id = taken_id;
    let broken_id = broken.id;
    let broken = spawn(broken);
    tokio::time::sleep(WINDOW).await;
    hold.release().await;

    for held in first {
        assert!(matches!(held.await.unwrap(), Ok(Ingested::Accepted { .. })));
    }
    for answer in batch {
        let answer = answer.await.unwrap();
        assert!(
            matches!(answer, Ok(Ingested::Accepted { .. })),
            "a webhook beside a broken one: {answer:?}"
        );
    }
    let mut answers = Vec::new();
    for answer in pair_answers {
        answers.push(answer.await.unwrap().unwrap());
    }
    let stored: Vec<Uuid> = answers
        .iter()
        .zip(pair)
        .filter(|(answer, _)| matches!(answer, Ingested::Accepted { .. }))
        .map(|(_, id)| id)
        .collect();
    assert_eq!(stored.len(), 1, "batch-1 twice: one stored: {answers:?}");
    assert!(
        answers.contains(&Ingested::Duplicate(stored[0])),
        "batch-1 twice: the other is its duplicate: {answers:?}"
    );
    let refused = broken.await.unwrap();
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "the webhook whose rows cannot be written: {refused:?}"
    );
    let events: HashSet<String> = store
        .events(newest_events(50), SystemTime::now())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(events.len(), 1 + 2 + 5 + 1, "{events:?}");
    assert!(
        batch_ids
            .iter()
            .chain(&stored)
            .all(|id| events.contains(&id.to_string()))
    );
    assert!(
        !events.contains(&broken_id.to_string()),
        "nothing of the refused webhook is stored"
    );
    assert_eq!(store.jobs(all_jobs()).await.unwrap().len(), 1 + 2 + 5 + 1);
}

/// Webhooks committed together are judged by the loop guard one after the
/// other, as if each were committed alone: a burst counts the jobs taken
/// earlier in the batch, a dedupe key taken earlier in the batch holds the
/// later job back, and a delivery twice in the batch is stored once.
async fn the_loop_guard_sees_earlier_webhooks_of_its_batch(f: Fixture) {
    let store = &f.store;
    let hold = Hold::take(&f).await;
    let spawn = |event: NewEvent| {
        let store = store.clone();
        tokio::spawn(async move { store.ingest(event).await })
    };
    let mut first = Vec::new();
    for (n, delivery) in ["ahead-a", "ahead-b"].into_iter().enumerate() {
        first.push(spawn(event(delivery, vec![queued("elsewhere")])));
        hold.until_waiting("relay_ingest", n as i64 + 1).await;
    }
    let burst = JobLimits {
        dedupe: None,
        burst: Some((3, Duration::from_secs(3600))),
    };
    let key = "acme/api\nrefs/heads/main\n4444444444444444444444444444444444444444".to_owned();
    let dedupe = JobLimits {
        dedupe: Some((key, Duration::from_secs(3600))),
        burst: None,
    };
    let mut answers = Vec::new();
    for n in 0..4 {
        answers.push(spawn(event(
            &format!("burst-{n}"),
            vec![with_limits(queued("ci"), burst.clone())],
        )));
    }
    for n in 0..2 {
        answers.push(spawn(event(
            &format!("same-{n}"),
            vec![with_limits(queued("dd"), dedupe.clone())],
        )));
    }
    let twice = [
        event("twice", vec![queued("tw")]),
        event("twice", vec![queued("tw")]),
    ];
    let twice_ids = [twice[0].id, twice[1].id];
    answers.extend(twice.into_iter().map(spawn));
    tokio::time::sleep(WINDOW).await;
    hold.release().await;

    for ahead in first {
        assert!(matches!(ahead.await.unwrap(), Ok(Ingested::Accepted { .. })));
    }
    let mut held_by = Vec::new();
    let mut duplicates = Vec::new();
    for answer in answers {
        match answer.await.unwrap().unwrap() {
            Ingested::Accepted { held_back, .. } => {
                held_by.extend(held_back.into_iter().map(|h| (h.dropped.target, h.dropped.rule)));
            }
            Ingested::Duplicate(original) => duplicates.push(original),
        }
    }
    held_by.sort();
    assert_eq!(
        held_by,
        vec![
            (Some("ci".to_owned()), guard::RULE_BURST.to_owned()),
            (Some("dd".to_owned()), guard::RULE_DEDUPE.to_owned()),
        ],
        "the fourth burst and the second dedupe key are held back"
    );
    assert_eq!(duplicates.len(), 1, "a delivery twice is stored once");
    assert!(twice_ids.contains(&duplicates[0]));
    let jobs = store.jobs(all_jobs()).await.unwrap();
    let count = |target: &str| jobs.iter().filter(|j| j.target == target).count();
    assert_eq!(
        (count("elsewhere"), count("ci"), count("dd"), count("tw")),
        (2, 3, 1, 1),
        "jobs: the two ahead, three of the bursts, one of the dedupe pair, the delivery stored once"
    );
}

/// Sends that finish while the store is busy are recorded together
/// (SQLite's writer and PostgreSQL's group complete batch them); each still
/// gets its own answer: a completion whose claim no longer holds records
/// nothing, says so, and takes nothing from the others.
async fn completions_recorded_together_are_answered_one_by_one(f: Fixture) {
    let store = &f.store;
    let jobs: Vec<NewJob> = (0..8).map(|_| queued("ci")).collect();
    accept(store, event("finished-together", jobs)).await;
    let claimed = claim(store, "ci", 8, LEASE).await;
    assert_eq!(claimed.len(), 8);
    let hold = Hold::take(&f).await;
    let spawn = |c: Completion| {
        let store = store.clone();
        tokio::spawn(async move { store.complete(c, SystemTime::now()).await })
    };
    let mut answers = Vec::new();
    for (n, job) in claimed[..2].iter().enumerate() {
        answers.push(spawn(completion(job.id, job.claim, 201, NextState::Done)));
        // Any statement: one the server is still preparing shows no text.
        hold.until_waiting("", n as i64 + 1).await;
    }
    for job in &claimed[2..6] {
        answers.push(spawn(completion(job.id, job.claim, 201, NextState::Done)));
    }
    let dead = &claimed[6];
    answers.push(spawn(completion(
        dead.id,
        dead.claim,
        404,
        NextState::Dead {
            reason: "404: project not found".to_owned(),
        },
    )));
    let stale = &claimed[7];
    let stale_answer = spawn(completion(stale.id, Uuid::now_v7(), 201, NextState::Done));
    tokio::time::sleep(WINDOW).await;
    hold.release().await;

    for answer in answers {
        assert!(
            answer.await.unwrap().unwrap(),
            "a completion whose claim holds is recorded"
        );
    }
    assert!(
        !stale_answer.await.unwrap().unwrap(),
        "a completion whose claim no longer holds records nothing"
    );
    for job in &claimed[..6] {
        let d = store.job(job.id).await.unwrap().unwrap();
        assert_eq!(
            (d.job.state, d.job.attempts, d.history.len()),
            (JobState::Done, 1, 1)
        );
        assert_eq!(d.history[0].status, Some(201));
    }
    let d = store.job(dead.id).await.unwrap().unwrap();
    assert_eq!(
        (d.job.state, d.job.last_error.as_deref(), d.history.len()),
        (JobState::Dead, Some("404: project not found"), 1)
    );
    let d = store.job(stale.id).await.unwrap().unwrap();
    assert_eq!(
        (d.job.state, d.job.attempts, d.history.len()),
        (JobState::InFlight, 0, 0)
    );
}

async fn duplicate_delivery(f: Fixture) {
    let store = &f.store;
    let first = event("dup-1", vec![queued("ci")]);
    let first_id = first.id;
    accept(store, first).await;
    let again = event("dup-1", vec![queued("ci"), queued("other")]);
    assert_eq!(store.ingest(again).await.unwrap(), Ingested::Duplicate(first_id));
    assert_eq!(
        store.jobs(all_jobs()).await.unwrap().len(),
        1,
        "no job from the duplicate"
    );
    assert_eq!(
        store
            .events(newest_events(10), std::time::SystemTime::now())
            .await
            .unwrap()
            .len(),
        1,
        "no event from the duplicate"
    );

    // The key is (source, delivery): another source may reuse the id, and
    // events without a delivery id are never duplicates.
    let mut elsewhere = event("dup-1", vec![queued("ci")]);
    elsewhere.source = "gitlab".to_owned();
    accept(store, elsewhere).await;
    for _ in 0..2 {
        let mut anonymous = event("-", vec![queued("ci")]);
        anonymous.delivery = None;
        accept(store, anonymous).await;
    }
    assert_eq!(
        store
            .events(newest_events(10), std::time::SystemTime::now())
            .await
            .unwrap()
            .len(),
        4
    );
    assert_eq!(store.jobs(all_jobs()).await.unwrap().len(), 4);
}

async fn failed_request_is_stored_dead(f: Fixture) {
    let store = &f.store;
    let broken = job("ci", Err("template error: branch is undefined".to_owned()));
    let id = broken.id;
    accept(store, event("dead-1", vec![broken])).await;
    let detail = store.job(id).await.unwrap().unwrap();
    assert_eq!(detail.job.state, JobState::Dead);
    assert_eq!(detail.job.attempts, 0);
    assert_eq!(
        detail.job.last_error.as_deref(),
        Some("template error: branch is undefined")
    );
    assert!(!detail.job.retryable);
    assert_eq!(detail.request, None);
    assert!(detail.history.is_empty());
    assert!(claim(store, "ci", 10, LEASE).await.is_empty());
    assert_eq!(store.next_wakeup(SystemTime::now()).await.unwrap(), None);
}

async fn leased_job_waits_for_its_lease(f: Fixture) {
    let store = &f.store;
    let received = SystemTime::now();
    let (leased, first_claim) = leased_job("ci", received + WINDOW);
    let id = leased.id;
    let mut e = event("lease-1", vec![leased]);
    e.received_at = received;
    let event_id = e.id;
    let Ingested::Accepted { held_back, leased } = store.ingest(e).await.unwrap() else {
        panic!("not accepted");
    };
    assert!(held_back.is_empty());
    // The store hands the leased job back, ready for the caller to send.
    assert_eq!(leased.len(), 1);
    assert_eq!(
        (
            leased[0].id,
            leased[0].event_id,
            leased[0].claim,
            leased[0].attempts
        ),
        (id, event_id, first_claim, 0)
    );

    assert_eq!(state_of(store, id).await, JobState::InFlight);
    assert!(claim(store, "ci", 10, LEASE).await.is_empty(), "the lease holds");
    let wake = store.next_wakeup(SystemTime::now()).await.unwrap().unwrap();
    assert_near(wake, received + WINDOW, "the lease's end");

    let again = claim_when_due(store, "ci", 1, received + WINDOW).await;
    assert_eq!(ids(&again), HashSet::from([id]));
    assert_ne!(again[0].claim, first_claim, "a fresh claim id");
    assert_eq!(again[0].attempts, 0, "claiming is not an attempt");

    // The fast lane's own completion, after the lease was taken over.
    assert!(!complete(store, id, first_claim, 201, NextState::Done).await);
    assert_eq!(history_len(store, id).await, 0);
    assert!(complete(store, id, again[0].claim, 201, NextState::Done).await);
    assert_eq!(state_of(store, id).await, JobState::Done);

    // And within its lease, the leaseholder completes as usual.
    let (fast, fast_claim) = leased_job("ci", SystemTime::now() + LEASE);
    let fast_id = fast.id;
    accept(store, event("lease-2", vec![fast])).await;
    assert!(complete(store, fast_id, fast_claim, 201, NextState::Done).await);
    assert_eq!(history_len(store, fast_id).await, 1);
}

async fn claim_respects_limit_and_reclaims_expired_leases(f: Fixture) {
    let store = &f.store;
    let jobs: Vec<NewJob> = (0..5).map(|_| queued("ci")).collect();
    let all: HashSet<Uuid> = jobs.iter().map(|j| j.id).collect();
    accept(store, event("limit-1", jobs)).await;

    let first = claim(store, "ci", 2, WINDOW).await;
    assert_eq!(first.len(), 2);
    let rest = claim(store, "ci", 10, WINDOW).await;
    assert_eq!(rest.len(), 3);
    assert!(claim(store, "ci", 10, WINDOW).await.is_empty());
    let mut seen = ids(&first);
    seen.extend(ids(&rest));
    assert_eq!(seen, all);

    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let expired = claim(store, "ci", 3, LEASE).await;
    assert_eq!(
        expired.len(),
        3,
        "expired leases are claimed again, up to the limit"
    );
    let expired_rest = claim(store, "ci", 10, LEASE).await;
    assert_eq!(expired_rest.len(), 2);
    let old_claims: HashSet<Uuid> = first.iter().chain(&rest).map(|j| j.claim).collect();
    for job in expired.iter().chain(&expired_rest) {
        assert!(!old_claims.contains(&job.claim), "a new claim id");
    }
    let mut again = ids(&expired);
    again.extend(ids(&expired_rest));
    assert_eq!(again, all);
}

async fn stale_completion_writes_nothing(f: Fixture) {
    let store = &f.store;
    let j = queued("ci");
    let id = j.id;
    accept(store, event("stale-1", vec![j])).await;
    let old = claim(store, "ci", 1, WINDOW).await;
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let new = claim(store, "ci", 1, LEASE).await;
    assert_eq!(ids(&new), HashSet::from([id]));

    for next in [
        NextState::Done,
        NextState::Dead {
            reason: "stale".to_owned(),
        },
        NextState::Retry {
            due_at: SystemTime::now(),
            maybe_delivered: true,
        },
    ] {
        assert!(!complete(store, id, old[0].claim, 500, next).await);
    }
    let detail = store.job(id).await.unwrap().unwrap();
    assert_eq!(detail.history.len(), 0, "a stale completion records no attempt");
    assert_eq!(detail.job.state, JobState::InFlight);
    assert_eq!(detail.job.attempts, 0);
    assert!(complete(store, id, new[0].claim, 201, NextState::Done).await);
    assert!(
        !complete(store, id, new[0].claim, 201, NextState::Done).await,
        "a claim completes once"
    );
    assert_eq!(history_len(store, id).await, 1);
}

/// A job leased at its commit and never sent goes back to the queue when
/// its claim releases it, due at once, with no attempt recorded and the
/// counts moved; a stale claim's release changes nothing.
async fn a_released_lease_queues_the_job_again_only_with_its_claim(f: Fixture) {
    let store = &f.store;
    let (leased, claim_id) = leased_job("ci", SystemTime::now() + LEASE);
    let id = leased.id;
    accept(store, event("release-1", vec![leased])).await;
    assert_eq!(state_of(store, id).await, JobState::InFlight);
    assert!(claim(store, "ci", 10, LEASE).await.is_empty(), "the lease holds");

    assert!(
        !store
            .release(id, Uuid::now_v7(), SystemTime::now())
            .await
            .unwrap(),
        "another claim cannot release it"
    );
    assert_eq!(state_of(store, id).await, JobState::InFlight);

    assert!(store.release(id, claim_id, SystemTime::now()).await.unwrap());
    assert_eq!(state_of(store, id).await, JobState::Queued);
    assert_eq!(history_len(store, id).await, 0, "a release is not an attempt");
    assert_counts_match_the_jobs(store, "after the release").await;
    let again = claim(store, "ci", 10, LEASE).await;
    assert_eq!(
        ids(&again),
        HashSet::from([id]),
        "due at once, not when the lease would have run out"
    );
    assert_eq!(again[0].attempts, 0);
    assert!(
        !store.release(id, claim_id, SystemTime::now()).await.unwrap(),
        "the first claim is stale now"
    );
    assert_eq!(state_of(store, id).await, JobState::InFlight);
}

/// A renewal moves the lease's end out from the store's now, where the
/// claim id still holds; a stale worker's renewal changes nothing.
async fn renewal_extends_only_a_lease_still_held(f: Fixture) {
    let store = &f.store;
    let j = queued("ci");
    let id = j.id;
    accept(store, event("renew-1", vec![j])).await;
    let first = claim(store, "ci", 1, WINDOW).await;
    assert_eq!(ids(&first), HashSet::from([id]));

    // Renewed before it runs out, the lease holds past its first end.
    tokio::time::sleep(WINDOW / 2).await;
    let renewed_at = SystemTime::now();
    assert!(store.renew(id, first[0].claim, LEASE, renewed_at).await.unwrap());
    tokio::time::sleep(WINDOW).await;
    assert!(
        claim(store, "ci", 1, LEASE).await.is_empty(),
        "the renewed lease holds"
    );
    let wake = store.next_wakeup(SystemTime::now()).await.unwrap().unwrap();
    assert_near(wake, renewed_at + LEASE, "the renewed lease's end");

    // Left to run out, it is taken over; the old claim can renew no more.
    assert!(
        store
            .renew(id, first[0].claim, WINDOW, SystemTime::now())
            .await
            .unwrap()
    );
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let second = claim(store, "ci", 1, LEASE).await;
    assert_eq!(ids(&second), HashSet::from([id]));
    assert!(
        !store
            .renew(id, first[0].claim, LEASE, SystemTime::now())
            .await
            .unwrap(),
        "a stale claim cannot renew"
    );
    let wake = store.next_wakeup(SystemTime::now()).await.unwrap().unwrap();
    assert!(
        wake > SystemTime::now() + LEASE - Duration::from_secs(5),
        "the stale renewal left the new lease alone"
    );
    assert!(complete(store, id, second[0].claim, 201, NextState::Done).await);
    assert!(
        !store
            .renew(id, second[0].claim, LEASE, SystemTime::now())
            .await
            .unwrap(),
        "a finished job has no lease to renew"
    );
    assert_eq!(state_of(store, id).await, JobState::Done);
}

/// Relays on hosts whose clocks disagree share one queue: what is due, and
/// when a lease or a backoff ends, is decided by the database's clock, and
/// times come back on each caller's own clock.
async fn queue_decisions_follow_the_databases_clock_not_the_callers(f: Fixture) {
    let store = &f.store;
    let hour = Duration::from_secs(3600);
    let j = queued("ci");
    let id = j.id;
    let mut e = event("skew-1", vec![j]);
    // Received by a host an hour ahead: due now all the same.
    e.received_at = SystemTime::now() + hour;
    accept(store, e).await;

    // A host an hour behind claims it: due by the database's clock.
    let behind = SystemTime::now() - hour;
    let claimed = store.claim("ci", 10, LEASE, behind).await.unwrap();
    assert_eq!(
        ids(&claimed),
        HashSet::from([id]),
        "due, whatever the caller's clock says"
    );
    // The lease ends LEASE from now, on each caller's own clock.
    let wake = store.next_wakeup(behind).await.unwrap().unwrap();
    assert_near(wake, behind + LEASE, "the lease's end, on the slow host's clock");
    let ahead = SystemTime::now() + hour;
    let wake = store.next_wakeup(ahead).await.unwrap().unwrap();
    assert_near(wake, ahead + LEASE, "the lease's end, on the fast host's clock");

    // A retry scheduled by the fast host, WINDOW after its attempt ended.
    let mut c = completion(
        id,
        claimed[0].claim,
        503,
        NextState::Retry {
            due_at: ahead + WINDOW,
            maybe_delivered: false,
        },
    );
    c.at = ahead;
    c.attempt.started_at = ahead - c.attempt.duration;
    let written = SystemTime::now();
    assert!(store.complete(c, ahead).await.unwrap());
    assert!(
        store
            .claim("ci", 10, LEASE, ahead + hour)
            .await
            .unwrap()
            .is_empty(),
        "not due before its backoff ends, however late the caller's clock"
    );
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let again = store.claim("ci", 10, LEASE, behind).await.unwrap();
    assert_eq!(ids(&again), HashSet::from([id]), "due once the backoff ended");
    let detail = store.job(id).await.unwrap().unwrap();
    assert_near(
        detail.history[0].started_at,
        written - Duration::from_millis(40),
        "the attempt's start, on the database's clock",
    );
}

async fn complete_moves_the_job(f: Fixture) {
    let store = &f.store;
    let jobs = vec![queued("ci"), queued("ci"), queued("ci")];
    let (done, retry, dead) = (jobs[0].id, jobs[1].id, jobs[2].id);
    accept(store, event("complete-1", jobs)).await;
    let claimed = claim(store, "ci", 10, LEASE).await;
    let claim_id = claimed[0].claim;

    assert!(complete(store, done, claim_id, 201, NextState::Done).await);
    let retry_at = SystemTime::now() + Duration::from_secs(3600);
    assert!(
        complete(
            store,
            retry,
            claim_id,
            503,
            NextState::Retry {
                due_at: retry_at,
                maybe_delivered: true
            }
        )
        .await
    );
    assert!(
        complete(
            store,
            dead,
            claim_id,
            404,
            NextState::Dead {
                reason: "404: project not found".to_owned()
            }
        )
        .await
    );

    let d = store.job(done).await.unwrap().unwrap();
    assert_eq!(
        (d.job.state, d.job.attempts, d.job.last_error.as_deref()),
        (JobState::Done, 1, None)
    );
    assert_eq!(d.history.len(), 1);
    let attempt = &d.history[0];
    assert_eq!(
        (
            attempt.number,
            attempt.status,
            attempt.outcome.as_str(),
            attempt.excerpt.as_str()
        ),
        (1, Some(201), "ok", "answered 201")
    );
    assert_eq!(attempt.duration_ms, 40);
    assert_eq!(d.request, Some(serde_json::to_value(text_request(1)).unwrap()));

    let r = store.job(retry).await.unwrap().unwrap();
    assert_eq!(
        (r.job.state, r.job.attempts, r.job.last_error.as_deref()),
        (JobState::Queued, 1, Some("answered 503"))
    );
    assert_near(r.job.due_at, retry_at, "the retry's due time");
    assert_eq!(r.history[0].status, Some(503));

    let x = store.job(dead).await.unwrap().unwrap();
    assert_eq!(
        (
            x.job.state,
            x.job.attempts,
            x.job.last_error.as_deref(),
            x.job.retryable
        ),
        (JobState::Dead, 1, Some("404: project not found"), true)
    );

    let by_state = |state| JobFilter {
        state: Some(state),
        limit: 10,
        ..JobFilter::default()
    };
    for (state, id) in [
        (JobState::Done, done),
        (JobState::Queued, retry),
        (JobState::Dead, dead),
    ] {
        let listed = store.jobs(by_state(state)).await.unwrap();
        assert_eq!(listed.len(), 1, "{state}");
        assert_eq!(listed[0].id, id.to_string());
    }
    let of_event = store
        .jobs(JobFilter {
            event: Some(claimed[0].event_id),
            target: Some("ci".to_owned()),
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(of_event.len(), 3);
    assert!(
        store
            .jobs(JobFilter {
                target: Some("nowhere".to_owned()),
                limit: 10,
                ..JobFilter::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
}

async fn retry_waits_until_due(f: Fixture) {
    let store = &f.store;
    let j = queued("ci");
    let id = j.id;
    accept(store, event("retry-1", vec![j])).await;
    let claimed = claim(store, "ci", 1, LEASE).await;
    let c = completion(
        id,
        claimed[0].claim,
        503,
        NextState::Retry {
            due_at: SystemTime::now() + WINDOW,
            maybe_delivered: true,
        },
    );
    let due = c.at + WINDOW;
    assert!(store.complete(c, SystemTime::now()).await.unwrap());

    assert!(claim(store, "ci", 10, LEASE).await.is_empty(), "not due yet");
    let wake = store.next_wakeup(SystemTime::now()).await.unwrap().unwrap();
    assert_near(wake, due, "the retry's due time");
    let again = claim_when_due(store, "ci", 1, due).await;
    assert_eq!(ids(&again), HashSet::from([id]));
    assert_eq!((again[0].attempts, again[0].maybe_attempts), (1, 1));

    assert!(complete(store, id, again[0].claim, 201, NextState::Done).await);
    let history = store.job(id).await.unwrap().unwrap().history;
    assert_eq!(history.iter().map(|a| a.number).collect::<Vec<_>>(), [1, 2]);
}

async fn next_wakeup_reports_the_earliest(f: Fixture) {
    let store = &f.store;
    assert_eq!(store.next_wakeup(SystemTime::now()).await.unwrap(), None);

    // A retry in an hour and a lease ending in a minute: the lease is first.
    let jobs = vec![queued("ci"), queued("ci")];
    let (later, leased) = (jobs[0].id, jobs[1].id);
    accept(store, event("wake-1", jobs)).await;
    let claimed = claim(store, "ci", 10, LEASE).await;
    let claim_id = claimed[0].claim;
    let claimed_at = SystemTime::now();
    let c = completion(
        later,
        claim_id,
        503,
        NextState::Retry {
            due_at: SystemTime::now() + Duration::from_secs(3600),
            maybe_delivered: false,
        },
    );
    let retry_due = c.at + Duration::from_secs(3600);
    assert!(store.complete(c, SystemTime::now()).await.unwrap());
    let wake = store.next_wakeup(SystemTime::now()).await.unwrap().unwrap();
    assert_near(wake, claimed_at + LEASE, "the lease's end");

    assert!(complete(store, leased, claim_id, 201, NextState::Done).await);
    let wake = store.next_wakeup(SystemTime::now()).await.unwrap().unwrap();
    assert_near(wake, retry_due, "the retry");

    // A job due now beats both; past-due reads as no later than now.
    accept(store, event("wake-2", vec![queued("other")])).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let now = SystemTime::now();
    let wake = store.next_wakeup(now).await.unwrap().unwrap();
    assert!(wake <= now, "due already: {wake:?} is after {now:?}");
    assert_near(wake, now, "a job due now");
}

async fn dedupe_window(f: Fixture) {
    let store = &f.store;
    let key = "acme/api\nrefs/heads/main\n2222222222222222222222222222222222222222".to_owned();
    let limits = JobLimits {
        dedupe: Some((key.clone(), WINDOW)),
        burst: None,
    };
    accept(
        store,
        event("dd-1", vec![with_limits(queued("ci"), limits.clone())]),
    )
    .await;

    let second = with_limits(queued("ci"), limits.clone());
    let second_id = second.id;
    let other_target = with_limits(queued("other"), limits.clone());
    let e = event("dd-2", vec![second, other_target]);
    let event_id = e.id;
    let expected = Dropped {
        route: Some("builds".to_owned()),
        target: Some("ci".to_owned()),
        rule: guard::RULE_DEDUPE.to_owned(),
        reason: "target ci was already triggered for this repo, ref and sha within loop_guard.dedupe_window (300ms)"
            .to_owned(),
    };
    assert_eq!(
        store.ingest(e).await.unwrap(),
        Ingested::Accepted {
            held_back: vec![HeldBack {
                job_id: second_id,
                dropped: expected.clone(),
            }],
            leased: Vec::new()
        }
    );
    assert!(
        store.job(second_id).await.unwrap().is_none(),
        "a held-back job is not stored"
    );
    let view = store
        .events(newest_events(10), std::time::SystemTime::now())
        .await
        .unwrap();
    let stored = view.iter().find(|v| v.id == event_id.to_string()).unwrap();
    assert_eq!(stored.dropped, vec![expected]);
    assert_eq!(stored.jobs, 1, "the other target's job went through");

    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    accept(store, event("dd-3", vec![with_limits(queued("ci"), limits)])).await;
    let ci = store
        .jobs(JobFilter {
            target: Some("ci".to_owned()),
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ci.len(), 2, "once the window passed, the key is taken again");
}

async fn burst_limit(f: Fixture) {
    let store = &f.store;
    let burst = JobLimits {
        dedupe: None,
        burst: Some((2, WINDOW)),
    };
    let key = "acme/api\nrefs/heads/main\n3333333333333333333333333333333333333333".to_owned();
    let with_key = JobLimits {
        dedupe: Some((key.clone(), Duration::from_secs(3600))),
        burst: Some((2, WINDOW)),
    };
    let jobs = vec![
        with_limits(queued("ci"), burst.clone()),
        with_limits(queued("ci"), burst.clone()),
        with_limits(queued("ci"), with_key.clone()),
        with_limits(queued("other"), burst.clone()),
    ];
    let third = jobs[2].id;
    let expected = Dropped {
        route: Some("builds".to_owned()),
        target: Some("ci".to_owned()),
        rule: guard::RULE_BURST.to_owned(),
        reason: "target ci already has 2 triggers in the last 300ms; the burst limit is 2".to_owned(),
    };
    assert_eq!(
        store.ingest(event("burst-1", jobs)).await.unwrap(),
        Ingested::Accepted {
            held_back: vec![HeldBack {
                job_id: third,
                dropped: expected.clone(),
            }],
            leased: Vec::new()
        }
    );
    let next = with_limits(queued("ci"), burst.clone());
    let next_id = next.id;
    let Ingested::Accepted { held_back: held, .. } =
        store.ingest(event("burst-2", vec![next])).await.unwrap()
    else {
        panic!("not a duplicate");
    };
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].job_id, next_id);
    assert_eq!(held[0].dropped.rule, guard::RULE_BURST);

    // The window passes; the held-back job's dedupe key was never taken.
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    accept(store, event("burst-3", vec![with_limits(queued("ci"), with_key)])).await;
    assert_eq!(
        store
            .jobs(JobFilter {
                target: Some("ci".to_owned()),
                limit: 10,
                ..JobFilter::default()
            })
            .await
            .unwrap()
            .len(),
        3
    );
}

async fn requeue_one(f: Fixture) {
    let store = &f.store;
    let jobs = vec![queued("ci"), queued("ci"), job("ci", Err("no branch".to_owned()))];
    let (dead, done, unbuildable) = (jobs[0].id, jobs[1].id, jobs[2].id);
    accept(store, event("rq-1", jobs)).await;
    let claimed = claim(store, "ci", 10, LEASE).await;
    let claim_id = claimed[0].claim;
    assert!(
        complete(
            store,
            dead,
            claim_id,
            404,
            NextState::Dead {
                reason: "gone".to_owned()
            }
        )
        .await
    );
    assert!(complete(store, done, claim_id, 201, NextState::Done).await);

    assert_eq!(
        store.requeue(dead, SystemTime::now()).await.unwrap(),
        Requeued::Requeued
    );
    let view = store.job(dead).await.unwrap().unwrap();
    assert_eq!(
        (view.job.state, view.job.attempts, view.job.last_error),
        (JobState::Queued, 0, None)
    );
    assert_eq!(view.history.len(), 1, "history stays");
    assert_eq!(
        store.requeue(dead, SystemTime::now()).await.unwrap(),
        Requeued::NotDead(JobState::Queued)
    );
    let again = claim(store, "ci", 10, LEASE).await;
    assert_eq!(ids(&again), HashSet::from([dead]));
    assert_eq!((again[0].attempts, again[0].maybe_attempts), (0, 0));
    assert_eq!(
        store.requeue(dead, SystemTime::now()).await.unwrap(),
        Requeued::NotDead(JobState::InFlight)
    );
    assert!(complete(store, dead, again[0].claim, 201, NextState::Done).await);
    let numbers: Vec<u32> = store
        .job(dead)
        .await
        .unwrap()
        .unwrap()
        .history
        .iter()
        .map(|a| a.number)
        .collect();
    assert_eq!(numbers, [1, 2], "numbered across manual retries");

    assert_eq!(
        store.requeue(done, SystemTime::now()).await.unwrap(),
        Requeued::NotDead(JobState::Done)
    );
    assert_eq!(
        store.requeue(unbuildable, SystemTime::now()).await.unwrap(),
        Requeued::NoRequest
    );
    assert_eq!(state_of(store, unbuildable).await, JobState::Dead);
    assert_eq!(
        store.requeue(Uuid::now_v7(), SystemTime::now()).await.unwrap(),
        Requeued::NotFound
    );
}

async fn requeue_dead_by_target_and_time(f: Fixture) {
    let store = &f.store;
    let start = SystemTime::now();
    let kill = |store: Arc<dyn Store>, target: &'static str, delivery: &'static str| async move {
        let j = queued(target);
        let id = j.id;
        accept(&store, event(delivery, vec![j])).await;
        let claimed = claim(&store, target, 1, LEASE).await;
        assert!(
            complete(
                &store,
                id,
                claimed[0].claim,
                400,
                NextState::Dead {
                    reason: "bad".to_owned()
                }
            )
            .await
        );
        id
    };
    let early = kill(store.clone(), "ci", "rd-1").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mark = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let late = kill(store.clone(), "ci", "rd-2").await;
    let elsewhere = kill(store.clone(), "other", "rd-3").await;
    let unbuildable = job("ci", Err("no branch".to_owned()));
    let unbuildable_id = unbuildable.id;
    accept(store, event("rd-4", vec![unbuildable])).await;

    let now = SystemTime::now();
    assert_eq!(
        store
            .requeue_dead("ci", mark, now + Duration::from_secs(1), now)
            .await
            .unwrap(),
        1,
        "only the late job died in range (the unbuildable one cannot be retried)"
    );
    assert_eq!(state_of(store, late).await, JobState::Queued);
    assert_eq!(state_of(store, early).await, JobState::Dead);
    assert_eq!(state_of(store, elsewhere).await, JobState::Dead);
    assert_eq!(state_of(store, unbuildable_id).await, JobState::Dead);

    let now = SystemTime::now();
    assert_eq!(
        store
            .requeue_dead("ci", start - Duration::from_secs(3600), mark, now)
            .await
            .unwrap(),
        1
    );
    assert_eq!(state_of(store, early).await, JobState::Queued);
    assert_eq!(
        store
            .requeue_dead("ci", start - Duration::from_secs(3600), now, now)
            .await
            .unwrap(),
        0,
        "nothing dead is left to retry"
    );
    assert_eq!(state_of(store, elsewhere).await, JobState::Dead);
    let queued_jobs = store
        .jobs(JobFilter {
            state: Some(JobState::Queued),
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert!(
        queued_jobs
            .iter()
            .all(|j| j.attempts == 0 && j.last_error.is_none())
    );
    assert_eq!(queued_jobs.len(), 2);
}

async fn purge_deletes_finished_old_events(f: Fixture) {
    let store = &f.store;
    // Old: one event with a job done, one with a dead job, one with nothing
    // queued at all, and one still pending.
    let finished = event("p-1", vec![queued("ci")]);
    let (finished_id, finished_job) = (finished.id, finished.jobs[0].id);
    accept(store, finished).await;
    let claimed = claim(store, "ci", 1, LEASE).await;
    assert!(complete(store, finished_job, claimed[0].claim, 201, NextState::Done).await);
    let dead = event("p-2", vec![job("ci", Err("no branch".to_owned()))]);
    let dead_id = dead.id;
    accept(store, dead).await;
    let mut empty = event("p-3", Vec::new());
    empty.drops = vec![Dropped {
        route: None,
        target: None,
        rule: guard::RULE_SKIP_MARKER.to_owned(),
        reason: "[skip ci]".to_owned(),
    }];
    let empty_id = empty.id;
    accept(store, empty).await;
    let pending = event("p-4", vec![queued("later")]);
    let pending_id = pending.id;
    accept(store, pending).await;

    tokio::time::sleep(Duration::from_millis(250)).await;
    let cutoff = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let recent = event("p-5", Vec::new());
    let recent_id = recent.id;
    accept(store, recent).await;

    assert_eq!(
        store.purge(cutoff, SystemTime::now(), 2).await.unwrap(),
        2,
        "up to the limit"
    );
    assert_eq!(store.purge(cutoff, SystemTime::now(), 100).await.unwrap(), 1);
    assert_eq!(store.purge(cutoff, SystemTime::now(), 100).await.unwrap(), 0);
    let left: HashSet<String> = store
        .events(newest_events(10), std::time::SystemTime::now())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        left,
        HashSet::from([pending_id.to_string(), recent_id.to_string()])
    );
    for gone in [finished_id, dead_id, empty_id] {
        assert_eq!(store.event_body(gone).await.unwrap(), None);
    }
    assert!(
        store.job(finished_job).await.unwrap().is_none(),
        "jobs go with their event"
    );
    assert_eq!(store.jobs(all_jobs()).await.unwrap().len(), 1);
}

async fn purge_forgets_expired_dedupe_keys_a_batch_at_a_time(f: Fixture) {
    let store = &f.store;
    let limits = |sha: &str, window: Duration| JobLimits {
        dedupe: Some((format!("acme/api\nrefs/heads/main\n{sha}"), window)),
        burst: None,
    };
    for n in 0..5 {
        let job = with_limits(queued("ci"), limits(&format!("{n:040}"), WINDOW));
        accept(store, event(&format!("short-{n}"), vec![job])).await;
    }
    let live = limits(&"7".repeat(40), Duration::from_secs(3600));
    accept(
        store,
        event("long", vec![with_limits(queued("ci"), live.clone())]),
    )
    .await;
    tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;

    // Each backend bounds a batch its own way (SQLite looks at the next keys
    // in key order, PostgreSQL takes the oldest expired): never more than
    // the limit, and the batches go on until none are left to see.
    let mut forgotten = Vec::new();
    loop {
        let batch = store.forget_dedupe_keys(SystemTime::now(), 2).await.unwrap();
        assert!(batch.forgotten <= 2, "{batch:?}");
        forgotten.push(batch.forgotten);
        assert!(forgotten.len() <= 6, "the sweep never ends: {forgotten:?}");
        if !batch.more {
            break;
        }
    }
    assert_eq!(forgotten.iter().sum::<u64>(), 5, "{forgotten:?}");
    let next_pass = store.forget_dedupe_keys(SystemTime::now(), 2).await.unwrap();
    assert_eq!(next_pass.forgotten, 0, "nothing expired is left");
    let again = with_limits(queued("ci"), live);
    let again_id = again.id;
    let Ingested::Accepted { held_back, .. } = store.ingest(event("long-again", vec![again])).await.unwrap()
    else {
        panic!("not accepted");
    };
    assert_eq!(
        held_back
            .iter()
            .map(|h| (h.job_id, h.dropped.rule.as_str()))
            .collect::<Vec<_>>(),
        [(again_id, guard::RULE_DEDUPE)],
        "the key whose window is open was kept"
    );
}

async fn queue_stats_counts_every_state(f: Fixture) {
    let store = &f.store;
    let stats = store.queue_stats(SystemTime::now()).await.unwrap();
    assert_eq!(counts_by_state(&stats.jobs), [0, 0, 0, 0]);
    assert_eq!(stats.oldest_due, None);

    let before = SystemTime::now();
    let jobs = vec![queued("ci"), queued("ci"), queued("ci")];
    accept(store, event("qs-1", jobs)).await;
    let claimed = claim(store, "ci", 3, LEASE).await;
    let claim_id = claimed[0].claim;
    assert!(complete(store, claimed[0].id, claim_id, 201, NextState::Done).await);
    assert!(
        complete(
            store,
            claimed[1].id,
            claim_id,
            404,
            NextState::Dead {
                reason: "gone".to_owned()
            }
        )
        .await
    );
    let waiting = queued("ci");
    let waiting_received = SystemTime::now();
    let mut e = event("qs-2", vec![waiting, job("ci", Err("no branch".to_owned()))]);
    e.received_at = waiting_received;
    accept(store, e).await;
    let accepted = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let stats = store.queue_stats(SystemTime::now()).await.unwrap();
    assert_eq!(counts_by_state(&stats.jobs), [1, 1, 1, 2]);
    let oldest = stats.oldest_due.unwrap();
    assert!(oldest >= before, "{oldest:?} is before the test began");
    // Due when its webhook was committed (PostgreSQL's `now()`): after it
    // came, before the accept path answered, give or take the two clocks.
    // (A fixed distance from when it came failed once under a loaded
    // machine, where the group commit took longer than that.)
    assert!(
        oldest + SLACK >= waiting_received && oldest <= accepted + SLACK,
        "the waiting job's due time {oldest:?} is outside {waiting_received:?}..{accepted:?}"
    );
}

/// `queue_stats`' job counts as [queued, in flight, done, dead], after
/// checking that the store answers every state, in that order.
fn counts_by_state(jobs: &[(JobState, u64)]) -> [u64; 4] {
    let states: Vec<JobState> = jobs.iter().map(|(state, _)| *state).collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::InFlight,
            JobState::Done,
            JobState::Dead
        ]
    );
    [jobs[0].1, jobs[1].1, jobs[2].1, jobs[3].1]
}

/// The counts `queue_stats` answers, and the jobs counted one by one
/// through the store's own listing, agree (`step` names the change).
async fn assert_counts_match_the_jobs(store: &Arc<dyn Store>, step: &str) {
    let kept = store.queue_stats(SystemTime::now()).await.unwrap().jobs;
    let listed = store.jobs(all_jobs()).await.unwrap();
    let counted: Vec<(JobState, u64)> = kept
        .iter()
        .map(|(state, _)| (*state, listed.iter().filter(|j| j.state == *state).count() as u64))
        .collect();
    assert_eq!(
        kept, counted,
        "after {step}: the kept counts, then the jobs counted"
    );
}

/// Both backends keep the job counts as the jobs change (SQLite with row
/// triggers, PostgreSQL with statement triggers whose deltas a read folds
/// in): every kind of change moves them exactly, a purge's cascade
/// included, and a change that moves no job between states moves nothing.
async fn kept_job_counts_follow_every_change(f: Fixture) {
    let store = &f.store;
    assert_counts_match_the_jobs(store, "nothing").await;

    let (leased, leased_claim) = leased_job("ci", SystemTime::now() + LEASE);
    let leased_id = leased.id;
    let old = event(
        "kc-1",
        vec![
            queued("ci"),
            queued("ci"),
            queued("ci"),
            leased,
            job("ci", Err("no branch".to_owned())),
        ],
    );
    let old_id = old.id;
    accept(store, old).await;
    assert_counts_match_the_jobs(store, "one webhook's jobs, queued, leased and dead").await;

    let claimed = claim(store, "ci", 3, LEASE).await;
    assert_eq!(claimed.len(), 3);
    assert_counts_match_the_jobs(store, "a claim").await;
    let claim_id = claimed[0].claim;
    assert!(
        store
            .renew(claimed[0].id, claim_id, LEASE, SystemTime::now())
            .await
            .unwrap()
    );
    assert_counts_match_the_jobs(store, "a renewal").await;

    assert!(complete(store, claimed[0].id, claim_id, 201, NextState::Done).await);
    let dead = NextState::Dead {
        reason: "gone".to_owned(),
    };
    assert!(complete(store, claimed[1].id, claim_id, 404, dead.clone()).await);
    let retry_due = SystemTime::now() + Duration::from_millis(200);
    let retry = NextState::Retry {
        due_at: retry_due,
        maybe_delivered: false,
    };
    assert!(complete(store, claimed[2].id, claim_id, 503, retry).await);
    assert_eq!(state_of(store, leased_id).await, JobState::InFlight);
    assert_counts_match_the_jobs(store, "done, dead and a retry").await;
    // A stale completion writes nothing, and moves nothing.
    assert!(!complete(store, claimed[0].id, Uuid::now_v7(), 201, NextState::Done).await);
    assert_counts_match_the_jobs(store, "a stale completion").await;

    assert_eq!(
        store.requeue(claimed[1].id, SystemTime::now()).await.unwrap(),
        Requeued::Requeued
    );
    assert_counts_match_the_jobs(store, "a manual retry").await;

    // The old event's jobs finish, then retention deletes them with it.
    let again = claim_when_due(store, "ci", 2, retry_due).await;
    assert_eq!(
        ids(&again),
        HashSet::from([claimed[1].id, claimed[2].id]),
        "the manual retry and the retry now due"
    );
    for j in &again {
        assert!(complete(store, j.id, j.claim, 201, NextState::Done).await);
    }
    assert!(complete(store, leased_id, leased_claim, 201, NextState::Done).await);
    assert_counts_match_the_jobs(store, "every job of the old event finished").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    accept(store, event("kc-2", vec![queued("ci"), queued("later")])).await;
    assert_eq!(store.purge(cutoff, SystemTime::now(), 100).await.unwrap(), 1);
    assert!(store.job(leased_id).await.unwrap().is_none(), "{old_id} is gone");
    assert_counts_match_the_jobs(store, "a purge").await;
    assert_eq!(
        counts_by_state(&store.queue_stats(SystemTime::now()).await.unwrap().jobs),
        [2, 0, 0, 0]
    );
}

/// The job counts' deltas (one row per statement that moved jobs between
/// states) are folded by the retention purge too, not only by a read, so
/// they stay few on a relay whose counts nobody reads. (The deltas are a
/// table of the schema, read here with SQL.)
async fn the_purge_folds_the_count_deltas(f: Fixture) {
    let store = &f.store;
    let client = postgres_client(&f.settings.location).await.unwrap();
    let deltas = || async {
        client
            .query_one("SELECT count(*) FROM job_count_deltas", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    accept(store, event("fold-1", vec![queued("ci"), queued("ci")])).await;
    let claimed = claim(store, "ci", 1, LEASE).await;
    assert!(complete(store, claimed[0].id, claimed[0].claim, 201, NextState::Done).await);
    assert_eq!(deltas().await, 3, "the ingest, the claim and the completion");

    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    assert_eq!(store.purge(long_ago, SystemTime::now(), 100).await.unwrap(), 0);
    assert_eq!(deltas().await, 0);
    assert_eq!(
        counts_by_state(&store.queue_stats(SystemTime::now()).await.unwrap().jobs),
        [1, 0, 1, 0]
    );
}

async fn event_body(f: Fixture) {
    let store = &f.store;
    let mut e = event("body-1", Vec::new());
    e.content_type = "application/x-www-form-urlencoded".to_owned();
    e.body = Bytes::from_static(b"payload=%7B%7D\x00\xff");
    e.payload = Some(Bytes::from_static(b"{}"));
    let id = e.id;
    accept(store, e).await;
    assert_eq!(
        store.event_body(id).await.unwrap(),
        Some((
            "application/x-www-form-urlencoded".to_owned(),
            Bytes::from_static(b"payload=%7B%7D\x00\xff")
        ))
    );
    assert_eq!(store.event_body(Uuid::now_v7()).await.unwrap(), None);
}

/// A push's JSON, about 7 KB: compresses as webhook JSON does.
fn compressible_json() -> String {
    let commits: Vec<String> = (0..40)
        .map(|n| {
            format!(
                r#"{{"id":"{n:040x}","message":"Fix the build, take {n}","author":{{"name":"Octo Cat","email":"octo@example.com"}},"added":[],"modified":["src/lib.rs"]}}"#
            )
        })
        .collect();
    format!(r#"{{"ref":"refs/heads/main","commits":[{}]}}"#, commits.join(","))
}

/// Bytes with no repetition (xorshift), which no codec shrinks.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Whatever a store packs a body into, every reader gets back the bytes as
/// received: the stored delivery, its body alone, and the document a
/// payload-carrying trigger sends, for a compressible push, a form post
/// with its JSON, a body too small to pack and one that does not compress.
async fn packed_bodies_come_back_byte_for_byte(f: Fixture) {
    let store = &f.store;
    let json = compressible_json();
    assert!(json.len() > 6_000, "{}", json.len());
    let form = format!("payload={}", json.replace('"', "%22"));
    // Delivery, content type, body, and the JSON document of a form post.
    type Case = (&'static str, &'static str, Vec<u8>, Option<Vec<u8>>);
    let cases: [Case; 4] = [
        ("pack-json", "application/json", json.clone().into_bytes(), None),
        (
            "pack-form",
            "application/x-www-form-urlencoded",
            form.into_bytes(),
            Some(json.into_bytes()),
        ),
        (
            "pack-small",
            "application/json",
            br#"{"zen":"Keep it logically awesome."}"#.to_vec(),
            None,
        ),
        ("pack-noise", "application/octet-stream", noise(4096), None),
    ];
    let mut expected = Vec::new();
    for (delivery, content_type, body, payload) in cases {
        let mut e = event(delivery, vec![job("ci", Ok(payload_request()))]);
        e.content_type = content_type.to_owned();
        e.body = Bytes::from(body.clone());
        e.payload = payload.clone().map(Bytes::from);
        expected.push((e.id, e.jobs[0].id, content_type, body, payload));
        accept(store, e).await;
    }
    let claimed = claim(store, "ci", 10, LEASE).await;
    assert_eq!(claimed.len(), expected.len());
    for (event_id, job_id, content_type, body, payload) in expected {
        let stored = store.event(event_id).await.unwrap().expect("the event is stored");
        assert_eq!(stored.content_type, content_type);
        assert!(
            stored.body == body,
            "{content_type}: the stored body, byte for byte"
        );
        assert_eq!(
            stored.payload.as_deref(),
            payload.as_deref(),
            "{content_type}: the payload"
        );
        assert_eq!(
            store.event_body(event_id).await.unwrap(),
            Some((content_type.to_owned(), Bytes::from(body.clone()))),
            "{content_type}: the body alone"
        );
        let job = claimed.iter().find(|j| j.id == job_id).expect("claimed");
        assert_eq!(
            job.payload.as_deref(),
            Some(payload.as_deref().unwrap_or(&body)),
            "{content_type}: the document a payload trigger sends"
        );
    }
}

async fn events_view_with_drops(f: Fixture) {
    let store = &f.store;
    let skip = Dropped {
        route: None,
        target: None,
        rule: guard::RULE_SKIP_MARKER.to_owned(),
        reason: "the head commit says [skip ci]".to_owned(),
    };
    let hops = Dropped {
        route: Some("deploys".to_owned()),
        target: Some("cd".to_owned()),
        rule: guard::RULE_HOP_LIMIT.to_owned(),
        reason: "hop 3 reached max_hops 3".to_owned(),
    };
    let older = event("ev-1", vec![queued("ci")]);
    let older_id = older.id;
    accept(store, older).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    let limits = JobLimits {
        dedupe: Some(("k".to_owned(), Duration::from_secs(3600))),
        burst: None,
    };
    accept(
        store,
        event("ev-0", vec![with_limits(queued("ci"), limits.clone())]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut newer = event(
        "ev-2",
        vec![
            queued("ci"),
            queued("ci"),
            job("ci", Err("no branch".to_owned())),
            with_limits(queued("ci"), limits),
        ],
    );
    newer.hook = "tag_push".to_owned();
    newer.source = "gitlab".to_owned();
    newer.drops = vec![skip.clone(), hops.clone()];
    let newer_id = newer.id;
    let a = newer.jobs[0].id;
    let Ingested::Accepted { held_back: held, .. } = store.ingest(newer).await.unwrap() else {
        panic!("not a duplicate");
    };
    assert_eq!(held.len(), 1);
    let claimed = claim(store, "ci", 10, LEASE).await;
    let claim_of_a = claimed.iter().find(|j| j.id == a).unwrap().claim;
    assert!(complete(store, a, claim_of_a, 201, NextState::Done).await);

    let view = store
        .events(newest_events(2), std::time::SystemTime::now())
        .await
        .unwrap();
    assert_eq!(view.len(), 2, "the limit holds");
    let newest = &view[0];
    assert_eq!(newest.id, newer_id.to_string(), "newest first");
    assert_eq!(
        (
            newest.source.as_str(),
            newest.delivery.as_deref(),
            newest.hook.as_str()
        ),
        ("gitlab", Some("ev-2"), "tag_push")
    );
    assert_eq!(newest.summary, serde_json::json!({"events": [{"kind": "push"}]}));
    assert_eq!(
        (newest.jobs, newest.pending, newest.done, newest.dead),
        (3, 1, 1, 1)
    );
    assert_eq!(newest.dropped, vec![skip, hops, held[0].dropped.clone()]);

    let all = store
        .events(newest_events(10), std::time::SystemTime::now())
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let oldest = &all[2];
    assert_eq!(oldest.id, older_id.to_string());
    assert_eq!(
        (oldest.jobs, oldest.pending, oldest.done, oldest.dead),
        (1, 1, 0, 0)
    );
    assert!(oldest.dropped.is_empty());
}

// ---------------------------------------------------------------------------
// PostgreSQL only: several relays on one database

async fn concurrent_claims_never_share_a_job(f: Fixture) {
    const JOBS: usize = 200;
    let a = f.store.clone();
    let b = f.another().await;
    let mut all = HashSet::new();
    for n in 0..JOBS / 10 {
        let jobs: Vec<NewJob> = (0..10).map(|_| queued("ci")).collect();
        all.extend(jobs.iter().map(|j| j.id));
        accept(&a, event(&format!("cc-{n}"), jobs)).await;
    }

    let claimed = Arc::new(Mutex::new(Vec::new()));
    let total = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut workers = Vec::new();
    for worker in 0..6 {
        let store = if worker % 2 == 0 { a.clone() } else { b.clone() };
        let (claimed, total) = (claimed.clone(), total.clone());
        workers.push(tokio::spawn(async move {
            while total.load(Ordering::SeqCst) < JOBS && tokio::time::Instant::now() < deadline {
                let jobs = claim(&store, "ci", 7, LEASE).await;
                total.fetch_add(jobs.len(), Ordering::SeqCst);
                claimed.lock().await.extend(jobs.iter().map(|j| j.id));
                if jobs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let claimed = claimed.lock().await;
    let unique: HashSet<Uuid> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "a job was claimed twice");
    assert_eq!(unique, all, "every job was claimed");
    assert!(claim(&b, "ci", 10, LEASE).await.is_empty());
}

async fn work_arrived_wakes_another_relay(f: Fixture) {
    let a = f.store.clone();
    let b = f.another().await;
    let quiet = Duration::from_millis(300);
    assert!(
        tokio::time::timeout(quiet, b.work_arrived()).await.is_err(),
        "no work yet"
    );

    // A job the ingesting relay sends itself is no news for others.
    let (leased, _) = leased_job("ci", SystemTime::now() + LEASE);
    accept(&a, event("wa-1", vec![leased])).await;
    assert!(
        tokio::time::timeout(quiet, b.work_arrived()).await.is_err(),
        "a leased job wakes nobody"
    );

    accept(&a, event("wa-2", vec![queued("ci")])).await;
    tokio::time::timeout(Duration::from_secs(2), b.work_arrived())
        .await
        .expect("relay B hears of the queued job");

    // A retry and a manual requeue are news too.
    let claimed = claim(&a, "ci", 10, LEASE).await;
    let job = claimed.iter().find(|j| j.attempts == 0).unwrap();
    assert!(
        complete(
            &a,
            job.id,
            job.claim,
            404,
            NextState::Dead {
                reason: "gone".to_owned()
            }
        )
        .await
    );
    assert!(
        tokio::time::timeout(quiet, b.work_arrived()).await.is_err(),
        "a dead job is no news"
    );
    assert_eq!(
        a.requeue(job.id, SystemTime::now()).await.unwrap(),
        Requeued::Requeued
    );
    tokio::time::timeout(Duration::from_secs(2), b.work_arrived())
        .await
        .expect("relay B hears of the requeued job");
}

async fn listener_reconnects(f: Fixture) {
    let a = f.store.clone();
    let b = f.another().await;
    let admin = f.sql().await;
    // Both relays' LISTEN connections, as a database restart or a proxy
    // would end them.
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query = 'LISTEN relay_jobs'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 2);

    // Signals may have been missed meanwhile: the reconnect itself wakes.
    tokio::time::timeout(Duration::from_secs(5), b.work_arrived())
        .await
        .expect("relay B reconnects and looks for work");
    accept(&a, event("lr-1", vec![queued("ci")])).await;
    tokio::time::timeout(Duration::from_secs(2), b.work_arrived())
        .await
        .expect("relay B hears of new work on its new connection");
}

async fn concurrent_migrations(f: Fixture) {
    // A database of its own, empty: the fixture's was migrated already.
    let Some(url) = postgres_database("concurrent_migrations_fresh").await else {
        return;
    };
    let fresh = settings(&url);
    let status = relay::store::schema_status(&fresh).await.unwrap();
    assert_eq!(status.version, 0, "an empty database");
    assert_eq!(status.latest, relay::store::POSTGRES_SCHEMA_VERSION);

    let (one, two, three) = tokio::join!(
        relay::store::open(&fresh, std::time::SystemTime::now()),
        relay::store::open(&fresh, std::time::SystemTime::now()),
        relay::store::open(&fresh, std::time::SystemTime::now())
    );
    let (one, two, three) = (one.unwrap(), two.unwrap(), three.unwrap());
    let after = relay::store::schema_status(&fresh).await.unwrap();
    assert_eq!(after.version, after.latest);
    assert_eq!(after.latest, status.latest);

    // All three work on the one schema.
    accept(&one, event("m-1", vec![queued("ci")])).await;
    assert_eq!(claim(&two, "ci", 10, LEASE).await.len(), 1);
    assert_eq!(three.jobs(all_jobs()).await.unwrap().len(), 1);
    assert_eq!(
        relay::store::schema_status(&f.settings).await.unwrap(),
        after,
        "the fixture's own database is at the latest version too"
    );

    // Bodies are compressed with LZ4 where the server has it (V8).
    let client = postgres_client(&fresh.location)
        .await
        .expect("a postgres fixture");
    let row = client
        .query_one(
            "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
            &[],
        )
        .await
        .unwrap();
    let expected = if row.get::<_, bool>(0) { "l" } else { "" };
    // Since V15 relay packs them itself, and the server stores them as they
    // come (`EXTERNAL`); the compression is kept for the rows from before.
    let columns: Vec<(String, String)> = client
        .query(
            "SELECT attcompression::text, attstorage::text FROM pg_attribute
             WHERE attrelid = 'events'::regclass AND attname IN ('body', 'payload')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let packed_by_relay = (expected.to_owned(), "e".to_owned());
    assert_eq!(
        columns,
        [packed_by_relay.clone(), packed_by_relay],
        "the body columns' compression and storage"
    );
}

/// A password in the test server's URL, if it has one.
fn password_of(settings: &StoreSettings) -> Option<String> {
    let relay::config::StoreLocation::Postgres(pg) = &settings.location else {
        return None;
    };
    pg.connect
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// The statements that end a lease find its job by id and claim alone
/// (schema V11): the database refuses a claim on a job not in flight and
/// an in-flight job without one, so no statement of relay's can make the
/// two disagree. (A test of the schema itself, so it writes with SQL.)
async fn a_claim_is_held_only_in_flight(f: Fixture) {
    let store = &f.store;
    let j = queued("ci");
    let id = j.id;
    accept(store, event("claimed-1", vec![j])).await;
    let claimed = claim(store, "ci", 1, LEASE).await;
    assert_eq!(ids(&claimed), HashSet::from([id]));

    let client = f.sql().await;
    for breaking in [
        "UPDATE jobs SET claim_id = NULL WHERE id = $1",
        "UPDATE jobs SET state = 'queued' WHERE id = $1",
        "UPDATE jobs SET state = 'done' WHERE id = $1",
    ] {
        let error = client.execute(breaking, &[&id]).await.unwrap_err();
        let db = error
            .as_db_error()
            .unwrap_or_else(|| panic!("{breaking}: {error}"));
        assert_eq!(db.constraint(), Some("jobs_claimed_in_flight"), "{breaking}");
    }
    let queued_with_a_claim = client
        .execute(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, claim_id,
                               created_at, updated_at)
             SELECT gen_random_uuid(), event_id, route, target, 'queued', request, needs_payload, now(),
                    gen_random_uuid(), now(), now()
             FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap_err();
    assert_eq!(
        queued_with_a_claim.as_db_error().and_then(|e| e.constraint()),
        Some("jobs_claimed_in_flight")
    );

    assert!(complete(store, id, claimed[0].claim, 201, NextState::Done).await);
    let detail = store.job(id).await.unwrap().unwrap();
    assert_eq!(detail.job.state, JobState::Done);
    assert_eq!(detail.history.len(), 1);
}

/// A claim's cost must not grow with other targets' queues: a target
/// whose CI is down piles up jobs due long ago, and the healthy targets'
/// claims must not read past them (schema V12). The plan is what can be
/// checked without timing: the due jobs of one target, as a claim asks
/// for them, come from the per-target index; the minimum over every
/// target, as the next wake-up and the oldest due job ask for it, from
/// the global one.
/// Rows written before relay packed bodies on PostgreSQL (schema V15) hold
/// the body as received (the server compressed it on its own) and read as
/// they are; rows written since hold relay's packing (the columns' storage:
/// `concurrent_migrations`). (A test of the schema itself, so it writes and
/// reads rows with SQL.)
async fn bodies_stored_before_packing_read_as_stored(f: Fixture) {
    let store = &f.store;
    let json = compressible_json();
    let mut packed = event("packed-1", vec![job("ci", Ok(payload_request()))]);
    packed.body = Bytes::from(json.clone());
    let packed_id = packed.id;
    accept(store, packed).await;
    let client = f.sql().await;
    let row = client
        .query_one(
            "SELECT codec, octet_length(body) FROM events WHERE id = $1",
            &[&packed_id],
        )
        .await
        .unwrap();
    let (codec, stored_len): (i32, i32) = (row.get(0), row.get(1));
    assert_eq!(codec, 1, "a compressible body is packed with LZ4");
    assert!(
        usize::try_from(stored_len).unwrap() < json.len() / 3,
        "the server is sent the packed bytes: {stored_len} of {}",
        json.len()
    );
    // As a relay before V15 wrote it: no codec (0), the body whole.
    let old_id = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary)
             VALUES ($1, 'github', 'before-packing', 'push', now(), 'application/json', $2, NULL, 0, '{}')",
            &[&old_id, &json.as_bytes()],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, created_at, updated_at)
             SELECT gen_random_uuid(), $1, route, target, 'queued', request, needs_payload, now(), now(), now()
             FROM jobs WHERE event_id = $2",
            &[&old_id, &packed_id],
        )
        .await
        .unwrap();
    let stored = store.event(old_id).await.unwrap().expect("the old event reads");
    assert!(stored.body == json.as_bytes(), "the old body as it was stored");
    assert_eq!(
        store.event_body(old_id).await.unwrap(),
        Some(("application/json".to_owned(), Bytes::from(json.clone())))
    );
    let claimed = claim(store, "ci", 10, LEASE).await;
    assert_eq!(claimed.len(), 2, "the packed event's job and the old one's");
    for job in &claimed {
        assert_eq!(job.payload.as_deref(), Some(json.as_bytes()), "{}", job.event_id);
    }
}

async fn a_claim_reads_only_its_own_targets_queue(f: Fixture) {
    let store = &f.store;
    let client = f.sql().await;
    let request = serde_json::to_string(&text_request(1)).unwrap();
    client
        .execute(
            "WITH e AS (
                 INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary)
                 SELECT gen_random_uuid(), 'github', 'pile-' || n, 'push', now(), 'application/json',
                        '\\x7b7d', 0, '{}'
                 FROM generate_series(1, 22000) AS n
                 RETURNING id, delivery
             )
             INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, created_at,
                               updated_at)
             SELECT gen_random_uuid(), e.id, 'builds', t.target, 'queued', $1, false, t.due, now(), now()
             FROM e, LATERAL (
                 SELECT CASE WHEN substr(e.delivery, 6)::int <= 20000 THEN 'down' ELSE 'ci' END AS target,
                        CASE WHEN substr(e.delivery, 6)::int <= 20000 THEN now() - interval '1 hour'
                             ELSE now() END AS due
             ) t",
            &[&request],
        )
        .await
        .unwrap();
    client.batch_execute("ANALYZE jobs").await.unwrap();
    let plan = |sql: &'static str| {
        let client = &client;
        async move {
            let rows = client
                .query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[])
                .await
                .unwrap();
            rows.iter()
                .map(|row| row.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let claim_plan = plan(
        "SELECT id FROM jobs WHERE target = 'ci' AND state = 'queued' AND due_at <= now()
         ORDER BY due_at LIMIT 4 FOR UPDATE SKIP LOCKED",
    )
    .await;
    assert!(
        claim_plan.contains("jobs_queued") && !claim_plan.contains("jobs_due"),
        "{claim_plan}"
    );
    let next_plan = plan("SELECT min(due_at) FROM jobs WHERE state = 'queued' AND claim_id IS NULL").await;
    assert!(next_plan.contains("jobs_due"), "{next_plan}");

    // And the claim itself takes the healthy target's jobs.
    let claimed = claim(store, "ci", 4, LEASE).await;
    assert_eq!(claimed.len(), 4);
    assert!(claimed.iter().all(|job| job.target == "ci"));
}

async fn newer_schema_is_refused(f: Fixture) {
    let relay::config::StoreLocation::Postgres(pg) = &f.settings.location else {
        unreachable!("a postgres fixture");
    };
    let client = f.sql().await;
    client
        .batch_execute("UPDATE relay_schema SET version = version + 1")
        .await
        .unwrap();
    let error = relay::store::open(&f.settings, std::time::SystemTime::now())
        .await
        .unwrap_err();
    let StoreError::Connect { url, reason } = &error else {
        panic!("not a connect error: {error}");
    };
    assert!(reason.contains("run a newer relay"), "{reason}");
    assert_eq!(url, &pg.shown);
    if let Some(password) = password_of(&f.settings) {
        assert!(!error.to_string().contains(&password), "{error}");
    }
    let status = relay::store::schema_status(&f.settings).await.unwrap();
    assert_eq!(status.version, status.latest + 1);
}

async fn connect_errors_hide_the_password(f: Fixture) {
    let relay::config::StoreLocation::Postgres(pg) = &f.settings.location else {
        unreachable!("a postgres fixture");
    };
    let wrong = "wrong-secret-password-1234";
    let mut bad = pg.clone();
    bad.connect.password(wrong);
    let error = relay::store::PostgresStore::open(&bad).await.unwrap_err();
    assert!(matches!(error, StoreError::Connect { .. }), "{error}");
    let text = format!("{error} {error:?}");
    assert!(!text.contains(wrong), "the password leaked: {text}");
    assert!(text.contains("password authentication failed"), "{text}");

    let status = relay::store::schema_status(&StoreSettings {
        location: relay::config::StoreLocation::Postgres(bad),
        retention: f.settings.retention,
    })
    .await
    .unwrap_err();
    assert!(!format!("{status} {status:?}").contains(wrong));
}

/// A column's kind as both backends can say it: SQLite's declared type, or
/// PostgreSQL's `data_type`. `None`: a kind relay does not use.
fn column_kind(declared: &str) -> Option<&'static str> {
    Some(match declared.to_ascii_lowercase().as_str() {
        "text" | "uuid" => "text",
        "blob" | "bytea" => "blob",
        "integer" | "bigint" => "integer",
        "boolean" => "bool",
        "timestamp with time zone" => "time",
        _ => return None,
    })
}

/// Whether a SQLite column of `sqlite` kind stores what a PostgreSQL column
/// of `postgres` kind does: SQLite keeps booleans and times (milliseconds)
/// as integers, and ids as text.
fn compatible(sqlite: &str, postgres: &str) -> bool {
    sqlite == postgres || (sqlite == "integer" && matches!(postgres, "bool" | "time"))
}

/// Table -> column -> (kind, nullable).
type Schema = std::collections::BTreeMap<String, std::collections::BTreeMap<String, (String, bool)>>;

/// The columns that exist in one backend alone, each for a reason of that
/// backend's own; anything else one backend has and the other lacks is a
/// migration added to one and forgotten in the other.
const ONE_BACKEND_ONLY: &[(&str, &str, &str)] = &[
    // Keeps a drop list in the order written; SQLite's rowid does that.
    ("postgres", "drops", "id"),
    // PostgreSQL's schema version; SQLite's is `PRAGMA user_version`.
    ("postgres", "relay_schema", "version"),
    // Both keep the job counts /metrics reads. SQLite's row triggers update
    // a row per state; PostgreSQL's statement triggers append deltas that a
    // read folds into one row, so concurrent commits never queue behind a
    // counter row's lock.
    ("sqlite", "job_counts", "state"),
    ("sqlite", "job_counts", "n"),
    ("postgres", "job_counts", "queued"),
    ("postgres", "job_counts", "in_flight"),
    ("postgres", "job_counts", "done"),
    ("postgres", "job_counts", "dead"),
    ("postgres", "job_count_deltas", "queued"),
    ("postgres", "job_count_deltas", "in_flight"),
    ("postgres", "job_count_deltas", "done"),
    ("postgres", "job_count_deltas", "dead"),
];

/// After migrations, SQLite and PostgreSQL have the same tables with the
/// same columns, of compatible kinds and the same nullability, but for the
/// few listed in `ONE_BACKEND_ONLY`: a migration added to one backend and
/// forgotten in the other fails here. (A test of the schema itself, so it
/// reads each backend's catalogue with SQL.)
async fn schemas_match_between_backends(f: Fixture) {
    let client = f.sql().await;
    let mut postgres = Schema::new();
    for row in client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'YES'
             FROM information_schema.columns WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .unwrap()
    {
        let (table, column, declared): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let kind = column_kind(&declared).unwrap_or_else(|| panic!("postgres {table}.{column}: {declared}"));
        postgres
            .entry(table)
            .or_default()
            .insert(column, (kind.to_owned(), row.get(3)));
    }

    let lite = Fixture::sqlite().await;
    let relay::config::StoreLocation::Sqlite(path) = &lite.settings.location else {
        unreachable!("a sqlite fixture");
    };
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut sqlite = Schema::new();
    let mut columns = conn
        .prepare(
            "SELECT t.name, c.name, c.type, c.\"notnull\" = 0 AND c.pk = 0
             FROM sqlite_schema t, pragma_table_info(t.name) c
             WHERE t.type = 'table' AND t.name NOT LIKE 'sqlite_%'",
        )
        .unwrap();
    let rows = columns
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (table, column, declared, nullable) = row.unwrap();
        let kind = column_kind(&declared).unwrap_or_else(|| panic!("sqlite {table}.{column}: {declared}"));
        sqlite
            .entry(table)
            .or_default()
            .insert(column, (kind.to_owned(), nullable));
    }

    assert!(sqlite.len() >= 6 && sqlite.contains_key("jobs"), "{sqlite:?}");
    let mut differences = Vec::new();
    let tables: std::collections::BTreeSet<&String> = sqlite.keys().chain(postgres.keys()).collect();
    for table in tables {
        let empty = Default::default();
        let (lite_columns, pg_columns) = (
            sqlite.get(table).unwrap_or(&empty),
            postgres.get(table).unwrap_or(&empty),
        );
        let names: std::collections::BTreeSet<&String> =
            lite_columns.keys().chain(pg_columns.keys()).collect();
        for column in names {
            let only = |backend: &str| ONE_BACKEND_ONLY.contains(&(backend, table.as_str(), column.as_str()));
            match (lite_columns.get(column), pg_columns.get(column)) {
                (Some(_), None) if only("sqlite") => {}
                (None, Some(_)) if only("postgres") => {}
                (Some(_), None) => differences.push(format!("{table}.{column}: in SQLite only")),
                (None, Some(_)) => differences.push(format!("{table}.{column}: in PostgreSQL only")),
                (Some((lite_kind, lite_null)), Some((pg_kind, pg_null))) => {
                    if !compatible(lite_kind, pg_kind) {
                        differences.push(format!(
                            "{table}.{column}: {lite_kind} in SQLite, {pg_kind} in PostgreSQL"
                        ));
                    }
                    if lite_null != pg_null {
                        differences.push(format!(
                            "{table}.{column}: nullable {lite_null} in SQLite, {pg_null} in PostgreSQL"
                        ));
                    }
                }
                (None, None) => unreachable!(),
            }
        }
    }
    assert!(
        differences.is_empty(),
        "the backends' schemas differ:\n{}",
        differences.join("\n")
    );
    // The exceptions are still needed: each names a column that exists.
    for (backend, table, column) in ONE_BACKEND_ONLY {
        let schema = if *backend == "sqlite" { &sqlite } else { &postgres };
        assert!(
            schema.get(*table).is_some_and(|c| c.contains_key(*column)),
            "{backend} no longer has {table}.{column}: drop it from ONE_BACKEND_ONLY"
        );
    }
}

/// The newest `limit` events, unfiltered.
fn newest_events(limit: usize) -> relay::store::EventFilter {
    relay::store::EventFilter {
        limit,
        ..Default::default()
    }
}
