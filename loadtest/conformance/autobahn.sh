#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (RFC 6455 conformance, cases 1.* to 10.*) against
# a wss:// (or ws://) WebSocket echo endpoint, then summarises the verdicts.
#
#   loadtest/conformance/autobahn.sh [--out DIR] [--ca FILE] [--hostname NAME]
#                                    [--cases LIST] [--agent NAME] [--timeout SECS] [URL]
#
#   URL             echo endpoint (default wss://127.0.0.1:8443/usg/echo)
#   --out DIR       report directory (default: <repo>/target/autobahn); index.html is the report
#   --ca FILE       verify the server certificate against this PEM CA (and send SNI). Without
#                   it Autobahn does not verify the certificate at all.
#   --hostname NAME name to verify and send as SNI (default: the URL's host; implies checking)
#   --cases LIST    comma-separated case patterns (default 1.*,2.*,...,10.*). 12.* and 13.*
#                   (permessage-deflate) are always excluded: fleetgate negotiates no extension.
#   --agent NAME    server label in the reports (default fleetgate)
#   --timeout SECS  bound on the whole test run (default 900)
#
# Environment:
#   AUTOBAHN_HOME     install cache (default ~/.cache/fleetgate-autobahn); autobahntestsuite is
#                     pip-installed there on first use (about 1 min, needs network)
#   AUTOBAHN_VERSION  autobahntestsuite version to install (default 25.10.1)
#   AUTOBAHN_PYTHON   a Python 2.7 interpreter (default: pyenv's 2.7.18, else python2.7);
#                     Autobahn|Testsuite is Python 2 only
#
# Exit status: 0 when every selected case ran and none FAILED; 1 otherwise (see
# autobahn_summary.py); 2 for usage or setup errors.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

url="wss://127.0.0.1:8443/usg/echo"
out="$repo/target/autobahn"
ca=""
hostname=""
cases="1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*"
agent="fleetgate"
run_timeout=900

die() { echo "autobahn.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --ca) ca="${2:?--ca needs a file}"; shift 2 ;;
        --hostname) hostname="${2:?--hostname needs a name}"; shift 2 ;;
        --cases) cases="${2:?--cases needs a list}"; shift 2 ;;
        --agent) agent="${2:?--agent needs a name}"; shift 2 ;;
        --timeout) run_timeout="${2:?--timeout needs seconds}"; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "autobahn.sh: unknown option $1" >&2; usage 2 >&2 ;;
        *) url="$1"; shift ;;
    esac
done

case "$url" in
    ws://*|wss://*) ;;
    *) die "URL must start with ws:// or wss:// (got $url)" ;;
esac
case "$run_timeout" in
    ''|*[!0-9]*) die "--timeout needs a number of seconds" ;;
esac
if [ -n "$ca" ]; then
    [ -r "$ca" ] || die "CA file $ca is not readable"
    ca="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
    if [ -z "$hostname" ]; then
        # host part of the URL: strip scheme, path, port and IPv6 brackets
        hostname="${url#*://}"; hostname="${hostname%%/*}"
        case "$hostname" in
            \[*\]*) hostname="${hostname#\[}"; hostname="${hostname%%\]*}" ;;
            *) hostname="${hostname%%:*}" ;;
        esac
    fi
fi

# ---- Python 2.7 and the install cache -----------------------------------------------------
home="${AUTOBAHN_HOME:-$HOME/.cache/fleetgate-autobahn}"
version="${AUTOBAHN_VERSION:-25.10.1}"
python="${AUTOBAHN_PYTHON:-}"
if [ -z "$python" ]; then
    if command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/2.7.18/bin/python2.7" ]; then
        python="$(pyenv root)/versions/2.7.18/bin/python2.7"
    elif command -v python2.7 >/dev/null 2>&1; then
        python="$(command -v python2.7)"
    else
        die "no Python 2.7 found: install one with 'pyenv install 2.7.18' or set AUTOBAHN_PYTHON"
    fi
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the summary"

site="$home/site"
if [ ! -d "$site/autobahntestsuite" ]; then
    echo "autobahn.sh: installing autobahntestsuite $version into $site (about a minute)" >&2
    mkdir -p "$home"
    rm -rf "$site.partial"
    # --target skips .pth files (zope namespace); the wrapper below uses site.addsitedir.
    timeout 600 "$python" -m pip install --disable-pip-version-check -q \
        --target "$site.partial" "autobahntestsuite==$version" \
        || die "pip install of autobahntestsuite failed"
    mv "$site.partial" "$site"
fi

# wstest with the cache on its path.
wstest=("$python" -c "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'wstest'; \
from autobahntestsuite.wstest import run; run()" "$site")
"${wstest[@]}" --autobahnversion >/dev/null 2>&1 || die "the install in $site does not run; delete it to reinstall"

# ---- spec ----------------------------------------------------------------------------------
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# A stale index.json must never be summarised as this run's result.
rm -f "$out/index.json" "$out/expected-cases.json"
spec="$out/fuzzingclient.json"
python3 - "$spec" "$out" "$url" "$agent" "$hostname" "$cases" <<'PY'
import json, sys
spec_path, outdir, url, agent, hostname, cases = sys.argv[1:]
server = {"agent": agent, "url": url}
if hostname:
    server["hostname"] = hostname  # switches on SNI and certificate verification
spec = {
    "outdir": outdir,
    "servers": [server],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": ["12.*", "13.*"],
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
PY

# The case ids the spec selects, resolved by Autobahn itself, so a case that never ran is
# reported as missing rather than silently absent.
"$python" - "$site" "$spec" "$out/expected-cases.json" <<'PY'
import json, site, sys
site.addsitedir(sys.argv[1])
from autobahntestsuite.case import Cases, CaseBasename, CaseCategories, CaseSubCategories
from autobahntestsuite.caseset import CaseSet
spec = json.load(open(sys.argv[2]))
ids = CaseSet("websocket", CaseBasename, Cases, CaseCategories, CaseSubCategories).parseSpecCases(spec)
json.dump({"agent": spec["servers"][0]["agent"], "cases": ids}, open(sys.argv[3], "w"))
PY

# ---- run -------------------------------------------------------------------------------------
echo "autobahn.sh: $url -> $out (timeout ${run_timeout}s${hostname:+, verifying $hostname})" >&2
start=$(date +%s)
status=0
(
    cd "$out"
    if [ -n "$ca" ]; then export SSL_CERT_FILE="$ca"; fi
    timeout --kill-after=10 "$run_timeout" "${wstest[@]}" -m fuzzingclient -s "$spec" > "$out/wstest.log" 2>&1
) || status=$?
echo "autobahn.sh: wstest finished in $(( $(date +%s) - start ))s (exit $status, log $out/wstest.log)" >&2
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "autobahn.sh: wstest hit the ${run_timeout}s timeout" >&2
fi

python3 "$here/autobahn_summary.py" --expected "$out/expected-cases.json" "$out/index.json"
