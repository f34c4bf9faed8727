//! A queue filled directly through relay's own store, as ingest would fill
//! it, without HTTP: the delivery and queue-depth measurements start from
//! it. Never runs while a relay holds the same file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use relay::guard::JobLimits;
use relay::request::{Auth, PreparedRequest, RequestBody};
use relay::store::{NewEvent, NewJob, Queue, SqliteStore};

/// Events committed at once: the store's writer groups them into one
/// transaction and one fsync, as it does concurrent webhooks.
const CHUNK: usize = 500;

/// What a fill did.
#[derive(Debug, Clone, Copy)]
pub struct Filled {
    /// Jobs queued (one per event).
    pub jobs: usize,
    pub secs: f64,
    /// Whether `budget` ran out before every job was queued.
    pub cut_short: bool,
}

/// The jobs' target: its name in relay's config and the address its
/// requests go to.
#[derive(Debug, Clone, Copy)]
pub struct JobTarget<'a> {
    pub name: &'a str,
    pub addr: SocketAddr,
}

/// Queues `count` jobs for `target` in the SQLite store at `db`, one event
/// each, through relay's own store as ingest would; stops at a whole chunk
/// once `budget` has passed. `tag` keeps delivery ids apart between fills of
/// one file.
pub async fn fill(
    db: &Path,
    count: usize,
    target: JobTarget<'_>,
    tag: &str,
    budget: Duration,
) -> Result<Filled, String> {
    let store = Arc::new(SqliteStore::open(db).map_err(|e| e.to_string())?);
    let body = Bytes::from_static(br#"{"ref":"refs/heads/main"}"#);
    let started = Instant::now();
    let mut queued = 0;
    let mut pending = Vec::with_capacity(CHUNK);
    while queued < count {
        if started.elapsed() > budget {
            break;
        }
        let this = CHUNK.min(count - queued);
        for n in queued..queued + this {
            let store = store.clone();
            let event = event(body.clone(), target, format!("backlog-{tag}-{n}"));
            pending.push(tokio::spawn(async move { store.ingest(event).await }));
        }
        for task in pending.drain(..) {
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        queued += this;
    }
    Ok(Filled {
        jobs: queued,
        secs: started.elapsed().as_secs_f64(),
        cut_short: queued < count,
    })
}

/// One push event with its one job, as relay's accept path commits it.
fn event(body: Bytes, target: JobTarget<'_>, delivery: String) -> NewEvent {
    let addr = target.addr;
    NewEvent {
        id: uuid::Uuid::now_v7(),
        source: "github".to_owned(),
        delivery: Some(delivery),
        hook: "push".to_owned(),
        content_type: "application/json".to_owned(),
        body,
        payload: None,
        hop: 0,
        received_at: SystemTime::now(),
        summary: "{}".to_owned(),
        jobs: vec![NewJob {
            id: uuid::Uuid::now_v7(),
            route: "builds".to_owned(),
            target: target.name.to_owned(),
            request: Ok(PreparedRequest {
                url: format!("http://{addr}/api/v2/project/gh/acme/api/pipeline"),
                headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
                body: RequestBody::Text(r#"{"branch":"main"}"#.to_owned()),
                auth: Auth::Header {
                    name: "Circle-Token".to_owned(),
                },
            }),
            limits: JobLimits::default(),
            lease: None,
            repo: "acme/api".to_owned(),
            sha: "2222222222222222222222222222222222222222".to_owned(),
            shadow: false,
            report: None,
        }],
        drops: Vec::new(),
    }
}
