#!/bin/sh
# Updates an installed fleetgate to a new build: checks the configuration with the new build,
# backs up the registry (online), the keystore, the configuration and the old binary, replaces
# the binary, refreshes the unit and the config example, and restarts the service. Keeps the
# configuration, the keystore and the registry; the registry's schema is migrated by the new
# build when it opens it. See docs/operations.md ("Upgrades").
set -eu
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

usage() {
    cat <<EOF
Usage: $0 [--binary PATH] [--root DIR] [--data-dir DIR] [--no-systemd] [--keep-backups N] [--force]

  --binary PATH      the new fleetgate binary [default: target/release/fleetgate]
  --root DIR         update the installation below DIR (see install.sh --root)
  --data-dir DIR     the data dir [default: server.data_dir from $CONF, else $DEFAULT_DATA_DIR]
  --no-systemd       do not stop/start the service through systemd
  --keep-backups N   keep the N newest backups in DATA_DIR/backups [default: 5]
  --force            update even if a gateway process seems to run without systemd and no
                     online backup method exists (the registry copy may be inconsistent)

Backups go to DATA_DIR/backups/update-<time>-from-<version>/ (mode 0700): registry.db,
keystore.pem, fleetgate.toml and the previous binary (to roll back: see docs/operations.md).
EOF
}

NEW_BIN=$SOURCE_DIR/target/release/fleetgate
KEEP=5
FORCE=no
while [ $# -gt 0 ]; do
    case $1 in
    --binary) NEW_BIN=${2:?--binary needs a path}; shift 2 ;;
    --binary=*) NEW_BIN=${1#*=}; shift ;;
    --root) set_root "${2:-}"; shift 2 ;;
    --root=*) set_root "${1#*=}"; shift ;;
    --data-dir) DATA_DIR_ARG=${2:?--data-dir needs a directory}; shift 2 ;;
    --data-dir=*) DATA_DIR_ARG=${1#*=}; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    --keep-backups) KEEP=${2:?--keep-backups needs a number}; shift 2 ;;
    --keep-backups=*) KEEP=${1#*=}; shift ;;
    --force) FORCE=yes; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $KEEP in '' | *[!0-9]* | 0) die "--keep-backups needs a number of at least 1" ;; esac

need_root_user
installed_by_dpkg && die "the Debian package fleetgate is installed; upgrade it with apt/dpkg"
[ -f "$(r "$BIN")" ] || die "fleetgate is not installed (no $BIN); run install.sh first"
[ -x "$NEW_BIN" ] || die "no executable binary at $NEW_BIN (pass --binary PATH)"
OLD_VERSION=$(version_of "$(r "$BIN")")
NEW_VERSION=$(version_of "$NEW_BIN")
[ -n "$NEW_VERSION" ] || die "$NEW_BIN does not run here: '$NEW_BIN --version' failed"
[ -n "$OLD_VERSION" ] || OLD_VERSION=unknown
say "updating fleetgate $OLD_VERSION -> $NEW_VERSION${ROOT:+ below $ROOT}"

# 1. The new build must accept the configuration, or the service would not come back.
if [ -f "$(r "$CONF")" ]; then
    if ! out=$("$NEW_BIN" config check "$(r "$CONF")" 2>&1); then
        die "fleetgate $NEW_VERSION rejects $CONF: $out
Fix it (compare with $PACKAGING_DIR/fleetgate.toml.example) and run update.sh again; nothing was changed."
    fi
    say "$CONF is valid for $NEW_VERSION"
else
    warn "no $CONF: the service starts with the built-in defaults"
fi

DATA=$(data_dir)
check_data_dir "$DATA"
D=$(r "$DATA")
DB=$D/registry.db

WAS_ACTIVE=no
if systemd_running && systemctl is-active --quiet fleetgate.service; then
    WAS_ACTIVE=yes
fi

# 2. Backups.
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
BACKUP=$D/backups/update-$STAMP-from-$OLD_VERSION
mkdir -p "$D/backups"
chmod 0700 "$D/backups"
mkdir -m 0700 "$BACKUP" 2>/dev/null || {
    BACKUP=$BACKUP-$$
    mkdir -m 0700 "$BACKUP" || die "cannot create $BACKUP"
}
cp -p "$(r "$BIN")" "$BACKUP/fleetgate"
[ -f "$(r "$CONF")" ] && cp -p "$(r "$CONF")" "$BACKUP/fleetgate.toml"
[ -f "$D/keystore.pem" ] && cp -p "$D/keystore.pem" "$BACKUP/keystore.pem"

STOPPED=no
stop_gateway() {
    if [ "$WAS_ACTIVE" = yes ] && [ "$STOPPED" = no ]; then
        say "stopping the service"
        systemctl stop fleetgate.service
        STOPPED=yes
    fi
}

if [ -f "$DB" ]; then
    # Best first: the installed fleetgate's own online backup; then sqlite3's online backup;
    # else a copy of the file while the gateway is stopped.
    if "$(r "$BIN")" registry backup --help >/dev/null 2>&1; then
        "$(r "$BIN")" --data-dir "$D" registry backup "$BACKUP/registry.db" ||
            die "registry backup failed; nothing was changed (partial backup in $BACKUP)"
        how="fleetgate registry backup (online)"
    elif command -v sqlite3 >/dev/null 2>&1; then
        sqlite3 "$DB" ".backup '$BACKUP/registry.db'" ||
            die "sqlite3 .backup of $DB failed; nothing was changed"
        how="sqlite3 .backup (online)"
    else
        if [ "$WAS_ACTIVE" = no ] && gateway_process_running && [ "$FORCE" != yes ]; then
            die "a fleetgate process is running and neither 'fleetgate registry backup' nor sqlite3 is available: stop the gateway (or install sqlite3) and run again, or pass --force"
        fi
        stop_gateway
        cp -p "$DB" "$BACKUP/registry.db"
        [ -f "$DB-wal" ] && cp -p "$DB-wal" "$BACKUP/registry.db-wal"
        how="file copy with the gateway stopped"
    fi
    chmod 0600 "$BACKUP/registry.db"
    if command -v sqlite3 >/dev/null 2>&1; then
        check=$(sqlite3 "$BACKUP/registry.db" 'PRAGMA integrity_check;' 2>&1 || true)
        [ "$check" = ok ] || die "the registry backup $BACKUP/registry.db fails its integrity check ($check); nothing was changed"
    fi
    say "registry backed up ($how) to $BACKUP/registry.db"
else
    say "no registry yet ($DATA/registry.db): nothing to back up"
fi
say "backup: $BACKUP"

# 3. Replace the binary (atomically: the running process keeps the old file until it exits).
stop_gateway
install_file "$NEW_BIN" "$(r "$BIN")" 0755
say "installed $BIN ($NEW_VERSION)"

# 4. Unit and example: the packaged versions; the configuration itself stays.
if [ -d "$(r "$CONF_DIR")" ]; then
    install_file "$PACKAGING_DIR/fleetgate.toml.example" "$(r "$CONF").example" 0644
fi
if [ -f "$(r "$UNIT")" ] && unit_wanted; then
    if ! cmp -s "$PACKAGING_DIR/fleetgate.service" "$(r "$UNIT")"; then
        cp -p "$(r "$UNIT")" "$BACKUP/fleetgate.service"
        install_file "$PACKAGING_DIR/fleetgate.service" "$(r "$UNIT")" 0644
        say "updated $UNIT (previous one in the backup)"
    fi
    system systemctl daemon-reload
fi

# 5. Migrations: the new build migrates registry.db when it opens it (at start). Run them
# now when it has a command for that, so a failure shows here and not in the journal.
if [ -f "$DB" ] && "$(r "$BIN")" registry migrate --help >/dev/null 2>&1; then
    if [ -n "$ROOT" ]; then
        "$(r "$BIN")" --data-dir "$D" registry migrate || die "registry migration failed; restore $BACKUP"
    else
        runuser -u "$FG_USER" -- "$BIN" --data-dir "$DATA" registry migrate ||
            die "registry migration failed; restore $BACKUP (see docs/operations.md)"
    fi
fi

# 6. Restart.
if [ -n "$ROOT" ]; then
    system systemctl try-restart fleetgate.service
elif [ "$WAS_ACTIVE" = yes ]; then
    if [ "$STOPPED" = yes ]; then
        systemctl start fleetgate.service
    else
        systemctl restart fleetgate.service
    fi
    i=0
    while ! systemctl is-active --quiet fleetgate.service; do
        i=$((i + 1))
        [ $i -le 20 ] || die "the service did not come back; see: journalctl -u fleetgate -n 50. Roll back: cp $BACKUP/fleetgate $BIN && systemctl restart fleetgate"
        sleep 0.5
    done
    say "service restarted"
elif systemd_running; then
    say "the service was not running; start it with: systemctl start fleetgate"
else
    say "restart the gateway yourself if it runs (this update did not stop it)"
    foreground_help
fi

# 7. Old backups: keep the newest $KEEP (names sort by time).
total=0
for b in "$D"/backups/update-*; do
    [ -d "$b" ] && total=$((total + 1))
done
excess=$((total - KEEP))
for b in "$D"/backups/update-*; do
    [ "$excess" -gt 0 ] || break
    [ -d "$b" ] || continue
    rm -rf "$b"
    say "removed old backup $b"
    excess=$((excess - 1))
done
say "done: fleetgate $NEW_VERSION"
