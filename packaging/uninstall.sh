#!/bin/sh
# Removes fleetgate completely: service, unit, binary, configuration, data (keystore, CA keys,
# registry, backups), logs, and the system user. Asks first (--yes for scripts).
# See docs/operations.md ("Uninstall").
set -eu
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

usage() {
    cat <<EOF
Usage: $0 [--yes] [--keep-data] [--root DIR] [--data-dir DIR] [--no-systemd]

  --yes            do not ask (for scripts)
  --keep-data      keep the data dir (keystore, CA keys, registry, backups) and the user
  --root DIR       uninstall the installation below DIR (see install.sh --root)
  --data-dir DIR   the data dir [default: server.data_dir from $CONF, else $DEFAULT_DATA_DIR]
  --no-systemd     do not talk to systemd
EOF
}

YES=no
KEEP_DATA=no
while [ $# -gt 0 ]; do
    case $1 in
    -y | --yes) YES=yes; shift ;;
    --keep-data) KEEP_DATA=yes; shift ;;
    --root) set_root "${2:-}"; shift 2 ;;
    --root=*) set_root "${1#*=}"; shift ;;
    --data-dir) DATA_DIR_ARG=${2:?--data-dir needs a directory}; shift 2 ;;
    --data-dir=*) DATA_DIR_ARG=${1#*=}; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

need_root_user
installed_by_dpkg && die "fleetgate was installed from the Debian package: remove it with 'apt purge fleetgate' (or 'apt remove' to keep the data)"
DATA=$(data_dir) # read before the configuration is removed
check_data_dir "$DATA"

echo "This removes fleetgate${ROOT:+ below $ROOT}:"
if [ -f "$(r "$UNIT")" ] || systemd_running; then
    echo "  the service and $UNIT"
fi
echo "  $BIN"
echo "  $CONF_DIR (the configuration)"
if [ "$KEEP_DATA" = yes ]; then
    echo "  $LOG_DIR"
    echo "  (kept: $DATA and the user '$FG_USER')"
else
    echo "  $DATA: the keystore, the root CA and its private key, the device registry and its"
    echo "    backups. Devices registered with this gateway cannot reconnect to a new one"
    echo "    without registering again. Copy $DATA somewhere first if in doubt."
    echo "  $LOG_DIR"
    echo "  the system user and group '$FG_USER'"
fi
if [ "$YES" != yes ]; then
    if [ -t 0 ]; then
        printf 'Type "yes" to continue: '
        read -r answer || answer=""
        [ "$answer" = yes ] || die "not confirmed; nothing was removed"
    else
        die "not confirmed (no terminal); pass --yes to uninstall without asking"
    fi
fi

# 1. Service.
if systemd_running; then
    if systemctl cat fleetgate.service >/dev/null 2>&1; then
        systemctl disable --now fleetgate.service || warn "could not stop/disable the service"
    fi
elif [ -n "$ROOT" ] && [ "$SYSTEMD" != no ]; then
    say "would run: systemctl disable --now fleetgate.service"
elif gateway_process_running; then
    warn "a fleetgate process is still running: stop it (its files are removed now)"
fi
if [ -f "$(r "$UNIT")" ]; then
    rm -f "$(r "$UNIT")"
    say "removed $UNIT"
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed fleetgate.service 2>/dev/null || true
    elif [ -n "$ROOT" ] && [ "$SYSTEMD" != no ]; then
        say "would run: systemctl daemon-reload"
    fi
fi

# 2. Files.
remove() {
    if [ -e "$(r "$1")" ] || [ -L "$(r "$1")" ]; then
        rm -rf "$(r "$1")"
        say "removed $1"
    fi
}
remove "$BIN"
remove "$CONF_DIR"
remove "$LOG_DIR"
if [ "$KEEP_DATA" = no ]; then
    remove "$DATA"
fi

# 3. User and group.
if [ "$KEEP_DATA" = no ]; then
    if [ -n "$ROOT" ]; then
        say "would remove the system user and group '$FG_USER'"
    elif getent passwd "$FG_USER" >/dev/null 2>&1; then
        if command -v userdel >/dev/null 2>&1; then
            userdel "$FG_USER" || warn "could not remove the user '$FG_USER'"
        else
            deluser "$FG_USER" || warn "could not remove the user '$FG_USER'"
        fi
        getent group "$FG_USER" >/dev/null 2>&1 && { groupdel "$FG_USER" 2>/dev/null || delgroup "$FG_USER" 2>/dev/null || true; }
        say "removed the user '$FG_USER'"
    fi
fi

# 4. In a --root tree, also the directories install.sh created there, if now empty.
if [ -n "$ROOT" ]; then
    for d in /usr/bin /usr /etc/systemd/system /etc/systemd /etc "$(dirname "$DATA")" /var/lib /var/log /var; do
        rmdir "$(r "$d")" 2>/dev/null || true
    done
fi
say "fleetgate is uninstalled"
