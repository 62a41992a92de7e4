#!/usr/bin/env bash
# Runs one rank of PROGRAM on each of N emulated hosts: network namespaces of this
# machine, each with its own address on one subnet, joined by veth pairs to a bridge in
# a namespace of its own, each host's link limited to RATE in both directions by a tbf
# qdisc. Every rank gets the variables a cluster launcher sets (RANK, WORLD_SIZE,
# LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR = host 0's address, MASTER_PORT,
# TORCHELASTIC_RUN_ID) and GLOO_SOCKET_IFNAME=eth0, its link. Output lines are prefixed
# with "[rank]: ". The exit code is the first non-zero exit code of a rank.
#
#   scripts/emulate-hosts.sh [--hosts 2] [--rate 100mbit] [--port 29500] [--stats FILE] \
#                            -- PROGRAM ARGS...
#
# RATE is tc's notation (100mbit, 1gbit, 0 for unlimited). --stats FILE writes each host's
# bytes sent on its link ("rank R tx_bytes B") when the run ends.
#
# Needs root (or CAP_NET_ADMIN) and iproute2 (ip, tc); exits 77 saying why when the
# machine does not allow network namespaces, so that ctest skips. The namespaces have no
# route beyond their subnet: traffic stays between them. Everything made here is removed
# on exit, also when a rank fails or the script is interrupted. Latency is not emulated
# (this kernel has no netem).
set -euo pipefail
HOSTS=2 RATE=100mbit PORT=29500 STATS=""
while (($#)); do
  case $1 in
    --hosts) HOSTS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --stats) STATS=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "emulate-hosts.sh: unknown option $1 (see the usage at the top of the script)" >&2; exit 2 ;;
  esac
done
(($#)) || { echo "emulate-hosts.sh: give the program to run after --" >&2; exit 2; }
[[ $HOSTS =~ ^[0-9]+$ ]] && ((HOSTS >= 1 && HOSTS <= 200)) ||
  { echo "emulate-hosts.sh: --hosts $HOSTS must be 1..200" >&2; exit 2; }

skip() { echo "emulate-hosts.sh: skipped: $*" >&2; exit 77; }
command -v ip >/dev/null && command -v tc >/dev/null || skip "iproute2 (ip, tc) is not installed"
[[ $(id -u) -eq 0 ]] || skip "network namespaces need root (run as root, or with CAP_NET_ADMIN)"

# Names of our own, so that concurrent runs (ctest -j) never meet; link names stay
# within the kernel's 15 characters ("e<pid>v<host>").
ID="asgd$$"
BR="$ID-br"
made=()
links=()
pids=()
cleanup() {
  local p ns l
  for ns in "${made[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for ns in "${made[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
  # A veth end still in this namespace (its move failed) would outlive the namespaces.
  for l in "${links[@]}"; do ip link delete "$l" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$BR" 2>/dev/null || skip "this machine does not allow network namespaces ('ip netns add' failed)"
made+=("$BR")
ip -n "$BR" link add br0 type bridge 2>/dev/null || skip "this kernel has no bridge support"
ip -n "$BR" link set br0 up
ip -n "$BR" link set lo up

addr() { echo "10.77.$(($1 / 250)).$(($1 % 250 + 1))"; }
limit() {  # limit NS DEV: tbf at RATE on DEV's egress
  [[ $RATE == 0 ]] && return 0
  local bits
  bits=$(tc_rate_bits "$RATE")
  # 10 ms of traffic per burst, never less than a 64 KiB segment (veth offloads may
  # hand tbf packets that large).
  local burst=$((bits / 8 / 100))
  ((burst < 131072)) && burst=131072
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst "$burst" latency 100ms 2>/dev/null ||
    skip "this kernel has no tbf qdisc (sch_tbf): links cannot be limited"
}
tc_rate_bits() {
  local v=${1,,} n unit
  n=${v%%[a-z]*}
  unit=${v#"$n"}
  case $unit in
    bit | "") echo "$n" ;;
    kbit) echo $((n * 1000)) ;;
    mbit) echo $((n * 1000000)) ;;
    gbit) echo $((n * 1000000000)) ;;
    *) echo "emulate-hosts.sh: --rate $1: use bit, kbit, mbit or gbit (e.g. 100mbit)" >&2; exit 2 ;;
  esac
}
[[ $RATE == 0 ]] || tc_rate_bits "$RATE" >/dev/null

for ((i = 0; i < HOSTS; i++)); do
  ns="$ID-h$i"
  ip netns add "$ns"
  made+=("$ns")
  ip -n "$ns" link set lo up
  v="e$$v$i" b="e$$b$i"
  links+=("$v" "$b")
  ip link add "$v" type veth peer name "$b"
  ip link set "$v" netns "$ns"
  ip link set "$b" netns "$BR"
  ip -n "$ns" link set "$v" name eth0
  ip -n "$ns" addr add "$(addr "$i")/16" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$BR" link set "$b" master br0
  ip -n "$BR" link set "$b" up
  limit "$ns" eth0   # host -> bridge
  limit "$BR" "$b"   # bridge -> host
done

MASTER=$(addr 0)
RUN_ID="emulated-$ID"
status=0
for ((i = 0; i < HOSTS; i++)); do
  (
    ip netns exec "$ID-h$i" env RANK="$i" WORLD_SIZE="$HOSTS" LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
      GROUP_RANK="$i" MASTER_ADDR="$MASTER" MASTER_PORT="$PORT" TORCHELASTIC_RUN_ID="$RUN_ID" \
      GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$@" 2>&1 |
      sed -u "s/^/[$i]: /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
# The first rank to fail ends the job: the others would wait for it until their own
# timeouts (cleanup kills them).
for ((k = 0; k < HOSTS; k++)); do
  rc=0
  wait -n || rc=$?  # (the ranks are this script's only background jobs)
  if ((rc != 0)); then
    status=$rc
    echo "emulate-hosts.sh: a rank exited with code $rc: ending the others" >&2
    break
  fi
done
((status == 0)) && pids=()
if [[ -n $STATS ]]; then
  : >"$STATS"
  for ((i = 0; i < HOSTS; i++)); do
    echo "rank $i tx_bytes $(ip netns exec "$ID-h$i" cat /sys/class/net/eth0/statistics/tx_bytes)" >>"$STATS"
  done
fi
exit "$status"
