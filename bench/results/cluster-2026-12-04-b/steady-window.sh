#!/usr/bin/env bash
# steady-state window: CPU ticks and context switches of the scratch cluster's backends and of the nodes
# Run from the repository root with CATTERY_TEST_DATABASE_URL set (scripts/postgres-ci.sh) and
# release builds of main and of this version in target/ab-main and target/ab-new.
pm=$(head -1 target/postgres-ci/data/postmaster.pid); hz=$(getconf CLK_TCK)
snap() { # prints: pg_ticks pg_ctx node_ticks node_ctx
  local pt=0 pc=0 nt=0 nc=0 p
  for p in $(pgrep -P $pm); do
    pt=$((pt + $(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0)))
    pc=$((pc + $(awk '/ctxt_switches/{s+=$2} END{print s+0}' /proc/$p/status 2>/dev/null || echo 0)))
  done
  for p in $(pgrep -f "$1 serve"); do
    nt=$((nt + $(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0)))
    for t in /proc/$p/task/*; do nc=$((nc + $(awk '/ctxt_switches/{s+=$2} END{print s+0}' $t/status 2>/dev/null || echo 0))); done
  done
  echo $pt $pc $nt $nc
}
U=$CATTERY_TEST_DATABASE_URL; B=${U%/postgres}
for r in 1 2; do for side in main new; do for nodes in 1 3; do
  bin=$PWD/target/ab-$side/cattery; db=win_${side}_${nodes}_$r_$$_$r
  psql -q $U -c "create database $db"
  target/ab-main/cattery-bench --cattery $bin --quick --only churn --churn-seconds 16 --database-url $B/$db --nodes $nodes > /tmp/pgfast-win.out 2>&1 &
  bp=$!
  for i in $(seq 1 60); do grep -q "churn: 8 workers" /tmp/pgfast-win.out && break; sleep 0.25; done
  sleep 5; a=($(snap $bin)); t0=$(date +%s.%N); sleep 6; b=($(snap $bin)); t1=$(date +%s.%N)
  wait $bp
  rate=$(grep "cycles per second" /tmp/pgfast-win.out | awk '{for(i=1;i<=NF;i++) if($i=="cycles/s") print $(i-1)}')
  cyc=$(echo "$rate * ($t1 - $t0)" | bc)
  printf "%s nodes=%s r=%s load=%s rate=%s pg_cpu_ms/cycle=%.2f pg_ctx/cycle=%.1f node_cpu_ms/cycle=%.2f node_ctx/cycle=%.1f\n" $side $nodes $r "$(cut -d' ' -f1 /proc/loadavg)" $rate \
    $(echo "(${b[0]}-${a[0]})*1000/$hz/$cyc" | bc -l) $(echo "(${b[1]}-${a[1]})/$cyc" | bc -l) $(echo "(${b[2]}-${a[2]})*1000/$hz/$cyc" | bc -l) $(echo "(${b[3]}-${a[3]})/$cyc" | bc -l)
  psql -q $U -c "drop database $db"
done; done; done
