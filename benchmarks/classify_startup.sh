#!/bin/bash
# Whole-process time of `cytoretrieve classify` (issue 27, item 6): an older tree of the package and this checkout,
# interleaved, RUNS times each, run from /tmp so that `-m cytoretrieve` imports the tree on PYTHONPATH. One untimed
# run of each tree comes first (the page cache; and this tree's first run reads the table through LanceDB and keeps
# its snapshot, `store/snapshot.py`, which its timed runs then read). Each run's wall and CPU (user + sys) seconds
# and load are printed, then the medians; every run's --json must equal the older tree's first (else: DIFFERENT).
#   git archive HEAD cytoretrieve | tar -x -C /tmp/old
#   benchmarks/classify_startup.sh STORE TABLE /tmp/old [RUNS]
set -u
STORE=$1 TABLE=$2 OLD=$3 RUNS=${4:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd /tmp

one() {  # one run of tree $1 -> "$WORK/$2.json", its times in "$WORK/$2.time" (wall user sys)
  PYTHONPATH=$1 /usr/bin/time -f "%e %U %S" -o "$WORK/$2.time" "$HERE/.venv/bin/python" -m cytoretrieve classify \
    --table "$TABLE" --store "$STORE" --json "$WORK/$2.json" >/dev/null 2>&1
}

one "$OLD" reference || { echo "the older tree failed"; exit 1; }
one "$HERE" warm || { echo "this tree failed"; exit 1; }
for i in $(seq "$RUNS"); do
  for which in old new; do
    if [ "$which" = old ]; then tree=$OLD; else tree=$HERE; fi
    one "$tree" "$which$i"
    rc=$?
    same=same; cmp -s "$WORK/reference.json" "$WORK/$which$i.json" || same=DIFFERENT
    read -r wall user sys < "$WORK/$which$i.time"
    cpu=$(echo "$user + $sys" | bc)
    echo "$which wall $wall s cpu $cpu s rc=$rc $same load=$(cut -d' ' -f1 /proc/loadavg)"
    echo "$wall $cpu" >> "$WORK/$which.all"
  done
done
for which in old new; do
  wall=$(cut -d' ' -f1 "$WORK/$which.all" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
  cpu=$(cut -d' ' -f2 "$WORK/$which.all" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
  echo "median $which: wall $wall s, cpu $cpu s"
done
