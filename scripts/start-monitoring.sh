#!/usr/bin/env bash
# Starts Prometheus, Grafana, Loki, Tempo and Promtail (grafana/docker-compose.yml).
set -euo pipefail
. "$(dirname "$0")/compose.sh"
compose up -d
echo "Prometheus http://localhost:9090  Grafana http://localhost:3001 (admin/admin)  Loki :3100  Tempo :3200 (OTLP 4317/4318)"
