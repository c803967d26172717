package nlm

import (
	"context"
	"net/netip"
	"testing"

	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

// BenchmarkServiceLockUnlock is the NLM service's per-call cost without
// sockets: decode, virtual server and owner look-ups, the manager through
// the backend, and the reply, for a LOCK and an UNLOCK.
func BenchmarkServiceLockUnlock(b *testing.B) {
	svc := New(Config{Backend: memdlm.New(), VirtualServers: virtualserver.New(virtualserver.Config{ServeUnknown: true})})
	defer svc.Close()
	l := Lock{CallerName: []byte("client.example.com"), FH: []byte("0123456789abcdef0123456789abcdef"), OH: []byte("42@client.example.com"), SVID: 42, Offset: 0, Len: 100}
	lockReq := &sunrpc.Request{Prog: Prog, Vers: Vers4, Proc: ProcLock, Transport: sunrpc.TCP,
		Local: netip.MustParseAddrPort("10.0.0.1:4045"), Remote: netip.MustParseAddrPort("10.1.0.1:700"),
		Args: (&LockArgs{Cookie: []byte("cookie01"), Exclusive: true, Lock: l, State: 3}).Append(nil, Vers4)}
	unlockReq := *lockReq
	unlockReq.Proc = ProcUnlock
	unlockReq.Args = (&UnlockArgs{Cookie: []byte("cookie02"), Lock: l}).Append(nil, Vers4)
	res := make([]byte, 0, 256)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := svc.handleLock(ctx, lockReq, res[:0]); err != nil {
			b.Fatal(err)
		}
		if _, err := svc.handleUnlock(ctx, &unlockReq, res[:0]); err != nil {
			b.Fatal(err)
		}
	}
}
