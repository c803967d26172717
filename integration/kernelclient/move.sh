# nlmvm-desc: the server address moves between two nlmd nodes while c1 holds W[0,100): first planned (release + takeover: the lock goes over in a snapshot, no grace, no reclaim), then unplanned (the owning node killed: SM_NOTIFY from the address, c1's kernel reclaims, visible on the wire); each time c2 cannot take the lock, and no guest logs a lost lock
# nlmvm-server: ganesha-nonlm
# nlmvm-vms: 2
# nlmvm-timeout: 400
#
# Both guests run this script ($ROLE 1 or 2). The server side is
# twonodes-server.sh; hostcall move-vip goes to twonodes-hook.sh.
# Guest sync: port 5000 -> c1's shell, 5001 -> c2's shell, 5002 -> c1's holder.
set -u
F=$MNT/move.dat
fail=0
ok()  { echo "SCEN-move: PASS [c$ROLE] $*"; }
bad() { echo "SCEN-move: FAIL [c$ROLE] $*"; fail=1; }
expect_msg() { # PORT TEXT
	out=$(locktest wait-msg "$1" 300); echo "$out"
	case "$out" in *"MSG $2 at="*) return 0 ;; esac
	bad "expected message '$2' on port $1"; return 1
}
send() { locktest send-msg "$PEER" "$1" "$2" 300 || bad "could not send '$2'"; }
field() { sed -n "s/.*$1=\([-0-9.]*\).*/\1/p" | tail -n 1; }
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN{printf \"%.2f\", $1 - $2}"; }
lost() { dmesg | grep -i -E 'lost lock|failed to reclaim|lockd: .*(not responding|reclaim)' ; }

# c2's view: the lock is c1's and cannot be taken.
check_taken() { # WHAT
	t0=$(up)
	locktest setlk "$F" 0 100 w; rc=$?
	t1=$(up)
	[ $rc -eq 11 ] && ok "($1) c2's F_SETLK fails with EAGAIN after $(since "$t1" "$t0") s" || bad "($1) c2's F_SETLK rc=$rc (want 11): c1's lock was lost"
	out=$(locktest getlk "$F" 50 10 w); rc=$?; echo "$out"
	[ $rc -eq 10 ] && echo "$out" | grep -q 'holder WRLCK \[0,+100)' && ok "($1) F_GETLK reports c1's lock" || bad "($1) F_GETLK rc=$rc"
}

if [ "$ROLE" = 1 ]; then
	: >"$F"
	locktest hold "$F" 0 100 w 600 5002 >/tmp/h1.out 2>&1 &
	H=$!
	i=0
	while ! grep -q 'hold: HELD' /tmp/h1.out 2>/dev/null; do
		i=$((i + 1)); [ $i -gt 600 ] && { cat /tmp/h1.out; bad "(a) no lock"; exit 1; }; sleep 0.1
	done
	ok "(a) write lock [0,+100) granted by node 1"
	send 5001 c1-holds
	expect_msg 5000 c2-saw || exit 1

	out=$(hostcall move-vip planned); rc=$?
	[ $rc -eq 0 ] && ok "(p) planned move: $out" || bad "(p) move-vip planned rc=$rc: $out"
	t_planned=$(echo "$out" | field at)
	send 5001 moved-planned
	expect_msg 5000 c2-checked-planned || exit 1
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 0 && nlm.reclaim == 1 && ip.src == $MYIP")
	n=$(echo "$out" | field matches)
	[ "${n:-0}" -eq 0 ] && ok "(p) no reclaim needed after the planned move" || bad "(p) c1 reclaimed after a planned move: $out"

	out=$(hostcall move-vip unplanned); rc=$?
	[ $rc -eq 0 ] && ok "(u) unplanned move: $out" || bad "(u) move-vip unplanned rc=$rc: $out"
	t_kill=$(echo "$out" | field at)
	send 5001 moved-unplanned
	expect_msg 5000 c2-checked-unplanned || exit 1
	out=$(hostcall wire "stat.procedure_v1 == 6 && rpc.msgtyp == 0 && ip.src == $SERVER && ip.dst == $MYIP")
	n=$(echo "$out" | field matches); t_notify=$(echo "$out" | field first)
	[ "${n:-0}" -ge 1 ] && ok "(u) SM_NOTIFY from $SERVER to c1 after the node died" || bad "(u) no SM_NOTIFY to c1: $out"
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 0 && nlm.reclaim == 1 && ip.src == $MYIP")
	n=$(echo "$out" | field matches); t_recl=$(echo "$out" | field first)
	[ "${n:-0}" -ge 1 ] && ok "(u) c1's kernel reclaimed on the new node (LOCK reclaim=1 on the wire)" || bad "(u) no reclaim from c1: $out"
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 1 && nlm.stat == 0 && ip.dst == $MYIP")
	t_ok=$(echo "$out" | field last)
	if [ -n "${t_ok:-}" ] && [ -n "${t_recl:-}" ] && awk "BEGIN{exit !($t_ok >= $t_recl)}"; then
		ok "(u) reclaim granted"
	else bad "(u) no GRANTED reply to the reclaim"; fi
	echo "SCEN-move: TIMING kill->notify=$(since "${t_notify:-0}" "${t_kill:-0}")s notify->reclaim=$(since "${t_recl:-0}" "${t_notify:-0}")s kill->reclaim_granted=$(since "${t_ok:-0}" "${t_kill:-0}")s planned_move_at=$t_planned"

	locktest send-msg 127.0.0.1 5002 release 30
	wait $H; rc=$?
	cat /tmp/h1.out
	grep -q 'F_SETLK UNLCK.*-> OK' /tmp/h1.out && [ $rc -eq 0 ] && ok "(e) c1 unlocked on the new node" || bad "(e) c1 unlock (rc=$rc)"
	send 5001 c1-released
	expect_msg 5000 c2-done || exit 1
else
	expect_msg 5001 c1-holds || exit 1
	out=$(locktest getlk "$F" 50 10 w); rc=$?; echo "$out"
	[ $rc -eq 10 ] && ok "(b) F_GETLK reports c1's lock on node 1" || bad "(b) F_GETLK rc=$rc"
	send 5000 c2-saw
	expect_msg 5001 moved-planned || exit 1
	check_taken p
	send 5000 c2-checked-planned
	expect_msg 5001 moved-unplanned || exit 1
	check_taken u
	send 5000 c2-checked-unplanned
	expect_msg 5001 c1-released || exit 1
	locktest setlk "$F" 0 100 w; rc=$?
	[ $rc -eq 0 ] && ok "(e) c2 locks once c1 released" || bad "(e) c2 F_SETLK rc=$rc"
	send 5000 c2-done
fi
msgs=$(lost)
[ -z "$msgs" ] && ok "no lost-lock message in the kernel log" || bad "kernel log: $msgs"
exit $fail
