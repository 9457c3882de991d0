//! Schema migration: a registry written by schema version 1 opens with today's code, keeps its
//! data, and works.

use fleetgate::pki::Fingerprint;
use fleetgate::registry::{
    DeviceCredential, KeyFilter, KeyKind, KeyRef, Reason, RegistrationRequest, Registry, schema,
};

/// A frozen copy of what version 1 created. Never edit: it stands for files in the field.
const V1_SCHEMA: &str = "
CREATE TABLE keys (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('one-time', 'unit', 'mass')),
    key_hash      BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    prefix        TEXT    NOT NULL,
    unit_id       TEXT    COLLATE NOCASE CHECK ((kind = 'unit') = (unit_id IS NOT NULL)),
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    use_count     INTEGER NOT NULL DEFAULT 0,
    first_used_at INTEGER,
    last_used_at  INTEGER,
    last_used_by  TEXT
);
CREATE TABLE devices (
    id              INTEGER PRIMARY KEY,
    unit_id         TEXT    NOT NULL COLLATE NOCASE,
    fingerprint     BLOB    NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    serial          BLOB    NOT NULL,
    not_after       INTEGER NOT NULL,
    key_id          INTEGER REFERENCES keys (id) ON DELETE SET NULL,
    registered_at   INTEGER NOT NULL,
    registered_from TEXT,
    last_seen       INTEGER,
    address         TEXT,
    revoked_at      INTEGER,
    revoked_reason  TEXT,
    spki_sha256     BLOB
);
CREATE INDEX devices_by_unit ON devices (unit_id);
CREATE INDEX devices_by_key ON devices (key_id);
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    outcome   TEXT    NOT NULL,
    unit_id   TEXT,
    address   TEXT,
    key_id    INTEGER,
    device_id INTEGER,
    detail    TEXT
);
CREATE INDEX audit_by_time ON audit (at);
PRAGMA user_version = 1;
";

const T0: i64 = 1_750_000_000;

#[test]
fn a_version_1_registry_is_migrated_and_keeps_its_data() {
    use fleetgate::registry::key::{key_hash, normalize};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let one_time = "AAAA-BBBB-CCCC-DDDD-EEEE";
    let used = "QQQQ-RRRR-SSSS-TTTT-VVVV";
    {
        // Written the way version 1 wrote it (rollback journal: v1 files may predate WAL use).
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(V1_SCHEMA).unwrap();
        let insert_key = |kind: &str, value: &str, unit: Option<&str>, uses: i64| {
            conn.execute(
                "INSERT INTO keys (kind, key_hash, prefix, unit_id, created_at, use_count, last_used_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?6 > 0 THEN 'OLD-UNIT' END)",
                rusqlite::params![kind, &key_hash(&normalize(value))[..], "XXXX-…", unit, T0, uses],
            )
            .unwrap();
            conn.last_insert_rowid()
        };
        insert_key("one-time", one_time, None, 0);
        let used_id = insert_key("one-time", used, None, 1);
        insert_key("unit", "UUUU-UUUU-UUUU-UUUU-UUUU", Some("00E0C5000001"), 0);
        conn.execute(
            "INSERT INTO devices (unit_id, fingerprint, serial, not_after, key_id, registered_at)
             VALUES ('OLD-UNIT', ?1, x'01', ?2, ?3, ?4)",
            rusqlite::params![&[0x42u8; 32][..], T0 + 86_400 * 365, used_id, T0],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO audit (at, actor, action, outcome) VALUES (?1, 'cli', 'key_create', 'ok')",
            [T0],
        )
        .unwrap();
    }

    let mut reg = Registry::open_in(dir.path()).unwrap();
    assert_eq!(reg.schema_version().unwrap(), schema::LATEST);
    const { assert!(schema::LATEST >= 2) };

    // The data survived.
    let keys = reg.list_keys(KeyFilter::All).unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[2].kind, KeyKind::UnitBound);
    let old = reg.authenticate(&Fingerprint([0x42; 32]), T0).unwrap();
    assert_eq!(old.unit_id, "OLD-UNIT");
    assert_eq!(old.root_fingerprint, None, "unknown for v1 devices");
    assert_eq!(reg.audit_log(10).unwrap().len(), 1);

    // Version 2's column works: the v1 device counts as lacking the new root until it
    // acknowledges it.
    let root = Fingerprint([0xEE; 32]);
    assert_eq!(reg.count_devices_lacking_root(&root, T0).unwrap(), 1);
    assert!(
        reg.set_device_root(&Fingerprint([0x42; 32]), &root)
            .unwrap()
    );
    assert_eq!(reg.count_devices_lacking_root(&root, T0).unwrap(), 0);

    // Keys created by v1 behave as today's.
    let cred = DeviceCredential {
        fingerprint: Fingerprint([0x43; 32]),
        serial: vec![2],
        not_after: T0 + 1000,
        public_key_sha256: None,
    };
    let req = |key| RegistrationRequest {
        key,
        unit_id: "NEW-UNIT",
        source: None,
        credential: &cred,
        root: Some(root),
        now: T0,
    };
    assert_eq!(
        reg.consume_key(&req(used)).unwrap_err().reason(),
        Reason::KeyUsed
    );
    reg.consume_key(&req(one_time)).unwrap();
    assert_eq!(
        reg.authenticate(&cred.fingerprint, T0)
            .unwrap()
            .root_fingerprint,
        Some(root)
    );
    assert!(reg.find_key(&KeyRef::parse(one_time)).unwrap().is_some());

    // Reopening does not migrate again.
    drop(reg);
    let reg = Registry::open_in(dir.path()).unwrap();
    assert_eq!(reg.list_devices().unwrap().len(), 2);
}

#[test]
fn migrating_an_empty_file_gives_the_same_schema_as_migrating_v1() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.db");
    let old = dir.path().join("old.db");
    drop(Registry::open(&fresh, &Default::default()).unwrap());
    rusqlite::Connection::open(&old)
        .unwrap()
        .execute_batch(V1_SCHEMA)
        .unwrap();
    drop(Registry::open(&old, &Default::default()).unwrap());
    let schema_of = |p: &std::path::Path| -> Vec<String> {
        let conn = rusqlite::Connection::open(p).unwrap();
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        stmt.query_map([], |r| {
            let sql: Option<String> = r.get(2)?;
            // Compare token streams: ALTER TABLE rewrites whitespace.
            let sql = sql
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace(" )", ")")
                .replace("( ", "(");
            Ok(format!(
                "{} {} {}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                sql
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    assert_eq!(schema_of(&fresh), schema_of(&old));
}
