#!/usr/bin/env bash
# Wait until tools/device/pipeline.sh has finished or LIMIT seconds have passed, then copy its results
# into $OUT (what the device tool brings back) and print its progress log.
#     bash tools/device/collect.sh 560
limit=${1:-560}
while [ $SECONDS -lt "$limit" ] && [ ! -f /tmp/results/done ]; do sleep 5; done
mkdir -p "$OUT/r" && cp /tmp/results/*.json /tmp/results/*.txt /tmp/results/*.log "$OUT/r/" 2>/dev/null
cat /tmp/results/progress.log; tail -n 4 /tmp/results/*.log 2>/dev/null | cut -c1-300 | tail -n 60
