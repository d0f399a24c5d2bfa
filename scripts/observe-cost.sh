#!/usr/bin/env bash
# The cost of features `otel` + `metrics` on the consume path (issue 13), two ways:
#
#   scripts/observe-cost.sh build          # two release builds of examples/bench
#   scripts/observe-cost.sh wall [RUNS]    # interleaved wall-clock runs of `bench consume`
#                                          # (TRACER=none: "on" without a tracer;
#                                          # TRACER=otel-1pct: 1% of deliveries sampled)
#   scripts/observe-cost.sh instructions ["off on on-1pct on-recorder-only"]
#                                          # instructions per message under callgrind
#
# "off" is built with `--no-default-features` (no otel, no metrics, no http), "on" with
# the examples' default feature `observe` (otel + http, which includes metrics) and run
# with `--tracer otel`: the Prometheus recorder `App::start` installs and an
# OpenTelemetry tracer provider recording every span, as a traced service runs.
# Results are written up in docs/observability.md and BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OFF=target/bench-off
ON=target/bench-on
OUT=${OUT:-target/observe-cost}
mkdir -p "$OUT"

case "${1:-}" in
build)
    cargo build --release -p reliable-mq-examples --example bench --no-default-features
    cp target/release/examples/bench "$OFF"
    cargo build --release -p reliable-mq-examples --example bench
    cp target/release/examples/bench "$ON"
    ;;
wall)
    runs=${2:-5}
    uptime | tee "$OUT/wall-uptime.txt"
    for i in $(seq 1 "$runs"); do
        for side in off on; do
            if [ "$side" = on ]; then b=$ON; t=${TRACER:-otel}; else b=$OFF; t=none; fi
            "$b" consume --n 20000 --reps 1 --tracer "$t" >"$OUT/wall-$t-$side-$i.txt"
            echo "$side ($t) run $i:"
            grep -A4 '^ratio to raw lapin' "$OUT/wall-$t-$side-$i.txt" | tail -4
        done
    done
    uptime | tee -a "$OUT/wall-uptime.txt"
    ;;
instructions)
    for side in ${2:-off on on-recorder-only}; do
        case $side in
        off) b=$OFF; t=none ;;
        on) b=$ON; t=otel ;;
        on-1pct) b=$ON; t=otel-1pct ;;
        on-recorder-only) b=$ON; t=none ;;
        esac
        for variant in plain dedup; do
            for n in 2000 6000; do
                q=bench-cg-$side-$variant-$n-$$
                "$b" prefill --queue "$q" --variant "$variant" --n "$n" >/dev/null
                valgrind --tool=callgrind --callgrind-out-file="$OUT/cg-$side-$variant-$n.out" \
                    "$b" drain --queue "$q" --variant "$variant" --n "$n" --tracer "$t" \
                    >"$OUT/cg-$side-$variant-$n.log" 2>&1
                "$b" cleanup --queue "$q" --variant "$variant" >/dev/null
                ir=$(grep -m1 '^summary:' "$OUT/cg-$side-$variant-$n.out" | awk '{print $2}')
                echo "$side $variant $n $ir" | tee -a "$OUT/instructions.txt"
            done
        done
    done
    ;;
*)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
