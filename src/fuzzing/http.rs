//! Fuzz entry points for `proto::http`.

use crate::proto::http::{
    HttpLimits, Parsed, check_upgrade, check_upgrade_response, negotiate_subprotocol,
    parse_request, parse_response, write_response, write_switching_protocols,
};

/// Feeds `data` to both head parsers, with the default limits and with tiny ones, and checks
/// the properties the connection state machine relies on:
///
/// * no panic; every error maps to 400, 431 or 505;
/// * `consumed` is within the buffer, and every shorter prefix of a complete head is
///   `Incomplete` (nothing is consumed early);
/// * when a request passes [`check_upgrade`], our own 101 for it passes
///   [`check_upgrade_response`] with the same key;
/// * every response we write for an error parses back with its status.
pub fn head(data: &[u8]) {
    let tiny = HttpLimits {
        max_head_bytes: 64,
        max_headers: 2,
    };
    for limits in [HttpLimits::default(), tiny] {
        request(data, &limits);
        response(data, &limits);
    }
}

fn request(data: &[u8], limits: &HttpLimits) {
    match parse_request(data, limits) {
        Ok(Parsed::Incomplete) => assert!(data.len() <= limits.max_head_bytes),
        Ok(Parsed::Complete { head, consumed }) => {
            assert!(consumed <= data.len() && consumed <= limits.max_head_bytes);
            check_prefixes(data, consumed, |b| parse_request(b, limits));
            match check_upgrade(&head) {
                Ok(up) => {
                    let key = head.ws_key.as_deref().expect("upgrade without a key");
                    let chosen = negotiate_subprotocol(up.protocols, &["usg.v2", "usg.v1"]);
                    let mut out = Vec::new();
                    write_switching_protocols(&mut out, &up.accept, chosen);
                    let Ok(Parsed::Complete { head: resp, .. }) =
                        parse_response(&out, &HttpLimits::default())
                    else {
                        panic!("our 101 does not parse: {out:?}");
                    };
                    let offered: Vec<&str> = up.protocols.iter().map(String::as_str).collect();
                    assert_eq!(
                        check_upgrade_response(&resp, key, &offered),
                        Ok(chosen.map(str::to_owned))
                    );
                }
                Err(e) => answer_parses_back(e.status(), e.headers()),
            }
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 431 | 505), "{e:?}");
            assert!(e.is_peer_fault());
            answer_parses_back(e.status(), &[]);
        }
    }
}

fn response(data: &[u8], limits: &HttpLimits) {
    match parse_response(data, limits) {
        Ok(Parsed::Incomplete) => assert!(data.len() <= limits.max_head_bytes),
        Ok(Parsed::Complete { head, consumed }) => {
            assert!(consumed <= data.len() && consumed <= limits.max_head_bytes);
            check_prefixes(data, consumed, |b| parse_response(b, limits));
            let _ = check_upgrade_response(&head, "dGhlIHNhbXBsZSBub25jZQ==", &["usg.v1"]);
        }
        Err(e) => assert!(e.is_peer_fault()),
    }
}

/// A complete head must not be recognised early: the prefix one byte short of `consumed` is
/// `Incomplete`, not complete and not an error. (Checking every prefix would make each run
/// quadratic; the unit tests check every split of typical heads.)
fn check_prefixes<T, E: std::fmt::Debug>(
    data: &[u8],
    consumed: usize,
    parse: impl Fn(&[u8]) -> Result<Parsed<T>, E>,
) {
    if consumed > 0 {
        match parse(&data[..consumed - 1]) {
            Ok(Parsed::Incomplete) => {}
            Ok(Parsed::Complete { .. }) => panic!("complete one byte early"),
            Err(e) => panic!("a prefix of a valid head is an error: {e:?}"),
        }
    }
}

fn answer_parses_back(status: u16, headers: &[(&str, &str)]) {
    let mut out = Vec::new();
    write_response(
        &mut out,
        status,
        headers,
        Some("text/plain"),
        b"refused",
        true,
    );
    match parse_response(&out, &HttpLimits::default()) {
        Ok(Parsed::Complete { head, consumed }) => {
            assert_eq!(head.status, status);
            assert_eq!(consumed + 7, out.len());
        }
        other => panic!("our {status} does not parse: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    /// A deterministic smoke run of the target: every committed seed, every prefix of it,
    /// and a few thousand single- and multi-byte mutations. Catches a broken property
    /// without libFuzzer (`cargo test --features fuzzing --lib fuzzing::http`).
    /// `HTTP_HEAD_SMOKE_ROUNDS` (default 500) sets the mutations per seed.
    #[test]
    fn seeds_and_mutations() {
        let rounds: usize = std::env::var("HTTP_HEAD_SMOKE_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/http_head");
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .expect("seed directory")
            .map(|e| std::fs::read(e.expect("seed entry").path()).expect("seed file"))
            .collect();
        assert!(seeds.len() >= 5, "seeds missing from {dir}");
        seeds.sort();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        const INTERESTING: &[u8] = b"\r\n :,;\t\x00\x16\xff0129/?#*-Hh";
        for seed in &seeds {
            for end in 0..=seed.len() {
                super::head(&seed[..end]);
            }
            for _ in 0..rounds {
                let mut m = seed.clone();
                for _ in 0..=(next() % 4) {
                    if m.is_empty() {
                        break;
                    }
                    let i = (next() as usize) % m.len();
                    match next() % 4 {
                        0 => m[i] = INTERESTING[(next() as usize) % INTERESTING.len()],
                        1 => m[i] ^= 1 << (next() % 8),
                        2 => {
                            m.remove(i);
                        }
                        _ => {
                            let j = (next() as usize) % m.len();
                            let chunk = m[i.min(j)..i.max(j)].to_vec();
                            m.splice(i..i, chunk);
                        }
                    }
                }
                super::head(&m);
            }
        }
    }
}
