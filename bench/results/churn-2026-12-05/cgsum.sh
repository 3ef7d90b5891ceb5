#!/bin/bash
# usage: cgsum.sh FILE -- Ir total, spawns (= cycles), Ir per cycle, and main categories per cycle
F=$1
callgrind_annotate --inclusive=yes --threshold=100 $F 2>/dev/null | sed -E 's#/root/.cargo/registry/src/index.crates.io-[0-9a-f]+/##g; s#/work/[a-z0-9/]*crates/cattery/src/##g; s#/rustc/[0-9a-f]+/library/##g; s/\[\/[^]]*\]//g' > $F.incl
callgrind_annotate --tree=caller --threshold=100 $F 2>/dev/null > $F.tree
TOT=$(grep "PROGRAM TOTALS" $F.incl | awk '{gsub(",","",$1); print $1}')
SP=$(grep -E "> .*runtime/process/spawn.rs:cattery::runtime::process::spawn::spawn \(" $F.tree | sed -E 's/.*\(([0-9,]+)x\).*/\1/' | tr -d , | awk '{s+=$1} END {print s}')
echo "total Ir $TOT spawns $SP per cycle $((TOT / SP))"
for pat in "store::sqlite::group_writer::\{\{closure\}\} " "prune_logs_over" "find_key::\{\{closure\}\} " "http_server::serve::\{\{closure\}\}::\{\{closure\}\} " "ProcessRuntime::start_blocking " "isolation::instance_env " "Tailer::start::\{\{closure\}\} " "owns_endpoint " "actor::Actor::life::\{\{closure\}\} " "finish::\{\{closure\}\} " "serve::log_writer::\{\{closure\}\} " "wait_ready" "malloc.c:malloc " "_int_free " "sqlite3_step "; do
  v=$(grep -E "$pat" $F.incl | head -1 | awk '{gsub(",","",$1); print $1}')
  [[ "$v" =~ ^[0-9]+$ ]] && echo "  $((v / SP)) $pat"
done
