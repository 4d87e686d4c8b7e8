#!/usr/bin/env bash
# CPU per call of a server and of lossd-bench, each pinned to its own core (docs/perf.md, "Is
# lossd-bench the bottleneck?"): the server (lossd, then the echo and raw baselines) on CPU 1,
# lossd-bench on CPU 0, 16-element Evaluate calls at c16, two 3 s runs each per transport
# (lossd-bench's --transport: gRPC's client, then its own HTTP/2 client), alternated. Prints
# calls/s, the server's CPU seconds from /proc (utime + stime) and both sides' CPU per call;
# tester capacity / server rate = (server CPU per call) / (tester CPU per call) when the
# server's core is the saturated one.
# Usage: tools/bench/pinned_cost.sh [build directory, default build] [transports, default
#        "grpc h2"] [extra lossd-bench flags, e.g. "--shared_channel"]
set -u
B=${1:-build}
TRANSPORTS=${2:-grpc h2}
EXTRA=${3:-}
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for srv in lossd echo raw; do
  case $srv in
    lossd) taskset -c 1 $B/server/lossd --host=127.0.0.1 --port=50911 >/dev/null 2>&1 & ;;
    *) taskset -c 1 $B/tools/bench/lossd_bench_server --service=$srv --port=50911 >/dev/null 2>&1 & ;;
  esac
  P=$!; sleep 1.2
  for r in 1 2; do
    for tr in $TRANSPORTS; do
      c0=$(cpu $P); t0=$(date +%s.%N)
      out=$(taskset -c 0 $B/client/loadtest/lossd-bench --target=127.0.0.1:50911 --target_service=$srv \
        --transport=$tr $EXTRA --elements=16 --concurrency=16 --warmup=0s --duration=3s --rounds=1 \
        --progress=false 2>&1 | grep -E "^(lossd|echo|raw) " | tail -1)
      c1=$(cpu $P); t1=$(date +%s.%N)
      ok=$(echo "$out" | awk '{print $(NF-10)}')
      cps=$(echo "$out" | awk '{print $(NF-8)}')
      tcpu=$(echo "$out" | awk '{print $NF}')
      awk -v s=$srv -v tr=$tr -v c0=$c0 -v c1=$c1 -v t0=$t0 -v t1=$t1 -v ok=${ok:-0} -v cps=${cps:-0} -v tc=${tcpu%\%} 'BEGIN {
        hz=100; sc=(c1-c0)/hz; if (ok <= 0) { printf "%-6s %-5s no successful calls\n", s, tr; exit }
        su=1e6*sc/ok; tu=1e4*tc*(t1-t0)/ok
        printf "%-6s %-5s calls/s %8.0f  server CPU %5.2f s over %.2f s (%3.0f%% of its core), %5.1f us/call; tester CPU %s%% of its core, %5.1f us/call; server/tester CPU per call %.2f\n", s, tr, cps, sc, t1-t0, 100*sc/(t1-t0), su, tc, tu, su/tu }'
    done
  done
  kill $P; wait $P 2>/dev/null
done
