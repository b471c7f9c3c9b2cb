# pgflip's physical copy inside green's pod (Kubernetes mode): what the local mode's
# crates/engine/src/adapters/local_instances/physical.rs does, as init containers, so the
# work outlives a restarted controller and needs no `pods/exec`. Run as
# `sh -euc "$PGFLIP_COPY_SCRIPT" pgflip-copy <step>`:
#   base-backup   green's image: pg_basebackup of blue into the volume, its WAL held by the
#                 physical slot $PGFLIP_SLOT;
#   await-cut     green's image: holds the pod until the controller has made the logical
#                 slots on blue and replaces this pod by one that knows the cut;
#   old-binaries  blue's image: its installation into a shared emptyDir, which the next
#                 step mounts at the same paths;
#   upgrade       green's image: the backup replayed as a standby of blue up to, and not
#                 including, the record at $PGFLIP_CUT and promoted there (the old major's
#                 binaries), then `initdb` and `pg_upgrade --link` into $PGDATA.
# Each step leaves a marker on the volume and does nothing when it finds it: a pod started
# again resumes. A failure ends the step with its message last in the log (the container's
# termination message, which the controller reports).
step=$1
staging=/var/lib/postgresql/physical
backup=$staging/backup
new=$staging/new

# Done: the upgraded cluster is in place (a pod started again after the copy).
[ -s "$PGDATA/PG_VERSION" ] && exit 0

if [ "$(id -u)" = 0 ] && [ "$step" != old-binaries ]; then
  # The volume is root's; PostgreSQL refuses root. The final rename into $PGDATA needs
  # the volume's root writable by postgres too.
  mkdir -p "$staging"
  chown postgres:postgres "$staging" "$(dirname "$PGDATA")"
  chmod 700 "$staging"
  exec setpriv --reuid=postgres --regid=postgres --init-groups \
    sh -euc "$PGFLIP_COPY_SCRIPT" pgflip-copy "$step"
fi

fail() { echo "physical copy ($step): $*" >&2; exit 1; }
export PGPASSWORD="$POSTGRES_PASSWORD"
source_conn="host=$PGFLIP_SOURCE_HOST port=$PGFLIP_SOURCE_PORT user=$POSTGRES_USER"

case $step in
base-backup)
  [ -f "$staging/backup.done" ] && exit 0
  rm -rf "$backup"
  # A slot left by an interrupted backup: this one makes its own.
  psql -X -q -v ON_ERROR_STOP=1 -d "$source_conn dbname=postgres" -c \
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$PGFLIP_SLOT' AND NOT active" \
    >/dev/null || fail "could not reach blue at $PGFLIP_SOURCE_HOST"
  pg_basebackup -d "$source_conn" -w -D "$backup" -X stream -c fast -C -S "$PGFLIP_SLOT" \
    || fail "pg_basebackup from $PGFLIP_SOURCE_HOST failed"
  touch "$staging/backup.done"
  ;;

await-cut)
  trap 'exit 0' TERM INT
  while :; do sleep 1; done
  ;;

old-binaries)
  mkdir -p /old/lib /old/share
  [ -d "/usr/lib/postgresql/$PGFLIP_OLD_MAJOR/bin" ] \
    || fail "this image has no /usr/lib/postgresql/$PGFLIP_OLD_MAJOR/bin"
  cp -a "/usr/lib/postgresql/$PGFLIP_OLD_MAJOR/." /old/lib/
  if [ -d "/usr/share/postgresql/$PGFLIP_OLD_MAJOR" ]; then
    cp -a "/usr/share/postgresql/$PGFLIP_OLD_MAJOR/." /old/share/
  fi
  ;;

upgrade)
  old=/usr/lib/postgresql/$PGFLIP_OLD_MAJOR/bin
  newbin=$(dirname "$(command -v pg_upgrade)") || fail "green's image has no pg_upgrade"
  for tool in postgres pg_ctl pg_controldata; do
    [ -x "$old/$tool" ] || fail "blue's image has no $tool of PostgreSQL $PGFLIP_OLD_MAJOR"
  done
  # pg_upgrade --link disables the old cluster (pg_control.old) before it links its files
  # and removes its output directory from the new one when it succeeds.
  if [ ! -f "$staging/upgraded" ] && [ -f "$backup/global/pg_control.old" ]; then
    if [ -s "$new/PG_VERSION" ] && [ ! -d "$new/pg_upgrade_output.d" ]; then
      touch "$staging/upgraded"
    else
      fail "pg_upgrade --link stopped after it had disabled the copy and did not finish: the copy cannot be used again; the attempt fails and its cleanup removes it (push a new commit to try again)"
    fi
  fi
  if [ ! -f "$staging/upgraded" ]; then
    escape() { printf '%s' "$1" | sed 's/[\\:]/\\&/g'; }
    printf '%s:%s:*:%s:%s\n' "$(escape "$PGFLIP_SOURCE_HOST")" "$PGFLIP_SOURCE_PORT" \
      "$(escape "$POSTGRES_USER")" "$(escape "$POSTGRES_PASSWORD")" > "$staging/pgpass"
    chmod 600 "$staging/pgpass"
    # Appended last, so they win over blue's own settings copied with the data: the
    # settings blue runs with (its command line: a standby needs as many connections,
    # workers and senders as its primary), then the replay's own.
    # recovery_target_inclusive = off: the record at the cut is not replayed; if it is a
    # commit, the logical slots send it.
    printf '\n# pgflip: the settings blue runs with\n%s\n' "$PGFLIP_SERVER_SETTINGS" \
      >> "$backup/postgresql.auto.conf"
    cat >> "$backup/postgresql.auto.conf" <<EOF
# pgflip: the physical copy's replay
port = 5433
listen_addresses = ''
unix_socket_directories = '$staging'
logging_collector = off
archive_mode = off
hot_standby = on
primary_conninfo = '$source_conn dbname=postgres passfile=$staging/pgpass'
primary_slot_name = '$PGFLIP_SLOT'
recovery_target_lsn = '$PGFLIP_CUT'
recovery_target_inclusive = off
recovery_target_action = 'promote'
EOF
    # Never started yet (recovery renames backup_label): a standby. Started before, it is
    # one still (standby.signal is there) or promoted already (it must not be one).
    if [ -f "$backup/backup_label" ]; then touch "$backup/standby.signal"; fi
    "$old/pg_ctl" start -D "$backup" -w -t 600 -l "$staging/replay.log" \
      || { tail -n 20 "$staging/replay.log" >&2; fail "the copy did not start to replay"; }
    local_conn="host=$staging port=5433 user=$POSTGRES_USER dbname=postgres"
    waited=0
    until [ "$(psql -X -At -d "$local_conn" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do
      waited=$((waited + 1))
      [ "$waited" -lt 18000 ] || { tail -n 20 "$staging/replay.log" >&2; fail "the copy did not reach the cut $PGFLIP_CUT within 30 minutes"; }
      sleep 0.1
    done
    # What initdb of the new major must match for pg_upgrade.
    facts=$(psql -X -At -F '|' -d "$local_conn" -c \
      "SELECT (SELECT rolname FROM pg_authid WHERE oid = 10), current_setting('data_checksums'),
              pg_encoding_to_char(encoding), datcollate, datctype, datlocprovider
         FROM pg_database WHERE datname = 'template0'") || fail "reading the copy's settings"
    "$old/pg_ctl" stop -D "$backup" -m fast -w -t 120 || fail "stopping the replayed copy"
    IFS='|' read -r install_user checksums encoding collate ctype provider <<EOF
$facts
EOF
    [ "$provider" = c ] || fail "template0 of blue uses a collation provider other than libc ($provider): copy logically"
    set -- --no-data-checksums
    if [ "$checksums" = on ]; then set -- --data-checksums
    elif [ "$PGFLIP_NEW_MAJOR" -lt 18 ]; then set --
    fi
    rm -rf "$new"
    initdb -D "$new" -U "$install_user" -E "$encoding" --locale-provider=libc \
      --lc-collate="$collate" --lc-ctype="$ctype" --auth-local=trust \
      --auth-host=scram-sha-256 --no-sync "$@" >/dev/null || fail "initdb of the new major"
    # It writes its logs and scripts to the working directory.
    cd "$staging"
    pg_upgrade -b "$old" -B "$newbin" -d "$backup" -D "$new" --link -U "$install_user" \
      -p 50432 -P 50433 || fail "pg_upgrade --link failed"
    touch "$staging/upgraded"
  fi
  # What the image's entrypoint writes at initdb, which pg_upgrade does not carry over.
  grep -q '^host replication all all' "$new/pg_hba.conf" \
    || printf 'host all all all scram-sha-256\nhost replication all all scram-sha-256\n' >> "$new/pg_hba.conf"
  grep -q "^listen_addresses = '\*'" "$new/postgresql.conf" \
    || printf "listen_addresses = '*'\n" >> "$new/postgresql.conf"
  sync
  mv "$new" "$PGDATA"
  rm -rf "$staging"
  ;;

*)
  fail "unknown step"
  ;;
esac
