//! The one duration syntax: a whole number and a unit (`"500ms"`, `"30s"`, `"5m"`, `"2h"`,
//! `"1d"`), used by the attribute and the environment alike. Whether zero is allowed is a
//! rule of each key, not of the syntax.

use std::time::Duration;

/// Duration units and their length in milliseconds.
const UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

const FORM: &str = "write one integer and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"2h\", \"1d\"";

/// Parse `"<integer><unit>"` (units `ms`, `s`, `m`, `h`, `d`). The error says how to write
/// it right.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(format!("\"{text}\" is not a duration: {FORM}"));
    }
    let Some(&(_, unit_millis)) = UNITS.iter().find(|(known, _)| *known == unit) else {
        return Err(unit_error(text, number, unit));
    };
    let count: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is too long a duration"))?;
    count
        .checked_mul(unit_millis)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("\"{text}\" is too long a duration"))
}

/// A duration in its largest whole unit: `1500ms`, `30s`, `5m`, `2h` (`parse_duration`
/// reads it back). Days are written in hours, as tier names always have been.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0ms".to_owned(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

fn unit_error(text: &str, number: &str, unit: &str) -> String {
    if unit.is_empty() {
        // A bare number: seconds or milliseconds are both plausible, so name both.
        return format!(
            "\"{text}\" has no unit: write \"{number}ms\" for milliseconds or \"{number}s\" \
             for seconds (units: ms, s, m, h, d)"
        );
    }
    if unit.starts_with('.') || unit.starts_with(',') {
        return format!(
            "\"{text}\" is not a whole number: use a smaller unit (\"1500ms\" rather than \
             \"1.5s\"); {FORM}"
        );
    }
    let trimmed = unit.trim();
    let canonical = match trimmed.to_lowercase().as_str() {
        "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => Some("ms"),
        "s" | "sec" | "secs" | "second" | "seconds" => Some("s"),
        "m" | "min" | "mins" | "minute" | "minutes" => Some("m"),
        "h" | "hr" | "hrs" | "hour" | "hours" => Some("h"),
        "d" | "day" | "days" => Some("d"),
        _ => None,
    };
    match canonical {
        Some(short) => format!("write \"{text}\" as \"{number}{short}\" (units: ms, s, m, h, d)"),
        None if matches!(trimmed, "us" | "µs" | "ns") => {
            format!("\"{text}\" is below a millisecond, the smallest unit; {FORM}")
        }
        None => format!("unknown unit \"{unit}\" in \"{text}\"; {FORM}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> Result<u128, String> {
        parse_duration(text).map(|d| d.as_millis())
    }

    fn error(text: &str) -> String {
        match parse_duration(text) {
            Ok(d) => panic!("{text:?} parsed as {d:?}"),
            Err(why) => why,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("30s"), Ok(30_000));
        assert_eq!(ms("5m"), Ok(300_000));
        assert_eq!(ms("2h"), Ok(7_200_000));
        assert_eq!(ms("1d"), Ok(86_400_000));
        assert_eq!(ms("007s"), Ok(7_000));
        assert_eq!(ms("0s"), Ok(0), "zero is syntax; each key's rule decides");
    }

    #[test]
    fn malformed_durations_say_how_to_write_them() {
        assert!(error("").contains("not a duration"));
        assert!(error("s").contains("not a duration"));
        assert!(error("-1s").contains("not a duration"));
        assert!(error(" 1s").contains("not a duration"));
        let bare = error("500");
        assert!(
            bare.contains("\"500ms\"") && bare.contains("\"500s\""),
            "{bare}"
        );
        assert!(error("1.5s").contains("\"1500ms\""));
        assert!(error("5min").contains("\"5m\""));
        assert!(error("10 s").contains("\"10s\""));
        assert!(error("2Hours").contains("\"2h\""));
        assert!(error("10us").contains("below a millisecond"));
        assert!(error("3w").contains("unknown unit \"w\""));
        assert!(error("1s30ms").contains("unknown unit"));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(error("99999999999999999999s").contains("too long"));
        assert!(error("18446744073709551615d").contains("too long"));
        assert_eq!(ms("18446744073709551615ms"), Ok(u128::from(u64::MAX)));
    }

    #[test]
    fn formats_round_trip() {
        for text in ["1500ms", "30s", "5m", "2h", "250ms"] {
            let d = parse_duration(text).unwrap_or_default();
            assert_eq!(format_duration(d), text);
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
