# Shared by install.sh, update.sh and uninstall.sh (sourced, not run). POSIX sh.
#
# Paths (all below --root DIR when given):
#   /usr/bin/fleetgate                       the binary
#   /etc/fleetgate/fleetgate.toml            the configuration (never overwritten)
#   /etc/fleetgate/fleetgate.toml.example    the example of the installed version
#   /etc/systemd/system/fleetgate.service    the unit (only where systemd runs, or with --root)
#   /var/lib/fleetgate                       data: keystore, root.pem, pki/, registry.db, backups/
#   /var/log/fleetgate                       for log.file (empty unless configured)

PACKAGING_DIR=$(cd "$(dirname "$0")" && pwd)
SOURCE_DIR=$(cd "$PACKAGING_DIR/.." && pwd)

FG_USER=fleetgate
BIN=/usr/bin/fleetgate
CONF_DIR=/etc/fleetgate
CONF=$CONF_DIR/fleetgate.toml
UNIT=/etc/systemd/system/fleetgate.service
DEFAULT_DATA_DIR=/var/lib/fleetgate
LOG_DIR=/var/log/fleetgate

ROOT=""
SYSTEMD=auto
DATA_DIR_ARG=""

say() { printf 'fleetgate: %s\n' "$*"; }
warn() { printf 'fleetgate: warning: %s\n' "$*" >&2; }
die() {
    printf 'fleetgate: error: %s\n' "$*" >&2
    exit 1
}

# Path of an installed file: below --root when given.
r() { printf '%s%s' "$ROOT" "$1"; }

# Runs a command that changes the system beyond our files (users, ownership, services).
# With --root it is printed instead: a root is an image, not a running system.
system() {
    if [ -n "$ROOT" ]; then
        say "would run: $*"
    else
        "$@"
    fi
}

# Sets ROOT from --root DIR (absolute, created if missing, never "/").
set_root() {
    [ -n "$1" ] || die "--root needs a directory"
    mkdir -p "$1" || die "cannot create $1"
    ROOT=$(cd "$1" && pwd)
    [ "$ROOT" != "/" ] || ROOT=""
}

need_root_user() {
    if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
        die "run as root (sudo $0 ...), or use --root DIR to install into a directory"
    fi
}

# True when systemd manages this system and we are allowed to use it.
systemd_running() {
    [ "$SYSTEMD" != no ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ] &&
        command -v systemctl >/dev/null 2>&1
}

# True when the unit file belongs in this install: systemd runs here, or we build a --root.
unit_wanted() {
    [ "$SYSTEMD" != no ] && { [ -n "$ROOT" ] || systemd_running; }
}

# The data dir: --data-dir, else server.data_dir from the installed config, else the default.
# A relative data_dir is relative to the service's working directory, /var/lib/fleetgate.
data_dir() {
    d=$DATA_DIR_ARG
    if [ -z "$d" ] && [ -f "$(r "$CONF")" ]; then
        d=$(sed -n 's/^[[:space:]]*data_dir[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$(r "$CONF")" | head -n 1)
    fi
    [ -n "$d" ] || d=$DEFAULT_DATA_DIR
    case $d in
    /*) ;;
    *) d=$DEFAULT_DATA_DIR/$d ;;
    esac
    printf '%s' "$d"
}

# Refuses to delete or back up a data dir that is a system directory by mistake.
check_data_dir() {
    case $1 in
    */../* | */.. | *//*) die "data dir $1: use a plain absolute path" ;;
    / | /*/) die "data dir $1: refusing a top-level or trailing-slash path" ;;
    /bin | /boot | /dev | /etc | /home | /lib | /lib32 | /lib64 | /libx32 | /media | /mnt | /opt | /proc | /root | /run | /sbin | /srv | /sys | /tmp | /usr | /var) die "data dir $1: refusing a system directory" ;;
    /usr/* | /var/lib | /var/log | /var/cache | /var/backups) die "data dir $1: refusing a system directory" ;;
    esac
}

# Copies $1 to $2 atomically (temporary file in the target directory, then rename) with mode $3.
install_file() {
    tmp="$2.new.$$"
    if ! { cp "$1" "$tmp" && chmod "$3" "$tmp" && mv -f "$tmp" "$2"; }; then
        rm -f "$tmp"
        die "cannot install $2"
    fi
}

# "fleetgate 0.1.0" → "0.1.0"; empty when the binary does not run.
version_of() {
    "$1" --version 2>/dev/null | sed -n 's/^fleetgate //p' | head -n 1
}

# True if a gateway process from this installation seems to run (best effort, no systemd).
gateway_process_running() {
    command -v pgrep >/dev/null 2>&1 && pgrep -f "^$(r "$BIN") serve" >/dev/null 2>&1
}

# The Debian package owns the install: scripts must not fight dpkg.
installed_by_dpkg() {
    [ -z "$ROOT" ] && command -v dpkg-query >/dev/null 2>&1 &&
        [ "$(dpkg-query -W -f='${Status}' fleetgate 2>/dev/null)" = "install ok installed" ]
}

foreground_help() {
    cat <<EOF
To run the gateway without systemd (in the foreground, logs on stderr; Ctrl-C stops it):
    runuser -u $FG_USER -- $BIN serve --config $CONF
  Ports below 1024 need: setcap cap_net_bind_service=+ep $BIN
  Large fleets need a high open-file limit first: ulimit -n 1048576
EOF
}
