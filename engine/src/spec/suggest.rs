//! "Did you mean" hints: the closest known name to a misspelt one.

/// The candidate closest to `wrong`, if it is close enough to be a likely typo.
pub fn closest<'a, I>(wrong: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(wrong, c), c))
        .filter(|(d, c)| *d > 0 && *d <= (c.len().max(wrong.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `"; did you mean 'x'?"` or nothing.
pub fn hint<'a, I>(wrong: &str, candidates: I) -> String
where
    I: IntoIterator<Item = &'a str>,
{
    closest(wrong, candidates).map(|c| format!("; did you mean '{c}'?")).unwrap_or_default()
}

/// `'a', 'b' or 'c'`, for messages that list the valid choices.
pub fn one_of<S: AsRef<str>>(choices: &[S]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("'{}'", c.as_ref())).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_close_names_only() {
        let names = ["flagged", "transactions", "alerts"];
        assert_eq!(closest("flaged", names), Some("flagged"));
        assert_eq!(closest("transactons", names), Some("transactions"));
        assert_eq!(closest("zzz", names), None);
        assert_eq!(closest("alerts", names), None);
    }

    #[test]
    fn lists_choices() {
        assert_eq!(one_of(&["a"]), "'a'");
        assert_eq!(one_of(&["a", "b", "c"]), "'a', 'b' or 'c'");
    }
}
