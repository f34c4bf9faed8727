//! `relay_ingest_many`, each version of it: the whole ingest of a batch
//! of webhooks as one function (see `ingest`). A version that changes its
//! arguments drops the old one and creates it again whole, as the
//! migrations before it are never edited.
//!
//! What this module must never do: change a released migration (add one).

/// A batch of webhooks' ingests as one statement: the group commit's
/// batch (`ingest`) in one call instead of one per webhook, so the events
/// go in as one multi-row INSERT and the jobs as another, and the executor
/// is started once rather than four times a webhook. It does what
/// `relay_ingest` (V5, dropped here: a relay of an older build refuses this
/// schema, so nothing calls it) did for each event, in the batch's order:
///
/// - The events, inserted in delivery order (two batches holding the same
///   deliveries wait on each other in the same order, not in a circle); a
///   delivery already stored (or earlier in the batch) gives the original's
///   id instead, and nothing more of that event is written.
/// - Each stored event's drops, then its jobs' loop-guard checks, in order:
///   a burst counts the target's jobs in the store and those taken earlier
///   in the batch; a dedupe key is claimed row by row, so a later job of
///   the batch sees an earlier one's. A job held back becomes a drop.
/// - Every drop in that order, then every job taken, then `NOTIFY` once if
///   a job was queued.
///
/// Jobs come grouped by event, in event order (`j_event`, 1-based, as is
/// `d_event`). One row per event, in order: the original's id for a
/// duplicate, and the jobs held back with the rule that held each.
pub(super) const V9: &str = r#"
CREATE FUNCTION relay_ingest_many(
    e_id uuid[], e_source text[], e_delivery text[], e_hook text[], e_content_type text[],
    e_body bytea[], e_payload bytea[], e_hop bigint[], e_summary text[],
    d_event int4[], d_route text[], d_target text[], d_rule text[], d_reason text[],
    lock_class int4, burst_locks int4[],
    j_event int4[], j_id uuid[], j_route text[], j_target text[], j_state text[], j_request text[],
    j_needs_payload boolean[], j_error text[], j_claim uuid[], j_lease bigint[],
    j_repo text[], j_sha text[], j_shadow boolean[], j_report text[],
    j_burst_limit bigint[], j_burst_per bigint[], j_burst_rule text[], j_burst_reason text[],
    j_dedupe_key text[], j_dedupe_window bigint[], j_dedupe_rule text[], j_dedupe_reason text[]
) RETURNS TABLE (original uuid, held uuid[], held_by text[]) LANGUAGE plpgsql AS $fn$
DECLARE
    stored uuid[];
    e int;
    d int := 1;
    i int := 1;
    jobs_in int := coalesce(cardinality(j_id), 0);
    drops_in int := coalesce(cardinality(d_event), 0);
    recent bigint;
    taken bigint;
    held_rule text;
    held_reason text;
    take int[] := '{}';
    take_target text[] := '{}';
    queued boolean := false;
    x_event uuid[] := '{}';
    x_route text[] := '{}';
    x_target text[] := '{}';
    x_rule text[] := '{}';
    x_reason text[] := '{}';
    h_event int4[] := '{}';
    h_id uuid[] := '{}';
    h_rule text[] := '{}';
BEGIN
    WITH inserted AS (
        INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary)
        SELECT u.id, u.source, u.delivery, u.hook, now(), u.content_type, u.body, u.payload, u.hop, u.summary
        FROM unnest(e_id, e_source, e_delivery, e_hook, e_content_type, e_body, e_payload, e_hop, e_summary)
             WITH ORDINALITY AS u(id, source, delivery, hook, content_type, body, payload, hop, summary, n)
        ORDER BY u.source, u.delivery, u.n
        ON CONFLICT (source, delivery) DO NOTHING
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO stored FROM inserted;
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(burst_locks) AS k;
    FOR e IN 1 .. coalesce(cardinality(e_id), 0) LOOP
        IF NOT (e_id[e] = ANY(stored)) THEN
            -- A duplicate: its drops and jobs are not written.
            WHILE d <= drops_in AND d_event[d] = e LOOP d := d + 1; END LOOP;
            WHILE i <= jobs_in AND j_event[i] = e LOOP i := i + 1; END LOOP;
            CONTINUE;
        END IF;
        WHILE d <= drops_in AND d_event[d] = e LOOP
            x_event := x_event || e_id[e];
            x_route := x_route || d_route[d];
            x_target := x_target || d_target[d];
            x_rule := x_rule || d_rule[d];
            x_reason := x_reason || d_reason[d];
            d := d + 1;
        END LOOP;
        WHILE i <= jobs_in AND j_event[i] = e LOOP
            held_rule := NULL;
            IF j_burst_limit[i] IS NOT NULL THEN
                SELECT count(*) INTO recent FROM (
                    SELECT 1 FROM jobs
                    WHERE target = j_target[i] AND created_at > now() - j_burst_per[i] * interval '1 microsecond'
                    LIMIT j_burst_limit[i]) r;
                IF j_burst_per[i] > 0 THEN
                    recent := recent + (SELECT count(*) FROM unnest(take_target) AS t WHERE t = j_target[i]);
                END IF;
                IF recent >= j_burst_limit[i] THEN
                    held_rule := j_burst_rule[i];
                    held_reason := j_burst_reason[i];
                END IF;
            END IF;
            IF held_rule IS NULL AND j_dedupe_key[i] IS NOT NULL THEN
                -- The row lock of ON CONFLICT makes a second relay wait for
                -- the first's verdict.
                INSERT INTO dedupe (target, key, expires_at)
                VALUES (j_target[i], j_dedupe_key[i], now() + j_dedupe_window[i] * interval '1 microsecond')
                ON CONFLICT (target, key) DO UPDATE SET expires_at = EXCLUDED.expires_at
                WHERE dedupe.expires_at <= now();
                GET DIAGNOSTICS taken = ROW_COUNT;
                IF taken = 0 THEN
                    held_rule := j_dedupe_rule[i];
                    held_reason := j_dedupe_reason[i];
                END IF;
            END IF;
            IF held_rule IS NULL THEN
                take := take || i;
                take_target := take_target || j_target[i];
                queued := queued OR j_state[i] = 'queued';
            ELSE
                x_event := x_event || e_id[e];
                x_route := x_route || j_route[i];
                x_target := x_target || j_target[i];
                x_rule := x_rule || held_rule;
                x_reason := x_reason || held_reason;
                h_event := h_event || e;
                h_id := h_id || j_id[i];
                h_rule := h_rule || held_rule;
            END IF;
            i := i + 1;
        END LOOP;
    END LOOP;
    IF cardinality(x_event) > 0 THEN
        INSERT INTO drops (event_id, route, target, rule, reason)
            SELECT x.ev, x.r, x.t, x.ru, x.re
            FROM unnest(x_event, x_route, x_target, x_rule, x_reason) WITH ORDINALITY AS x(ev, r, t, ru, re, n)
            ORDER BY x.n;
    END IF;
    IF cardinality(take) > 0 THEN
        INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error,
                          claim_id, lease_until, created_at, updated_at, repo, sha, shadow, report)
            SELECT j_id[k], e_id[j_event[k]], j_route[k], j_target[k], j_state[k], j_request[k],
                   j_needs_payload[k], now(), j_error[k], j_claim[k],
                   now() + j_lease[k] * interval '1 microsecond', now(), now(),
                   j_repo[k], j_sha[k], j_shadow[k], j_report[k]
            FROM unnest(take) WITH ORDINALITY AS t(k, n)
            ORDER BY t.n;
    END IF;
    IF queued THEN
        PERFORM pg_notify('relay_jobs', '');
    END IF;
    FOR e IN 1 .. coalesce(cardinality(e_id), 0) LOOP
        original := NULL;
        held := '{}';
        held_by := '{}';
        IF NOT (e_id[e] = ANY(stored)) THEN
            SELECT ev.id INTO original FROM events ev WHERE ev.source = e_source[e] AND ev.delivery = e_delivery[e];
        ELSIF e = ANY(h_event) THEN
            SELECT array_agg(h.id ORDER BY h.n), array_agg(h.rule ORDER BY h.n) INTO held, held_by
            FROM unnest(h_event, h_id, h_rule) WITH ORDINALITY AS h(ev, id, rule, n)
            WHERE h.ev = e;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$;
DROP FUNCTION relay_ingest;
"#;

/// Event bodies packed by relay (`store::codec`, as SQLite's are): relay
/// sent each body whole, and the server compressed it (V8). Packed, the
/// benchmark's 7.5 KB push crosses to the server as 913 bytes, and the
/// server no longer decodes, copies and compresses the whole body: in a
/// batch of eight on an idle server, the events' INSERT took 21-25 µs a
/// webhook instead of 37-39. `codec` says how a row's `body` and `payload`
/// are held: 0 as received (every row written before this version,
/// whatever the server did with it), 1 LZ4 with the plain length in front. The columns' storage is `EXTERNAL`:
/// the server stores the bytes as they come, without trying to compress
/// them again. `relay_ingest_many` takes each event's codec beside its
/// body; a relay of an older build refuses this schema, and one still
/// running while it is applied has its ingests refused (its senders retry)
/// rather than stored with the wrong codec.
pub(super) const V15: &str = r#"
ALTER TABLE events ADD COLUMN codec integer NOT NULL DEFAULT 0,
    ALTER COLUMN body SET STORAGE EXTERNAL, ALTER COLUMN payload SET STORAGE EXTERNAL;
DROP FUNCTION relay_ingest_many(
    uuid[], text[], text[], text[], text[], bytea[], bytea[], bigint[], text[],
    int4[], text[], text[], text[], text[], int4, int4[],
    int4[], uuid[], text[], text[], text[], text[], boolean[], text[], uuid[], bigint[],
    text[], text[], boolean[], text[], bigint[], bigint[], text[], text[], text[], bigint[], text[], text[]
);
CREATE FUNCTION relay_ingest_many(
    e_id uuid[], e_source text[], e_delivery text[], e_hook text[], e_content_type text[],
    e_body bytea[], e_payload bytea[], e_codec int4[], e_hop bigint[], e_summary text[],
    d_event int4[], d_route text[], d_target text[], d_rule text[], d_reason text[],
    lock_class int4, burst_locks int4[],
    j_event int4[], j_id uuid[], j_route text[], j_target text[], j_state text[], j_request text[],
    j_needs_payload boolean[], j_error text[], j_claim uuid[], j_lease bigint[],
    j_repo text[], j_sha text[], j_shadow boolean[], j_report text[],
    j_burst_limit bigint[], j_burst_per bigint[], j_burst_rule text[], j_burst_reason text[],
    j_dedupe_key text[], j_dedupe_window bigint[], j_dedupe_rule text[], j_dedupe_reason text[]
) RETURNS TABLE (original uuid, held uuid[], held_by text[]) LANGUAGE plpgsql AS $fn$
DECLARE
    stored uuid[];
    e int;
    d int := 1;
    i int := 1;
    jobs_in int := coalesce(cardinality(j_id), 0);
    drops_in int := coalesce(cardinality(d_event), 0);
    recent bigint;
    taken bigint;
    held_rule text;
    held_reason text;
    take int[] := '{}';
    take_target text[] := '{}';
    queued boolean := false;
    x_event uuid[] := '{}';
    x_route text[] := '{}';
    x_target text[] := '{}';
    x_rule text[] := '{}';
    x_reason text[] := '{}';
    h_event int4[] := '{}';
    h_id uuid[] := '{}';
    h_rule text[] := '{}';
BEGIN
    WITH inserted AS (
        INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, codec, hop, summary)
        SELECT u.id, u.source, u.delivery, u.hook, now(), u.content_type, u.body, u.payload, u.codec, u.hop, u.summary
        FROM unnest(e_id, e_source, e_delivery, e_hook, e_content_type, e_body, e_payload, e_codec, e_hop, e_summary)
             WITH ORDINALITY AS u(id, source, delivery, hook, content_type, body, payload, codec, hop, summary, n)
        ORDER BY u.source, u.delivery, u.n
        ON CONFLICT (source, delivery) DO NOTHING
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO stored FROM inserted;
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(burst_locks) AS k;
    FOR e IN 1 .. coalesce(cardinality(e_id), 0) LOOP
        IF NOT (e_id[e] = ANY(stored)) THEN
            -- A duplicate: its drops and jobs are not written.
            WHILE d <= drops_in AND d_event[d] = e LOOP d := d + 1; END LOOP;
            WHILE i <= jobs_in AND j_event[i] = e LOOP i := i + 1; END LOOP;
            CONTINUE;
        END IF;
        WHILE d <= drops_in AND d_event[d] = e LOOP
            x_event := x_event || e_id[e];
            x_route := x_route || d_route[d];
            x_target := x_target || d_target[d];
            x_rule := x_rule || d_rule[d];
            x_reason := x_reason || d_reason[d];
            d := d + 1;
        END LOOP;
        WHILE i <= jobs_in AND j_event[i] = e LOOP
            held_rule := NULL;
            IF j_burst_limit[i] IS NOT NULL THEN
                SELECT count(*) INTO recent FROM (
                    SELECT 1 FROM jobs
                    WHERE target = j_target[i] AND created_at > now() - j_burst_per[i] * interval '1 microsecond'
                    LIMIT j_burst_limit[i]) r;
                IF j_burst_per[i] > 0 THEN
                    recent := recent + (SELECT count(*) FROM unnest(take_target) AS t WHERE t = j_target[i]);
                END IF;
                IF recent >= j_burst_limit[i] THEN
                    held_rule := j_burst_rule[i];
                    held_reason := j_burst_reason[i];
                END IF;
            END IF;
            IF held_rule IS NULL AND j_dedupe_key[i] IS NOT NULL THEN
                -- The row lock of ON CONFLICT makes a second relay wait for
                -- the first's verdict.
                INSERT INTO dedupe (target, key, expires_at)
                VALUES (j_target[i], j_dedupe_key[i], now() + j_dedupe_window[i] * interval '1 microsecond')
                ON CONFLICT (target, key) DO UPDATE SET expires_at = EXCLUDED.expires_at
                WHERE dedupe.expires_at <= now();
                GET DIAGNOSTICS taken = ROW_COUNT;
                IF taken = 0 THEN
                    held_rule := j_dedupe_rule[i];
                    held_reason := j_dedupe_reason[i];
                END IF;
            END IF;
            IF held_rule IS NULL THEN
                take := take || i;
                take_target := take_target || j_target[i];
                queued := queued OR j_state[i] = 'queued';
            ELSE
                x_event := x_event || e_id[e];
                x_route := x_route || j_route[i];
                x_target := x_target || j_target[i];
                x_rule := x_rule || held_rule;
                x_reason := x_reason || held_reason;
                h_event := h_event || e;
                h_id := h_id || j_id[i];
                h_rule := h_rule || held_rule;
            END IF;
            i := i + 1;
        END LOOP;
    END LOOP;
    IF cardinality(x_event) > 0 THEN
        INSERT INTO drops (event_id, route, target, rule, reason)
            SELECT x.ev, x.r, x.t, x.ru, x.re
            FROM unnest(x_event, x_route, x_target, x_rule, x_reason) WITH ORDINALITY AS x(ev, r, t, ru, re, n)
            ORDER BY x.n;
    END IF;
    IF cardinality(take) > 0 THEN
        INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error,
                          claim_id, lease_until, created_at, updated_at, repo, sha, shadow, report)
            SELECT j_id[k], e_id[j_event[k]], j_route[k], j_target[k], j_state[k], j_request[k],
                   j_needs_payload[k], now(), j_error[k], j_claim[k],
                   now() + j_lease[k] * interval '1 microsecond', now(), now(),
                   j_repo[k], j_sha[k], j_shadow[k], j_report[k]
            FROM unnest(take) WITH ORDINALITY AS t(k, n)
            ORDER BY t.n;
    END IF;
    IF queued THEN
        PERFORM pg_notify('relay_jobs', '');
    END IF;
    FOR e IN 1 .. coalesce(cardinality(e_id), 0) LOOP
        original := NULL;
        held := '{}';
        held_by := '{}';
        IF NOT (e_id[e] = ANY(stored)) THEN
            SELECT ev.id INTO original FROM events ev WHERE ev.source = e_source[e] AND ev.delivery = e_delivery[e];
        ELSIF e = ANY(h_event) THEN
            SELECT array_agg(h.id ORDER BY h.n), array_agg(h.rule ORDER BY h.n) INTO held, held_by
            FROM unnest(h_event, h_id, h_rule) WITH ORDINALITY AS h(ev, id, rule, n)
            WHERE h.ev = e;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$;
"#;
