package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

const nsmPort = 32765

var vip3 = netip.MustParseAddr("127.0.0.3")

// nlmTo returns an NLM v4 client calling the virtual server to from the
// address from.
func nlmTo(t *testing.T, from, to netip.Addr, tr sunrpc.Transport) *nlm.Client {
	t.Helper()
	c, err := sunrpc.Dial(context.Background(), tr, netip.AddrPortFrom(to, nlmPort), sunrpc.ClientOptions{Local: from, Retransmit: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return nlm.NewClient(c, nlm.Vers4)
}

// nsmCall makes one NSM call to the virtual server to from the address from.
func nsmCall(t *testing.T, from, to netip.Addr, proc uint32, args []byte) []byte {
	t.Helper()
	c, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(to, nsmPort), sunrpc.ClientOptions{Local: from, Retransmit: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := c.Call(ctx, nsm.Prog, nsm.Vers, proc, args)
	if err != nil {
		t.Fatalf("NSM proc %d to %v: %v", proc, to, err)
	}
	return res
}

func nsmState(t *testing.T, to netip.Addr) int32 {
	t.Helper()
	var r nsm.StatRes
	r.Decode(xdr.NewDecoder(nsmCall(t, loopback, to, nsm.ProcStat, xdr.AppendString(nil, "localhost"))))
	return r.State
}

func lockAs(t *testing.T, c *nlm.Client, caller string, svid int32, fh string, want nlm.Stat) {
	t.Helper()
	l := nlm.Lock{CallerName: []byte(caller), FH: []byte(fh), OH: []byte(caller), SVID: svid, Len: 1}
	r := call(t, func(ctx context.Context) (nlm.Res, error) {
		return c.Lock(ctx, &nlm.LockArgs{Cookie: []byte("c"), Exclusive: true, Lock: l, State: 1})
	})
	if r.Stat != want {
		t.Fatalf("LOCK %s on %s: %v, want %v", caller, fh, r.Stat, want)
	}
}

// reclaimAs reclaims the lock lockAs takes.
func reclaimAs(t *testing.T, c *nlm.Client, caller string, svid int32, fh string) nlm.Stat {
	t.Helper()
	l := nlm.Lock{CallerName: []byte(caller), FH: []byte(fh), OH: []byte(caller), SVID: svid, Len: 1}
	return call(t, func(ctx context.Context) (nlm.Res, error) {
		return c.Lock(ctx, &nlm.LockArgs{Cookie: []byte("c"), Exclusive: true, Reclaim: true, Lock: l, State: 1})
	}).Stat
}

// testUntil repeats TEST for up to 2 s until it answers want (a reboot
// notification is acted on just after its reply), and returns the last
// answer.
func testUntil(t *testing.T, c *nlm.Client, caller, fh string, want nlm.Stat) nlm.Stat {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		st := testAs(t, c, caller, fh)
		if st == want || time.Now().After(deadline) {
			return st
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testAs(t *testing.T, c *nlm.Client, caller, fh string) nlm.Stat {
	t.Helper()
	l := nlm.Lock{CallerName: []byte(caller), FH: []byte(fh), OH: []byte(caller), SVID: 99, Len: 1}
	return call(t, func(ctx context.Context) (nlm.TestRes, error) {
		return c.Test(ctx, &nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: l})
	}).Stat
}

func nlmdArgs(state string, extra ...string) []string {
	return append([]string{"--nlm-port", fmt.Sprint(nlmPort), "--nsm-port", fmt.Sprint(nsmPort), "--state-dir", state, "--log-level", "debug"}, extra...)
}

// simClients simulates the client hosts: a portmapper on port 111 and a
// statd answering for every loopback address (no real rpcbind may run).
func simClients(t *testing.T) *nsmtest.Peers {
	t.Helper()
	peers, err := nsmtest.Start(111)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(peers.Close)
	return peers
}

// waitServing waits until nlmd answers NSM at addr.
func waitServing(t *testing.T, addr netip.Addr) {
	t.Helper()
	waitNull(t, netip.AddrPortFrom(addr, nsmPort), nsm.Prog, nsm.Vers)
}

// Acceptance 1: our notifier reaches a real rpc.statd. The rpc.statd of
// nfs-utils plays the client host (127.0.0.5): a test lock manager
// registers with it by SM_MON, monitoring our virtual server by name, with
// a callback program it serves. The client locks through the virtual
// server; nlmd crashes and restarts; its SM_NOTIFY (from the virtual server's address,
// mon_name = its name) reaches rpc.statd, which calls the test lock manager
// back with the virtual server's new state and the priv it registered.
func TestNotifyReachesRealStatd(t *testing.T) {
	nlmd := binary(t, "nlmd")
	if !inNetns(t, "rpcbind", "rpc.statd") {
		return
	}
	client := netip.MustParseAddr("127.0.0.5")
	startDaemon(t, "rpcbind", "-f", "-w")
	waitPortmapper(t, loopbackPmap)
	statdDir := t.TempDir()
	for _, sub := range []string{"sm", "sm.bak"} { // rpc.statd does not create them
		if err := os.Mkdir(filepath.Join(statdDir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	startDaemon(t, "rpc.statd", "-F", "--no-notify", "-P", statdDir)
	waitRegistered(t, nsm.Prog, nsm.Vers)

	// The client's lock manager: NLM v3 procedure 16 on UDP, registered
	// with the client's rpcbind, as the kernel's lockd is.
	calls := make(chan nsm.Status, 4)
	lockd := &sunrpc.Server{}
	procs := make([]sunrpc.Proc, 17)
	procs[0] = sunrpc.Proc{Name: "NULL", Handler: func(_ context.Context, _ *sunrpc.Request, res []byte) ([]byte, error) { return res, nil }}
	procs[16] = sunrpc.Proc{Name: "SM_NOTIFY", Handler: func(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
		var st nsm.Status
		st.Decode(xdr.NewDecoder(req.Args))
		calls <- st
		return res, nil
	}}
	if err := lockd.Register(sunrpc.Program{Name: "nlockmgr", Prog: nlm.Prog, Vers: 3, Procs: procs}); err != nil {
		t.Fatal(err)
	}
	lport := serveOn(t, lockd, "127.0.0.1", 0)
	reg := &sunrpc.Registrar{Owner: "test"}
	regs := []sunrpc.Registration{{Prog: nlm.Prog, Vers: 3, Transport: sunrpc.UDP, Port: lport}, {Prog: nlm.Prog, Vers: 3, Transport: sunrpc.TCP, Port: lport}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := reg.Register(ctx, regs...); err != nil {
		t.Fatal(err)
	}
	sport := waitRegistered(t, nsm.Prog, nsm.Vers)
	sc, err := sunrpc.Dial(ctx, sunrpc.TCP, netip.AddrPortFrom(loopback, sport), sunrpc.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	mon := nsm.Mon{MonID: nsm.MonID{MonName: vip.String(), MyID: nsm.MyID{MyName: "client5", Prog: nlm.Prog, Vers: 3, Proc: 16}}}
	copy(mon.Priv[:], "kernel-priv-0001")
	res, err := sc.Call(ctx, nsm.Prog, nsm.Vers, nsm.ProcMon, mon.Append(nil))
	if err != nil {
		t.Fatal(err)
	}
	var mr nsm.StatRes
	mr.Decode(xdr.NewDecoder(res))
	if mr.Res != nsm.StatSucc {
		t.Fatalf("rpc.statd refused SM_MON: %+v", mr)
	}

	// nlmd: no rpcbind registration (rpc.statd owns 100024 here, as on the
	// client host), the virtual server 127.0.0.2.
	state := t.TempDir()
	args := nlmdArgs(state, "--vip", vip.String(), "--serve-unknown=false", "--rpcbind", "none")
	p := startDaemon(t, nlmd, args...)
	waitServing(t, vip)
	lockAs(t, nlmTo(t, client, vip, sunrpc.TCP), "client5", 1, "fh-real-statd", nlm.Granted)
	before := nsmState(t, vip)
	p.stop(syscall.SIGKILL, 10*time.Second) // a crash: the state number changes
	startDaemon(t, nlmd, args...)
	select {
	case st := <-calls:
		after := nsmState(t, vip)
		if after != before+2 || st.State != after || st.MonName != vip.String() || st.Priv != mon.Priv {
			t.Fatalf("rpc.statd called back %+v; want mon_name %v, state %d (was %d), priv %q", st, vip, after, before, mon.Priv)
		}
		t.Logf("rpc.statd relayed our SM_NOTIFY: mon_name=%s state=%d priv=%q", st.MonName, st.State, st.Priv)
	case <-time.After(20 * time.Second):
		t.Fatal("rpc.statd never called the client's lock manager back")
	}
}

// Acceptance 2: the real sm-notify, as a rebooted client runs it, reaches
// our statd and nlmd drops that client's locks.
func TestRealSmNotifyDropsLocks(t *testing.T) {
	nlmd := binary(t, "nlmd")
	if !inNetns(t, "rpcbind", "sm-notify") {
		return
	}
	startDaemon(t, "rpcbind", "-f", "-w")
	waitPortmapper(t, loopbackPmap)
	startDaemon(t, nlmd, nlmdArgs(t.TempDir(), "--vip", vip.String())...)
	waitRegistered(t, nsm.Prog, nsm.Vers)
	rebooting, other := netip.MustParseAddr("127.0.0.5"), netip.MustParseAddr("127.0.0.6")
	lockAs(t, nlmTo(t, rebooting, vip, sunrpc.TCP), "client5", 1, "fh-sm-notify", nlm.Granted)
	oc := nlmTo(t, other, vip, sunrpc.TCP)
	if st := testAs(t, oc, "client6", "fh-sm-notify"); st != nlm.Denied {
		t.Fatalf("TEST before the reboot: %v", st)
	}

	// The client's statd directory, as its rpc.statd left it: it monitors
	// our virtual server for its kernel lockd.
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "sm"), 0o700)
	os.MkdirAll(filepath.Join(dir, "sm.bak"), 0o700)
	line := fmt.Sprintf("0100007f 000186b5 00000004 00000010 %032x %s client5\n", 0, vip)
	if err := os.WriteFile(filepath.Join(dir, "sm", vip.String()), []byte(line), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := runCmd(30*time.Second, "sm-notify", "-f", "-d", "-P", dir)
	if err != nil {
		t.Fatalf("sm-notify: %v\n%s", err, out)
	}
	// Acted on after the reply: a moment later.
	if st := testUntil(t, oc, "client6", "fh-sm-notify", nlm.Granted); st != nlm.Granted {
		t.Fatalf("TEST after the client's reboot notification: %v (its lock was not dropped)\nsm-notify: %s", st, out)
	}
	// A second run, same state (-n): a repeated notification changes nothing.
	lockAs(t, nlmTo(t, rebooting, vip, sunrpc.TCP), "client5", 2, "fh-sm-notify", nlm.Granted)
	if out, err := runCmd(30*time.Second, "sm-notify", "-f", "-d", "-n", "-P", dir); err != nil {
		t.Fatalf("sm-notify -n: %v\n%s", err, out)
	}
	if st := testAs(t, oc, "client6", "fh-sm-notify"); st != nlm.Denied {
		t.Fatalf("a repeated notification (same state) dropped the new lock: %v", st)
	}
}

// Acceptance 3: kill -9 in the middle of monitoring many clients. Every
// client whose lock was granted has its record after the crash; after the
// restart the state number went up and every such client is notified.
func TestKill9WhileMonitoring(t *testing.T) {
	nlmd := binary(t, "nlmd")
	if !inNetns(t) {
		return
	}
	peers := simClients(t)
	state := t.TempDir()
	args := nlmdArgs(state, "--vip", vip.String(), "--serve-unknown=false", "--rpcbind", "none", "--grace-period", "60s")
	p := startDaemon(t, nlmd, args...)
	waitServing(t, vip)
	before := nsmState(t, vip)

	const clients = 600
	var acked sync.Map // client address → true once its LOCK was GRANTED
	var nacked atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 16 {
		wg.Go(func() {
			for i := w; i < clients; i += 16 {
				select {
				case <-stop:
					return
				default:
				}
				from := netip.AddrFrom4([4]byte{127, 0, 10 + byte(i/200), 1 + byte(i%200)})
				c, err := sunrpc.Dial(context.Background(), sunrpc.TCP, netip.AddrPortFrom(vip, nlmPort), sunrpc.ClientOptions{Local: from})
				if err != nil {
					return // nlmd is gone
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				l := nlm.Lock{CallerName: []byte(fmt.Sprint("c", i)), FH: []byte("fh-kill9"), OH: []byte("o"), SVID: 1, Offset: uint64(i), Len: 1}
				r, err := nlm.NewClient(c, nlm.Vers4).Lock(ctx, &nlm.LockArgs{Cookie: []byte("k"), Exclusive: true, Lock: l})
				cancel()
				c.Close()
				if err == nil && r.Stat == nlm.Granted {
					acked.Store(from, true)
					nacked.Add(1)
				}
			}
		})
	}
	for nacked.Load() < clients/3 {
		time.Sleep(time.Millisecond)
	}
	p.stop(syscall.SIGKILL, 5*time.Second)
	close(stop)
	wg.Wait()
	n := int(nacked.Load())
	t.Logf("nlmd killed after %d of %d clients were granted a lock", n, clients)
	if n == clients {
		t.Fatal("every client finished before the kill: the test proved nothing")
	}

	// On disk: a whole record for every acknowledged client.
	d, err := nsm.OpenDir(state, vip)
	if err != nil {
		t.Fatal(err)
	}
	recs, bad := d.Records()
	if len(bad) > 0 {
		t.Fatalf("damaged records after kill -9: %v", bad)
	}
	have := map[netip.Addr]bool{}
	for _, r := range recs {
		have[r.Addrs[0]] = true
	}
	acked.Range(func(k, _ any) bool {
		if !have[k.(netip.Addr)] {
			t.Errorf("client %v was granted a lock but has no monitor record", k)
		}
		return true
	})

	startDaemon(t, nlmd, args...)
	waitServing(t, vip)
	if after := nsmState(t, vip); after != before+2 {
		t.Fatalf("state after the restart = %d, want %d", after, before+2)
	}
	if err := peers.WaitNotified(len(have), 30*time.Second); err != nil {
		t.Fatalf("%d of %d monitored clients notified", peers.Notified(), len(have))
	}
	notified := map[netip.Addr]bool{}
	for _, nt := range peers.Notifications() {
		if nt.From != netip.AddrPortFrom(vip, nsmPort) || nt.MonName != vip.String() || nt.State != before+2 {
			t.Fatalf("notification %+v", nt)
		}
		notified[nt.To] = true
	}
	acked.Range(func(k, _ any) bool {
		if !notified[k.(netip.Addr)] {
			t.Errorf("client %v held a lock and was not notified", k)
		}
		return true
	})
	for _, sub := range []string{"sm", "notify"} {
		ents, _ := os.ReadDir(filepath.Join(state, vip.String(), sub))
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), ".tmp-") {
				t.Errorf("a temporary file survived the restart: %s/%s", sub, e.Name())
			}
		}
	}
	t.Logf("%d records after the crash (%d acknowledged), all notified with state %d", len(have), n, before+2)
}

// Acceptance 4: two virtual servers keep their clients apart: records land
// under the virtual server each client used, a client's reboot touches
// only that client, and each virtual server notifies only its own clients,
// from its own address, under its own name.
func TestTwoVirtualServers(t *testing.T) {
	nlmd := binary(t, "nlmd")
	if !inNetns(t) {
		return
	}
	peers := simClients(t)
	state := t.TempDir()
	args := nlmdArgs(state, "--vip", vip.String(), "--vip", vip3.String()+"=vip-three", "--serve-unknown=false", "--rpcbind", "none")
	p := startDaemon(t, nlmd, args...)
	waitServing(t, vip)
	a, b, c := netip.MustParseAddr("127.0.1.1"), netip.MustParseAddr("127.0.1.2"), netip.MustParseAddr("127.0.1.3")
	lockAs(t, nlmTo(t, a, vip, sunrpc.TCP), "a", 1, "fh-a", nlm.Granted)
	lockAs(t, nlmTo(t, b, vip3, sunrpc.UDP), "b", 1, "fh-b", nlm.Granted)
	for v, want := range map[netip.Addr]netip.Addr{vip: a, vip3: b} {
		d, _ := nsm.OpenDir(state, v)
		recs, _ := d.Records()
		if len(recs) != 1 || recs[0].Addrs[0] != want {
			t.Fatalf("records of %v: %+v, want only %v", v, recs, want)
		}
	}
	// a reboots: only a's lock goes.
	nsmCall(t, a, vip, nsm.ProcNotify, (&nsm.StatChge{MonName: "a", State: 5}).Append(nil))
	if st := testUntil(t, nlmTo(t, c, vip, sunrpc.TCP), "c", "fh-a", nlm.Granted); st != nlm.Granted {
		t.Fatalf("a's lock after its reboot: TEST %v", st)
	}
	if st := testAs(t, nlmTo(t, c, vip3, sunrpc.TCP), "c", "fh-b"); st != nlm.Denied {
		t.Fatalf("b's lock after a's reboot: TEST %v", st)
	}
	// A crash and restart: each virtual server notifies its own client.
	p.stop(syscall.SIGKILL, 10*time.Second)
	startDaemon(t, nlmd, args...)
	if err := peers.WaitNotified(2, 20*time.Second); err != nil {
		t.Fatalf("notified %d of 2", peers.Notified())
	}
	time.Sleep(200 * time.Millisecond) // room for a stray third
	for _, nt := range peers.Notifications() {
		switch nt.To {
		case a:
			if nt.From.Addr() != vip || nt.MonName != vip.String() {
				t.Errorf("a notified by %v as %q", nt.From, nt.MonName)
			}
		case b:
			if nt.From.Addr() != vip3 || nt.MonName != "vip-three" {
				t.Errorf("b notified by %v as %q", nt.From, nt.MonName)
			}
		default:
			t.Errorf("notification to %v, which monitors nothing here", nt.To)
		}
	}
}

// The fallback: nlmd crashed and stays down; the admin exports the
// virtual server's list and lets nfs-utils' sm-notify notify its clients.
func TestExportForSmNotify(t *testing.T) {
	nlmd, admin := binary(t, "nlmd"), binary(t, "nlmadmin")
	if !inNetns(t, "sm-notify") {
		return
	}
	peers := simClients(t)
	state := t.TempDir()
	p := startDaemon(t, nlmd, nlmdArgs(state, "--vip", vip.String(), "--serve-unknown=false", "--rpcbind", "none")...)
	waitServing(t, vip)
	clients := []netip.Addr{netip.MustParseAddr("127.0.1.1"), netip.MustParseAddr("127.0.1.2")}
	for i, c := range clients {
		lockAs(t, nlmTo(t, c, vip, sunrpc.TCP), fmt.Sprint("c", i), 1, fmt.Sprint("fh-export-", i), nlm.Granted)
	}
	want := nsmState(t, vip)
	p.stop(syscall.SIGKILL, 5*time.Second)
	dir := t.TempDir()
	if out, err := runCmd(10*time.Second, admin, "--state-dir", state, "export-sm", vip.String(), dir); err != nil || !strings.Contains(out, "exported 2 records") {
		t.Fatalf("nlmadmin export-sm: %v\n%s", err, out)
	}
	if out, err := runCmd(60*time.Second, "sm-notify", "-f", "-d", "-n", "-P", dir); err != nil {
		t.Fatalf("sm-notify: %v\n%s", err, out)
	}
	if err := peers.WaitNotified(2, 10*time.Second); err != nil {
		t.Fatalf("sm-notify notified %d of 2 clients", peers.Notified())
	}
	// sm-notify takes a my_name with a dot for a domain name and, once a
	// host answered, sends its "unqualified" form too ("127"): harmless, a
	// client's statd matches nothing to it. The real one must be there.
	got := map[netip.Addr]bool{}
	for _, nt := range peers.Notifications() {
		if nt.MonName == vip.String() && nt.State == want {
			got[nt.To] = true
		}
	}
	for _, c := range clients {
		if !got[c] {
			t.Fatalf("sm-notify did not tell %v mon_name %v state %d: %+v", c, vip, want, peers.Notifications())
		}
	}

	// sm-notify -v VIP sends from the virtual server's address; it wants
	// a reverse name for it, which a private /etc/hosts provides here.
	hosts := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(hosts, []byte("127.0.0.1 localhost\n127.0.0.2 vip-two\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(hosts, "/etc/hosts", "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount("/etc/hosts", 0)
	peers.Reset()
	dir = t.TempDir() // sm-notify removed what it notified: export again
	if out, err := runCmd(10*time.Second, admin, "--state-dir", state, "export-sm", vip.String(), dir); err != nil {
		t.Fatalf("nlmadmin export-sm: %v\n%s", err, out)
	}
	out, err := runCmd(60*time.Second, "sm-notify", "-f", "-d", "-n", "-P", dir, "-v", vip.String())
	if err != nil {
		t.Fatalf("sm-notify -v: %v\n%s", err, out)
	}
	if err := peers.WaitNotified(2, 10*time.Second); err != nil {
		t.Fatalf("sm-notify -v notified %d of 2 clients:\n%s", peers.Notified(), out)
	}
	for _, nt := range peers.Notifications() {
		if nt.From.Addr() != vip || nt.State != want {
			t.Fatalf("sm-notify -v sent %+v; want it from %v with state %d", nt, vip, want)
		}
	}
}
