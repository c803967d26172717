# nlmvm-desc: nlmd crashes (kill -9) and starts again while c1 holds W[0,100): nlmd itself sends SM_NOTIFY from the server address, c1's kernel reclaims during nlmd's grace (NLM LOCK reclaim=1 on the wire), c2 still cannot take the lock, then can once c1 releases
# nlmvm-server: ganesha-nonlm
# nlmvm-vms: 2
# nlmvm-timeout: 400
#
# Both guests run this script ($ROLE 1 or 2). nlmd provides NLM and NSM
# (run with SERVER_STATD=0 and a --grace-period); hostcall restart-nlm KILL
# kills its process group and starts it again with the same state directory.
# Guest sync: port 5000 -> c1's shell, 5001 -> c2's shell, 5002 -> c1's holder.
set -u
F=$MNT/restart.dat
fail=0
ok()  { echo "SCEN-restart: PASS [c$ROLE] $*"; }
bad() { echo "SCEN-restart: FAIL [c$ROLE] $*"; fail=1; }
expect_msg() { # PORT TEXT
	out=$(locktest wait-msg "$1" 300); echo "$out"
	case "$out" in *"MSG $2 at="*) return 0 ;; esac
	bad "expected message '$2' on port $1"; return 1
}
send() { locktest send-msg "$PEER" "$1" "$2" 300 || bad "could not send '$2'"; }
field() { sed -n "s/.*$1=\([-0-9.]*\).*/\1/p" | tail -n 1; }
since() { awk "BEGIN{printf \"%.3f\", $1 - $2}"; }

if [ "$ROLE" = 1 ]; then
	: >"$F"
	locktest hold "$F" 0 100 w 600 5002 >/tmp/h1.out 2>&1 &
	H=$!
	i=0
	while ! grep -q 'hold: HELD' /tmp/h1.out 2>/dev/null; do
		i=$((i + 1)); [ $i -gt 600 ] && { cat /tmp/h1.out; bad "(a) no lock"; exit 1; }; sleep 0.1
	done
	ok "(a) write lock [0,+100) granted"
	send 5001 c1-holds
	expect_msg 5000 c2-saw-lock || exit 1

	# (r) nlmd crashes and comes back; nobody runs sm-notify on the server.
	out=$(hostcall restart-nlm KILL); rc=$?
	[ $rc -eq 0 ] && ok "(r) restart-nlm KILL: $out" || bad "(r) restart-nlm rc=$rc: $out"
	t_kill=$(echo "$out" | field at); t_start=$(echo "$out" | field started)
	send 5001 restarted
	expect_msg 5000 c2-checked || exit 1

	out=$(hostcall wire "stat.procedure_v1 == 6 && rpc.msgtyp == 0 && ip.src == $SERVER && ip.dst == $MYIP")
	n=$(echo "$out" | field matches); t_notify=$(echo "$out" | field first)
	[ "${n:-0}" -ge 1 ] && ok "(w) SM_NOTIFY from nlmd ($SERVER) to c1 on the wire" || bad "(w) no SM_NOTIFY from $SERVER to c1: $out"
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 0 && nlm.reclaim == 1 && ip.src == $MYIP")
	n=$(echo "$out" | field matches); t_recl=$(echo "$out" | field first)
	[ "${n:-0}" -ge 1 ] && ok "(w) c1's kernel sent NLM LOCK reclaim=1" || bad "(w) no reclaim LOCK from c1: $out"
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 1 && nlm.stat == 0 && ip.dst == $MYIP")
	t_ok=$(echo "$out" | field last)
	if [ -n "${t_ok:-}" ] && [ -n "${t_recl:-}" ] && awk "BEGIN{exit !($t_ok >= $t_recl && $t_recl > ${t_kill:-0})}"; then
		ok "(w) reclaim granted"
	else bad "(w) no GRANTED reply to c1's reclaim (call ${t_recl:-none}, reply ${t_ok:-none})"; fi
	echo "SCEN-restart: TIMING kill->restart=$(since "$t_start" "$t_kill")s restart->notify=$(since "${t_notify:-0}" "$t_start")s notify->reclaim_call=$(since "${t_recl:-0}" "${t_notify:-0}")s kill->reclaim_granted=$(since "${t_ok:-0}" "$t_kill")s"

	locktest send-msg 127.0.0.1 5002 release 30
	wait $H; rc=$?
	cat /tmp/h1.out
	grep -q 'F_SETLK UNLCK.*-> OK' /tmp/h1.out && [ $rc -eq 0 ] && ok "(e) c1 unlocked after the restart" || bad "(e) c1 unlock (rc=$rc)"
	send 5001 c1-released
	expect_msg 5000 c2-done || exit 1
else
	expect_msg 5001 c1-holds || exit 1
	out=$(locktest getlk "$F" 50 10 w); rc=$?; echo "$out"
	[ $rc -eq 10 ] && echo "$out" | grep -q 'holder WRLCK \[0,+100)' && ok "(b) F_GETLK reports c1's lock" || bad "(b) F_GETLK rc=$rc"
	send 5000 c2-saw-lock
	expect_msg 5001 restarted || exit 1
	# In grace the client retries DENIED_GRACE_PERIOD; once grace is over
	# the answer must be a conflict: c1 reclaimed its lock.
	locktest setlk "$F" 0 100 w; rc=$?
	[ $rc -eq 11 ] && ok "(c) after the restart c2's F_SETLK fails with EAGAIN" || bad "(c) c2's F_SETLK rc=$rc (want 11): c1's lock was lost"
	out=$(locktest getlk "$F" 50 10 w); rc=$?; echo "$out"
	[ $rc -eq 10 ] && echo "$out" | grep -q 'holder WRLCK \[0,+100)' && ok "(d) c1 still holds its lock" || bad "(d) F_GETLK after the restart rc=$rc"
	send 5000 c2-checked
	expect_msg 5001 c1-released || exit 1
	locktest setlk "$F" 0 100 w; rc=$?
	[ $rc -eq 0 ] && ok "(e) c2 locks once c1 released" || bad "(e) c2 F_SETLK rc=$rc"
	send 5000 c2-done
fi
exit $fail
