//! Leaderboard names: `all-time`, `weekly:YYYY-Www` (ISO-8601 week, UTC), `tag:NAME` or
//! `area:UUID` (issue #6).

use chrono::{NaiveDate, Weekday};

/// Validates a board name and returns its canonical form (tag names lower-cased, as tags are
/// stored; area ids in hyphenated lower case).
///
/// # Errors
/// A message naming the expected forms.
pub fn parse_board(raw: &str) -> Result<String, String> {
    let bad = || {
        format!("invalid board {raw:?}: expected `all-time`, `weekly:YYYY-Www`, `tag:NAME` or `area:UUID`")
    };
    if raw == "all-time" {
        return Ok(raw.to_string());
    }
    if let Some(week) = raw.strip_prefix("weekly:") {
        let (y, w) = week.split_once("-W").ok_or_else(bad)?;
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(y, 4) || !digits(w, 2) {
            return Err(bad());
        }
        let (year, wk) = (
            y.parse::<i32>().map_err(|_| bad())?,
            w.parse::<u32>().map_err(|_| bad())?,
        );
        if NaiveDate::from_isoywd_opt(year, wk, Weekday::Mon).is_none() {
            return Err(format!("invalid board {raw:?}: {y} has no ISO week {w}"));
        }
        return Ok(raw.to_string());
    }
    if let Some(tag) = raw.strip_prefix("tag:") {
        let tag = tag.to_lowercase();
        let ok = (1..=35).contains(&tag.chars().count())
            && tag
                .chars()
                .all(|c| c.is_alphanumeric() || "-+#.".contains(c));
        if !ok {
            return Err(format!(
                "invalid board {raw:?}: a tag is 1..=35 letters, digits, - + # ."
            ));
        }
        return Ok(format!("tag:{tag}"));
    }
    if let Some(area) = raw.strip_prefix("area:") {
        let id = uuid::Uuid::parse_str(area)
            .map_err(|_| format!("invalid board {raw:?}: an area board is `area:UUID`"))?;
        return Ok(format!("area:{id}"));
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_forms_and_rejects_the_rest() {
        assert_eq!(parse_board("all-time").unwrap(), "all-time");
        assert_eq!(parse_board("weekly:2020-W53").unwrap(), "weekly:2020-W53");
        assert!(parse_board("weekly:2021-W53").is_err());
        assert!(parse_board("weekly:2024-W1").is_err());
        assert!(parse_board("weekly:2024-W00").is_err());
        assert_eq!(parse_board("tag:C#").unwrap(), "tag:c#");
        assert!(parse_board("tag:").is_err());
        assert!(parse_board("tag:a b").is_err());
        let id = uuid::Uuid::new_v4();
        let upper = format!("area:{}", id.to_string().to_uppercase());
        assert_eq!(parse_board(&upper).unwrap(), format!("area:{id}"));
        assert!(parse_board("area:rust").is_err());
        assert!(parse_board("alltime").is_err());
    }
}
