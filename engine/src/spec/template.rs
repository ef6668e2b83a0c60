//! Templating of string values with MiniJinja, after the YAML is parsed.
//!
//! The context has `env` (the process environment, then a `.env` file in the
//! working directory for names the environment lacks) and `vars` (the spec's
//! defaults overridden by `--var`). Undefined names are errors that name the
//! variable; `| default(...)` supplies a fallback.

use std::collections::BTreeMap;
use std::path::Path;

use marked_yaml::types::MarkedScalarNode;
use marked_yaml::Node;
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

use super::suggest;
use super::yaml::{span_pos, Reader};
use crate::error::Pos;

/// The values templates can see.
#[derive(Debug, Clone, Default)]
pub struct TemplateContext {
    pub env: BTreeMap<String, String>,
    pub vars: serde_json::Map<String, serde_json::Value>,
}

impl TemplateContext {
    /// The process environment plus `.env` in `dir` (the process wins).
    pub fn from_environment(dir: &Path) -> Self {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        if let Ok(iter) = dotenvy::from_path_iter(dir.join(".env")) {
            env.extend(iter.flatten());
        }
        env.extend(std::env::vars());
        Self { env, vars: Default::default() }
    }
}

pub struct Templater {
    jinja: Environment<'static>,
}

impl Default for Templater {
    fn default() -> Self {
        let mut jinja = Environment::new();
        jinja.set_undefined_behavior(UndefinedBehavior::Strict);
        jinja.add_function("file", read_secret_file);
        Self { jinja }
    }
}

/// `file('/run/secrets/NAME')`: a file's text without its final newline, as
/// Docker and Kubernetes mount secrets. The text is masked in all output.
fn read_secret_file(path: String) -> Result<String, minijinja::Error> {
    let text = std::fs::read_to_string(&path).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("file('{path}'): cannot read it: {e}"))
    })?;
    let text =
        text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_string();
    crate::spec::redact::remember(std::slice::from_ref(&text));
    Ok(text)
}

impl Templater {
    /// Renders one string; the error text names what is wrong.
    pub fn render(&self, text: &str, ctx: &TemplateContext) -> Result<String, String> {
        if !text.contains("{{") && !text.contains("{%") {
            return Ok(text.to_string());
        }
        let tmpl = self.jinja.template_from_str(text).map_err(|e| syntax_message(&e))?;
        let values = minijinja::context! {
            env => Value::from(minijinja::value::Serde(&ctx.env)),
            vars => Value::from(minijinja::value::Serde(&ctx.vars)),
        };
        tmpl.render(values).map_err(|e| {
            if e.kind() == ErrorKind::UndefinedError {
                undefined_message(&tmpl.undeclared_variables(true), ctx)
                    .unwrap_or_else(|| format!("template error: {}", detail(&e)))
            } else {
                format!("template error: {}", detail(&e))
            }
        })
    }

    /// Renders every scalar value (not keys) below `node` in place.
    pub fn render_tree(&self, node: &mut Node, ctx: &TemplateContext, r: &mut Reader) {
        match node {
            Node::Scalar(s) => self.render_scalar(s, ctx, r),
            Node::Sequence(seq) => seq.iter_mut().for_each(|n| self.render_tree(n, ctx, r)),
            Node::Mapping(map) => map.values_mut().for_each(|n| self.render_tree(n, ctx, r)),
        }
    }

    fn render_scalar(&self, s: &mut MarkedScalarNode, ctx: &TemplateContext, r: &mut Reader) {
        match self.render(s.as_str(), ctx) {
            Ok(out) if out != s.as_str() => {
                // A rendered value is typed by what it became: "{{ vars.rows }}"
                // is a number when the variable is one.
                *s = MarkedScalarNode::new(*s.span(), out);
            }
            Ok(_) => {}
            Err(msg) => r.error(span_pos(s.span()), msg),
        }
    }
}

fn detail(e: &minijinja::Error) -> String {
    e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string())
}

fn syntax_message(e: &minijinja::Error) -> String {
    format!("bad template: {}", detail(e))
}

/// Names the first variable the template uses that the context lacks.
fn undefined_message(used: &std::collections::HashSet<String>, ctx: &TemplateContext) -> Option<String> {
    let mut used: Vec<&String> = used.iter().collect();
    used.sort();
    for name in used {
        let (root, rest) = name.split_once('.').unwrap_or((name.as_str(), ""));
        match root {
            "env" if !rest.is_empty() && !ctx.env.contains_key(rest) => {
                return Some(format!(
                    "environment variable '{rest}' is not set; set it (or add it to .env) or give a fallback with `| default('...')`"
                ));
            }
            "vars" if !rest.is_empty() && !ctx.vars.contains_key(rest) => {
                let hint = suggest::hint(rest, ctx.vars.keys().map(String::as_str));
                return Some(format!("variable '{rest}' is not defined under 'vars:'{hint}"));
            }
            "env" | "vars" => {}
            other => {
                return Some(format!(
                    "unknown template variable '{other}'; templates can use 'env' and 'vars'"
                ));
            }
        }
    }
    None
}

/// Parses `--var key=value` flags; values are typed like YAML scalars.
pub fn parse_var_flags(flags: &[String]) -> Result<Vec<(String, serde_json::Value)>, String> {
    flags
        .iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), super::yaml::scalar_to_json(v)))
            }
            _ => Err(format!("--var '{f}': expected key=value")),
        })
        .collect()
}

/// Where a template problem is reported when no node is at hand.
pub fn top() -> Pos {
    Pos::new(1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TemplateContext {
        let mut c = TemplateContext::default();
        c.env.insert("HOST".into(), "db".into());
        c.vars.insert("days".into(), serde_json::json!(30));
        c
    }

    #[test]
    fn renders_env_vars_and_defaults() {
        let t = Templater::default();
        assert_eq!(t.render("{{ env.HOST }}:{{ vars.days }}", &ctx()).unwrap(), "db:30");
        assert_eq!(t.render("{{ env.NOPE | default('x') }}", &ctx()).unwrap(), "x");
        assert_eq!(t.render("plain", &ctx()).unwrap(), "plain");
    }

    #[test]
    fn names_missing_variables() {
        let t = Templater::default();
        let e = t.render("{{ env.SOURCE_DATABASE_URL }}", &ctx()).unwrap_err();
        assert!(e.starts_with("environment variable 'SOURCE_DATABASE_URL' is not set"), "{e}");
        let e = t.render("{{ vars.dayz }}", &ctx()).unwrap_err();
        assert_eq!(e, "variable 'dayz' is not defined under 'vars:'; did you mean 'days'?");
        let e = t.render("{{ vars.days ", &ctx()).unwrap_err();
        assert!(e.starts_with("bad template:"), "{e}");
    }
}
