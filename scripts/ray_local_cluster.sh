#!/usr/bin/env bash
# A local two-node Ray cluster on this one machine, for trying and testing hetsched's Ray placement
# (configs/ray_two_nodes.yaml):
#
#   scripts/ray_local_cluster.sh start    # head node "board-a" on 127.0.0.2, node "board-b" on 127.0.0.3
#   scripts/ray_local_cluster.sh status   # which raylets run (pids)
#   scripts/ray_local_cluster.sh stop     # stops both; leaves no Ray process behind
#
# Each node is one `ray start --block` (its own temp dir, ports, one CPU, and the custom resource
# hetsched_node_<name> that hetsched places work by); everything listens and talks on loopback
# addresses only. `stop` ends exactly the process groups that `start` created (by their ids, never
# by name), so other Ray clusters on the machine are left alone.
#
# Environment: HETSCHED_RAY_DIR (state, logs and temp dirs; default /tmp/hetsched-ray),
# HETSCHED_RAY_PORT (the head's GCS port; every other port is derived from it; default 26379),
# RAY (the ray executable; default: the one on PATH).
set -euo pipefail

DIR="${HETSCHED_RAY_DIR:-/tmp/hetsched-ray}"
PORT="${HETSCHED_RAY_PORT:-26379}"
RAY="${RAY:-ray}"
NODES=(board-a board-b)
IPS=(127.0.0.2 127.0.0.3)
export RAY_USAGE_STATS_ENABLED=0          # no usage report leaves the machine

pid_of() { cat "$DIR/$1.pid" 2>/dev/null || true; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# every process of a node's group (the ray start process, gcs, raylet, agents, workers)
group_pids() { ps -eo pid=,pgid= | awk -v g="$1" '$2 == g {print $1}'; }

start_node() {  # index
    local i=$1 name=${NODES[$1]} ip=${IPS[$1]} base=$((PORT + 100 * ($1 + 1)))
    local pid
    pid=$(pid_of "$name")
    if alive "$pid"; then echo "$name already runs (pid $pid)"; return 0; fi
    mkdir -p "$DIR/$name"
    local args=(start --block --node-ip-address="$ip" --num-cpus=1
                --resources="{\"hetsched_node_$name\": 1}" --temp-dir="$DIR/$name"
                --object-store-memory=100000000 --disable-usage-stats
                --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))
                --runtime-env-agent-port=$((base + 3)) --dashboard-agent-listen-port=$((base + 4))
                --dashboard-agent-grpc-port=$((base + 5)) --metrics-export-port=$((base + 6))
                --min-worker-port=$((base + 10)) --max-worker-port=$((base + 99)))
    if [ "$i" = 0 ]; then
        args+=(--head --port="$PORT" --include-dashboard=false)
    else
        args+=(--address="${IPS[0]}:$PORT")
    fi
    # its own session and process group: `stop` ends the group by id
    setsid "$RAY" "${args[@]}" >"$DIR/$name.log" 2>&1 < /dev/null &
    echo $! > "$DIR/$name.pid"
    for _ in $(seq 1 120); do
        if grep -q "will now block forever" "$DIR/$name.log" 2>/dev/null; then
            echo "$name: Ray node on $ip (pid $(pid_of "$name"), log $DIR/$name.log)"
            return 0
        fi
        if ! alive "$(pid_of "$name")"; then
            echo "$name: ray start failed:" >&2; tail -20 "$DIR/$name.log" >&2; return 1
        fi
        sleep 0.5
    done
    echo "$name: ray start did not come up within 60 s (log $DIR/$name.log)" >&2
    return 1
}

stop_node() {  # name
    local name=$1 pid
    pid=$(pid_of "$name")
    [ -n "$pid" ] || return 0
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true          # ray start --block drains and stops its processes
        for _ in $(seq 1 80); do
            [ -z "$(group_pids "$pid")" ] && break
            sleep 0.5
        done
    fi
    local left
    left=$(group_pids "$pid")
    if [ -n "$left" ]; then
        echo "$name: killing what is left of process group $pid: $(echo $left)"
        kill -KILL -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do [ -z "$(group_pids "$pid")" ] && break; sleep 0.25; done
    fi
    rm -f "$DIR/$name.pid"
    echo "$name: stopped"
}

case "${1:-}" in
    start)
        mkdir -p "$DIR"
        command -v "$RAY" >/dev/null || { echo "ray is not installed: pip install 'hetsched[ray]'" >&2; exit 1; }
        start_node 0 || { stop_node board-a; exit 1; }
        start_node 1 || { stop_node board-b; stop_node board-a; exit 1; }
        echo "address: ${IPS[0]}:$PORT  (the coordinator's node: ${IPS[0]}; see configs/ray_two_nodes.yaml)"
        ;;
    stop)
        stop_node board-b
        stop_node board-a
        ;;
    status)
        rc=0
        for name in "${NODES[@]}"; do
            pid=$(pid_of "$name")
            if alive "$pid"; then echo "$name: running (pid $pid, $(group_pids "$pid" | wc -l) processes)"
            else echo "$name: not running"; rc=1; fi
        done
        exit $rc
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
