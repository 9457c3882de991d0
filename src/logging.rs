//! Logging: `tracing` events to stderr (journald under systemd) or to a size-rotated file.
//!
//! * **Where.** `log.file` empty (the default): stderr. When stderr is the systemd journal
//!   (`JOURNAL_STREAM` names it), each line starts with its syslog priority (`<4>` for WARN,
//!   sd-daemon(3)) and carries no timestamp, so `journalctl -p warning` filters by level and
//!   times are not printed twice. Otherwise: timestamp, level, message. `log.file` set: append
//!   to that file; when a line would take it past `log.max_size_mb`, it is renamed to
//!   `<file>.1` (`.1` → `.2` …, keeping `log.keep` old files) and a new file is started.
//! * **What.** `log.level` is an EnvFilter: `info`, or per module
//!   `warn,fleetgate::shard=debug,rustls=off`. A non-empty `RUST_LOG` overrides it. The filter
//!   can be replaced while the gateway runs ([`LevelHandle`], used when SIGHUP re-reads the
//!   config); a `RUST_LOG` in effect still wins then.
//! * **Never blocking a shard.** Lines go through a bounded queue (128 Ki lines) to a writer
//!   thread; when the disk or the journal cannot keep up, lines are dropped and counted
//!   ([`LogGuard::dropped_lines`]) instead of stalling the event loops.
//! * ANSI colours only when stderr is a terminal; never in files or the journal.
//!
//! Keep the [`LogGuard`] alive until the process ends: dropping it flushes the queue (waiting
//! at most about a second).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal as _, Write};
use std::os::fd::AsFd as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tracing::{Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogConfig;

/// Keeps the log writer thread alive; dropping it flushes what is queued.
#[must_use = "dropping the guard stops the log writer"]
#[derive(Debug)]
pub struct LogGuard {
    _worker: WorkerGuard,
    dropped: ErrorCounter,
    level: LevelHandle,
    /// Where lines go, for the start-up message.
    pub destination: String,
}

impl LogGuard {
    /// Lines dropped so far because the writer could not keep up.
    pub fn dropped_lines(&self) -> usize {
        self.dropped.dropped_lines()
    }

    /// A handle that replaces the installed filter (`log.level`) while the process runs.
    pub fn level_handle(&self) -> LevelHandle {
        self.level.clone()
    }
}

/// Errors replacing the log filter at run time.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    /// The new `log.level` is not a valid filter.
    #[error("log.level {level:?} is not a valid filter: {message}")]
    Invalid {
        /// The refused value.
        level: String,
        /// The parser's message.
        message: String,
    },
    /// The subscriber holding the filter is gone (the process is shutting down).
    #[error("the log filter cannot be replaced: {0}")]
    Gone(String),
}

/// What [`LevelHandle::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The new filter is in force.
    Applied,
    /// `RUST_LOG` set the filter at start-up and still wins; nothing changed.
    OverriddenByEnv,
}

type SetFilter = dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync;

/// Replaces the filter of the installed subscriber (type-erased `reload::Handle`). Cheap to
/// clone.
#[derive(Clone)]
pub struct LevelHandle {
    set: Arc<SetFilter>,
    env_override: bool,
}

impl fmt::Debug for LevelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LevelHandle")
            .field("env_override", &self.env_override)
            .finish_non_exhaustive()
    }
}

impl LevelHandle {
    /// Installs `level` (EnvFilter syntax) as the filter, unless `RUST_LOG` chose the filter
    /// at start-up. Events already being written are not affected.
    pub fn set(&self, level: &str) -> Result<LevelChange, LevelError> {
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| LevelError::Invalid {
                level: level.to_owned(),
                message: e.to_string(),
            })?;
        if self.env_override {
            return Ok(LevelChange::OverriddenByEnv);
        }
        (self.set)(filter).map_err(LevelError::Gone)?;
        Ok(LevelChange::Applied)
    }
}

/// Installs the global `tracing` subscriber described by `cfg` (see the module docs).
/// Fails if the log file cannot be opened or a subscriber is already installed.
pub fn init(cfg: &LogConfig) -> anyhow::Result<LogGuard> {
    let (filter, rust_log_error) = filter(cfg)?;
    let env_override = rust_log_in_effect(rust_log_error.is_some());
    let (subscriber, mut guard) = build(cfg, filter)?;
    guard.level.env_override = env_override;
    tracing::subscriber::set_global_default(subscriber).context("a logger is already installed")?;
    if let Some(e) = rust_log_error {
        tracing::warn!("RUST_LOG ignored ({e}); using log.level {:?}", cfg.level);
    }
    Ok(guard)
}

/// The filter: `RUST_LOG` when set, non-empty and valid, else `log.level`. The second value
/// says why `RUST_LOG` was ignored.
fn filter(cfg: &LogConfig) -> anyhow::Result<(EnvFilter, Option<String>)> {
    let mut ignored = None;
    if let Ok(env) = std::env::var(EnvFilter::DEFAULT_ENV) {
        if !env.trim().is_empty() {
            match EnvFilter::builder().parse(&env) {
                Ok(f) => return Ok((f, None)),
                Err(e) => ignored = Some(e.to_string()),
            }
        }
    }
    let f = EnvFilter::builder()
        .parse(&cfg.level)
        .with_context(|| format!("log.level {:?} is not a valid filter", cfg.level))?;
    Ok((f, ignored))
}

/// True when `RUST_LOG` chose the filter (set, non-empty, and not refused).
fn rust_log_in_effect(refused: bool) -> bool {
    !refused && std::env::var(EnvFilter::DEFAULT_ENV).is_ok_and(|v| !v.trim().is_empty())
}

/// Builds the subscriber without installing it (tests use it with `with_default`).
fn build(
    cfg: &LogConfig,
    filter: EnvFilter,
) -> anyhow::Result<(Box<dyn Subscriber + Send + Sync>, LogGuard)> {
    let queue = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("log-writer");
    if cfg.file.as_os_str().is_empty() {
        let journal = stderr_is_journal();
        let (writer, worker) = queue.finish(io::stderr());
        let destination = if journal { "journal" } else { "stderr" }.to_owned();
        let (sub, level) =
            text_subscriber(filter, writer.clone(), io::stderr().is_terminal(), journal);
        Ok((sub, guard(worker, &writer, level, destination)))
    } else {
        let file = SizeRotatingFile::open(&cfg.file, cfg.max_size_bytes(), cfg.keep)
            .with_context(|| format!("log.file: cannot open {}", cfg.file.display()))?;
        let (writer, worker) = queue.finish(file);
        let destination = cfg.file.display().to_string();
        let (sub, level) = text_subscriber(filter, writer.clone(), false, false);
        Ok((sub, guard(worker, &writer, level, destination)))
    }
}

fn guard(
    worker: WorkerGuard,
    writer: &NonBlocking,
    level: LevelHandle,
    destination: String,
) -> LogGuard {
    LogGuard {
        _worker: worker,
        dropped: writer.error_counter(),
        level,
        destination,
    }
}

/// The fmt subscriber with a reloadable filter, and the handle that replaces the filter.
fn text_subscriber(
    filter: EnvFilter,
    writer: NonBlocking,
    ansi: bool,
    journal: bool,
) -> (Box<dyn Subscriber + Send + Sync>, LevelHandle) {
    fn handle<S: 'static>(h: tracing_subscriber::reload::Handle<EnvFilter, S>) -> LevelHandle {
        LevelHandle {
            set: Arc::new(move |f: EnvFilter| h.reload(f).map_err(|e| e.to_string())),
            env_override: false,
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    if journal {
        let inner = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false);
        let builder = builder
            .event_format(JournalFormat(inner))
            .with_filter_reloading();
        let level = handle(builder.reload_handle());
        (Box::new(builder.finish()), level)
    } else {
        let builder = builder.with_filter_reloading();
        let level = handle(builder.reload_handle());
        (Box::new(builder.finish()), level)
    }
}

/// True when stderr is the systemd journal: systemd sets `JOURNAL_STREAM=<dev>:<inode>` for
/// the stream it connected, and a redirected stderr (a pipe, a file) no longer matches it.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Prefixes each line with its syslog priority for journald (sd-daemon(3)): error `<3>`,
/// warn `<4>`, info `<6>`, debug and trace `<7>`; the level word itself is left out.
struct JournalFormat<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// A log file that rotates by size: before a write would take it past `max_bytes`, the file is
/// renamed to `<path>.1` (existing `.1` … `.keep-1` move up by one, `.keep` is overwritten) and
/// a new file is created. `keep` 0 deletes the full file instead. Writes are whole lines (the
/// log writer thread writes one event per call), so a line is never split across files.
///
/// If rotating fails (permissions, disk), the error is reported once on stderr and writing
/// continues in the current file; rotation is tried again after another `max_bytes`.
#[derive(Debug)]
pub struct SizeRotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    written: u64,
    reported: bool,
}

impl SizeRotatingFile {
    /// Opens (appending) or creates `path` with mode 0640. The directory must exist.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Self> {
        let file = Self::open_file(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            written,
            reported: false,
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
    }

    /// `<path>.<n>`
    fn numbered(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            remove_if_present(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                rename_if_present(&self.numbered(n), &self.numbered(n + 1))?;
            }
            std::fs::rename(&self.path, self.numbered(1))?;
        }
        self.file = Self::open_file(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Write for SizeRotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if self.written > 0 && self.written.saturating_add(len) > self.max_bytes {
            if let Err(e) = self.rotate() {
                if !self.reported {
                    eprintln!(
                        "fleetgate: cannot rotate log file {}: {e}; still writing to it",
                        self.path.display()
                    );
                    self.reported = true;
                }
                self.written = 0;
            }
        }
        let n = self.file.write(buf)?;
        self.written += u64::try_from(n).unwrap_or(u64::MAX);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetgate.log");
        let mut f = SizeRotatingFile::open(&path, 20, 2).unwrap();
        for i in 0..7 {
            f.write_all(format!("line {i:02} ......\n").as_bytes())
                .unwrap(); // 15 bytes: one line per file
        }
        assert_eq!(read(&path), "line 06 ......\n");
        assert_eq!(
            read(&dir.path().join("fleetgate.log.1")),
            "line 05 ......\n"
        );
        assert_eq!(
            read(&dir.path().join("fleetgate.log.2")),
            "line 04 ......\n"
        );
        assert!(!dir.path().join("fleetgate.log.3").exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777 & !0o640, 0, "mode {mode:o}");
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "0123456789\n").unwrap();
        let mut f = SizeRotatingFile::open(&path, 16, 1).unwrap();
        f.write_all(b"abc\n").unwrap(); // 15 bytes: fits
        assert_eq!(read(&path), "0123456789\nabc\n");
        f.write_all(b"def\n").unwrap(); // would be 19: rotate first
        assert_eq!(read(&path), "def\n");
        assert_eq!(read(&dir.path().join("x.log.1")), "0123456789\nabc\n");
    }

    #[test]
    fn keep_zero_starts_afresh_and_a_long_line_is_never_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut f = SizeRotatingFile::open(&path, 8, 0).unwrap();
        f.write_all(b"a very long line\n").unwrap();
        f.write_all(b"next\n").unwrap();
        assert_eq!(read(&path), "next\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn file_subscriber_writes_filtered_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            level: "info,fleetgate::logging=warn".into(),
            file: dir.path().join("gw.log"),
            max_size_mb: 1,
            keep: 1,
        };
        let filter = EnvFilter::builder().parse(&cfg.level).unwrap();
        let (sub, guard) = build(&cfg, filter).unwrap();
        tracing::subscriber::with_default(sub, || {
            tracing::info!("filtered out: this module is at warn");
            tracing::warn!(target: "fleetgate::logging", "kept warning");
            tracing::info!(target: "fleetgate::server", "kept info");
            let big = "x".repeat(600 << 10);
            tracing::info!(target: "fleetgate::server", "{big}");
            tracing::info!(target: "fleetgate::server", "{big}");
        });
        assert_eq!(guard.dropped_lines(), 0);
        assert_eq!(guard.destination, cfg.file.display().to_string());
        drop(guard); // flushes
        let old = read(&dir.path().join("gw.log.1"));
        let new = read(&cfg.file);
        assert!(
            old.contains("WARN") && old.contains("kept warning"),
            "{old:.200}"
        );
        assert!(old.contains("kept info"));
        assert!(!old.contains("filtered out"));
        assert!(!old.contains('\u{1b}'), "no ANSI in files");
        assert!(new.len() > 600 << 10 && new.len() < 700 << 10);
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_carry_the_priority() {
        let buf = Buf::default();
        let (writer, worker) = NonBlocking::new(buf.clone());
        let (sub, _) = text_subscriber(EnvFilter::new("debug"), writer, false, true);
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(device = "d1", "Max connections limit has exceeded");
            tracing::debug!("detail");
        });
        drop(worker);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            out,
            "<4>Max connections limit has exceeded device=\"d1\"\n<7>detail\n"
        );
    }

    #[test]
    fn the_level_handle_replaces_the_filter() {
        let buf = Buf::default();
        let (writer, worker) = NonBlocking::new(buf.clone());
        let (sub, level) = text_subscriber(EnvFilter::new("info"), writer, false, false);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("hidden at info");
            assert_eq!(level.set("debug").unwrap(), LevelChange::Applied);
            tracing::debug!("shown at debug");
            let err = level.set("info,x=loud").unwrap_err().to_string();
            assert!(err.starts_with("log.level"), "{err}");
            tracing::debug!("still debug after a refused filter");
        });
        drop(worker);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!out.contains("hidden"), "{out}");
        assert!(out.contains("shown at debug"), "{out}");
        assert!(out.contains("still debug"), "{out}");
        let pinned = LevelHandle {
            env_override: true,
            ..level
        };
        assert_eq!(pinned.set("warn").unwrap(), LevelChange::OverriddenByEnv);
    }

    #[test]
    fn bad_level_is_an_error_naming_the_key() {
        let cfg = LogConfig {
            level: "info,fleetgate=loud".into(),
            ..LogConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("log.level"), "{err}");
    }
}
