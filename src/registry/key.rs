//! First-authentication key values: generation, normalisation, hashing.
//!
//! # Format
//!
//! A random key is 20 symbols of Crockford's base32 alphabet (`0-9`, `A-Z` without `I L O U`)
//! in five groups of four: `K7Q2-9XM4-T3HB-WP0R-ZC8D`. That is 100 random bits from the
//! operating system's generator (the issue asks for at least 80).
//!
//! Typing is forgiving: before a key is compared it is *normalised* — spaces, tabs and `-` are
//! removed, letters are upper-cased, and the look-alikes `O`→`0`, `I`/`L`→`1` are mapped as
//! Crockford's decoding rules say. `k7q2 9xm4 t3hb wpOr zc8d` is the same key as above. The same
//! normalisation applies to custom mass-deployment values (so they are case-insensitive too).
//!
//! # Storage
//!
//! No key value is ever stored. The registry keeps the SHA-256 of the normalised value
//! (domain-separated, see [`key_hash`]) and a *display prefix* (the first group, `K7Q2`) so the
//! operator can tell keys apart in `keys list`. `keys create` prints the full value once; a
//! leaked database does not reveal unused keys: the 80 bits the prefix does not show are out of
//! reach of brute force. A custom mass value is only as strong as the operator makes it — a
//! short word can be found from its hash — which is why custom values must have at least
//! [`MIN_CUSTOM_LEN`] characters; prefer random mass keys.

use sha2::{Digest, Sha256};

/// Crockford's base32 alphabet.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Symbols in a random key (5 bits each).
pub const RANDOM_KEY_SYMBOLS: usize = 20;
/// Symbols per group in the printed form.
const GROUP: usize = 4;
/// Shortest custom mass-deployment value (after normalisation).
pub const MIN_CUSTOM_LEN: usize = 8;
/// Longest key value accepted anywhere (after normalisation); longer input is never a key.
pub const MAX_KEY_LEN: usize = 64;

/// What a key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Any device, once.
    OneTime,
    /// Only the unit it is bound to, once.
    UnitBound,
    /// Any device, any number of times (mass deployment).
    Mass,
}

impl KeyKind {
    /// The value stored in the database and shown by `keys list`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::OneTime => "one-time",
            KeyKind::UnitBound => "unit",
            KeyKind::Mass => "mass",
        }
    }

    /// Parses [`as_str`](KeyKind::as_str).
    pub fn parse(s: &str) -> Option<KeyKind> {
        match s {
            "one-time" => Some(KeyKind::OneTime),
            "unit" => Some(KeyKind::UnitBound),
            "mass" => Some(KeyKind::Mass),
            _ => None,
        }
    }

    /// True when the key may be used only once.
    pub fn is_single_use(self) -> bool {
        !matches!(self, KeyKind::Mass)
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the operator names a key in `keys revoke`/`keys delete`: by its numeric ID (as shown
/// by `keys list`, optionally written `#12`) or by its value.
///
/// Custom key values must contain a character other than a digit, so the two never clash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// The key's ID.
    Id(i64),
    /// The key's value (any spelling that normalises to it).
    Value(String),
}

impl KeyRef {
    /// `12` or `#12` → [`KeyRef::Id`]; anything else → [`KeyRef::Value`].
    pub fn parse(s: &str) -> KeyRef {
        let t = s.trim();
        let digits = t.strip_prefix('#').unwrap_or(t);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(id) = digits.parse() {
                return KeyRef::Id(id);
            }
        }
        KeyRef::Value(s.to_owned())
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyRef::Id(id) => write!(f, "#{id}"),
            // Never echo a full value into logs or errors: the prefix is enough to recognise it.
            KeyRef::Value(v) => write!(f, "{}", display_prefix(&normalize(v))),
        }
    }
}

/// A fresh random key, printed form (`XXXX-XXXX-XXXX-XXXX-XXXX`).
///
/// # Panics
/// If the operating system's random generator fails (it does not on Linux ≥ 3.17).
pub fn generate() -> String {
    let mut raw = [0u8; RANDOM_KEY_SYMBOLS];
    getrandom::fill(&mut raw).expect("the OS random generator failed");
    // 256 is a multiple of 32, so the low five bits of a uniform byte are uniform.
    let symbols: Vec<u8> = raw.iter().map(|b| ALPHABET[usize::from(b & 31)]).collect();
    group(&symbols)
}

fn group(symbols: &[u8]) -> String {
    let mut out = String::with_capacity(symbols.len() + symbols.len() / GROUP);
    for (i, chunk) in symbols.chunks(GROUP).enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.extend(chunk.iter().map(|&b| char::from(b)));
    }
    out
}

/// The canonical form a key is compared in: separators (`-`, spaces, tabs) removed, ASCII
/// upper case, `O`→`0`, `I`/`L`→`1`.
pub fn normalize(input: &str) -> String {
    input
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t' | '\r' | '\n'))
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// SHA-256 over a domain-separation label and the normalised key: what the database stores.
pub fn key_hash(normalized: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fleetgate first-authentication key v1\0");
    h.update(normalized.as_bytes());
    h.finalize().into()
}

/// What `keys list` shows of a key: its first four symbols and an ellipsis (`K7Q2-…`).
pub fn display_prefix(normalized: &str) -> String {
    let head: String = normalized.chars().take(GROUP).collect();
    format!("{head}-…")
}

/// Checks a custom mass-deployment value; returns its normalised form.
///
/// Rules: after normalisation [`MIN_CUSTOM_LEN`] to [`MAX_KEY_LEN`] printable ASCII characters
/// (no spaces or control characters), and not only digits (a number names a key ID).
pub fn check_custom_value(value: &str) -> Result<String, &'static str> {
    let n = normalize(value);
    if n.chars().count() < MIN_CUSTOM_LEN {
        return Err("too short: use at least 8 characters (separators do not count)");
    }
    if n.len() > MAX_KEY_LEN {
        return Err("too long: at most 64 characters");
    }
    if !n.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "only printable ASCII characters are allowed (no spaces or control characters)",
        );
    }
    if n.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must contain a letter or symbol (a plain number is taken as a key ID)");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = generate();
        assert_eq!(k.len(), 24, "{k}");
        let groups: Vec<&str> = k.split('-').collect();
        assert_eq!(groups.len(), 5);
        for g in groups {
            assert_eq!(g.len(), 4);
            assert!(g.bytes().all(|b| ALPHABET.contains(&b)), "{k}");
        }
        // A normalised random key is its symbols without separators.
        assert_eq!(normalize(&k), k.replace('-', ""));
        assert_ne!(generate(), generate());
    }

    #[test]
    fn generated_keys_use_the_whole_alphabet() {
        // 200 keys × 20 symbols: every one of the 32 symbols appears (probability of a miss
        // is about 32 × (31/32)^4000, i.e. zero).
        let mut seen = [false; 32];
        for _ in 0..200 {
            for b in normalize(&generate()).bytes() {
                seen[ALPHABET.iter().position(|&a| a == b).unwrap()] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn normalisation_forgives_case_separators_and_look_alikes() {
        assert_eq!(normalize("k7q2-9xm4 TOIL\t0000"), "K7Q29XM4T0110000");
        assert_eq!(
            key_hash(&normalize("abcd-efgh")),
            key_hash(&normalize("ABCDEFGH"))
        );
        assert_ne!(key_hash("ABCDEFGH"), key_hash("ABCDEFGI"));
    }

    #[test]
    fn custom_values() {
        assert_eq!(check_custom_value("Welcome-2025!").unwrap(), "WE1C0ME2025!");
        assert!(check_custom_value("short").is_err());
        assert!(check_custom_value("1234-5678-9").is_err());
        assert!(check_custom_value("has a space").is_ok()); // spaces are separators
        assert!(check_custom_value("tab\u{7}bell-xxxx").is_err());
        assert!(check_custom_value("ünïcödé-value").is_err());
        assert!(check_custom_value(&"x".repeat(65)).is_err());
    }

    #[test]
    fn key_refs() {
        assert_eq!(KeyRef::parse("12"), KeyRef::Id(12));
        assert_eq!(KeyRef::parse(" #7 "), KeyRef::Id(7));
        assert_eq!(
            KeyRef::parse("K7Q2-9XM4"),
            KeyRef::Value("K7Q2-9XM4".into())
        );
        assert_eq!(KeyRef::parse("#x"), KeyRef::Value("#x".into()));
        assert_eq!(KeyRef::Value("k7q2-9xm4".into()).to_string(), "K7Q2-…");
    }
}
