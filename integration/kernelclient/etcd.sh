# nlmvm-desc: two nlmd nodes on etcd, two virtual servers: c1 mounts through node 1's address, c2 remounts the same export through node 2's; c1's write lock makes c2's F_SETLK fail (EAGAIN) and F_GETLK report it across nodes; c2's F_SETLKW blocks and is granted (GRANTED from node 2's address) when c1 unlocks through node 1; then c1 locks again and node 1 is killed: node 2 takes c1's address over, c1's kernel reclaims there, c2 never gets the lock meanwhile, and no guest logs a lost lock
# nlmvm-server: ganesha-nonlm
# nlmvm-vms: 2
# nlmvm-timeout: 500
#
# Both guests run this script ($ROLE 1 or 2). The server side is
# etcdnodes-server.sh; hostcall kill-node1 goes to etcdnodes-hook.sh.
# Guest sync: port 5000 -> c1's shell, 5001 -> c2's shell, 5002/5003 -> c1's holders.
set -u
F=$MNT/etcd.dat
VIP2=${NLMVM_VIP2:-10.77.7.12}
fail=0
ok()  { echo "SCEN-etcd: PASS [c$ROLE] $*"; }
bad() { echo "SCEN-etcd: FAIL [c$ROLE] $*"; fail=1; }
expect_msg() { # PORT TEXT
	out=$(locktest wait-msg "$1" 400); echo "$out"
	case "$out" in *"MSG $2 at="*) return 0 ;; esac
	bad "expected message '$2' on port $1"; return 1
}
send() { locktest send-msg "$PEER" "$1" "$2" 400 || bad "could not send '$2'"; }
field() { sed -n "s/.*$1=\([-0-9.]*\).*/\1/p" | tail -n 1; }
lost() { dmesg | grep -i -E 'lost lock|failed to reclaim|lockd: .*(not responding|reclaim)' ; }
wait_held() { # FILE
	i=0; while ! grep -q 'hold: HELD' "$1" 2>/dev/null; do
		i=$((i + 1)); [ $i -gt 600 ] && { cat "$1"; return 1; }; sleep 0.1
	done
}

if [ "$ROLE" = 1 ]; then
	: >"$F"
	locktest hold "$F" 0 100 w 600 5002 >/tmp/h1.out 2>&1 &
	H=$!
	wait_held /tmp/h1.out && ok "(a) write lock [0,+100) granted through node 1 ($SERVER)" || { bad "(a) no lock"; exit 1; }
	send 5001 c1-holds
	expect_msg 5000 c2-blocking || exit 1
	locktest send-msg 127.0.0.1 5002 release 30
	wait $H; cat /tmp/h1.out
	send 5001 c1-released
	expect_msg 5000 c2-was-granted || exit 1

	# c1 locks again; node 1 dies under it.
	locktest hold "$F" 0 100 w 600 5003 >/tmp/h2.out 2>&1 &
	H2=$!
	wait_held /tmp/h2.out && ok "(e) write lock [0,+100) granted again through node 1" || { bad "(e) no lock"; exit 1; }
	send 5001 c1-holds-again
	expect_msg 5000 c2-checked-before || exit 1
	out=$(hostcall kill-node1); rc=$?
	echo "$out"
	[ $rc -eq 0 ] && ok "(f) node 1 killed, node 2 took $SERVER over: $(echo "$out" | tail -n 1)" || bad "(f) kill-node1 rc=$rc"
	t_kill=$(echo "$out" | field at)
	send 5001 node1-dead
	expect_msg 5000 c2-checked-after || exit 1
	out=$(hostcall wire "stat.procedure_v1 == 6 && rpc.msgtyp == 0 && ip.src == $SERVER && ip.dst == $MYIP")
	n=$(echo "$out" | field matches)
	[ "${n:-0}" -ge 1 ] && ok "(g) SM_NOTIFY from $SERVER to c1 after node 1 died" || bad "(g) no SM_NOTIFY to c1: $out"
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 0 && nlm.reclaim == 1 && ip.src == $MYIP")
	n=$(echo "$out" | field matches); t_recl=$(echo "$out" | field first)
	[ "${n:-0}" -ge 1 ] && ok "(g) c1's kernel reclaimed through $SERVER on node 2 (LOCK reclaim=1)" || bad "(g) no reclaim from c1: $out"
	out=$(hostcall wire "nlm.procedure_v4 == 2 && rpc.msgtyp == 1 && nlm.stat == 0 && ip.dst == $MYIP")
	t_ok=$(echo "$out" | field last)
	if [ -n "${t_ok:-}" ] && [ -n "${t_recl:-}" ] && awk "BEGIN{exit !($t_ok >= $t_recl)}"; then
		ok "(g) reclaim granted"
	else bad "(g) no GRANTED reply to the reclaim"; fi
	echo "SCEN-etcd: TIMING kill->reclaim_granted=$(awk "BEGIN{printf \"%.2f\", ${t_ok:-0} - ${t_kill:-0}}")s"
	hostcall cluster
	locktest send-msg 127.0.0.1 5003 release 30
	wait $H2; rc=$?
	cat /tmp/h2.out
	grep -q 'F_SETLK UNLCK.*-> OK' /tmp/h2.out && [ $rc -eq 0 ] && ok "(h) c1 unlocked through node 2" || bad "(h) c1 unlock (rc=$rc)"
	send 5001 c1-done
	expect_msg 5000 c2-done || exit 1
else
	# c2 uses the other virtual server: the same export through node 2.
	src=$(awk '$2 == "/mnt/nfs" {print $1}' /proc/mounts)
	umount /mnt/nfs
	if mount.nfs "$VIP2:${src#*:}" /mnt/nfs -o "vers=3,proto=tcp,mountproto=tcp"; then
		ok "(0) remounted ${src#*:} through $VIP2 (node 2)"
	else bad "(0) mount through $VIP2 failed"; exit 1; fi
	grep ' /mnt/nfs ' /proc/mounts
	expect_msg 5001 c1-holds || exit 1
	locktest setlk "$F" 0 100 w; rc=$?
	[ $rc -eq 11 ] && ok "(b) F_SETLK through node 2 fails with EAGAIN: c1's lock through node 1 conflicts" || bad "(b) F_SETLK rc=$rc (want 11)"
	out=$(locktest getlk "$F" 50 10 w); rc=$?; echo "$out"
	[ $rc -eq 10 ] && echo "$out" | grep -q 'holder WRLCK \[0,+100)' && ok "(b) F_GETLK through node 2 reports c1's lock" || bad "(b) F_GETLK rc=$rc"
	locktest setlkw "$F" 0 100 w >/tmp/w.out 2>&1 &
	W=$!
	sleep 2
	if kill -0 $W 2>/dev/null; then ok "(c) F_SETLKW blocks"; else cat /tmp/w.out; bad "(c) F_SETLKW did not block"; fi
	send 5000 c2-blocking
	expect_msg 5001 c1-released || exit 1
	i=0; while kill -0 $W 2>/dev/null; do i=$((i + 1)); [ $i -gt 300 ] && break; sleep 0.1; done
	wait $W; rc=$?; cat /tmp/w.out
	[ $rc -eq 0 ] && ok "(d) F_SETLKW granted once c1 unlocked through node 1" || bad "(d) F_SETLKW rc=$rc"
	out=$(hostcall wire "nlm.procedure_v4 == 5 && rpc.msgtyp == 0 && ip.src == $VIP2 && ip.dst == $MYIP")
	n=$(echo "$out" | field matches)
	[ "${n:-0}" -ge 1 ] && ok "(d) GRANTED callback from node 2's address $VIP2" || bad "(d) no GRANTED from $VIP2: $out"
	send 5000 c2-was-granted
	expect_msg 5001 c1-holds-again || exit 1
	locktest setlk "$F" 0 100 w; rc=$?
	[ $rc -eq 11 ] && ok "(e) F_SETLK fails again while c1 holds" || bad "(e) F_SETLK rc=$rc"
	send 5000 c2-checked-before
	expect_msg 5001 node1-dead || exit 1
	# While c1 reclaims (and after), c2 never gets the lock.
	got=0
	for i in $(seq 1 20); do
		locktest setlk "$F" 0 100 w >/dev/null 2>&1; rc=$?
		[ $rc -eq 0 ] && { got=1; break; }
		sleep 0.5
	done
	[ $got -eq 0 ] && ok "(f) c2's F_SETLK kept failing for 10 s after node 1 died" || bad "(f) c2 got the lock after node 1 died: c1's lock was lost"
	send 5000 c2-checked-after
	expect_msg 5001 c1-done || exit 1
	locktest setlk "$F" 0 100 w; rc=$?
	[ $rc -eq 0 ] && ok "(i) c2 locks once c1 released" || bad "(i) c2 F_SETLK rc=$rc"
	send 5000 c2-done
fi
msgs=$(lost)
[ -z "$msgs" ] && ok "no lost-lock message in the kernel log" || bad "kernel log: $msgs"
exit $fail
