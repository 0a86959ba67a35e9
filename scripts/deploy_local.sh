#!/usr/bin/env bash
# A local Flower Deployment Engine on loopback: one SuperLink and N SuperNodes, for manual use.
#
#   scripts/deploy_local.sh start 2            # SuperLink + 2 SuperNodes (partition-id 0..1 of 2)
#   scripts/deploy_local.sh start 2 --secure   # the same with TLS and SuperNode authentication
#   scripts/deploy_local.sh start 2 --warm     # one long-lived ClientApp process per SuperNode
#   scripts/deploy_local.sh status             # their processes, and the nodes the SuperLink sees
#   scripts/deploy_local.sh stop               # stop them, by the PIDs recorded at start
#
# then, as `start` prints:
#   FLWR_HOME=<dir>/flwr-home FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
#     <venv>/bin/flwr run <repo> local-deployment --stream --run-config "min-clients=2"
# (`flwr run --stream` exits 0 even when the run fails: check `flwr ls local-deployment`.)
#
# Every process is started in its own session (PID = process group id); the PIDs go to
# <dir>/pids and `stop` signals exactly those groups (SuperNodes first, so they de-register),
# then kills by PID whatever they spawned that is still alive (the SuperLink's SuperExec runs in
# a session of its own). Nothing is stopped by name.
#
# --secure (certificates and keys go to <dir>/certs/, and are reused when already there):
#   - a CA (ca.crt, ca.key) and a SuperLink certificate signed by it (server.pem, server.key)
#     for localhost, 127.0.0.1 and ::1 (openssl, EC P-384);
#   - one ECDSA P-384 key pair per SuperNode (supernode-<i>, supernode-<i>.pub; ssh-keygen);
#   - the SuperLink serves TLS (--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile) and accepts only
#     registered SuperNodes (--enable-supernode-auth); each public key is registered with
#     `flwr supernode register <pub> local-deployment`, then each SuperNode starts with
#     --root-certificates ca.crt --auth-supernode-private-key supernode-<i>;
#   - the `local-deployment` connection in <dir>/flwr-home/config.toml carries the absolute
#     path of ca.crt as `root-certificates` (and no `insecure = true`).
# --warm (opt-in; Flower's own executor stays the default): each SuperNode runs with
#   --isolation process, and flower_app/warm_executor.py runs its ClientApp in ONE long-lived
#   process (PID in <dir>/pids as warm-executor-<i>, log in warm-executor-<i>.log) instead of a
#   fresh `flwr-clientapp` per message. The SuperNodes and the ServerApp are Flower's, started
#   through `python -m flower_app.warm_executor supernode|serverapp` to shorten the sleeps
#   flwr hard-codes on the message path (SuperNode: 3 s idle pull, 0.5 s reply wait; both: 1 s
#   object pull back-off); WARM_FAST_POLL=0 starts the stock ones instead. The SuperLink keeps
#   its state in memory (no --database). flwr 1.42.0 only.
# <dir>/mode records the mode (secure=0|1 warm=0|1) for `status`.
#
# Flower 1.42 facts this relies on (checked in the installed flwr):
#   - The SuperLink serves its Fleet, Control and Runtime APIs on ONE HTTP port: --host/--port.
#     SuperNodes connect to it (--superlink) and `flwr run` uses it as the connection address.
#   - Each SuperNode binds one port of its own: its Runtime (ClientAppIo) HTTP API, --port.
#   - `--database :memory:` breaks runs (sqlite "cannot commit transaction"); a file, or no
#     --database at all (Flower's own in-memory state), works. A fresh file is used here.
#   - Every message a SuperNode receives starts a fresh `flwr-clientapp` process: expect ~5-12 s
#     per server->client->server round trip on a small CPU machine. The SuperNode's SuperExec
#     looks for new tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower: 1.0); the
#     SuperNodes started here get 0.1 unless the variable is set (docs/deployment.md).
#   - With --enable-supernode-auth, a SuperNode whose key is not registered exits at once with
#     status 1, logging "Exit Code: 305" ("Failed to activate SuperNode"); one started with
#     --insecure retries for ever ("Connection attempt failed"), or until --max-retries, then
#     exits the same way.
#
# Settings (environment variables):
#   DEPLOY_DIR            state, logs, PIDs and FLWR_HOME   (default: /tmp/flwr-deploy-$USER)
#   SUPERLINK_PORT        SuperLink HTTP port               (default: 9300)
#   SUPERNODE_BASE_PORT   SuperNode i listens on BASE+i     (default: 9310)
#   DATA_DIR              passed as node config data-dir    (default: ../shared/data/cifar10
#                         next to the repo if it exists, else unset: the app searches)
#   FLOWER_BIN            where flower-superlink etc. live  (default: the repo's .venv/bin if
#                         present, else PATH)
#   FLWR_SUPEREXEC_TASK_POLL_INTERVAL  the SuperNodes' SuperExec task poll, s (default here: 0.1)
#   WARM_FAST_POLL        --warm: 1 = SuperNodes/ServerApp with short sleeps (default), 0 = stock
#   SUPERLINK_DATABASE    SuperLink --database file, "" = in memory (default: <dir>/linkstate.db;
#                         --warm: in memory)
# The defaults avoid Flower's own (8000, 9091-9095) and `flwr run`'s local SuperLink (39091-3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY_DIR="${DEPLOY_DIR:-/tmp/flwr-deploy-${USER:-$(id -un)}}"
SUPERLINK_PORT="${SUPERLINK_PORT:-9300}"
SUPERNODE_BASE_PORT="${SUPERNODE_BASE_PORT:-9310}"
if [[ -z "${DATA_DIR+x}" ]]; then
    DATA_DIR=""
    [[ -f "$REPO/../shared/data/cifar10/train.zip" ]] && DATA_DIR="$(cd "$REPO/../shared/data/cifar10" && pwd)"
fi
if [[ -z "${FLOWER_BIN:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/flower-superlink" ]]; then FLOWER_BIN="$REPO/.venv/bin"; else
        FLOWER_BIN="$(dirname "$(command -v flower-superlink || echo /nonexistent/x)")"
    fi
fi
PIDS="$DEPLOY_DIR/pids"
MODE="$DEPLOY_DIR/mode"
CERTS="$DEPLOY_DIR/certs"
# Flower starts its helpers by bare name (flower-superexec, flwr-serverapp, flwr-clientapp):
# without them on PATH the SuperLink exits at start-up (FileNotFoundError: 'flower-superexec').
export PATH="$FLOWER_BIN:$PATH"
export FLWR_HOME="$DEPLOY_DIR/flwr-home"
# Offline-safe: no `uv sync` of the app's dependencies per run, no telemetry, no update check.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
# Never start Flower's legacy gRPC servers on their fixed default ports.
unset FLWR_INTERNAL_GRPC_CONTROL_API FLWR_INTERNAL_GRPC_FLEET_API

die() { echo "deploy_local: $*" >&2; exit 1; }
alive() { [[ -d /proc/$1 ]] && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }
port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

descendants() {  # all live descendants of the given PIDs
    local tree; tree="$(ps -eo pid=,ppid=)"
    local todo=("$@") pid child
    while ((${#todo[@]})); do
        pid="${todo[0]}"; todo=("${todo[@]:1}")
        for child in $(awk -v p="$pid" '$2 == p {print $1}' <<<"$tree"); do
            echo "$child"; todo+=("$child")
        done
    done
}

WATCH=()  # PIDs that must stay alive while wait_for waits
wait_for() {  # wait_for <seconds> <what> <command...>
    local deadline=$((SECONDS + $1)) what="$2" pid; shift 2
    until "$@"; do
        for pid in "${WATCH[@]}"; do
            alive "$pid" || { echo "deploy_local: PID $pid exited while waiting for $what" >&2; return 1; }
        done
        ((SECONDS < deadline)) || { echo "deploy_local: timed out waiting for $what" >&2; return 1; }
        sleep 0.5
    done
}

SECURE=0
WARM=0
read_mode() {  # the mode `start` recorded (status and stop run in a later shell)
    SECURE=0; WARM=0
    [[ -s "$MODE" ]] || return 0
    local word
    for word in $(cat "$MODE"); do
        case "$word" in secure=1) SECURE=1 ;; warm=1) WARM=1 ;; esac
    done
}

superlink_healthy() {
    if ((SECURE)); then
        curl -fs --cacert "$CERTS/ca.crt" "https://127.0.0.1:$SUPERLINK_PORT/health" >/dev/null
    else
        curl -fs "http://127.0.0.1:$SUPERLINK_PORT/health" >/dev/null
    fi
}

nodes_online() {  # nodes_online <n>
    local n
    n="$("$FLOWER_BIN/flwr" supernode ls local-deployment --format json 2>/dev/null |
        grep -c '"status": "online"' || true)"
    ((n >= $1))
}

make_certs() {  # make_certs <n>: CA, SuperLink certificate, n SuperNode key pairs; reuses files
    local n="$1" i
    command -v openssl >/dev/null || die "openssl not found (needed by --secure)"
    command -v ssh-keygen >/dev/null || die "ssh-keygen not found (needed by --secure)"
    mkdir -p "$CERTS"
    chmod 700 "$CERTS"
    (
        cd "$CERTS"
        umask 077
        if [[ ! -s ca.key || ! -s ca.crt ]]; then
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -nodes \
                -keyout ca.key -out ca.crt -days 3650 -sha384 -subj "/CN=deploy_local CA" \
                -addext "basicConstraints=critical,CA:TRUE" \
                -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
            rm -f server.pem server.key ca.srl  # signed by a CA that is gone
            echo "deploy_local: new CA in $CERTS/ca.crt"
        fi
        # A SuperLink certificate this CA signed, still valid, for localhost/127.0.0.1/::1.
        if ! { [[ -s server.key ]] && openssl verify -CAfile ca.crt server.pem >/dev/null 2>&1 &&
            openssl x509 -in server.pem -noout -ext subjectAltName 2>/dev/null |
            grep -q "IP Address:127.0.0.1"; }; then
            openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -nodes \
                -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                -out server.pem -days 825 -sha384 -extfile <(printf '%s\n' \
                "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
                "basicConstraints=critical,CA:FALSE" \
                "keyUsage=critical,digitalSignature,keyAgreement" \
                "extendedKeyUsage=serverAuth") 2>/dev/null
            rm -f server.csr
            echo "deploy_local: new SuperLink certificate in $CERTS/server.pem"
        fi
        for ((i = 0; i < n; i++)); do
            [[ -s supernode-$i && -s supernode-$i.pub ]] && continue
            rm -f "supernode-$i" "supernode-$i.pub"
            ssh-keygen -q -t ecdsa -b 384 -N "" -C "deploy_local supernode-$i" -f "supernode-$i"
        done
    )
}

write_connection() {  # the `local-deployment` connection `flwr` uses
    {
        echo "# written by scripts/deploy_local.sh"
        echo "[superlink]"
        echo 'default = "local-deployment"'
        echo
        echo "[superlink.local-deployment]"
        echo "address = \"127.0.0.1:$SUPERLINK_PORT\""
        if ((SECURE)); then
            echo "root-certificates = \"$CERTS/ca.crt\""
        else
            echo "insecure = true"
        fi
    } >"$FLWR_HOME/config.toml"
}

start() {
    local n=2 arg
    SECURE=0; WARM=0
    for arg in "$@"; do
        case "$arg" in
            --secure) SECURE=1 ;;
            --warm) WARM=1 ;;
            *) [[ "$arg" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 start <number of SuperNodes> [--secure] [--warm]"
               n="$arg" ;;
        esac
    done
    [[ -x "$FLOWER_BIN/flower-superlink" ]] || die "flower-superlink not found (set FLOWER_BIN)"
    if [[ -s "$PIDS" ]]; then
        while read -r _ pid; do alive "$pid" && die "already running (PID $pid); run: $0 stop"; done <"$PIDS"
    fi
    local port
    for port in "$SUPERLINK_PORT" $(seq "$SUPERNODE_BASE_PORT" $((SUPERNODE_BASE_PORT + n - 1))); do
        port_busy "$port" && die "port $port is in use (set SUPERLINK_PORT / SUPERNODE_BASE_PORT)"
    done
    mkdir -p "$DEPLOY_DIR" "$FLWR_HOME"
    rm -f "$DEPLOY_DIR/linkstate.db" "$PIDS"
    ((SECURE)) && make_certs "$n"
    echo "secure=$SECURE warm=$WARM" >"$MODE"
    write_connection
    # The SuperExec each SuperNode starts polls for tasks this often (Flower's default: 1.0 s).
    # Only the SuperNodes get it: the SuperLink's SuperExec starts one ServerApp per run.
    local task_poll="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
    unset FLWR_SUPEREXEC_TASK_POLL_INTERVAL

    local tls=(--insecure)
    ((SECURE)) && tls=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem"
        --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
    # State in a fresh SQLite file; --warm: in memory (Flower's default), as every message's
    # arrays otherwise go through that file twice (measured in docs/deployment.md).
    local database=(--database "$DEPLOY_DIR/linkstate.db")
    ((WARM)) && database=()
    if [[ -n "${SUPERLINK_DATABASE+x}" ]]; then  # set: that file, or "" for in memory
        database=()
        [[ -n "$SUPERLINK_DATABASE" ]] && database=(--database "$SUPERLINK_DATABASE")
    fi
    # --warm: the SuperLink's SuperExec finds our `flwr-serverapp` first on PATH (short pulls).
    local path="$PATH"
    if ((WARM)) && [[ "${WARM_FAST_POLL:-1}" == 1 ]]; then
        mkdir -p "$DEPLOY_DIR/bin"
        printf '%s\n' '#!/usr/bin/env bash' "# written by scripts/deploy_local.sh --warm" \
            "export PYTHONPATH=\"$REPO\${PYTHONPATH:+:\$PYTHONPATH}\"" \
            "exec \"$FLOWER_BIN/python\" -m flower_app.warm_executor serverapp \"\$@\"" \
            >"$DEPLOY_DIR/bin/flwr-serverapp"
        chmod +x "$DEPLOY_DIR/bin/flwr-serverapp"
        path="$DEPLOY_DIR/bin:$PATH"
    fi
    PATH="$path" setsid "$FLOWER_BIN/flower-superlink" "${tls[@]}" \
        --disable-runtime-dependency-installation \
        --host 127.0.0.1 --port "$SUPERLINK_PORT" "${database[@]}" \
        >"$DEPLOY_DIR/superlink.log" 2>&1 </dev/null &
    echo "superlink $!" >>"$PIDS"
    WATCH=("$!")
    wait_for 60 "the SuperLink (see $DEPLOY_DIR/superlink.log)" superlink_healthy || { stop; exit 1; }

    local i config supernode cwd
    if ((SECURE)); then  # only registered public keys may connect
        for ((i = 0; i < n; i++)); do
            "$FLOWER_BIN/flwr" supernode register "$CERTS/supernode-$i.pub" local-deployment \
                >"$DEPLOY_DIR/register-$i.log" 2>&1 ||
                { cat "$DEPLOY_DIR/register-$i.log" >&2; stop; die "could not register supernode-$i"; }
        done
    fi
    for ((i = 0; i < n; i++)); do
        config="partition-id=$i num-partitions=$n"
        [[ -n "$DATA_DIR" ]] && config+=" data-dir='$DATA_DIR'"
        tls=(--insecure)
        ((SECURE)) && tls=(--root-certificates "$CERTS/ca.crt"
            --auth-supernode-private-key "$CERTS/supernode-$i")
        supernode=("$FLOWER_BIN/flower-supernode") cwd="$PWD"
        if ((WARM)); then  # no executor of its own (--isolation process): ours follows below
            tls+=(--isolation process)
            cwd="$REPO"  # python -m flower_app.warm_executor
            [[ "${WARM_FAST_POLL:-1}" == 1 ]] &&
                supernode=("$FLOWER_BIN/python" -m flower_app.warm_executor supernode)
        fi
        (cd "$cwd" && FLWR_SUPEREXEC_TASK_POLL_INTERVAL="$task_poll" exec setsid "${supernode[@]}" \
            "${tls[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" \
            --host 127.0.0.1 --port $((SUPERNODE_BASE_PORT + i)) --node-config "$config" \
            >"$DEPLOY_DIR/supernode-$i.log" 2>&1 </dev/null) &
        echo "supernode-$i $!" >>"$PIDS"
        WATCH+=("$!")
    done
    if ((WARM)); then  # one long-lived ClientApp process per SuperNode (flower_app/warm_executor.py)
        local supernodes=("${WATCH[@]:1}")
        for ((i = 0; i < n; i++)); do
            (cd "$REPO" && exec setsid "$FLOWER_BIN/python" -m flower_app.warm_executor --insecure \
                --runtime-api-address "127.0.0.1:$((SUPERNODE_BASE_PORT + i))" \
                --parent-pid "${supernodes[i]}" >"$DEPLOY_DIR/warm-executor-$i.log" 2>&1 </dev/null) &
            echo "warm-executor-$i $!" >>"$PIDS"
            WATCH+=("$!")
        done
    fi
    wait_for 90 "$n SuperNodes to register (see $DEPLOY_DIR/supernode-*.log)" nodes_online "$n" ||
        { stop; exit 1; }

    local what="SuperLink on 127.0.0.1:$SUPERLINK_PORT"
    ((SECURE)) && what+=" (TLS, SuperNode authentication; certificates in $CERTS)"
    what+=" with $n SuperNodes"
    ((WARM)) && what+=" (each with one warm ClientApp process)"
    echo "$what; logs and PIDs in $DEPLOY_DIR"
    echo "Run the app with:"
    echo "  FLWR_HOME=$FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\"
    echo "    $FLOWER_BIN/flwr run $REPO local-deployment --stream --run-config \"min-clients=$n\""
    echo "Stop with: $0 stop"
}

stop() {
    [[ -s "$PIDS" ]] || { echo "deploy_local: nothing to stop ($PIDS is empty)"; return 0; }
    local entries pids=() name pid spawned
    # SuperNodes first (tac: reverse start order), then the SuperLink.
    mapfile -t entries < <(tac "$PIDS")
    for entry in "${entries[@]}"; do pids+=("${entry##* }"); done
    spawned="$(descendants "${pids[@]}")"
    WATCH=()
    for entry in "${entries[@]}"; do
        name="${entry% *}"; pid="${entry##* }"
        alive "$pid" || { echo "$name (PID $pid) had already exited"; continue; }
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        wait_for 20 "$name ($pid) to exit" bash -c "! [[ -d /proc/$pid ]] || grep -q ') Z' /proc/$pid/stat" ||
            kill -KILL -- "-$pid" 2>/dev/null || true
        echo "stopped $name (PID $pid)"
    done
    sleep 1
    for pid in $spawned; do
        alive "$pid" && kill -KILL "$pid" 2>/dev/null && echo "killed leftover PID $pid"
    done
    rm -f "$PIDS"
}

status() {
    if [[ -s "$PIDS" ]]; then
        read_mode
        echo "mode: $(cat "$MODE" 2>/dev/null || echo unknown)"
        while read -r name pid; do
            if alive "$pid"; then echo "$name PID $pid running"; else echo "$name PID $pid gone"; fi
        done <"$PIDS"
        if superlink_healthy; then echo "SuperLink health: ok"; else echo "SuperLink health: FAILED"; fi
        "$FLOWER_BIN/flwr" supernode ls local-deployment || true
    else
        echo "not running (no $PIDS)"
    fi
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
esac
