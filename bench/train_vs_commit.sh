#!/usr/bin/env bash
# End to end `twinv2 train` of this checkout against an earlier commit on the same machine, alternating runs
# (issue 29: the side-by-side ratio of the training path, not two figures from two days).
#   bash bench/train_vs_commit.sh COMMIT DATA [MODEL=twinv2] [REPS=2] [EPOCHS=2]
# COMMIT is checked out with `git worktree` into a temporary folder and run with this checkout's venv
# (python -m puts the worktree first on sys.path); DATA: a generated, validated, clustered world. Prints one
# line per run (side, rep, training samples/s, wall s, best valid GAUC) and the median ratio new / old.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMIT=$1 DATA=$(realpath "$2") MODEL=${3:-twinv2} REPS=${4:-2} EPOCHS=${5:-2}
PY="$(pwd)/.venv/bin/python"          # not realpath: the venv python is a symlink
HERE=$(pwd)
TMP=$(mktemp -d)
trap 'git -C "$HERE" worktree remove --force "$TMP/old" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git worktree add -q --detach "$TMP/old" "$COMMIT"
for rep in $(seq "$REPS"); do
  for side in old new; do
    dir=$([ "$side" = old ] && echo "$TMP/old" || echo "$HERE")
    (cd "$dir" && TWINV2_PROGRESS=0 "$PY" -m pipelines.cli --set train.epochs="$EPOCHS" --set train.progress=false \
       train --data "$DATA" --model "$MODEL" --out "$TMP/run_$side" >/dev/null)
    "$PY" -c "import json; d = json.load(open('$TMP/run_$side/train_metrics.json')); print('$side', $rep, round(d['samples_per_s']), round(d['wall_s'], 1), round(d['best_valid_gauc'], 4))" | tee -a "$TMP/lines"
    rm -rf "$TMP/run_$side"
  done
done
"$PY" - "$TMP/lines" <<'PYEOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {s: statistics.median(float(r[2]) for r in rows if r[0] == s) for s in ("old", "new")}
print(f"median samples/s: old {med['old']:,.0f}, new {med['new']:,.0f}, new / old {med['new'] / med['old']:.2f}x")
PYEOF
