//! `fleetgate::logging::init` as `fleetgate serve` calls it: a file with size rotation and
//! per-module levels. (One test: `init` installs the process-wide logger.)

use fleetgate::config::LogConfig;

#[test]
fn init_logs_to_a_rotating_file_with_module_levels() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("fleetgate.log");
    let cfg = LogConfig {
        level: "info,ops_logging::quiet=warn".into(),
        file: file.clone(),
        max_size_mb: 1,
        keep: 2,
    };
    let guard = fleetgate::logging::init(&cfg).expect("init");
    assert_eq!(guard.destination, file.display().to_string());
    tracing::info!("first line");
    tracing::info!(target: "ops_logging::quiet", "filtered out");
    tracing::warn!(target: "ops_logging::quiet", "Max connections limit has exceeded. Device [d-1] is rejected");
    let big = "x".repeat(700 << 10);
    tracing::info!("{big}");
    tracing::info!("{big}");
    tracing::info!("last line");
    assert!(
        fleetgate::logging::init(&cfg).is_err(),
        "a second logger is refused"
    );
    drop(guard); // flushes
    let current = std::fs::read_to_string(&file).unwrap();
    let rotated = std::fs::read_to_string(tmp.path().join("fleetgate.log.1")).unwrap();
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!("RUST_LOG is set: it overrides log.level, so the filter is not checked");
        return;
    }
    assert!(rotated.contains("first line"), "{:.300}", rotated);
    assert!(rotated.contains("WARN") && rotated.contains("Device [d-1] is rejected"));
    assert!(!rotated.contains("filtered out"));
    assert!(
        current.ends_with("last line\n"),
        "{:.300}",
        &current[current.len().saturating_sub(300)..]
    );
    assert!(
        !current.contains('\u{1b}') && !rotated.contains('\u{1b}'),
        "no ANSI in files"
    );
}

#[test]
fn a_missing_log_directory_is_a_clear_error() {
    let cfg = LogConfig {
        file: "/nonexistent-dir/fleetgate.log".into(),
        ..LogConfig::default()
    };
    let err = format!("{:#}", fleetgate::logging::init(&cfg).unwrap_err());
    assert!(
        err.contains("log.file") && err.contains("/nonexistent-dir/fleetgate.log"),
        "{err}"
    );
}
