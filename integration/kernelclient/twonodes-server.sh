#!/usr/bin/env bash
# NLM_SERVER_CMD of the "move" scenario: two nlmd "nodes" on the harness
# host, sharing a state directory (as nodes share one on a cluster file
# system) and the ports, each with sockets bound to the virtual servers it
# serves (listen mode vip). Node 1 starts serving the server address
# ($HOST_IP, the address the guests mount); twonodes-hook.sh moves it.
# Runs in the foreground: the harness stops its process group at the end.
set -u
: "${RUN_DIR:?}" "${NLMHA_NLMD:?}" "${NLMHA_NLMADMIN:?}"
dir=$RUN_DIR/nlmha
mkdir -p "$dir/state"
vip=${HOST_IP:-10.77.7.1}
for n in 1 2; do
	"$NLMHA_NLMD" --listen-mode vip --serve-unknown=false --state-dir "$dir/state" --control-socket "$dir/node$n.sock" \
		--grace-period 60s --grace-quiet 3s --log-level debug >>"$RUN_DIR/nlm-node$n.log" 2>&1 &
	echo $! >"$dir/node$n.pid"
done
for n in 1 2; do
	for _ in $(seq 1 100); do
		"$NLMHA_NLMADMIN" --socket "$dir/node$n.sock" status >/dev/null 2>&1 && break
		sleep 0.1
	done
done
"$NLMHA_NLMADMIN" --socket "$dir/node1.sock" vip takeover "$vip" || exit 1
echo 1 >"$dir/owner"
wait
