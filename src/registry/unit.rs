//! Unit IDs: the rules a unit ID follows and the parser for unit-ID lists (`keys create --csv`).

use std::fmt;

/// Longest unit ID accepted: 64, because the device credential carries the unit ID as its
/// certificate's common name, which X.509 limits to 64 characters (`ub-common-name`).
pub const MAX_UNIT_ID_LEN: usize = 64;

/// Checks a unit ID; returns it trimmed.
///
/// Rules: 1 to [`MAX_UNIT_ID_LEN`] printable ASCII characters, no spaces or control characters
/// (unit IDs appear in log lines such as `Device [<unit id>] is rejected`), none of `, ; " '`
/// (list separators and quotes). Unit IDs are compared without regard to ASCII case
/// (`00e0c5a1b2c3` and `00E0C5A1B2C3` are the same unit).
pub fn check_unit_id(unit: &str) -> Result<&str, &'static str> {
    let u = unit.trim();
    if u.is_empty() {
        return Err("empty");
    }
    if u.len() > MAX_UNIT_ID_LEN {
        return Err("longer than 64 characters");
    }
    if !u.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII characters without spaces are allowed");
    }
    if u.bytes().any(|b| matches!(b, b',' | b';' | b'"' | b'\'')) {
        return Err("must not contain , ; \" or '");
    }
    Ok(u)
}

/// One bad line of a unit-ID list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the file.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A unit-ID list with bad lines: every bad line is reported, and nothing is imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UnitListError {
    /// The bad lines, in file order.
    pub errors: Vec<LineError>,
}

impl fmt::Display for UnitListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bad line(s) in the unit-ID list, nothing imported:",
            self.errors.len()
        )?;
        for e in &self.errors {
            write!(f, "\n  line {}: {}", e.line, e.message)?;
        }
        Ok(())
    }
}

/// Parses a unit-ID list.
///
/// Two shapes are accepted:
/// * **one unit ID per line**;
/// * **CSV with a header line** that has a column named `unit_id` (any case; fields separated
///   by `,` or `;`, whichever the header uses; fields may be double-quoted with `""` for a
///   quote). Other columns are ignored.
///
/// The shape is decided by the first non-blank line: if one of its fields is `unit_id` it is a
/// CSV header. Blank lines and lines starting with `#` are skipped. Every other line must give
/// a valid unit ID ([`check_unit_id`]) that has not appeared on an earlier line; otherwise it is
/// reported with its line number. With any bad line the whole list is refused.
pub fn parse_unit_list(text: &str) -> Result<Vec<String>, UnitListError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text); // spreadsheet exports add a BOM
    let mut errors = Vec::new();
    let mut units: Vec<String> = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    // Some((column index, separator)) once a CSV header was seen.
    let mut csv: Option<(usize, u8)> = None;
    let mut header_decided = false;

    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header_decided {
            header_decided = true;
            if let Some(found) = find_header(line) {
                csv = Some(found);
                continue;
            }
        }
        let candidate = match csv {
            None => Ok(line.to_owned()),
            Some((col, sep)) => match split_csv(line, sep) {
                Err(msg) => Err(msg.to_owned()),
                Ok(fields) => match fields.into_iter().nth(col) {
                    Some(f) => Ok(f),
                    None => Err(format!("no unit_id field (column {})", col + 1)),
                },
            },
        };
        let checked = candidate.and_then(|u| match check_unit_id(&u) {
            Ok(ok) => Ok(ok.to_owned()),
            Err(why) => Err(format!("invalid unit ID {u:?}: {why}")),
        });
        match checked {
            Ok(u) => {
                let folded = u.to_ascii_uppercase();
                if let Some(first) = seen.get(&folded) {
                    errors.push(LineError {
                        line: line_no,
                        message: format!("unit ID {u:?} repeats line {first}"),
                    });
                } else {
                    seen.insert(folded, line_no);
                    units.push(u);
                }
            }
            Err(message) => errors.push(LineError {
                line: line_no,
                message,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(UnitListError { errors });
    }
    if units.is_empty() {
        return Err(UnitListError {
            errors: vec![LineError {
                line: 0,
                message: "the list holds no unit IDs".into(),
            }],
        });
    }
    Ok(units)
}

/// If `line` is a CSV header with a `unit_id` column: (column index, separator).
fn find_header(line: &str) -> Option<(usize, u8)> {
    for sep in [b',', b';'] {
        if let Ok(fields) = split_csv(line, sep) {
            if let Some(col) = fields
                .iter()
                .position(|f| f.trim().eq_ignore_ascii_case("unit_id"))
            {
                return Some((col, sep));
            }
        }
    }
    None
}

/// Splits one CSV line (RFC 4180 quoting, no line breaks inside fields); fields are trimmed.
fn split_csv(line: &str, sep: u8) -> Result<Vec<String>, &'static str> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut in_quotes = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && field.trim().is_empty() && !was_quoted {
            field.clear();
            in_quotes = true;
            was_quoted = true;
        } else if c == char::from(sep) {
            fields.push(std::mem::take(&mut field).trim().to_owned());
            was_quoted = false;
        } else if was_quoted && !c.is_whitespace() {
            return Err("text after a closing quote");
        } else {
            field.push(c);
        }
    }
    if in_quotes {
        return Err("unterminated quote");
    }
    fields.push(field.trim().to_owned());
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_id_rules() {
        assert_eq!(check_unit_id("  00E0C5A1B2C3 ").unwrap(), "00E0C5A1B2C3");
        assert!(check_unit_id("").is_err());
        assert!(check_unit_id("a b").is_err());
        assert!(check_unit_id("a;b").is_err());
        assert!(check_unit_id("a\u{0}b").is_err());
        assert!(check_unit_id("ü").is_err());
        assert!(check_unit_id(&"x".repeat(129)).is_err());
        assert!(check_unit_id(&"x".repeat(64)).is_ok());
        assert!(check_unit_id(&"x".repeat(65)).is_err());
    }

    #[test]
    fn one_per_line() {
        let units = parse_unit_list("\u{feff}A1\r\n\n# comment\nB2\n  C3  \n").unwrap();
        assert_eq!(units, ["A1", "B2", "C3"]);
    }

    #[test]
    fn csv_with_a_unit_id_column() {
        let text = "name,Unit_ID,site\n\"Smith, J\",00E0C5000001,Berlin\nx,\"00E0C5000002\",y\n";
        assert_eq!(
            parse_unit_list(text).unwrap(),
            ["00E0C5000001", "00E0C5000002"]
        );
        let text = "unit_id;comment\nAA01;\"a;b\"\nAA02;\n";
        assert_eq!(parse_unit_list(text).unwrap(), ["AA01", "AA02"]);
    }

    #[test]
    fn bad_lines_are_all_reported_by_number() {
        let text =
            "site,unit_id\nBerlin,U1\nBerlin\nParis,\"U 2\"\nRome,u1\nOslo,\"U3\nMadrid,U4\n";
        let err = parse_unit_list(text).unwrap_err();
        let lines: Vec<usize> = err.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5, 6], "{err}");
        assert!(err.errors[0].message.contains("no unit_id field"));
        assert!(err.errors[1].message.contains("\"U 2\""));
        assert!(err.errors[2].message.contains("repeats line 2"));
        assert!(err.errors[3].message.contains("unterminated quote"));
        let shown = err.to_string();
        assert!(
            shown.contains("4 bad line(s)") && shown.contains("line 6:"),
            "{shown}"
        );
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(parse_unit_list("\n# nothing\n").is_err());
        assert!(parse_unit_list("unit_id\n").is_err());
    }
}
