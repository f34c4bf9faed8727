//! The servers the harness runs itself: the two hyper baselines (as a
//! separate process, so their CPU and memory are their own) and the mock
//! CircleCI that relay triggers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Response = http::Response<Full<Bytes>>;

fn respond(status: u16, body: impl Into<Bytes>) -> Response {
    let mut response = http::Response::new(Full::new(body.into()));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    response
}

/// CircleCI's `201` to a trigger: a pipeline of its own, as the real one
/// answers (PROTOCOLS B1). Its id is a random UUID, so relay's index of
/// pipeline ids takes each at a random place, as in production; one id for
/// every trigger would append them all at one spot and hide that write.
fn pipeline_created(number: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{}","state":"created","number":{number},"created_at":"2026-11-22T10:00:00Z"}}"#,
        uuid::Uuid::new_v4()
    ))
}

/// Which baseline to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// Answer 200 without reading the body.
    Ceiling,
    /// Read the body, check `X-Hub-Signature-256`, parse the JSON.
    Verify,
}

/// What the verify baseline reads of the push: a typed parse, like relay's.
#[derive(serde::Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
}

/// Serves a baseline until the process is killed.
pub async fn serve_baseline(port: u16, which: Baseline, secret: Arc<[u8]>) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let secret = secret.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let secret = secret.clone();
                async move {
                    if which == Baseline::Ceiling {
                        return Ok::<_, Infallible>(respond(200, ""));
                    }
                    let presented = request
                        .headers()
                        .get("x-hub-signature-256")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("sha256="))
                        .and_then(|v| hex::decode(v).ok())
                        .unwrap_or_default();
                    let body = match request.into_body().collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => return Ok(respond(400, "unreadable")),
                    };
                    let key = relay::secret::Secret::from_bytes(secret.to_vec(), "bench");
                    if !relay::signature::verify(
                        relay::signature::Algorithm::Sha256,
                        &key,
                        &[&body],
                        &presented,
                    ) {
                        return Ok(respond(401, "bad signature"));
                    }
                    match serde_json::from_slice::<Push>(&body) {
                        Ok(push) if !push.git_ref.is_empty() => Ok(respond(200, "")),
                        _ => Ok(respond(400, "bad payload")),
                    }
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The mock CircleCI: answers 201 and notes when each delivery's trigger
/// arrived (relay puts the delivery id in a pipeline parameter).
#[derive(Debug, Clone, Default)]
pub struct MockCircle {
    pub arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    pub count: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(serde::Deserialize)]
struct Trigger {
    #[serde(default)]
    parameters: HashMap<String, serde_json::Value>,
}

impl MockCircle {
    pub async fn start(self, record: bool) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let mock = self.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let mock = mock.clone();
                        async move {
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let at = Instant::now();
                            let number = mock.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            if record
                                && let Ok(trigger) = serde_json::from_slice::<Trigger>(&body)
                                && let Some(serde_json::Value::String(d)) = trigger.parameters.get("delivery")
                                && let Ok(mut arrivals) = mock.arrivals.lock()
                            {
                                arrivals.insert(d.clone(), at);
                            }
                            Ok::<_, Infallible>(respond(201, pipeline_created(number)))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(addr)
    }
}

/// A CI that is down without refusing: each trigger is held, unanswered,
/// until the harness releases one, and when each arrived is noted. Relay's
/// jobs for it stay queued while it holds its one send slot.
#[derive(Debug, Clone)]
pub struct MockPaused {
    /// A permit answers one held trigger 201.
    pub release: Arc<tokio::sync::Semaphore>,
    /// While it has permits, every trigger is answered 503 at once, held
    /// ones too (so relay can stop without waiting out a send).
    refuse: Arc<tokio::sync::Semaphore>,
    pub arrivals: Arc<Mutex<Vec<Instant>>>,
    /// Triggers arrived and not answered yet.
    pub held: Arc<std::sync::atomic::AtomicUsize>,
    /// Triggers answered 201: the pipelines' numbers.
    answered: Arc<std::sync::atomic::AtomicUsize>,
    /// Told of every arrival (a permit is kept when nobody waits).
    pub arrival: Arc<tokio::sync::Notify>,
}

impl MockPaused {
    pub fn new() -> MockPaused {
        MockPaused {
            release: Arc::new(tokio::sync::Semaphore::new(0)),
            refuse: Arc::new(tokio::sync::Semaphore::new(0)),
            arrivals: Arc::default(),
            held: Arc::default(),
            answered: Arc::default(),
            arrival: Arc::default(),
        }
    }

    /// Answers every trigger 503 from now on (`true`), or holds them again.
    pub fn refuse(&self, refuse: bool) {
        if refuse {
            self.refuse.add_permits(tokio::sync::Semaphore::MAX_PERMITS >> 4);
        } else {
            self.refuse.forget_permits(usize::MAX);
        }
    }

    pub async fn start(self) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let mock = self.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let mock = mock.clone();
                        async move {
                            let _ = request.into_body().collect().await;
                            let at = Instant::now();
                            if let Ok(mut arrivals) = mock.arrivals.lock() {
                                arrivals.push(at);
                            }
                            mock.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            mock.arrival.notify_one();
                            let released = tokio::select! {
                                permit = mock.release.acquire() => permit.map(|p| p.forget()).is_ok(),
                                _ = mock.refuse.acquire() => false,
                            };
                            mock.held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            if released {
                                let number =
                                    mock.answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                                Ok::<_, Infallible>(respond(201, pipeline_created(number)))
                            } else {
                                Ok(respond(503, "paused"))
                            }
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each trigger gets a pipeline of its own, as CircleCI answers: a
    /// random (v4) id never given before, and the next number.
    #[tokio::test]
    async fn the_mock_circleci_answers_each_trigger_with_a_pipeline_of_its_own() {
        let mock = MockCircle::default();
        let addr = mock.clone().start(false).await.expect("mock starts");
        let client = relay::sends::http_client(std::time::Duration::from_secs(5)).expect("client");
        let mut pipelines = Vec::new();
        for _ in 0..2 {
            let answer = client
                .post(format!("http://{addr}/api/v2/project/gh/acme/api/pipeline"))
                .body("{}")
                .send()
                .await
                .expect("the mock answers");
            assert_eq!(answer.status(), 201);
            let body: serde_json::Value =
                serde_json::from_slice(&answer.bytes().await.expect("body")).expect("JSON");
            pipelines.push(body);
        }
        let id =
            |n: usize| uuid::Uuid::parse_str(pipelines[n]["id"].as_str().expect("an id")).expect("a UUID");
        assert_eq!(id(0).get_version_num(), 4);
        assert_eq!(id(1).get_version_num(), 4);
        assert_ne!(id(0), id(1), "two triggers, one pipeline id");
        assert_eq!(pipelines[0]["number"], 1);
        assert_eq!(pipelines[1]["number"], 2);
        assert_eq!(pipelines[0]["state"], "created");
        assert_eq!(mock.count.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
