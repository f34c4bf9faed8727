//! The one template and expression engine (minijinja), for target fields
//! (`"{{ tag }}"`) and route conditions (`when = "'[wip]' not in message"`).
//!
//! Everything is compiled once, at config load, where syntax errors and unknown
//! variable names are reported with the key that holds them. Rendering is pure:
//! no I/O, no clock, no environment.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::BTreeSet;

use minijinja::value::Value;
use minijinja::{Environment, UndefinedBehavior};

use crate::event::CONTEXT_FIELDS;

/// A config string that may hold a template. Plain strings skip the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateStr {
    Literal(String),
    /// Registered in [`Templates`] under this name (the config key).
    Template {
        name: String,
        source: String,
    },
}

impl TemplateStr {
    /// The text as written in the config.
    pub fn source(&self) -> &str {
        match self {
            TemplateStr::Literal(s) => s,
            TemplateStr::Template { source, .. } => source,
        }
    }
}

/// A compiled `when` expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    name: String,
    source: String,
}

impl Condition {
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A template that does not compile or reads a name the context lacks.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TemplateError {
    pub key: String,
    pub message: String,
}

/// A template that compiled but failed on this event's data.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct RenderError {
    pub key: String,
    pub message: String,
}

/// Every template of one config, compiled.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    /// The event fields some template or expression reads.
    reads: BTreeSet<&'static str>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl Templates {
    pub fn new() -> Templates {
        let mut env = Environment::new();
        // Printing a missing value fails loudly (a typo must not render as ""),
        // while `if payload.x` on a missing key is simply false.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        Templates {
            env,
            reads: BTreeSet::new(),
        }
    }

    /// Compiles a string field; `key` names it in errors (`targets.x.branch`).
    pub fn field(&mut self, key: &str, source: &str) -> Result<TemplateStr, TemplateError> {
        if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
            return Ok(TemplateStr::Literal(source.to_owned()));
        }
        self.register(key, source.to_owned())?;
        Ok(TemplateStr::Template {
            name: key.to_owned(),
            source: source.to_owned(),
        })
    }

    /// Compiles a `when` expression.
    pub fn condition(&mut self, key: &str, expr: &str) -> Result<Condition, TemplateError> {
        self.env
            .compile_expression(expr)
            .map_err(|e| template_error(key, &e))?;
        // An expression cannot be stored beside its environment, so it is kept
        // as a template that prints a marker when the expression is true.
        self.register(key, format!("{{% if ({expr}) %}}1{{% endif %}}"))?;
        Ok(Condition {
            name: key.to_owned(),
            source: expr.to_owned(),
        })
    }

    fn register(&mut self, key: &str, source: String) -> Result<(), TemplateError> {
        self.env
            .add_template_owned(key.to_owned(), source)
            .map_err(|e| template_error(key, &e))?;
        let template = self.env.get_template(key).map_err(|e| template_error(key, &e))?;
        let globals: BTreeSet<String> = self.env.globals().map(|(k, _)| k.to_owned()).collect();
        let names = template.undeclared_variables(false);
        self.reads.extend(
            CONTEXT_FIELDS
                .iter()
                .copied()
                .filter(|field| names.contains(*field)),
        );
        let unknown: Vec<String> = names
            .into_iter()
            .filter(|name| !CONTEXT_FIELDS.contains(&name.as_str()) && !globals.contains(name))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unknown.is_empty() {
            return Err(TemplateError {
                key: key.to_owned(),
                message: format!(
                    "unknown variable {}; the event has: {}",
                    unknown.join(", "),
                    CONTEXT_FIELDS.join(", ")
                ),
            });
        }
        Ok(())
    }

    /// Whether some template or expression reads this event field.
    pub fn reads(&self, field: &str) -> bool {
        self.reads.contains(field)
    }

    /// `field`'s text: a plain string as written, a template rendered in
    /// `ctx` (which only a template builds).
    pub fn render<'a>(&self, field: &'a TemplateStr, ctx: &Context<'_>) -> Result<Cow<'a, str>, RenderError> {
        match field {
            TemplateStr::Literal(s) => Ok(Cow::Borrowed(s)),
            TemplateStr::Template { name, .. } => self.render_named(name, ctx.value()).map(Cow::Owned),
        }
    }

    pub fn test(&self, condition: &Condition, ctx: &Context<'_>) -> Result<bool, RenderError> {
        Ok(self.render_named(&condition.name, ctx.value())? == "1")
    }

    fn render_named(&self, name: &str, ctx: &Value) -> Result<String, RenderError> {
        let render_error = |e: minijinja::Error| RenderError {
            key: name.to_owned(),
            message: describe(&e),
        };
        self.env
            .get_template(name)
            .map_err(render_error)?
            .render(ctx)
            .map_err(render_error)
    }
}

/// The context templates and conditions render in, built when the first of
/// them needs it. Most fields a trigger sends are plain strings or taken
/// from the event as they are, and most routes have no `when`: building
/// every event field as a template value for each event, used or not, was
/// 9,000 instructions a webhook (callgrind), 2% of relay's.
pub struct Context<'a> {
    value: OnceCell<Value>,
    build: &'a dyn Fn() -> Value,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("value", &self.value.get())
            .finish()
    }
}

impl<'a> Context<'a> {
    /// A context `build` makes on first use, once.
    pub fn lazy(build: &'a dyn Fn() -> Value) -> Context<'a> {
        Context {
            value: OnceCell::new(),
            build,
        }
    }

    /// Whether it has been made (by a first use).
    #[cfg(test)]
    pub fn is_built(&self) -> bool {
        self.value.get().is_some()
    }

    fn value(&self) -> &Value {
        self.value.get_or_init(self.build)
    }
}

fn template_error(key: &str, e: &minijinja::Error) -> TemplateError {
    TemplateError {
        key: key.to_owned(),
        message: describe(e),
    }
}

/// minijinja's message without its debug dump of the template.
fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn literals_skip_the_engine() {
        let mut t = Templates::new();
        assert_eq!(t.field("k", "main").unwrap(), TemplateStr::Literal("main".into()));
    }

    #[test]
    fn renders_fields_and_conditions() {
        let mut t = Templates::new();
        let f = t.field("targets.x.branch", "release/{{ tag }}").unwrap();
        let c = t.condition("routes[0].when", "'[wip]' not in message").unwrap();
        let wip = || context! { tag => "v1", message => "fix [wip]" };
        let ctx = Context::lazy(&wip);
        assert_eq!(t.render(&f, &ctx).unwrap(), "release/v1");
        assert!(!t.test(&c, &ctx).unwrap());
        let fix = || context! { tag => "v1", message => "fix" };
        assert!(t.test(&c, &Context::lazy(&fix)).unwrap());
    }

    /// A plain string renders without the context being built; the first
    /// template or condition builds it, and only once.
    #[test]
    fn the_context_is_built_by_the_first_template_and_only_once() {
        let mut t = Templates::new();
        let plain = t.field("targets.x.project", "gh/acme/api").unwrap();
        let f = t.field("targets.x.branch", "release/{{ tag }}").unwrap();
        let c = t.condition("routes[0].when", "tag == 'v1'").unwrap();
        let builds = std::cell::Cell::new(0);
        let build = || {
            builds.set(builds.get() + 1);
            context! { tag => "v1" }
        };
        let ctx = Context::lazy(&build);
        assert_eq!(t.render(&plain, &ctx).unwrap(), "gh/acme/api");
        assert!(!ctx.is_built());
        assert_eq!(builds.get(), 0);
        assert_eq!(t.render(&f, &ctx).unwrap(), "release/v1");
        assert!(t.test(&c, &ctx).unwrap());
        assert_eq!(t.render(&f, &ctx).unwrap(), "release/v1");
        assert!(ctx.is_built());
        assert_eq!(builds.get(), 1);
    }

    #[test]
    fn unknown_variable_names_the_key() {
        let mut t = Templates::new();
        let err = t.field("targets.x.branch", "{{ brnach }}").unwrap_err();
        assert_eq!(err.key, "targets.x.branch");
        assert!(err.message.contains("unknown variable brnach"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_key() {
        let mut t = Templates::new();
        let err = t.condition("routes[1].when", "branch ==").unwrap_err();
        assert_eq!(err.key, "routes[1].when");
        let err = t.field("targets.y.tag", "{{ tag ").unwrap_err();
        assert_eq!(err.key, "targets.y.tag");
    }

    #[test]
    fn printing_a_missing_payload_key_fails_but_testing_it_is_false() {
        let mut t = Templates::new();
        let f = t.field("f", "{{ payload.nope }}").unwrap();
        let c = t.condition("c", "payload.nope").unwrap();
        let payload = || context! { payload => context! { yes => 1 } };
        let ctx = Context::lazy(&payload);
        assert!(t.render(&f, &ctx).is_err());
        assert!(!t.test(&c, &ctx).unwrap());
    }
}
