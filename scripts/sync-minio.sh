#!/usr/bin/env bash
# Archive, then remove, generated media older than N days from the object store (MinIO/S3 or the
# local media folder), marking the affected jobs as archived. The runbook's storage-overflow step:
#   scripts/sync-minio.sh --cleanup --days 30 [--dry-run] [--archive-dir DIR]
# Storage is chosen by the usual SEIDRA_* variables (SEIDRA_S3_ENDPOINT, SEIDRA_DATABASE_URL, ...).
set -euo pipefail

usage() { echo "usage: $0 --cleanup --days N [--dry-run] [--archive-dir DIR]" >&2; exit 2; }

cleanup=false
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cleanup) cleanup=true ;;
        --days|--archive-dir) [[ $# -ge 2 ]] || usage; args+=("$1" "$2"); shift ;;
        --dry-run) args+=("$1") ;;
        *) usage ;;
    esac
    shift
done
$cleanup || usage

here="$(cd "$(dirname "$0")/.." && pwd)"
seidra="$here/.venv/bin/seidra"
[[ -x "$seidra" ]] || seidra="$(command -v seidra || true)"
[[ -n "$seidra" ]] || { echo "seidra is not installed: run 'make test' or 'make demo' once" >&2; exit 1; }
exec "$seidra" cleanup "${args[@]}"
