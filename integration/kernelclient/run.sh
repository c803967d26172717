#!/usr/bin/env bash
# Runs kernel-client scenarios (the real Linux NFSv3 client in QEMU) with
# Ganesha serving NFS without NLM and nlmd serving NLM and NSM (no rpc.statd
# on the server side), and checks the capture summary and nlmd's log for
# what nlmd must have done.
#
# usage: integration/kernelclient/run.sh [SCENARIO|path/to/scenario.sh ...]
#        (default: basic procs twoclients notify restart move etcd). Needs root and a
#        built bin/nlmd. nlmd keeps its state in the run directory, so that a
#        restart within a scenario finds it; it starts with a grace period,
#        which ends at once when it has no clients to notify.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
tools=${NLMHA_SHARED_TOOLS:-$root/../shared/tools}
kc=$(cd "$tools/kernel-client" && pwd)
nlmd=$root/bin/nlmd
[ -x "$nlmd" ] || { echo "kernelclient: build nlmd first (make build)" >&2; exit 2; }
# for the two-node scenario (twonodes-server.sh, twonodes-hook.sh)
export NLMHA_NLMD=$nlmd NLMHA_NLMADMIN=$root/bin/nlmadmin
# for the etcd scenario (etcdnodes-server.sh): the etcd server, built from
# this module (internal/etcdtest/etcdserver)
export NLMHA_ETCD=$root/bin/etcd-server
[ "$(id -u)" = 0 ] || { echo "kernelclient: must run as root" >&2; exit 2; }

server=10.77.7.1
fail=0
check() { # FILE REGEX WHAT
	if grep -Eq "$2" "$1"; then
		echo "kernelclient:   ok: $3"
	else
		echo "kernelclient:   MISSING on the wire: $3 (/$2/ in $1)"
		fail=1
	fi
}

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(basic procs twoclients notify "$here/restart.sh" "$here/move.sh" "$here/etcd.sh")
for s in "${scenarios[@]}"; do
	case $s in */*) s=$(readlink -f "$s") ;; esac
	echo "kernelclient: scenario $s"
	start=$(date +%s)
	cmd="exec $nlmd --log-level debug --state-dir \"\$RUN_DIR/nlmha\" --grace-period 15s ${NLMD_ARGS:-}"
	hook=
	case $(basename "$s" .sh) in
	move) cmd="exec $here/twonodes-server.sh" hook=$here/twonodes-hook.sh ;;
	etcd)
		[ -x "$NLMHA_ETCD" ] || { echo "kernelclient: build bin/etcd-server first" >&2; exit 2; }
		cmd="exec $here/etcdnodes-server.sh" hook=$here/etcdnodes-hook.sh ;;
	esac
	if ! SERVER_MODE=ganesha-nonlm SERVER_STATD=0 NLM_SERVER_CMD="$cmd" HOST_HOOK=$hook "$kc/run.sh" "$s"; then
		echo "kernelclient: FAIL $s (logs: $(readlink -f "$kc/cache/runs/latest"))"
		fail=1
		continue
	fi
	summary=$kc/cache/runs/latest/rpc-summary.txt
	log=$kc/cache/runs/latest/nlm-server.log
	case $(basename "$s" .sh) in move | etcd) log=$kc/cache/runs/latest/nlm-node1.log ;; esac
	echo "kernelclient: $s passed in $(( $(date +%s) - start )) s; checking $summary"
	check "$summary" "$server +-> +10\.77\.7\.[23] +NLM V4 LOCK Reply" "nlmd's LOCK replies"
	check "$log" "nsm: monitoring.*mon_name=10\.77\.7\.[23]" "nlmd monitors the client (in process, no statd)"
	case $(basename "$s" .sh) in
	notify)
		check "$summary" "10\.77\.7\.2 +-> +$server +STAT V1 NOTIFY Call" "the client's SM_NOTIFY to nlmd"
		check "$summary" "$server +-> +10\.77\.7\.2 +STAT V1 NOTIFY Reply" "nlmd's reply to it"
		check "$log" "nsm: a monitored host rebooted.*clients_dropped=1" "nlmd dropped the rebooted client's state" ;;
	move)
		node2=$kc/cache/runs/latest/nlm-node2.log
		check "$node2" "hacallout: took over.*planned=true" "node 2 took the address over from the snapshot"
		check "$log" "hacallout: took over.*notifying=[1-9].*planned=false" "node 1 took it back after node 2 died, notifying"
		check "$summary" "$server +-> +10\.77\.7\.2 +STAT V1 NOTIFY Call" "SM_NOTIFY from the address to the client" ;;
	restart)
		check "$summary" "$server +-> +10\.77\.7\.2 +STAT V1 NOTIFY Call" "nlmd's SM_NOTIFY to the client after its restart"
		check "$log" "nsm: notification finished.*failed=0 notified=1" "nlmd's notifier reports the client notified" ;;
	etcd)
		node2=$kc/cache/runs/latest/nlm-node2.log
		check "$summary" "10\.77\.7\.12 +-> +10\.77\.7\.3 +NLM V4 GRANTED(_MSG)? Call" "GRANTED from node 2's address to the client blocked there"
		check "$node2" "hacallout: took over.*planned=false" "node 2 took node 1's address over after node 1 died"
		check "$summary" "$server +-> +10\.77\.7\.2 +STAT V1 NOTIFY Call" "SM_NOTIFY from node 1's address, now on node 2, to its client" ;;
	twoclients)
		check "$summary" "$server +-> +10\.77\.7\.3 +NLM V4 LOCK Reply .*NLM_BLOCKED" "BLOCKED for the second client"
		check "$summary" "$server +-> +10\.77\.7\.3 +NLM V4 GRANTED(_MSG)? Call" "GRANTED callback from the server address to the blocked client"
		check "$summary" "$server +-> +10\.77\.7\.3 +NLM V4 TEST Reply" "TEST reply with the holder" ;;
	basic|procs)
		check "$summary" "$server +-> +10\.77\.7\.2 +NLM V4 (UNLOCK|TEST) Reply" "nlmd's UNLOCK/TEST replies" ;;
	esac
done
exit $fail
