//! The fingerprint check of the first contact (`docs/protocol.md` §5.2 step 3): three of the
//! four parts are shown, the user types the missing one (chosen at random).

use std::io::{self, BufRead, Write};

use crate::pki::Fingerprint;

/// What a hidden part is shown as.
pub const HIDDEN: &str = "????????????????";

/// One fingerprint question: `fingerprint` with part `hidden` (0-based) left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FingerprintChallenge {
    /// The fingerprint the gateway presented.
    pub fingerprint: Fingerprint,
    /// The index (0..4) of the part the user must type.
    pub hidden: usize,
}

impl FingerprintChallenge {
    /// A challenge hiding a random part.
    pub fn random(fingerprint: Fingerprint) -> FingerprintChallenge {
        FingerprintChallenge {
            fingerprint,
            hidden: super::backoff::random_index(4),
        }
    }

    /// The four lines shown: `Part N: <16 hex digits>`, the hidden one as [`HIDDEN`].
    pub fn lines(&self) -> [String; 4] {
        let parts = self.fingerprint.parts();
        std::array::from_fn(|i| {
            let shown = if i == self.hidden { HIDDEN } else { &parts[i] };
            format!("Part {}: {shown}", i + 1)
        })
    }

    /// The question for the missing part: `Part N: `.
    pub fn question(&self) -> String {
        format!("Part {}: ", self.hidden + 1)
    }

    /// Whether `answer` is the hidden part (case, spaces, `:` and `-` do not matter).
    pub fn check(&self, answer: &str) -> bool {
        let typed: String = answer
            .chars()
            .filter(|c| !matches!(c, ' ' | '\t' | ':' | '-'))
            .collect::<String>()
            .to_ascii_uppercase();
        typed == self.fingerprint.parts()[self.hidden]
    }

    /// Shows the parts on `out`, asks for the missing one and reads one line from `input`.
    /// Returns whether it matched; an end of input is an error.
    pub fn ask(&self, input: &mut dyn BufRead, out: &mut dyn Write) -> io::Result<bool> {
        writeln!(
            out,
            "The gateway presents this root certificate fingerprint (SHA-256).\n\
             Compare it with the one your administrator gave you and type the missing part."
        )?;
        for line in self.lines() {
            writeln!(out, "  {line}")?;
        }
        write!(out, "{}", self.question())?;
        out.flush()?;
        let mut answer = String::new();
        if input.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no answer on standard input (use --fingerprint for scripts)",
            ));
        }
        Ok(self.check(answer.trim()))
    }
}

/// Whether `given` (64 hex digits, any case; spaces, `:` and `-` ignored; or the hand-out form
/// `Part 1: … Part 2: …`) is `fingerprint`.
pub fn matches_full(fingerprint: &Fingerprint, given: &str) -> bool {
    parse_full(given) == Some(*fingerprint)
}

/// Parses a full fingerprint as accepted by `--fingerprint`.
pub fn parse_full(given: &str) -> Option<Fingerprint> {
    let mut s = given.to_owned();
    for i in 1..=4 {
        s = s.replace(&format!("Part {i}:"), " ");
    }
    Fingerprint::from_hex(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint(std::array::from_fn(|i| (i * 7) as u8))
    }

    #[test]
    fn one_part_hidden_and_checked() {
        let fp = fp();
        let parts = fp.parts();
        for hidden in 0..4 {
            let c = FingerprintChallenge {
                fingerprint: fp,
                hidden,
            };
            let lines = c.lines();
            for (i, line) in lines.iter().enumerate() {
                if i == hidden {
                    assert_eq!(line, &format!("Part {}: {HIDDEN}", i + 1));
                } else {
                    assert_eq!(line, &format!("Part {}: {}", i + 1, parts[i]));
                }
            }
            assert!(c.check(&parts[hidden]));
            assert!(c.check(&parts[hidden].to_lowercase()));
            let spaced = format!(" {} {} ", &parts[hidden][..8], &parts[hidden][8..]);
            assert!(c.check(&spaced));
            assert!(!c.check(&parts[(hidden + 1) % 4]));
            assert!(!c.check(""));
            assert!(!c.check(&parts[hidden][..15]));
        }
    }

    #[test]
    fn the_hidden_part_is_random() {
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[FingerprintChallenge::random(fp()).hidden] = true;
        }
        assert_eq!(seen, [true; 4]);
    }

    #[test]
    fn ask_reads_one_line() {
        let fp = fp();
        let c = FingerprintChallenge {
            fingerprint: fp,
            hidden: 2,
        };
        let mut out = Vec::new();
        let answer = format!("{}\n", fp.parts()[2]);
        assert!(c.ask(&mut answer.as_bytes(), &mut out).unwrap());
        let shown = String::from_utf8(out).unwrap();
        assert!(shown.contains(&format!("Part 3: {HIDDEN}")));
        assert!(shown.contains(&format!("Part 1: {}", fp.parts()[0])));
        assert!(!shown.contains(&fp.parts()[2]));
        assert!(shown.ends_with("Part 3: "));
        let mut out = Vec::new();
        assert!(
            !c.ask(&mut "0000000000000000\n".as_bytes(), &mut out)
                .unwrap()
        );
        assert!(c.ask(&mut "".as_bytes(), &mut Vec::new()).is_err());
    }

    #[test]
    fn full_fingerprints() {
        let fp = fp();
        assert!(matches_full(&fp, &fp.hex()));
        assert!(matches_full(&fp, &fp.hex().to_lowercase()));
        assert!(matches_full(&fp, &fp.parts().join(" ")));
        assert!(matches_full(&fp, &fp.to_string()));
        assert!(!matches_full(&fp, &Fingerprint([0; 32]).hex()));
        assert!(!matches_full(&fp, "12"));
    }
}
