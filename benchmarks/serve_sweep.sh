#!/usr/bin/env bash
# Online runs for benchmarks/README.md: loom serve on the ~88M model, loom bench serve at three rates
# and the agent / shared-prefix / dag workloads with prefix caching on and off.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PY=${PY:-python}
M=$($PY -c "from loom.models.tiny import default_model_dir; print(default_model_dir('llama','small'))")
OUT=benchmarks/results; mkdir -p $OUT
serve() { $PY -m loom.entrypoints.cli --log-level WARNING serve --model $M --dtype bfloat16 --port $1 --served-model-name small --max-waiting 1000 "${@:2}" >/tmp/serve_$1.log 2>&1 & echo $!; }
wait_ready() { for i in $(seq 600); do curl -sf localhost:$1/ready >/dev/null && return 0; sleep 0.5; done; return 1; }
P1=$(serve 8101); wait_ready 8101
for rate in 0.5 1 2; do
  $PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8101 --model small --workload random --input-len 128 --output-len 64 --range-ratio 0.5 --num-requests 32 --request-rate $rate --ignore-eos --no-progress --json $OUT/serve_random_rate$rate.json --png $OUT/serve_random_rate$rate.png 2>&1 | tail -25
done
$PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8101 --model small --workload agent --num-requests 16 --num-turns 4 --system-len 1024 --input-len 48 --output-len 16 --ignore-eos --no-progress --json $OUT/serve_agent_cache_on.json --png $OUT/serve_agent_cache_on.png 2>&1 | tail -25
$PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8101 --model small --workload shared-prefix --num-requests 16 --num-groups 2 --prefix-len 1024 --input-len 32 --output-len 16 --ignore-eos --no-progress --json $OUT/serve_shared_prefix_cache_on.json 2>&1 | tail -25
$PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8101 --model small --workload dag --num-requests 20 --num-branches 4 --prefix-len 1024 --input-len 16 --output-len 16 --ignore-eos --no-progress --json $OUT/serve_dag_cache_on.json --png $OUT/serve_dag_cache_on.png 2>&1 | tail -25
kill -INT $P1; wait $P1
P2=$(serve 8102 --no-enable-prefix-caching); wait_ready 8102
$PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8102 --model small --workload agent --num-requests 16 --num-turns 4 --system-len 1024 --input-len 48 --output-len 16 --ignore-eos --no-progress --json $OUT/serve_agent_cache_off.json --png $OUT/serve_agent_cache_off.png 2>&1 | tail -25
$PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8102 --model small --workload shared-prefix --num-requests 16 --num-groups 2 --prefix-len 1024 --input-len 32 --output-len 16 --ignore-eos --no-progress --json $OUT/serve_shared_prefix_cache_off.json 2>&1 | tail -25
$PY -m loom.entrypoints.cli bench serve --base-url http://127.0.0.1:8102 --model small --workload dag --num-requests 20 --num-branches 4 --prefix-len 1024 --input-len 16 --output-len 16 --ignore-eos --no-progress --json $OUT/serve_dag_cache_off.json --png $OUT/serve_dag_cache_off.png 2>&1 | tail -25
kill -INT $P2; wait $P2
