//! The configuration as operators meet it: `fleetgate config check` names the key and the line
//! of each error, and the example config and docs/configuration.md list exactly the keys of
//! `Config::default()`, with its defaults.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use fleetgate::config::Config;

/// `fleetgate config check` on `text`: (exit code, stdout + stderr).
fn check(text: &str) -> (i32, String) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("fleetgate.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["config", "check"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn config_check_accepts_the_example_and_the_defaults() {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fleetgate.toml.example"),
    )
    .unwrap();
    let (code, out) = check(&example);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with(": OK\n"), "{out}");
    let defaults = toml::to_string(&Config::default()).unwrap();
    assert_eq!(check(&defaults).0, 0);
}

#[test]
fn config_check_names_key_and_line_of_a_wrong_type() {
    let (code, out) = check(
        "[server]\nlisten = \"127.0.0.1:8443\"\n\n[limits]\nmax_connections_per_shard = \"many\"\n",
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 5"), "{out}");
    assert!(out.contains("max_connections_per_shard"), "{out}");
}

#[test]
fn config_check_names_key_and_line_of_an_unknown_key() {
    let (code, out) = check("[websocket]\nping_after_secs = 30\nidle_timout_secs = 90\n");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 3"), "{out}");
    assert!(out.contains("idle_timout_secs"), "{out}");
}

#[test]
fn config_check_names_the_key_of_an_out_of_range_value() {
    for (text, key) in [
        ("[http]\nmax_headers = 1000\n", "http.max_headers"),
        (
            "[limits]\nrecv_buffers_per_shard = 100\n",
            "limits.recv_buffers_per_shard",
        ),
        ("[log]\nkeep = 5000\n", "log.keep"),
        ("[log]\nmax_size_mb = 0\n", "log.max_size_mb"),
        ("[log]\nlevel = \"info,fleetgate=loud\"\n", "log.level"),
    ] {
        let (code, out) = check(text);
        assert_eq!(code, 2, "{text}: {out}");
        assert!(out.contains(key), "{text}: {out}");
    }
    // A value outside the type's range is caught by the parser, with its line.
    let (code, out) = check("[server]\n\nshards = -1\n");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 3") && out.contains("shards"), "{out}");
}

#[test]
fn config_check_names_the_line_of_an_out_of_range_value() {
    let (code, out) = check("[http]\nmax_head_bytes = 8192\nmax_headers = 1000\n");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("http.max_headers") && out.contains("line 3"),
        "{out}"
    );
}

/// `section.key` → value, for every key of a TOML document of tables.
fn flatten(doc: &toml::Table) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    for (section, v) in doc {
        let table = v
            .as_table()
            .unwrap_or_else(|| panic!("{section} is not a table"));
        for (key, value) in table {
            out.insert(format!("{section}.{key}"), value.clone());
        }
    }
    out
}

fn default_keys() -> BTreeMap<String, toml::Value> {
    flatten(&toml::Table::try_from(Config::default()).unwrap())
}

/// The example with its commented-out `# key = value` lines switched on.
fn example_with_every_key() -> toml::Table {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fleetgate.toml.example"),
    )
    .unwrap();
    let mut on = String::new();
    for line in text.lines() {
        let body = line.strip_prefix("# ").unwrap_or(line);
        let is_key = body.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        });
        on.push_str(if is_key { body } else { line });
        on.push('\n');
    }
    on.parse()
        .expect("the example with every key switched on is TOML")
}

#[test]
fn example_lists_every_key_with_its_default() {
    let example = flatten(&example_with_every_key());
    let defaults = default_keys();
    let missing: Vec<&String> = defaults
        .keys()
        .filter(|k| !example.contains_key(*k))
        .collect();
    let unknown: Vec<&String> = example
        .keys()
        .filter(|k| !defaults.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from packaging/fleetgate.toml.example: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "keys in the example that Config does not have: {unknown:?}"
    );
    // Deliberate differences from the built-in defaults (the packaged service's paths).
    let packaged: BTreeMap<&str, toml::Value> =
        [("server.data_dir", toml::Value::from("/var/lib/fleetgate"))].into();
    for (key, value) in &example {
        let want = packaged.get(key.as_str()).unwrap_or(&defaults[key]);
        assert_eq!(value, want, "{key}: the example's value is not the default");
    }
}

#[test]
fn configuration_doc_lists_every_key() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    let missing: Vec<String> = default_keys()
        .into_keys()
        .filter(|k| !doc.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks: {missing:?}"
    );
}
