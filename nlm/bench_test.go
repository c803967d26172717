package nlm

import (
	"context"
	"net/netip"
	"testing"

	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

// BenchmarkServiceLockUnlock is the NLM service's per-call cost without
// sockets: decode, virtual server and owner look-ups, the manager through
// the backend, and the reply, for a LOCK and an UNLOCK; "monitored" adds
// the real NSM service, as in nlmd (the client is monitored on its first
// lock; after that it is the generation check).
func BenchmarkServiceLockUnlock(b *testing.B) {
	b.Run("unmonitored", func(b *testing.B) { benchLockUnlock(b, false) })
	b.Run("monitored", func(b *testing.B) { benchLockUnlock(b, true) })
}

func benchLockUnlock(b *testing.B, monitored bool) {
	vcfg := virtualserver.Config{ServeUnknown: true}
	var reg *virtualserver.Registry
	var m *nsm.Service
	vcfg.Orchestrated = monitored
	backend := memdlm.New()
	vcfg.Claims = backend
	reg = virtualserver.New(vcfg)
	cfg := Config{Backend: backend, VirtualServers: reg}
	if monitored {
		var err error
		m, err = nsm.New(nsm.Config{VirtualServers: reg, StateDir: b.TempDir(), RPC: &sunrpc.Server{}, Notify: nsm.NotifyConfig{Disabled: true}})
		if err != nil {
			b.Fatal(err)
		}
		defer m.Close()
		cfg.Monitor = m
		// As nlmd's takeover does: the status monitor starts with the
		// virtual server.
		ctx, stop := context.WithCancel(context.Background())
		defer stop()
		go reg.HandleEvents(ctx, func(ctx context.Context, ev virtualserver.Event) {
			if ev.Kind != virtualserver.Wanted {
				return
			}
			vs, created, err := reg.Begin(ctx, ev.Spec, 1)
			if err != nil || !created {
				return
			}
			if _, err := m.Start(vs, nsm.Restart); err != nil {
				b.Error(err)
				return
			}
			vs.Serve()
		})
	}
	svc := New(cfg)
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
	procs := svc.Programs()[2].Procs
	handleLock, handleUnlock := procs[ProcLock].Handler, procs[ProcUnlock].Handler
	b.ReportAllocs()
	for b.Loop() {
		out, err := handleLock(ctx, lockReq, res[:0])
		if err != nil || out[len(out)-1] != byte(Granted) {
			b.Fatalf("LOCK: %x %v", out, err)
		}
		if _, err := handleUnlock(ctx, &unlockReq, res[:0]); err != nil {
			b.Fatal(err)
		}
	}
}
