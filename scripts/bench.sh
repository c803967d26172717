#!/usr/bin/env bash
# make bench: the Go benchmarks, then load runs against nlmd and against the
# NFS-Ganesha baseline, side by side on this machine, each server in a
# private network and mount namespace of its own.
#
#   scripts/bench.sh            everything (needs root for the namespaces)
#   COUNT=5 DURATION=10 REPEAT=3 scripts/bench.sh   (summary: medians)
#   SKIP_GO=1 / SKIP_LOAD=1 / SKIP_NOTIFY=1 / SKIP_FAILOVER=1   leave out a part
#   SM_NOTIFY_MAX=10000         also time sm-notify with 10 000 clients (minutes)
#
# Results go to cache/bench/: go.txt (benchmarks), nlmbench.txt, load.txt
# (nlmload RESULT lines plus each server's CPU), notify.txt (fan-out),
# failover.txt (moves), summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${BENCH_OUT:-$ROOT/cache/bench}
TOOLS=${NLMHA_SHARED_TOOLS:-$(cd .. && pwd)/shared/tools}
NLMPEER=$TOOLS/nlmpeer
DURATION=${DURATION:-10}
COUNT=${COUNT:-5}
REPEAT=${REPEAT:-1}
HZ=$(getconf CLK_TCK)
# get(line, key): a key=value field of a RESULT line; median(",a,b,c").
AWKLIB='
function get(line, key,   n, f, i, kv) {
	n = split(line, f, " ")
	for (i = 1; i <= n; i++) { split(f[i], kv, "="); if (kv[1] == key) return kv[2] }
	return ""
}
function median(s,   n, a, i, j, t) {
	n = split(substr(s, 2), a, ",")
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
	return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
'

proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime+stime, ticks

wait_prog() { # PROG SECONDS
	for _ in $(seq 1 $(($2 * 10))); do
		rpcinfo -p 127.0.0.1 2>/dev/null | awk '{print $1}' | grep -qx "$1" && return 0
		sleep 0.1
	done
	echo "program $1 never registered" >&2
	return 1
}

private_net() {
	ip link set lo up
	ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true # Ganesha's AI_ADDRCONFIG trap
	mount -t tmpfs tmpfs /run
}

# load SERVER PID EXPORT ARGS...: one nlmload run, with the server's CPU.
load() {
	local server=$1 pid=$2 export=$3
	shift 3
	local c0 c1 t0 t1 res
	c0=$(proc_cpu "$pid")
	t0=$(date +%s.%N)
	res=$("$NLMPEER/cache/bin/nlmload" --server 127.0.0.1 --export "$export" --duration "$DURATION" --warmup 1 "$@" | grep '^RESULT')
	t1=$(date +%s.%N)
	c1=$(proc_cpu "$pid")
	awk -v r="$res" -v s="$server" -v c="$((c1 - c0))" -v hz="$HZ" -v t0="$t0" -v t1="$t1" 'BEGIN {
		n = split(r, f, " "); ops = 0
		for (i = 1; i <= n; i++) { split(f[i], kv, "="); if (kv[1] == "ops_per_s") ops = kv[2] }
		wall = t1 - t0; cpu = c / hz
		# calls over the whole run (warm-up included), at the measured rate
		printf "%s server=%s server_cpu_s=%.2f wall_s=%.2f server_cpu_us_per_call=%.2f\n", r, s, cpu, wall, cpu * 1e6 / (ops * wall)
	}' | tee -a "$OUT/load.txt"
}

load_matrix() { # SERVER PID EXPORT
	local r
	for r in $(seq 1 "$REPEAT"); do
		load_shapes "$@"
	done
}

load_shapes() { # SERVER PID EXPORT
	for c in 1 16 64; do
		load "$@" --mode files --conns "$c" --anchor
	done
	load "$@" --mode ranges --conns 16 --anchor
	load "$@" --mode same --conns 16 --anchor
	load "$@" --mode files --conns 16 --udp --anchor
}

inner_nlmd() {
	private_net
	local dir
	dir=$(mktemp -d)
	mkdir -p "$dir/export" "$dir/recov"
	sed -e "s|@DIR@|$dir|g" -e "s|@EXPORT@|$dir/export|g" integration/testdata/ganesha-nonlm.conf.in >"$dir/ganesha.conf"
	rpcbind -f -w &
	local rpcb=$!
	wait_prog 100000 10
	ganesha.nfsd -F -f "$dir/ganesha.conf" -L "$dir/ganesha.log" -p "$dir/ganesha.pid" -N NIV_EVENT &
	local gan=$!
	wait_prog 100003 30
	bin/nlmd --log-level warn --state-dir "$dir/state" &
	local nlmd=$!
	wait_prog 100021 10
	for t in tcp udp; do
		for c in 1 16 64; do
			bin/nlmbench --transport "$t" --clients "$c" --duration "${DURATION}s" --mode uncontended | grep RESULT | tee -a "$OUT/nlmbench.txt"
		done
	done
	for m in contended conflicting; do
		bin/nlmbench --transport tcp --clients 16 --duration "${DURATION}s" --mode "$m" | grep RESULT | tee -a "$OUT/nlmbench.txt"
	done
	load_matrix nlmd "$nlmd" "$dir/export"
	kill "$nlmd"
	wait "$nlmd" || true
	kill "$gan" "$rpcb"
	wait || true
	rm -rf "$dir"
}

inner_ganesha() {
	private_net
	NETNS= GRACELESS=true "$NLMPEER/run-ganesha.sh" start
	load_matrix ganesha "$(cat "$NLMPEER/cache/run/ganesha.pid")" "$NLMPEER/cache/export"
	NETNS= "$NLMPEER/run-ganesha.sh" stop
}

# SM_NOTIFY fan-out: nlmd's notifier, then nfs-utils' sm-notify on the same
# list, to simulated client statds (127.x.y.z, one portmapper and statd for
# all); state directories on tmpfs for both.
inner_notify() {
	private_net
	mount -t tmpfs tmpfs /tmp
	bin/nlmbench notify --clients 1000,10000 --repeat "$REPEAT" --sm-notify-max "${SM_NOTIFY_MAX:-1000}"
}

# Moves of a virtual server between two nlmd (1 000 clients holding a lock
# each): the time a new lock through the address cannot be granted.
inner_failover() {
	private_net
	bin/nlmbench failover --clients 1000 --rounds "$((REPEAT * 3))"
}

case ${1:-} in
--inner-nlmd) inner_nlmd; exit ;;
--inner-ganesha) inner_ganesha; exit ;;
--inner-notify) inner_notify; exit ;;
--inner-failover) inner_failover; exit ;;
esac

mkdir -p "$OUT"
if [ -z "${SKIP_GO:-}" ]; then
	echo "== Go benchmarks (-count $COUNT)"
	go test -run '^$' -bench . -benchmem -count "$COUNT" -timeout 60m ./... | tee "$OUT/go.txt"
fi
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo --preserve-env=NLMHA_SHARED_TOOLS,DURATION,REPEAT,BENCH_OUT,SM_NOTIFY_MAX env "PATH=$PATH")
go build -o bin/ ./cmd/...
: >"$OUT/summary.txt"
if [ -z "${SKIP_NOTIFY:-}" ]; then
	echo "== SM_NOTIFY fan-out: nlmd and sm-notify to simulated client statds"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-notify | tee "$OUT/notify.txt"
	awk "$AWKLIB"'
	/^RESULT/ && get($0, "finished") != "false" {
		k = get($0, "notifier") " " get($0, "clients")
		secs[k] = secs[k] "," get($0, "seconds")
		if (!(k in seen)) { seen[k] = 1; order[++n] = k }
	}
	END {
		printf "SM_NOTIFY fan-out (medians of notify.txt)\n%-22s %10s %12s\n", "notifier clients", "seconds", "clients/s"
		for (i = 1; i <= n; i++) {
			k = order[i]; m = median(secs[k]); split(k, p, " ")
			printf "%-22s %10.3f %12.0f\n", k, m, p[2] / m
		}
	}' "$OUT/notify.txt" | tee -a "$OUT/summary.txt"
fi
if [ -z "${SKIP_FAILOVER:-}" ]; then
	echo "== virtual server moves between two nlmd (1 000 clients)"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-failover | tee "$OUT/failover.txt"
	{ echo "virtual server moves (medians)"; grep '^RESULT' "$OUT/failover.txt"; } | tee -a "$OUT/summary.txt"
fi
[ -n "${SKIP_LOAD:-}" ] && exit 0

[ -x "$NLMPEER/cache/bin/nlmload" ] || "${sudo[@]}" "$NLMPEER/setup.sh"
: >"$OUT/load.txt"
: >"$OUT/nlmbench.txt"
echo "== nlmd (Ganesha serving NFS without NLM, nlmd serving NLM)"
"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-nlmd
echo "== NFS-Ganesha 4.3 with its own NLM (the baseline)"
"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-ganesha

# Side by side: nlmd against Ganesha for each shape both ran, medians over
# the repetitions.
awk "$AWKLIB"'
/^RESULT/ {
	k = get($0, "mode") " " get($0, "conns") " " get($0, "proto"); sv = get($0, "server")
	pairs[sv, k] = pairs[sv, k] "," get($0, "pairs_per_s")
	cpu[sv, k] = cpu[sv, k] "," get($0, "server_cpu_us_per_call")
	p99[sv, k] = p99[sv, k] "," get($0, "lock_p99_us")
	if (!(k in seen)) { seen[k] = 1; order[++n] = k }
}
END {
	printf "medians of the runs in load.txt\n"
	printf "%-18s %12s %12s %7s %12s %12s %7s %10s %10s %7s\n", "shape", "nlmd pairs/s", "ganesha", "ratio", "nlmd us/call", "ganesha", "ratio", "nlmd p99", "ganesha", "ratio"
	for (i = 1; i <= n; i++) {
		k = order[i]
		if (!(("nlmd", k) in pairs) || !(("ganesha", k) in pairs)) continue
		pa = median(pairs["nlmd", k]); pb = median(pairs["ganesha", k])
		ca = median(cpu["nlmd", k]); cb = median(cpu["ganesha", k])
		la = median(p99["nlmd", k]); lb = median(p99["ganesha", k])
		printf "%-18s %12.0f %12.0f %6.2fx %12.2f %12.2f %6.2fx %10.0f %10.0f %6.2fx\n", k, pa, pb, pa / pb, ca, cb, ca / cb, la, lb, la / lb
	}
}' "$OUT/load.txt" | tee -a "$OUT/summary.txt"
