#!/usr/bin/env bash
# make bench: the Go benchmarks, then load runs against nlmd and against the
# NFS-Ganesha baseline, side by side on this machine, each server in a
# private network and mount namespace of its own; then every figure next
# to the one recorded in bench/baseline.tsv.
#
#   scripts/bench.sh            everything (needs root for the namespaces)
#   COUNT=5 DURATION=10 REPEAT=3 scripts/bench.sh   (summary: medians)
#   SKIP_GO=1 / SKIP_LOAD=1 / SKIP_NOTIFY=1 / SKIP_FAILOVER=1 / SKIP_RECLAIM=1 / SKIP_ETCD=1
#                               leave out a part
#   NOTIFY_CLIENTS=1000,10000,100000   client counts of the SM_NOTIFY fan-out
#   SM_NOTIFY_MAX=10000         also time sm-notify with 10 000 clients (minutes)
#   RECLAIM_CLIENTS="1000 10000 100000"   client counts of the reclaim runs
#   BENCH_RECORD=1              record this run's figures as the baseline
#   BENCH_TOLERANCE=1.5         how far a figure may move the bad way before
#                               it is flagged; BENCH_STRICT=1 fails on one
#   scripts/bench.sh --compare  the last run's figures against the baseline
#   scripts/bench.sh --record   record the last run's figures (make bench-baseline)
#
# Results go to cache/bench/: go.txt (benchmarks), nlmbench.txt, load.txt
# (nlmload RESULT lines plus each server's CPU), notify.txt (fan-out),
# failover.txt (moves), reclaim.txt (reclaims by client count),
# summary.txt, figures.tsv (name, unit, value, better: what is compared
# and recorded) and compare.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${BENCH_OUT:-$ROOT/cache/bench}
BASELINE=${BENCH_BASELINE:-$ROOT/bench/baseline.tsv}
FIG=$OUT/figures.tsv
TOOLS=${NLMHA_SHARED_TOOLS:-$(cd .. && pwd)/shared/tools}
NLMPEER=$TOOLS/nlmpeer
DURATION=${DURATION:-10}
COUNT=${COUNT:-5}
REPEAT=${REPEAT:-1}
HZ=$(getconf CLK_TCK)
# get(line, key): a key=value field of a RESULT line; median(",a,b,c");
# fig(name, unit, value, better): one figure into figures.tsv.
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
function fig(name, unit, value, better) {
	if (value != "") printf "%s\t%s\t%s\t%s\n", name, unit, value, better >> FIG
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
	bin/nlmbench notify --clients "${NOTIFY_CLIENTS:-1000,10000,100000}" --repeat "$REPEAT" --sm-notify-max "${SM_NOTIFY_MAX:-1000}"
}

# Moves of a virtual server between two nlmd (1 000 clients holding a lock
# each): the time a new lock through the address cannot be granted. The
# state directory is on tmpfs, as for the fan-out.
inner_failover() {
	private_net
	mount -t tmpfs tmpfs /tmp
	bin/nlmbench failover --clients 1000 --rounds "$((REPEAT * 3))"
}

# Unplanned moves only, with more and more clients: what each reclaim
# costs. --grace-quiet 1s: the probe is a notified client that reclaims
# nothing, so each grace period lasts at least that long.
inner_reclaim() {
	private_net
	mount -t tmpfs tmpfs /tmp
	local n
	for n in ${RECLAIM_CLIENTS:-1000 10000 100000}; do
		bin/nlmbench failover --clients "$n" --moves unplanned --rounds "$REPEAT" --grace-quiet 1s
	done
}

# etcd_members N DIR: N etcd members (processes) on 127.0.0.1, data on
# disk under DIR (etcd's fsync is part of what is measured); prints their
# client URLs, comma-separated.
etcd_members() {
	local n=$1 dir=$2 i initial="" urls=""
	for i in $(seq 1 "$n"); do
		initial="$initial${initial:+,}m$i=http://127.0.0.1:$((23800 + 2 * i))"
		urls="$urls${urls:+,}http://127.0.0.1:$((23799 + 2 * i))"
	done
	for i in $(seq 1 "$n"); do
		bin/etcd-server --name "m$i" --data-dir "$dir/m$i" \
			--listen-client-urls "http://127.0.0.1:$((23799 + 2 * i))" --advertise-client-urls "http://127.0.0.1:$((23799 + 2 * i))" \
			--listen-peer-urls "http://127.0.0.1:$((23800 + 2 * i))" --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + 2 * i))" \
			--initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token bench \
			--auto-compaction-mode periodic --auto-compaction-retention 5m --log-level error --log-outputs stderr \
			</dev/null >>"$dir/etcd.log" 2>&1 &
	done
	for _ in $(seq 1 100); do
		bin/nlmbench etcd --endpoints "$urls" --clients 1 --duration 10ms >/dev/null 2>&1 && break
		sleep 0.2
	done
	echo "$urls"
}

wait_sock() { # PATH
	for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done
	echo "$1 never appeared" >&2
	return 1
}

# etcd_pair LABEL NLMD_PID ETCD_URLS: for 16 and 64 connections, the
# ceiling etcd sets (guarded one-key transactions, halved) and nlmd's
# uncontended LOCK+UNLOCK pairs on it, with its etcd writes per operation.
etcd_pair() {
	local label=$1 urls=$3 c r
	for r in $(seq 1 "$REPEAT"); do
		for c in 16 64; do
			bin/nlmbench etcd --endpoints "$urls" --clients "$c" --duration "${DURATION}s" --label "$label" | tee -a "$OUT/etcd.txt"
			bin/nlmbench --server 127.0.0.1 --port 4045 --clients "$c" --duration "${DURATION}s" --metrics http://127.0.0.1:9101/metrics |
				grep '^RESULT' | sed "s/^RESULT /RESULT nlmd=$label /" | tee -a "$OUT/etcd.txt"
		done
	done
}

inner_etcd() {
	private_net
	local dir urls n1 n2
	dir=$(mktemp -d -p "$OUT" etcd.XXXXXX)
	: >"$OUT/etcd.txt"
	# One member, embedded in nlmd.
	bin/nlmd --backend etcd --etcd-embedded "$dir/embedded" --etcd-embedded-listen http://127.0.0.1:23790 --node-name bench \
		--listen 127.0.0.1 --rpcbind none --state-dir "$dir/state0" --control-socket "$dir/s0" --metrics-listen 127.0.0.1:9101 \
		--vip 127.0.0.1 --log-level warn &
	n1=$!
	wait_sock "$dir/s0"
	etcd_pair embedded "$n1" http://127.0.0.1:23790
	kill "$n1"
	wait "$n1" || true
	# Three members, separate processes; nlmd a client of them.
	urls=$(etcd_members 3 "$dir")
	bin/nlmd --backend etcd --etcd-endpoints "$urls" --etcd-prefix /bench/ --node-name bench --listen 127.0.0.1 --rpcbind none \
		--state-dir "$dir/state1" --control-socket "$dir/s1" --metrics-listen 127.0.0.1:9101 --vip 127.0.0.1 --log-level warn &
	n1=$!
	wait_sock "$dir/s1"
	etcd_pair three "$n1" "$urls"
	kill "$n1"
	wait "$n1" || true
	# Cross-node handoff: two nodes, a virtual server each.
	local common=(--backend etcd --etcd-endpoints "$urls" --etcd-prefix /handoff/ --listen-mode vip --rpcbind none
		--state-dir "$dir/state2" --log-level warn --serve-unknown=false)
	bin/nlmd "${common[@]}" --node-name h1 --control-socket "$dir/h1" --vip 127.0.0.11 &
	n1=$!
	bin/nlmd "${common[@]}" --node-name h2 --control-socket "$dir/h2" --vip 127.0.0.12 &
	n2=$!
	wait_sock "$dir/h1"
	wait_sock "$dir/h2"
	sleep 0.5
	bin/nlmbench handoff --a 127.0.0.11 --b 127.0.0.12 --rounds $((200 * REPEAT)) | tee -a "$OUT/etcd.txt"
	kill "$n1" "$n2"
	wait "$n1" "$n2" || true
	# Unplanned takeover with 1 000 clients holding locks.
	bin/nlmbench failover --etcd "$urls" --clients 1000 --moves unplanned --rounds "$REPEAT" --grace-quiet 1s | tee -a "$OUT/etcd.txt"
	pkill -f bin/etcd-server || true
	wait || true
	rm -rf "$dir"
}

# The baseline's figures, for awk: base[name] = value, when[name] = "date
# commit", border[1..nb] = names in the file's order.
BASELIB='
function readbase(file,   line, f) {
	while ((getline line < file) > 0) {
		if (line ~ /^#/) continue
		split(line, f, "\t")
		if (f[1] == "name") continue
		base[f[1]] = f[3]; when[f[1]] = f[5] " " f[6]; row[f[1]] = line; border[++nb] = f[1]
	}
}
'

# compare: every figure of the run next to its baseline, flagging those
# that moved the bad way by more than the tolerance.
compare() {
	[ -s "$FIG" ] || { echo "no figures in $FIG: run make bench first" >&2; return 1; }
	[ -f "$BASELINE" ] || echo "no baseline at $BASELINE yet: make bench-baseline records one"
	awk -F '\t' -v tol="${BENCH_TOLERANCE:-1.5}" -v file="$BASELINE" -v out="$OUT/regressions" "$BASELIB"'
	function num(v) { return v >= 1000 || v <= -1000 ? sprintf("%.0f", v) : v >= 10 || v <= -10 ? sprintf("%.1f", v) : sprintf("%.3g", v) }
	BEGIN {
		readbase(file)
		printf "%-56s %-4s %11s %11s %8s\n", "figure", "unit", "baseline", "now", "now/base"
	}
	!($1 in base) { printf "%-56s %-4s %11s %11s %8s  (new)\n", $1, $2, "-", num($3), ""; next }
	{
		r = base[$1] == 0 ? 1 : $3 / base[$1]
		flag = ""
		if (($4 == "lower" && r > tol) || ($4 == "higher" && r < 1 / tol)) {
			flag = "  REGRESSION (" $4 " is better; baseline of " when[$1] ")"; nbad++
		} else if (($4 == "lower" && r < 1 / tol) || ($4 == "higher" && r > tol)) flag = "  better"
		printf "%-56s %-4s %11s %11s %7.2fx%s\n", $1, $2, num(base[$1]), num($3), r, flag
	}
	END {
		printf "%d figure(s) moved the bad way by more than %sx\n", nbad, tol
		print nbad + 0 > out
	}' "$FIG" | tee "$OUT/compare.txt"
	if [ -n "${BENCH_STRICT:-}" ] && [ "$(cat "$OUT/regressions")" -gt 0 ]; then
		return 1
	fi
}

# record: the run's figures become the baseline of their names, stamped
# with the date and commit; figures this run did not measure keep theirs.
record() {
	[ -s "$FIG" ] || { echo "no figures in $FIG: run make bench first" >&2; return 1; }
	local commit tmp
	commit=$(git -C "$ROOT" rev-parse --short HEAD)
	[ -z "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
	mkdir -p "$(dirname "$BASELINE")"
	tmp=$(mktemp "$BASELINE.XXXXXX")
	awk -F '\t' -v OFS='\t' -v file="$BASELINE" -v date="$(date -u +%Y-%m-%d)" -v commit="$commit" \
		-v setup="$(cat "$OUT/setup.txt" 2>/dev/null)" "$BASELIB"'
	BEGIN { readbase(file) }
	{ now[$1] = $1 OFS $2 OFS $3 OFS $4 OFS date OFS commit; order[++n] = $1 }
	END {
		print "# The figures of make bench that each run is compared with (scripts/bench.sh)."
		print "# better: the good direction. recorded, commit: when each was measured; the last"
		print "# recording ran with " setup "."
		print "# Record anew: make bench-baseline (the last run) or BENCH_RECORD=1 make bench."
		print "name", "unit", "value", "better", "recorded", "commit"
		# in the order of the file, this run replacing what it measured; then the new names
		for (i = 1; i <= nb; i++) print ((border[i] in now) ? now[border[i]] : row[border[i]])
		for (i = 1; i <= n; i++) if (!(order[i] in base)) print now[order[i]]
	}' "$FIG" >"$tmp"
	mv "$tmp" "$BASELINE"
	echo "recorded $(wc -l <"$FIG") figures in $BASELINE at $commit"
}

case ${1:-} in
--inner-nlmd) inner_nlmd; exit ;;
--inner-ganesha) inner_ganesha; exit ;;
--inner-notify) inner_notify; exit ;;
--inner-failover) inner_failover; exit ;;
--inner-reclaim) inner_reclaim; exit ;;
--inner-etcd) inner_etcd; exit ;;
--compare) compare; exit ;;
--record) record; exit ;;
esac

mkdir -p "$OUT"
: >"$FIG"
echo "$(nproc) CPUs; REPEAT=$REPEAT COUNT=$COUNT DURATION=$DURATION" >"$OUT/setup.txt"
: >"$OUT/summary.txt"
if [ -z "${SKIP_GO:-}" ]; then
	echo "== Go benchmarks (-count $COUNT)"
	go test -run '^$' -bench . -benchmem -count "$COUNT" -timeout 60m ./... | tee "$OUT/go.txt"
	# ns/op of every benchmark (median of the counts), by package.
	awk -v FIG="$FIG" "$AWKLIB"'
	/^pkg: / { pkg = $2; sub(/^github.com\/nlmha\/nlmha\//, "", pkg) }
	/^Benchmark/ {
		name = $1; sub(/^Benchmark/, "", name); sub(/-[0-9]+$/, "", name)
		for (i = 3; i < NF; i++) if ($(i + 1) == "ns/op") {
			k = "go." pkg "." name ".ns_op"
			if (!(k in v)) order[++n] = k
			v[k] = v[k] "," $i
		}
	}
	END { for (i = 1; i <= n; i++) fig(order[i], "ns", median(v[order[i]]), "lower") }' "$OUT/go.txt"
fi
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo --preserve-env=NLMHA_SHARED_TOOLS,DURATION,REPEAT,BENCH_OUT,SM_NOTIFY_MAX,NOTIFY_CLIENTS,RECLAIM_CLIENTS env "PATH=$PATH")
go build -o bin/ ./cmd/...
go build -o bin/etcd-server ./internal/etcdtest/etcdserver
if [ -z "${SKIP_NOTIFY:-}" ]; then
	echo "== SM_NOTIFY fan-out: nlmd and sm-notify to simulated client statds"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-notify | tee "$OUT/notify.txt"
	awk -v FIG="$FIG" "$AWKLIB"'
	/^RESULT/ && get($0, "finished") != "false" {
		k = get($0, "notifier") " " get($0, "clients")
		secs[k] = secs[k] "," get($0, "seconds")
		first[k] = first[k] "," get($0, "first_ms")
		if (get($0, "max_rss_kb") != "") rss[k] = rss[k] "," get($0, "max_rss_kb")
		if (get($0, "nlmd_cpu_ms") != "") cpu[k] = cpu[k] "," get($0, "nlmd_cpu_ms")
		if (get($0, "peers_cpu_ms") != "") peers[k] = peers[k] "," get($0, "peers_cpu_ms")
		if (get($0, "other_cpu_ms") != "") other[k] = other[k] "," get($0, "other_cpu_ms")
		if (!(k in seen)) { seen[k] = 1; order[++n] = k }
	}
	END {
		# CPU over the run: nlmd, the simulated peers (nlmbench), and the
		# rest of the machine (a disturbed run shows there).
		printf "SM_NOTIFY fan-out (medians of notify.txt)\n%-22s %10s %12s %10s %12s %10s %10s %10s\n", "notifier clients", "seconds", "clients/s", "first ms", "peak RSS kB", "nlmd CPU", "peers CPU", "other CPU"
		for (i = 1; i <= n; i++) {
			k = order[i]; m = median(secs[k]); split(k, p, " ")
			r = k in rss ? median(rss[k]) : ""
			c = k in cpu ? median(cpu[k]) : ""
			printf "%-22s %10.3f %12.0f %10.1f %12s %10s %10s %10s\n", k, m, p[2] / m, median(first[k]), r, c, k in peers ? median(peers[k]) : "", k in other ? median(other[k]) : ""
			name = "notify." p[1] "." p[2]
			fig(name ".seconds", "s", m, "lower")
			fig(name ".first_ms", "ms", median(first[k]), "lower")
			fig(name ".max_rss_kb", "KiB", r, "lower")
			fig(name ".cpu_ms", "ms", c, "lower")
		}
	}' "$OUT/notify.txt" | tee -a "$OUT/summary.txt"
fi
# The RESULT lines of nlmbench failover, as figures under PREFIX: those in
# MS (milliseconds) and the reclaim costs (microseconds).
failover_figures() { # PREFIX FILE MS
	awk -v FIG="$FIG" -v prefix="$1" -v msfig="$3" "$AWKLIB"'
	/^RESULT/ {
		name = prefix "." get($0, "move") "." get($0, "clients")
		n = split(msfig, ms, " ")
		for (i = 1; i <= n; i++) fig(name "." ms[i], "ms", get($0, ms[i]), "lower")
		n = split("reclaim_p50_us reclaim_p99_us reclaim_us_per_client nlmd_cpu_us_per_client", us, " ")
		for (i = 1; i <= n; i++) fig(name "." us[i], "us", get($0, us[i]), "lower")
	}' "$2"
}
if [ -z "${SKIP_FAILOVER:-}" ]; then
	echo "== virtual server moves between two nlmd (1 000 clients)"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-failover | tee "$OUT/failover.txt"
	{ echo "virtual server moves (medians)"; grep '^RESULT' "$OUT/failover.txt"; } | tee -a "$OUT/summary.txt"
	failover_figures failover "$OUT/failover.txt" "gap_ms release_ms takeover_ms notified_all_ms reclaimed_all_ms grace_over_ms"
fi
if [ -z "${SKIP_RECLAIM:-}" ]; then
	echo "== reclaims after unplanned moves, by client count (${RECLAIM_CLIENTS:-1000 10000 100000})"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-reclaim | tee "$OUT/reclaim.txt"
	awk "$AWKLIB"'
	/^RESULT/ {
		if (!n++) printf "reclaims after an unplanned move (medians of the rounds)\n%8s %13s %13s %9s %9s %14s %15s\n", "clients", "notified ms", "reclaimed ms", "p50 us", "p99 us", "phase us/cl.", "nlmd CPU us/cl."
		printf "%8d %13.1f %13.1f %9.0f %9.0f %14.1f %15.1f\n", get($0, "clients"), get($0, "notified_all_ms"), get($0, "reclaimed_all_ms"),
			get($0, "reclaim_p50_us"), get($0, "reclaim_p99_us"), get($0, "reclaim_us_per_client"), get($0, "nlmd_cpu_us_per_client")
	}' "$OUT/reclaim.txt" | tee -a "$OUT/summary.txt"
	# (the grace period's end is --grace-quiet after the last reclaim: the
	# probe reclaims nothing)
	failover_figures reclaim "$OUT/reclaim.txt" "notified_all_ms reclaimed_all_ms"
fi
if [ -z "${SKIP_ETCD:-}" ]; then
	echo "== the etcd backend: nlmd against the ceiling etcd sets, handoff across nodes, unplanned takeover"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-etcd
	awk -v FIG="$FIG" "$AWKLIB"'
	/^RESULT etcd=/ { k = get($0, "etcd") " " get($0, "clients"); ceil[k] = ceil[k] "," get($0, "ceiling_pairs_per_s"); if (!(k in seen)) { seen[k] = 1; order[++n] = k } }
	/^RESULT nlmd=/ {
		k = get($0, "nlmd") " " get($0, "clients")
		if (get($0, "txn_per_op") != "") wr[k] = wr[k] "," get($0, "txn_per_op")
		else { pairs[k] = pairs[k] "," get($0, "pairs_per_s"); p99[k] = p99[k] "," get($0, "lock_p99_us") }
	}
	/^RESULT handoff/ { h50 = get($0, "p50_ms"); h99 = get($0, "p99_ms") }
	/^RESULT move=unplanned/ { fg = get($0, "first_grant_ms"); go_ = get($0, "grace_over_ms"); lw = get($0, "lease_wait_ms") }
	END {
		printf "etcd backend (medians): uncontended LOCK+UNLOCK through nlmd against the ceiling etcd sets (guarded one-key transactions, halved)\n"
		printf "%-16s %14s %14s %8s %12s %14s\n", "cluster conns", "nlmd pairs/s", "ceiling", "share", "writes/op", "lock p99 us"
		for (i = 1; i <= n; i++) {
			k = order[i]; split(k, p, " ")
			c = median(ceil[k]); a = median(pairs[k]); w = median(wr[k]); l = median(p99[k])
			printf "%-16s %14.0f %14.0f %7.0f%% %12.3f %14.0f\n", k, a, c, 100 * a / c, w, l
			name = "etcd." p[1] "." p[2]
			fig(name ".nlmd.pairs_per_s", "1/s", a, "higher")
			fig(name ".ceiling_pairs_per_s", "1/s", c, "higher")
			fig(name ".share_of_ceiling", "x", sprintf("%.3f", a / c), "higher")
			fig(name ".writes_per_op", "x", w, "lower")
		}
		printf "cross-node handoff (unlock on node 1 -> GRANTED from node 2): p50 %s ms, p99 %s ms\n", h50, h99
		printf "unplanned takeover, 1000 clients: first non-conflicting lock %s ms after the takeover, grace over at %s ms (lease wait %s ms)\n", fg, go_, lw
		fig("etcd.handoff.p50_ms", "ms", h50, "lower"); fig("etcd.handoff.p99_ms", "ms", h99, "lower")
		fig("etcd.unplanned.1000.first_grant_ms", "ms", fg, "lower"); fig("etcd.unplanned.1000.grace_over_ms", "ms", go_, "lower")
	}' "$OUT/etcd.txt" | tee -a "$OUT/summary.txt"
fi
if [ -z "${SKIP_LOAD:-}" ]; then
	[ -x "$NLMPEER/cache/bin/nlmload" ] || "${sudo[@]}" "$NLMPEER/setup.sh"
	: >"$OUT/load.txt"
	: >"$OUT/nlmbench.txt"
	echo "== nlmd (Ganesha serving NFS without NLM, nlmd serving NLM)"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-nlmd
	echo "== NFS-Ganesha 4.3 with its own NLM (the baseline)"
	"${sudo[@]}" unshare --net --mount --propagation private "$0" --inner-ganesha
	awk -v FIG="$FIG" "$AWKLIB"'
	/^RESULT/ {
		name = "nlmbench." get($0, "transport") "." get($0, "mode") "." get($0, "clients")
		fig(name ".pairs_per_s", "1/s", get($0, "pairs_per_s"), "higher")
		fig(name ".lock_p99_us", "us", get($0, "lock_p99_us"), "lower")
	}' "$OUT/nlmbench.txt"

	# Side by side: nlmd against Ganesha for each shape both ran, medians
	# over the repetitions.
	awk -v FIG="$FIG" "$AWKLIB"'
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
			name = "load." k; gsub(/ /, "-", name)
			fig(name ".nlmd.pairs_per_s", "1/s", pa, "higher")
			fig(name ".ganesha.pairs_per_s", "1/s", pb, "higher")
			fig(name ".pairs_vs_ganesha", "x", sprintf("%.3f", pa / pb), "higher")
			fig(name ".nlmd.cpu_us_per_call", "us", ca, "lower")
			fig(name ".ganesha.cpu_us_per_call", "us", cb, "lower")
			fig(name ".cpu_vs_ganesha", "x", sprintf("%.3f", ca / cb), "lower")
			fig(name ".nlmd.lock_p99_us", "us", la, "lower")
		}
	}' "$OUT/load.txt" | tee -a "$OUT/summary.txt"
fi

echo "== against the baseline ($BASELINE)"
compare
[ -z "${BENCH_RECORD:-}" ] || record
