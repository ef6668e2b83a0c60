//! Keeps secrets out of everything the engine prints.
//!
//! Passwords reach a spec only through connection URLs rendered from `env`;
//! every such password is collected here and masked wherever the engine shows
//! text derived from the spec (errors, graphs, logs, reports).

use super::model::Pipeline;

#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    pub fn from_pipeline(p: &Pipeline) -> Self {
        Secrets(p.connections.values().filter_map(|c| url_password(c.url())).collect())
    }

    /// `text` with every known secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.0 {
            out = out.replace(s.as_str(), "***");
        }
        out
    }
}

/// The password in `scheme://user:password@host`, if any.
pub fn url_password(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// A URL safe to print: its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match url_password(url) {
        Some(p) => url.replacen(&format!(":{p}@"), ":***@", 1),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_url_passwords() {
        assert_eq!(redact_url("postgres://app:s3cr@t@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(url_password("mongodb://u:pw@h/"), Some("pw".into()));
    }
}
