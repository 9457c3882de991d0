//! Reason codes: the outcome of a registration or reconnect attempt, as devices see it.
//!
//! These strings go on the wire to devices and into the audit log; they are **stable**: never
//! rename one, only add. An agent that receives a code it does not know shows the code itself.
//!
//! | code                    | when                                                              | device should |
//! |-------------------------|-------------------------------------------------------------------|---------------|
//! | `granted`               | key accepted, device registered, credential issued                | store the credential |
//! | `key_unknown`           | no such key (mistyped, deleted, or never existed)                 | let the user retype |
//! | `key_used`              | a one-time key (plain or unit-bound) was already used             | ask for a new key |
//! | `key_revoked`           | the key was revoked by the operator                               | ask for a new key |
//! | `key_wrong_unit`        | a unit-bound key presented by another unit                        | ask for the right key |
//! | `unit_id_invalid`       | the unit ID breaks the rules of [`check_unit_id`](super::unit::check_unit_id) | report a bug |
//! | `rate_limited`          | too many failed attempts from this source address                 | wait (retry-after) |
//! | `credential_unknown`    | reconnect with a certificate the registry does not know           | register again |
//! | `credential_revoked`    | the device was removed by the operator                            | drop gateway settings |
//! | `credential_superseded` | the unit registered again; this older credential is void          | drop this credential |
//! | `credential_expired`    | the device credential is past its `not_after`                     | register again |
//! | `internal_error`        | the registry could not be read or written                         | retry later |
//! | `limit_reached`         | the gateway's device connection limit is reached                  | wait (retry-after) |
//! | `bad_request`           | a malformed registration message (JSON, CSR signature, phase)     | report a bug |

use std::fmt;
use std::str::FromStr;

/// The outcome of a registration or reconnect, as a stable wire code (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Key accepted, device registered.
    Granted,
    /// No such key.
    KeyUnknown,
    /// A one-time key that was already used.
    KeyUsed,
    /// A revoked key.
    KeyRevoked,
    /// A unit-bound key used by another unit.
    KeyWrongUnit,
    /// The unit ID breaks the rules.
    UnitIdInvalid,
    /// Too many failures from this source address.
    RateLimited,
    /// Reconnect with an unknown credential.
    CredentialUnknown,
    /// Reconnect of a removed device.
    CredentialRevoked,
    /// Reconnect with a credential replaced by a newer registration of the same unit.
    CredentialSuperseded,
    /// Reconnect with an expired credential.
    CredentialExpired,
    /// The registry failed; nothing was consumed.
    InternalError,
    /// The gateway's device connection limit is reached.
    LimitReached,
    /// A malformed registration message (bad JSON, a CSR whose signature does not verify, a
    /// message the phase does not allow).
    BadRequest,
}

impl Reason {
    /// Every code, in documentation order.
    pub const ALL: [Reason; 14] = [
        Reason::Granted,
        Reason::KeyUnknown,
        Reason::KeyUsed,
        Reason::KeyRevoked,
        Reason::KeyWrongUnit,
        Reason::UnitIdInvalid,
        Reason::RateLimited,
        Reason::CredentialUnknown,
        Reason::CredentialRevoked,
        Reason::CredentialSuperseded,
        Reason::CredentialExpired,
        Reason::InternalError,
        Reason::LimitReached,
        Reason::BadRequest,
    ];

    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::KeyUnknown => "key_unknown",
            Reason::KeyUsed => "key_used",
            Reason::KeyRevoked => "key_revoked",
            Reason::KeyWrongUnit => "key_wrong_unit",
            Reason::UnitIdInvalid => "unit_id_invalid",
            Reason::RateLimited => "rate_limited",
            Reason::CredentialUnknown => "credential_unknown",
            Reason::CredentialRevoked => "credential_revoked",
            Reason::CredentialSuperseded => "credential_superseded",
            Reason::CredentialExpired => "credential_expired",
            Reason::InternalError => "internal_error",
            Reason::LimitReached => "limit_reached",
            Reason::BadRequest => "bad_request",
        }
    }

    /// A sentence an agent can show its user.
    pub fn message(self) -> &'static str {
        match self {
            Reason::Granted => "The device is registered.",
            Reason::KeyUnknown => "This key is not known to the gateway. Check it and try again.",
            Reason::KeyUsed => {
                "This key has already been used. Ask your administrator for a new key."
            }
            Reason::KeyRevoked => {
                "This key has been revoked. Ask your administrator for a new key."
            }
            Reason::KeyWrongUnit => {
                "This key belongs to another device. Ask your administrator for the key of this device."
            }
            Reason::UnitIdInvalid => "The gateway cannot accept this device's unit ID.",
            Reason::RateLimited => "Too many failed attempts. Wait a moment and try again.",
            Reason::CredentialUnknown => {
                "The gateway does not know this device. Register it again with a key."
            }
            Reason::CredentialRevoked => "This device has been removed from the gateway.",
            Reason::CredentialSuperseded => {
                "This device was registered again; this older registration is no longer valid."
            }
            Reason::CredentialExpired => {
                "This device's credential has expired. Register it again with a key."
            }
            Reason::InternalError => "The gateway cannot check the key right now. Try again later.",
            Reason::LimitReached => {
                "The gateway has reached its device connection limit. The device will retry later."
            }
            Reason::BadRequest => "The gateway did not understand the device's request.",
        }
    }

    /// True for outcomes that count as a failed attempt for rate limiting (a wrong, used or
    /// revoked key, a wrong unit, an unknown credential) — not for `granted`, `rate_limited`
    /// or `internal_error`.
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Reason::Granted | Reason::RateLimited | Reason::InternalError | Reason::LimitReached
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason code {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Reason, UnknownReason> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()));
            assert_eq!(r.as_str().parse::<Reason>().unwrap(), r);
            assert!(
                r.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
            assert!(!r.message().is_empty());
        }
        assert!("nope".parse::<Reason>().is_err());
    }

    #[test]
    fn codes_are_stable() {
        // These are on the wire: changing one breaks deployed agents.
        let codes: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            codes,
            [
                "granted",
                "key_unknown",
                "key_used",
                "key_revoked",
                "key_wrong_unit",
                "unit_id_invalid",
                "rate_limited",
                "credential_unknown",
                "credential_revoked",
                "credential_superseded",
                "credential_expired",
                "internal_error",
                "limit_reached",
                "bad_request"
            ]
        );
    }
}
