#!/usr/bin/env bash
# NLM_SERVER_CMD of the "etcd" scenario: a one-member etcd and two nlmd
# nodes on it (--backend etcd, listen mode vip), on the harness host.
# Node 1 serves the harness's server address ($HOST_IP, which guest 1
# mounts), node 2 a second address on the same bridge ($VIP2, which guest
# 2 mounts): two virtual servers on two nodes, serving the same export.
# Each node has a state directory of its own: the NSM state (monitor
# records, state numbers) is shared through etcd only.
# Runs in the foreground: the harness stops its process group at the end.
set -u
: "${RUN_DIR:?}" "${NLMHA_NLMD:?}" "${NLMHA_NLMADMIN:?}" "${NLMHA_ETCD:?}"
dir=$RUN_DIR/nlmha
mkdir -p "$dir/state1" "$dir/state2"
vip1=${HOST_IP:-10.77.7.1}
vip2=${VIP2:-10.77.7.12}
dev=$(ip -o -4 addr show | awk -v a="$vip1/" 'index($4, a) == 1 {print $2; exit}')
ip addr add "$vip2/24" dev "$dev" || exit 1
"$NLMHA_ETCD" --name m1 --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:23790 \
	--advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23791 \
	--initial-advertise-peer-urls http://127.0.0.1:23791 --initial-cluster m1=http://127.0.0.1:23791 \
	--auto-compaction-mode periodic --auto-compaction-retention 5m --log-level error --log-outputs stderr \
	>>"$RUN_DIR/etcd.log" 2>&1 &
for n in 1 2; do
	"$NLMHA_NLMD" --backend etcd --etcd-endpoints http://127.0.0.1:23790 --node-name "node$n" --lease-ttl 3s \
		--listen-mode vip --serve-unknown=false --state-dir "$dir/state$n" --control-socket "$dir/node$n.sock" \
		--grace-period 60s --grace-quiet 3s --log-level debug >>"$RUN_DIR/nlm-node$n.log" 2>&1 &
	echo $! >"$dir/node$n.pid"
done
for n in 1 2; do
	for _ in $(seq 1 300); do
		"$NLMHA_NLMADMIN" --socket "$dir/node$n.sock" status >/dev/null 2>&1 && break
		sleep 0.1
	done
done
"$NLMHA_NLMADMIN" --socket "$dir/node1.sock" vip takeover "$vip1" || exit 1
"$NLMHA_NLMADMIN" --socket "$dir/node2.sock" vip takeover "$vip2" || exit 1
wait
