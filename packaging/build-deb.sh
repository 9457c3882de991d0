#!/bin/sh
# Builds the Debian package with cargo-deb (a release build) and lists what it holds.
#   packaging/build-deb.sh              build, package, list
#   packaging/build-deb.sh --no-build   package the existing target/release/fleetgate
# Extra arguments go to `cargo deb` (e.g. --target aarch64-unknown-linux-gnu).
# Needs: cargo install --locked cargo-deb; dpkg-deb (Debian package dpkg).
set -eu
cd "$(dirname "$0")/.."
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-deb: cargo-deb is missing: cargo install --locked cargo-deb" >&2
    exit 1
fi
[ -f docs/configuration.md ] || { echo "build-deb: run from a complete checkout" >&2; exit 1; }
deb=$(nice -n 10 cargo deb -p fleetgate "$@" | tail -n 1)
[ -f "$deb" ] || { echo "build-deb: cargo deb did not report a package (got: $deb)" >&2; exit 1; }
echo "== $deb"
dpkg-deb --info "$deb"
echo "== contents"
dpkg-deb --contents "$deb"
