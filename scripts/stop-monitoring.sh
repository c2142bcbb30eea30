#!/usr/bin/env bash
# Stops the monitoring stack; its named volumes (metrics, dashboards, logs, traces) are kept.
set -euo pipefail
. "$(dirname "$0")/compose.sh"
# Compose reads the whole file, Grafana's required password included, even to take containers down;
# `down` starts nothing, so any value does.
SEIDRA_GRAFANA_ADMIN_PASSWORD="${SEIDRA_GRAFANA_ADMIN_PASSWORD:-unused-by-down}" compose down
