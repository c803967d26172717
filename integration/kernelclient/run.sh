#!/usr/bin/env bash
# Runs kernel-client scenarios (the real Linux NFSv3 client in QEMU) with
# Ganesha serving NFS without NLM and nlmd serving NLM, and checks the
# capture summary for what nlmd must have said on the wire.
#
# usage: integration/kernelclient/run.sh [SCENARIO|path/to/scenario.sh ...]
#        (default: basic procs twoclients). Needs root and a built bin/nlmd.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
tools=${NLMHA_SHARED_TOOLS:-$root/../shared/tools}
kc=$(cd "$tools/kernel-client" && pwd)
nlmd=$root/bin/nlmd
[ -x "$nlmd" ] || { echo "kernelclient: build nlmd first (make build)" >&2; exit 2; }
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
[ ${#scenarios[@]} -gt 0 ] || scenarios=(basic procs twoclients)
for s in "${scenarios[@]}"; do
	case $s in */*) s=$(readlink -f "$s") ;; esac
	echo "kernelclient: scenario $s"
	start=$(date +%s)
	if ! SERVER_MODE=ganesha-nonlm SERVER_STATD=${SERVER_STATD:-1} \
		NLM_SERVER_CMD="exec $nlmd --log-level debug ${NLMD_ARGS:-}" "$kc/run.sh" "$s"; then
		echo "kernelclient: FAIL $s (logs: $(readlink -f "$kc/cache/runs/latest"))"
		fail=1
		continue
	fi
	summary=$kc/cache/runs/latest/rpc-summary.txt
	echo "kernelclient: $s passed in $(( $(date +%s) - start )) s; checking $summary"
	check "$summary" "$server +-> +10\.77\.7\.[23] +NLM V4 LOCK Reply" "nlmd's LOCK replies"
	case $(basename "$s" .sh) in
	twoclients)
		check "$summary" "$server +-> +10\.77\.7\.3 +NLM V4 LOCK Reply .*NLM_BLOCKED" "BLOCKED for the second client"
		check "$summary" "$server +-> +10\.77\.7\.3 +NLM V4 GRANTED(_MSG)? Call" "GRANTED callback from the server address to the blocked client"
		check "$summary" "$server +-> +10\.77\.7\.3 +NLM V4 TEST Reply" "TEST reply with the holder" ;;
	basic|procs)
		check "$summary" "$server +-> +10\.77\.7\.2 +NLM V4 (UNLOCK|TEST) Reply" "nlmd's UNLOCK/TEST replies" ;;
	esac
done
exit $fail
