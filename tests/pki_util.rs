//! Helpers shared by the `pki_*` tests (included with `#[path]`; as its own test target it
//! only checks that the helpers work).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Parser, Subcommand};
use fleetgate::cli::pki::{PkiCommand, run_with};

/// Mirrors `main.rs`: `fleetgate [--data-dir DIR] pki …` with a global `--data-dir`.
#[derive(Parser, Debug)]
struct Cli {
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    #[command(subcommand)]
    Pki(PkiCommand),
}

/// The outcome of one `fleetgate pki …` run.
#[derive(Debug)]
pub struct Run {
    pub code: u8,
    pub out: String,
    pub err: String,
}

impl Run {
    pub fn text(&self) -> String {
        format!("{}{}", self.out, self.err)
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success:\n{}", self.text());
        self
    }

    #[track_caller]
    pub fn rejected(self) -> Run {
        assert_eq!(self.code, 2, "expected exit code 2:\n{}", self.text());
        self
    }
}

/// Runs `fleetgate pki <args>` in-process against `data_dir` (the lead wires the binary; the
/// command runner is the same).
pub fn pki(data_dir: &Path, args: &[&str]) -> Run {
    let mut argv = vec!["fleetgate", "pki"];
    argv.extend_from_slice(args);
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            return Run {
                code: 64,
                out: String::new(),
                err: e.to_string(),
            };
        }
    };
    let Top::Pki(cmd) = cli.cmd;
    let data_dir = cli.data_dir.as_deref().unwrap_or(data_dir);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = run_with(cmd, data_dir, &mut out, &mut err);
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

/// Runs openssl in `dir`, panicking with its output on failure.
#[track_caller]
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl verify -CAfile root -untrusted inters leaf`; returns (success, output).
pub fn openssl_verify(
    dir: &Path,
    root: &Path,
    inters: Option<&Path>,
    leaf: &Path,
) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(root);
    if let Some(i) = inters {
        cmd.arg("-untrusted").arg(i);
    }
    cmd.arg(leaf).current_dir(dir);
    let out = cmd.output().expect("openssl is installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Splits a keystore file into leaf.pem, inter.pem (may be empty), root.pem in `dir`.
pub fn split_keystore(keystore: &Path, dir: &Path) -> (PathBuf, Option<PathBuf>, PathBuf) {
    let ks = fleetgate::pki::Keystore::load(keystore).unwrap();
    let pem = fleetgate::pki::pem::cert_pem;
    let leaf = dir.join("split-leaf.pem");
    let root = dir.join("split-root.pem");
    std::fs::write(&leaf, pem(ks.leaf())).unwrap();
    std::fs::write(&root, pem(ks.root())).unwrap();
    let inters: String = ks.intermediates().iter().map(pem).collect();
    let inter = if inters.is_empty() {
        None
    } else {
        let p = dir.join("split-inter.pem");
        std::fs::write(&p, inters).unwrap();
        Some(p)
    };
    (leaf, inter, root)
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

pub const SUBJECT: [&str; 6] = [
    "--org",
    "Example Ltd",
    "--locality",
    "Berlin",
    "--country",
    "DE",
];

/// `create-root --name <name>` with the standard subject.
pub fn create_root(data: &Path, name: &str, extra: &[&str]) -> Run {
    let mut args = vec!["create-root", "--name", name];
    args.extend_from_slice(&SUBJECT);
    args.extend_from_slice(extra);
    pki(data, &args)
}

/// `issue --ca <ca> --name <name> --holder <holder> --hosts <hosts>` with the standard subject.
pub fn issue(data: &Path, ca: &str, name: &str, hosts: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "issue", "--ca", ca, "--name", name, "--holder", name, "--hosts", hosts,
    ];
    args.extend_from_slice(&SUBJECT);
    args.extend_from_slice(extra);
    pki(data, &args)
}

#[test]
fn helpers_work() {
    let tmp = tempfile::tempdir().unwrap();
    let r = pki(tmp.path(), &["list"]).ok();
    assert!(r.out.contains("(none)"), "{}", r.text());
    assert_eq!(pki(tmp.path(), &["no-such-command"]).code, 64);
}
