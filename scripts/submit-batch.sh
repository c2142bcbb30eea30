#!/usr/bin/env bash
# Submit a prompts file as a Ray job with the plain `ray job submit` command (what `seidra batch` does
# through the Jobs API). The job's working dir holds the prompts file alone; the project is installed
# on the cluster.
#   scripts/submit-batch.sh PROMPTS_FILE [--batch-id ID] [--priority low] [--no-wait]
# RAY_API_SERVER_ADDRESS picks the cluster (default http://127.0.0.1:8265).
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: $0 PROMPTS_FILE [--batch-id ID] [--priority P] [--no-wait]  (PROMPTS_FILE must exist)" >&2
    exit 2
fi
prompts="$1"
shift
upload="$(mktemp -d)"
trap 'rm -rf "$upload"' EXIT
cp "$prompts" "$upload/"

submit_args=()
batch_args=()
for arg in "$@"; do
    if [[ "$arg" == "--no-wait" ]]; then submit_args+=("--no-wait"); else batch_args+=("$arg"); fi
done

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray job submit --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$upload" \
    "${submit_args[@]}" -- python -m serve_app.batch "$(basename "$prompts")" "${batch_args[@]}"
