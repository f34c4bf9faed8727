//! Conformance over the real sender payloads in `../shared/fixtures` (see its
//! SOURCES.md): every GitHub, GitLab, Bitbucket, Gitea and CircleCI fixture is signed the
//! way its sender signs it (with `support::sign`, not relay's own signer), goes
//! through `Source::receive` and `Source::parse`, and every field of every
//! resulting event is compared with a value read off the fixture by hand and
//! written down here. Also checked: the published signature test vectors
//! (GitHub's docs, Bitbucket's captured signed delivery), a Bitbucket push with
//! several changes, that no fixture lacks a case, and one fixture end to end
//! over HTTP into the store. The fixtures and what relay must make of each
//! are one table, [`CASES`].
//!
//! Without `../shared/fixtures` beside the checkout, each fixture test prints
//! a SKIPPED line and passes.

use std::collections::BTreeMap;

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use relay::config::Config;
use relay::event::{Event, EventKind, Files, Pipeline};
use relay::ingress::{IngressError, Parsed, SignatureError};
use serde_json::{Value, json};

use crate::support::{Relay, fixture, fixtures_dir, sign};

// ---------------------------------------------------------------------------
// The sources, and how each fixture is delivered to them
// ---------------------------------------------------------------------------

/// GitHub's documented test-vector secret (PROTOCOLS.md A1).
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITLAB_TOKEN: &str = "gitlab-fixture-token";
/// The secret of the captured signed Bitbucket delivery (PROTOCOLS.md A3).
const BITBUCKET_SECRET: &str = "Gkvl$k$wyNpQAF42";
const GITEA_SECRET: &str = "gitea-fixture-secret";
const CIRCLECI_SECRET: &str = "circleci-fixture-secret";

/// One source per provider, named after it; no routes or targets. The
/// Bitbucket secret is a TOML literal string, so it is taken byte for byte.
const SOURCES: &str = r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "It's a Secret to Everybody"

[sources.gitlab]
provider = "gitlab"
path = "/hooks/gitlab"
token = "gitlab-fixture-token"

[sources.bitbucket]
provider = "bitbucket"
path = "/hooks/bitbucket"
secret = 'Gkvl$k$wyNpQAF42'

[sources.gitea]
provider = "gitea"
path = "/hooks/gitea"
secret = "gitea-fixture-secret"

[sources.circleci]
provider = "circleci"
path = "/hooks/circleci"
secret = "circleci-fixture-secret"
"#;

fn config() -> Config {
    Config::from_toml(SOURCES).unwrap_or_else(|e| panic!("the fixture sources are refused: {e}"))
}

fn header_map<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(
            HeaderName::from_bytes(name.as_ref().as_bytes()).unwrap(),
            HeaderValue::from_str(value.as_ref()).unwrap(),
        );
    }
    headers
}

/// The headers `provider` sends with `body`, signed with the configured secret.
fn signed_headers(provider: &str, hook: &str, delivery: &str, body: &[u8]) -> HeaderMap {
    let pairs = match provider {
        "github" => sign::github(GITHUB_SECRET, hook, delivery, body),
        "gitlab" => sign::gitlab(GITLAB_TOKEN, hook, delivery),
        "bitbucket" => sign::bitbucket(BITBUCKET_SECRET, hook, delivery, body),
        "gitea" => sign::gitea(GITEA_SECRET, hook, delivery, body),
        // CircleCI's delivery id is the body's own `id`.
        "circleci" => sign::circleci(CIRCLECI_SECRET, hook, body),
        other => panic!("no source for provider {other}"),
    };
    header_map(&pairs)
}

/// Signs `body` as `provider` would, then verifies and parses it through the
/// source of that name, as ingress does.
fn deliver(label: &str, provider: &str, hook: &str, body: Vec<u8>) -> Parsed {
    let config = config();
    let source = config
        .source(provider)
        .unwrap_or_else(|| panic!("no source named {provider}"));
    let headers = signed_headers(provider, hook, &format!("fixture {label}"), &body);
    let webhook = source
        .receive(&headers, Bytes::from(body), SystemTime::now())
        .unwrap_or_else(|e| panic!("{label}: receive refused it: {e}"));
    assert_eq!(webhook.hook(), hook, "{label}: the hook name relay read");
    let parsed = source
        .parse(&webhook, Files::Read)
        .unwrap_or_else(|e| panic!("{label}: parse refused it: {e}"));
    // For a config that reads no paths, GitHub and Gitea pushes skip the
    // commits' file lists: everything else comes out the same.
    let skipped = source
        .parse(&webhook, Files::Skip)
        .unwrap_or_else(|e| panic!("{label}: parse without files refused it: {e}"));
    match (&parsed, &skipped) {
        (Parsed::Ping, Parsed::Ping) => {}
        (Parsed::Events(read), Parsed::Events(skipped)) => {
            let expected: Vec<Event> = read
                .iter()
                .cloned()
                .map(|mut event| {
                    if matches!(provider, "github" | "gitea") {
                        event.paths.clear();
                        event.paths_complete = false;
                    }
                    event
                })
                .collect();
            assert_eq!(skipped, &expected, "{label}: parsed without the commits' files");
        }
        _ => panic!("{label}: a ping one way and events the other"),
    }
    parsed
}

// ---------------------------------------------------------------------------
// Expectations and the comparison
// ---------------------------------------------------------------------------

/// One fixture file and what relay must make of it.
struct Case {
    /// Path under `../shared/fixtures`; its directory names the provider.
    file: &'static str,
    /// The event header value the sender attaches (SOURCES.md "header").
    hook: &'static str,
    want: Want,
}

enum Want {
    Ping,
    Events(&'static [Expect]),
}

/// Every field of one expected event, read off the fixture.
struct Expect {
    kind: EventKind,
    repo: &'static str,
    repo_url: &'static str,
    git_ref: &'static str,
    branch: &'static str,
    tag: &'static str,
    sha: &'static str,
    before: &'static str,
    created: bool,
    deleted: bool,
    forced: bool,
    pusher: &'static str,
    message: &'static str,
    paths: &'static [&'static str],
    paths_complete: bool,
    pipeline: Option<ExpectPipeline>,
}

struct ExpectPipeline {
    status: &'static str,
    id: &'static str,
    number: u64,
    workflow: &'static str,
    source: &'static str,
    variables: &'static [(&'static str, &'static str)],
}

/// Compares every field and reports all differences at once.
fn compare(label: &str, events: &[Event], expected: &[Expect]) {
    assert_eq!(
        events.len(),
        expected.len(),
        "{label}: number of events; relay made {events:#?}"
    );
    let mut wrong = Vec::new();
    for (i, (got, want)) in events.iter().zip(expected).enumerate() {
        let pipeline = want.pipeline.as_ref().map(|p| Pipeline {
            status: p.status.to_owned(),
            id: p.id.to_owned(),
            number: p.number,
            workflow: p.workflow.to_owned(),
            source: p.source.to_owned(),
            variables: p
                .variables
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        });
        // (field, relay's value, expected value), compared as Debug text:
        // `&str` and `String`, `&[&str]` and `Vec<String>` print alike.
        macro_rules! fields {
            ($($field:ident),+) => {
                vec![$((stringify!($field), format!("{:?}", got.$field), format!("{:?}", want.$field))),+]
            };
        }
        let mut fields = fields!(
            kind,
            repo,
            repo_url,
            git_ref,
            branch,
            tag,
            sha,
            before,
            created,
            deleted,
            forced,
            pusher,
            message,
            paths,
            paths_complete
        );
        fields.push(("pipeline", format!("{:?}", got.pipeline), format!("{pipeline:?}")));
        for (name, got, expected) in fields {
            if got != expected {
                wrong.push(format!("event {i} {name}: relay gave {got}, expected {expected}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{label}:\n  {}", wrong.join("\n  "));
}

/// Every case of [`CASES`] through `receive` and `parse`; reports every
/// fixture that does not come out as its case says, not just the first.
#[test]
fn every_fixture_comes_out_as_its_case_says() {
    if fixtures_dir().is_none() {
        eprintln!("SKIPPED: ../shared/fixtures is not beside this checkout; no fixture parsed");
        return;
    }
    let failed: Vec<String> = CASES
        .iter()
        .filter_map(|case| {
            let outcome = std::panic::catch_unwind(|| check(case)).err()?;
            let message = outcome
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| outcome.downcast_ref::<&str>().map(|m| (*m).to_owned()))
                .unwrap_or_default();
            Some(format!("{}: {message}", case.file))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} fixtures:\n{}",
        failed.len(),
        CASES.len(),
        failed.join("\n")
    );
}

/// Delivers the fixture through relay and compares every field of every event.
fn check(case: &Case) {
    let Some(body) = fixture(case.file) else {
        return;
    };
    let (provider, _) = case.file.split_once('/').expect("provider/file.json");
    match (&case.want, deliver(case.file, provider, case.hook, body)) {
        (Want::Ping, Parsed::Ping) => {}
        (Want::Events(expected), Parsed::Events(events)) => compare(case.file, &events, expected),
        (Want::Ping, Parsed::Events(events)) => panic!("{}: wanted a ping, got {events:#?}", case.file),
        (Want::Events(_), Parsed::Ping) => panic!("{}: wanted events, got a ping", case.file),
    }
}

const ZERO: &str = "0000000000000000000000000000000000000000";

// ---------------------------------------------------------------------------
// GitHub (X-GitHub-Event)
// ---------------------------------------------------------------------------

const GH_REPO: &str = "Codertocat/Hello-World";
const GH_URL: &str = "https://github.com/Codertocat/Hello-World";
const GHES_URL: &str = "https://octocoders.github.io/Codertocat/Hello-World";
const GH_SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";

const GITHUB_TAG_DELETED: Expect = Expect {
    kind: EventKind::TagDelete,
    repo: GH_REPO,
    repo_url: GH_URL,
    git_ref: "refs/tags/simple-tag",
    branch: "",
    tag: "simple-tag",
    sha: ZERO,
    before: GH_SHA,
    created: false,
    deleted: true,
    forced: false,
    pusher: "Codertocat",
    message: "",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

/// `create` with ref_type tag: recorded as kind Other, never routed.
const fn github_create_tag_event(repo_url: &'static str) -> Expect {
    Expect {
        kind: EventKind::Other,
        repo: GH_REPO,
        repo_url,
        git_ref: "refs/tags/simple-tag",
        branch: "",
        tag: "simple-tag",
        // A `create` payload carries no SHA.
        sha: "",
        before: "",
        // It reports a created ref.
        created: true,
        deleted: false,
        forced: false,
        pusher: "Codertocat",
        message: "",
        paths: &[],
        paths_complete: false,
        pipeline: None,
    }
}

/// `delete` with ref_type tag: kind Other (the `push` with deleted=true is
/// the one that routes).
const GITHUB_DELETE_TAG_EVENT: Expect = Expect {
    kind: EventKind::Other,
    repo: GH_REPO,
    repo_url: GH_URL,
    git_ref: "refs/tags/simple-tag",
    branch: "",
    tag: "simple-tag",
    // Event.sha is "zeros when deleted".
    sha: ZERO,
    before: "",
    created: false,
    deleted: true,
    forced: false,
    pusher: "Codertocat",
    message: "",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

// ---------------------------------------------------------------------------
// GitLab (X-Gitlab-Event)
// ---------------------------------------------------------------------------

const GL_HELLO: &str = "gitlab-org/hello-world";
const GL_HELLO_URL: &str = "https://gitlab.com/gitlab-org/hello-world";
const GL_FEATURE_SHA: &str = "c4c79227ed610f1151f05bbc5be33b4f340d39c8";
const GL_README_SHA: &str = "2adc9465c4edfc33834e173fe89436a7cb899a1d";

// ---------------------------------------------------------------------------
// Bitbucket Cloud (X-Event-Key: repo:push): one event per change, no file lists
// ---------------------------------------------------------------------------

const BB_TEST_REPOS: &str = "amuniz/test-repos";
const BB_TEST_REPOS_URL: &str = "https://bitbucket.org/amuniz/test-repos";
const BB_FALCO: &str = "Nikolas Falco";
const BB_PIPELINE_SHA: &str = "174561d625c9623b60d8aba09b7f08ddc9df45cd";

const BB_BRANCH_COMMITS: Expect = Expect {
    kind: EventKind::Push,
    repo: BB_TEST_REPOS,
    repo_url: BB_TEST_REPOS_URL,
    git_ref: "refs/heads/feature/issue-819",
    branch: "feature/issue-819",
    tag: "",
    sha: "5ecffa3874e96920f24a2b3c0d0038e47d5cd1a4",
    before: "a10199272451f4c7c5edced2d40b5d6f2f6f5fa3",
    created: false,
    deleted: false,
    forced: true,
    pusher: BB_FALCO,
    message: "Test pipeline for issue JENKINS-75182\n",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

const BB_BRANCH_CREATED: Expect = Expect {
    kind: EventKind::Push,
    repo: BB_TEST_REPOS,
    repo_url: BB_TEST_REPOS_URL,
    git_ref: "refs/heads/feature/test",
    branch: "feature/test",
    tag: "",
    sha: BB_PIPELINE_SHA,
    // `old` is null: no before-commit; relay says zeros, as GitHub and GitLab do.
    before: ZERO,
    created: true,
    deleted: false,
    forced: false,
    pusher: BB_FALCO,
    message: "Add simple pipeline\n",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

const BB_SIGNED: Expect = Expect {
    kind: EventKind::Push,
    repo: "nfalco79/test-repos",
    repo_url: "https://bitbucket.org/nfalco79/test-repos",
    git_ref: "refs/heads/feature/webhook",
    branch: "feature/webhook",
    tag: "",
    sha: "d7f300a32270053bdfd97a6d64113f58202c33e7",
    before: ZERO,
    created: true,
    deleted: false,
    forced: false,
    pusher: BB_FALCO,
    message: "Test for webhook signature\n",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

const BB_TAG_CREATED: Expect = Expect {
    kind: EventKind::Tag,
    repo: BB_TEST_REPOS,
    repo_url: BB_TEST_REPOS_URL,
    git_ref: "refs/tags/simple-tag",
    branch: "",
    tag: "simple-tag",
    sha: "7ef5981d59145c3ed300b1ab77b93907d33abe59",
    before: ZERO,
    created: true,
    deleted: false,
    forced: false,
    pusher: BB_FALCO,
    message: "Test pipeline for issue JENKINS-75182\n",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

const BB_TAG_DELETED: Expect = Expect {
    kind: EventKind::TagDelete,
    repo: BB_TEST_REPOS,
    repo_url: BB_TEST_REPOS_URL,
    git_ref: "refs/tags/test",
    branch: "",
    tag: "test",
    // `new` is null. Event.sha is "zeros when deleted".
    sha: ZERO,
    before: BB_PIPELINE_SHA,
    created: false,
    deleted: true,
    forced: false,
    pusher: BB_FALCO,
    message: "",
    paths: &[],
    paths_complete: false,
    pipeline: None,
};

/// No fixture carries several changes, so this one is assembled from the
/// changes of four captures of the same repository by the same actor; relay
/// must give one event per change, in the order sent (a deletion first).
#[test]
fn bitbucket_push_with_several_changes_gives_one_event_per_change_in_order() {
    let parts = [
        "bitbucket/repo-push-tag-deleted.json",
        "bitbucket/repo-push-branch-created.json",
        "bitbucket/repo-push-branch-commits.json",
        "bitbucket/repo-push-tag-created.json",
    ];
    let mut docs = Vec::new();
    for file in parts {
        let Some(bytes) = fixture(file) else {
            return;
        };
        docs.push(serde_json::from_slice::<Value>(&bytes).unwrap());
    }
    let changes: Vec<Value> = docs
        .iter()
        .flat_map(|doc| doc["push"]["changes"].as_array().unwrap().clone())
        .collect();
    assert_eq!(changes.len(), 4, "each capture carries one change");
    let mut push = docs[0].clone();
    push["push"]["changes"] = Value::Array(changes);
    let label = "bitbucket push with four changes";
    let Parsed::Events(events) = deliver(
        label,
        "bitbucket",
        "repo:push",
        serde_json::to_vec(&push).unwrap(),
    ) else {
        panic!("{label}: parsed as a ping");
    };
    compare(
        label,
        &events,
        &[
            BB_TAG_DELETED,
            BB_BRANCH_CREATED,
            BB_BRANCH_COMMITS,
            BB_TAG_CREATED,
        ],
    );
}

// ---------------------------------------------------------------------------
// Gitea (X-Gitea-Event, with Forgejo's headers alongside)
// ---------------------------------------------------------------------------

const GT_HELLO: &str = "gogits/hello-world";
const GT_HELLO_URL: &str = "http://try.gitea.io/gogits/hello-world";

// ---------------------------------------------------------------------------
// Coverage: every fixture file has a case
// ---------------------------------------------------------------------------

/// Every fixture in `../shared/fixtures`, once: its path (the directory
/// names the provider), the event header its sender attaches, and every field
/// of every event relay must make of it.
const CASES: &[Case] = &[
    // A tag push of a new tag: `push` to refs/tags with created=true.
    Case {
        file: "github/push-tag-created-ghes35.json",
        hook: "push",
        want: Want::Events(&[Expect {
            kind: EventKind::Tag,
            repo: GH_REPO,
            repo_url: GHES_URL,
            git_ref: "refs/tags/simple-tag",
            branch: "",
            tag: "simple-tag",
            sha: GH_SHA,
            before: ZERO,
            created: true,
            deleted: false,
            forced: false,
            pusher: "Codertocat",
            message: "Adding a .gitignore file",
            // `commits` is empty (only head_commit names a file): nothing listed.
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "github/push-tag-deleted.json",
        hook: "push",
        want: Want::Events(&[GITHUB_TAG_DELETED]),
    },
    Case {
        file: "github/push-tag-deleted-with-installation.json",
        hook: "push",
        want: Want::Events(&[GITHUB_TAG_DELETED]),
    },
    Case {
        file: "github/push-branch-created.json",
        hook: "push",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: GH_REPO,
            repo_url: GH_URL,
            git_ref: "refs/heads/master",
            branch: "master",
            tag: "",
            sha: GH_SHA,
            before: ZERO,
            created: true,
            deleted: false,
            forced: false,
            pusher: "Codertocat",
            message: "Initial commit",
            paths: &["README.md"],
            paths_complete: true,
            pipeline: None,
        }]),
    },
    Case {
        file: "github/create-tag.json",
        hook: "create",
        want: Want::Events(&[github_create_tag_event(GH_URL)]),
    },
    Case {
        file: "github/create-tag-with-organization.json",
        hook: "create",
        want: Want::Events(&[github_create_tag_event(GH_URL)]),
    },
    Case {
        file: "github/create-tag-ghes35.json",
        hook: "create",
        want: Want::Events(&[github_create_tag_event(GHES_URL)]),
    },
    Case {
        file: "github/delete-tag.json",
        hook: "delete",
        want: Want::Events(&[GITHUB_DELETE_TAG_EVENT]),
    },
    Case {
        file: "github/delete-tag-with-organization.json",
        hook: "delete",
        want: Want::Events(&[GITHUB_DELETE_TAG_EVENT]),
    },
    Case {
        file: "github/ping.json",
        hook: "ping",
        want: Want::Ping,
    },
    Case {
        file: "github/ping-with-app_id.json",
        hook: "ping",
        want: Want::Ping,
    },
    Case {
        file: "gitlab/pipeline-hook-docs.json",
        hook: "Pipeline Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::Pipeline,
            repo: "gitlab-org/gitlab-test",
            repo_url: "http://192.168.64.1:3005/gitlab-org/gitlab-test",
            git_ref: "refs/heads/master",
            branch: "master",
            tag: "",
            sha: "bcbb5ec396a2c0f828686f14fac9b80b780504f2",
            before: "bcbb5ec396a2c0f828686f14fac9b80b780504f2",
            created: false,
            deleted: false,
            forced: false,
            pusher: "root",
            message: "test\n",
            paths: &[],
            paths_complete: false,
            pipeline: Some(ExpectPipeline {
                status: "success",
                id: "31",
                number: 0,
                workflow: "",
                source: "merge_request_event",
                variables: &[("NESTOR_PROD_ENVIRONMENT", "us-west-1")],
            }),
        }]),
    },
    Case {
        file: "gitlab/push-hook-branch-created-capture.json",
        hook: "Push Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: GL_HELLO,
            repo_url: GL_HELLO_URL,
            git_ref: "refs/heads/feature",
            branch: "feature",
            tag: "",
            sha: GL_FEATURE_SHA,
            before: ZERO,
            created: true,
            deleted: false,
            forced: false,
            pusher: "sytses",
            message: "update readme\n",
            paths: &["README.md"],
            paths_complete: true,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitlab/push-hook-branch-deleted-capture.json",
        hook: "Push Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::BranchDelete,
            repo: GL_HELLO,
            repo_url: GL_HELLO_URL,
            git_ref: "refs/heads/feature",
            branch: "feature",
            tag: "",
            sha: ZERO,
            before: GL_FEATURE_SHA,
            created: false,
            deleted: true,
            forced: false,
            pusher: "sytses",
            message: "",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitlab/push-hook-docs.json",
        hook: "Push Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: "mike/diaspora",
            repo_url: "http://example.com/mike/diaspora",
            git_ref: "refs/heads/master",
            branch: "master",
            tag: "",
            sha: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            before: "95790bf891e76fee5e1747ab589903a6a1f80f22",
            created: false,
            deleted: false,
            forced: false,
            pusher: "jsmith",
            // The message of the commit `after` names, not of the first listed.
            message: "fixed readme",
            // Both commits touch the same two files.
            paths: &["CHANGELOG", "app/controller/application.rb"],
            // Two commits listed of total_commits_count 4.
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitlab/push-hook-gitlabcom-capture.json",
        hook: "Push Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: GL_HELLO,
            repo_url: GL_HELLO_URL,
            git_ref: "refs/heads/master",
            branch: "master",
            tag: "",
            sha: GL_README_SHA,
            before: "9217710ce8c7e1eae7a5d1c45f6e43e1c769f866",
            created: false,
            deleted: false,
            forced: false,
            pusher: "sytses",
            message: "added readme\n",
            paths: &["README.md"],
            paths_complete: true,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitlab/tag-push-hook-created-capture.json",
        hook: "Tag Push Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::Tag,
            repo: GL_HELLO,
            repo_url: GL_HELLO_URL,
            git_ref: "refs/tags/v1.0.0",
            branch: "",
            tag: "v1.0.0",
            sha: GL_README_SHA,
            before: ZERO,
            created: true,
            deleted: false,
            forced: false,
            pusher: "sytses",
            message: "added readme\n",
            paths: &["README.md"],
            paths_complete: true,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitlab/tag-push-hook-docs.json",
        hook: "Tag Push Hook",
        want: Want::Events(&[Expect {
            kind: EventKind::Tag,
            repo: "jsmith/example",
            repo_url: "http://example.com/jsmith/example",
            git_ref: "refs/tags/v1.0.0",
            branch: "",
            tag: "v1.0.0",
            sha: "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
            before: ZERO,
            created: true,
            deleted: false,
            forced: false,
            // This docs sample has no user_username; user_name is all there is.
            pusher: "John Smith",
            message: "",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "bitbucket/repo-push-atlassian-docs-sample.json",
        hook: "repo:push",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: "team_name/repo_name",
            // Verbatim from the docs sample (an api. host, "bitbucket/bitbucket").
            repo_url: "https://api.bitbucket.org/bitbucket/bitbucket",
            git_ref: "refs/heads/name-of-branch",
            branch: "name-of-branch",
            tag: "",
            sha: "709d658dc5b6d6afcd46049c2f332ee3f515a67d",
            before: "1e65c05c1d5171631d92438a13901ca7dae9618c",
            created: false,
            deleted: false,
            forced: false,
            pusher: "emmap1",
            message: "new commit message\n",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "bitbucket/repo-push-branch-commits.json",
        hook: "repo:push",
        want: Want::Events(&[BB_BRANCH_COMMITS]),
    },
    Case {
        file: "bitbucket/repo-push-branch-created.json",
        hook: "repo:push",
        want: Want::Events(&[BB_BRANCH_CREATED]),
    },
    Case {
        file: "bitbucket/repo-push-signed.json",
        hook: "repo:push",
        want: Want::Events(&[BB_SIGNED]),
    },
    Case {
        file: "bitbucket/repo-push-tag-created-drone-capture.json",
        hook: "repo:push",
        want: Want::Events(&[Expect {
            kind: EventKind::Tag,
            repo: "brydzewski/foo",
            repo_url: "https://bitbucket.org/brydzewski/foo",
            // The captured tag really is named "feature/x".
            git_ref: "refs/tags/feature/x",
            branch: "",
            tag: "feature/x",
            sha: "141977fedf5cf35aa290ac87d4b5177ac4cd9de1",
            before: ZERO,
            created: true,
            deleted: false,
            forced: false,
            // This actor has no nickname, only a username.
            pusher: "brydzewski",
            message: "Update README\n",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "bitbucket/repo-push-tag-created.json",
        hook: "repo:push",
        want: Want::Events(&[BB_TAG_CREATED]),
    },
    Case {
        file: "bitbucket/repo-push-tag-deleted.json",
        hook: "repo:push",
        want: Want::Events(&[BB_TAG_DELETED]),
    },
    Case {
        file: "gitea/create-branch-capture.json",
        hook: "create",
        want: Want::Events(&[Expect {
            kind: EventKind::Other,
            repo: GT_HELLO,
            repo_url: GT_HELLO_URL,
            git_ref: "refs/heads/feature",
            branch: "feature",
            tag: "",
            // This capture has no `sha`.
            sha: "",
            before: "",
            created: true,
            deleted: false,
            forced: false,
            pusher: "unknwon",
            message: "",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitea/create-tag-capture.json",
        hook: "create",
        want: Want::Events(&[Expect {
            kind: EventKind::Other,
            repo: GT_HELLO,
            repo_url: GT_HELLO_URL,
            git_ref: "refs/tags/v1.0.0",
            branch: "",
            tag: "v1.0.0",
            sha: "599d25c67b05717269f50ac082b34f176d085179",
            before: "",
            created: true,
            deleted: false,
            forced: false,
            pusher: "unknwon",
            message: "",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    // Gitea sends no push for a deleted branch, so its `delete` routes.
    Case {
        file: "gitea/delete-branch-capture.json",
        hook: "delete",
        want: Want::Events(&[Expect {
            kind: EventKind::BranchDelete,
            repo: GT_HELLO,
            repo_url: GT_HELLO_URL,
            git_ref: "refs/heads/feature",
            branch: "feature",
            tag: "",
            // Event.sha is "zeros when deleted".
            sha: ZERO,
            before: "",
            created: false,
            deleted: true,
            forced: false,
            pusher: "unknwon",
            message: "",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitea/delete-branch-capture-2.json",
        hook: "delete",
        want: Want::Events(&[Expect {
            kind: EventKind::BranchDelete,
            repo: "example/example",
            repo_url: "http://localhost:3000/example/example",
            git_ref: "refs/heads/example3",
            branch: "example3",
            tag: "",
            // Event.sha is "zeros when deleted".
            sha: ZERO,
            before: "",
            created: false,
            deleted: true,
            forced: false,
            pusher: "example",
            message: "",
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitea/push-capture.json",
        hook: "push",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: GT_HELLO,
            repo_url: GT_HELLO_URL,
            git_ref: "refs/heads/master",
            branch: "master",
            tag: "",
            sha: "4522cbcefc20728a5b72b3a86af35e608622c514",
            before: "9836a96a253cce25d17988fcf41b8c4205cf779f",
            created: false,
            deleted: false,
            forced: false,
            // Gitea's pusher is a user object: login, no `name`.
            pusher: "unknwon",
            // No head_commit in this payload: the message is that of the listed
            // commit whose id is `after`.
            message: "Updated readme\n",
            paths: &["README.md"],
            paths_complete: true,
            pipeline: None,
        }]),
    },
    Case {
        file: "gitea/push-docs.json",
        hook: "push",
        want: Want::Events(&[Expect {
            kind: EventKind::Push,
            repo: "gitea/webhooks",
            repo_url: "http://localhost:3000/gitea/webhooks",
            git_ref: "refs/heads/develop",
            branch: "develop",
            tag: "",
            sha: "bffeb74224043ba2feb48d137756c8a9331c449a",
            before: "28e1879d029cb852e4844d9c718537df08844e03",
            created: false,
            deleted: false,
            forced: false,
            pusher: "gitea",
            // No head_commit here either; the one commit is `after`.
            message: "Webhooks Yay!",
            // The docs' commit has no added/modified/removed lists at all: the
            // sender listed no files, so the (empty) list is not complete.
            paths: &[],
            paths_complete: false,
            pipeline: None,
        }]),
    },
    Case {
        file: "circleci/workflow-completed-github.json",
        hook: "workflow-completed",
        want: Want::Events(&[Expect {
            kind: EventKind::Pipeline,
            ..CCI_GITHUB
        }]),
    },
    Case {
        file: "circleci/job-completed-github.json",
        hook: "job-completed",
        // Recorded and acknowledged, never routed: no pipeline outcome.
        want: Want::Events(&[Expect {
            kind: EventKind::Other,
            pipeline: None,
            ..CCI_GITHUB
        }]),
    },
    Case {
        file: "circleci/workflow-completed-gitlab-app.json",
        hook: "workflow-completed",
        // A GitLab project: no `vcs`; the ref, commit and repository come
        // from `trigger_parameters.git` (its checkout_url names the repository).
        want: Want::Events(&[Expect {
            kind: EventKind::Pipeline,
            repo: "zulip-testing/circleci-webhook-test",
            repo_url: "https://gitlab.com/zulip-testing/circleci-webhook-test",
            git_ref: "refs/heads/main",
            branch: "main",
            tag: "",
            sha: "c31f86994c54672f97b5bd5e544315b7bd40e4c1",
            before: "",
            created: false,
            deleted: false,
            forced: false,
            pusher: "",
            message: "app: Enhance message within hello().",
            paths: &[],
            paths_complete: false,
            pipeline: Some(ExpectPipeline {
                status: "success",
                id: "18448206-98fd-4ed2-abef-896da41340c0",
                number: 3,
                workflow: "sample",
                source: "gitlab",
                variables: &[],
            }),
        }]),
    },
];

// ---------------------------------------------------------------------------
// CircleCI (Circleci-Event-Type; the delivery id is the body's `id`)
// ---------------------------------------------------------------------------

/// A GitHub OAuth project's pipeline: everything from `pipeline.vcs`.
const CCI_GITHUB: Expect = Expect {
    kind: EventKind::Pipeline,
    repo: "zulip-testing/circleci-webhook-test",
    repo_url: "https://github.com/zulip-testing/circleci-webhook-test",
    git_ref: "refs/heads/main",
    branch: "main",
    tag: "",
    sha: "a5e30a908224e46626a796d058289475f6d387b5",
    before: "",
    created: false,
    deleted: false,
    forced: false,
    // CircleCI names no pusher.
    pusher: "",
    // The commit's subject (its body is empty).
    message: ".circleci: Update Webhook URL.",
    paths: &[],
    paths_complete: false,
    pipeline: Some(ExpectPipeline {
        status: "success",
        id: "877c620f-900a-455b-ad51-1a772b5a3eab",
        number: 4,
        workflow: "sample",
        source: "webhook",
        variables: &[],
    }),
};

/// A fixture added to the shared directory without a case here fails this.
#[test]
fn every_provider_fixture_has_a_case() {
    let Some(dir) = fixtures_dir() else {
        eprintln!("SKIPPED: ../shared/fixtures is not beside this checkout; fixture coverage not checked");
        return;
    };
    let mut on_disk = Vec::new();
    for provider in ["github", "gitlab", "bitbucket", "gitea", "circleci"] {
        for entry in std::fs::read_dir(dir.join(provider)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".json") {
                on_disk.push(format!("{provider}/{name}"));
            }
        }
    }
    on_disk.sort();
    let mut covered: Vec<String> = CASES.iter().map(|c| c.file.to_owned()).collect();
    covered.sort();
    assert_eq!(covered, on_disk);
}

// ---------------------------------------------------------------------------
// Published signature vectors
// ---------------------------------------------------------------------------

fn assert_mismatch(result: Result<relay::ingress::Webhook, IngressError>, header: &str, source: &str) {
    match result {
        Err(IngressError::Signature(SignatureError::Mismatch {
            header: got_header,
            config_source,
        })) => {
            assert_eq!(got_header, header);
            assert_eq!(config_source, source);
        }
        other => panic!("wanted a {header} mismatch, got {other:?}"),
    }
}

/// GitHub's docs vector ("Testing the webhook payload validation"): the
/// body is not JSON, which `receive` never reads.
/// CircleCI's delivery id is the body's `id`: what its redeliveries repeat.
#[test]
fn circleci_fixtures_are_keyed_on_the_body_id() {
    let config = config();
    let source = config.source("circleci").unwrap();
    for (file, hook, id) in [
        (
            "circleci/workflow-completed-github.json",
            "workflow-completed",
            "630a6132-5bf1-3600-b26d-a020d41358f9",
        ),
        (
            "circleci/job-completed-github.json",
            "job-completed",
            "e7346c18-44cb-331d-9d45-698a38edb2e0",
        ),
        (
            "circleci/workflow-completed-gitlab-app.json",
            "workflow-completed",
            "02ca6868-629c-3f34-b574-6f2d506357f8",
        ),
    ] {
        let Some(body) = fixture(file) else {
            return;
        };
        let headers = header_map(&sign::circleci(CIRCLECI_SECRET, hook, &body));
        let webhook = source
            .receive(&headers, Bytes::from(body), SystemTime::now())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(webhook.delivery(), Some(id), "{file}");
    }
}

#[test]
fn github_documented_signature_vector() {
    let config = config();
    let source = config.source("github").unwrap();
    let headers = header_map(&[
        ("Content-Type", "application/json"),
        ("X-GitHub-Event", "push"),
        (
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ),
    ]);
    let webhook = source
        .receive(&headers, Bytes::from_static(b"Hello, World!"), SystemTime::now())
        .unwrap_or_else(|e| panic!("GitHub's own test vector is refused: {e}"));
    assert_eq!(&webhook.body()[..], b"Hello, World!");
    assert_eq!(webhook.hook(), "push");
    assert_eq!(webhook.source(), "github");

    let mut flipped = b"Hello, World!".to_vec();
    flipped[7] ^= 0x01; // 'W' -> 'V'
    assert_mismatch(
        source.receive(&headers, Bytes::from(flipped), SystemTime::now()),
        "X-Hub-Signature-256",
        "github",
    );
}

/// The captured signed Bitbucket delivery with its published header, used
/// verbatim (not recomputed here).
#[test]
fn bitbucket_published_signature_vector() {
    let Some(body) = fixture("bitbucket/repo-push-signed.json") else {
        return;
    };
    assert_eq!(body.len(), 14515, "SOURCES.md: 14,515 bytes, no trailing newline");
    let config = config();
    let source = config.source("bitbucket").unwrap();
    let headers = header_map(&[
        ("Content-Type", "application/json"),
        ("X-Event-Key", "repo:push"),
        (
            "X-Hub-Signature",
            "sha256=f205c729821c6954aff2afe72b965c34015b4baf96ea8ddc2cc44999c014a035",
        ),
    ]);
    let webhook = source
        .receive(&headers, Bytes::from(body.clone()), SystemTime::now())
        .unwrap_or_else(|e| panic!("the published Bitbucket signature is refused: {e}"));
    let Parsed::Events(events) = source.parse(&webhook, Files::Read).unwrap() else {
        panic!("the signed push parsed as a ping");
    };
    compare("bitbucket signed vector", &events, &[BB_SIGNED]);

    let mut flipped = body;
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    assert_mismatch(
        source.receive(&headers, Bytes::from(flipped), SystemTime::now()),
        "X-Hub-Signature",
        "bitbucket",
    );
}

// ---------------------------------------------------------------------------
// End to end over HTTP
// ---------------------------------------------------------------------------

/// The GitHub tag push, posted signed to a running relay: accepted with 202
/// (no routes, so no jobs) and recorded with the normalized event in `summary`.
#[tokio::test]
async fn github_tag_push_fixture_is_accepted_and_recorded() {
    let Some(body) = fixture("github/push-tag-created-ghes35.json") else {
        return;
    };
    let relay = Relay::start(SOURCES).await;
    let headers = sign::github(GITHUB_SECRET, "push", "e2e-tag-push", &body);
    let (status, answer) = relay.post("/hooks/github", &headers, body.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["event"]
        .as_str()
        .unwrap_or_else(|| panic!("no event id in {answer}"))
        .to_owned();
    uuid::Uuid::parse_str(&id).unwrap_or_else(|e| panic!("event id {id:?} is not a UUID: {e}"));
    assert_eq!(
        answer,
        json!({ "event": id, "jobs": 0, "routes": [], "dropped": [], "rejected": [] })
    );

    let event = relay.event(&id).await;
    assert_eq!(
        (&event["source"], &event["hook"], &event["delivery"]),
        (&json!("github"), &json!("push"), &json!("e2e-tag-push"))
    );
    // Stored LZ4-compressed (codec 1), and exactly the body once unpacked.
    let stored = crate::support::stored_bodies(&relay.db_path(), Some(&id));
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].codec,
        1,
        "a {}-byte JSON body is stored compressed",
        body.len()
    );
    assert!(
        stored[0].raw.len() < body.len() / 2,
        "{} of {} bytes",
        stored[0].raw.len(),
        body.len()
    );
    assert_eq!(
        (&stored[0].body, &stored[0].payload),
        (&body, &None),
        "the body is stored exactly as received"
    );
    assert_eq!(
        event["summary"],
        json!({
            "events": [{
                "kind": "tag",
                "repo": "Codertocat/Hello-World",
                "ref": "refs/tags/simple-tag",
                "sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            }],
        })
    );
    assert_eq!(relay.events().await.len(), 1);
    assert_eq!(relay.jobs("").await.len(), 0);
    relay.stop().await;
}
