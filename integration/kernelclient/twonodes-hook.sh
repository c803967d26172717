#!/usr/bin/env bash
# HOST_HOOK of the "move" scenario (see twonodes-server.sh):
#   move-vip planned     release on the owning node, takeover on the other
#   move-vip unplanned   kill -9 the owning node, takeover on the other
# Last line: key=value pairs, times in seconds of the session's clock.
set -u
. "$HERE/host/serverctl.sh"
dir=$RUN_DIR/nlmha
vip=${HOST_IP:-10.77.7.1}
admin() { "$NLMHA_NLMADMIN" --socket "$dir/node$1.sock" "${@:2}"; }
case ${1:-} in
move-vip)
	from=$(cat "$dir/owner")
	to=$((3 - from))
	t0=$(rel_now)
	case ${2:-planned} in
	planned)
		admin "$from" vip release "$vip" || exit 1
		;;
	unplanned)
		kill -KILL "$(cat "$dir/node$from.pid")"
		;;
	*)
		echo "move-vip: planned or unplanned"
		exit 2
		;;
	esac
	t1=$(rel_now)
	out=$(admin "$to" vip takeover "$vip") || { echo "$out"; exit 1; }
	t2=$(rel_now)
	echo "$to" >"$dir/owner"
	echo "$out"
	echo "move-vip: ${2:-planned} from=node$from to=node$to at=$t0 released=$t1 taken=$t2"
	;;
*)
	echo "twonodes-hook: unknown action ${1:-}"
	exit 127
	;;
esac
