//! Unit tests of the registry against real SQLite files in a temp dir.

use std::net::IpAddr;

use super::*;
use crate::pki::Fingerprint;

const T0: UnixTime = 1_750_000_000;
const YEAR: i64 = 365 * 86_400;

fn open() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open_in(&dir.path().join("data")).unwrap();
    (dir, reg)
}

fn cred(n: u8) -> DeviceCredential {
    DeviceCredential {
        fingerprint: Fingerprint([n; 32]),
        serial: vec![1, 2, n],
        not_after: T0 + YEAR,
        public_key_sha256: None,
    }
}

fn request<'a>(key: &'a str, unit: &'a str, c: &'a DeviceCredential) -> RegistrationRequest<'a> {
    RegistrationRequest {
        key,
        unit_id: unit,
        source: Some("192.0.2.10".parse::<IpAddr>().unwrap()),
        credential: c,
        root: Some(Fingerprint([0xAA; 32])),
        now: T0 + 10,
    }
}

#[test]
fn open_creates_a_private_wal_database_at_the_latest_version() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, reg) = open();
    let path = dir.path().join("data").join(FILE_NAME);
    assert_eq!(reg.path(), path);
    assert_eq!(reg.schema_version().unwrap(), schema::LATEST);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(dir.path().join("data"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let journal: String = reg
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let sync: i64 = reg
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous = FULL");
    drop(reg);
    // Reopening is a no-op migration.
    let reg = Registry::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(reg.schema_version().unwrap(), schema::LATEST);
}

#[test]
fn a_newer_schema_is_refused() {
    let (dir, reg) = open();
    reg.conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(reg);
    let err = Registry::open_in(&dir.path().join("data")).unwrap_err();
    assert!(
        matches!(err, RegistryError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn keys_are_stored_hashed_never_in_clear() {
    let (_dir, mut reg) = open();
    let keys = reg.create_one_time_keys(3, T0).unwrap();
    let mass = reg
        .create_mass_key(Some("Welcome-2025-Berlin"), T0)
        .unwrap();
    assert_eq!(keys.len(), 3);
    let mut stmt = reg.conn.prepare("SELECT * FROM keys").unwrap();
    let ncols = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let mut dump = String::new();
    while let Some(row) = rows.next().unwrap() {
        for i in 0..ncols {
            use rusqlite::types::ValueRef;
            match row.get_ref(i).unwrap() {
                ValueRef::Text(t) => dump.push_str(&String::from_utf8_lossy(t)),
                ValueRef::Blob(b) => {
                    dump.push_str(&String::from_utf8_lossy(b));
                    dump.extend(b.iter().map(|x| format!("{x:02X}")));
                }
                other => dump.push_str(&format!("{other:?}")),
            }
            dump.push('|');
        }
    }
    for k in &keys {
        let n = key::normalize(&k.value);
        assert!(!dump.contains(&n) && !dump.contains(&k.value), "{dump}");
        assert!(dump.contains(&key::display_prefix(&n)));
    }
    assert!(!dump.to_uppercase().contains("BERLIN"));
    assert_eq!(mass.value, "Welcome-2025-Berlin");
}

#[test]
fn create_list_revoke_delete() {
    let (_dir, mut reg) = open();
    let one = reg.create_one_time_keys(2, T0).unwrap();
    let unit = reg.create_unit_keys(&["UNIT-A", "unit-b"], T0).unwrap();
    let mass = reg.create_mass_key(None, T0).unwrap();
    assert_eq!(unit[1].unit_id.as_deref(), Some("unit-b"));
    assert_eq!(mass.kind, KeyKind::Mass);
    let all = reg.list_keys(KeyFilter::All).unwrap();
    assert_eq!(all.len(), 5);
    assert!(
        all.iter()
            .all(|k| k.state() == KeyState::Unused && k.is_usable())
    );
    assert_eq!(all[2].kind, KeyKind::UnitBound);
    assert_eq!(all[2].unit_id.as_deref(), Some("UNIT-A"));

    // Revoke by value (any spelling), by ID and by #ID.
    let lower = one[0].value.to_lowercase().replace('-', " ");
    let r = reg.revoke_key(&KeyRef::parse(&lower), T0 + 1).unwrap();
    assert_eq!((r.id, r.state()), (one[0].id, KeyState::Revoked));
    reg.revoke_key(&KeyRef::parse(&format!("#{}", unit[0].id)), T0 + 1)
        .unwrap();
    // Revoking twice is harmless and keeps the first time.
    let again = reg.revoke_key(&KeyRef::Id(one[0].id), T0 + 50).unwrap();
    assert_eq!(again.revoked_at, Some(T0 + 1));
    assert_eq!(reg.list_keys(KeyFilter::Revoked).unwrap().len(), 2);
    assert_eq!(reg.list_keys(KeyFilter::Unused).unwrap().len(), 3);

    let gone = reg.delete_key(&KeyRef::Id(mass.id), T0 + 2).unwrap();
    assert_eq!(gone.kind, KeyKind::Mass);
    assert!(reg.find_key(&KeyRef::Id(mass.id)).unwrap().is_none());
    assert!(matches!(
        reg.delete_key(&KeyRef::Id(mass.id), T0 + 2),
        Err(RegistryError::KeyNotFound(_))
    ));
    let err = reg
        .revoke_key(&KeyRef::parse("ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ"), T0)
        .unwrap_err();
    assert!(err.is_rejection());
    // The message names the key by its prefix only.
    assert_eq!(err.to_string(), "no such key: ZZZZ-…");

    // Admin actions are audited.
    let log = reg.audit_log(100).unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions.iter().filter(|a| **a == action::KEY_CREATE).count(),
        5
    );
    assert_eq!(
        actions.iter().filter(|a| **a == action::KEY_REVOKE).count(),
        2
    );
    assert_eq!(
        actions.iter().filter(|a| **a == action::KEY_DELETE).count(),
        1
    );
    assert!(log.iter().all(|e| e.actor == "cli"));
}

#[test]
fn bad_input_is_refused_and_nothing_is_created() {
    let (_dir, mut reg) = open();
    assert!(matches!(
        reg.create_one_time_keys(0, T0),
        Err(RegistryError::BadCount(0))
    ));
    assert!(matches!(
        reg.create_one_time_keys(MAX_KEYS_PER_CREATE + 1, T0),
        Err(RegistryError::BadCount(_))
    ));
    let err = reg.create_unit_keys(&["ok-1", "bad unit"], T0).unwrap_err();
    assert!(matches!(err, RegistryError::InvalidUnitId { .. }), "{err}");
    assert!(reg.list_keys(KeyFilter::All).unwrap().is_empty());
    assert!(matches!(
        reg.create_mass_key(Some("short"), T0),
        Err(RegistryError::InvalidKeyValue(_))
    ));
}

#[test]
fn a_custom_mass_value_already_in_use_is_refused() {
    let (_dir, mut reg) = open();
    reg.create_mass_key(Some("Kiosk-Rollout-2025"), T0).unwrap();
    // Same value in another spelling: same key.
    let err = reg
        .create_mass_key(Some("kiosk rollout 2025"), T0)
        .unwrap_err();
    assert!(matches!(err, RegistryError::KeyValueInUse), "{err}");
    // A random key's value cannot be reused as a custom value either.
    let random = reg.create_one_time_keys(1, T0).unwrap().remove(0);
    assert!(matches!(
        reg.create_mass_key(Some(&random.value), T0),
        Err(RegistryError::KeyValueInUse)
    ));
    // After deletion the value is free again.
    reg.delete_key(&KeyRef::parse("Kiosk-Rollout-2025"), T0)
        .unwrap();
    reg.create_mass_key(Some("Kiosk-Rollout-2025"), T0).unwrap();
}

#[test]
fn a_one_time_key_is_granted_once() {
    let (_dir, mut reg) = open();
    let k = reg.create_one_time_keys(1, T0).unwrap().remove(0);
    let (c1, c2) = (cred(1), cred(2));
    // Typed in lower case with spaces: still the key.
    let typed = k.value.to_lowercase().replace('-', " ");
    let grant = reg.consume_key(&request(&typed, "UNIT-1", &c1)).unwrap();
    assert_eq!(grant.key_id, k.id);
    assert_eq!(grant.kind, KeyKind::OneTime);
    assert!(!grant.retried && grant.superseded.is_empty());

    let refusal = reg
        .consume_key(&request(&k.value, "UNIT-2", &c2))
        .unwrap_err();
    assert_eq!(refusal.reason(), Reason::KeyUsed);
    match &refusal {
        RegistrationRefusal::KeyUsed {
            key_id,
            used_by,
            used_at,
        } => {
            assert_eq!(*key_id, k.id);
            assert_eq!(used_by.as_deref(), Some("UNIT-1"));
            assert_eq!(*used_at, Some(T0 + 10));
        }
        other => panic!("{other:?}"),
    }
    // Even the same unit gets no second credential without the same key pair.
    let refusal = reg
        .consume_key(&request(&k.value, "UNIT-1", &c2))
        .unwrap_err();
    assert_eq!(refusal.reason(), Reason::KeyUsed);

    let info = reg.find_key(&KeyRef::Id(k.id)).unwrap().unwrap();
    assert_eq!(info.state(), KeyState::Used);
    assert!(!info.is_usable());
    assert_eq!(info.use_count, 1);
    assert_eq!(info.last_used_by.as_deref(), Some("UNIT-1"));

    let d = reg.device_by_fingerprint(&c1.fingerprint).unwrap().unwrap();
    assert_eq!(d.unit_id, "UNIT-1");
    assert_eq!(d.key_id, Some(k.id));
    assert_eq!(d.serial, c1.serial);
    assert_eq!(d.not_after, c1.not_after);
    assert_eq!(d.registered_at, T0 + 10);
    assert_eq!(d.address.as_deref(), Some("192.0.2.10"));
    assert_eq!(d.root_fingerprint, Some(Fingerprint([0xAA; 32])));
    assert!(
        reg.device_by_fingerprint(&c2.fingerprint)
            .unwrap()
            .is_none()
    );
}

#[test]
fn every_outcome_has_its_reason_and_is_audited() {
    let (_dir, mut reg) = open();
    let unit_key = reg
        .create_unit_keys(&["00E0C5A1B2C3"], T0)
        .unwrap()
        .remove(0);
    let revoked = reg.create_one_time_keys(1, T0).unwrap().remove(0);
    reg.revoke_key(&KeyRef::Id(revoked.id), T0).unwrap();
    let c = cred(7);

    let cases: [(&str, &str, Reason); 5] = [
        ("NOPE-NOPE-NOPE-NOPE-NOPE", "U1", Reason::KeyUnknown),
        ("", "U1", Reason::KeyUnknown),
        (&revoked.value, "U1", Reason::KeyRevoked),
        (&unit_key.value, "00E0C5000000", Reason::KeyWrongUnit),
        (&unit_key.value, "bad unit id", Reason::UnitIdInvalid),
    ];
    for (key, unit, reason) in cases {
        let got = reg.consume_key(&request(key, unit, &c)).unwrap_err();
        assert_eq!(got.reason(), reason, "{key} {unit}: {got}");
    }
    // The unit-bound key works for its unit, in any ASCII case, once.
    reg.consume_key(&request(&unit_key.value, "00e0c5a1b2c3", &c))
        .unwrap();
    let c8 = cred(8);
    assert_eq!(
        reg.consume_key(&request(&unit_key.value, "00E0C5A1B2C3", &c8))
            .unwrap_err()
            .reason(),
        Reason::KeyUsed
    );

    let log = reg.audit_log(1000).unwrap();
    let outcomes: Vec<&str> = log
        .iter()
        .rev()
        .filter(|e| e.action == action::REGISTER)
        .map(|e| e.outcome.as_str())
        .collect();
    assert_eq!(
        outcomes,
        [
            "key_unknown",
            "key_unknown",
            "key_revoked",
            "key_wrong_unit",
            "unit_id_invalid",
            "granted",
            "key_used"
        ]
    );
    let wrong_unit = log.iter().find(|e| e.outcome == "key_wrong_unit").unwrap();
    assert_eq!(wrong_unit.key_id, Some(unit_key.id));
    assert_eq!(wrong_unit.unit_id.as_deref(), Some("00E0C5000000"));
    assert_eq!(wrong_unit.address.as_deref(), Some("192.0.2.10"));
    assert_eq!(wrong_unit.actor, "device");
    let invalid = log.iter().find(|e| e.outcome == "unit_id_invalid").unwrap();
    assert!(invalid.detail.as_deref().unwrap().contains("bad unit id"));
    // Refusals decided outside the registry are recorded too.
    reg.record_refusal(Some("U9"), None, Reason::RateLimited, T0 + 20)
        .unwrap();
    assert_eq!(reg.audit_log(1).unwrap()[0].outcome, "rate_limited");
}

#[test]
fn a_mass_key_registers_many_devices() {
    let (_dir, mut reg) = open();
    let k = reg.create_mass_key(Some("Mass-Deploy-2025"), T0).unwrap();
    let creds: Vec<DeviceCredential> = (0..50).map(cred).collect();
    for (i, c) in creds.iter().enumerate() {
        let unit = format!("UNIT-{i}");
        let g = reg
            .consume_key(&request("mass deploy 2025", &unit, c))
            .unwrap();
        assert_eq!(g.kind, KeyKind::Mass);
    }
    let info = reg.find_key(&KeyRef::Id(k.id)).unwrap().unwrap();
    assert_eq!(info.use_count, 50);
    assert!(info.is_usable());
    assert_eq!(reg.list_devices().unwrap().len(), 50);
    // A revoked mass key stops working; registered devices stay.
    reg.revoke_key(&KeyRef::Id(k.id), T0 + 100).unwrap();
    let c = cred(200);
    assert_eq!(
        reg.consume_key(&request("Mass-Deploy-2025", "LATE", &c))
            .unwrap_err()
            .reason(),
        Reason::KeyRevoked
    );
    assert!(reg.authenticate(&creds[0].fingerprint, T0 + 100).is_ok());
}

#[test]
fn registering_a_unit_again_supersedes_its_old_credential() {
    let (_dir, mut reg) = open();
    let keys = reg.create_one_time_keys(2, T0).unwrap();
    let (old, new) = (cred(1), cred(2));
    reg.consume_key(&request(&keys[0].value, "UNIT-X", &old))
        .unwrap();
    let g = reg
        .consume_key(&request(&keys[1].value, "unit-x", &new))
        .unwrap();
    assert_eq!(g.superseded, [old.fingerprint]);
    let refusal = reg.authenticate(&old.fingerprint, T0 + 20).unwrap_err();
    assert_eq!(refusal.reason(), Reason::CredentialSuperseded);
    assert!(reg.authenticate(&new.fingerprint, T0 + 20).is_ok());
    let states: Vec<DeviceState> = reg
        .devices_of_unit("UNIT-X")
        .unwrap()
        .iter()
        .map(|d| d.state(T0 + 20))
        .collect();
    assert_eq!(states, [DeviceState::Superseded, DeviceState::Active]);
}

#[test]
fn a_device_that_never_got_its_credential_can_retry_with_the_same_key_pair() {
    let (_dir, mut reg) = open();
    let k = reg.create_one_time_keys(1, T0).unwrap().remove(0);
    let mut first = cred(1);
    first.public_key_sha256 = Some([0x11; 32]);
    let g1 = reg
        .consume_key(&request(&k.value, "UNIT-R", &first))
        .unwrap();
    // The pre-check agrees with the retry rule.
    reg.check_key(&k.value, "UNIT-R", Some(&[0x11; 32]))
        .unwrap();
    assert_eq!(
        reg.check_key(&k.value, "UNIT-R", Some(&[0x22; 32]))
            .unwrap_err()
            .reason(),
        Reason::KeyUsed
    );

    // Same unit, same key pair, new certificate: granted, in place of the first.
    let mut second = cred(2);
    second.public_key_sha256 = Some([0x11; 32]);
    let g2 = reg
        .consume_key(&request(&k.value, "UNIT-R", &second))
        .unwrap();
    assert!(g2.retried);
    assert_eq!(g2.device_id, g1.device_id);
    assert!(
        reg.device_by_fingerprint(&first.fingerprint)
            .unwrap()
            .is_none()
    );
    assert!(reg.authenticate(&second.fingerprint, T0 + 20).is_ok());
    assert_eq!(reg.list_devices().unwrap().len(), 1);
    assert_eq!(
        reg.find_key(&KeyRef::Id(k.id)).unwrap().unwrap().use_count,
        1
    );

    // Another key pair, or another unit with the same key pair: refused.
    let mut other_pair = cred(3);
    other_pair.public_key_sha256 = Some([0x33; 32]);
    assert_eq!(
        reg.consume_key(&request(&k.value, "UNIT-R", &other_pair))
            .unwrap_err()
            .reason(),
        Reason::KeyUsed
    );
    let mut other_unit = cred(4);
    other_unit.public_key_sha256 = Some([0x11; 32]);
    assert_eq!(
        reg.consume_key(&request(&k.value, "UNIT-S", &other_unit))
            .unwrap_err()
            .reason(),
        Reason::KeyUsed
    );
    // Once the device is removed, the key cannot bring it back.
    reg.revoke_device("UNIT-R", T0 + 30).unwrap();
    let mut third = cred(5);
    third.public_key_sha256 = Some([0x11; 32]);
    assert_eq!(
        reg.consume_key(&request(&k.value, "UNIT-R", &third))
            .unwrap_err()
            .reason(),
        Reason::KeyUsed
    );
}

#[test]
fn a_storage_failure_consumes_nothing() {
    let (_dir, mut reg) = open();
    let keys = reg.create_one_time_keys(2, T0).unwrap();
    let c = cred(1);
    reg.consume_key(&request(&keys[0].value, "U1", &c)).unwrap();
    // The same certificate fingerprint again violates UNIQUE: the attempt fails as a whole.
    let err = reg
        .consume_key(&request(&keys[1].value, "U2", &c))
        .unwrap_err();
    assert_eq!(err.reason(), Reason::InternalError, "{err}");
    let k1 = reg.find_key(&KeyRef::Id(keys[1].id)).unwrap().unwrap();
    assert_eq!(k1.use_count, 0, "the key was not consumed");
    assert!(reg.devices_of_unit("U2").unwrap().is_empty());
}

#[test]
fn a_batch_decides_each_attempt_in_order() {
    let (_dir, mut reg) = open();
    let k = reg.create_one_time_keys(1, T0).unwrap().remove(0);
    let m = reg.create_mass_key(None, T0).unwrap();
    let (c1, c2, c3) = (cred(1), cred(2), cred(3));
    let dup = cred(3);
    let reqs = [
        request(&k.value, "A", &c1),
        request(&k.value, "B", &c2),
        request(&m.value, "C", &c3),
        request(&m.value, "D", &dup),
    ];
    let out = reg.consume_keys(&reqs);
    let reasons: Vec<Reason> = out
        .iter()
        .map(|r| r.as_ref().map_or_else(|e| e.reason(), |_| Reason::Granted))
        .collect();
    assert_eq!(
        reasons,
        [
            Reason::Granted,
            Reason::KeyUsed,
            Reason::Granted,
            Reason::InternalError
        ]
    );
    assert_eq!(reg.list_devices().unwrap().len(), 2);
    assert_eq!(
        reg.find_key(&KeyRef::Id(m.id)).unwrap().unwrap().use_count,
        1
    );
}

#[test]
fn reconnect_authentication_and_last_seen() {
    let (_dir, mut reg) = open();
    let k = reg.create_mass_key(None, T0).unwrap();
    let mut short = cred(2);
    short.not_after = T0 + 100;
    let c = cred(1);
    reg.consume_key(&request(&k.value, "U1", &c)).unwrap();
    reg.consume_key(&request(&k.value, "U2", &short)).unwrap();

    assert_eq!(
        reg.authenticate(&Fingerprint([9; 32]), T0)
            .unwrap_err()
            .reason(),
        Reason::CredentialUnknown
    );
    assert_eq!(
        reg.authenticate(&short.fingerprint, T0 + 101)
            .unwrap_err()
            .reason(),
        Reason::CredentialExpired
    );
    let addr: IpAddr = "2001:db8::5".parse().unwrap();
    assert!(
        reg.touch_last_seen(&c.fingerprint, Some(addr), T0 + 500)
            .unwrap()
    );
    // An older touch never moves last_seen back.
    assert!(
        reg.touch_last_seen(&c.fingerprint, Some(addr), T0 + 400)
            .unwrap()
    );
    let d = reg.authenticate(&c.fingerprint, T0 + 600).unwrap();
    assert_eq!(d.last_seen, Some(T0 + 500));
    assert_eq!(d.address.as_deref(), Some("2001:db8::5"));
    assert!(
        !reg.touch_last_seen(&Fingerprint([9; 32]), None, T0)
            .unwrap()
    );
    let sync: i64 = reg
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "back to FULL after a touch batch");

    let removed = reg.revoke_device("u1", T0 + 700).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].fingerprint, c.fingerprint);
    assert_eq!(
        reg.authenticate(&c.fingerprint, T0 + 701)
            .unwrap_err()
            .reason(),
        Reason::CredentialRevoked
    );
    // A removed device is not touched any more, and removing again revokes nothing.
    assert!(!reg.touch_last_seen(&c.fingerprint, None, T0 + 800).unwrap());
    assert!(reg.revoke_device("U1", T0 + 900).unwrap().is_empty());
    assert!(matches!(
        reg.revoke_device("NEVER", T0),
        Err(RegistryError::DeviceNotFound(_))
    ));
    let log = reg.audit_log(5).unwrap();
    assert!(log.iter().any(|e| e.action == action::DEVICE_REVOKE
        && e.detail.as_deref() == Some("removed")
        && e.unit_id.as_deref() == Some("U1")));
}

#[test]
fn the_reconnect_lookup_uses_an_index() {
    let (_dir, reg) = open();
    let plan: Vec<String> = reg
        .conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT id, unit_id, revoked_at FROM devices WHERE fingerprint = ?1",
        )
        .unwrap()
        .query_map([&[0u8; 32][..]], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|p| p.contains("INDEX") && p.contains("(fingerprint=?)")),
        "{plan:?}"
    );
}

#[test]
fn roots_held_by_devices() {
    let (_dir, mut reg) = open();
    let k = reg.create_mass_key(None, T0).unwrap();
    let (a, b) = (cred(1), cred(2));
    reg.consume_key(&request(&k.value, "A", &a)).unwrap();
    reg.consume_key(&request(&k.value, "B", &b)).unwrap();
    let new_root = Fingerprint([0xBB; 32]);
    assert_eq!(reg.count_devices_lacking_root(&new_root, T0).unwrap(), 2);
    assert!(reg.set_device_root(&a.fingerprint, &new_root).unwrap());
    assert_eq!(reg.count_devices_lacking_root(&new_root, T0).unwrap(), 1);
    assert_eq!(
        reg.count_devices_lacking_root(&Fingerprint([0xAA; 32]), T0)
            .unwrap(),
        1
    );
}

#[test]
fn online_backup_is_a_complete_registry() {
    let (dir, mut reg) = open();
    let k = reg.create_one_time_keys(1, T0).unwrap().remove(0);
    let c = cred(1);
    reg.consume_key(&request(&k.value, "U1", &c)).unwrap();
    let dest = dir.path().join("backup.db");
    reg.backup_to(&dest, T0 + 50).unwrap();
    // The live registry keeps working and the backup does not see later changes.
    reg.create_one_time_keys(5, T0 + 60).unwrap();

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let copy = Registry::open(&dest, &OpenOptions::default()).unwrap();
    assert_eq!(copy.list_keys(KeyFilter::All).unwrap().len(), 1);
    assert!(copy.authenticate(&c.fingerprint, T0 + 60).is_ok());
    assert_eq!(
        reg.audit_log(10)
            .unwrap()
            .iter()
            .filter(|e| e.action == action::BACKUP)
            .count(),
        1
    );
    // A destination in a missing directory is a clear error.
    let err = reg
        .backup_to(&dir.path().join("missing/b.db"), T0)
        .unwrap_err();
    assert!(matches!(err, RegistryError::Backup { .. }), "{err}");
}

#[test]
fn audit_pruning() {
    let (_dir, mut reg) = open();
    reg.record_refusal(None, None, Reason::RateLimited, T0)
        .unwrap();
    reg.record_refusal(None, None, Reason::RateLimited, T0 + 100)
        .unwrap();
    assert_eq!(reg.prune_audit(T0 + 50).unwrap(), 1);
    assert_eq!(reg.audit_log(10).unwrap().len(), 1);
}
