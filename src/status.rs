//! The gateway's health as `/usg/check-status` reports it: `init`, `ok`, `warn` or `err`.
//!
//! The value lives in one atomic that the control thread writes and every shard reads, so a
//! request never recomputes it (the reference product recomputes at most every 30 s; so do we,
//! except that the end of start-up is reflected at once).

use std::sync::atomic::{AtomicU8, Ordering};

/// One of the four states of SPEC.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Still starting.
    Init = 0,
    /// Up and serving, a management server connected.
    Ok = 1,
    /// Serving, but no management server is connected.
    Warn = 2,
    /// No valid certificate (missing, expired, not yet valid, broken chain), or start-up
    /// did not finish in time.
    Err = 3,
}

impl Health {
    /// The word in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Init => "init",
            Health::Ok => "ok",
            Health::Warn => "warn",
            Health::Err => "err",
        }
    }

    /// The whole response body, e.g. `{"status":"ok"}`.
    pub fn json(self) -> &'static str {
        match self {
            Health::Init => r#"{"status":"init"}"#,
            Health::Ok => r#"{"status":"ok"}"#,
            Health::Warn => r#"{"status":"warn"}"#,
            Health::Err => r#"{"status":"err"}"#,
        }
    }
}

/// The shared, cached health value.
#[derive(Debug, Default)]
pub struct StatusCell(AtomicU8);

impl StatusCell {
    /// Reads the cached value.
    pub fn get(&self) -> Health {
        match self.0.load(Ordering::Relaxed) {
            1 => Health::Ok,
            2 => Health::Warn,
            3 => Health::Err,
            _ => Health::Init,
        }
    }

    /// Stores a freshly computed value.
    pub fn set(&self, h: Health) {
        self.0.store(h as u8, Ordering::Relaxed);
    }
}

/// Facts the status is computed from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// Every shard is listening.
    pub started: bool,
    /// Seconds since the process started.
    pub uptime_secs: u64,
    /// The start-up deadline (`status.startup_deadline_secs`).
    pub startup_deadline_secs: u64,
    /// The active certificate chain is valid now.
    pub certificate_valid: bool,
    /// Management connections open.
    pub management_connections: u64,
}

/// The rules of SPEC.md, in order: certificate first, then start-up, then management.
pub fn compute(i: Inputs) -> Health {
    if !i.started {
        return if i.uptime_secs >= i.startup_deadline_secs {
            Health::Err
        } else {
            Health::Init
        };
    }
    if !i.certificate_valid {
        return Health::Err;
    }
    if i.management_connections == 0 {
        Health::Warn
    } else {
        Health::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Inputs {
        Inputs {
            started: true,
            uptime_secs: 1,
            startup_deadline_secs: 30,
            certificate_valid: true,
            management_connections: 1,
        }
    }

    #[test]
    fn rules() {
        assert_eq!(compute(base()), Health::Ok);
        assert_eq!(
            compute(Inputs {
                management_connections: 0,
                ..base()
            }),
            Health::Warn
        );
        assert_eq!(
            compute(Inputs {
                certificate_valid: false,
                ..base()
            }),
            Health::Err
        );
        assert_eq!(
            compute(Inputs {
                started: false,
                ..base()
            }),
            Health::Init
        );
        assert_eq!(
            compute(Inputs {
                started: false,
                uptime_secs: 30,
                ..base()
            }),
            Health::Err
        );
    }

    #[test]
    fn cell_round_trips() {
        let c = StatusCell::default();
        assert_eq!(c.get(), Health::Init);
        c.set(Health::Warn);
        assert_eq!(c.get(), Health::Warn);
        assert_eq!(c.get().json(), r#"{"status":"warn"}"#);
    }
}
