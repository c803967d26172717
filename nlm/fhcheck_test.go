package nlm

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// fakeNFS answers GETATTR: OK for known handles, BADHANDLE for "bad",
// STALE for the rest, and counts the calls.
func fakeNFS(t *testing.T, known ...string) (netip.AddrPort, *atomic.Int32) {
	t.Helper()
	calls := &atomic.Int32{}
	s := &sunrpc.Server{}
	getattr := func(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
		calls.Add(1)
		fh := string(xdr.NewDecoder(req.Args).Opaque(64))
		for _, k := range known {
			if fh == k {
				return append(xdr.AppendUint32(res, 0), make([]byte, 84)...), nil
			}
		}
		if fh == "bad" {
			return xdr.AppendUint32(res, nfs3ErrBadHandle), nil
		}
		return xdr.AppendUint32(res, nfs3ErrStale), nil
	}
	s.Register(sunrpc.Program{Prog: nfsProg, Vers: nfsVers3, Procs: []sunrpc.Proc{{}, {Name: "GETATTR", Handler: getattr}}})
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { s.Serve(l) })
	t.Cleanup(func() { s.Close(); wg.Wait() })
	return l.Addr().(*net.TCPAddr).AddrPort(), calls
}

func TestNFSValidator(t *testing.T) {
	addr, calls := fakeNFS(t, "good-handle")
	v := &NFSValidator{Addr: addr}
	defer v.Close()
	for _, tt := range []struct {
		fh    string
		valid bool
	}{{"good-handle", true}, {"gone", false}, {"bad", false}, {"good-handle", true}} {
		ok, err := v.Valid(context.Background(), []byte(tt.fh))
		if err != nil || ok != tt.valid {
			t.Fatalf("%s: %v %v", tt.fh, ok, err)
		}
	}
	if n := calls.Load(); n != 3 {
		t.Fatalf("%d GETATTRs for 3 distinct handles: the cache is not used", n)
	}
	if ok, err := v.Valid(context.Background(), make([]byte, 65)); ok || err != nil {
		t.Fatal("a handle longer than NFS3_FHSIZE cannot be valid")
	}
}

func TestNFSValidatorUnavailable(t *testing.T) {
	l, _ := net.Listen("tcp4", "127.0.0.1:0")
	addr := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	v := &NFSValidator{Addr: addr}
	if _, err := v.Valid(context.Background(), []byte("x")); err == nil {
		t.Fatal("an unreachable NFS server must be reported, so the request goes ahead")
	}
}
