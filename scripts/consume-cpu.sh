#!/usr/bin/env bash
# Where the CPU of one drain goes (BENCHMARKS.md, "Where dedup's time goes"): CPU seconds
# of the consumer process, RabbitMQ (beam.smp) and Redis while a process drains N
# prefilled messages, per message.
#
#   scripts/consume-cpu.sh BENCH VARIANT N
#
# BENCH: a release build of examples/bench; VARIANT: raw, plain or dedup. Reads the
# broker's and Redis' CPU from /proc, so both must run on this machine.
set -euo pipefail
B=$1
V=$2
N=$3
q=bench-cpu-$V-$$
"$B" prefill --queue "$q" --variant "$V" --n "$N" >/dev/null
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
beam=$(pgrep -f beam.smp | head -1)
# The Redis on REDIS_URL's port (default 6379): pass REDIS_URL to measure a private node.
redis_port=$(echo "${REDIS_URL:-redis://127.0.0.1:6379}" | sed -E 's#.*:([0-9]+)/?[0-9]*$#\1#')
redis=$(redis-cli -p "$redis_port" info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')
[ -n "$redis" ] || redis=$(pgrep -f "redis-server.*:$redis_port" | head -1)
b0=$(cpu "$beam")
r0=$(cpu "$redis")
t0=$(date +%s.%N)
/usr/bin/time -f '%U %S %w %c' -o "/tmp/consume-cpu-$$" \
    "$B" drain --queue "$q" --variant "$V" --n "$N" >/dev/null 2>&1
t1=$(date +%s.%N)
b1=$(cpu "$beam")
r1=$(cpu "$redis")
"$B" cleanup --queue "$q" --variant "$V" >/dev/null
read -r user sys vcsw ivcsw <"/tmp/consume-cpu-$$"
rm -f "/tmp/consume-cpu-$$"
python3 - "$V" "$N" "$t0" "$t1" "$user" "$sys" "$vcsw" "$ivcsw" "$b0" "$b1" "$r0" "$r1" "$tick" <<'PY'
import sys
v, n, t0, t1, user, sys_, vcsw, ivcsw, b0, b1, r0, r1, tick = sys.argv[1:]
n = int(n); tick = float(tick)
wall = float(t1) - float(t0)
bench = float(user) + float(sys_)
beam = (float(b1) - float(b0)) / tick
redis = (float(r1) - float(r0)) / tick
us = lambda s: s / n * 1e6
print(f"{v}: {n / wall:.0f} msgs/s (process start included); CPU per message: "
      f"consumer {us(bench):.1f} us (user {us(float(user)):.1f}, system {us(float(sys_)):.1f}), "
      f"RabbitMQ {us(beam):.1f} us, Redis {us(redis):.1f} us; "
      f"context switches {vcsw} voluntary, {ivcsw} involuntary")
PY
