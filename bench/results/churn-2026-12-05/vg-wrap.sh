#!/bin/bash
# cattery wrapper: `serve` runs under callgrind (out file from $CG_OUT), the rest natively
if [ "$1" = "serve" ]; then
  exec valgrind --tool=callgrind --callgrind-out-file=$CG_OUT --dump-instr=no --collect-systime=nsec --trace-children=no "$CG_BIN" "$@"
fi
exec "$CG_BIN" "$@"
