#!/usr/bin/env bash
# Starts Prometheus, Grafana, Loki, Tempo and Promtail (grafana/docker-compose.yml), every port on
# 127.0.0.1 unless SEIDRA_MONITORING_BIND (and SEIDRA_OTLP_BIND for Tempo's OTLP receivers) say otherwise.
# Grafana's admin password comes from SEIDRA_GRAFANA_ADMIN_PASSWORD: there is no default.
set -euo pipefail

if [[ -z "${SEIDRA_GRAFANA_ADMIN_PASSWORD:-}" ]]; then
    echo "SEIDRA_GRAFANA_ADMIN_PASSWORD is not set: choose Grafana's admin password (there is no default)," \
        'e.g. export SEIDRA_GRAFANA_ADMIN_PASSWORD="$(openssl rand -base64 18)"' >&2
    exit 1
fi
if [[ "$SEIDRA_GRAFANA_ADMIN_PASSWORD" == admin ]]; then
    echo "SEIDRA_GRAFANA_ADMIN_PASSWORD must not be 'admin': choose another password" >&2
    exit 1
fi

. "$(dirname "$0")/compose.sh"
compose up -d
bind="${SEIDRA_MONITORING_BIND:-127.0.0.1}"
echo "Prometheus http://$bind:9090  Grafana http://$bind:3001 (user admin)  Loki :3100  Tempo :3200" \
    "(OTLP ${SEIDRA_OTLP_BIND:-127.0.0.1}:4317/4318)"
