# shellcheck shell=bash
# Source this file to get a throwaway PostgreSQL for the tests: it installs Debian's `postgresql`
# package when missing, starts a server as the `postgres` user in a temporary directory on a free
# loopback port (fsync off: the data is thrown away), exports INSIGHT_IMPORT_TEST_POSTGRES with
# its URL, and stops the server and removes the directory when the sourcing shell exits.

_pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$dir" ] && command -v pg_ctl >/dev/null 2>&1; then
        dir="$(dirname "$(command -v pg_ctl)")"
    fi
    echo "$dir"
}

_pg_as_postgres() {
    if command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_test_postgres() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "start_test_postgres: must run as root (it runs the server as the postgres user)" >&2
        return 1
    fi
    if [ -z "$(_pg_bindir)" ] || ! id postgres >/dev/null 2>&1; then
        echo "+ apt-get install -y postgresql"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local bindir
    bindir="$(_pg_bindir)"
    PG_TEST_DIR="$(mktemp -d -t insight-postgres.XXXXXX)"
    chown postgres: "$PG_TEST_DIR"
    PG_TEST_PORT="$(_pg_free_port)"
    _pg_as_postgres "$bindir/initdb" -D "$PG_TEST_DIR/data" -U postgres -A trust \
        --no-sync -E UTF8 --locale=C.UTF-8 >"$PG_TEST_DIR/initdb.log" 2>&1 ||
        { cat "$PG_TEST_DIR/initdb.log" >&2; return 1; }
    _pg_as_postgres "$bindir/pg_ctl" -D "$PG_TEST_DIR/data" -l "$PG_TEST_DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PG_TEST_PORT -k $PG_TEST_DIR -c fsync=off \
-c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start >/dev/null ||
        { cat "$PG_TEST_DIR/server.log" >&2; return 1; }
    PG_TEST_BINDIR="$bindir"
    export INSIGHT_IMPORT_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$PG_TEST_PORT/postgres"
    echo "+ PostgreSQL on 127.0.0.1:$PG_TEST_PORT ($INSIGHT_IMPORT_TEST_POSTGRES)"
    trap stop_test_postgres EXIT
}

stop_test_postgres() {
    if [ -n "${PG_TEST_DIR:-}" ] && [ -d "$PG_TEST_DIR" ]; then
        _pg_as_postgres "$PG_TEST_BINDIR/pg_ctl" -D "$PG_TEST_DIR/data" -m immediate stop \
            >/dev/null 2>&1 || true
        rm -rf "$PG_TEST_DIR"
    fi
    PG_TEST_DIR=""
}
