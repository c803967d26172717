package sunrpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// The test program, registered as versions 1 and 3 so that PROG_MISMATCH
// has a range to report.
const testProg = 0x20000099

const (
	procNull    = 0
	procEcho    = 1 // returns transport, local, remote, AUTH_SYS machine name
	procUint    = 2 // takes exactly one uint32, returns it plus one
	procSlow    = 3 // waits for release (non-idempotent)
	procCount   = 4 // non-idempotent counter
	procPanic   = 5
	procFail    = 6 // returns an ordinary error: SYSTEM_ERR
	procAuth    = 7 // denies with AUTH_TOOWEAK
	procNoReply = 8
	procHole    = 9 // registered with a nil handler: PROC_UNAVAIL
	procBig     = 10
)

type testService struct {
	count   atomic.Uint32
	started chan struct{}
	release chan struct{}
}

func newTestService() *testService {
	return &testService{started: make(chan struct{}, 100), release: make(chan struct{})}
}

func (ts *testService) programs() []Program {
	procs := []Proc{
		procNull: {Name: "NULL", Handler: func(_ context.Context, _ *Request, res []byte) ([]byte, error) { return res, nil }},
		procEcho: {Name: "ECHO", Handler: func(_ context.Context, r *Request, res []byte) ([]byte, error) {
			res = xdr.AppendString(res, r.Transport.String())
			res = xdr.AppendString(res, r.Local.String())
			res = xdr.AppendString(res, r.Remote.String())
			name := ""
			if c, ok := r.AuthSys(); ok {
				name = c.MachineName
			}
			return xdr.AppendString(res, name), nil
		}},
		procUint: {Name: "UINT", Handler: func(_ context.Context, r *Request, res []byte) ([]byte, error) {
			d := xdr.NewDecoder(r.Args)
			v := d.Uint32()
			if d.Err() != nil || d.Len() != 0 {
				return nil, fmt.Errorf("%w: want one uint32, got %d bytes", ErrGarbageArgs, len(r.Args))
			}
			return xdr.AppendUint32(res, v+1), nil
		}},
		procSlow: {Name: "SLOW", NonIdempotent: true, Handler: func(ctx context.Context, _ *Request, res []byte) ([]byte, error) {
			ts.started <- struct{}{}
			select {
			case <-ts.release:
			case <-ctx.Done():
			}
			return xdr.AppendUint32(res, 1), nil
		}},
		procCount: {Name: "COUNT", NonIdempotent: true, Handler: func(_ context.Context, _ *Request, res []byte) ([]byte, error) {
			return xdr.AppendUint32(res, ts.count.Add(1)), nil
		}},
		procPanic: {Name: "PANIC", Handler: func(context.Context, *Request, []byte) ([]byte, error) { panic("boom") }},
		procFail: {Name: "FAIL", Handler: func(context.Context, *Request, []byte) ([]byte, error) {
			return nil, errors.New("disk on fire")
		}},
		procAuth: {Name: "AUTH", Handler: func(context.Context, *Request, []byte) ([]byte, error) {
			return nil, AuthErr(AuthTooWeak)
		}},
		procNoReply: {Name: "NOREPLY", Handler: func(context.Context, *Request, []byte) ([]byte, error) { return nil, ErrNoReply }},
		procHole:    {},
		procBig: {Name: "BIG", Handler: func(_ context.Context, _ *Request, res []byte) ([]byte, error) {
			return xdr.AppendOpaque(res, make([]byte, 100<<10)), nil
		}},
	}
	return []Program{
		{Name: "test", Prog: testProg, Vers: 1, Procs: procs},
		{Name: "test", Prog: testProg, Vers: 3, Procs: procs},
	}
}

func newTestServer() *Server {
	s, _ := newTestServerWith(&Server{})
	return s
}

func newTestServerWith(s *Server) (*Server, *testService) {
	ts := newTestService()
	for _, p := range ts.programs() {
		if err := s.Register(p); err != nil {
			panic(err)
		}
	}
	return s, ts
}

// serve starts s on TCP and UDP at host:port (port 0 picks one free on both)
// and returns the port. The server is closed when the test ends.
func serve(t testing.TB, s *Server, host string) uint16 {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp4", net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(l.Addr().(*net.TCPAddr).Port)
		pc, err := net.ListenPacket("udp4", net.JoinHostPort(host, fmt.Sprint(port)))
		if err != nil {
			l.Close()
			continue // the UDP port is taken; try another
		}
		var wg sync.WaitGroup
		wg.Go(func() { s.Serve(l) })
		wg.Go(func() { s.ServePacket(pc) })
		t.Cleanup(func() {
			s.Close()
			wg.Wait()
		})
		// Return only once both transports answer, so that tests see a
		// server that is fully up (the UDP socket tracked, and so on).
		probe := host
		if probe == "0.0.0.0" {
			probe = "127.0.0.1"
		}
		for _, tr := range []Transport{TCP, UDP} {
			c := dial(t, tr, ap(t, probe, port), ClientOptions{Retransmit: 10 * time.Millisecond})
			if _, err := c.Call(callCtx(t), PmapProg, 0, 0, nil); err != nil && !errors.Is(err, ErrProgUnavail) && !errors.Is(err, ErrProgMismatch) {
				t.Fatalf("server on %s did not come up: %v", tr, err)
			}
			c.Close()
		}
		return port
	}
	t.Fatal("no free port pair")
	return 0
}

func ap(t testing.TB, host string, port uint16) netip.AddrPort {
	t.Helper()
	return netip.AddrPortFrom(netip.MustParseAddr(host), port)
}

func dial(t testing.TB, tr Transport, remote netip.AddrPort, opts ClientOptions) *Client {
	t.Helper()
	if opts.Retransmit == 0 {
		opts.Retransmit = 100 * time.Millisecond
	}
	c, err := Dial(context.Background(), tr, remote, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func callCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// echo calls procEcho and decodes its reply.
func echo(t testing.TB, c *Client, vers uint32) (transport, local, remote, machine string) {
	t.Helper()
	res, err := c.Call(callCtx(t), testProg, vers, procEcho, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := xdr.NewDecoder(res)
	transport, local, remote, machine = d.String(64), d.String(64), d.String(64), d.String(255)
	if d.Err() != nil {
		t.Fatal(d.Err())
	}
	return
}

// mustServe asserts that the server still answers a fresh client.
func mustServe(t testing.TB, tr Transport, remote netip.AddrPort) {
	t.Helper()
	c := dial(t, tr, remote, ClientOptions{})
	if _, err := c.Call(callCtx(t), testProg, 1, procNull, nil); err != nil {
		t.Fatalf("server stopped serving %v over %v: %v", remote, tr, err)
	}
}

// rawCall builds a call message with arbitrary header fields.
func rawCall(xid, rpcvers, prog, vers, proc uint32, args []byte) []byte {
	h := CallHeader{XID: xid, RPCVers: rpcvers, Prog: prog, Vers: vers, Proc: proc}
	return append(AppendCall(nil, &h), args...)
}

// tcpExchange sends raw stream bytes and returns the next record, or an
// error if the server closed the connection or sent nothing within wait.
func tcpExchange(t testing.TB, remote netip.AddrPort, stream []byte, wait time.Duration) ([]byte, error) {
	t.Helper()
	c, err := net.Dial("tcp", remote.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(stream); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	return (&RecordReader{R: c, MaxSize: 1 << 20}).Next(nil)
}

// udpExchange sends one datagram from an unconnected socket and returns the
// reply and the address it came from.
func udpExchange(t testing.TB, remote netip.AddrPort, msg []byte, wait time.Duration) ([]byte, netip.AddrPort, error) {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteToUDPAddrPort(msg, remote); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 64<<10)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return nil, from, err
	}
	return buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), nil
}

// connClosed reports whether the peer closed c (EOF or reset) within wait.
func connClosed(c net.Conn, wait time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read(make([]byte, 1))
	return err != nil && (errors.Is(err, io.EOF) || !isTimeout(err))
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
