//! The commands a person runs: `relay check` on good and broken configs
//! (each error names the file and the key, exit code 78), and `relay
//! explain` on the shipped sample config and payloads.

use std::path::PathBuf;
use std::process::Command;

use crate::support::relay_binary;

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(relay_binary());
    command.args(args).env_remove("RELAY_CONFIG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_sample_config_checks_and_lists_what_it_holds() {
    let sample = repo_file("relay.toml");
    let (code, out, err) = run(&["check", "-c", sample.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "sources:",
        "github POST /hooks/github",
        "gitlab POST /hooks/gitlab",
        "routes:",
        "main-builds",
        "targets:",
        "circleci POST https://circleci.com/api/v2/project/gh/acme/api/pipeline (dry run)",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

#[test]
fn broken_configs_name_the_file_and_the_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[server]\nlistn = [\"127.0.0.1:1\"]\n",
            "server.listn: unknown field",
        ),
        ("bogus = 1\n", "bogus: unknown field"),
        (
            "[delivery]\ntimeout = \"ten seconds\"\n",
            "delivery.timeout: invalid value",
        ),
        (
            "[sources.gh]\nprovider = \"githab\"\npath = \"/h\"\n",
            "sources.gh.provider: unknown variant",
        ),
        (
            "[sources.gh]\nprovider = \"github\"\npath = \"/h\"\n",
            "sources.gh.secret: is required",
        ),
        (
            "[sources.gh]\nprovider = \"github\"\npath = \"/h\"\nsecret = { vault = \"x\" }\n",
            "sources.gh.secret: a secret: a string, { env = \"NAME\" }",
        ),
        (
            "[sources.gh]\nprovider = \"github\"\npath = \"/h\"\nsecret = { env = \"RELAY_TEST_UNSET_SECRET\" }\n",
            "sources.gh.secret: environment variable RELAY_TEST_UNSET_SECRET is not set",
        ),
        (
            "[sources.gh]\nprovider = \"github\"\npath = \"/h\"\nsecret = \"s\"\ntoken = \"t\"\n",
            "sources.gh.token: not a setting of provider \"github\"",
        ),
        (
            "[[routes]]\nname = \"r\"\nto = [\"nowhere\"]\n",
            "routes[0].to[0]: no target is named \"nowhere\"",
        ),
        (
            "[targets.t]\nkind = \"http\"\nurl = \"http://x\"\n[[routes]]\nname = \"r\"\ntags = [\"v[\"]\nto = [\"t\"]\n",
            "routes[0].tags[0]: \"v[\" is not a valid glob",
        ),
        (
            "[targets.t]\nkind = \"http\"\nurl = \"http://x\"\n[[routes]]\nname = \"r\"\nevents = [\"pushh\"]\nto = [\"t\"]\n",
            "routes[0].events[0]: \"pushh\" is not an event relay routes",
        ),
        (
            "[targets.t]\nkind = \"http\"\nurl = \"http://x\"\n[[routes]]\nname = \"r\"\nwhen = \"branch ==\"\nto = [\"t\"]\n",
            "routes[0].when: syntax error",
        ),
        (
            "[targets.t]\nkind = \"circleci\"\nproject = \"gh/a/b\"\ntoken = \"t\"\nbranch = \"{{ brnach }}\"\n",
            "targets.t.branch: unknown variable brnach",
        ),
        (
            "[targets.t]\nkind = \"http\"\nurl = \"http://x\"\nproject = \"p\"\n",
            "targets.t.project: not a setting of kind \"http\"",
        ),
        (
            "[targets.t]\nkind = \"circleci\"\nproject = \"gh/a/b\"\n",
            "targets.t.token: is required unless the target is dry_run",
        ),
        (
            "[store]\nurl = \"mysql://x\"\n",
            "store.url: must start with sqlite://",
        ),
        (
            "[targets.t]\nkind = \"circleci\"\nproject = \"gh/a/b\"\ndry_run = true\npayload_parameter = \"p\"\n",
            "targets.t.payload_parameter: needs server.public_url",
        ),
        (
            "[server]\npublic_url = \"https://relay.example.com\"\npayload_key = \"k\"\npayload_ttl = \"30d\"\n\
             [targets.t]\nkind = \"circleci\"\nproject = \"gh/a/b\"\ndry_run = true\npayload_parameter = \"p\"\n",
            "server.payload_ttl: is longer than store.retention (14days)",
        ),
        (
            "[loop_guard]\nburst = true\n",
            "loop_guard.burst: true sets no limit",
        ),
        (
            "[store]\nurl = \"postgres://relay@db/relay?sslmode=verify-all\"\n",
            "store.url: is not a PostgreSQL URL (invalid value for option `sslmode`): postgres://relay@db/relay?sslmode=verify-all",
        ),
        (
            "[store]\nurl = \"postgres://relay:hunter22@db/relay\"\npassword = \"also-a-literal\"\n",
            "store.password: is set, and store.url carries a password too",
        ),
        (
            "[store]\nurl = \"sqlite://r.db\"\npassword = \"x\"\n",
            "store.password: applies only to a postgres:// store",
        ),
        (
            "[delivery]\nlease = \"500ms\"\n",
            "delivery.lease: must be at least 1s: a relay renews the leases of its sends every third of it",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    for (text, expected) in cases {
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run(&["check", "-c", path.to_str().unwrap()], &[]);
        assert_eq!(code, 78, "{text}\n{err}");
        let wanted = format!("{}: {expected}", path.display());
        assert!(
            err.contains(&wanted),
            "for\n{text}\nexpected {wanted:?} in:\n{err}"
        );
    }

    // An environment override that does not parse names the variable.
    std::fs::write(&path, "[delivery]\nattempts = 3\n").unwrap();
    let (code, _, err) = run(
        &["check", "-c", path.to_str().unwrap()],
        &[("RELAY_DELIVERY__ATTEMPTS", "many")],
    );
    assert_eq!(code, 78);
    assert!(err.contains("RELAY_DELIVERY__ATTEMPTS: invalid type"), "{err}");

    // And one that does parse takes effect over the file.
    let (code, _, err) = run(
        &["check", "-c", path.to_str().unwrap()],
        &[
            ("RELAY_DELIVERY__ATTEMPTS", "5"),
            ("RELAY_ADMIN_TOKEN", "not a config key"),
        ],
    );
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = run(&["check", "-c", "/nonexistent/relay.toml"], &[]);
    assert_eq!(code, 78);
    assert!(
        err.contains("/nonexistent/relay.toml: cannot read the config file"),
        "{err}"
    );
}

#[test]
fn explain_shows_verdicts_and_the_exact_dry_run_requests() {
    let sample = repo_file("relay.toml");
    let payload = repo_file("examples/github-tag.json");
    let (code, out, err) = run(
        &[
            "explain",
            "-c",
            sample.to_str().unwrap(),
            "-s",
            "github",
            "-e",
            "push",
            payload.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let expected = "\
event 1 of 1: tag acme/api refs/tags/v1.4.0 4e1243bd22c66e76c2ba9eddc1f91394e57f9f83
  route main-builds: no — events: event tag is not in [push]
  route releases: matched
    → target circleci-api (dry run: logged, not sent)
      POST https://circleci.com/api/v2/project/gh/acme/api/pipeline
      Content-Type: application/json
      Accept: application/json
      User-Agent: relay/0.1.0
      Circle-Token: [redacted]
      
      {\"parameters\":{\"deploy\":false,\"upstream_sha\":\"4e1243bd22c66e76c2ba9eddc1f91394e57f9f83\"},\"tag\":\"v1.4.0\"}
    → target gitlab-deploy (dry run: logged, not sent)
      POST https://gitlab.example.com/api/v4/projects/acme%2Fdeploy/trigger/pipeline
      Content-Type: application/json
      Accept: application/json
      User-Agent: relay/0.1.0
      
      {\"ref\":\"main\",\"token\":\"[redacted]\",\"variables\":{\"RELAY_HOP\":\"1\",\"UPSTREAM_REPO\":\"acme/api\",\"UPSTREAM_SHA\":\"4e1243bd22c66e76c2ba9eddc1f91394e57f9f83\",\"VERSION\":\"v1.4.0\"}}
";
    assert_eq!(out, expected);

    let (code, _, err) = run(
        &[
            "explain",
            "-c",
            sample.to_str().unwrap(),
            "-s",
            "nope",
            "-e",
            "push",
            payload.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("no source is named \"nope\" (sources: bitbucket, gitea, github, gitlab)"),
        "{err}"
    );
}

#[tokio::test]
async fn check_reports_the_store_schema_and_never_the_database_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let check = |store: String| {
        std::fs::write(&path, format!("[store]\nurl = \"{store}\"\n")).unwrap();
        run(&["check", "-c", path.to_str().unwrap()], &[])
    };

    let db = dir.path().join("relay.db");
    let (code, out, err) = check(format!("sqlite://{}", db.display()));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("store: sqlite://{}\n", db.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "schema: none yet (relay creates version {} when it starts)",
            relay::store::SQLITE_SCHEMA_VERSION
        )),
        "{out}"
    );
    drop(relay::store::SqliteStore::open(&db, std::time::SystemTime::now()).unwrap());
    let (_, out, _) = check(format!("sqlite://{}", db.display()));
    assert!(
        out.contains(&format!(
            "schema: version {} (current)",
            relay::store::SQLITE_SCHEMA_VERSION
        )),
        "{out}"
    );

    // Nothing listens on port 1: the check still passes, and says why it
    // could not read the schema, with the password masked.
    let (code, out, err) = check("postgres://relay:hunter22@127.0.0.1:1/relay?connect_timeout=2".to_owned());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("store: postgres://relay:***@127.0.0.1:1/relay?connect_timeout=2\n  schema: unknown"),
        "{out}"
    );
    assert!(
        out.contains("cannot read the store's schema version: cannot open the PostgreSQL store at postgres://relay:***@127.0.0.1:1/relay"),
        "{out}"
    );
    assert!(out.contains("store.url carries the database password"), "{out}");
    assert!(
        !out.contains("hunter22") && !err.contains("hunter22"),
        "{out}\n{err}"
    );

    if let Some(url) = crate::support::postgres_database("check_reports_the_postgres_schema").await {
        let (code, out, err) = check(url.clone());
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("schema: none yet"), "{out}");
        let config = relay::config::Config::from_toml(&format!("[store]\nurl = \"{url}\"\n")).unwrap();
        drop(
            relay::store::open(&config.store, std::time::SystemTime::now())
                .await
                .unwrap(),
        );
        let (_, out, _) = check(url.clone());
        assert!(out.contains("(current)"), "{out}");
        assert!(!out.contains("relay-test-pw"), "{out}");

        // The password from a secret reference instead of the URL.
        let parsed: tokio_postgres::Config = url.parse().unwrap();
        let password = String::from_utf8(parsed.get_password().unwrap().to_vec()).unwrap();
        let bare = url.replacen(&format!(":{password}@"), "@", 1);
        std::fs::write(
            &path,
            format!("[store]\nurl = \"{bare}\"\npassword = {{ env = \"RELAY_TEST_DB_PASSWORD\" }}\n"),
        )
        .unwrap();
        let (code, out, err) = run(
            &["check", "-c", path.to_str().unwrap()],
            &[("RELAY_TEST_DB_PASSWORD", &password)],
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("(current)"), "{out}");
        assert!(!out.contains("carries the database password"), "{out}");
        assert!(
            !out.contains(&password) && !err.contains(&password),
            "{out}\n{err}"
        );
    }
}
