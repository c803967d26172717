package sunrpc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Two loopback addresses stand in for virtual servers on one wildcard
// listener: each handler must see the address its client used, and UDP
// replies must leave from it (a connected UDP client drops anything else).
func TestVirtualServerAddresses(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "0.0.0.0")
	for _, vip := range []string{"127.0.0.2", "127.0.0.3"} {
		target := ap(t, vip, port)
		for _, tr := range []Transport{TCP, UDP} {
			t.Run(vip+"/"+tr.String(), func(t *testing.T) {
				c := dial(t, tr, target, ClientOptions{Cred: NewAuthSys(&AuthSysCred{MachineName: "client-" + vip})})
				gotT, local, remote, machine := echo(t, c, 1)
				if gotT != tr.String() || local != target.String() {
					t.Fatalf("handler saw %s local %s, want %s local %s", gotT, local, tr, target)
				}
				if remote != c.LocalAddr().String() {
					t.Fatalf("handler saw remote %s, client is %s", remote, c.LocalAddr())
				}
				if machine != "client-"+vip {
					t.Fatalf("AUTH_SYS machine name %q not handed to the handler", machine)
				}
			})
		}
		t.Run(vip+"/udp-source", func(t *testing.T) {
			reply, from, err := udpExchange(t, target, rawCall(42, 2, testProg, 1, procNull, nil), 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if from != target {
				t.Fatalf("reply came from %v, want %v", from, target)
			}
			if h, _, err := ParseReply(reply); err != nil || h.XID != 42 || h.Err() != nil {
				t.Fatalf("reply %+v, %v", h, err)
			}
		})
	}
}

func TestRejectStatuses(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	target := ap(t, "127.0.0.2", port)
	sysCred := NewAuthSys(&AuthSysCred{MachineName: "x"})

	tests := []struct {
		name  string
		msg   []byte
		check func(t *testing.T, h ReplyHeader, res []byte)
	}{
		{"wrong rpc version", rawCall(1, 3, testProg, 1, procNull, nil), func(t *testing.T, h ReplyHeader, _ []byte) {
			if h.Stat != MsgDenied || h.RejectStat != RPCMismatch || h.Low != 2 || h.High != 2 {
				t.Fatalf("%+v", h)
			}
		}},
		{"unknown program", rawCall(1, 2, testProg+1, 1, procNull, nil), acceptIs(ProgUnavail)},
		{"unknown version", rawCall(1, 2, testProg, 2, procNull, nil), func(t *testing.T, h ReplyHeader, _ []byte) {
			if h.AcceptStat != ProgMismatch || h.Low != 1 || h.High != 3 {
				t.Fatalf("want PROG_MISMATCH 1..3 (the versions registered), got %+v", h)
			}
		}},
		{"unknown procedure", rawCall(1, 2, testProg, 1, 99, nil), acceptIs(ProcUnavail)},
		{"procedure without handler", rawCall(1, 2, testProg, 1, procHole, nil), acceptIs(ProcUnavail)},
		{"garbage arguments", rawCall(1, 2, testProg, 1, procUint, []byte{1, 2}), acceptIs(GarbageArgs)},
		{"trailing garbage", rawCall(1, 2, testProg, 1, procUint, make([]byte, 8)), acceptIs(GarbageArgs)},
		{"handler error", rawCall(1, 2, testProg, 1, procFail, nil), acceptIs(SystemErr)},
		{"handler panic", rawCall(1, 2, testProg, 1, procPanic, nil), acceptIs(SystemErr)},
		{"handler auth error", rawCall(1, 2, testProg, 1, procAuth, nil), authIs(AuthTooWeak)},
		{"malformed AUTH_SYS", func() []byte {
			h := CallHeader{XID: 1, RPCVers: 2, Prog: testProg, Vers: 1, Cred: OpaqueAuth{Flavor: AuthSys, Body: []byte{0, 0, 0, 1}}}
			return AppendCall(nil, &h)
		}(), authIs(AuthBadCred)},
		{"credential over 400 bytes", func() []byte {
			b := rawCall(1, 2, testProg, 1, procNull, nil)[:24]
			b = xdr.AppendUint32(b, uint32(AuthSys))
			return xdr.AppendOpaque(b, make([]byte, 404))
		}(), authIs(AuthBadCred)},
		{"unsupported flavor", func() []byte {
			h := CallHeader{XID: 1, RPCVers: 2, Prog: testProg, Vers: 1, Cred: OpaqueAuth{Flavor: RPCSecGSS}}
			return AppendCall(nil, &h)
		}(), authIs(AuthBadCred)},
		{"AUTH_SYS with a non-null verifier", func() []byte {
			h := CallHeader{XID: 1, RPCVers: 2, Prog: testProg, Vers: 1, Cred: sysCred, Verf: sysCred}
			return AppendCall(nil, &h)
		}(), authIs(AuthBadVerf)},
		{"success", rawCall(1, 2, testProg, 3, procUint, []byte{0, 0, 0, 41}), func(t *testing.T, h ReplyHeader, res []byte) {
			if h.Err() != nil || !bytes.Equal(res, []byte{0, 0, 0, 42}) {
				t.Fatalf("%+v %x", h, res)
			}
		}},
	}
	for _, tt := range tests {
		for _, tr := range []Transport{TCP, UDP} {
			t.Run(tt.name+"/"+tr.String(), func(t *testing.T) {
				var reply []byte
				var err error
				if tr == TCP {
					reply, err = tcpExchange(t, target, withMark(tt.msg), 2*time.Second)
				} else {
					reply, _, err = udpExchange(t, target, tt.msg, 2*time.Second)
				}
				if err != nil {
					t.Fatal(err)
				}
				h, res, err := ParseReply(reply)
				if err != nil {
					t.Fatal(err)
				}
				if h.XID != 1 {
					t.Fatalf("reply XID %d", h.XID)
				}
				tt.check(t, h, res)
				mustServe(t, tr, target)
			})
		}
	}
}

func acceptIs(want AcceptStat) func(*testing.T, ReplyHeader, []byte) {
	return func(t *testing.T, h ReplyHeader, _ []byte) {
		t.Helper()
		if h.Stat != MsgAccepted || h.AcceptStat != want {
			t.Fatalf("got %+v, want %v", h, want)
		}
	}
}

func authIs(want AuthStat) func(*testing.T, ReplyHeader, []byte) {
	return func(t *testing.T, h ReplyHeader, _ []byte) {
		t.Helper()
		if h.Stat != MsgDenied || h.RejectStat != AuthError || h.AuthStat != want {
			t.Fatalf("got %+v, want AUTH_ERROR %v", h, want)
		}
	}
}

func withMark(msg []byte) []byte { return frag(msg, true) }

// Truncated headers cannot be answered: over UDP they are dropped, over TCP
// the connection is closed. Either way the server goes on serving.
func TestTruncatedHeaders(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	target := ap(t, "127.0.0.2", port)
	full := rawCall(5, 2, testProg, 1, procNull, nil)
	for _, n := range []int{0, 3, 7, 11, 20, 27, 35} {
		_, _, err := udpExchange(t, target, full[:n], 200*time.Millisecond)
		if !isTimeout(err) {
			t.Fatalf("UDP %d-byte header: got %v, want no reply", n, err)
		}
		_, err = tcpExchange(t, target, withMark(full[:n]), 2*time.Second)
		if err == nil || isTimeout(err) {
			t.Fatalf("TCP %d-byte header: got %v, want the connection closed", n, err)
		}
	}
	mustServe(t, UDP, target)
	mustServe(t, TCP, target)
	if got := s.Stats().MalformedHeaders; got < 10 {
		t.Fatalf("MalformedHeaders = %d", got)
	}
}

func TestMultiFragmentCall(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	msg := rawCall(9, 2, testProg, 1, procUint, []byte{0, 0, 0, 1})
	stream := append(append(frag(msg[:5], false), frag(msg[5:20], false)...), frag(msg[20:], true)...)
	reply, err := tcpExchange(t, ap(t, "127.0.0.2", port), stream, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if h, res, err := ParseReply(reply); err != nil || h.Err() != nil || !bytes.Equal(res, []byte{0, 0, 0, 2}) {
		t.Fatalf("%+v %x %v", h, res, err)
	}
}

// Record-marking abuse closes that one connection; other clients are served
// throughout, including while a stalled client holds its connection open.
func TestTCPFramingAbuse(t *testing.T) {
	s, _ := newTestServerWith(&Server{MaxRecordSize: 1024, RecordTimeout: 300 * time.Millisecond, IdleTimeout: 400 * time.Millisecond})
	port := serve(t, s, "127.0.0.2")
	target := ap(t, "127.0.0.2", port)
	call := rawCall(1, 2, testProg, 1, procNull, nil)

	t.Run("oversized fragment", func(t *testing.T) {
		stream := binary.BigEndian.AppendUint32(nil, lastFragment|1025)
		stream = append(stream, make([]byte, 1025)...)
		if _, err := tcpExchange(t, target, stream, 2*time.Second); err == nil || isTimeout(err) {
			t.Fatalf("got %v, want closed", err)
		}
	})
	t.Run("cumulative size over the cap", func(t *testing.T) {
		var stream []byte
		for range 3 {
			stream = append(stream, frag(make([]byte, 400), false)...)
		}
		if _, err := tcpExchange(t, target, stream, 2*time.Second); err == nil || isTimeout(err) {
			t.Fatalf("got %v, want closed", err)
		}
	})
	t.Run("endless empty fragments", func(t *testing.T) {
		if _, err := tcpExchange(t, target, bytes.Repeat(frag(nil, false), 10000), 2*time.Second); err == nil || isTimeout(err) {
			t.Fatalf("got %v, want closed", err)
		}
	})
	t.Run("half a record then a stall", func(t *testing.T) {
		c, err := net.Dial("tcp", target.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(withMark(call)[:10])
		mustServe(t, TCP, target) // others are served while it stalls
		mustServe(t, UDP, target)
		if !connClosed(c, 3*time.Second) {
			t.Fatal("stalled connection not closed")
		}
	})
	t.Run("idle connection", func(t *testing.T) {
		c, err := net.Dial("tcp", target.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		if !connClosed(c, 3*time.Second) {
			t.Fatal("idle connection not closed")
		}
		if d := time.Since(start); d < 300*time.Millisecond {
			t.Fatalf("closed after %v, before the idle timeout", d)
		}
	})
	if s.Stats().RecordErrors < 3 {
		t.Fatalf("RecordErrors = %d", s.Stats().RecordErrors)
	}
	mustServe(t, TCP, target)
}

// A connection is served with bounded concurrency, and replies to pipelined
// calls find their callers by XID.
func TestTCPInFlightBound(t *testing.T) {
	s, ts := newTestServerWith(&Server{MaxInFlight: 2})
	port := serve(t, s, "127.0.0.2")
	c := dial(t, TCP, ap(t, "127.0.0.2", port), ClientOptions{})

	errs := make(chan error, 3)
	for range 3 {
		go func() {
			_, err := c.Call(callCtx(t), testProg, 1, procSlow, nil)
			errs <- err
		}()
	}
	<-ts.started
	<-ts.started
	select {
	case <-ts.started:
		t.Fatal("a third call started on a connection limited to 2 in flight")
	case <-time.After(200 * time.Millisecond):
	}
	close(ts.release)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestConcurrentCallsOneConnection(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	for _, tr := range []Transport{TCP, UDP} {
		c := dial(t, tr, ap(t, "127.0.0.2", port), ClientOptions{})
		var wg sync.WaitGroup
		for i := range 32 {
			wg.Go(func() {
				res, err := c.Call(callCtx(t), testProg, 1, procUint, xdr.AppendUint32(nil, uint32(i)))
				if err != nil {
					t.Error(err)
					return
				}
				if got := binary.BigEndian.Uint32(res); got != uint32(i)+1 {
					t.Errorf("call %d got reply %d: replies crossed", i, got)
				}
			})
		}
		wg.Wait()
	}
}

// StopAddr takes one virtual server off the air without touching another.
func TestStopAddr(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "0.0.0.0")
	x, y := ap(t, "127.0.0.2", port), ap(t, "127.0.0.3", port)

	cx, err := net.Dial("tcp", x.String())
	if err != nil {
		t.Fatal(err)
	}
	defer cx.Close()
	cy := dial(t, TCP, y, ClientOptions{})
	if _, err := cy.Call(callCtx(t), testProg, 1, procNull, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "connection tracked", func() bool { s.mu.Lock(); defer s.mu.Unlock(); return len(s.conns) == 2 })

	s.StopAddr(netip.MustParseAddr("::ffff:127.0.0.2")) // mapped form means the same address
	if !connClosed(cx, 2*time.Second) {
		t.Fatal("connection to the stopped address stays open")
	}
	if _, err := tcpExchange(t, x, withMark(rawCall(1, 2, testProg, 1, procNull, nil)), time.Second); err == nil {
		t.Fatal("new TCP connection to the stopped address was served")
	}
	if _, _, err := udpExchange(t, x, rawCall(1, 2, testProg, 1, procNull, nil), 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("UDP to the stopped address: %v, want no reply", err)
	}
	// The other address is untouched: the existing connection still works.
	if _, err := cy.Call(callCtx(t), testProg, 1, procNull, nil); err != nil {
		t.Fatalf("other address disturbed: %v", err)
	}
	mustServe(t, UDP, y)

	s.ResumeAddr(netip.MustParseAddr("127.0.0.2"))
	mustServe(t, TCP, x)
	mustServe(t, UDP, x)
}

// A retransmitted non-idempotent UDP call is answered from the duplicate
// request cache, not run twice; idempotent calls are not cached.
func TestDuplicateRequestCache(t *testing.T) {
	s, ts := newTestServerWith(&Server{})
	port := serve(t, s, "127.0.0.2")
	target := ap(t, "127.0.0.2", port)

	conn, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	exchange := func(msg []byte) []byte {
		t.Helper()
		conn.Write(msg)
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 1024)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		_, res, err := ParseReply(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	first := exchange(rawCall(100, 2, testProg, 1, procCount, nil))
	again := exchange(rawCall(100, 2, testProg, 1, procCount, nil))
	if !bytes.Equal(first, again) || ts.count.Load() != 1 {
		t.Fatalf("retransmission executed again: %x then %x, count %d", first, again, ts.count.Load())
	}
	if s.Stats().DRCHits != 1 {
		t.Fatalf("DRCHits = %d", s.Stats().DRCHits)
	}
	exchange(rawCall(101, 2, testProg, 1, procCount, nil))
	if ts.count.Load() != 2 {
		t.Fatal("a new XID must run the procedure")
	}
	// Same XID, different arguments (a rebooted client reusing XIDs): not a duplicate.
	exchange(rawCall(100, 2, testProg, 1, procCount, []byte{0, 0, 0, 0}))
	if ts.count.Load() != 3 {
		t.Fatal("same XID with other contents was treated as a retransmission")
	}
	exchange(rawCall(102, 2, testProg, 1, procEcho, nil))
	exchange(rawCall(102, 2, testProg, 1, procEcho, nil))
	if s.Stats().DRCHits != 1 {
		t.Fatal("idempotent procedure was cached")
	}
}

// A non-idempotent call its handler chose not to answer (ErrNoReply: not
// now) is not cached as answered: its retransmission runs again and gets
// the reply. Otherwise a call held back once (a virtual server moving, a
// name being resolved) would never be answered over UDP.
func TestDRCForgetsCallsNotAnswered(t *testing.T) {
	var calls atomic.Int32
	s := &Server{}
	s.Register(Program{Prog: 400001, Vers: 1, Procs: []Proc{1: {Name: "LATER", NonIdempotent: true,
		Handler: func(_ context.Context, _ *Request, res []byte) ([]byte, error) {
			if calls.Add(1) == 1 {
				return nil, ErrNoReply
			}
			return res, nil
		}}}})
	port := serve(t, s, "127.0.0.2")
	c, err := Dial(context.Background(), UDP, ap(t, "127.0.0.2", port), ClientOptions{Retransmit: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := c.Call(ctx, 400001, 1, 1, nil); err != nil {
		t.Fatalf("the retransmission of a call not answered: %v", err)
	}
	if calls.Load() != 2 {
		t.Fatalf("handler ran %d times", calls.Load())
	}
}

// With MaxConns, a new connection past the cap closes the one idle
// longest, not the new one: a host holding connections open cannot lock
// out new clients (issue 10, item 7).
func TestMaxConnsEvictsTheIdlest(t *testing.T) {
	s, _ := newTestServerWith(&Server{MaxConns: 3})
	port := serve(t, s, "127.0.0.2")
	target := net.JoinHostPort("127.0.0.2", fmt.Sprint(port))
	var idle []net.Conn
	for range 3 {
		c, err := net.Dial("tcp4", target)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
		time.Sleep(30 * time.Millisecond) // so that they are idle since different ticks
	}
	// A busy one: it keeps calling.
	busy := dial(t, TCP, ap(t, "127.0.0.2", port), ClientOptions{})
	ctx := callCtx(t)
	for range 3 {
		if _, err := busy.Call(ctx, testProg, 1, procEcho, nil); err != nil {
			t.Fatalf("a new client past the cap: %v", err)
		}
	}
	// One of the idle connections (the idlest, as far as the server's
	// coarse clock tells) was closed to make room.
	closed := 0
	for _, c := range idle {
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			closed++
		}
	}
	if closed != 1 {
		t.Fatalf("%d idle connections closed, want 1", closed)
	}
	if s.Stats().ConnsEvicted != 1 {
		t.Fatalf("evicted %d", s.Stats().ConnsEvicted)
	}
}

func TestDRCEviction(t *testing.T) {
	c := newReplyCache(4, time.Minute)
	key := func(i uint32) drcKey { return drcKey{xid: i} }
	for i := range uint32(10) {
		if _, st := c.begin(key(i)); st != drcMiss {
			t.Fatalf("begin %d: %v", i, st)
		}
		c.finish(key(i), []byte{byte(i)})
	}
	if c.len() != 4 {
		t.Fatalf("cache holds %d entries, bound 4", c.len())
	}
	if r, st := c.begin(key(9)); st != drcDone || r[0] != 9 {
		t.Fatal("newest entry evicted")
	}
	if _, st := c.begin(key(0)); st != drcMiss {
		t.Fatal("oldest entry not evicted")
	}
	if _, st := c.begin(key(0)); st != drcInProgress {
		t.Fatal("a call begun and not finished must report in progress")
	}
	old := newReplyCache(4, time.Nanosecond)
	old.begin(key(1))
	old.finish(key(1), nil)
	time.Sleep(time.Millisecond)
	if _, st := old.begin(key(1)); st != drcMiss {
		t.Fatal("expired entry answered")
	}
}

func TestUDPWorkerPoolDrops(t *testing.T) {
	s, ts := newTestServerWith(&Server{UDPWorkers: 1, UDPQueue: 1})
	port := serve(t, s, "127.0.0.2")
	target := ap(t, "127.0.0.2", port)
	conn, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write(rawCall(1, 2, testProg, 1, procSlow, nil))
	<-ts.started // the only worker is busy
	for i := range 20 {
		conn.Write(rawCall(uint32(10+i), 2, testProg, 1, procNull, nil))
	}
	waitFor(t, "drops counted", func() bool { return s.Stats().UDPQueueDrops > 0 })
	close(ts.release)
	mustServe(t, UDP, target)
}

func TestUDPOversize(t *testing.T) {
	s, _ := newTestServerWith(&Server{MaxRecordSize: 512})
	port := serve(t, s, "127.0.0.2")
	target := ap(t, "127.0.0.2", port)
	big := rawCall(1, 2, testProg, 1, procNull, make([]byte, 600))
	if _, _, err := udpExchange(t, target, big, 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("oversized datagram answered: %v", err)
	}
	if s.Stats().UDPOversize != 1 {
		t.Fatalf("UDPOversize = %d", s.Stats().UDPOversize)
	}
	mustServe(t, UDP, target)
}

// Shutdown lets a call in progress answer, then stops everything.
func TestShutdown(t *testing.T) {
	s, ts := newTestServerWith(&Server{})
	l, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	target := addrPortOf(l.Addr())
	c := dial(t, TCP, target, ClientOptions{})
	res := make(chan error, 1)
	go func() {
		_, err := c.Call(callCtx(t), testProg, 1, procSlow, nil)
		res <- err
	}()
	<-ts.started
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		shut <- s.Shutdown(ctx)
	}()
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v", err)
	}
	if _, err := net.DialTimeout("tcp", target.String(), time.Second); err == nil {
		t.Fatal("listener still accepting after Shutdown")
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) before the call in progress finished", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(ts.release)
	if err := <-res; err != nil {
		t.Fatalf("in-flight call lost its reply: %v", err)
	}
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
}

func TestShutdownDeadline(t *testing.T) {
	s, ts := newTestServerWith(&Server{})
	port := serve(t, s, "127.0.0.2")
	c := dial(t, TCP, ap(t, "127.0.0.2", port), ClientOptions{})
	go c.Call(context.Background(), testProg, 1, procSlow, nil)
	<-ts.started
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v", err)
	}
}

func TestRegisterUnregister(t *testing.T) {
	s := &Server{}
	p := Program{Prog: 7, Vers: 2, Procs: []Proc{{Name: "NULL", Handler: func(_ context.Context, _ *Request, r []byte) ([]byte, error) { return r, nil }}}}
	if err := s.Register(p); err != nil {
		t.Fatal(err)
	}
	if err := s.Register(p); !errors.Is(err, ErrDuplicateProgram) {
		t.Fatalf("duplicate: %v", err)
	}
	p.Vers = 5
	s.Register(p)
	ci := &Request{Transport: UDP}
	out, _ := s.dispatch(context.Background(), ci, rawCall(1, 2, 7, 3, 0, nil), nil)
	if h, _, _ := ParseReply(out); h.AcceptStat != ProgMismatch || h.Low != 2 || h.High != 5 {
		t.Fatalf("%+v", h)
	}
	s.Unregister(7, 5)
	out, _ = s.dispatch(context.Background(), ci, rawCall(1, 2, 7, 5, 0, nil), nil)
	if h, _, _ := ParseReply(out); h.AcceptStat != ProgMismatch || h.Low != 2 || h.High != 2 {
		t.Fatalf("after unregister: %+v", h)
	}
	s.Unregister(7, 2)
	out, _ = s.dispatch(context.Background(), ci, rawCall(1, 2, 7, 2, 0, nil), nil)
	if h, _, _ := ParseReply(out); h.AcceptStat != ProgUnavail {
		t.Fatalf("after unregistering all: %+v", h)
	}
}

func TestServePacketRejectsNonUDP(t *testing.T) {
	pc, err := net.ListenPacket("unixgram", t.TempDir()+"/sock")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if err := (&Server{}).ServePacket(pc); !errors.Is(err, ErrNotUDP) {
		t.Fatalf("got %v", err)
	}
}

// SendPacket lets a service call out from its own UDP socket and address;
// replies to such calls reach OnReply.
func TestSendPacketAndOnReply(t *testing.T) {
	replies := make(chan [2]netip.AddrPort, 1)
	s, _ := newTestServerWith(&Server{OnReply: func(local, remote netip.AddrPort, msg []byte) {
		replies <- [2]netip.AddrPort{local, remote}
	}})
	port := serve(t, s, "0.0.0.0")

	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 9)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	from := ap(t, "127.0.0.3", port)
	if err := s.SendPacket(from, addrPortOf(peer.LocalAddr()), rawCall(77, 2, 1, 1, 0, nil)); err != nil {
		t.Fatal(err)
	}
	peer.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	_, src, err := peer.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	if src != from {
		t.Fatalf("datagram came from %v, want %v", src, from)
	}
	if _, err := peer.WriteToUDPAddrPort(AppendAcceptedReply(nil, 77, Success), src); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-replies:
		if got[0] != from || got[1] != addrPortOf(peer.LocalAddr()) {
			t.Fatalf("OnReply(%v, %v)", got[0], got[1])
		}
	case <-time.After(2 * time.Second):
		t.Fatal("reply not delivered to OnReply")
	}
	if err := s.SendPacket(ap(t, "127.0.0.3", port+1), from, nil); !errors.Is(err, ErrNoSocket) {
		t.Fatalf("SendPacket on an unserved port: %v", err)
	}
}

// A socket is the server's as soon as AttachPacket returns: a call sent
// from it right away (SM_NOTIFY at a takeover) leaves, whereas with
// `go ServePacket(pc)` it could find no socket yet.
func TestAttachPacketSendsAtOnce(t *testing.T) {
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 9)})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	for i := range 50 {
		s := &Server{}
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 3)})
		if err != nil {
			t.Fatal(err)
		}
		serve, err := s.AttachPacket(pc)
		if err != nil {
			t.Fatal(err)
		}
		from := addrPortOf(pc.LocalAddr())
		if err := s.SendPacket(from, addrPortOf(peer.LocalAddr()), rawCall(uint32(i), 2, 1, 1, 0, nil)); err != nil {
			t.Fatalf("round %d: a send right after AttachPacket: %v", i, err)
		}
		done := make(chan error, 1)
		go func() { done <- serve() }()
		s.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			t.Fatalf("serve: %v", err)
		}
	}
}

// The IPv6 path: a wildcard udp6/tcp6 socket learns the destination from
// IPV6_PKTINFO and answers from it.
func TestIPv6Loopback(t *testing.T) {
	s := newTestServer()
	l, err := net.Listen("tcp6", "[::]:0")
	if err != nil {
		t.Fatalf("IPv6 loopback unavailable: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	pc, err := net.ListenPacket("udp6", net.JoinHostPort("::", fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	go s.ServePacket(pc)
	t.Cleanup(func() { s.Close() })
	target := netip.AddrPortFrom(netip.IPv6Loopback(), uint16(port))
	for _, tr := range []Transport{TCP, UDP} {
		c := dial(t, tr, target, ClientOptions{})
		if _, local, _, _ := echo(t, c, 1); local != target.String() {
			t.Fatalf("%v: handler saw local %s, want %s", tr, local, target)
		}
	}
}

// SendPackets sends a burst as SendPacket sends each datagram: from the
// address asked for, to each destination, whole; more than one system
// call's worth; a datagram that cannot leave fails alone.
func TestSendPackets(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "0.0.0.0")
	var peers []*net.UDPConn
	for _, a := range []string{"127.0.0.9", "127.0.0.10"} {
		peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(a)})
		if err != nil {
			t.Fatal(err)
		}
		defer peer.Close()
		peers = append(peers, peer)
	}
	from := ap(t, "127.0.0.3", port)
	const n = 2*maxBatch + 7
	var pkts []Packet
	for i := range n {
		if i == maxBatch+1 {
			// Out of the socket's reach (an IPv6 peer of an IPv4 socket).
			pkts = append(pkts, Packet{To: netip.MustParseAddrPort("[2001:db8::1]:111"), Msg: []byte("lost")})
		}
		pkts = append(pkts, Packet{To: addrPortOf(peers[i%2].LocalAddr()), Msg: rawCall(uint32(i), 2, 1, 1, 0, bytes.Repeat([]byte{byte(i)}, i%9))})
	}
	if err := s.SendPackets(from, pkts); err == nil {
		t.Fatal("SendPackets reported no error for the unreachable datagram")
	}
	for i, p := range pkts {
		if (p.Err != nil) != (i == maxBatch+1) {
			t.Fatalf("packet %d (to %v): %v", i, p.To, p.Err)
		}
	}
	got := map[uint32]bool{}
	buf := make([]byte, 512)
	for i, peer := range peers {
		peer.SetReadDeadline(time.Now().Add(2 * time.Second))
		for range (n + 1 - i) / 2 {
			m, src, err := peer.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("peer %d after %d datagrams: %v", i, len(got), err)
			}
			if src != from {
				t.Fatalf("datagram came from %v, want %v", src, from)
			}
			xid := binary.BigEndian.Uint32(buf)
			want := rawCall(xid, 2, 1, 1, 0, bytes.Repeat([]byte{byte(xid)}, int(xid)%9))
			if !bytes.Equal(buf[:m], want) || int(xid)%2 != i || got[xid] {
				t.Fatalf("peer %d got %x", i, buf[:m])
			}
			got[xid] = true
		}
	}
	if len(got) != n {
		t.Fatalf("%d of %d datagrams arrived", len(got), n)
	}
	if err := s.SendPackets(ap(t, "127.0.0.3", port+1), pkts[:1]); !errors.Is(err, ErrNoSocket) || !errors.Is(pkts[0].Err, ErrNoSocket) {
		t.Fatalf("SendPackets on an unserved port: %v", err)
	}
}

// From an IPv6 socket, as SendPacket.
func TestSendPacketsIPv6(t *testing.T) {
	s := newTestServer()
	pc, err := net.ListenPacket("udp6", "[::]:0")
	if err != nil {
		t.Skipf("IPv6 unavailable: %v", err)
	}
	serve, err := s.AttachPacket(pc)
	if err != nil {
		t.Fatal(err)
	}
	go serve()
	t.Cleanup(func() { s.Close() })
	port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
	for _, c := range []struct{ from, peer, network string }{{"::1", "::1", "udp6"}} {
		peer, err := net.ListenUDP(c.network, &net.UDPAddr{IP: net.ParseIP(c.peer)})
		if err != nil {
			t.Fatal(err)
		}
		defer peer.Close()
		from := ap(t, c.from, port)
		to := addrPortOf(peer.LocalAddr())
		pkts := []Packet{{To: to, Msg: rawCall(1, 2, 1, 1, 0, nil)}, {To: to, Msg: rawCall(2, 2, 1, 1, 0, nil)}}
		if err := s.SendPacket(from, to, rawCall(0, 2, 1, 1, 0, nil)); err != nil {
			t.Fatalf("SendPacket from %v: %v", from, err)
		}
		if err := s.SendPackets(from, pkts); err != nil {
			t.Fatalf("from %v: %v", from, err)
		}
		peer.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 512)
		for i := range 3 {
			m, src, err := peer.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatal(err)
			}
			if src := netip.AddrPortFrom(src.Addr().Unmap(), src.Port()); src != from || !bytes.Equal(buf[:m], rawCall(uint32(i), 2, 1, 1, 0, nil)) {
				t.Fatalf("from %v: got %x from %v", from, buf[:m], src)
			}
		}
	}
}
