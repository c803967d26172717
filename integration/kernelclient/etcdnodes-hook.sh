#!/usr/bin/env bash
# HOST_HOOK of the "etcd" scenario (see etcdnodes-server.sh):
#   kill-node1   kill -9 node 1; node 2 takes its address over once node
#                1's lease has run out (3 s)
#   cluster      nlmadmin cluster status and locks list, from node 2
# Last line: key=value pairs, times in seconds of the session's clock.
set -u
. "$HERE/host/serverctl.sh"
dir=$RUN_DIR/nlmha
vip1=${HOST_IP:-10.77.7.1}
admin() { "$NLMHA_NLMADMIN" --socket "$dir/node$1.sock" "${@:2}"; }
case ${1:-} in
kill-node1)
	t0=$(rel_now)
	kill -KILL "$(cat "$dir/node1.pid")"
	for _ in $(seq 1 300); do
		if out=$(admin 2 vip takeover "$vip1" 2>&1); then
			t1=$(rel_now)
			echo "$out"
			echo "kill-node1: at=$t0 taken=$t1"
			exit 0
		fi
		sleep 0.1
	done
	echo "$out"
	exit 1
	;;
cluster)
	admin 2 cluster status
	admin 2 locks list
	;;
*)
	echo "etcdnodes-hook: unknown action ${1:-}"
	exit 127
	;;
esac
