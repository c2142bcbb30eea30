# Sourced by start-/stop-monitoring.sh: `compose ARGS` runs Docker Compose on the monitoring stack,
# or stops with one clear line where Docker or Compose is missing.
compose_file="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/grafana/docker-compose.yml"

if ! command -v docker >/dev/null 2>&1; then
    echo "Docker is not installed: the monitoring stack runs with Docker Compose (see grafana/docker-compose.yml)" >&2
    exit 1
fi
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    echo "Docker Compose is not installed (neither 'docker compose' nor 'docker-compose')" >&2
    exit 1
fi
if ! docker info >/dev/null 2>&1; then
    echo "The Docker engine is not running (docker info fails): start it first" >&2
    exit 1
fi

compose() { "${compose_cmd[@]}" -f "$compose_file" "$@"; }
