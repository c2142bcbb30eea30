#!/usr/bin/env bash
# Submit a prompts file as a Ray job with the plain `ray job submit` command (what `seidra batch` does
# through the Jobs API). The job's working dir holds the prompts file alone; the project is installed
# on the cluster.
#   scripts/submit-batch.sh PROMPTS_FILE [--batch-id NAME] [--priority low] [--api-key-file PATH] [--url URL] [--no-wait]
# RAY_API_SERVER_ADDRESS picks the cluster (default http://127.0.0.1:8265). The driver authenticates
# with the key in the file --api-key-file names (a path on the head node, made absolute here) or the
# cluster's own SEIDRA_API_KEY: this shell's SEIDRA_API_KEY is not passed on, as the dashboard shows
# every job's entrypoint and runtime env. `ray job submit` quotes each argument after `--`.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: $0 PROMPTS_FILE [--batch-id NAME] [--priority P] [--api-key-file PATH] [--url URL] [--no-wait]  (PROMPTS_FILE must exist)" >&2
    exit 2
fi
prompts="$1"
shift
upload="$(mktemp -d)"
trap 'rm -rf "$upload"' EXIT
cp -- "$prompts" "$upload/"

submit_args=()
batch_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-wait) submit_args+=("--no-wait") ;;
        # The driver runs in a working dir of its own: a relative path would not lead to the key.
        --api-key-file)
            [[ $# -ge 2 ]] || { echo "$0: --api-key-file needs a PATH" >&2; exit 2; }
            batch_args+=("--api-key-file" "$(realpath -m -- "$2")")
            shift ;;
        --api-key-file=*) batch_args+=("--api-key-file" "$(realpath -m -- "${1#*=}")") ;;
        *) batch_args+=("$1") ;;
    esac
    shift
done

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray job submit --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$upload" \
    "${submit_args[@]}" -- python -m serve_app.batch "$(basename -- "$prompts")" "${batch_args[@]}"
