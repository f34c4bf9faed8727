//! The PostgreSQL schema's migrations, one a version, as SQL: what each
//! changed and why. `schema` applies them. The versions of the batch ingest
//! function, `relay_ingest_many`, are in `ingest_many`.
//!
//! What this module must never do: change a released migration (add one).

mod ingest_many;

use ingest_many::{V9, V15};

/// The schema, one migration per version, applied in order inside one
/// transaction; `relay_schema` records how far a database has come. Never
/// edit a released entry: add one.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, V13, V14, V15];

/// The schema version this build migrates a database to (`relay --version`).
pub(crate) const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The tables and semantics of the SQLite schema (its V1 to V3), in native
/// types. `drops.id` only keeps a drop list in the order it was written.
const V1: &str = "
CREATE TABLE events (
    id           uuid PRIMARY KEY,
    source       text NOT NULL,
    delivery     text,
    hook         text NOT NULL,
    received_at  timestamptz NOT NULL,
    content_type text NOT NULL,
    body         bytea NOT NULL,
    payload      bytea,
    hop          bigint NOT NULL,
    summary      text NOT NULL,
    UNIQUE (source, delivery)
);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE jobs (
    id             uuid PRIMARY KEY,
    event_id       uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route          text NOT NULL,
    target         text NOT NULL,
    state          text NOT NULL CHECK (state IN ('queued', 'in_flight', 'done', 'dead')),
    request        text,
    needs_payload  boolean NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    maybe_attempts integer NOT NULL DEFAULT 0,
    due_at         timestamptz NOT NULL,
    claim_id       uuid,
    lease_until    timestamptz,
    last_error     text,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE INDEX jobs_created ON jobs (target, created_at);
CREATE INDEX jobs_queued ON jobs (target, due_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (target, lease_until) WHERE state = 'in_flight';
CREATE TABLE attempts (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number      integer NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms bigint NOT NULL,
    status      integer,
    outcome     text NOT NULL,
    excerpt     text NOT NULL,
    PRIMARY KEY (job_id, number)
);
CREATE TABLE drops (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route    text,
    target   text,
    rule     text NOT NULL,
    reason   text NOT NULL
);
CREATE INDEX drops_event ON drops (event_id);
CREATE TABLE dedupe (
    target     text NOT NULL,
    key        text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (target, key)
);
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
";

/// The pipeline a job's trigger started (SQLite's V6).
const V2: &str = "
ALTER TABLE jobs
    ADD COLUMN pipeline_id text,
    ADD COLUMN pipeline_number bigint,
    ADD COLUMN pipeline_url text,
    ADD COLUMN pipeline_state text,
    ADD COLUMN pipeline_updated_at timestamptz;
CREATE INDEX jobs_pipeline ON jobs (pipeline_id) WHERE pipeline_id IS NOT NULL;
";

/// Following a pipeline by polling its CI (SQLite's V7).
const V3: &str = "
ALTER TABLE jobs
    ADD COLUMN follow_due timestamptz,
    ADD COLUMN follow_until timestamptz,
    ADD COLUMN follow_polls integer NOT NULL DEFAULT 0,
    ADD COLUMN follow_note text;
CREATE INDEX jobs_follow ON jobs (target, follow_due) WHERE follow_due IS NOT NULL;
";

/// Reporting back and shadow runs (SQLite's V8).
const V4: &str = "
ALTER TABLE jobs
    ADD COLUMN repo text,
    ADD COLUMN sha text,
    ADD COLUMN shadow boolean NOT NULL DEFAULT false,
    ADD COLUMN report text,
    ADD COLUMN report_of uuid;
CREATE INDEX jobs_shadow ON jobs (route, created_at) WHERE shadow;
";

/// The whole ingest of one webhook as one function, so that committing it
/// is one statement and one round trip (`queue::ingest`): the event (or,
/// for a delivery already stored, the original's id), the drops the guard
/// decided, the per-target burst locks, each job's burst count and dedupe
/// key in the guard's order (a job held back becomes a drop, with the
/// wording the caller passed), the jobs, and `NOTIFY` when one is queued.
/// It runs in the statement's own transaction; `now()` is its start, as it
/// was for the transaction it replaces.
const V5: &str = r#"
CREATE FUNCTION relay_ingest(
    e_id uuid, e_source text, e_delivery text, e_hook text, e_content_type text,
    e_body bytea, e_payload bytea, e_hop bigint, e_summary text,
    d_route text[], d_target text[], d_rule text[], d_reason text[],
    lock_class int4, burst_locks int4[],
    j_id uuid[], j_route text[], j_target text[], j_state text[], j_request text[],
    j_needs_payload boolean[], j_error text[], j_claim uuid[], j_lease bigint[],
    j_repo text[], j_sha text[], j_shadow boolean[], j_report text[],
    j_burst_limit bigint[], j_burst_per bigint[], j_burst_rule text[], j_burst_reason text[],
    j_dedupe_key text[], j_dedupe_window bigint[], j_dedupe_rule text[], j_dedupe_reason text[]
) RETURNS TABLE (original uuid, held uuid[], held_by text[]) LANGUAGE plpgsql AS $fn$
DECLARE
    i int;
    recent bigint;
    taken bigint;
    queued boolean := false;
BEGIN
    held := '{}';
    held_by := '{}';
    INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary)
    VALUES (e_id, e_source, e_delivery, e_hook, now(), e_content_type, e_body, e_payload, e_hop, e_summary)
    ON CONFLICT (source, delivery) DO NOTHING;
    IF NOT FOUND THEN
        -- Another relay may have committed this delivery a moment ago: the
        -- unique key decided, and its event id is the answer.
        SELECT id INTO original FROM events WHERE source = e_source AND delivery = e_delivery;
        RETURN NEXT;
        RETURN;
    END IF;
    INSERT INTO drops (event_id, route, target, rule, reason)
        SELECT e_id, d.r, d.t, d.ru, d.re
        FROM unnest(d_route, d_target, d_rule, d_reason) WITH ORDINALITY AS d(r, t, ru, re, n)
        ORDER BY d.n;
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(burst_locks) AS k;
    FOR i IN 1 .. coalesce(cardinality(j_id), 0) LOOP
        IF j_burst_limit[i] IS NOT NULL THEN
            SELECT count(*) INTO recent FROM (
                SELECT 1 FROM jobs
                WHERE target = j_target[i] AND created_at > now() - j_burst_per[i] * interval '1 microsecond'
                LIMIT j_burst_limit[i]) r;
            IF recent >= j_burst_limit[i] THEN
                INSERT INTO drops (event_id, route, target, rule, reason)
                VALUES (e_id, j_route[i], j_target[i], j_burst_rule[i], j_burst_reason[i]);
                held := held || j_id[i];
                held_by := held_by || j_burst_rule[i];
                CONTINUE;
            END IF;
        END IF;
        IF j_dedupe_key[i] IS NOT NULL THEN
            -- The row lock of ON CONFLICT makes a second relay wait for the
            -- first's verdict.
            INSERT INTO dedupe (target, key, expires_at)
            VALUES (j_target[i], j_dedupe_key[i], now() + j_dedupe_window[i] * interval '1 microsecond')
            ON CONFLICT (target, key) DO UPDATE SET expires_at = EXCLUDED.expires_at
            WHERE dedupe.expires_at <= now();
            GET DIAGNOSTICS taken = ROW_COUNT;
            IF taken = 0 THEN
                INSERT INTO drops (event_id, route, target, rule, reason)
                VALUES (e_id, j_route[i], j_target[i], j_dedupe_rule[i], j_dedupe_reason[i]);
                held := held || j_id[i];
                held_by := held_by || j_dedupe_rule[i];
                CONTINUE;
            END IF;
        END IF;
        INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error,
                          claim_id, lease_until, created_at, updated_at, repo, sha, shadow, report)
        VALUES (j_id[i], e_id, j_route[i], j_target[i], j_state[i], j_request[i], j_needs_payload[i], now(),
                j_error[i], j_claim[i], now() + j_lease[i] * interval '1 microsecond', now(), now(),
                j_repo[i], j_sha[i], j_shadow[i], j_report[i]);
        queued := queued OR j_state[i] = 'queued';
    END LOOP;
    IF queued THEN
        PERFORM pg_notify('relay_jobs', '');
    END IF;
    RETURN NEXT;
END
$fn$;
"#;

/// The next wake-up's minimum over every target, from an index's first
/// entry instead of a read of every queued job (SQLite's V9).
const V6: &str = "
CREATE INDEX jobs_due ON jobs (due_at) WHERE state = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'in_flight';
";

/// A finished trigger (or its CI's completion) marks the trigger's
/// still-waiting reports superseded; without this index that read every
/// queued job (SQLite's V10).
const V7: &str = "
CREATE INDEX jobs_report_of ON jobs (report_of) WHERE report_of IS NOT NULL;
";

/// Bodies compressed with LZ4 rather than PostgreSQL's own pglz: a 7 KB
/// push is compressed on every ingest, and pglz made that a seventh of the
/// server's work (measured: 2,122 against 2,419 webhooks/s at c32). Values
/// already stored keep their compression. A server built without LZ4, or
/// older than PostgreSQL 14, keeps pglz (a warning in the server's log, not
/// an error).
const V8: &str = "
DO $$
BEGIN
    EXECUTE 'ALTER TABLE events ALTER COLUMN body SET COMPRESSION lz4, ALTER COLUMN payload SET COMPRESSION lz4';
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'relay: event bodies stay compressed with pglz: %', SQLERRM;
END
$$;
";

/// The job counts `/metrics` and the status page read, kept as the jobs
/// change instead of counted from every row on each read: with 14 days of
/// history that count read millions of rows (0.4-0.7 s at two million
/// jobs) on every scrape and page load (SQLite's V10).
///
/// Each statement that inserts, updates or deletes jobs appends what it
/// moved between states, one row per statement, to `job_count_deltas`: a
/// statement-level trigger over the statement's transition tables, which
/// also hold what foreign keys cascade (a purge's deletes). Inserted rows
/// count in and deleted ones out (one function, the trigger's argument the
/// sign); an update counts its new rows in and its old ones out. Appending takes
/// no lock another writer waits on; whoever reads the counts folds the
/// deltas into the one row of `job_counts` (`views::queue_stats`), so no
/// two folds lock rows in different orders. The triggers come before the
/// first count: creating them waits for writers in progress and holds new
/// ones off until this migration commits.
const V10: &str = "
CREATE TABLE job_counts (
    queued bigint NOT NULL, in_flight bigint NOT NULL, done bigint NOT NULL, dead bigint NOT NULL
);
CREATE TABLE job_count_deltas (
    queued bigint NOT NULL, in_flight bigint NOT NULL, done bigint NOT NULL, dead bigint NOT NULL
);
CREATE FUNCTION relay_count_jobs_in_or_out() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sign bigint := TG_ARGV[0]::bigint;
BEGIN
    INSERT INTO job_count_deltas
    SELECT sign * count(*) FILTER (WHERE state = 'queued'), sign * count(*) FILTER (WHERE state = 'in_flight'),
           sign * count(*) FILTER (WHERE state = 'done'), sign * count(*) FILTER (WHERE state = 'dead')
    FROM changed HAVING count(*) > 0;
    RETURN NULL;
END
$$;
CREATE FUNCTION relay_count_updated_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_count_deltas
    SELECT * FROM (
        SELECT COALESCE(sum(d) FILTER (WHERE state = 'queued'), 0),
               COALESCE(sum(d) FILTER (WHERE state = 'in_flight'), 0),
               COALESCE(sum(d) FILTER (WHERE state = 'done'), 0),
               COALESCE(sum(d) FILTER (WHERE state = 'dead'), 0)
        FROM (SELECT state, 1 AS d FROM updated UNION ALL SELECT state, -1 FROM replaced) AS moves
    ) AS delta (queued, in_flight, done, dead)
    WHERE (queued, in_flight, done, dead) <> (0, 0, 0, 0);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION relay_count_jobs_in_or_out('1');
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION relay_count_jobs_in_or_out('-1');
CREATE TRIGGER jobs_counted_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS replaced NEW TABLE AS updated FOR EACH STATEMENT
    EXECUTE FUNCTION relay_count_updated_jobs();
INSERT INTO job_counts
SELECT count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'in_flight'),
       count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'dead')
FROM jobs;
";

/// A claim id names one lease: a job has one exactly while it is in
/// flight. The statements that end a lease find the job by id and claim
/// alone, and this check is what lets them leave `state = 'in_flight'` out.
/// With it in, PostgreSQL's planner took the small partial indexes on
/// in-flight jobs (`jobs_leased`, `jobs_lease`) over the primary key and
/// read every entry in them, those of jobs finished since the last vacuum
/// included: under load, hundreds of heap pages for each batch of finished
/// sends (a third of the server's time), where one key lookup a job does.
/// `NOT VALID`: the rows already written kept the rule (every statement
/// that ends a lease clears its claim), and checking them would read the
/// whole table while relay starts.
const V11: &str = "
ALTER TABLE jobs ADD CONSTRAINT jobs_claimed_in_flight
    CHECK ((claim_id IS NOT NULL) = (state = 'in_flight')) NOT VALID;
";

/// A claim walks its own target's jobs (`jobs_queued`, `jobs_leased`).
/// Given V6's indexes over every target, the planner took `jobs_due` for a
/// claim's `ORDER BY due_at` and read past every other target's due jobs:
/// 44-62 ms a claim with 200,000 jobs due for one target and 20,000 for
/// another, and growing with the first. Both indexes now also say what
/// V11 makes true of every queued and in-flight job, about its claim. A
/// claim does not say it, so it cannot use them; the readers that do (the
/// next wake-up, the oldest due job) still answer from their first entry.
const V12: &str = "
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (due_at) WHERE state = 'queued' AND claim_id IS NULL;
DROP INDEX jobs_lease;
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'in_flight' AND claim_id IS NOT NULL;
";

/// Dedupe keys are forgotten oldest first, a bounded batch at a time: the
/// purge used to read the whole table and delete every expired key in one
/// statement, a transaction the size of a busy hour's triggers.
const V13: &str = "
CREATE INDEX dedupe_expiry ON dedupe (expires_at);
";

/// The pipeline lookup split as SQLite's schema V15 (which says why): a
/// random id behind its pipeline's number, a plain-number id by itself.
/// `queue::correlate` reads both with these same conditions.
const V14: &str = "
DROP INDEX jobs_pipeline;
CREATE INDEX jobs_pipeline ON jobs (pipeline_id)
    WHERE pipeline_id IS NOT NULL AND NOT (pipeline_id ~ '[^0-9]' AND pipeline_number IS NOT NULL);
CREATE INDEX jobs_pipeline_numbered ON jobs (pipeline_number, pipeline_id)
    WHERE pipeline_id ~ '[^0-9]' AND pipeline_number IS NOT NULL;
";
