//! Keeps secrets out of everything the engine prints.
//!
//! Passwords reach a spec through connection URLs rendered from `env` or
//! `file(...)`: in the user info (`user:password@`), in the query string
//! (`?password=...`), written plain or percent-encoded. Every such secret is
//! collected when a spec loads, kept for the process (so that the CLI can
//! mask errors and log lines however they were made), and masked wherever
//! the engine shows text.

use std::sync::Mutex;

use super::model::Pipeline;

/// Query parameters whose values are secrets.
const SECRET_PARAMS: &[&str] =
    &["password", "pass", "pwd", "sslpassword", "secret", "token", "apikey", "api_key"];

fn secret_param(name: &str) -> bool {
    SECRET_PARAMS.contains(&name.to_ascii_lowercase().as_str())
}

/// Every secret of every spec loaded in this process.
static KNOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    pub fn from_pipeline(p: &Pipeline) -> Self {
        let secrets: Vec<String> = p.connections.values().flat_map(|c| url_secrets(c.url())).collect();
        remember(&secrets);
        Secrets(secrets)
    }

    /// `text` with every known secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        mask(text, &self.0)
    }
}

/// Keeps `secrets` for [`scrub`].
pub fn remember(secrets: &[String]) {
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    for s in secrets {
        if !known.contains(s) {
            known.push(s.clone());
        }
    }
    // Longest first: a secret that contains another is masked whole.
    known.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every secret of the specs loaded so far replaced by `***`.
pub fn scrub(text: &str) -> String {
    let known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    mask(text, &known)
}

fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = if s.len() >= 3 { out.replace(s.as_str(), "***") } else { mask_word(&out, s) };
    }
    out
}

/// `text` with `secret` replaced where it stands as a word of its own (not
/// beside a letter or digit): a password of one or two characters would
/// otherwise be masked inside every other word.
fn mask_word(text: &str, secret: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(i) = text[at..].find(secret).map(|i| at + i) {
        let before = text[..i].chars().next_back();
        let after = text[i + secret.len()..].chars().next();
        let rest = &text[at..];
        let i = i - at;
        out.push_str(&rest[..i]);
        if word(before) || word(after) {
            out.push_str(secret);
        } else {
            out.push_str("***");
        }
        at += i + secret.len();
    }
    out.push_str(&text[at..]);
    out
}

/// The secrets of a URL: the password of `scheme://user:password@host` and
/// the values of secret query parameters, as written and percent-decoded.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut raw = Vec::new();
    if let Some(p) = url_password(url) {
        raw.push(p);
    }
    if let Some((_, query)) = url.split_once('?') {
        let query = query.split('#').next().unwrap_or_default();
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if secret_param(k) && !v.is_empty() {
                    raw.push(v.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    for r in raw {
        let decoded = percent_encoding::percent_decode_str(&r).decode_utf8_lossy().into_owned();
        if decoded != r {
            out.push(decoded);
        }
        out.push(r);
    }
    out
}

/// The password in `scheme://user:password@host`, as written, if any.
pub fn url_password(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// A URL safe to print: its password and secret query values replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = match url_password(url) {
        Some(p) => url.replacen(&format!(":{p}@"), ":***@", 1),
        None => url.to_string(),
    };
    if let Some((head, query)) = out.clone().split_once('?') {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_param(k) => {
                    format!("{k}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{head}?{}", pairs.join("&"));
    }
    out
}

/// Standard error, with every known secret masked: what the log lines of
/// the process are written to.
pub struct ScrubbedStderr;

impl std::io::Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A log line arrives whole (tracing formats it first), so a secret
        // is never split between two writes.
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
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
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=hunter2"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert_eq!(url_secrets("postgres://app:p%40ss@db/x"), vec!["p@ss".to_string(), "p%40ss".to_string()]);
        assert_eq!(url_secrets("redis://h/?token=abc"), vec!["abc".to_string()]);
    }

    /// A password of one or two characters is masked where it stands as a
    /// word of its own, and left alone inside other words.
    #[test]
    fn short_passwords_are_masked_too() {
        let secrets = Secrets(url_secrets("postgres://app:x9@db:5432/dwh"));
        assert_eq!(
            secrets.scrub("connection 'dwh' (postgres://app:x9@db:5432/dwh): password x9 refused"),
            "connection 'dwh' (postgres://app:***@db:5432/dwh): password *** refused"
        );
        assert_eq!(secrets.scrub("tx9 and x99 are other words"), "tx9 and x99 are other words");
    }
}
