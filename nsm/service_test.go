package nsm

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

	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

var fixedTime = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

var (
	vip2 = mustAddr("127.0.0.2")
	vip3 = mustAddr("127.0.0.3")
)

// node is one NSM service on a wildcard UDP and TCP socket of its own,
// with the simulated peers it notifies.
type node struct {
	t        testing.TB
	dir      string
	reg      *virtualserver.Registry
	rpc      *sunrpc.Server
	port     uint16
	svc      *Service
	peers    *nsmtest.Peers
	mu       sync.Mutex
	rebooted [][]Client
	started  []Started
	stopRun  context.CancelFunc // the takeovers' orchestrator
	ran      chan struct{}
}

type nodeOpts struct {
	dir      string
	peers    *nsmtest.Peers
	notify   NotifyConfig
	callout  string
	grace    time.Duration
	vips     []virtualserver.Spec
	resolver Resolver
	unknown  bool
	quiet    bool // no debug log (benchmarks)
	// strict: the local-only procedures only from privileged ports, as
	// nlmd runs by default (the tests' own calls come from any port).
	strict bool
}

func startNode(t testing.TB, o nodeOpts) *node {
	t.Helper()
	if o.dir == "" {
		o.dir = t.TempDir()
	}
	if o.peers == nil {
		p, err := nsmtest.Start(0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		o.peers = p
	}
	if o.resolver == nil {
		// Never the real resolver: tests send no traffic off loopback.
		o.resolver = fakeResolver{"vip-two": {vip2}}
	}
	if o.vips == nil {
		o.vips = []virtualserver.Spec{{Addr: vip2, Name: "vip-two"}, {Addr: vip3}}
	}
	n := &node{t: t, dir: o.dir, peers: o.peers, rpc: &sunrpc.Server{UDPBuffer: 4 << 20}}
	// What the HA layer does at a takeover, reduced to the status monitor:
	// a new virtual server, restarted, served; its grace period waits for
	// the clients being notified.
	n.reg = virtualserver.New(virtualserver.Config{Servers: o.vips, Grace: o.grace, ServeUnknown: o.unknown, Orchestrated: true})
	takeover := func(ctx context.Context, ev virtualserver.Event) {
		if ev.Kind != virtualserver.Wanted {
			return
		}
		n.mu.Lock()
		defer n.mu.Unlock()
		vs, created, _ := n.reg.Begin(ctx, ev.Spec, 1)
		if !created {
			return
		}
		st, err := n.svc.Start(vs, Restart)
		if err != nil {
			t.Error(err)
			return
		}
		n.started = append(n.started, st)
		if o.grace > 0 {
			vs.BeginGrace(true, false, st.Clients)
		}
		if err := n.svc.Notify(vs); err != nil {
			t.Error(err)
		}
		vs.Serve()
	}
	// One port for both transports: a UDP port whose TCP twin is free.
	var pc net.PacketConn
	var l net.Listener
	for try := 0; l == nil; try++ {
		var err error
		if pc, err = net.ListenPacket("udp4", "0.0.0.0:0"); err != nil {
			t.Fatal(err)
		}
		n.port = uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		if l, err = net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", n.port)); err != nil {
			pc.Close()
			if try == 20 {
				t.Fatal(err)
			}
		}
	}
	if o.notify.PortmapPort == 0 {
		o.notify.PortmapPort = o.peers.PortmapPort
	}
	if o.notify.Timeout == 0 {
		o.notify.Timeout = 100 * time.Millisecond
		o.notify.MaxTimeout = 400 * time.Millisecond
	}
	var err error
	n.svc, err = New(Config{
		VirtualServers: n.reg, StateDir: o.dir, RPC: n.rpc, Port: n.port, Notify: o.notify,
		HACallout: o.callout, CalloutTimeout: 2 * time.Second, Resolver: o.resolver,
		LockdPortmap: netip.AddrPortFrom(mustAddr("127.0.0.1"), o.peers.PortmapPort),
		OnReboot: func(_ context.Context, c []Client) error {
			n.mu.Lock()
			n.rebooted = append(n.rebooted, c)
			n.mu.Unlock()
			return nil
		},
		UnprivilegedLocal: !o.strict,
		Logger:            logger(t, o.quiet),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range n.svc.Programs() {
		if err := n.rpc.Register(p); err != nil {
			t.Fatal(err)
		}
	}
	go n.rpc.ServePacket(pc)
	go n.rpc.Serve(l)
	ctx, stop := context.WithCancel(context.Background())
	n.stopRun, n.ran = stop, make(chan struct{})
	go func() { n.reg.HandleEvents(ctx, takeover); close(n.ran) }()
	for _, v := range o.vips {
		if _, ok := n.reg.Lookup(v.Addr); !ok {
			t.Fatalf("%v does not start", v.Addr)
		}
	}
	t.Cleanup(n.stop)
	return n
}

func (n *node) stop() {
	n.rpc.Close()
	n.stopRun()
	<-n.ran
	n.svc.Close()
}

func logger(t testing.TB, quiet bool) *slog.Logger {
	if quiet {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func (n *node) vs(a netip.Addr) *virtualserver.Server {
	vs, ok := n.reg.Lookup(a)
	if !ok {
		n.t.Fatalf("%v is not served", a)
	}
	return vs
}

// call makes an NSM call to the node from local (a loopback address) to
// the virtual server at to.
func (n *node) call(local, to netip.Addr, proc uint32, args []byte) []byte {
	n.t.Helper()
	c, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(to, n.port),
		sunrpc.ClientOptions{Local: local, Retransmit: 200 * time.Millisecond})
	if err != nil {
		n.t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := c.Call(ctx, Prog, Vers, proc, args)
	if err != nil {
		n.t.Fatalf("NSM proc %d: %v", proc, err)
	}
	return res
}

// rebootedClients returns what OnReboot was told, once the notifications
// queued so far have been acted on.
func (n *node) rebootedClients() [][]Client {
	waitFor(n.t, "reboot notifications handled", func() bool {
		return n.svc.handled.Load() >= n.svc.rebootsQueued.Load()
	})
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.rebooted)
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func files(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func clientAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 0, 1 + byte(i/250), 1 + byte(i%250)})
}

// A restart bumps the state by 2 (odd), retires the monitor list and
// notifies each client from the virtual server it locked through, with
// that virtual server's name and new state; answered records are gone.
func TestRestartNotifiesClients(t *testing.T) {
	dir := t.TempDir()
	a := startNode(t, nodeOpts{dir: dir, grace: time.Hour})
	for _, v := range []netip.Addr{vip2, vip3} {
		if st, _ := a.svc.State(v); st != 1 {
			t.Fatalf("first state of %v = %d, want 1", v, st)
		}
		if a.vs(v).InGrace(time.Now()) {
			t.Fatalf("%v: nothing to reclaim, yet in grace", v)
		}
	}
	ctx := context.Background()
	for i := range 3 {
		if err := a.svc.Monitor(ctx, vip2, fmt.Sprintf("c%d", i), clientAddr(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.svc.Monitor(ctx, vip3, "c9", clientAddr(9)); err != nil {
		t.Fatal(err)
	}
	gen := a.svc.Generation()
	if err := a.svc.Monitor(ctx, vip2, "c0", clientAddr(0)); err != nil || a.svc.Generation() != gen {
		t.Fatal("monitoring a monitored client again changed something")
	}
	if got := len(files(t, filepath.Join(dir, "127.0.0.2", "sm"))); got != 3 {
		t.Fatalf("%d records under 127.0.0.2/sm, want 3", got)
	}
	a.stop()

	b := startNode(t, nodeOpts{dir: dir, peers: a.peers, grace: time.Hour})
	if err := b.peers.WaitNotified(4, 10*time.Second); err != nil {
		t.Fatalf("notified %d of 4 clients: %v", b.peers.Notified(), err)
	}
	if st, _ := b.svc.State(vip2); st != 3 {
		t.Fatalf("state after restart = %d, want 3", st)
	}
	if !b.vs(vip2).InGrace(time.Now()) {
		t.Fatal("clients to reclaim, yet out of grace")
	}
	for _, nt := range b.peers.Notifications() {
		wantFrom, wantName := vip2, "vip-two"
		if nt.To == clientAddr(9) {
			wantFrom, wantName = vip3, "127.0.0.3"
		}
		if nt.From.Addr() != wantFrom || nt.From.Port() != b.port || nt.MonName != wantName || nt.State != 3 {
			t.Errorf("notification %+v: want from %v:%d, mon_name %s, state 3", nt, wantFrom, b.port, wantName)
		}
	}
	waitFor(t, "the notify list to empty", func() bool {
		p, _ := b.svc.Progress(vip2)
		return p.Done == 3 && !p.Finished.IsZero() && len(files(t, filepath.Join(dir, "127.0.0.2", "notify"))) == 0
	})
	// Notified clients stay monitored, until pruned as idle.
	if got := files(t, filepath.Join(dir, "127.0.0.2", "sm")); len(got) != 3 {
		t.Fatalf("monitor list after restart: %v", got)
	}
}

// A client being notified of a restart stays monitored: its record waits
// in notify/ and goes back to sm/ once it answers, so its reclaims write
// nothing, a crash meanwhile notifies it again, and a reboot of the client
// meanwhile is recorded (in the reboot journal) and survives the crash.
func TestNotifiedClientsStayMonitored(t *testing.T) {
	dir := t.TempDir()
	a := startNode(t, nodeOpts{dir: dir, grace: time.Hour})
	ctx := context.Background()
	for i := range 3 {
		if err := a.svc.Monitor(ctx, vip2, "c", clientAddr(i)); err != nil {
			t.Fatal(err)
		}
	}
	a.stop()
	sm, nd := filepath.Join(dir, "127.0.0.2", "sm"), filepath.Join(dir, "127.0.0.2", "notify")

	// Nobody answers: every client stays pending.
	for i := range 3 {
		a.peers.SetDead(clientAddr(i), true)
	}
	b := startNode(t, nodeOpts{dir: dir, peers: a.peers, grace: time.Hour})
	// The records load after the start, and bump the generation once
	// installed: count from there.
	b.svc.startedVIP(vip2)
	b.svc.startedVIP(vip3)
	gen := b.svc.Generation()
	for i := range 3 {
		if err := b.svc.Monitor(ctx, vip2, "c", clientAddr(i)); err != nil {
			t.Fatal(err)
		}
	}
	if b.svc.Generation() != gen || len(files(t, sm)) != 0 || len(files(t, nd)) != 3 {
		t.Fatalf("reclaims after a restart wrote records: sm/ %v, notify/ %v", files(t, sm), files(t, nd))
	}
	if got := b.svc.Prune(func(Client) bool { return false }) + b.svc.Prune(func(Client) bool { return false }); got != 0 {
		t.Fatalf("pruned %d clients still being notified", got)
	}
	// Client 1 reboots meanwhile: its new state goes to the reboot
	// journal; its record stays in notify/.
	note := &rebootNote{monName: clientAddr(1).String(), sender: clientAddr(1), state: 41}
	if !b.svc.takeReboot(note) || len(note.out.clients) != 1 {
		t.Fatalf("reboot of client 1 matched %v", note.out.clients)
	}
	b.rebootedClients() // acted on
	if len(files(t, sm)) != 0 || len(files(t, nd)) != 3 {
		t.Fatalf("after client 1's reboot: sm/ %v, notify/ %v", files(t, sm), files(t, nd))
	}
	if recs, _ := mustOpen(t, dir).Records(); !slices.ContainsFunc(recs, func(r Record) bool { return r.Addrs[0] == clientAddr(1) && r.LastState == 41 }) {
		t.Fatalf("client 1's new state is not on disk: %+v", recs)
	}
	b.stop() // as good as a crash: nothing was answered

	// The restart notifies all three again; now they answer.
	for i := range 3 {
		a.peers.SetDead(clientAddr(i), false)
	}
	a.peers.Reset()
	c := startNode(t, nodeOpts{dir: dir, peers: a.peers, grace: time.Hour})
	if err := c.peers.WaitNotified(3, 10*time.Second); err != nil {
		t.Fatalf("after the crash %d of 3 clients notified", c.peers.Notified())
	}
	waitFor(t, "every record back in sm/", func() bool { return len(files(t, sm)) == 3 && len(files(t, nd)) == 0 })
	for _, r := range c.svc.Records(vip2) {
		if want := int32(0); r.Addrs[0] == clientAddr(1) {
			want = 41
			if r.LastState != want {
				t.Fatalf("client 1's last state %d, want %d", r.LastState, want)
			}
		}
	}
	// Once notified they are ordinary records: idle ones are pruned.
	idle := func(Client) bool { return false }
	if got := c.svc.Prune(idle) + c.svc.Prune(idle); got != 3 || len(files(t, sm)) != 0 {
		t.Fatalf("pruned %d idle clients, sm/ %v", got, files(t, sm))
	}
}

// Dead clients neither hold up live ones (the window counts only peers
// awaiting a first answer) nor stay forever: they are given up, and their
// records wait for the next start.
func TestNotifyGivesUpOnDeadClients(t *testing.T) {
	dir := t.TempDir()
	peers, err := nsmtest.Start(0)
	if err != nil {
		t.Fatal(err)
	}
	defer peers.Close()
	d, err := OpenDir(dir, vip2)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := d.AddClient(Client{Caller: fmt.Sprint("c", i), Addr: clientAddr(i)}, ""); err != nil {
			t.Fatal(err)
		}
		if i < 4 {
			peers.SetDead(clientAddr(i), true)
		}
	}
	peers.SetUnregistered(clientAddr(4), true)
	n := startNode(t, nodeOpts{dir: dir, peers: peers, vips: []virtualserver.Spec{{Addr: vip2}},
		notify: NotifyConfig{Window: 2, Timeout: 100 * time.Millisecond, MaxTimeout: 200 * time.Millisecond, GiveUp: 1500 * time.Millisecond}})
	start := time.Now()
	if err := peers.WaitNotified(15, 5*time.Second); err != nil {
		t.Fatalf("live clients notified: %d of 15", peers.Notified())
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("live clients took %v behind 4 dead ones with a window of 2", took)
	}
	// The unregistered one is looked up again after MaxTimeout.
	peers.SetUnregistered(clientAddr(4), false)
	waitFor(t, "the notification to end", func() bool {
		p, _ := n.svc.Progress(vip2)
		return !p.Finished.IsZero()
	})
	p, _ := n.svc.Progress(vip2)
	if p.Total != 20 || p.Done != 16 || p.Failed != 4 || p.Pending() != 0 {
		t.Fatalf("progress %+v: want 16 done, 4 failed", p)
	}
	left := files(t, filepath.Join(dir, "127.0.0.2", "notify"))
	if len(left) != 4 {
		t.Fatalf("notify list after giving up: %v, want the 4 dead clients", left)
	}
	for _, f := range left {
		if !strings.Contains(f, "127.0.1.1-") && !strings.Contains(f, "127.0.1.2-") && !strings.Contains(f, "127.0.1.3-") && !strings.Contains(f, "127.0.1.4-") {
			t.Fatalf("unexpected record kept: %s", f)
		}
	}
	// Dead clients got retransmissions with backoff, several of them.
	_ = n
}

// An SM_NOTIFY from a rebooted client drops its state on every virtual
// server it used — only its — once per state number.
func TestRebootNotification(t *testing.T) {
	n := startNode(t, nodeOpts{})
	ctx := context.Background()
	c1, c2 := clientAddr(1), clientAddr(2)
	for _, m := range []struct {
		vip  netip.Addr
		name string
		addr netip.Addr
	}{{vip2, "one", c1}, {vip3, "one", c1}, {vip2, "two", c2}} {
		if err := n.svc.Monitor(ctx, m.vip, m.name, m.addr); err != nil {
			t.Fatal(err)
		}
	}
	notify := func(from netip.Addr, name string, state int32) {
		n.call(from, vip2, ProcNotify, (&StatChge{MonName: name, State: state}).Append(nil))
	}
	notify(c1, "one", 5)
	got := n.rebootedClients()
	if len(got) != 1 || len(got[0]) != 2 {
		t.Fatalf("rebooted: %v, want client one on both virtual servers", got)
	}
	for _, c := range got[0] {
		if c.Caller != "one" || c.Addr != c1 || (c.VIP != vip2 && c.VIP != vip3) {
			t.Fatalf("dropped %+v", c)
		}
	}
	notify(c1, "one", 5) // a retransmission: same state
	notify(clientAddr(7), "stranger", 3)
	if len(n.rebootedClients()) != 1 {
		t.Fatal("a repeated or unknown notification dropped state")
	}
	if n.svc.Stats().NotifyDuplicate.Load() != 1 || n.svc.Stats().NotifyUnknown.Load() != 1 {
		t.Fatal("ignored notifications not counted")
	}
	// By address alone (mon_name a name we do not know) and by name alone.
	notify(c2, "two.example", 9)
	notify(clientAddr(8), "one", 7)
	got = n.rebootedClients()
	if len(got) != 3 || got[1][0].Caller != "two" || len(got[2]) != 2 {
		t.Fatalf("rebooted: %v", got)
	}
	// The state seen is persisted with the record.
	var last int32
	for _, r := range n.svc.Records(vip2) {
		if r.Caller == "one" {
			last = r.LastState
		}
	}
	if last != 7 {
		t.Fatalf("last state of client one = %d, want 7", last)
	}
}

type fakeResolver map[string][]netip.Addr

func (f fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := f[host]; ok {
		return a, nil
	}
	return nil, errors.New("no such host")
}

// SM_MON, SM_UNMON, SM_UNMON_ALL as a local lock manager uses them, and the
// callback with priv when the monitored host reboots.
func TestSMMonAndCallback(t *testing.T) {
	n := startNode(t, nodeOpts{resolver: fakeResolver{"peer.example": {mustAddr("127.0.2.1")}}})
	if err := n.peers.ServeLockd(5); err != nil {
		t.Fatal(err)
	}
	lo := mustAddr("127.0.0.1")
	mon := Mon{MonID: MonID{MonName: "peer.example", MyID: MyID{MyName: "vip-two", Prog: 100021, Vers: 5, Proc: 16}}}
	copy(mon.Priv[:], "priv-of-the-lock")
	var r StatRes
	r.Decode(xdr.NewDecoder(n.call(lo, vip3, ProcMon, mon.Append(nil))))
	if r.Res != StatSucc || r.State != 1 {
		t.Fatalf("SM_MON: %+v", r)
	}
	// my_name picked the virtual server, not the address called.
	if recs := n.svc.Records(vip2); len(recs) != 1 || recs[0].Kind != KindSMMon || recs[0].Addrs[0] != mustAddr("127.0.2.1") {
		t.Fatalf("records of vip2: %+v", recs)
	}
	r.Decode(xdr.NewDecoder(n.call(lo, vip2, ProcMon, mon.Append(nil))))
	if r.Res != StatSucc || len(n.svc.Records(vip2)) != 1 {
		t.Fatal("a duplicate SM_MON made a second record")
	}
	// The peer reboots: its notification (by address) reaches the lock
	// manager with mon_name as monitored, the new state and priv.
	n.call(mustAddr("127.0.2.1"), vip2, ProcNotify, (&StatChge{MonName: "127.0.2.1", State: 11}).Append(nil))
	if err := n.peers.WaitCallbacks(1, 5*time.Second); err != nil {
		t.Fatal("no callback to the lock manager")
	}
	cb := n.peers.Callbacks()[0]
	if cb.Vers != 5 || cb.Proc != 16 || cb.MonName != "peer.example" || cb.State != 11 || cb.Priv != mon.Priv {
		t.Fatalf("callback %+v", cb)
	}
	if len(n.rebootedClients()) != 0 {
		t.Fatal("an SM_MON record's reboot dropped lock manager state here")
	}

	unmon := func(proc uint32, args []byte) int32 {
		d := xdr.NewDecoder(n.call(lo, vip2, proc, args))
		return d.Int32()
	}
	other := mon
	other.MonID.MonName = "127.0.2.2"
	n.call(lo, vip2, ProcMon, other.Append(nil))
	if st := unmon(ProcUnmon, mon.MonID.Append(nil)); st != 1 {
		t.Fatalf("SM_UNMON state %d", st)
	}
	if recs := n.svc.Records(vip2); len(recs) != 1 || recs[0].MonName != "127.0.2.2" {
		t.Fatalf("after SM_UNMON: %+v", recs)
	}
	id := mon.MonID.MyID
	id.Vers = 4 // another lock manager's id: not removed
	unmon(ProcUnmonAll, id.Append(nil))
	if len(n.svc.Records(vip2)) != 1 {
		t.Fatal("SM_UNMON_ALL removed another lock manager's records")
	}
	unmon(ProcUnmonAll, mon.MonID.MyID.Append(nil))
	if len(n.svc.Records(vip2)) != 0 {
		t.Fatal("SM_UNMON_ALL left records")
	}
	if got := files(t, filepath.Join(n.dir, "127.0.0.2", "sm")); len(got) != 0 {
		t.Fatalf("files left: %v", got)
	}
}

// What rpc.statd refuses, we refuse, with the current state in the reply.
func TestRefusals(t *testing.T) {
	n := startNode(t, nodeOpts{resolver: fakeResolver{}, strict: true})
	good := Mon{MonID: MonID{MonName: "127.0.2.1", MyID: MyID{MyName: "127.0.0.2", Prog: 100021, Vers: 4, Proc: 16}}}
	req := func(remote string, m Mon) StatRes {
		r := &sunrpc.Request{Prog: Prog, Vers: Vers, Proc: ProcMon, Local: netip.MustParseAddrPort("127.0.0.2:662"),
			Remote: netip.MustParseAddrPort(remote), Args: m.Append(nil)}
		res, err := n.svc.handleMon(context.Background(), r, nil)
		if err != nil {
			t.Fatal(err)
		}
		var out StatRes
		out.Decode(xdr.NewDecoder(res))
		return out
	}
	if r := req("127.0.0.1:700", good); r.Res != StatSucc {
		t.Fatalf("good SM_MON: %+v", r)
	}
	bad := map[string]Mon{}
	m := good
	bad["remote"] = m
	m.MonID.MyID.Prog = 100003
	bad["not NLM"] = m
	m = good
	m.MonID.MyID.Proc = 1
	bad["not the notify procedure"] = m
	m = good
	m.MonID.MonName = "a/b"
	bad["slash"] = m
	m.MonID.MonName = "a b"
	bad["blank"] = m
	m.MonID.MonName = ""
	bad["empty"] = m
	m.MonID.MonName = "unresolvable.example"
	bad["unresolvable"] = m
	m = good
	m.MonID.MyID.MyName = "no-such-vip"
	bad["from an unprivileged port"] = good
	for name, m := range bad {
		remote := "127.0.0.1:700"
		switch name {
		case "remote":
			remote = "192.0.2.1:700"
		case "from an unprivileged port":
			remote = "127.0.0.1:40000" // any local user (rpc.statd takes it)
		}
		if r := req(remote, m); r.Res != StatFail || r.State != 1 {
			t.Errorf("%s: %+v, want STAT_FAIL with state 1", name, r)
		}
	}
	// A my_name naming no virtual server falls back to the address called.
	if r := req("127.0.0.1:700", m); r.Res != StatSucc {
		t.Fatalf("unknown my_name: %+v", r)
	}
	// Remote or unprivileged SM_UNMON, SM_UNMON_ALL and SM_SIMU_CRASH do
	// nothing.
	before := len(n.svc.Records(vip2))
	for _, remote := range []string{"192.0.2.1:700", "127.0.0.1:40000"} {
		r := &sunrpc.Request{Remote: netip.MustParseAddrPort(remote), Local: netip.MustParseAddrPort("127.0.0.2:662"), Args: good.MonID.MyID.Append(nil)}
		if _, err := n.svc.handleUnmonAll(context.Background(), r, nil); err != nil || len(n.svc.Records(vip2)) != before {
			t.Fatalf("SM_UNMON_ALL from %s removed records", remote)
		}
		r.Args = good.MonID.Append(nil)
		if _, err := n.svc.handleUnmon(context.Background(), r, nil); err != nil || len(n.svc.Records(vip2)) != before {
			t.Fatalf("SM_UNMON from %s removed records", remote)
		}
		r.Args = nil
		if _, err := n.svc.handleSimuCrash(context.Background(), r, nil); err != nil {
			t.Fatal(err)
		}
		if st, _ := n.svc.State(vip2); st != 1 {
			t.Fatalf("SM_SIMU_CRASH from %s restarted the virtual server", remote)
		}
	}
	r := &sunrpc.Request{Remote: netip.MustParseAddrPort("192.0.2.1:700"), Local: netip.MustParseAddrPort("127.0.0.2:662")}
	// Over real sockets: from a privileged port (bound as bindresvport
	// does) SM_MON is served; from any other it is refused.
	if os.Geteuid() == 0 {
		for _, reserved := range []bool{true, false} {
			c, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(vip2, n.port),
				sunrpc.ClientOptions{Local: mustAddr("127.0.0.1"), Retransmit: 200 * time.Millisecond, Reserved: reserved})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			res, err := c.Call(ctx, Prog, Vers, ProcMon, good.Append(nil))
			cancel()
			c.Close()
			var out StatRes
			out.Decode(xdr.NewDecoder(res))
			if err != nil || (out.Res == StatSucc) != reserved {
				t.Fatalf("SM_MON over UDP from %v (reserved %v): %+v %v", c.LocalAddr(), reserved, out, err)
			}
		}
	}
	// Garbage is GARBAGE_ARGS, not a panic.
	r.Args = []byte{0, 0, 0, 9, 'x'}
	if _, err := n.svc.handleMon(context.Background(), r, nil); !errors.Is(err, sunrpc.ErrGarbageArgs) {
		t.Fatalf("garbage SM_MON: %v", err)
	}
}

func TestStatAndSimuCrash(t *testing.T) {
	n := startNode(t, nodeOpts{resolver: fakeResolver{"known.example": {mustAddr("127.0.2.1")}}})
	stat := func(name string) StatRes {
		var r StatRes
		r.Decode(xdr.NewDecoder(n.call(mustAddr("127.0.0.1"), vip3, ProcStat, xdr.AppendString(nil, name))))
		return r
	}
	if r := stat("known.example"); r.Res != StatSucc || r.State != 1 {
		t.Fatalf("SM_STAT known: %+v", r)
	}
	if r := stat("unknown.example"); r.Res != StatFail || r.State != 1 {
		t.Fatalf("SM_STAT unknown: %+v", r)
	}
	if err := n.svc.Monitor(context.Background(), vip3, "c", clientAddr(3)); err != nil {
		t.Fatal(err)
	}
	n.call(mustAddr("127.0.0.1"), vip3, ProcSimuCrash, nil)
	if r := stat("known.example"); r.State != 3 {
		t.Fatalf("state after SM_SIMU_CRASH = %d, want 3", r.State)
	}
	if st, _ := n.svc.State(vip2); st != 1 {
		t.Fatal("SM_SIMU_CRASH to one virtual server restarted another")
	}
	if err := n.peers.WaitNotified(1, 5*time.Second); err != nil {
		t.Fatal("SM_SIMU_CRASH notified nobody")
	}
	if nt := n.peers.Notifications()[0]; nt.To != clientAddr(3) || nt.State != 3 || nt.MonName != "127.0.0.3" {
		t.Fatalf("notification %+v", nt)
	}
}

// Idle clients stop being monitored two sweeps after they went idle, and a
// client monitored again between the sweeps keeps its record.
func TestPrune(t *testing.T) {
	n := startNode(t, nodeOpts{})
	ctx := context.Background()
	for i := range 3 {
		if err := n.svc.Monitor(ctx, vip2, "c", clientAddr(i)); err != nil {
			t.Fatal(err)
		}
	}
	active := func(c Client) bool { return c.Addr == clientAddr(0) }
	gen := n.svc.Generation()
	if n.svc.Prune(active) != 0 || n.svc.Generation() == gen {
		t.Fatal("first sweep must only mark, and make marked clients check in again")
	}
	// Client 1 locks again between the sweeps.
	if err := n.svc.Monitor(ctx, vip2, "c", clientAddr(1)); err != nil {
		t.Fatal(err)
	}
	if got := n.svc.Prune(active); got != 1 {
		t.Fatalf("second sweep removed %d, want 1", got)
	}
	var left []netip.Addr
	for _, r := range n.svc.Records(vip2) {
		left = append(left, r.Addrs[0])
	}
	slices.SortFunc(left, netip.Addr.Compare)
	if !slices.Equal(left, []netip.Addr{clientAddr(0), clientAddr(1)}) {
		t.Fatalf("records left: %v", left)
	}
	if got := len(files(t, filepath.Join(n.dir, "127.0.0.2", "sm"))); got != 2 {
		t.Fatalf("%d files left", got)
	}
}

// A client waiting in the notify list is monitored while the records
// load: its Monitor (a notified client's reclaim) answers at once, from
// the list's names; a client not in it waits for the records.
func TestMonitorPendingBeforeRecords(t *testing.T) {
	dir := t.TempDir()
	d, err := OpenDir(dir, vip3)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddClient(Client{Caller: "one", Addr: clientAddr(1)}, ""); err != nil {
		t.Fatal(err)
	}
	reg := virtualserver.New(virtualserver.Config{Servers: []virtualserver.Spec{{Addr: vip3}}})
	vs, ok := reg.Lookup(vip3)
	if !ok {
		t.Fatal("vip3 not served")
	}
	svc, err := New(Config{VirtualServers: reg, StateDir: dir, RPC: &sunrpc.Server{}, Logger: logger(t, false)})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	// Without Notify, the records wait launchWait before they load.
	if _, err := svc.Start(vs, Restart); err != nil {
		t.Fatal(err)
	}
	svc.mu.Lock()
	v := svc.vips[vip3]
	svc.mu.Unlock()
	ctx := context.Background()
	if err := svc.Monitor(ctx, vip3, "one", clientAddr(1)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-v.ready:
		t.Fatal("Monitor of a client being notified waited for the records")
	default:
	}
	if err := svc.Monitor(ctx, vip3, "two", clientAddr(2)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-v.ready:
	default:
		t.Fatal("Monitor of a new client did not wait for the records")
	}
	var callers []string
	for _, r := range svc.Records(vip3) {
		callers = append(callers, r.Caller)
	}
	slices.Sort(callers)
	if !slices.Equal(callers, []string{"one", "two"}) {
		t.Fatalf("records after the load: %v", callers)
	}
}

// Damaged records and state files are reported and skipped, never fatal;
// temporary files of an interrupted write are cleaned up.
func TestDamagedState(t *testing.T) {
	dir := t.TempDir()
	d, err := OpenDir(dir, vip2)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddClient(Client{Caller: "ok", Addr: clientAddr(1)}, ""); err != nil {
		t.Fatal(err)
	}
	sm := filepath.Join(dir, "127.0.0.2", "sm")
	for name, body := range map[string]string{
		"client-torn.json":             `{"kind":"client","mon_na`,
		"client-noaddr.json":           `{"kind":"client","mon_name":"x","my_name":"y","priv":"00000000000000000000000000000000"}`,
		virtualserver.TempPrefix + "x": "partial",
	} {
		if err := os.WriteFile(filepath.Join(sm, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "127.0.0.2", "state"), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOpts{dir: dir, vips: []virtualserver.Spec{{Addr: vip2}}})
	if err := n.peers.WaitNotified(1, 5*time.Second); err != nil {
		t.Fatal("the good record was not notified")
	}
	st, _ := n.svc.State(vip2)
	if st < 800_000_000 || st%2 != 1 {
		t.Fatalf("state after a damaged state file = %d, want an odd number from the clock", st)
	}
	nd := filepath.Join(dir, "127.0.0.2", "notify")
	waitFor(t, "damaged records set aside", func() bool {
		f := files(t, nd)
		return slices.Contains(f, "client-torn.json.damaged") && slices.Contains(f, "client-noaddr.json.damaged") && len(f) == 2
	})
	// The good record, notified, is back on the monitor list; the
	// temporary file is gone.
	waitFor(t, "the notified record back in sm/", func() bool {
		f := files(t, sm)
		return len(f) == 1 && strings.HasPrefix(f[0], "client-127.0.1.2-")
	})
}

func TestNextState(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		prev int32
		err  error
		want int32
	}{{0, nil, 1}, {1, nil, 3}, {4, nil, 5}, {2147483647, nil, 1}, {7, ErrBadState, int32(now.Unix()-946684800) | 1}} {
		if got := nextState(c.prev, c.err, now); got != c.want {
			t.Errorf("nextState(%d, %v) = %d, want %d", c.prev, c.err, got, c.want)
		}
	}
}

// The HA callout sees add-client, del-client and sm-notify with rpc.statd's
// arguments, in order; a hanging callout is killed and blocks nothing.
func TestHACallout(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "callout.log")
	script := filepath.Join(dir, "callout.sh")
	body := "#!/bin/sh\n[ \"$1\" = hang ] && sleep 60\necho \"$@\" >> " + log + "\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOpts{callout: script})
	ctx := context.Background()
	if err := n.svc.Monitor(ctx, vip2, "one", clientAddr(1)); err != nil {
		t.Fatal(err)
	}
	n.svc.runCallout("hang")
	start := time.Now()
	n.call(clientAddr(1), vip2, ProcNotify, (&StatChge{MonName: "one", State: 3}).Append(nil))
	if time.Since(start) > time.Second {
		t.Fatal("a hanging callout held up SM_NOTIFY")
	}
	n.svc.Prune(func(Client) bool { return false })
	n.svc.Prune(func(Client) bool { return false })
	want := "add-client 127.0.1.2 vip-two\nsm-notify one 127.0.1.2 3\ndel-client 127.0.1.2 vip-two\n"
	waitFor(t, "the callouts", func() bool {
		b, _ := os.ReadFile(log)
		return string(b) == want
	})
}

// The export is what sm-notify reads: 7 fields per line, one file per peer,
// a native-endian state file.
func TestExportSM(t *testing.T) {
	dir := t.TempDir()
	d, err := OpenDir(dir, vip2)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetState(5); err != nil {
		t.Fatal(err)
	}
	if err := d.AddClient(Client{Caller: "one", Addr: clientAddr(1)}, "vip-two"); err != nil {
		t.Fatal(err)
	}
	rec := &Record{Kind: KindSMMon, MonName: "peer", Addrs: []netip.Addr{clientAddr(2)}, MyName: "node", Prog: 100021, Vers: 3, Proc: 24, Created: fixedTime}
	copy(rec.Priv[:], "0123456789abcdef")
	if err := d.st.put(notifyDir, rec); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	nrec, err := d.ExportSM(out)
	if err != nil || nrec != 2 {
		t.Fatalf("export: %d, %v", nrec, err)
	}
	b, _ := os.ReadFile(filepath.Join(out, "sm", "127.0.1.2"))
	if got, want := string(b), fmt.Sprintf("%08x 000186b5 00000004 00000010 00000000000000000000000000000000 127.0.1.2 vip-two\n", loopbackSAddr); got != want {
		t.Fatalf("client line:\n got %q\nwant %q", got, want)
	}
	b, _ = os.ReadFile(filepath.Join(out, "sm", "peer"))
	if got := strings.Fields(string(b)); len(got) != 7 || got[3] != "00000018" || got[4] != "30313233343536373839616263646566" {
		t.Fatalf("sm_mon line: %q", b)
	}
	st, _ := os.ReadFile(filepath.Join(out, "state"))
	if len(st) != 4 || st[0]+st[3] != 5 {
		t.Fatalf("state file %x", st)
	}
	if _, err := os.Stat(filepath.Join(out, "sm.bak")); err != nil {
		t.Fatal(err)
	}
}

// Many first monitors at once: each client's record is written once, all
// land, and none is lost to a restart running beside them.
func TestConcurrentMonitor(t *testing.T) {
	n := startNode(t, nodeOpts{})
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 50 {
				if err := n.svc.Monitor(ctx, vip2, "c", clientAddr(i)); err != nil {
					t.Error(err)
				}
				if w == 0 && i == 25 {
					v, err := n.svc.vipFor(ctx, n.vs(vip2))
					if err == nil {
						_, err = n.svc.restart(v, true)
					}
					if err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	// Every client monitored after the restart has its record in memory
	// and on disk.
	recs := n.svc.Records(vip2)
	onDisk := files(t, filepath.Join(n.dir, "127.0.0.2", "sm"))
	if len(recs) != len(onDisk) {
		t.Fatalf("%d records in memory, %d on disk", len(recs), len(onDisk))
	}
	for _, r := range recs {
		if !slices.Contains(onDisk, r.fileName()) {
			t.Fatalf("record %s not on disk", r.fileName())
		}
	}
}

// Our own notification come back to us (this node is a client of its own
// virtual server) is no client reboot; the lock managers that monitor the
// virtual server by SM_MON still hear of it.
func TestSelfNotification(t *testing.T) {
	n := startNode(t, nodeOpts{})
	if err := n.peers.ServeLockd(3); err != nil {
		t.Fatal(err)
	}
	if err := n.svc.Monitor(context.Background(), vip2, "self", vip2); err != nil {
		t.Fatal(err)
	}
	mon := Mon{MonID: MonID{MonName: "vip-two", MyID: MyID{MyName: "127.0.0.2", Prog: 100021, Vers: 3, Proc: 16}}}
	n.call(mustAddr("127.0.0.1"), vip2, ProcMon, mon.Append(nil))
	notify := func(remote netip.AddrPort) {
		r := &sunrpc.Request{Remote: remote, Local: netip.AddrPortFrom(vip2, n.port), Args: (&StatChge{MonName: "vip-two", State: 3}).Append(nil)}
		if _, err := n.svc.handleNotify(context.Background(), r, nil); err != nil {
			t.Fatal(err)
		}
	}
	notify(netip.AddrPortFrom(vip2, n.port))
	if err := n.peers.WaitCallbacks(1, 5*time.Second); err != nil {
		t.Fatal("the lock manager monitoring the virtual server was not called back")
	}
	if len(n.rebootedClients()) != 0 {
		t.Fatal("our own notification dropped a client's locks")
	}
	// The same from another port is a client's statd: it counts.
	r := &sunrpc.Request{Remote: netip.AddrPortFrom(vip2, 999), Local: netip.AddrPortFrom(vip2, n.port), Args: (&StatChge{MonName: "127.0.0.2", State: 5}).Append(nil)}
	if _, err := n.svc.handleNotify(context.Background(), r, nil); err != nil {
		t.Fatal(err)
	}
	if got := n.rebootedClients(); len(got) != 1 || got[0][0].Caller != "self" {
		t.Fatalf("rebooted: %v", got)
	}
}

// One SM_NOTIFY matching thousands of records (one address, many
// caller_names) is answered at once — only the matching runs on the RPC
// worker — and acted on in one batch: every record written with one
// file-system sync, one OnReboot for all (issue 10, item 1). Meanwhile
// other calls are served.
func TestRebootOffTheRequestPath(t *testing.T) {
	n := startNode(t, nodeOpts{quiet: true})
	ctx := context.Background()
	host := clientAddr(1)
	const names = 3000
	for i := range names {
		if err := n.svc.Monitor(ctx, vip2, fmt.Sprintf("name-%d", i), host); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	n.call(host, vip2, ProcNotify, (&StatChge{MonName: host.String(), State: 9}).Append(nil))
	answered := time.Since(start)
	got := n.rebootedClients()
	acted := time.Since(start)
	if len(got) != 1 || len(got[0]) != names {
		t.Fatalf("OnReboot calls: %d, first with %d clients; want one with %d", len(got), len(got[0]), names)
	}
	if answered > 500*time.Millisecond {
		t.Fatalf("SM_NOTIFY answered after %v: the work is on the request path", answered)
	}
	// Durable: read back from disk.
	d, err := OpenDir(n.dir, vip2)
	if err != nil {
		t.Fatal(err)
	}
	recs, errs := d.Records()
	if len(errs) > 0 || len(recs) != names {
		t.Fatalf("%d records read back, errors %v", len(recs), errs)
	}
	for _, r := range recs {
		if r.LastState != 9 {
			t.Fatalf("record %s on disk has state %d", r.Caller, r.LastState)
		}
	}
	t.Logf("%d records: answered in %v, acted on in %v", names, answered, acted)
}

// Once a virtual server has left this node, nothing more is written into
// its directory — not a reboot's records, not a new client's — even by
// a writer that found it before (issue 10, item 6): the next owner may be
// using it already.
func TestDetachFencesWriters(t *testing.T) {
	n := startNode(t, nodeOpts{})
	ctx := context.Background()
	if err := n.svc.Monitor(ctx, vip2, "one", clientAddr(1)); err != nil {
		t.Fatal(err)
	}
	v := n.svc.startedVIP(vip2)
	sm := filepath.Join(n.dir, "127.0.0.2", "sm")
	before := files(t, sm)
	stat := func() time.Time {
		st, err := os.Stat(sm)
		if err != nil {
			t.Fatal(err)
		}
		return st.ModTime()
	}
	mtime := stat()
	n.svc.Detach(vip2)
	// A reboot handled with the records found before the release...
	v.mu.Lock()
	var e *entry
	for _, x := range v.recs {
		e = x
	}
	v.mu.Unlock()
	r := *e.rec
	r.LastState = 77
	v.persist(map[*entry]*Record{e: &r})
	// ... and a new client monitored through it.
	if err := n.svc.add(ctx, v, clientKey("two", clientAddr(2)), func() *Record {
		return clientRecord(Client{VIP: vip2, Caller: "two", Addr: clientAddr(2)}, "127.0.0.2", time.Now())
	}); !errors.Is(err, ErrDetached) || !errors.Is(err, virtualserver.ErrRetryLater) {
		t.Fatalf("monitoring through a released virtual server: %v", err)
	}
	if after := files(t, sm); !slices.Equal(after, before) || !stat().Equal(mtime) {
		t.Fatalf("sm/ changed after the release: %v -> %v", before, after)
	}
	if _, err := os.Stat(filepath.Join(n.dir, "127.0.0.2", journalFile)); !os.IsNotExist(err) {
		t.Fatalf("the reboot journal was written after the release: %v", err)
	}
	recs, _ := mustOpen(t, n.dir).Records()
	if len(recs) != 1 || recs[0].LastState != 0 {
		t.Fatalf("records on disk: %+v", recs)
	}
}

func mustOpen(t *testing.T, dir string) *Dir {
	t.Helper()
	d, err := OpenDir(dir, vip2)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
