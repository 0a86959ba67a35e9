#!/usr/bin/env bash
# A local Flower Deployment Engine on loopback: one SuperLink and N SuperNodes, for manual use.
#
#   scripts/deploy_local.sh start 2     # SuperLink + 2 SuperNodes (partition-id 0..1 of 2)
#   scripts/deploy_local.sh status      # their processes, and the nodes the SuperLink sees
#   scripts/deploy_local.sh stop        # stop them, by the PIDs recorded at start
#
# then, as `start` prints:
#   FLWR_HOME=<dir>/flwr-home FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
#     flwr run . local-deployment --stream --run-config "min-clients=2"
# (`flwr run --stream` exits 0 even when the run fails: check `flwr ls local-deployment`.)
#
# Every process is started in its own session (PID = process group id); the PIDs go to
# <dir>/pids and `stop` signals exactly those groups (SuperNodes first, so they de-register),
# then kills by PID whatever they spawned that is still alive (the SuperLink's SuperExec runs in
# a session of its own). Nothing is stopped by name.
#
# Flower 1.42 facts this relies on (checked in the installed flwr):
#   - The SuperLink serves its Fleet, Control and Runtime APIs on ONE HTTP port: --host/--port.
#     SuperNodes connect to it (--superlink) and `flwr run` uses it as the connection address.
#   - Each SuperNode binds one port of its own: its Runtime (ClientAppIo) HTTP API, --port.
#   - `--database :memory:` breaks runs (sqlite "cannot commit transaction"); a file, or no
#     --database at all (Flower's own in-memory state), works. A fresh file is used here.
#   - Every message a SuperNode receives starts a fresh `flwr-clientapp` process: expect ~5-12 s
#     per server->client->server round trip on a small CPU machine.
#
# Settings (environment variables):
#   DEPLOY_DIR            state, logs, PIDs and FLWR_HOME   (default: /tmp/flwr-deploy-$USER)
#   SUPERLINK_PORT        SuperLink HTTP port               (default: 9300)
#   SUPERNODE_BASE_PORT   SuperNode i listens on BASE+i     (default: 9310)
#   DATA_DIR              passed as node config data-dir    (default: ../shared/data/cifar10
#                         next to the repo if it exists, else unset: the app searches)
#   FLOWER_BIN            where flower-superlink etc. live  (default: the repo's .venv/bin if
#                         present, else PATH)
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

superlink_healthy() { curl -fs "http://127.0.0.1:$SUPERLINK_PORT/health" >/dev/null; }

nodes_online() {  # nodes_online <n>
    local n
    n="$("$FLOWER_BIN/flwr" supernode ls local-deployment --format json 2>/dev/null |
        grep -c '"status": "online"' || true)"
    ((n >= $1))
}

start() {
    local n="${1:-2}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 start <number of SuperNodes>"
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
    cat >"$FLWR_HOME/config.toml" <<EOF
# written by scripts/deploy_local.sh
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:$SUPERLINK_PORT"
insecure = true
EOF

    setsid "$FLOWER_BIN/flower-superlink" --insecure --disable-runtime-dependency-installation \
        --host 127.0.0.1 --port "$SUPERLINK_PORT" --database "$DEPLOY_DIR/linkstate.db" \
        >"$DEPLOY_DIR/superlink.log" 2>&1 </dev/null &
    echo "superlink $!" >>"$PIDS"
    WATCH=("$!")
    wait_for 60 "the SuperLink (see $DEPLOY_DIR/superlink.log)" superlink_healthy || { stop; exit 1; }

    local i config
    for ((i = 0; i < n; i++)); do
        config="partition-id=$i num-partitions=$n"
        [[ -n "$DATA_DIR" ]] && config+=" data-dir='$DATA_DIR'"
        setsid "$FLOWER_BIN/flower-supernode" --insecure --superlink "127.0.0.1:$SUPERLINK_PORT" \
            --host 127.0.0.1 --port $((SUPERNODE_BASE_PORT + i)) --node-config "$config" \
            >"$DEPLOY_DIR/supernode-$i.log" 2>&1 </dev/null &
        echo "supernode-$i $!" >>"$PIDS"
        WATCH+=("$!")
    done
    wait_for 90 "$n SuperNodes to register (see $DEPLOY_DIR/supernode-*.log)" nodes_online "$n" ||
        { stop; exit 1; }

    echo "SuperLink on 127.0.0.1:$SUPERLINK_PORT with $n SuperNodes; logs and PIDs in $DEPLOY_DIR"
    echo "Run the app with:"
    echo "  FLWR_HOME=$FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\"
    echo "    flwr run $REPO local-deployment --stream --run-config \"min-clients=$n\""
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
        while read -r name pid; do
            if alive "$pid"; then echo "$name PID $pid running"; else echo "$name PID $pid gone"; fi
        done <"$PIDS"
        "$FLOWER_BIN/flwr" supernode ls local-deployment || true
    else
        echo "not running (no $PIDS)"
    fi
}

case "${1:-}" in
    start) start "${2:-2}" ;;
    stop) stop ;;
    status) status ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
esac
