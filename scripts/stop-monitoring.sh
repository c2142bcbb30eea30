#!/usr/bin/env bash
# Stops the monitoring stack; its named volumes (metrics, dashboards, logs, traces) are kept.
set -euo pipefail
. "$(dirname "$0")/compose.sh"
compose down
