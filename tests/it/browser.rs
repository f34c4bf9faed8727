//! The status pages in a real browser: Debian's headless Chromium, driven
//! by chromedriver over the WebDriver protocol, against the relay binary
//! started as a process on loopback with a mock CI target. It checks the
//! rows, proves that a hostile push's markup stayed text (no script of it
//! ran), clicks a dead job's retry button and sees the job queued, and
//! saves a screenshot of the overview (`target/browser/overview.png`).
//!
//! Without Chromium and chromedriver the test says `skipped (browser)` and
//! returns; with `RELAY_BROWSER_TEST=required` (CI) it fails instead.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Daemon, MockServer, PATIENCE, Reply, sign, test_client};

const SECRET: &str = "browser-secret";
const TOKEN: &str = "browser-admin-token-5b2e";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CREATED: &str = r#"{"id":"7a1e7b52-93a4-4bb5-9d0c-3f1f8a0e2b11","state":"created","number":42}"#;
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver, ended with the test.
struct Driver {
    child: Child,
    base: String,
    session: String,
    client: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Ending the session closes Chromium: killing chromedriver alone
        // would leave the browser running, orphaned. A plain blocking
        // request, since a drop cannot await.
        if !self.session.is_empty()
            && let Some(addr) = self.base.strip_prefix("http://")
            && let Ok(mut stream) = std::net::TcpStream::connect(addr)
        {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(profile: &std::path::Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let client = test_client();
        let deadline = Instant::now() + PATIENCE;
        while client.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut driver = Driver {
            child,
            base,
            session: String::new(),
            client,
        };
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let answer = driver
            .call(
                reqwest::Method::POST,
                "/session",
                json!({ "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args }
                } } }),
            )
            .await;
        driver.session = answer["sessionId"].as_str().expect("a session").to_owned();
        driver
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = if self.session.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let mut request = self.client.request(method.clone(), url);
        if method != reqwest::Method::GET {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let answer: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert!(status.is_success(), "WebDriver {path}: {answer}");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn click(&self, css: &str) {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        let id = found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned();
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), json!({}))
            .await;
    }

    /// Polls `script` until it returns `expected`.
    async fn wait_for(&self, script: &str, expected: Value) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let value = self.script(script).await;
            if value == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{script} stayed {value}, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let png = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap()
    }
}

fn push_body(git_ref: &str, sha: &str, message: &str) -> Vec<u8> {
    json!({
        "ref": git_ref, "before": "1111111111111111111111111111111111111111", "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": { "full_name": "acme/api", "html_url": "https://github.com/acme/api" },
        "pusher": { "name": "ada" },
        "head_commit": { "id": sha, "message": message, "added": [], "modified": [], "removed": [] },
        "commits": []
    })
    .to_string()
    .into_bytes()
}

async fn post(daemon: &Daemon, git_ref: &str, sha: &str, message: &str) -> Value {
    let body = push_body(git_ref, sha, message);
    let headers = sign::github(SECRET, "push", &uuid::Uuid::new_v4().to_string(), &body);
    let mut request = test_client().post(daemon.url("/hooks/github")).body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

async fn api(daemon: &Daemon, path: &str) -> Value {
    let url = format!("http://{}{path}", daemon.admin.unwrap());
    let response = test_client().get(url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

async fn wait_jobs(daemon: &Daemon, query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let jobs = api(daemon, &format!("/api/jobs?{query}")).await["jobs"]
            .as_array()
            .unwrap()
            .clone();
        if jobs.len() == n {
            return jobs;
        }
        assert!(Instant::now() < deadline, "{query}: {jobs:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the browser is here; says so when it is not.
fn browser_available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not installed (apt-get install chromium chromium-driver)",
        missing.join(", ")
    );
    assert!(
        std::env::var("RELAY_BROWSER_TEST").as_deref() != Ok("required"),
        "RELAY_BROWSER_TEST=required, but {why}"
    );
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "skipped (browser): browser::the_status_pages_in_chromium — NOT RUN: {why}"
    );
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_pages_in_chromium() {
    if !browser_available() {
        return;
    }
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = ["127.0.0.1:0"]

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[store]
url = "sqlite://{}"

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "main-builds"
events = ["push"]
branches = ["main"]
to = ["circleci-api"]

[[routes]]
name = "releases"
events = ["push"]
branches = ["release/*"]
to = ["circleci-api"]

[targets.circleci-api]
kind = "circleci"
base_url = "{}"
project = "gh/acme/api"
token = "circle-token"
"#,
            dir.path().join("relay.db").display(),
            circle.url()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&config, &[]);
    let admin = daemon.admin.expect("an admin listener");

    // A followed pipeline, a dead job, and a hostile push.
    let followed = post(&daemon, "refs/heads/main", &"a".repeat(40), "Fix the build").await;
    wait_jobs(&daemon, "state=done", 1).await;
    circle.script([Reply::new(422, r#"{"message":"Unknown parameter"}"#)]);
    let dead = post(&daemon, "refs/heads/release/1.2", &"b".repeat(40), "Release 1.2").await;
    let dead_job = wait_jobs(&daemon, "state=dead", 1).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let message = "<img src=x onerror=\"window.__pwned='img';document.title='pwned'\"> \
                   </script><script>window.__pwned='script';document.title='pwned'</script>";
    let branch = "refs/heads/x\"><svg onload=\"window.__pwned='svg';document.title='pwned'\">";
    let hostile = post(&daemon, branch, &"c".repeat(40), message).await;
    let hostile_id = hostile["event"].as_str().unwrap();

    let profile = tempfile::tempdir().unwrap();
    let driver = Driver::start(profile.path()).await;
    let base = format!("http://anyone:{TOKEN}@{admin}");

    // The overview: its rows, then the screenshot.
    driver.open(&format!("{base}/")).await;
    let rows = driver
        .script("return Array.from(document.querySelectorAll('table.events tr td:nth-child(2)')).map(td => td.textContent)")
        .await;
    assert_eq!(rows, json!(["github", "github", "github"]));
    let target = driver
        .script("return Array.from(document.querySelectorAll('main table')[1].querySelectorAll('td')).slice(0, 4).map(td => td.textContent.trim())")
        .await;
    assert_eq!(
        target,
        json!(["circleci-api", "0", "0", "50%"]),
        "one done, one dead"
    );
    let shot = driver.screenshot().await;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("overview.png");
    std::fs::write(&path, &shot).unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("browser screenshot: {}", path.display());

    // The hostile push: shown as text, and nothing of it ran.
    driver.open(&format!("{base}/events/{hostile_id}")).await;
    let state = driver
        .script("return [typeof window.__pwned, document.title, document.querySelectorAll('main img, main svg, main script').length]")
        .await;
    assert_eq!(state[0], "undefined", "a payload's script ran: {state}");
    assert!(state[1].as_str().unwrap().starts_with("Event "), "{state}");
    assert_eq!(state[2], 0, "a payload's markup became elements: {state}");
    let text = driver.script("return document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(text.contains("<img src=x onerror="), "{text}");
    assert!(
        text.contains("</script><script>window.__pwned='script'"),
        "{text}"
    );
    assert!(text.contains("\"><svg onload="), "{text}");

    // The followed job links its pipeline; the dead one shows its error.
    driver
        .open(&format!("{base}/events/{}", followed["event"].as_str().unwrap()))
        .await;
    let link = driver
        .script("const a = document.querySelector('.job a[href]'); return a ? [a.href, a.textContent] : null")
        .await;
    assert_eq!(
        link,
        json!([
            "https://app.circleci.com/pipelines/github/acme/api/42",
            "7a1e7b52-93a4-4bb5-9d0c-3f1f8a0e2b11 #42"
        ])
    );
    driver
        .open(&format!("{base}/events/{}", dead["event"].as_str().unwrap()))
        .await;
    let error = driver
        .script("return document.querySelector('.job .error').textContent")
        .await;
    assert!(error.as_str().unwrap().contains("Unknown parameter"), "{error}");

    // The dead job: retry by its button (the token is asked for once and
    // kept in the tab), and see it queued.
    driver.open(&format!("{base}/dead")).await;
    driver
        .script(&format!(
            "sessionStorage.setItem('relay-admin-token', '{TOKEN}'); return true"
        ))
        .await;
    driver.click(&format!("#job-{dead_job} button[data-post]")).await;
    driver
        .wait_for(
            &format!("return document.querySelector('#job-{dead_job} [data-state]').textContent"),
            json!("queued"),
        )
        .await;
    let job = api(&daemon, &format!("/api/jobs/{dead_job}")).await;
    assert_ne!(job["state"], "dead", "{job}");
}
