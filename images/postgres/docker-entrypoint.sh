#!/bin/sh
# The entrypoint of pgflip's PostgreSQL test images (scripts/setup-node.sh builds them from
# the toolchain's binaries on a Debian root): what the official `postgres` image's entrypoint
# does that pgflip's manifests rely on, no more.
# - `docker-entrypoint.sh -c k=v ...` runs `postgres -c k=v ...` (the manifests pass args only);
# - started as root, it makes $PGDATA the postgres user's and runs again as that user;
# - on an empty $PGDATA: initdb with POSTGRES_USER (default postgres) and POSTGRES_PASSWORD
#   (required), password logins from any address, listen_addresses '*', and the database
#   POSTGRES_DB (default: the user's name).
# Unlike the official image it also accepts replication connections with a password (the
# physical copy streams a base backup from a pod).
set -eu

if [ "${1#-}" != "$1" ]; then
  set -- postgres "$@"
fi
[ "$1" = postgres ] || exec "$@"
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "error: POSTGRES_PASSWORD is not set; the database is not initialized" >&2
    exit 1
  fi
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --no-locale \
    --auth-local=trust --auth-host=scram-sha-256
  rm -f "$pwfile"
  printf 'host all all all scram-sha-256\nhost replication all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  printf "listen_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
  if [ "$db" != postgres ]; then
    # Single-user mode: no server, no port. The name is quoted as an identifier.
    quoted=$(printf '%s' "$db" | sed 's/"/""/g')
    out=$(printf 'CREATE DATABASE "%s"\n' "$quoted" | postgres --single -D "$PGDATA" postgres 2>&1)
    case "$out" in *ERROR*) printf 'creating database %s: %s\n' "$db" "$out" >&2; exit 1 ;; esac
  fi
  echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
