#!/usr/bin/env bash
# `make run` killed at 80 % of training, then run again: how much of a full run the rerun costs.
#   bash benchmarks/killed_make_run.sh [REPO]     (REPO: what to clone, default this checkout)
# On a fresh clone in /tmp: install (not timed), one full `make run` (timed), then from a clean
# outputs/ a `make run` sent SIGTERM (what a scheduler or torchrun sends; a script's background
# job ignores SIGINT) once training logs 80 % of its steps, and the rerun (timed). Run it alone:
# anything else on the CPU skews both times.
set -euo pipefail
repo=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
work=$(mktemp -d /tmp/blossom-killed.XXXX)
git clone -q "$repo" "$work" && cd "$work"
make install > install.log 2>&1
steps=$(.venv/bin/python -c "from blossom.config import load_config; print(load_config().train.steps)")
at=$((steps * 8 / 10))
(cd benchmarks && ../.venv/bin/python -c "from machine import machine_line; print(machine_line())")

clock() { date +%s.%N; }
s=$(clock); make run > full.log 2>&1; full=$(echo "$(clock) - $s" | bc)
echo "full make run: ${full} s"

rm -rf outputs reports dvc.lock mlflow.db mlruns .dvc/cache .dvc/tmp   # nothing for DVC to restore
setsid make run > killed.log 2>&1 &
pid=$!
step() { tail -n1 outputs/train/stats.jsonl 2>/dev/null | .venv/bin/python -c "import sys, json; l = sys.stdin.read().strip(); print(json.loads(l)['step'] if l else 0)" 2>/dev/null || echo 0; }
while [ "$(step)" -lt "$at" ]; do kill -0 $pid 2> /dev/null || { echo "the run ended before step $at"; exit 1; }; sleep 1; done
kill -TERM -- -$pid; wait $pid || true
# until every process of the group is gone, zombies too: DVC keeps its lock while its pid exists
while ps -o pid= --sid $pid | grep -q .; do sleep 1; done
echo "killed at step $(step) of $steps"
rm -rf .dvc/cache/runs   # a killed run never finished train: no run-cache entry to restore from

s=$(clock); make run > rerun.log 2>&1; rerun=$(echo "$(clock) - $s" | bc)
echo "rerun: ${rerun} s = $(echo "scale=3; $rerun / $full" | bc) of a full run ($(grep -a -o 'resumed from step-[0-9]*' rerun.log | head -1))"
echo "stages rerun: $(grep -a -o "Running stage '[a-z-]*'" rerun.log | cut -d"'" -f2 | tr '\n' ' ')"
echo "logs in $work"
