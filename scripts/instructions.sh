#!/usr/bin/env bash
# Instructions per consumed message under callgrind (BENCHMARKS.md, "Instructions per
# message"): drain N1 and N2 prefilled messages in a process each and take
# (Ir at N2 - Ir at N1) / (N2 - N1), so start-up, connecting and shutdown cancel out.
#
#   scripts/instructions.sh BENCH VARIANT [TRACER]
#
# BENCH: a release build of examples/bench; VARIANT: raw, plain or dedup; TRACER: as the
# bench's --tracer (default none). Prints one line: variant, per message, the two counts.
set -euo pipefail
B=$1
V=$2
T=${3:-none}
N1=${N1:-2000}
N2=${N2:-6000}
OUT=${OUT:-target/instructions}
mkdir -p "$OUT"
declare -A IR
for n in "$N1" "$N2"; do
    q=bench-ir-$V-$n-$$
    "$B" prefill --queue "$q" --variant "$V" --n "$n" >/dev/null
    out=$OUT/$(basename "$B")-$V-$T-$n.out
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$B" drain --queue "$q" --variant "$V" --n "$n" --tracer "$T" >/dev/null 2>&1
    "$B" cleanup --queue "$q" --variant "$V" >/dev/null
    IR[$n]=$(grep -m1 '^summary:' "$out" | awk '{print $2}')
done
echo "$V $T $(((IR[$N2] - IR[$N1]) / (N2 - N1))) (${IR[$N1]} ${IR[$N2]})"
