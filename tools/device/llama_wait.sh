#!/usr/bin/env bash
# Wait (at most $2 seconds, default 300) for tools/device/llama_build.sh BACKEND to finish; print its
# result and exit 0 only if llama-bench was built.
#     bash tools/device/llama_wait.sh cuda 300
dir=/tmp/llb-$1 limit=${2:-300}
for ((s = 0; s < limit; s += 5)); do [ -f "$dir/rc" ] && break; sleep 5; done
if [ ! -f "$dir/rc" ]; then echo "llama.cpp $1: still building after ${limit}s"; tail -2 "$dir/build.log"; exit 1; fi
echo "llama.cpp $1 build rc $(cat "$dir/rc")"; tail -3 "$dir/build.log"
[ -x "$dir/llama.cpp/build/bin/llama-bench" ]
