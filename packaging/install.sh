#!/bin/sh
# Installs fleetgate: binary, system user, configuration, data dir, systemd unit; enables and
# starts the service where systemd runs. Safe to run again (an existing config is kept).
# See docs/operations.md ("Install").
set -eu
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

usage() {
    cat <<EOF
Usage: $0 [--binary PATH] [--root DIR] [--no-systemd] [--no-start] [--force]

  --binary PATH   the fleetgate binary to install [default: target/release/fleetgate]
  --root DIR      install below DIR instead of / (an image or a test): no user is created,
                  nothing is chowned, no service is started; those steps are printed
  --no-systemd    do not install the unit or talk to systemd (see the foreground run below)
  --no-start      install and enable the service, but do not start it
  --force         replace a different installed binary (normally: use update.sh), or
                  install although the Debian package is installed

Installs /usr/bin/fleetgate, the user and group '$FG_USER', $CONF (only if absent),
$DEFAULT_DATA_DIR (0750), $LOG_DIR (0750) and $UNIT.
EOF
}

NEW_BIN=$SOURCE_DIR/target/release/fleetgate
START=yes
FORCE=no
while [ $# -gt 0 ]; do
    case $1 in
    --binary) NEW_BIN=${2:?--binary needs a path}; shift 2 ;;
    --binary=*) NEW_BIN=${1#*=}; shift ;;
    --root) set_root "${2:-}"; shift 2 ;;
    --root=*) set_root "${1#*=}"; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    --no-start) START=no; shift ;;
    --force) FORCE=yes; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

need_root_user
[ -f "$NEW_BIN" ] || die "no binary at $NEW_BIN (build it: cargo build --release, or pass --binary PATH)"
[ -x "$NEW_BIN" ] || die "$NEW_BIN is not executable"
VERSION=$(version_of "$NEW_BIN")
[ -n "$VERSION" ] || die "$NEW_BIN does not run here (wrong architecture?): '$NEW_BIN --version' failed"
if installed_by_dpkg && [ "$FORCE" != yes ]; then
    die "the Debian package fleetgate is installed; upgrade it with apt/dpkg (or pass --force)"
fi
say "installing fleetgate $VERSION${ROOT:+ below $ROOT}"

# 1. User and group.
if [ -n "$ROOT" ]; then
    say "would create the system user and group '$FG_USER' (home $DEFAULT_DATA_DIR, no login)"
elif getent passwd "$FG_USER" >/dev/null 2>&1; then
    say "user '$FG_USER' exists"
elif command -v useradd >/dev/null 2>&1; then
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --home-dir "$DEFAULT_DATA_DIR" --no-create-home \
        --shell "$nologin" --comment "fleetgate gateway" "$FG_USER"
    say "created system user '$FG_USER'"
elif command -v adduser >/dev/null 2>&1; then # BusyBox (Alpine)
    addgroup -S "$FG_USER" 2>/dev/null || true
    adduser -S -D -H -h "$DEFAULT_DATA_DIR" -s /sbin/nologin -G "$FG_USER" "$FG_USER"
    say "created system user '$FG_USER'"
else
    die "neither useradd nor adduser found: create a system user '$FG_USER' and run again"
fi

# 2. Binary.
mkdir -p "$(r /usr/bin)"
BIN_CHANGED=no
if [ -f "$(r "$BIN")" ] && cmp -s "$NEW_BIN" "$(r "$BIN")"; then
    say "$BIN is already this build"
else
    if [ -f "$(r "$BIN")" ] && [ "$FORCE" != yes ]; then
        die "$BIN holds another build (fleetgate $(version_of "$(r "$BIN")")); upgrade with update.sh (it backs up the registry first), or pass --force"
    fi
    install_file "$NEW_BIN" "$(r "$BIN")" 0755
    BIN_CHANGED=yes
    say "installed $BIN"
fi

# 3. Configuration: never overwrite an existing one.
mkdir -p "$(r "$CONF_DIR")"
chmod 0755 "$(r "$CONF_DIR")"
install_file "$PACKAGING_DIR/fleetgate.toml.example" "$(r "$CONF").example" 0644
if [ -f "$(r "$CONF")" ]; then
    say "kept the existing $CONF (this version's example: $CONF.example)"
else
    install_file "$PACKAGING_DIR/fleetgate.toml.example" "$(r "$CONF")" 0640
    system chgrp "$FG_USER" "$(r "$CONF")"
    say "installed $CONF"
fi
if ! out=$("$(r "$BIN")" config check "$(r "$CONF")" 2>&1); then
    die "$CONF is not valid for fleetgate $VERSION: $out"
fi

# 4. Data and log directories.
DATA=$(data_dir)
check_data_dir "$DATA"
for d in "$DATA" "$LOG_DIR"; do
    mkdir -p "$(r "$d")"
    chmod 0750 "$(r "$d")"
    system chown "$FG_USER:$FG_USER" "$(r "$d")"
done
say "data dir $DATA, log dir $LOG_DIR"

# 5. Service.
if unit_wanted; then
    mkdir -p "$(r "$(dirname "$UNIT")")"
    if [ -f "$(r "$UNIT")" ] && cmp -s "$PACKAGING_DIR/fleetgate.service" "$(r "$UNIT")"; then
        say "$UNIT is up to date"
    else
        install_file "$PACKAGING_DIR/fleetgate.service" "$(r "$UNIT")" 0644
        say "installed $UNIT"
    fi
    if [ -n "$ROOT" ] || systemd_running; then
        system systemctl daemon-reload
        system systemctl enable fleetgate.service
        if [ "$START" = yes ]; then
            if [ "$BIN_CHANGED" = yes ]; then
                system systemctl restart fleetgate.service
            else
                system systemctl start fleetgate.service
            fi
        fi
    fi
else
    [ "$SYSTEMD" = no ] || say "systemd is not running here: no unit installed"
    foreground_help
fi

cat <<EOF
fleetgate: done.
  config   $CONF   (check: fleetgate config check $CONF)
  data     $DATA   (the first start creates the root CA, the server certificate and root.pem)
  status   fleetgate status --config $CONF
  pairing  runuser -u $FG_USER -- fleetgate --data-dir $DATA pki show   (root fingerprint for devices)
EOF
