package hacallout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

var (
	vipX = netip.MustParseAddr("127.0.0.2")
	vipY = netip.MustParseAddr("127.0.0.3")
)

// node is one nlmd reduced to its parts, on wildcard sockets of its own
// (random ports) on loopback: the lock and status services, a registry
// and the manager. Several nodes share one state directory, as nodes
// share one on a cluster file system.
type node struct {
	t        testing.TB
	reg      *virtualserver.Registry
	backend  *memdlm.Backend
	nlm      *nlm.Service
	nsm      *nsm.Service
	mgr      *Manager
	rpc, nsr *sunrpc.Server
	nlmPort  uint16
	closed   bool
	// the manager's Run
	cancelRun context.CancelFunc
	stopRun   chan struct{}
}

type wild struct{ a, b *sunrpc.Server }

func (w wild) Serve(a netip.Addr) error { w.a.ResumeAddr(a); w.b.ResumeAddr(a); return nil }
func (w wild) Stop(a netip.Addr)        { w.a.StopAddr(a); w.b.StopAddr(a) }

func listenAny(t testing.TB, srv *sunrpc.Server) uint16 {
	t.Helper()
	l, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	pc, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	go srv.ServePacket(pc)
	return port
}

type nodeOpts struct {
	unknown bool
	grace   time.Duration
	quiet   time.Duration
	peers   *nsmtest.Peers
	logName string
	own     virtualserver.Ownership
}

func newNode(t testing.TB, stateDir string, o nodeOpts) *node {
	t.Helper()
	if o.grace == 0 {
		o.grace = time.Minute
	}
	if o.quiet == 0 {
		o.quiet = 300 * time.Millisecond
	}
	log := slog.New(slog.NewTextHandler(testWriter{t, o.logName}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	n := &node{t: t, backend: memdlm.New(), rpc: &sunrpc.Server{}, nsr: &sunrpc.Server{}}
	n.reg = virtualserver.New(virtualserver.Config{Claims: n.backend, Grace: o.grace, GraceQuiet: o.quiet, ServeUnknown: o.unknown,
		Orchestrated: true})
	nsmPort := listenAny(t, n.nsr)
	var err error
	notify := nsm.NotifyConfig{Timeout: 100 * time.Millisecond, MaxTimeout: 200 * time.Millisecond, GiveUp: 2 * time.Second}
	if o.peers != nil {
		notify.PortmapPort = o.peers.PortmapPort
	} else {
		notify.Disabled = true
	}
	n.nsm, err = nsm.New(nsm.Config{VirtualServers: n.reg, StateDir: stateDir, RPC: n.nsr, Port: nsmPort, Notify: notify, Logger: log,
		Resolver: noDNS{},
		OnReboot: func(ctx context.Context, cs []nsm.Client) error {
			keys := map[dlm.HostKey]bool{}
			for _, c := range cs {
				keys[dlm.HostKey{VIP: c.VIP, Name: c.Caller, Addr: c.Addr}] = true
			}
			return n.nlm.Rebooted(ctx, dlm.Selector{Keys: keys})
		}})
	if err != nil {
		t.Fatal(err)
	}
	n.nlmPort = listenAny(t, n.rpc)
	n.nlm = nlm.New(nlm.Config{Backend: n.backend, VirtualServers: n.reg, RPC: n.rpc, Port: n.nlmPort, Monitor: n.nsm, Logger: log})
	for _, p := range n.nlm.Programs() {
		n.rpc.Register(p)
	}
	for _, p := range n.nsm.Programs() {
		n.nsr.Register(p)
	}
	n.mgr = New(Config{Registry: n.reg, NLM: n.nlm, NSM: n.nsm, Addrs: wild{n.rpc, n.nsr}, StateDir: stateDir, Logger: log,
		Notified: o.peers == nil, Ownership: o.own})
	ctx, stop := context.WithCancel(context.Background())
	n.stopRun = make(chan struct{})
	go func() { n.mgr.Run(ctx); close(n.stopRun) }()
	n.cancelRun = stop
	t.Cleanup(n.close)
	return n
}

// close is a crash: no release, nothing handed over.
func (n *node) close() {
	if n.closed {
		return
	}
	n.closed = true
	n.rpc.Close()
	n.nsr.Close()
	n.cancelRun()
	<-n.stopRun
	n.nsm.Close()
	n.nlm.Close()
	n.backend.Close()
}

type noDNS struct{}

func (noDNS) LookupNetIP(context.Context, string, string) ([]netip.Addr, error) {
	return nil, fmt.Errorf("no DNS in tests")
}

type testWriter struct {
	t    testing.TB
	name string
}

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(w.name + strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// client is one simulated NFS client host: its own address, one NLM
// client per node it talks to through the virtual server.
type client struct {
	t    testing.TB
	addr netip.Addr
	name string
	mu   sync.Mutex
	rpcs map[uint16]*nlm.Client
}

func newClient(t testing.TB, i int) *client {
	return &client{t: t, addr: netip.AddrFrom4([4]byte{127, 0, 5, byte(i)}), name: fmt.Sprint("client", i), rpcs: map[uint16]*nlm.Client{}}
}

// via returns the NLM client that reaches vip on n (the address moving
// between nodes is, here, the client switching to the node's port).
func (c *client) via(n *node, vip netip.Addr) *nlm.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	if x := c.rpcs[n.nlmPort]; x != nil && x.RPC.Remote().Addr() == vip {
		return x
	}
	rc, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(vip, n.nlmPort), sunrpc.ClientOptions{Local: c.addr, Retransmit: 100 * time.Millisecond})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { rc.Close() })
	x := nlm.NewClient(rc, nlm.Vers4)
	c.rpcs[n.nlmPort] = x
	return x
}

func (c *client) lockArgs(fh string, svid int32, start, n uint64, excl bool) nlm.LockArgs {
	return nlm.LockArgs{Cookie: []byte("ck"), Exclusive: excl, State: 1,
		Lock: nlm.Lock{CallerName: []byte(c.name), FH: []byte(fh), OH: []byte(fmt.Sprintf("%d@%s", svid, c.name)), SVID: svid, Offset: start, Len: n}}
}

func (c *client) lock(n *node, vip netip.Addr, fh string, svid int32, start, len uint64, excl, block, reclaim bool) nlm.Stat {
	c.t.Helper()
	a := c.lockArgs(fh, svid, start, len, excl)
	a.Block, a.Reclaim = block, reclaim
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.via(n, vip).Lock(ctx, &a)
	if err != nil {
		c.t.Fatalf("%s LOCK %s: %v", c.name, fh, err)
	}
	return r.Stat
}

func (c *client) test(n *node, vip netip.Addr, fh string, start, len uint64) nlm.TestRes {
	c.t.Helper()
	a := c.lockArgs(fh, 99, start, len, true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.via(n, vip).Test(ctx, &nlm.TestArgs{Cookie: a.Cookie, Exclusive: true, Lock: a.Lock})
	if err != nil {
		c.t.Fatalf("%s TEST %s: %v", c.name, fh, err)
	}
	return r
}

func (c *client) unlock(n *node, vip netip.Addr, fh string, svid int32, start, len uint64) nlm.Stat {
	c.t.Helper()
	a := c.lockArgs(fh, svid, start, len, true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.via(n, vip).Unlock(ctx, &nlm.UnlockArgs{Cookie: a.Cookie, Lock: a.Lock})
	if err != nil {
		c.t.Fatalf("%s UNLOCK %s: %v", c.name, fh, err)
	}
	return r.Stat
}

func (c *client) share(n *node, vip netip.Addr, fh string, mode, access uint32) nlm.Stat {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.via(n, vip).Share(ctx, &nlm.ShareArgs{Cookie: []byte("s"), Share: nlm.Share{CallerName: []byte(c.name), FH: []byte(fh),
		OH: []byte("share-" + c.name), Mode: mode, Access: access}})
	if err != nil {
		c.t.Fatalf("%s SHARE %s: %v", c.name, fh, err)
	}
	return r.Stat
}

func takeover(t *testing.T, n *node, vip netip.Addr) TakeoverResult {
	t.Helper()
	r, err := n.mgr.Takeover(context.Background(), virtualserver.Spec{Addr: vip})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func release(t *testing.T, n *node, vip netip.Addr, snapshot bool) ReleaseResult {
	t.Helper()
	r, err := n.mgr.Release(context.Background(), vip, snapshot)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A planned move: every lock, blocked request and share goes over with the
// snapshot, the new node serves at once (no grace, no notification), a
// reclaim that comes anyway is granted, and the other virtual server on
// the old node never noticed.
func TestPlannedMove(t *testing.T) {
	dir := t.TempDir()
	a, b := newNode(t, dir, nodeOpts{logName: "A "}), newNode(t, dir, nodeOpts{logName: "B "})
	c1, c2, c3 := newClient(t, 1), newClient(t, 2), newClient(t, 3)
	if r := takeover(t, a, vipX); r.Planned || r.Epoch != 1 || r.Already {
		t.Fatalf("first takeover: %+v", r)
	}
	takeover(t, a, vipY)
	if r := takeover(t, a, vipX); !r.Already {
		t.Fatal("a second takeover did something")
	}
	must := func(got, want nlm.Stat, what string) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: %v, want %v", what, got, want)
		}
	}
	must(c1.lock(a, vipX, "f1", 1, 0, 100, true, false, false), nlm.Granted, "c1 excl f1")
	must(c1.lock(a, vipX, "f2", 2, 0, 10, false, false, false), nlm.Granted, "c1 shared f2")
	must(c2.lock(a, vipX, "f2", 1, 0, 10, false, false, false), nlm.Granted, "c2 shared f2")
	must(c2.lock(a, vipX, "f1", 1, 50, 10, true, true, false), nlm.Blocked, "c2 blocks on f1")
	must(c3.share(a, vipX, "f3", 1, 3), nlm.Granted, "c3 share f3")
	must(c3.lock(a, vipY, "g1", 1, 0, 10, true, false, false), nlm.Granted, "c3 via Y")

	rel := release(t, a, vipX, true)
	if !rel.Snapshot || rel.Locks != 3 || rel.Waiters != 1 || rel.Shares != 1 || rel.Epoch != 1 {
		t.Fatalf("release: %+v", rel)
	}
	if r := release(t, a, vipX, true); !r.Already {
		t.Fatal("a second release did something")
	}
	if _, err := os.Stat(filepath.Join(dir, "127.0.0.2", "snapshot.json")); err != nil {
		t.Fatal("no snapshot file:", err)
	}
	// The old node holds nothing of X any more, and no longer answers on
	// its address (the client retransmits until the address is up again,
	// on the new node).
	if locks, _, _ := a.nlm.Locks(context.Background(), nlm.LockFilter{VIP: vipX}); len(locks) != 0 {
		t.Fatalf("old node still has %v", locks)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	la := c1.lockArgs("f9", 1, 0, 1, true)
	if _, err := c1.via(a, vipX).Lock(ctx, &la); err == nil {
		t.Fatal("the old node answered on the released address")
	}
	cancel()
	if r := c3.test(a, vipY, "g1", 0, 10); r.Stat != nlm.Denied || r.Holder.SVID != 1 {
		t.Fatalf("the lock through Y after X's release: %+v", r) // Y untouched
	}

	tk := takeover(t, b, vipX)
	if !tk.Planned || tk.Locks != 3 || tk.Waiters != 1 || tk.Shares != 1 || tk.Refused != 0 || tk.Epoch != 2 || !tk.GraceUntil.IsZero() || tk.Notifying != 0 {
		t.Fatalf("takeover: %+v", tk)
	}
	// Served at once: a new lock on another file is granted; the held ones
	// conflict as before; a reclaim is granted as a no-op.
	must(c3.lock(b, vipX, "f4", 1, 0, 1, true, false, false), nlm.Granted, "new lock after a planned move")
	if r := c3.test(b, vipX, "f1", 0, 1); r.Stat != nlm.Denied || r.Holder.SVID != 1 || string(r.Holder.OH) != "1@client1" {
		t.Fatalf("f1 after the move: %+v", r)
	}
	must(c3.lock(b, vipX, "f2", 5, 0, 1, true, false, false), nlm.Denied, "f2 shared holders moved")
	must(c1.lock(b, vipX, "f1", 1, 0, 100, true, false, true), nlm.Granted, "reclaim after a planned move")
	must(c1.share(b, vipX, "f3", 0, 1), nlm.Denied, "c3's share moved")
	locks, _, _ := b.nlm.Locks(context.Background(), nlm.LockFilter{VIP: vipX, FH: []byte("f1")})
	var blocked []nlm.LockInfo
	for _, l := range locks {
		if l.Blocked {
			blocked = append(blocked, l)
		}
	}
	if len(blocked) != 1 || blocked[0].Caller != "client2" || blocked[0].Start != 50 || blocked[0].Since.IsZero() {
		t.Fatalf("blocked request after the move: %+v", locks)
	}
	// The blocked request moved with its place in the queue: when c1 lets
	// go, it is c2's.
	must(c1.unlock(b, vipX, "f1", 1, 0, 100), nlm.Granted, "c1 unlocks f1")
	if r := c3.test(b, vipX, "f1", 50, 10); r.Stat != nlm.Denied || r.Holder.SVID != 1 || string(r.Holder.OH) != "1@client2" {
		t.Fatalf("after c1's unlock the blocked request holds: %+v", r)
	}
	// The snapshot is used once.
	if _, err := os.Stat(filepath.Join(dir, "127.0.0.2", "snapshot.json")); !os.IsNotExist(err) {
		t.Fatal("the snapshot was not removed after its use")
	}
	// Monitor records carried over: the clients are still monitored on B.
	if recs := b.nsm.Records(vipX); len(recs) != 3 {
		t.Fatalf("monitor records on the new node: %+v", recs)
	}
}

// An unplanned move (the old node died): the new node restarts the
// virtual server's status monitor, notifies its clients and holds a grace
// period for it alone, which ends as soon as they have reclaimed.
func TestUnplannedMove(t *testing.T) {
	dir := t.TempDir()
	peers, err := nsmtest.Start(0)
	if err != nil {
		t.Fatal(err)
	}
	defer peers.Close()
	a := newNode(t, dir, nodeOpts{peers: peers, logName: "A "})
	b := newNode(t, dir, nodeOpts{peers: peers, logName: "B ", quiet: 5 * time.Second})
	c1, c2 := newClient(t, 1), newClient(t, 2)
	takeover(t, a, vipX)
	takeover(t, b, vipY) // B already serves Y: it must stay out of grace
	if c1.lock(a, vipX, "f1", 1, 0, 100, true, false, false) != nlm.Granted || c2.lock(b, vipY, "g", 1, 0, 1, true, false, false) != nlm.Granted {
		t.Fatal("locks before the crash")
	}
	a.close() // crash: nothing handed over

	peers.Reset()
	tk := takeover(t, b, vipX)
	if tk.Planned || tk.Epoch != 2 || tk.NSMState != 3 || tk.Notifying != 1 || tk.GraceUntil.IsZero() {
		t.Fatalf("takeover after a crash: %+v", tk)
	}
	if err := peers.WaitNotified(1, 5*time.Second); err != nil {
		t.Fatal("client not notified")
	}
	if nt := peers.Notifications()[0]; nt.To != c1.addr || nt.From.Addr() != vipX || nt.MonName != "127.0.0.2" || nt.State != 3 {
		t.Fatalf("notification %+v", nt)
	}
	// X is in grace, Y is not.
	if st := c2.lock(b, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.DeniedGracePeriod {
		t.Fatalf("non-reclaim through X in grace: %v", st)
	}
	if st := c2.lock(b, vipY, "g2", 1, 0, 1, true, false, false); st != nlm.Granted {
		t.Fatalf("Y during X's grace: %v", st)
	}
	// c1 reclaims, then carries on: its reclaim is done, X's grace ends.
	if st := c1.lock(b, vipX, "f1", 1, 0, 100, true, false, true); st != nlm.Granted {
		t.Fatalf("reclaim: %v", st)
	}
	vs, _ := b.reg.Get(vipX)
	if !vs.InGrace(time.Now()) {
		t.Fatal("grace ended before the client was done")
	}
	c1.lock(b, vipX, "f5", 1, 0, 1, true, false, false) // its first new request
	deadline := time.Now().Add(2 * time.Second)
	for vs.InGrace(time.Now()) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if g := vs.Grace(); g.Active || g.Why != virtualserver.EndReclaimed {
		t.Fatalf("grace after every client reclaimed: %+v", g)
	}
	if st := c2.lock(b, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.Denied {
		t.Fatalf("c1's reclaimed lock: c2 got %v", st)
	}
	if st := c2.lock(b, vipX, "f6", 1, 0, 1, true, false, false); st != nlm.Granted {
		t.Fatalf("after grace: %v", st)
	}
}

// A snapshot of an epoch that is not the one a takeover follows is never
// loaded: the clients reclaim instead.
func TestStaleSnapshot(t *testing.T) {
	dir := t.TempDir()
	a, b, c := newNode(t, dir, nodeOpts{logName: "A "}), newNode(t, dir, nodeOpts{logName: "B "}), newNode(t, dir, nodeOpts{logName: "C "})
	cl := newClient(t, 1)
	takeover(t, a, vipX)
	cl.lock(a, vipX, "f1", 1, 0, 1, true, false, false)
	release(t, a, vipX, true) // snapshot of epoch 1
	snap, _ := os.ReadFile(filepath.Join(dir, "127.0.0.2", "snapshot.json"))
	if tk := takeover(t, b, vipX); !tk.Planned || tk.Epoch != 2 {
		t.Fatalf("B: %+v", tk)
	}
	b.close() // B dies in epoch 2; someone puts the old snapshot back
	os.WriteFile(filepath.Join(dir, "127.0.0.2", "snapshot.json"), snap, 0o600)
	tk := takeover(t, c, vipX)
	if tk.Planned || tk.Locks != 0 || tk.Epoch != 3 {
		t.Fatalf("C loaded a stale snapshot: %+v", tk)
	}
	// A damaged one is refused too.
	release(t, c, vipX, true)
	os.WriteFile(filepath.Join(dir, "127.0.0.2", "snapshot.json"), []byte(`{"vip":`), 0o600)
	if tk := takeover(t, a, vipX); tk.Planned {
		t.Fatalf("a damaged snapshot was loaded: %+v", tk)
	}
	// A release without a snapshot leaves none behind.
	release(t, a, vipX, false)
	if _, err := os.Stat(filepath.Join(dir, "127.0.0.2", "snapshot.json")); !os.IsNotExist(err) {
		t.Fatal("a release without snapshot left one")
	}
}

// A request for an address served as an unknown address takes it over on
// demand, once, even when many arrive at the same time.
func TestTakeoverOnDemand(t *testing.T) {
	dir := t.TempDir()
	n := newNode(t, dir, nodeOpts{unknown: true})
	var wg sync.WaitGroup
	seen := make(chan *virtualserver.Server, 8)
	for range 8 {
		wg.Go(func() {
			vs, ok := n.reg.Lookup(vipX)
			if !ok {
				t.Error("not served")
			}
			seen <- vs
		})
	}
	wg.Wait()
	close(seen)
	first := <-seen
	for vs := range seen {
		if vs != first {
			t.Fatal("two virtual servers for one address")
		}
	}
	if e, _ := virtualserver.ReadEpoch(filepath.Join(dir, "127.0.0.2")); e != 1 {
		t.Fatalf("epoch %d: taken over more than once", e)
	}
}

// A planned move during a grace period hands the rest of it over (issue
// seen with the kernel client): a client whose statd could not be reached
// in time has not reclaimed yet when the address moves on; the next owner
// stays in grace, notifies it, grants its reclaim, and refuses everyone
// else the range meanwhile.
func TestPlannedMoveDuringGrace(t *testing.T) {
	dir := t.TempDir()
	peers, err := nsmtest.Start(0)
	if err != nil {
		t.Fatal(err)
	}
	defer peers.Close()
	a := newNode(t, dir, nodeOpts{peers: peers, logName: "A "})
	b := newNode(t, dir, nodeOpts{peers: peers, logName: "B "})
	c := newNode(t, dir, nodeOpts{peers: peers, logName: "C "})
	c1, c2 := newClient(t, 1), newClient(t, 2)
	takeover(t, a, vipX)
	if st := c1.lock(a, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.Granted {
		t.Fatalf("c1's lock: %v", st)
	}
	if st := c2.lock(a, vipX, "f2", 1, 0, 1, true, false, false); st != nlm.Granted {
		t.Fatalf("c2's lock: %v", st)
	}
	a.close()
	peers.SetDead(c1.addr, true) // c1's statd cannot be reached for now
	tk := takeover(t, b, vipX)
	if tk.Planned || tk.GraceUntil.IsZero() || tk.Notifying != 2 {
		t.Fatalf("unplanned takeover: %+v", tk)
	}
	if err := peers.WaitNotified(1, 5*time.Second); err != nil {
		t.Fatal("c2 not notified")
	}
	if st := c2.lock(b, vipX, "f2", 1, 0, 1, true, false, true); st != nlm.Granted {
		t.Fatalf("c2's reclaim: %v", st)
	}
	// Planned move while c1 has not reclaimed.
	rel := release(t, b, vipX, true)
	if rel.GraceLeft <= 0 || rel.GracePending != 2 {
		t.Fatalf("release during grace: %+v", rel)
	}
	tk = takeover(t, c, vipX)
	if !tk.Planned || !tk.GraceResumed || tk.GraceUntil.IsZero() || tk.Locks != 1 {
		t.Fatalf("planned takeover during grace: %+v", tk)
	}
	if st := c2.lock(c, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.DeniedGracePeriod {
		t.Fatalf("c2 asked for c1's range while c1 has not reclaimed: %v, want DENIED_GRACE_PERIOD", st)
	}
	if r := c2.test(c, vipX, "f1", 0, 100); r.Stat != nlm.DeniedGracePeriod {
		t.Fatalf("TEST of c1's range in the handed-over grace period: %v", r.Stat)
	}
	// c1's statd is back: the new owner notifies it (same state number as
	// B's notification) and its reclaim is granted. (c2 may be told once
	// more: a release leaves the answered clients it had not filed yet in
	// the notify list rather than hold itself up, see nsm's job.finish.)
	peers.Reset()
	peers.SetDead(c1.addr, false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		i := slices.IndexFunc(peers.Notifications(), func(n nsmtest.Notification) bool { return n.To == c1.addr })
		if i >= 0 {
			if n := peers.Notifications()[i]; n.From.Addr() != vipX || n.State != 3 {
				t.Fatalf("notification: %+v", n)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("c1 not notified by the new owner: %+v", peers.Notifications())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := c1.lock(c, vipX, "f1", 1, 0, 100, true, false, true); st != nlm.Granted {
		t.Fatalf("c1's reclaim on the new owner: %v", st)
	}
	if st := c2.lock(c, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.DeniedGracePeriod && st != nlm.Denied {
		t.Fatalf("c2 after c1's reclaim: %v", st)
	}
	vs, _ := c.reg.Get(vipX)
	deadline = time.Now().Add(5 * time.Second)
	for vs.InGrace(time.Now()) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if g := vs.Grace(); g.Active || g.Why != virtualserver.EndReclaimed || g.Clients != 2 {
		t.Fatalf("the handed-over grace period: %+v", g)
	}
	if st := c2.lock(c, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.Denied {
		t.Fatalf("c1's lock after grace: c2 got %v", st)
	}
}

// losable is state-directory ownership whose claims the test can end, as
// an expired lease ends a shared backend's.
type losable struct {
	virtualserver.StateDir
	lost chan netip.Addr
}

func (l *losable) Lost() <-chan netip.Addr { return l.lost }

// A node whose claim of a virtual server ended stops serving it at once
// and hands nothing over; a node that lost its claim to another cannot
// leave the next owner a stale snapshot either.
func TestLostClaim(t *testing.T) {
	dir := t.TempDir()
	own := &losable{StateDir: virtualserver.StateDir{Root: dir}, lost: make(chan netip.Addr)}
	a := newNode(t, dir, nodeOpts{own: own})
	c1 := newClient(t, 1)
	takeover(t, a, vipX)
	if st := c1.lock(a, vipX, "f1", 1, 0, 100, true, false, false); st != nlm.Granted {
		t.Fatalf("lock: %v", st)
	}
	own.lost <- vipX
	deadline := time.Now().Add(5 * time.Second)
	for {
		vs, _ := a.reg.Get(vipX)
		if vs.State() == virtualserver.Released {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still %v after its claim was lost", vs.State())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if a.backend.Files() != 0 {
		t.Fatal("the lost virtual server's locks stayed on the node")
	}
	if _, err := os.Stat(filepath.Join(dir, vipX.String(), "snapshot.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a lost virtual server was handed over")
	}

	// b takes it over while a, unaware, still serves it: a's release
	// fails and leaves nothing for b's successor.
	takeover(t, a, vipX)
	b := newNode(t, dir, nodeOpts{logName: "B "})
	takeover(t, b, vipX)
	if _, err := a.mgr.Release(context.Background(), vipX, true); !errors.Is(err, virtualserver.ErrLost) {
		t.Fatalf("release of a virtual server claimed over: %v, want ErrLost", err)
	}
	if _, err := os.Stat(filepath.Join(dir, vipX.String(), "snapshot.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a stale release left a snapshot")
	}
}

// A damaged epoch file does not send the epoch back: the node whose lock
// backend still knows the virtual server's later claim takes it over
// again (through grace, the snapshot being unusable).
func TestDamagedEpochTakesOverAgain(t *testing.T) {
	dir := t.TempDir()
	a := newNode(t, dir, nodeOpts{})
	for range 3 {
		takeover(t, a, vipX)
		release(t, a, vipX, true)
	}
	if err := os.WriteFile(filepath.Join(dir, vipX.String(), "epoch"), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := a.mgr.Takeover(context.Background(), virtualserver.Spec{Addr: vipX})
	if err != nil || r.Planned || r.Epoch <= 3 {
		t.Fatalf("takeover over a damaged epoch: %+v %v; want a restart above epoch 3", r, err)
	}
}
