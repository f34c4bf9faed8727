//! A queue filled directly through relay's own store, as ingest would fill
//! it, without HTTP: the delivery and queue-depth measurements start from
//! it. Never runs while a relay holds the same file.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::BACKLOG;

/// Queues `BACKLOG` jobs through relay's own store, as ingest would.
pub async fn fill_backlog(db: &Path, circle: std::net::SocketAddr) -> Result<(), String> {
    use relay::guard::JobLimits;
    use relay::request::{Auth, PreparedRequest, RequestBody};
    use relay::store::{NewEvent, NewJob, Queue, SqliteStore};
    let store = SqliteStore::open(db).map_err(|e| e.to_string())?;
    let body = Bytes::from_static(br#"{"ref":"refs/heads/main"}"#);
    let mut pending = Vec::new();
    let store = Arc::new(store);
    for chunk in 0..(BACKLOG / 500) {
        for n in 0..500 {
            let store = store.clone();
            let event = NewEvent {
                id: uuid::Uuid::now_v7(),
                source: "github".to_owned(),
                delivery: Some(format!("backlog-{chunk}-{n}")),
                hook: "push".to_owned(),
                content_type: "application/json".to_owned(),
                body: body.clone(),
                payload: None,
                hop: 0,
                received_at: SystemTime::now(),
                summary: "{}".to_owned(),
                jobs: vec![NewJob {
                    id: uuid::Uuid::now_v7(),
                    route: "builds".to_owned(),
                    target: "circleci".to_owned(),
                    request: Ok(PreparedRequest {
                        url: format!("http://{circle}/api/v2/project/gh/acme/api/pipeline"),
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
            };
            pending.push(tokio::spawn(async move { store.ingest(event).await }));
        }
        for task in pending.drain(..) {
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
