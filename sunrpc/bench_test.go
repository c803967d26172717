package sunrpc

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
)

// benchNull measures NULL call round trips per second with `clients`
// concurrent clients, each with its own connection (or UDP socket) and one
// call outstanding at a time, the way lockd clients behave.
func benchNull(b *testing.B, tr Transport, clients int) {
	s := newTestServer()
	port := serve(b, s, "127.0.0.2")
	target := ap(b, "127.0.0.2", port)
	cs := make([]*Client, clients)
	for i := range cs {
		cs[i] = dial(b, tr, target, ClientOptions{})
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N / clients
	for i, c := range cs {
		n := per
		if i == 0 {
			n += b.N % clients
		}
		wg.Go(func() {
			for range n {
				if _, err := c.Call(ctx, testProg, 1, procNull, nil); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
}

func BenchmarkNullTCP(b *testing.B) {
	for _, n := range []int{1, 16} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) { benchNull(b, TCP, n) })
	}
}

func BenchmarkNullUDP(b *testing.B) {
	for _, n := range []int{1, 16} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) { benchNull(b, UDP, n) })
	}
}

func BenchmarkParseCall(b *testing.B) {
	h := sampleCall()
	msg := append(AppendCall(nil, &h), make([]byte, 96)...)
	b.ReportAllocs()
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		if _, _, err := ParseCall(msg); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseAuthSys(b *testing.B) {
	body := AppendAuthSys(nil, &AuthSysCred{Stamp: 1, MachineName: "client.example.com", GIDs: []uint32{0, 1, 2, 3}})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseAuthSys(body); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendAcceptedReply(b *testing.B) {
	buf := make([]byte, 0, 128)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendAcceptedReply(buf[:0], 12345, Success)
	}
}

// BenchmarkDispatch is the server's per-call CPU cost without sockets:
// header parse, auth, program lookup, handler, reply encoding.
func BenchmarkDispatch(b *testing.B) {
	s := newTestServer()
	h := CallHeader{XID: 1, RPCVers: 2, Prog: testProg, Vers: 1, Proc: procNull, Cred: NewAuthSys(&AuthSysCred{MachineName: "client"})}
	msg := AppendCall(nil, &h)
	req := &Request{}
	out := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		*req = Request{Transport: TCP, Local: netip.MustParseAddrPort("127.0.0.2:1"), Remote: netip.MustParseAddrPort("127.0.0.1:2")}
		out, _ = s.dispatch(context.Background(), req, msg, out[:0])
	}
}
