#!/usr/bin/env bash
# A private 3-node RabbitMQ cluster on this machine, beside (never touching) the default
# node: its own node names, ports, data, logs, config files and erlang cookie. Used by the
# cluster fault suite (tests/cluster.rs) and by hand:
#
#   scripts/rabbitmq-cluster.sh start            # 3 nodes, clustered; prints AMQP_URL
#   scripts/rabbitmq-cluster.sh status
#   scripts/rabbitmq-cluster.sh url              # the comma-separated AMQP_URL
#   scripts/rabbitmq-cluster.sh stop-node 2      # graceful stop of node 2
#   scripts/rabbitmq-cluster.sh kill-node 2      # SIGKILL node 2 (a crash)
#   scripts/rabbitmq-cluster.sh start-node 2     # start node 2 again; it rejoins
#   scripts/rabbitmq-cluster.sh ctl 2 list_queues name leader
#   scripts/rabbitmq-cluster.sh queues 2 quorum_status q   # rabbitmq-queues on node 2
#   scripts/rabbitmq-cluster.sh stop             # stop all three and remove their data
#   scripts/rabbitmq-cluster.sh partition 3      # cut node 3 off (RMQ_CLUSTER_NETNS=1 only)
#   scripts/rabbitmq-cluster.sh heal 3           # connect it again
#
# Environment:
#   RMQ_CLUSTER_ROOT       data root (default /tmp/reliable-mq-cluster); removed by stop
#   RMQ_CLUSTER_BASE_PORT  node i listens for AMQP on BASE+i and for distribution on
#                          BASE+20000+i (default 5780: 5781-5783 and 25781-25783; the
#                          default node keeps 5672/25672/15672; epmd on 4369 is shared)
#   RMQ_CLUSTER_NAME       node name prefix (default rmqc: rmqc1@localhost ...)
#   RMQ_CLUSTER_BIN        RabbitMQ's own scripts (default /usr/lib/rabbitmq/bin, the
#                          Debian/Ubuntu layout; not /usr/sbin, whose wrappers switch to
#                          the rabbitmq user and its HOME)
#   RMQ_CLUSTER_NETNS      1: each node in its own network namespace (needs root and
#                          iproute2), so that one node can be cut off (`partition N`) and
#                          connected again (`heal N`). Node i is rmqc<i>@h<i> at 10.77.0.<i>
#                          (an ERL_INETRC host file names h1..h3), behind a veth pair
#                          on a bridge that holds 10.77.0.254 for this host's clients;
#                          its own epmd runs in its namespace. Cutting node i off sets
#                          the host end of its veth down: its peers and its clients stop
#                          hearing from it at once, with no reset, as on a real network.
#                          Distribution ticks every 10 s (net_ticktime, so a partition is
#                          noticed within about 10 s) and cluster_partition_handling is
#                          pause_minority. `stop` removes the namespaces and the bridge.
#
# No management plugin (an empty enabled-plugins file), so no HTTP ports at all.
set -euo pipefail

ROOT="${RMQ_CLUSTER_ROOT:-/tmp/reliable-mq-cluster}"
BASE="${RMQ_CLUSTER_BASE_PORT:-5780}"
NAME="${RMQ_CLUSTER_NAME:-rmqc}"
HOST=localhost
BIN="${RMQ_CLUSTER_BIN:-/usr/lib/rabbitmq/bin}"
NODES=(1 2 3)
NETNS="${RMQ_CLUSTER_NETNS:-0}"
NET=10.77.0
BRIDGE="${NAME}-br"

node() {
  if [ "$NETNS" = 1 ]; then echo "${NAME}$1@h$1"; else echo "${NAME}$1@${HOST}"; fi
}
ip_of() {
  if [ "$NETNS" = 1 ]; then echo "$NET.$1"; else echo 127.0.0.1; fi
}
ns() { echo "${NAME}-n$1"; }
# Run in node i's namespace (or here, without namespaces).
in_ns() {
  local i=$1
  shift
  if [ "$NETNS" = 1 ]; then ip netns exec "$(ns "$i")" "$@"; else "$@"; fi
}
amqp_port() { echo $((BASE + $1)); }
dist_port() { echo $((BASE + 20000 + $1)); }

# Everything a node or a CLI call aimed at it needs. HOME holds the shared cookie, so
# the CLI tools and the three nodes agree on it and the default node's cookie is unused.
node_env() {
  local i=$1 dir="$ROOT/node$1"
  export HOME="$ROOT"
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME="$(node "$i")"
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS
  RABBITMQ_NODE_IP_ADDRESS="$(ip_of "$i")"
  export RABBITMQ_NODE_PORT
  RABBITMQ_NODE_PORT="$(amqp_port "$i")"
  export RABBITMQ_DIST_PORT
  RABBITMQ_DIST_PORT="$(dist_port "$i")"
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_MNESIA_DIR="$dir/mnesia/$RABBITMQ_NODENAME"
  export RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_PID_FILE="$dir/pid"
  export RABBITMQ_CONF_ENV_FILE="$ROOT/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$ROOT/enabled_plugins"
  export RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand"
  export ERL_EPMD_ADDRESS
  ERL_EPMD_ADDRESS="$(ip_of "$i")"
  if [ "$NETNS" = 1 ]; then export ERL_INETRC="$ROOT/inetrc"; fi
}

ctl() { # ctl NODE_INDEX args...
  local i=$1
  shift
  (node_env "$i" && in_ns "$i" "$BIN/rabbitmqctl" -q -n "$(node "$i")" "$@")
}

queues() { # queues NODE_INDEX args... (rabbitmq-queues)
  local i=$1
  shift
  (node_env "$i" && in_ns "$i" "$BIN/rabbitmq-queues" -q -n "$(node "$i")" "$@")
}

running() { # running NODE_INDEX: the node's beam process is alive
  local pid
  pid=$(cat "$ROOT/node$1/pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

prepare() {
  mkdir -p "$ROOT"
  if [ ! -f "$ROOT/.erlang.cookie" ]; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT/.erlang.cookie"
    chmod 400 "$ROOT/.erlang.cookie"
  fi
  : >"$ROOT/rabbitmq-env.conf"
  echo '[].' >"$ROOT/enabled_plugins"
  if [ "$NETNS" = 1 ]; then
    network_up
    : >"$ROOT/inetrc"
    for i in "${NODES[@]}"; do
      echo "{host, {${NET//./,},$i}, [\"h$i\"]}." >>"$ROOT/inetrc"
    done
    echo '{lookup, [file, native]}.' >>"$ROOT/inetrc"
  fi
  for i in "${NODES[@]}"; do
    local dir="$ROOT/node$i" ip
    ip="$(ip_of "$i")"
    mkdir -p "$dir/mnesia" "$dir/log"
    if [ "$NETNS" = 1 ]; then
      # Clients come from the bridge's address, not loopback; the network is this host's.
      cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = $ip:$(amqp_port "$i")
loopback_users = none
cluster_partition_handling = pause_minority
log.file.level = info
log.console = false
CONF
      cat >"$dir/advanced.config" <<CONF
[{kernel, [{inet_dist_use_interface, {${ip//./,}}}, {net_ticktime, 10}]}].
CONF
    else
      cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = $ip:$(amqp_port "$i")
loopback_users.guest = true
log.file.level = info
log.console = false
CONF
      # Keep distribution on loopback and on the fixed port, like the default node.
      cat >"$dir/advanced.config" <<CONF
[{kernel, [{inet_dist_use_interface, {127,0,0,1}}]}].
CONF
    fi
  done
}

# The bridge and one namespace per node (idempotent).
network_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.254/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  for i in "${NODES[@]}"; do
    local n
    n="$(ns "$i")"
    ip netns list | grep -w "^$n" >/dev/null && continue
    ip netns add "$n"
    ip link add "${NAME}-h$i" type veth peer name "${NAME}-v$i"
    ip link set "${NAME}-v$i" netns "$n"
    ip link set "${NAME}-h$i" master "$BRIDGE"
    ip link set "${NAME}-h$i" up
    ip netns exec "$n" ip addr add "$NET.$i/24" dev "${NAME}-v$i"
    ip netns exec "$n" ip link set "${NAME}-v$i" up
    ip netns exec "$n" ip link set lo up
  done
}

# Remove the namespaces (and what still runs in them: epmd) and the bridge.
network_down() {
  for i in "${NODES[@]}"; do
    local n
    n="$(ns "$i")"
    ip netns list | grep -w "^$n" >/dev/null || continue
    for pid in $(ip netns pids "$n"); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$n"
    ip link del "${NAME}-h$i" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

partition() { # cut node i off from its peers and its clients
  [ "$NETNS" = 1 ] || { echo "partition needs RMQ_CLUSTER_NETNS=1" >&2; return 1; }
  ip link set "${NAME}-h$1" down
}

heal() {
  [ "$NETNS" = 1 ] || { echo "heal needs RMQ_CLUSTER_NETNS=1" >&2; return 1; }
  ip link set "${NAME}-h$1" up
}

start_node() { # start_node NODE_INDEX: start it in the background, wait until it is up
  local i=$1
  if running "$i"; then
    echo "$(node "$i") already running"
    return 0
  fi
  (
    node_env "$i"
    cd "$ROOT"
    local here=()
    if [ "$NETNS" = 1 ]; then here=(ip netns exec "$(ns "$i")"); fi
    setsid nohup "${here[@]}" "$BIN/rabbitmq-server" >"$ROOT/node$i/log/console.log" 2>&1 </dev/null &
  )
  await_node "$i"
}

await_node() {
  local i=$1
  for _ in $(seq 1 240); do
    if ctl "$i" await_startup --timeout 5 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  echo "$(node "$i") did not start; see $ROOT/node$i/log" >&2
  return 1
}

stop_node() {
  local i=$1
  running "$i" || return 0
  ctl "$i" stop "$ROOT/node$i/pid" >/dev/null 2>&1 || kill_node "$i"
}

kill_node() {
  local i=$1 pid
  pid=$(cat "$ROOT/node$i/pid" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

url() {
  local urls=()
  for i in "${NODES[@]}"; do
    urls+=("amqp://guest:guest@$(ip_of "$i"):$(amqp_port "$i")/%2f")
  done
  (IFS=,; echo "${urls[*]}")
}

start() {
  prepare
  for i in "${NODES[@]}"; do
    start_node "$i" &
  done
  wait
  for i in "${NODES[@]}"; do
    running "$i" || { echo "$(node "$i") is not running" >&2; exit 1; }
  done
  for i in 2 3; do
    if ! ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(node "$i")\""; then
      ctl "$i" stop_app
      ctl "$i" join_cluster "$(node 1)"
      ctl "$i" start_app
    fi
  done
  url
}

stop() {
  for i in "${NODES[@]}"; do
    stop_node "$i" &
  done
  wait
  for i in "${NODES[@]}"; do kill_node "$i"; done
  network_down
  case "$ROOT" in
    /|"") ;;
    *) rm -rf "$ROOT" ;;
  esac
}

status() {
  for i in "${NODES[@]}"; do
    if running "$i"; then
      echo "$(node "$i") amqp=$(ip_of "$i"):$(amqp_port "$i") dist=$(dist_port "$i") running"
    else
      echo "$(node "$i") amqp=$(ip_of "$i"):$(amqp_port "$i") dist=$(dist_port "$i") stopped"
    fi
  done
  for i in "${NODES[@]}"; do
    if running "$i"; then
      ctl "$i" cluster_status
      break
    fi
  done
}

if [ ! -x "$BIN/rabbitmq-server" ]; then
  echo "no rabbitmq-server in $BIN: set RMQ_CLUSTER_BIN to RabbitMQ's sbin/bin directory" >&2
  exit 1
fi

cmd="${1:-}"
shift || true
case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url ;;
  start-node) prepare && start_node "$1" ;;
  stop-node) stop_node "$1" ;;
  kill-node) kill_node "$1" ;;
  ctl) ctl "$@" ;;
  queues) queues "$@" ;;
  node) node "$1" ;;
  partition) partition "$1" ;;
  heal) heal "$1" ;;
  *)
    echo "usage: $0 start|stop|status|url|start-node N|stop-node N|kill-node N|partition N|heal N|ctl N ARGS|queues N ARGS|node N" >&2
    exit 2
    ;;
esac
