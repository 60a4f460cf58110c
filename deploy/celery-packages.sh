#!/usr/bin/env bash
# Debian's redis-server and postgresql, which the CeleryExecutor set-up runs (`make airflow-celery`,
# tests/dags/test_celery.py). Idempotent: installs only what is missing (apt-get; sudo when not root).
#   deploy/celery-packages.sh [-q]      -q: no apt output
set -uo pipefail
quiet=0
[ "${1:-}" = "-q" ] && quiet=1

have_postgres() {
  command -v postgres >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
have_postgres || missing+=(postgresql)
[ "${#missing[@]}" -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: ${missing[*]} not installed and no apt-get here: install Redis and PostgreSQL with your package manager" >&2
  exit 1
fi
sudo=()
[ "$(id -u)" -ne 0 ] && sudo=(sudo)
run() {
  if [ "$quiet" -eq 1 ]; then "$@" >/dev/null 2>&1; else "$@"; fi
}
if run "${sudo[@]}" apt-get update -qq \
   && run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; then
  exit 0
fi
echo "error: could not install ${missing[*]} with apt-get" >&2
exit 1
