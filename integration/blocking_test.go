package integration

import (
	"context"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

const nlmPort = 4045

var (
	vip     = netip.MustParseAddr("127.0.0.2")
	hostA   = netip.MustParseAddr("127.0.0.4")
	hostB   = netip.MustParseAddr("127.0.0.5")
	fhBlock = []byte("blocking-test-file")
)

// startNLM serves NLM on every address of the namespace at the fixed port.
func startNLM(t *testing.T, cb nlm.CallbackConfig) (*nlm.Service, *memdlm.Backend) {
	t.Helper()
	srv := &sunrpc.Server{}
	backend := memdlm.New()
	svc := nlm.New(nlm.Config{
		Backend:        backend,
		VirtualServers: virtualserver.New(virtualserver.Config{ServeUnknown: true, Claims: backend}),
		RPC:            srv, Port: nlmPort, Callbacks: cb,
	})
	for _, p := range svc.Programs() {
		srv.Register(p)
	}
	serveOn(t, srv, "0.0.0.0", nlmPort)
	t.Cleanup(svc.Close)
	return svc, backend
}

// noPending waits for the file's pending grants to be settled: each GRANTED
// callback, once answered, is done with in the lock state too.
func noPending(t *testing.T, b *memdlm.Backend) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		var n int
		b.Read(context.Background(), fhBlock, func(f *dlm.File) { n = len(f.Pending()) })
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d grants still pending after their callbacks were answered", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// callback is a call the fake client lockd received.
type callback struct {
	proc   uint32
	from   netip.AddrPort
	args   nlm.TestArgs
	res    nlm.Res
	copied []byte
}

// clientLockd is host B's lock daemon: it answers the server's GRANTED
// calls (with the configured answer), takes GRANTED_MSG and answers it with
// GRANTED_RES like Linux does, and records *_RES calls.
type clientLockd struct {
	t      *testing.T
	answer atomic.Uint32 // nlm.Stat to answer GRANTED with
	calls  chan callback
	rpc    *sunrpc.Server
	port   uint16
}

func startClientLockd(t *testing.T, host netip.Addr) *clientLockd {
	t.Helper()
	d := &clientLockd{t: t, calls: make(chan callback, 16), rpc: &sunrpc.Server{}}
	testArgs := func(req *sunrpc.Request) (nlm.TestArgs, error) {
		var a nlm.TestArgs
		dec := xdr.NewDecoder(req.Args)
		a.Decode(dec, req.Vers)
		a.Cookie = append([]byte(nil), a.Cookie...)
		a.Lock.FH = append([]byte(nil), a.Lock.FH...)
		a.Lock.CallerName = append([]byte(nil), a.Lock.CallerName...)
		return a, dec.Err()
	}
	procs := make([]sunrpc.Proc, nlm.ProcGrantedRes+1)
	procs[nlm.ProcGranted] = sunrpc.Proc{Name: "GRANTED", Handler: func(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
		a, err := testArgs(req)
		if err != nil {
			return nil, sunrpc.ErrGarbageArgs
		}
		d.calls <- callback{proc: nlm.ProcGranted, from: req.Remote, args: a}
		r := nlm.Res{Cookie: a.Cookie, Stat: nlm.Stat(d.answer.Load())}
		return r.Append(res), nil
	}}
	procs[nlm.ProcGrantedMsg] = sunrpc.Proc{Name: "GRANTED_MSG", Handler: func(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
		a, err := testArgs(req)
		if err != nil {
			return nil, sunrpc.ErrGarbageArgs
		}
		d.calls <- callback{proc: nlm.ProcGrantedMsg, from: req.Remote, args: a}
		// Answer with GRANTED_RES to the server's NLM port, from this host.
		go func() {
			c, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(req.Remote.Addr(), nlmPort), sunrpc.ClientOptions{Local: host})
			if err != nil {
				return
			}
			defer c.Close()
			r := nlm.Res{Cookie: a.Cookie, Stat: nlm.Stat(d.answer.Load())}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c.Call(ctx, nlm.Prog, req.Vers, nlm.ProcGrantedRes, r.Append(nil))
		}()
		return res, nil
	}}
	for _, p := range []uint32{nlm.ProcTestRes, nlm.ProcLockRes, nlm.ProcCancelRes, nlm.ProcUnlockRes, nlm.ProcGrantedRes} {
		procs[p] = sunrpc.Proc{Name: "RES", Handler: func(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
			var r nlm.Res
			dec := xdr.NewDecoder(req.Args)
			r.Decode(dec)
			r.Cookie = append([]byte(nil), r.Cookie...)
			d.calls <- callback{proc: req.Proc, from: req.Remote, res: r, copied: append([]byte(nil), req.Args...)}
			return res, nil
		}}
	}
	for _, v := range []uint32{nlm.Vers1, nlm.Vers3, nlm.Vers4} {
		d.rpc.Register(sunrpc.Program{Name: "client-lockd", Prog: nlm.Prog, Vers: v, Procs: procs})
	}
	d.port = serveOn(t, d.rpc, host.String(), 0)

	// Host B's own portmapper, on its own address, port 111.
	pm := &sunrpc.Portmapper{}
	ps := &sunrpc.Server{}
	for _, p := range pm.Programs() {
		ps.Register(p)
	}
	serveOn(t, ps, host.String(), sunrpc.PmapPort)
	for _, v := range []uint32{nlm.Vers1, nlm.Vers3, nlm.Vers4} {
		for _, tr := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
			pm.Set(sunrpc.RPCB{Prog: nlm.Prog, Vers: v, NetID: tr.String(), Addr: sunrpc.FormatUaddr(netip.AddrPortFrom(netip.IPv4Unspecified(), d.port))})
		}
	}
	return d
}

func (d *clientLockd) next(t *testing.T, within time.Duration) callback {
	t.Helper()
	select {
	case c := <-d.calls:
		return c
	case <-time.After(within):
		t.Fatal("the client's lockd received no callback")
	}
	return callback{}
}

func (d *clientLockd) none(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case c := <-d.calls:
		t.Fatalf("unexpected callback proc %d from %v", c.proc, c.from)
	case <-time.After(within):
	}
}

func nlmClient(t *testing.T, from netip.Addr, tr sunrpc.Transport) *nlm.Client {
	t.Helper()
	c, err := sunrpc.Dial(context.Background(), tr, netip.AddrPortFrom(vip, nlmPort), sunrpc.ClientOptions{Local: from, Retransmit: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return nlm.NewClient(c, nlm.Vers4)
}

func lockOf(caller string, svid int32, off, n uint64) nlm.Lock {
	return nlm.Lock{CallerName: []byte(caller), FH: fhBlock, OH: []byte(fmt.Sprintf("%d@%s", svid, caller)), SVID: svid, Offset: off, Len: n}
}

func call[T any](t *testing.T, f func(context.Context) (T, error)) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := f(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestBlockingLockGrantedCallback(t *testing.T) {
	if !inNetns(t) {
		return
	}
	_, backend := startNLM(t, nlm.CallbackConfig{Attempt: time.Second, Retry: 200 * time.Millisecond})
	lockd := startClientLockd(t, hostB)

	for _, tr := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
		t.Run("sync/"+tr.String(), func(t *testing.T) {
			a, b := nlmClient(t, hostA, tr), nlmClient(t, hostB, tr)
			la, lb := lockOf("hostA", 1, 0, 100), lockOf("hostB", 7, 0, 100)
			if r := call(t, func(c context.Context) (nlm.Res, error) {
				return a.Lock(c, &nlm.LockArgs{Cookie: []byte("a1"), Exclusive: true, Lock: la})
			}); r.Stat != nlm.Granted {
				t.Fatalf("A's lock: %v", r.Stat)
			}
			if r := call(t, func(c context.Context) (nlm.Res, error) {
				return b.Lock(c, &nlm.LockArgs{Cookie: []byte("b1"), Block: true, Exclusive: true, Lock: lb})
			}); r.Stat != nlm.Blocked {
				t.Fatalf("B's blocking lock: %v", r.Stat)
			}
			lockd.none(t, 300*time.Millisecond)
			call(t, func(c context.Context) (nlm.Res, error) {
				return a.Unlock(c, &nlm.UnlockArgs{Cookie: []byte("a2"), Lock: la})
			})

			cb := lockd.next(t, 5*time.Second)
			if cb.proc != nlm.ProcGranted {
				t.Fatalf("callback proc %d, want GRANTED", cb.proc)
			}
			if cb.from.Addr() != vip {
				t.Fatalf("GRANTED came from %v, want the virtual server %v", cb.from, vip)
			}
			if tr == sunrpc.UDP && cb.from.Port() != nlmPort {
				t.Fatalf("UDP GRANTED came from port %d, want the NLM port %d", cb.from.Port(), nlmPort)
			}
			l := cb.args.Lock
			if string(l.FH) != string(fhBlock) || l.SVID != 7 || l.Offset != 0 || l.Len != 100 || !cb.args.Exclusive || string(l.CallerName) != vip.String() {
				t.Fatalf("GRANTED args %+v", cb.args)
			}
			if string(cb.args.Cookie) == "b1" || len(cb.args.Cookie) == 0 {
				t.Fatalf("GRANTED must carry a server-generated cookie, got %q", cb.args.Cookie)
			}
			// B holds the lock now.
			r := call(t, func(c context.Context) (nlm.TestRes, error) {
				return a.Test(c, &nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: la})
			})
			if r.Stat != nlm.Denied || r.Holder.SVID != 7 {
				t.Fatalf("after the grant, A's TEST: %v holder %+v", r.Stat, r.Holder)
			}
			// B's kernel re-sending its blocking LOCK finds the lock held.
			if r := call(t, func(c context.Context) (nlm.Res, error) {
				return b.Lock(c, &nlm.LockArgs{Cookie: []byte("b2"), Block: true, Exclusive: true, Lock: lb})
			}); r.Stat != nlm.Granted {
				t.Fatalf("B's retransmitted LOCK: %v", r.Stat)
			}
			lockd.none(t, 300*time.Millisecond) // one callback, no retries
			noPending(t, backend)
			call(t, func(c context.Context) (nlm.Res, error) {
				return b.Unlock(c, &nlm.UnlockArgs{Cookie: []byte("b3"), Lock: lb})
			})
		})
	}

	t.Run("refused", func(t *testing.T) {
		lockd.answer.Store(uint32(nlm.Denied))
		defer lockd.answer.Store(uint32(nlm.Granted))
		a, b := nlmClient(t, hostA, sunrpc.TCP), nlmClient(t, hostB, sunrpc.TCP)
		la, lb := lockOf("hostA", 1, 500, 10), lockOf("hostB", 8, 500, 10)
		call(t, func(c context.Context) (nlm.Res, error) {
			return a.Lock(c, &nlm.LockArgs{Cookie: []byte("a"), Exclusive: true, Lock: la})
		})
		call(t, func(c context.Context) (nlm.Res, error) {
			return b.Lock(c, &nlm.LockArgs{Cookie: []byte("b"), Block: true, Exclusive: true, Lock: lb})
		})
		call(t, func(c context.Context) (nlm.Res, error) {
			return a.Unlock(c, &nlm.UnlockArgs{Cookie: []byte("u"), Lock: la})
		})
		if cb := lockd.next(t, 5*time.Second); cb.proc != nlm.ProcGranted {
			t.Fatalf("proc %d", cb.proc)
		}
		// The client said no: the server released what it granted.
		deadline := time.Now().Add(3 * time.Second)
		for {
			r := call(t, func(c context.Context) (nlm.TestRes, error) {
				return a.Test(c, &nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: la})
			})
			if r.Stat == nlm.Granted {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a refused grant was not released: %v", r.Stat)
			}
			time.Sleep(20 * time.Millisecond)
		}
		noPending(t, backend)
	})

	t.Run("async", func(t *testing.T) {
		a, b := nlmClient(t, hostA, sunrpc.UDP), nlmClient(t, hostB, sunrpc.UDP)
		la, lb := lockOf("hostA", 1, 1000, 10), lockOf("hostB", 9, 1000, 10)
		call(t, func(c context.Context) (nlm.Res, error) {
			return a.Lock(c, &nlm.LockArgs{Cookie: []byte("a"), Exclusive: true, Lock: la})
		})
		args := &nlm.LockArgs{Cookie: []byte("bmsg"), Block: true, Exclusive: true, Lock: lb}
		call(t, func(c context.Context) (struct{}, error) {
			return struct{}{}, b.Msg(c, nlm.ProcLockMsg, args.Append(nil, nlm.Vers4))
		})
		res := lockd.next(t, 5*time.Second)
		if res.proc != nlm.ProcLockRes || res.res.Stat != nlm.Blocked || string(res.res.Cookie) != "bmsg" {
			t.Fatalf("LOCK_RES: proc %d %+v", res.proc, res.res)
		}
		if res.from != netip.AddrPortFrom(vip, nlmPort) {
			t.Fatalf("LOCK_RES came from %v, want the NLM port on the virtual server", res.from)
		}
		call(t, func(c context.Context) (nlm.Res, error) {
			return a.Unlock(c, &nlm.UnlockArgs{Cookie: []byte("u"), Lock: la})
		})
		cb := lockd.next(t, 5*time.Second)
		if cb.proc != nlm.ProcGrantedMsg || cb.from != netip.AddrPortFrom(vip, nlmPort) {
			t.Fatalf("callback proc %d from %v, want GRANTED_MSG from the NLM port", cb.proc, cb.from)
		}
		// The client's GRANTED_RES carried the cookie back: no retries follow.
		lockd.none(t, 2500*time.Millisecond)
		r := call(t, func(c context.Context) (nlm.TestRes, error) {
			return a.Test(c, &nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: la})
		})
		if r.Stat != nlm.Denied || r.Holder.SVID != 9 {
			t.Fatalf("after GRANTED_MSG: %v %+v", r.Stat, r.Holder)
		}
		noPending(t, backend)
	})
}
