#!/usr/bin/env bash
# Run the tests that start groundlmm_node (pytest marker `node`) N times in a row and print
# passes, failures and hangs.
#
#   scripts/repeat_node_tests.sh [N=30] [extra pytest arguments]
#
# A run still going after RUN_TIMEOUT_S (default 900) is killed and counted as a hang, as is a run
# the test suite's watchdog killed; no new run starts once TOTAL_TIMEOUT_S (default: none) has passed.
# The log of every run that did not pass is kept in LOG_DIR (default: a new folder under /tmp).
set -u
cd "$(dirname "$0")/.."
runs=${1:-30}
shift || true
venv=${VENV:-.venv}
run_timeout=${RUN_TIMEOUT_S:-900}
total_timeout=${TOTAL_TIMEOUT_S:-0}
log_dir=${LOG_DIR:-$(mktemp -d /tmp/repeat_node_tests.XXXXXX)}
export AMENT_PREFIX_PATH="$PWD/$venv" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

passes=0 failures=0 hangs=0 done_runs=0
start=$SECONDS
for i in $(seq 1 "$runs"); do
    if [ "$total_timeout" -gt 0 ] && [ $((SECONDS - start)) -ge "$total_timeout" ]; then
        echo "stopping: TOTAL_TIMEOUT_S=$total_timeout reached"
        break
    fi
    log="$log_dir/run_$i.log"
    run_start=$SECONDS
    timeout -k 10 "$run_timeout" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        -m node groundlmm_ros/test/ros "$@" > "$log" 2>&1
    rc=$?
    done_runs=$i
    if [ $rc -eq 0 ]; then
        outcome=pass; passes=$((passes + 1)); rm -f "$log"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ] || grep -q "^watchdog:" "$log"; then
        outcome="hang (exit $rc, log $log)"; hangs=$((hangs + 1))
    else
        outcome="failure (exit $rc, log $log): $(grep -E '^(FAILED|ERROR)' "$log" | head -3 | tr '\n' ' ')"
        failures=$((failures + 1))
    fi
    echo "run $i: $outcome in $((SECONDS - run_start)) s"
done
echo "node tests, $done_runs runs: $passes passes, $failures failures, $hangs hangs ($((SECONDS - start)) s)"
[ $((failures + hangs)) -eq 0 ]
