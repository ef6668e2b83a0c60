//! Values of the language that are more than a string: durations, rates and
//! failure allowances. Each is parsed once, when the spec is read (a bad one
//! is an error with its place, like any other), keeps the text the user
//! wrote for messages and graphs, and every later stage reads the same
//! meaning.

use std::borrow::Cow;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements serde and JSON Schema for a value read from its text.
macro_rules! text_value {
    ($t:ty, $name:literal, $doc:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                <$t>::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "description": $doc })
            }
        }
    };
}

/// A length of time: `500ms`, `30s`, `10m`, `1h`, `1d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duration {
    value: std::time::Duration,
    text: String,
}

impl Duration {
    pub fn parse(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(|value| Self { value, text: text.to_string() })
            .map_err(|_| format!("bad duration '{text}'; write e.g. 500ms, 30s, 10m, 1d"))
    }

    pub fn get(&self) -> std::time::Duration {
        self.value
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

text_value!(Duration, "Duration", "A length of time: `500ms`, `30s`, `10m`, `1h`, `1d`.");

/// Events per unit of time: `5000/s`, `60/m`, `10/h`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    per_second: f64,
    text: String,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_rate(text)
            .map(|per_second| Self { per_second, text: text.to_string() })
            .ok_or_else(|| format!("bad rate '{text}'; write events per second, e.g. 5000/s"))
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

text_value!(Rate, "Rate", "Events per second (`5000/s`), minute (`60/m`) or hour (`10/h`).");

/// `5000/s` (also `/m`, `/h`) as events per second.
fn parse_rate(rate: &str) -> Option<f64> {
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

/// How many failing rows a quarantining check allows: a count, or a
/// percentage of the rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailures {
    Count(u64),
    Percent(f64),
}

impl MaxFailures {
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let parsed = match s.strip_suffix('%') {
            Some(pct) => {
                pct.trim().parse::<f64>().ok().filter(|v| (0.0..=100.0).contains(v)).map(MaxFailures::Percent)
            }
            None => s.parse::<u64>().ok().map(MaxFailures::Count),
        };
        parsed.ok_or_else(|| format!("bad count or share '{text}'; write a count (10) or a share (\"0.5%\")"))
    }

    /// The rows allowed to fail out of `rows`.
    pub fn allowed(self, rows: u64) -> u64 {
        match self {
            MaxFailures::Count(n) => n,
            MaxFailures::Percent(p) => ((rows as f64) * p / 100.0).floor() as u64,
        }
    }
}

impl fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailures::Count(n) => write!(f, "{n}"),
            MaxFailures::Percent(p) => write!(f, "{p}%"),
        }
    }
}

text_value!(MaxFailures, "MaxFailures", "A count of rows (`10`) or a share of them (`\"0.5%\"`).");

/// A change in size as a share: `50%` (`max_growth` may pass `100%`).
#[derive(Debug, Clone, PartialEq)]
pub struct Percent {
    value: f64,
    text: String,
}

impl Percent {
    pub fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|value| Self { value, text: text.to_string() })
            .ok_or_else(|| format!("bad share '{text}'; write a percentage, e.g. 50%"))
    }

    /// The share in percent (`50%` is 50.0).
    pub fn get(&self) -> f64 {
        self.value
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

text_value!(Percent, "Percent", "A share in percent: `50%`.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_rates_and_failures() {
        assert_eq!(Duration::parse("1500ms").map(|d| d.get()), Ok(std::time::Duration::from_millis(1500)));
        assert!(Duration::parse("soon").unwrap_err().contains("bad duration 'soon'"));
        assert_eq!(Rate::parse("5000/s").map(|r| r.per_second()), Ok(5000.0));
        assert_eq!(Rate::parse("60/m").map(|r| r.per_second()), Ok(1.0));
        assert!(Rate::parse("fast").is_err());
        assert!(Rate::parse("0/s").is_err());
        assert_eq!(MaxFailures::parse("10"), Ok(MaxFailures::Count(10)));
        assert_eq!(MaxFailures::parse("0.5%"), Ok(MaxFailures::Percent(0.5)));
        assert_eq!(MaxFailures::parse("0.5%").map(|m| m.allowed(1000)), Ok(5));
        assert!(MaxFailures::parse("lots").is_err());
        assert!(MaxFailures::parse("150%").is_err());
        assert_eq!(Percent::parse("50%").map(|p| p.get()), Ok(50.0));
        assert_eq!(Percent::parse("300%").map(|p| p.get()), Ok(300.0));
        assert!(Percent::parse("50").unwrap_err().contains("bad share '50'"));
        assert!(Percent::parse("-5%").is_err());
    }
}
