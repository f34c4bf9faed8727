//! The SQLite store's file under a running relay: removed (or replaced),
//! relay answers 503 naming it and acknowledges nothing (a removed file
//! would take what it acknowledged with it), keeps running, and takes
//! webhooks again once the file is back. A second relay on the same file is
//! refused with a message saying so.

use crate::support::{MockServer, Relay, Reply, api_get, sign};

const SECRET: &str = "gh-webhook-secret-0123456789";

fn config(circle: &str) -> String {
    format!(
        r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "builds"
to = ["app"]

[targets.app]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"
"#
    )
}

fn push(n: u64) -> Vec<u8> {
    let sha = format!("{n:0>40x}");
    serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": {"full_name": "acme/api", "html_url": "https://github.com/acme/api"},
        "pusher": {"name": "ada"}, "commits": [],
        "head_commit": {"id": sha, "message": "work", "added": [], "modified": [], "removed": []}
    })
    .to_string()
    .into_bytes()
}

async fn post(relay: &Relay, n: u64) -> (u16, serde_json::Value) {
    let body = push(n);
    let headers = sign::github(SECRET, "push", &format!("d-{n}"), &body);
    relay.post("/hooks/github", &headers, body).await
}

#[tokio::test]
async fn a_store_file_removed_under_relay_is_a_503_until_it_is_back() {
    let circle = MockServer::start(Reply::new(
        201,
        r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","number":1}"#,
    ))
    .await;
    let relay = Relay::start(&config(&circle.url())).await;
    assert_eq!(post(&relay, 1).await.0, 202);
    let db = relay.db_path();
    let kept = db.with_extension("kept");
    std::fs::hard_link(&db, &kept).unwrap();
    std::fs::remove_file(&db).unwrap();

    let (status, answer) = post(&relay, 2).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"], "store_unavailable");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "the store file {} was removed or replaced while relay runs",
            db.display()
        )),
        "{message}"
    );
    // Running, and saying it is not ready.
    assert_eq!(api_get(relay.admin.unwrap(), "/healthz").await["status"], "ok");
    let ready = crate::support::test_client()
        .get(format!("http://{}/readyz", relay.admin.unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    // Put back: taken again, and the refused one is taken on its retry.
    std::fs::rename(&kept, &db).unwrap();
    assert_eq!(post(&relay, 2).await.0, 202);
    relay.wait_done(2).await;
    assert_eq!(circle.requests().len(), 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_second_relay_on_the_same_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let first = relay::store::SqliteStore::open(&db, std::time::SystemTime::now()).unwrap();
    let second = relay::store::SqliteStore::open(&db, std::time::SystemTime::now())
        .unwrap_err()
        .to_string();
    assert!(
        second.contains(
            "another relay is using this database; each relay needs its own sqlite file (or share a postgres:// store)"
        ),
        "{second}"
    );
    drop(first);
    assert!(
        relay::store::SqliteStore::open(&db, std::time::SystemTime::now()).is_ok(),
        "free once the first is gone"
    );
}
