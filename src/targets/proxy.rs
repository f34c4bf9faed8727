//! A target's outbound proxy: the `proxy` setting compiled from
//! `[targets.NAME]`, how `relay check` shows it, and which proxy a request
//! goes through (for attempt messages). `sends` builds the client for it.
//!
//! Absent, a target follows the environment (`HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`, upper or lower case), read when its client is
//! built; `false` goes direct; a URL or `{ url, username, password }` names
//! the proxy, and `NO_PROXY` still applies to it, as in curl. A proxy's
//! password is a secret: nothing here shows one, and every shown proxy URL is
//! `scheme://host:port` alone.

use std::fmt;

use hyper_util::client::proxy::matcher::Matcher;
use percent_encoding::percent_decode_str;

use crate::config::compiler::Compiler;
use crate::config::raw::RawProxy;
use crate::secret::{REDACTED, Secret, SecretSpec};

/// The variables the environment's proxy settings are read from, in the
/// order they are shown; reqwest and curl read the same.
const ENV_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// How a target's requests reach it.
#[derive(Debug, Clone, Default)]
pub enum ProxySetting {
    /// No `proxy` key: whatever the environment says when the client is built.
    #[default]
    Environment,
    /// `proxy = false`: straight to the target, whatever the environment says.
    Direct,
    /// `proxy = "http://…"` or `proxy = { url, username, password }`.
    Explicit(ExplicitProxy),
}

/// A proxy named in the config.
#[derive(Debug, Clone)]
pub struct ExplicitProxy {
    /// `scheme://host:port`, without credentials: the form that is shown.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl ProxySetting {
    /// Compiles `KEY.proxy`; problems are reported at that key.
    pub fn compile(target_key: &str, raw: Option<&RawProxy>, c: &mut Compiler) -> ProxySetting {
        let key = format!("{target_key}.proxy");
        match raw {
            None => ProxySetting::Environment,
            Some(RawProxy::Switch(false)) => ProxySetting::Direct,
            Some(RawProxy::Switch(true)) => {
                c.problem(
                    key,
                    "true names no proxy; leave the key out to follow HTTPS_PROXY, HTTP_PROXY and NO_PROXY, or write false or a proxy URL",
                );
                ProxySetting::Environment
            }
            Some(RawProxy::Url(url)) => explicit(&key, url, None, None, c),
            Some(RawProxy::Table(t)) => explicit(&key, &t.url, t.username.as_deref(), t.password.as_ref(), c),
        }
    }

    /// How `relay check` shows it, or `None` for the environment's settings
    /// when the environment sets no proxy at all.
    pub fn describe(&self) -> Option<String> {
        match self {
            ProxySetting::Environment => {
                let set: Vec<String> = ENV_VARS
                    .iter()
                    .filter_map(|name| {
                        let value = std::env::var(name).ok().filter(|v| !v.is_empty())?;
                        let shown = if name.eq_ignore_ascii_case("NO_PROXY") {
                            value
                        } else {
                            mask(&value)
                        };
                        Some(format!("{name}={shown}"))
                    })
                    .collect();
                (!set.is_empty()).then(|| format!("proxy from the environment ({})", set.join(", ")))
            }
            ProxySetting::Direct => Some("direct (proxy = false)".to_owned()),
            ProxySetting::Explicit(p) => {
                let auth = match (&p.username, &p.password) {
                    (Some(user), Some(password)) => {
                        format!(" as {user}, password from {}", password.origin())
                    }
                    (Some(user), None) => format!(" as {user}, no password"),
                    _ => String::new(),
                };
                Some(format!("via proxy {}{auth}", p.url))
            }
        }
    }

    /// The proxy's password, to be scrubbed from anything shown.
    pub fn password(&self) -> Option<&Secret> {
        match self {
            ProxySetting::Explicit(p) => p.password.as_ref(),
            _ => None,
        }
    }
}

fn explicit(
    key: &str,
    source: &str,
    username: Option<&str>,
    password: Option<&SecretSpec>,
    c: &mut Compiler,
) -> ProxySetting {
    let url = match reqwest::Url::parse(source) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
        _ => {
            c.problem(
                key,
                format!("{:?} is not an http:// or https:// proxy URL", mask(source)),
            );
            return ProxySetting::Environment;
        }
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        c.problem(key, format!("{:?} names no host", mask(source)));
        return ProxySetting::Environment;
    };
    let shown = format!("{}://{host}:{port}", url.scheme());
    let inline = !url.username().is_empty() || url.password().is_some();
    if inline && (username.is_some() || password.is_some()) {
        c.problem(
            key,
            "the URL carries credentials and the table names username or password too; give them once",
        );
        return ProxySetting::Environment;
    }
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (username, password) = if inline {
        let password = url.password().map(|p| {
            c.warn(format!(
                "{key} carries a password written into the config file; prefer {{ url = \"{shown}\", username = \"…\", password = {{ env = \"…\" }} }}"
            ));
            Secret::from_bytes(decode(p), "the proxy URL in the config file")
        });
        (Some(decode(url.username())), password)
    } else {
        if password.is_some() && username.is_none() {
            c.problem(format!("{key}.password"), "needs username");
            return ProxySetting::Environment;
        }
        let password = match password {
            Some(spec) => match c.secret(&format!("{key}.password"), spec) {
                Some(secret) => Some(secret),
                None => return ProxySetting::Environment,
            },
            None => None,
        };
        (username.map(str::to_owned), password)
    };
    ProxySetting::Explicit(ExplicitProxy {
        url: shown,
        username,
        password,
    })
}

/// A proxy URL fit to show: any userinfo replaced by `[redacted]`.
fn mask(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{REDACTED}@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The client a target sends through, with the proxy rules it was built
/// with, so an attempt can say which proxy a failure happened through.
pub struct Outbound {
    pub client: reqwest::Client,
    /// `None` for a direct client.
    rules: Option<Matcher>,
}

impl Outbound {
    /// Pairs `client`, built for `setting`, with the same rules reqwest
    /// applies; the environment is read now, as the client read it.
    pub fn new(client: reqwest::Client, setting: &ProxySetting) -> Outbound {
        let rules = match setting {
            ProxySetting::Environment => Some(Matcher::from_system()),
            ProxySetting::Direct => None,
            ProxySetting::Explicit(p) => Some(
                Matcher::builder()
                    .all(p.url.clone())
                    .no(no_proxy_from_env().unwrap_or_default())
                    .build(),
            ),
        };
        Outbound { client, rules }
    }

    /// The proxy a request to `url` goes through, as `scheme://host:port`.
    pub fn proxy_for(&self, url: &str) -> Option<String> {
        let uri: http::Uri = url.parse().ok()?;
        let intercept = self.rules.as_ref()?.intercept(&uri)?;
        let proxy = intercept.uri();
        let scheme = proxy.scheme_str().unwrap_or("http");
        let host = proxy.host()?;
        let port = proxy
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Some(format!("{scheme}://{host}:{port}"))
    }
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("proxied", &self.rules.is_some())
            .finish_non_exhaustive()
    }
}

/// `NO_PROXY`, else `no_proxy`, as reqwest reads it.
pub fn no_proxy_from_env() -> Option<String> {
    std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawProxyTable;

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    fn compile(raw: RawProxy) -> (ProxySetting, Compiler) {
        let mut c = Compiler::default();
        let setting = ProxySetting::compile("targets.ci", Some(&raw), &mut c);
        (setting, c)
    }

    #[test]
    fn false_is_direct_and_true_is_a_problem() {
        assert!(matches!(compile(RawProxy::Switch(false)).0, ProxySetting::Direct));
        let (_, c) = compile(RawProxy::Switch(true));
        assert_eq!(c.problems()[0].key, "targets.ci.proxy");
    }

    #[test]
    fn only_http_and_https_proxies_and_the_key_is_named() {
        let (_, c) = compile(RawProxy::Url("ftp://x".to_owned()));
        assert_eq!(c.problems()[0].key, "targets.ci.proxy");
        assert_eq!(
            c.problems()[0].message,
            r#""ftp://x" is not an http:// or https:// proxy URL"#
        );
        let (_, c) = compile(RawProxy::Url("socks5://u:hunter22@x:1080".to_owned()));
        assert!(!c.problems()[0].message.contains("hunter22"));
    }

    #[test]
    fn an_inline_password_is_taken_and_warned_about_never_shown() {
        let (setting, c) = compile(RawProxy::Url("http://u:p%40ss-word-1@proxy:3128/".to_owned()));
        let ProxySetting::Explicit(p) = &setting else {
            panic!("not explicit: {setting:?}")
        };
        assert_eq!(p.url, "http://proxy:3128");
        assert_eq!(p.username.as_deref(), Some("u"));
        assert_eq!(p.password.as_ref().unwrap().expose(), b"p@ss-word-1");
        assert!(
            c.warnings()
                .iter()
                .any(|w| w.contains("targets.ci.proxy carries a password"))
        );
        let shown = setting.describe().unwrap();
        assert!(!shown.contains("p@ss"), "{shown}");
        assert!(!format!("{setting:?}").contains("p@ss"));
    }

    #[test]
    fn a_table_password_is_a_secret_and_needs_a_username() {
        let spec: SecretSpec = serde_json::from_str(r#"{"env":"RELAY_TEST_UNSET_PROXY_PASSWORD"}"#).unwrap();
        let (_, c) = compile(RawProxy::Table(RawProxyTable {
            url: "http://proxy:3128".to_owned(),
            username: Some("u".to_owned()),
            password: Some(spec.clone()),
        }));
        assert_eq!(c.problems()[0].key, "targets.ci.proxy.password");
        let (_, c) = compile(RawProxy::Table(RawProxyTable {
            url: "http://proxy:3128".to_owned(),
            username: None,
            password: Some(spec),
        }));
        assert_eq!(c.problems()[0].message, "needs username");
        let (setting, c) = compile(RawProxy::Table(RawProxyTable {
            url: "https://proxy".to_owned(),
            username: Some("u".to_owned()),
            password: None,
        }));
        assert!(c.problems().is_empty());
        assert_eq!(
            setting.describe().unwrap(),
            "via proxy https://proxy:443 as u, no password"
        );
    }

    #[test]
    fn masking_drops_userinfo_only() {
        assert_eq!(mask("http://u:p@h:1/x@y"), "http://[redacted]@h:1/x@y");
        assert_eq!(mask("http://h:1"), "http://h:1");
        assert_eq!(mask("h:1"), "h:1");
    }

    #[test]
    fn an_explicit_proxy_is_named_for_the_requests_it_carries() {
        let (setting, _) = compile(RawProxy::Url("http://127.0.0.1:3128".to_owned()));
        let outbound = Outbound::new(client(), &setting);
        // NO_PROXY may be set where the tests run; only assert when it is not.
        if no_proxy_from_env().is_none() {
            assert_eq!(
                outbound.proxy_for("https://circleci.com/api/v2/x").as_deref(),
                Some("http://127.0.0.1:3128")
            );
        }
        let direct = Outbound::new(client(), &ProxySetting::Direct);
        assert_eq!(direct.proxy_for("https://circleci.com/"), None);
    }
}
