package nlm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/nlm/lockmgr"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

type env struct {
	srv  *sunrpc.Server
	svc  *Service
	b    *memdlm.Backend
	reg  *virtualserver.Registry
	port uint16
}

type envOpt func(*Config, *virtualserver.Config)

func newEnv(t *testing.T, opts ...envOpt) *env {
	t.Helper()
	vcfg := virtualserver.Config{ServeUnknown: true}
	inner := memdlm.New()
	cfg := Config{Backend: inner}
	for _, o := range opts {
		o(&cfg, &vcfg) // may wrap the backend
	}
	e := &env{srv: &sunrpc.Server{}, b: inner}
	vcfg.Claims = cfg.Backend
	e.reg = virtualserver.New(vcfg)
	cfg.VirtualServers, cfg.RPC = e.reg, e.srv
	if vcfg.Orchestrated {
		orchestrate(t, e.reg)
	}
	l, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	e.port = uint16(l.Addr().(*net.TCPAddr).Port)
	pc, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", e.port))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Port = e.port
	e.svc = New(cfg)
	for _, p := range e.svc.Programs() {
		if err := e.srv.Register(p); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() { e.srv.Serve(l) })
	wg.Go(func() { e.srv.ServePacket(pc) })
	t.Cleanup(func() {
		e.srv.Close()
		wg.Wait()
		e.svc.Close()
	})
	return e
}

// client returns an NLM client calling vip from the address from.
func (e *env) client(t *testing.T, from, vip string, tr sunrpc.Transport, vers uint32) *Client {
	t.Helper()
	c, err := sunrpc.Dial(context.Background(), tr, netip.AddrPortFrom(netip.MustParseAddr(vip), e.port),
		sunrpc.ClientOptions{Local: netip.MustParseAddr(from), Retransmit: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return NewClient(c, vers)
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return c
}

var fh1 = []byte("file-handle-0001")

func lk(caller string, svid int32, off, n uint64) Lock {
	return Lock{CallerName: []byte(caller), FH: fh1, OH: []byte(fmt.Sprintf("%d@%s", svid, caller)), SVID: svid, Offset: off, Len: n}
}

func mustLock(t *testing.T, c *Client, l Lock, excl, block bool, want Stat) {
	t.Helper()
	cookie := []byte(fmt.Sprintf("ck-%d-%d", l.SVID, l.Offset))
	r, err := c.Lock(ctx(t), &LockArgs{Cookie: cookie, Block: block, Exclusive: excl, Lock: l, State: 1})
	if err != nil {
		t.Fatal(err)
	}
	if r.Stat != want || !bytes.Equal(r.Cookie, cookie) {
		t.Fatalf("LOCK %s/%d [%d,+%d): %v cookie %q, want %v cookie %q", l.CallerName, l.SVID, l.Offset, l.Len, r.Stat, r.Cookie, want, cookie)
	}
}

func mustTest(t *testing.T, c *Client, l Lock, excl bool) TestRes {
	t.Helper()
	r, err := c.Test(ctx(t), &TestArgs{Cookie: []byte("test"), Exclusive: excl, Lock: l})
	if err != nil {
		t.Fatal(err)
	}
	if string(r.Cookie) != "test" {
		t.Fatalf("TEST reply cookie %q", r.Cookie)
	}
	return r
}

func mustUnlock(t *testing.T, c *Client, l Lock) {
	t.Helper()
	r, err := c.Unlock(ctx(t), &UnlockArgs{Cookie: []byte("u"), Lock: l})
	if err != nil || r.Stat != Granted || string(r.Cookie) != "u" {
		t.Fatalf("UNLOCK: %+v %v", r, err)
	}
}

func TestLockTestUnlock(t *testing.T) {
	e := newEnv(t)
	for _, tr := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
		t.Run(tr.String(), func(t *testing.T) {
			a := e.client(t, "127.0.0.10", "127.0.0.2", tr, Vers4)
			b := e.client(t, "127.0.0.11", "127.0.0.2", tr, Vers4)
			mustLock(t, a, lk("hostA", 1, 0, 100), true, false, Granted)
			r := mustTest(t, b, lk("hostB", 9, 50, 100), true)
			want := Holder{Exclusive: true, SVID: 1, OH: []byte("1@hostA"), Offset: 0, Len: 100}
			if r.Stat != Denied || !reflectEqual(r.Holder, want) {
				t.Fatalf("TEST: %v %+v, want DENIED %+v", r.Stat, r.Holder, want)
			}
			mustLock(t, b, lk("hostB", 9, 50, 100), false, false, Denied)
			mustUnlock(t, a, lk("hostA", 1, 0, 100))
			if r := mustTest(t, b, lk("hostB", 9, 50, 100), true); r.Stat != Granted {
				t.Fatalf("after unlock: %v", r.Stat)
			}
		})
	}
}

func reflectEqual(a, b Holder) bool {
	return a.Exclusive == b.Exclusive && a.SVID == b.SVID && bytes.Equal(a.OH, b.OH) && a.Offset == b.Offset && a.Len == b.Len
}

// The same caller_name and svid through two virtual servers are two
// owners; FREE_ALL through one leaves the other alone.
func TestVirtualServersSeparateOwners(t *testing.T) {
	e := newEnv(t)
	viaX := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	viaY := e.client(t, "127.0.0.10", "127.0.0.3", sunrpc.TCP, Vers4)
	mustLock(t, viaX, lk("c", 1, 0, 10), true, false, Granted)
	mustLock(t, viaY, lk("c", 1, 0, 10), true, false, Denied)
	mustLock(t, viaY, lk("c", 1, 20, 10), true, false, Granted)
	if err := viaX.FreeAll(ctx(t), &Notify{Name: []byte("c"), State: 3}); err != nil {
		t.Fatal(err)
	}
	if r := mustTest(t, viaY, lk("other", 2, 0, 10), true); r.Stat != Granted {
		t.Fatalf("FREE_ALL through X left X's lock: %v", r.Stat)
	}
	if r := mustTest(t, viaX, lk("other", 2, 20, 10), true); r.Stat != Denied {
		t.Fatalf("FREE_ALL through X dropped Y's lock: %v", r.Stat)
	}
	// FREE_ALL naming the host from another address frees nothing.
	other := e.client(t, "127.0.0.99", "127.0.0.3", sunrpc.TCP, Vers4)
	other.FreeAll(ctx(t), &Notify{Name: []byte("c"), State: 3})
	if r := mustTest(t, viaX, lk("other", 2, 20, 10), true); r.Stat != Denied {
		t.Fatal("FREE_ALL from another address freed the host's locks")
	}
}

func TestRangeLimitsByVersion(t *testing.T) {
	e := newEnv(t)
	v4 := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	v3 := e.client(t, "127.0.0.11", "127.0.0.2", sunrpc.TCP, Vers3)
	v1 := e.client(t, "127.0.0.12", "127.0.0.2", sunrpc.UDP, Vers1)

	mustLock(t, v4, lk("a", 1, Offset64Max, 1), true, false, Granted) // the last byte
	mustLock(t, v4, lk("a", 1, Offset64Max+1, 1), true, false, FBig)
	mustLock(t, v4, lk("a", 1, 1<<62, 1<<62), true, false, Granted) // ends exactly at 2^63
	mustLock(t, v4, lk("a", 1, 1<<62, 1<<62+1), true, false, FBig)  // one byte past 2^63-1
	mustLock(t, v4, lk("a", 1, 1<<62, 0), true, false, Granted)     // to EOF is fine

	on := func(l Lock, fh string) Lock { l.FH = []byte(fh); return l }
	mustLock(t, v3, on(lk("b", 1, 1<<32-1, 1), "f32"), true, false, Granted) // the last 32-bit byte
	mustLock(t, v3, on(lk("b", 1, 1<<32-10, 11), "f32"), true, false, DeniedNoLocks)
	mustLock(t, v1, on(lk("c", 1, 100, 0), "f32"), false, false, Denied)          // to EOF meets b's last byte
	mustLock(t, v1, on(lk("c", 1, 100, 1<<32-101), "f32"), false, false, Granted) // up to it

	// A v3 tester sees a 64-bit holder as far as it can.
	mustLock(t, v4, lk("a", 2, 1<<40, 10), true, false, Granted)
	r := mustTest(t, v3, lk("b", 2, 1000, 0), true)
	if r.Stat != Denied {
		t.Fatalf("v3 TEST to EOF: %v", r.Stat)
	}
	if r.Holder.Offset > Offset32Max {
		t.Fatalf("v3 holder offset %d does not fit 32 bits", r.Holder.Offset)
	}
	// Version 1 has no SHARE.
	_, err := v1.Share(ctx(t), &ShareArgs{Share: Share{CallerName: []byte("c"), FH: fh1}})
	if !errors.Is(err, sunrpc.ErrProcUnavail) {
		t.Fatalf("v1 SHARE: %v", err)
	}
}

// orchestrate takes over every address a request comes for, as after a
// crash: a full grace period. It stops with the test.
func orchestrate(t *testing.T, reg *virtualserver.Registry) {
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		reg.HandleEvents(ctx, func(ctx context.Context, ev virtualserver.Event) {
			if ev.Kind != virtualserver.Wanted {
				return
			}
			vs, created, err := reg.Begin(ctx, ev.Spec, 1)
			if err != nil {
				t.Error(err)
				return
			}
			if created {
				vs.BeginGrace(false, true, nil)
				vs.Serve()
			}
		})
		close(done)
	}()
	t.Cleanup(func() { stop(); <-done })
}

func TestGraceRules(t *testing.T) {
	e := newEnv(t, func(_ *Config, v *virtualserver.Config) {
		v.Grace = time.Hour
		v.Orchestrated = true
	})
	c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, c, lk("a", 1, 0, 10), true, false, DeniedGracePeriod)
	if r := mustTest(t, c, lk("a", 1, 0, 10), true); r.Stat != DeniedGracePeriod {
		t.Fatalf("TEST in grace: %v", r.Stat)
	}
	r, err := c.Lock(ctx(t), &LockArgs{Cookie: []byte("r"), Exclusive: true, Lock: lk("a", 1, 0, 10), Reclaim: true})
	if err != nil || r.Stat != Granted {
		t.Fatalf("reclaim in grace: %+v %v", r, err)
	}
	mustUnlock(t, c, lk("a", 1, 0, 10))
	// Grace is per virtual server: ending it on one leaves the other.
	vx, _ := e.reg.Lookup(netip.MustParseAddr("127.0.0.2"))
	vx.EndGrace(virtualserver.EndAdmin)
	mustLock(t, c, lk("a", 1, 0, 10), true, false, Granted)
	cy := e.client(t, "127.0.0.10", "127.0.0.3", sunrpc.TCP, Vers4)
	mustLock(t, cy, lk("a", 1, 50, 10), true, false, DeniedGracePeriod)
	// Outside grace a reclaim of a lock that is not held is refused.
	r, _ = c.Lock(ctx(t), &LockArgs{Cookie: []byte("r"), Exclusive: true, Lock: lk("a", 1, 500, 10), Reclaim: true})
	if r.Stat != DeniedGracePeriod {
		t.Fatalf("reclaim outside grace: %v", r.Stat)
	}
}

// Malformed arguments get GARBAGE_ARGS; the server goes on serving.
func TestGarbageArgs(t *testing.T) {
	e := newEnv(t)
	for _, tr := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
		c := e.client(t, "127.0.0.10", "127.0.0.2", tr, Vers4)
		good := (&LockArgs{Cookie: []byte("x"), Lock: lk("a", 1, 0, 1)}).Append(nil, Vers4)
		for _, proc := range []uint32{ProcTest, ProcLock, ProcCancel, ProcUnlock, ProcGranted, ProcLockMsg, ProcGrantedRes, ProcShare, ProcUnshare, ProcNMLock, ProcFreeAll, ProcSMNotify} {
			for _, args := range [][]byte{nil, good[:7], {0xff, 0xff, 0xff, 0xff}, {0, 0, 0, 8, 1, 2, 3}} {
				_, err := c.RPC.Call(ctx(t), Prog, Vers4, proc, args)
				if !errors.Is(err, sunrpc.ErrGarbageArgs) {
					t.Fatalf("%v proc %d args %x: %v, want GARBAGE_ARGS", tr, proc, args, err)
				}
			}
		}
		if err := c.Null(ctx(t)); err != nil {
			t.Fatal(err)
		}
		mustLock(t, c, lk("a", 1, 0, 10), true, false, Granted)
		mustUnlock(t, c, lk("a", 1, 0, 10))
	}
}

type fakeValidator map[string]bool

func (v fakeValidator) Valid(_ context.Context, fh []byte) (bool, error) {
	ok, known := v[string(fh)]
	if !known {
		return false, errors.New("cannot tell")
	}
	return ok, nil
}

func TestStaleFileHandle(t *testing.T) {
	e := newEnv(t, func(c *Config, _ *virtualserver.Config) {
		c.FHValidator = fakeValidator{string(fh1): true, "stale": false}
	})
	c4 := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	c3 := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers3)
	stale := lk("a", 1, 0, 10)
	stale.FH = []byte("stale")
	if r := mustTest(t, c4, stale, true); r.Stat != StaleFH {
		t.Fatalf("v4 TEST stale: %v", r.Stat)
	}
	mustLock(t, c4, stale, true, false, StaleFH)
	mustLock(t, c3, stale, true, false, Granted) // v3 handles are NFSv2's: not checked
	mustLock(t, c4, lk("a", 1, 0, 10), true, false, Granted)
	// A validator that cannot tell lets the request through.
	unknown := lk("a", 1, 0, 10)
	unknown.FH = []byte("unknown")
	mustLock(t, c4, unknown, true, false, Granted)
}

func TestShareOverTheWire(t *testing.T) {
	e := newEnv(t)
	a := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.UDP, Vers4)
	b := e.client(t, "127.0.0.11", "127.0.0.2", sunrpc.TCP, Vers3)
	sh := func(c *Client, host, oh string, mode, access uint32, unshare bool) Stat {
		t.Helper()
		args := &ShareArgs{Cookie: []byte("s"), Share: Share{CallerName: []byte(host), FH: fh1, OH: []byte(oh), Mode: mode, Access: access}}
		var r ShareRes
		var err error
		if unshare {
			r, err = c.Unshare(ctx(t), args)
		} else {
			r, err = c.Share(ctx(t), args)
		}
		if err != nil || string(r.Cookie) != "s" {
			t.Fatalf("share: %+v %v", r, err)
		}
		return r.Stat
	}
	if st := sh(a, "ha", "o1", 2, 1, false); st != Granted {
		t.Fatal(st)
	}
	if st := sh(b, "hb", "o2", 0, 2, false); st != Denied {
		t.Fatalf("write access against deny-write: %v", st)
	}
	if st := sh(a, "ha", "o1", 0, 0, true); st != Granted {
		t.Fatal(st)
	}
	if st := sh(b, "hb", "o2", 0, 2, false); st != Granted {
		t.Fatalf("after unshare: %v", st)
	}
	if st := sh(b, "hb", "missing", 0, 0, true); st != Granted {
		t.Fatalf("unshare of nothing: %v", st)
	}
}

// Over UDP, a retransmitted UNLOCK that arrives after a newer LOCK must not
// undo it: the duplicate request cache answers it.
func TestRetransmittedUnlockIsHarmless(t *testing.T) {
	e := newEnv(t)
	conn, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 10)}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: int(e.port)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	call := func(xid, proc uint32, args []byte) Res {
		h := sunrpc.CallHeader{XID: xid, RPCVers: 2, Prog: Prog, Vers: Vers4, Proc: proc}
		conn.Write(append(sunrpc.AppendCall(nil, &h), args...))
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 1024)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		_, body, err := sunrpc.ParseReply(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		var r Res
		r.Decode(xdr.NewDecoder(body))
		return r
	}
	l := lk("a", 1, 0, 10)
	lockArgs := (&LockArgs{Cookie: []byte("1"), Exclusive: true, Lock: l}).Append(nil, Vers4)
	unlockArgs := (&UnlockArgs{Cookie: []byte("2"), Lock: l}).Append(nil, Vers4)
	call(1, ProcLock, lockArgs)
	call(2, ProcUnlock, unlockArgs)
	call(3, ProcLock, lockArgs)
	call(2, ProcUnlock, unlockArgs) // the retransmission
	c := e.client(t, "127.0.0.11", "127.0.0.2", sunrpc.TCP, Vers4)
	if r := mustTest(t, c, lk("b", 5, 0, 10), true); r.Stat != Denied {
		t.Fatalf("a retransmitted UNLOCK undid the newer LOCK: %v", r.Stat)
	}
}

func TestPerHostLimits(t *testing.T) {
	e := newEnv(t, func(c *Config, _ *virtualserver.Config) { c.Limits = lockmgr.Limits{LocksPerHost: 2} })
	c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, c, lk("a", 1, 0, 10), true, false, Granted)
	mustLock(t, c, lk("a", 1, 20, 10), true, false, Granted)
	mustLock(t, c, lk("a", 1, 40, 10), true, false, DeniedNoLocks)
	// Another host is not limited by this one.
	d := e.client(t, "127.0.0.11", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, d, lk("b", 1, 40, 10), true, false, Granted)
}

// statd's private SM_NOTIFY callback drops the rebooted host's locks, and
// is accepted only from loopback.
func TestSMNotifyCallback(t *testing.T) {
	e := newEnv(t)
	c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, c, lk("rebooter", 1, 0, 10), true, false, Granted)

	remote := &sunrpc.Request{Vers: Vers4, Remote: netip.MustParseAddrPort("192.0.2.7:700"),
		Args: (&nsm.Status{MonName: "rebooter", State: 5}).Append(nil)}
	if _, err := e.svc.handleSMNotify(context.Background(), remote, nil); err != nil {
		t.Fatal(err)
	}
	other := e.client(t, "127.0.0.11", "127.0.0.2", sunrpc.TCP, Vers4)
	if r := mustTest(t, other, lk("x", 1, 0, 10), true); r.Stat != Denied {
		t.Fatal("a remote SM_NOTIFY callback was obeyed")
	}
	// From loopback but an unprivileged port: any local user could send
	// it. Refused, as Linux lockd does.
	if err := c.Msg(ctx(t), ProcSMNotify, (&nsm.Status{MonName: "127.0.0.10", State: 5}).Append(nil)); err != nil {
		t.Fatal(err)
	}
	if r := mustTest(t, other, lk("x", 1, 0, 10), true); r.Stat != Denied {
		t.Fatal("an SM_NOTIFY callback from an unprivileged local port was obeyed")
	}
	local := &sunrpc.Request{Vers: Vers4, Remote: netip.MustParseAddrPort("127.0.0.1:40000"),
		Args: (&nsm.Status{MonName: "127.0.0.10", State: 5}).Append(nil)}
	e.svc.handleSMNotify(context.Background(), local, nil)
	if r := mustTest(t, other, lk("x", 1, 0, 10), true); r.Stat != Denied {
		t.Fatal("an SM_NOTIFY callback from an unprivileged local port was obeyed")
	}
	local.Remote = netip.MustParseAddrPort("127.0.0.1:700")
	e.svc.handleSMNotify(context.Background(), local, nil)
	if r := mustTest(t, other, lk("x", 1, 0, 10), true); r.Stat != Granted {
		t.Fatalf("SM_NOTIFY callback from a privileged local port did not drop the locks: %v", r.Stat)
	}
}

// A request racing with the release of its virtual server adds nothing
// and gets no answer, so that the client sends it again to the next owner:
// DENIED_GRACE_PERIOD to a reclaim would make a Linux client give its
// lock up.
func TestReleasedVirtualServerFences(t *testing.T) {
	e := newEnv(t)
	for _, vers := range []uint32{Vers1, Vers3, Vers4} {
		c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.UDP, vers)
		mustLock(t, c, lk("held", 1, 0, 10), true, false, Granted)
	}
	vs, _ := e.reg.Lookup(netip.MustParseAddr("127.0.0.2"))
	vs.BeginRelease(context.Background())
	for _, vers := range []uint32{Vers1, Vers3, Vers4} {
		c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.UDP, vers)
		short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		for name, call := range map[string]func() error{
			"reclaim": func() error {
				_, err := c.Lock(short, &LockArgs{Cookie: []byte("c"), Exclusive: true, Reclaim: true, Lock: lk("a", 1, 0, 10)})
				return err
			},
			"unlock": func() error {
				_, err := c.Unlock(short, &UnlockArgs{Cookie: []byte("c"), Lock: lk("held", 1, 0, 10)})
				return err
			},
			"test": func() error {
				_, err := c.Test(short, &TestArgs{Cookie: []byte("c"), Exclusive: true, Lock: lk("held", 2, 0, 10)})
				return err
			},
		} {
			if err := call(); !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("v%d %s to a released virtual server: %v, want no answer", vers, name, err)
			}
		}
		cancel()
	}
	if n := e.b.Files(); n != 1 {
		t.Fatalf("%d files gained state", n)
	}
	e.b.Hosts(func(h *dlm.Host) bool {
		if want := map[string]int64{"held": 1}[h.Name]; h.Locks() != want {
			t.Errorf("%s holds %d locks, want %d: a fenced request changed state", h.Name, h.Locks(), want)
		}
		return true
	})
}

// recordingMonitor stands in for the NSM service at its interface.
type recordingMonitor struct {
	mu    sync.Mutex
	gen   uint64
	calls []string
	fail  bool
}

func (m *recordingMonitor) Monitor(_ context.Context, vip netip.Addr, caller string, addr netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, fmt.Sprintf("%s@%s via %s", caller, addr, vip))
	if m.fail {
		return errors.New("disk full")
	}
	return nil
}

func (m *recordingMonitor) Generation() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gen
}

func (m *recordingMonitor) set(gen uint64, fail bool) {
	m.mu.Lock()
	m.gen, m.fail = gen, fail
	m.mu.Unlock()
}

func (m *recordingMonitor) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.calls)
}

// A client is monitored before its first monitored lock is served, once
// per monitor generation; NM_LOCK is not monitored; a client that cannot
// be monitored gets DENIED_NOLOCKS and no lock.
func TestMonitorBeforeLock(t *testing.T) {
	m := &recordingMonitor{gen: 1}
	e := newEnv(t, func(c *Config, _ *virtualserver.Config) { c.Monitor = m })
	c := e.client(t, "127.0.0.5", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, c, lk("host-a", 1, 0, 10), true, false, Granted)
	mustLock(t, c, lk("host-a", 2, 20, 10), true, false, Granted)
	if m.count() != 1 || m.calls[0] != "host-a@127.0.0.5 via 127.0.0.2" {
		t.Fatalf("monitor calls: %v", m.calls)
	}
	if r, err := c.NMLock(ctx(t), &LockArgs{Cookie: []byte("n"), Exclusive: true, Lock: lk("host-b", 1, 40, 1)}); err != nil || r.Stat != Granted {
		t.Fatalf("NM_LOCK: %v %v", r.Stat, err)
	}
	if m.count() != 1 {
		t.Fatal("NM_LOCK was monitored")
	}
	m.set(2, false) // monitoring ended somewhere: every host checks in again
	mustLock(t, c, lk("host-a", 3, 60, 1), true, false, Granted)
	if m.count() != 2 {
		t.Fatalf("monitor calls after a generation change: %v", m.calls)
	}
	m.set(3, true)
	mustLock(t, c, lk("host-a", 4, 80, 1), true, false, DeniedNoLocks)
	other := e.client(t, "127.0.0.6", "127.0.0.2", sunrpc.TCP, Vers4)
	if r := mustTest(t, other, lk("host-c", 1, 80, 1), true); r.Stat != Granted {
		t.Fatalf("the refused lock was granted anyway: TEST says %v", r.Stat)
	}
	if r, err := c.Share(ctx(t), &ShareArgs{Cookie: []byte("s"), Share: Share{CallerName: []byte("host-a"), FH: fh1, OH: []byte("o"), Mode: 1, Access: 1}}); err != nil || r.Stat != DeniedNoLocks {
		t.Fatalf("SHARE of an unmonitorable host: %v %v", r.Stat, err)
	}
	// Sweep keeps what it knows of busy hosts and forgets idle ones.
	m.set(4, false)
	mustLock(t, c, lk("host-d", 1, 100, 1), true, false, Granted)
	mustLock(t, c, lk("host-e", 1, 200, 1), true, false, Granted)
	r, err := c.Unlock(ctx(t), &UnlockArgs{Cookie: []byte("u"), Lock: lk("host-e", 1, 200, 1)})
	if err != nil || r.Stat != Granted {
		t.Fatalf("UNLOCK: %v %v", r.Stat, err)
	}
	e.svc.Sweep()
	before := m.count()
	mustLock(t, c, lk("host-d", 2, 300, 1), true, false, Granted)
	if m.count() != before {
		t.Fatal("a busy host was forgotten by Sweep")
	}
	mustLock(t, c, lk("host-e", 2, 400, 1), true, false, Granted)
	if m.count() != before+1 {
		t.Fatal("an idle host was not forgotten by Sweep")
	}
	n := 0
	e.svc.monitored.Range(func(any, any) bool { n++; return true })
	if n != 2 { // host-d, host-e; host-a's was of an old generation
		t.Fatalf("%d hosts remembered, want 2", n)
	}
}

// One address cannot make the service keep a host (owner, monitor record)
// for every caller_name it sends (issue 10, item 8): past the bound, LOCK,
// NM_LOCK, TEST and SHARE under a new name are DENIED_NOLOCKS, UNLOCK is
// GRANTED (the name holds nothing) and CANCEL DENIED; known names and
// other addresses go on; a sweep frees the slots of names gone idle.
func TestCallerNamesPerAddress(t *testing.T) {
	e := newEnv(t)
	e.b.SetHostLimit(3)
	c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	for i := range 3 {
		mustLock(t, c, lk(fmt.Sprint("name-", i), 1, uint64(i)*10, 10), true, false, Granted)
	}
	mustLock(t, c, lk("name-3", 1, 100, 10), true, false, DeniedNoLocks)
	if r := mustTest(t, c, lk("name-3", 1, 100, 10), true); r.Stat != DeniedNoLocks {
		t.Fatalf("TEST under one name too many: %v", r.Stat)
	}
	r, err := c.Share(ctx(t), &ShareArgs{Cookie: []byte("s"), Share: Share{CallerName: []byte("name-3"), FH: []byte("f"), OH: []byte("o"), Mode: 1, Access: 1}})
	if err != nil || r.Stat != DeniedNoLocks {
		t.Fatalf("SHARE under one name too many: %v %v", r.Stat, err)
	}
	u, err := c.Unlock(ctx(t), &UnlockArgs{Cookie: []byte("u"), Lock: lk("name-4", 1, 0, 10)})
	if err != nil || u.Stat != Granted {
		t.Fatalf("UNLOCK under one name too many: %v %v", u.Stat, err)
	}
	mustLock(t, c, lk("name-0", 1, 50, 10), true, false, Granted) // a known name
	other := e.client(t, "127.0.0.11", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, other, lk("name-3", 1, 100, 10), true, false, Granted) // another address
	if got := e.svc.Stats().TooManyNames.Load(); got != 3 {
		t.Fatalf("refusals counted: %d", got)
	}
	// name-2 lets go; two sweeps later its slot is free.
	if u, _ := c.Unlock(ctx(t), &UnlockArgs{Cookie: []byte("u"), Lock: lk("name-2", 1, 20, 10)}); u.Stat != Granted {
		t.Fatal("unlock")
	}
	e.b.Sweep()
	e.b.Sweep()
	e.b.Sweep()
	mustLock(t, c, lk("name-3", 1, 200, 10), true, false, Granted)
}

// gateValidator holds every request between its virtual server's lookup
// and its edit, until released.
type gateValidator struct {
	arrived chan struct{}
	proceed chan struct{}
}

func (g *gateValidator) Valid(context.Context, []byte) (bool, error) {
	g.arrived <- struct{}{}
	<-g.proceed
	return true, nil
}

// A request that looked its virtual server up before the release began,
// and reaches the backend after, is fenced there by the claim: it adds
// nothing and gets no answer, and the release knows the client was cut
// off.
func TestInFlightRequestFencedByClaim(t *testing.T) {
	g := &gateValidator{arrived: make(chan struct{}), proceed: make(chan struct{})}
	e := newEnv(t, func(c *Config, _ *virtualserver.Config) { c.FHValidator = g })
	c := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.UDP, Vers4)
	go func() { <-g.arrived; g.proceed <- struct{}{} }()
	mustLock(t, c, lk("held", 1, 0, 10), true, false, Granted)
	vs, _ := e.reg.Lookup(netip.MustParseAddr("127.0.0.2"))
	grace := virtualserver.GraceHandover{Clients: []virtualserver.GraceClient{{Addr: netip.MustParseAddr("127.0.0.10")}}}

	done := make(chan error, 1)
	go func() {
		short, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := c.Lock(short, &LockArgs{Cookie: []byte("c"), Exclusive: true, Lock: lk("late", 1, 20, 10)})
		done <- err
	}()
	<-g.arrived // past the lookup, before the edit
	if _, ok, err := vs.BeginRelease(context.Background()); !ok || err != nil {
		t.Fatalf("BeginRelease: %v %v", ok, err)
	}
	g.proceed <- struct{}{}
	if err := <-done; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("in-flight LOCK during the release: %v, want no answer", err)
	}
	e.b.Hosts(func(h *dlm.Host) bool {
		if h.Name == "late" && h.Locks() != 0 {
			t.Errorf("the fenced LOCK left %d locks", h.Locks())
		}
		return true
	})
	vs.FinishHandover(&grace)
	if !grace.Clients[0].Resending {
		t.Error("the release does not know the fenced client will resend")
	}
}

// A reboot, noticed by the NSM service (host keys) or told by a local
// statd (procedure 16, by name), drops the host's state and stops the
// grace period waiting for it: one path for both.
func TestRebootedEndsTheWait(t *testing.T) {
	vip, a, b := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.10"), netip.MustParseAddr("127.0.0.11")
	e := newEnv(t, func(_ *Config, v *virtualserver.Config) { v.Grace = time.Hour })
	vs, _, err := e.reg.Begin(context.Background(), virtualserver.Spec{Addr: vip}, 1)
	if err != nil {
		t.Fatal(err)
	}
	vs.BeginGrace(true, true, []netip.Addr{a, b})
	vs.Serve()
	ca := e.client(t, a.String(), vip.String(), sunrpc.UDP, Vers4)
	r, err := ca.Lock(ctx(t), &LockArgs{Cookie: []byte("r"), Exclusive: true, Reclaim: true, Lock: lk("host-a", 1, 0, 10)})
	if err != nil || r.Stat != Granted {
		t.Fatalf("reclaim: %v %v", r.Stat, err)
	}
	if g := vs.Grace(); !g.Active || g.Pending != 2 {
		t.Fatalf("grace before the reboots: %+v", g)
	}
	// host-b rebooted, as the NSM service saw it.
	if err := e.svc.Rebooted(context.Background(), dlm.Selector{Keys: map[dlm.HostKey]bool{{VIP: vip, Name: "host-b", Addr: b}: true}}); err != nil {
		t.Fatal(err)
	}
	if g := vs.Grace(); g.Pending != 1 {
		t.Fatalf("after host-b's reboot: %d pending, want 1", g.Pending)
	}
	// host-a rebooted, as a local statd tells lockd (procedure 16).
	local := &sunrpc.Request{Vers: Vers4, Remote: netip.MustParseAddrPort("127.0.0.1:700"),
		Args: (&nsm.Status{MonName: "host-a", State: 3}).Append(nil)}
	if _, err := e.svc.handleSMNotify(context.Background(), local, nil); err != nil {
		t.Fatal(err)
	}
	if g := vs.Grace(); g.Active {
		t.Fatalf("after both reboots the grace period still waits: %+v", g)
	}
	e.b.Hosts(func(h *dlm.Host) bool {
		if h.Locks() != 0 {
			t.Errorf("%v still holds %d locks", h.HostKey, h.Locks())
		}
		return true
	})
}
