//! Values of the language that are more than a string: rates and failure
//! allowances, parsed here once so every later stage reads the same meaning.

/// `5000/s` (also `/m`, `/h`) as events per second.
pub fn parse_rate(rate: &str) -> Option<f64> {
    let (n, unit) = rate.trim().split_once('/')?;
    let n: f64 = n.trim().replace('_', "").parse().ok()?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    (n > 0.0).then_some(n / per)
}

/// A count, or a percentage of the rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailures {
    Count(u64),
    Percent(f64),
}

pub fn parse_max_failures(s: &str) -> Option<MaxFailures> {
    let s = s.trim();
    match s.strip_suffix('%') {
        Some(pct) => {
            pct.trim().parse::<f64>().ok().filter(|v| (0.0..=100.0).contains(v)).map(MaxFailures::Percent)
        }
        None => s.parse::<u64>().ok().map(MaxFailures::Count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_failures() {
        assert_eq!(parse_rate("5000/s"), Some(5000.0));
        assert_eq!(parse_rate("60/m"), Some(1.0));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_max_failures("10"), Some(MaxFailures::Count(10)));
        assert_eq!(parse_max_failures("0.5%"), Some(MaxFailures::Percent(0.5)));
        assert_eq!(parse_max_failures("lots"), None);
    }
}
