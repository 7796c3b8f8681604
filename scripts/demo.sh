#!/usr/bin/env bash
# make demo: a tiny locally made model, a local swarm of 3 servers started through the CLI, one generation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEMO=.demo
MODEL=$DEMO/tiny-llama
mkdir -p "$DEMO"
python -m petals_cli.testing make-model "$MODEL" --family llama --layers 6 --hidden 128 --heads 8 --kv-heads 4 \
    --vocab 1024 --reuse >/dev/null
pids=()
stop_servers() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT
wait_for() {  # wait until a server has written its address file
    for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.1; done
    echo "server did not start (see $DEMO/*.log)" >&2; return 1
}
rm -f "$DEMO"/*.addr
echo "starting 3 servers: blocks 0:2, 2:4, 4:6 (logs in $DEMO/)" >&2
petals serve "$MODEL" --blocks 0:2 --new-swarm --address-file "$DEMO/first.addr" >"$DEMO/server1.log" 2>&1 &
pids+=($!)
wait_for "$DEMO/first.addr"
PEERS=$(head -n 1 "$DEMO/first.addr")
petals serve "$MODEL" --blocks 2:4 --initial-peers "$PEERS" --address-file "$DEMO/second.addr" >"$DEMO/server2.log" 2>&1 &
pids+=($!)
petals serve "$MODEL" --blocks 4:6 --initial-peers "$PEERS" --address-file "$DEMO/third.addr" >"$DEMO/server3.log" 2>&1 &
pids+=($!)
wait_for "$DEMO/second.addr"
wait_for "$DEMO/third.addr"
echo "generating through the swarm:" >&2
petals generate "$MODEL" --initial-peers "$PEERS" --prompt "The swarm of servers" --max-new-tokens 24
echo "stopping servers" >&2
