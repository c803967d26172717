package sunrpc

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// A UDP server that ignores the first two transmissions: the client must
// retransmit the same XID, with growing intervals, until it is answered.
func TestClientUDPRetransmit(t *testing.T) {
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	type rx struct {
		xid uint32
		at  time.Time
	}
	got := make(chan rx, 10)
	go func() {
		buf := make([]byte, 2048)
		for n := 0; ; n++ {
			k, from, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			h, _, err := ParseCall(buf[:k])
			if err != nil {
				continue
			}
			got <- rx{h.XID, time.Now()}
			if n == 2 {
				srv.WriteToUDPAddrPort(AppendAcceptedReply(nil, h.XID, Success), from)
			}
		}
	}()
	c := dial(t, UDP, addrPortOf(srv.LocalAddr()), ClientOptions{Retransmit: 50 * time.Millisecond, MaxRetransmit: time.Second})
	start := time.Now()
	if _, err := c.Call(callCtx(t), 1, 1, 0, nil); err != nil {
		t.Fatal(err)
	}
	a, b, cc := <-got, <-got, <-got
	if a.xid != b.xid || b.xid != cc.xid {
		t.Fatalf("retransmissions changed the XID: %d %d %d", a.xid, b.xid, cc.xid)
	}
	first, second := b.at.Sub(a.at), cc.at.Sub(b.at)
	if first < 40*time.Millisecond || second < 80*time.Millisecond {
		t.Fatalf("backoff did not grow: %v then %v", first, second)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatal("took too long")
	}
}

// Nobody listening: the ICMP error fails the call at once instead of
// retransmitting until the deadline.
func TestClientUDPConnRefused(t *testing.T) {
	pc, _ := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	dead := addrPortOf(pc.LocalAddr())
	pc.Close()
	c := dial(t, UDP, dead, ClientOptions{})
	start := time.Now()
	_, err := c.Call(callCtx(t), 1, 1, 0, nil)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("err = %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("refusal took %v", time.Since(start))
	}
}

// Callbacks leave from the virtual server's address.
func TestClientLocalAddress(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	for _, tr := range []Transport{TCP, UDP} {
		c := dial(t, tr, ap(t, "127.0.0.2", port), ClientOptions{Local: netip.MustParseAddr("127.0.0.7")})
		_, _, remote, _ := echo(t, c, 1)
		if got := netip.MustParseAddrPort(remote).Addr(); got != netip.MustParseAddr("127.0.0.7") {
			t.Fatalf("%v: server saw the call from %v", tr, got)
		}
	}
}

func TestClientTCPReconnects(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	c := dial(t, TCP, ap(t, "127.0.0.2", port), ClientOptions{})
	before := c.LocalAddr()
	s.StopAddr(netip.MustParseAddr("127.0.0.2"))
	waitFor(t, "connection dropped", func() bool { return c.LocalAddr() == netip.AddrPort{} })
	s.ResumeAddr(netip.MustParseAddr("127.0.0.2"))
	if _, err := c.Call(callCtx(t), testProg, 1, procNull, nil); err != nil {
		t.Fatal(err)
	}
	if c.LocalAddr() == before {
		t.Fatal("expected a new connection")
	}
}

func TestClientDeadlineAndErrors(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	for _, tr := range []Transport{TCP, UDP} {
		c := dial(t, tr, ap(t, "127.0.0.2", port), ClientOptions{})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		_, err := c.Call(ctx, testProg, 1, procNoReply, nil)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%v: unanswered call: %v", tr, err)
		}
		if _, err := c.Call(callCtx(t), testProg, 2, 0, nil); !errors.Is(err, ErrProgMismatch) {
			t.Fatalf("%v: %v", tr, err)
		}
		var rerr *Error
		if _, err := c.Call(callCtx(t), testProg, 7, 0, nil); !errors.As(err, &rerr) || rerr.Reply.Low != 1 || rerr.Reply.High != 3 {
			t.Fatalf("%v: %v", tr, err)
		}
		if _, err := c.Call(callCtx(t), testProg, 1, procAuth, nil); !errors.Is(err, ErrAuth) {
			t.Fatalf("%v: %v", tr, err)
		}
		c.Close()
		if _, err := c.Call(callCtx(t), testProg, 1, procNull, nil); !errors.Is(err, ErrClientClosed) {
			t.Fatalf("%v: call after Close: %v", tr, err)
		}
	}
}

// Replies larger than MaxReplySize end the connection rather than being
// buffered without bound.
func TestClientReplyCap(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "127.0.0.2")
	c := dial(t, TCP, ap(t, "127.0.0.2", port), ClientOptions{MaxReplySize: 4096})
	if _, err := c.Call(callCtx(t), testProg, 1, procBig, nil); !errors.Is(err, ErrRecordTooLarge) {
		t.Fatalf("err = %v", err)
	}
}

// A PacketClient calls out from the server's own socket: the peer sees the
// server's address and port as the source, and the reply comes back to the
// server socket and on to the caller.
func TestPacketClient(t *testing.T) {
	s := newTestServer()
	port := serve(t, s, "0.0.0.0")
	peer := newTestServer()
	peerPort := serve(t, peer, "127.0.0.3")
	from := ap(t, "127.0.0.2", port)
	c := s.PacketClient(from, ap(t, "127.0.0.3", peerPort), ClientOptions{Retransmit: 50 * time.Millisecond})
	defer c.Close()
	_, local, remote, _ := echo(t, c, 1)
	if remote != from.String() {
		t.Fatalf("peer saw the call from %s, want %s", remote, from)
	}
	if local != ap(t, "127.0.0.3", peerPort).String() {
		t.Fatalf("peer local %s", local)
	}
	// Calls from a port the server does not serve fail cleanly.
	bad := s.PacketClient(ap(t, "127.0.0.2", port+1), ap(t, "127.0.0.3", peerPort), ClientOptions{})
	if _, err := bad.Call(callCtx(t), testProg, 1, procNull, nil); !errors.Is(err, ErrNoSocket) {
		t.Fatalf("err = %v", err)
	}
}
