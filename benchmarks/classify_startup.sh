#!/bin/bash
# Whole-process wall time of `cytoretrieve classify` (issue 27, item 6): an older tree of the package and this
# checkout, interleaved, RUNS times each, run from /tmp so that `-m cytoretrieve` imports the tree on PYTHONPATH.
#   git archive HEAD cytoretrieve | tar -x -C /tmp/old
#   benchmarks/classify_startup.sh STORE TABLE /tmp/old [RUNS]
set -u
STORE=$1 TABLE=$2 OLD=$3 RUNS=${4:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd /tmp
for _ in $(seq "$RUNS"); do
  for which in old new; do
    if [ "$which" = old ]; then tree=$OLD; else tree=$HERE; fi
    start=$(date +%s.%N)
    PYTHONPATH=$tree "$HERE/.venv/bin/python" -m cytoretrieve classify --table "$TABLE" --store "$STORE" >/dev/null 2>&1
    rc=$?
    end=$(date +%s.%N)
    echo "$which $(echo "$end - $start" | bc) s rc=$rc load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
