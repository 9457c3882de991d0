#!/usr/bin/env bash
# Runs every fuzz target briefly (default 20 s each) from its committed seeds.
#   fuzz/smoke.sh [SECONDS] [TARGET…]
# Needs cargo-fuzz (`cargo install --locked cargo-fuzz`) and a nightly toolchain or
# RUSTC_BOOTSTRAP=1 on stable (libFuzzer's sanitizer flags are nightly-only).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"; shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^fleetgate-fuzz$')
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz…" >&2
    cargo install --locked cargo-fuzz
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q nightly; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
status=0
for t in "${targets[@]}"; do
    echo "== building $t" >&2
    cargo "${toolchain[@]}" fuzz build "$t" >&2
    corpus="corpus/$t"
    mkdir -p "$corpus"
    [ -d "seeds/$t" ] && cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    echo "== $t (${secs}s)"
    if ! cargo "${toolchain[@]}" fuzz run "$t" "$corpus" -- -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 12; then
        echo "!! $t found a crash (see fuzz/artifacts/$t)"; status=1
    fi
done
exit "$status"
