//! A full disk under a running relay: its SQLite store on a small tmpfs.
//! Webhooks are answered 503 with `Retry-After` once nothing more fits,
//! nothing is acknowledged that is not stored, relay keeps running, and
//! once there is room again (the tmpfs grown, no restart) everything it
//! acknowledged is delivered and new webhooks are taken.
//!
//! Mounting needs root: built as ignored elsewhere (`relay_root_tests`, set
//! by build.rs), never counted as passed without running.

use std::time::Duration;

use crate::support::{MockServer, Relay, Reply, sign};

const SECRET: &str = "gh-webhook-secret-0123456789";

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed (this test needs root)");
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A push whose body does not compress: a big commit message of hex. (Its
/// sha is never all zeros, which would make it a branch deletion.)
fn push(n: usize) -> Vec<u8> {
    let sha = format!("{:0>40x}", n + 1);
    let noise: String = (0..40_000u32)
        .map(|i| format!("{:x}", (i.wrapping_mul(2_654_435_761) ^ n as u32) % 16))
        .collect();
    serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": {"full_name": "acme/api", "html_url": "https://github.com/acme/api"},
        "pusher": {"name": "ada"}, "commits": [],
        "head_commit": {"id": sha, "message": noise, "added": [], "modified": [], "removed": []}
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_root_tests),
    ignore = "mounting a tmpfs needs root; this build does not run as root"
)]
async fn a_full_disk_is_a_503_and_everything_acknowledged_is_delivered_once_there_is_room() {
    let disk = Tmpfs::mount("1m");
    // Triggers wait for the disk to fill: the target answers once let go.
    let circle = MockServer::start(Reply::new(
        201,
        r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","number":1}"#,
    ))
    .await;
    let db = disk.dir.path().join("relay.db");
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[admin]
listen = "127.0.0.1:0"

[store]
url = "sqlite://{}"

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "builds"
to = ["app"]

[targets.app]
kind = "circleci"
base_url = "{}"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"

[loop_guard]
dedupe_window = "0s"
"#,
        db.display(),
        circle.url()
    );
    let relay = Relay::start_with(tempfile::tempdir().unwrap(), &text).await;
    let mut acknowledged = 0;
    let mut refused = None;
    // Bounded: 1 MiB fills long before 200 webhooks of 40 KB.
    for n in 0..200 {
        let body = push(n);
        let headers = sign::github(SECRET, "push", &format!("d-{n}"), &body);
        let (status, answer) = relay.post("/hooks/github", &headers, body).await;
        match status {
            202 => acknowledged += 1,
            503 => {
                refused = Some(answer);
                break;
            }
            other => panic!("webhook {n}: {other} {answer}"),
        }
    }
    let refused = refused.expect("the disk never filled");
    assert_eq!(refused["error"], "store_unavailable", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("full"),
        "says the disk is full: {refused}"
    );
    assert!(acknowledged > 0, "some fitted before the disk filled");
    // Still running: the probes answer.
    let health = crate::support::api_get(relay.admin.unwrap(), "/healthz").await;
    assert_eq!(health["status"], "ok");

    // Room again, without a restart.
    disk.resize("64m");
    let mut more = 0;
    for n in 1000..1005 {
        let body = push(n);
        let headers = sign::github(SECRET, "push", &format!("d-{n}"), &body);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, answer) = relay.post("/hooks/github", &headers, body.clone()).await;
            if status == 202 {
                more += 1;
                break;
            }
            assert_eq!(status, 503, "{answer}");
            assert!(
                std::time::Instant::now() < deadline,
                "never taken again: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(more, 5);
    // Everything acknowledged is delivered, each once.
    relay.wait_done(acknowledged + 5).await;
    let triggers = circle.requests();
    assert_eq!(
        triggers.len(),
        acknowledged + 5,
        "each acknowledged webhook triggered once"
    );
    eprintln!("full disk: {acknowledged} acknowledged before the 503, all delivered once there was room");
    relay.stop().await;
}
