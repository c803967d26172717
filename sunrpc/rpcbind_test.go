package sunrpc

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"
)

func TestUaddr(t *testing.T) {
	tests := []struct {
		s    string
		ap   string
		fail bool
	}{
		{s: "127.0.0.1.0.111", ap: "127.0.0.1:111"},
		{s: "0.0.0.0.3.1", ap: "0.0.0.0:769"},
		{s: "::1.255.255", ap: "[::1]:65535"},
		{s: "::.0.111", ap: "[::]:111"},
		{s: "::ffff:10.1.2.3.0.1", ap: "10.1.2.3:1"},
		{s: "127.0.0.1.256.1", fail: true},
		{s: "127.0.0.1.1", fail: true},
		{s: "nohost.1.2", fail: true},
		{s: "", fail: true},
		{s: "1.2.3.4.-1.0", fail: true},
	}
	for _, tt := range tests {
		got, err := ParseUaddr(tt.s)
		if tt.fail {
			if !errors.Is(err, ErrBadUaddr) {
				t.Errorf("ParseUaddr(%q) = %v, %v; want ErrBadUaddr", tt.s, got, err)
			}
			continue
		}
		if err != nil || got.String() != tt.ap {
			t.Errorf("ParseUaddr(%q) = %v, %v; want %s", tt.s, got, err, tt.ap)
		}
	}
	if s := FormatUaddr(netip.MustParseAddrPort("[::ffff:127.0.0.1]:2049")); s != "127.0.0.1.8.1" {
		t.Errorf("FormatUaddr unmapped: %s", s)
	}
}

func TestNetID(t *testing.T) {
	for _, id := range []string{"tcp", "udp", "tcp6", "udp6"} {
		tr, v6, ok := ParseNetID(id)
		if !ok || NetID(tr, v6) != id {
			t.Errorf("netid %s does not round-trip", id)
		}
	}
	if _, _, ok := ParseNetID("rdma"); ok {
		t.Error("unknown netid accepted")
	}
}

// startPortmapper serves an embedded portmapper on an ephemeral port of
// 127.0.0.1 and returns it with its address.
func startPortmapper(t *testing.T, versions ...uint32) (*Portmapper, netip.AddrPort) {
	t.Helper()
	// Insecure: the tests' clients call from unprivileged ports.
	pm := &Portmapper{Now: func() time.Time { return time.Unix(1700000000, 0) }, Insecure: true}
	s := &Server{}
	for _, p := range pm.Programs() {
		if len(versions) == 0 || slices.Contains(versions, p.Vers) {
			if err := s.Register(p); err != nil {
				t.Fatal(err)
			}
		}
	}
	port := serve(t, s, "127.0.0.1")
	pm.RegisterSelf(port, false)
	return pm, ap(t, "127.0.0.1", port)
}

func TestPortmapperV2(t *testing.T) {
	_, addr := startPortmapper(t)
	for _, tr := range []Transport{TCP, UDP} {
		t.Run(tr.String(), func(t *testing.T) {
			rb := Rpcbind{C: dial(t, tr, addr, ClientOptions{})}
			ctx := callCtx(t)
			m := Mapping{Prog: 300001, Vers: 1, Prot: IPProtoTCP, Port: 4000}
			if ok, err := rb.SetV2(ctx, m); !ok || err != nil {
				t.Fatalf("SET: %v %v", ok, err)
			}
			if ok, _ := rb.SetV2(ctx, Mapping{Prog: 300001, Vers: 1, Prot: IPProtoTCP, Port: 4001}); ok {
				t.Fatal("SET over an existing mapping must fail")
			}
			rb.SetV2(ctx, Mapping{Prog: 300001, Vers: 1, Prot: IPProtoUDP, Port: 4002})
			if p, err := rb.GetPort(ctx, 300001, 1, TCP); p != 4000 || err != nil {
				t.Fatalf("GETPORT tcp = %d, %v", p, err)
			}
			if p, _ := rb.GetPort(ctx, 300001, 1, UDP); p != 4002 {
				t.Fatalf("GETPORT udp = %d", p)
			}
			if p, _ := rb.GetPort(ctx, 300001, 2, TCP); p != 0 {
				t.Fatalf("GETPORT of an unregistered version = %d", p)
			}
			dump, err := rb.DumpV2(ctx)
			if err != nil || !slices.Contains(dump, m) || !slices.Contains(dump, Mapping{Prog: PmapProg, Vers: 2, Prot: IPProtoUDP, Port: uint32(addr.Port())}) {
				t.Fatalf("DUMP = %v, %v", dump, err)
			}
			// Like rpcbind, v2 UNSET drops every transport of the (prog, vers).
			if ok, _ := rb.UnsetV2(ctx, Mapping{Prog: 300001, Vers: 1, Prot: IPProtoTCP}); !ok {
				t.Fatal("UNSET failed")
			}
			if p, _ := rb.GetPort(ctx, 300001, 1, UDP); p != 0 {
				t.Fatal("UNSET left the UDP mapping")
			}
		})
	}
}

func TestPortmapperV3V4(t *testing.T) {
	_, addr := startPortmapper(t)
	for _, vers := range []uint32{RpcbVers3, RpcbVers4} {
		rb := Rpcbind{C: dial(t, UDP, addr, ClientOptions{})}
		ctx := callCtx(t)
		e := RPCB{Prog: 300002, Vers: vers, NetID: "udp", Addr: "0.0.0.0.15.160", Owner: "test"}
		if ok, err := rb.Set(ctx, vers, e); !ok || err != nil {
			t.Fatalf("v%d SET: %v %v", vers, ok, err)
		}
		rb.Set(ctx, vers, RPCB{Prog: 300002, Vers: vers, NetID: "tcp6", Addr: "::.15.161", Owner: "test"})
		// A wildcard registration is answered with the address we were reached on.
		if ua, err := rb.GetAddr(ctx, vers, RPCB{Prog: 300002, Vers: vers, NetID: "udp"}); ua != "127.0.0.1.15.160" || err != nil {
			t.Fatalf("v%d GETADDR = %q, %v", vers, ua, err)
		}
		// Like rpcbind, the answer is for the transport the query came on:
		// asking for "tcp" over UDP gets the UDP registration.
		if ua, _ := rb.GetAddr(ctx, vers, RPCB{Prog: 300002, Vers: vers, NetID: "tcp"}); ua != "127.0.0.1.15.160" {
			t.Fatalf("GETADDR over UDP naming tcp = %q", ua)
		}
		tcp := Rpcbind{C: dial(t, TCP, addr, ClientOptions{})}
		if ua, _ := tcp.GetAddr(ctx, vers, RPCB{Prog: 300002, Vers: vers, NetID: "udp"}); ua != "" {
			t.Fatalf("GETADDR over TCP (nothing registered for tcp) = %q", ua)
		}
		table, err := rb.Dump(ctx, vers)
		e.Owner = ownerUnknown // who it was, not what it said
		if err != nil || !slices.Contains(table, e) {
			t.Fatalf("v%d DUMP = %v, %v", vers, table, err)
		}
		// UNSET with a netid removes only that netid.
		if ok, _ := rb.Unset(ctx, vers, RPCB{Prog: 300002, Vers: vers, NetID: "udp"}); !ok {
			t.Fatal("UNSET failed")
		}
		after, _ := rb.Dump(ctx, vers)
		if !slices.ContainsFunc(after, func(x RPCB) bool { return x.Prog == 300002 && x.NetID == "tcp6" }) ||
			slices.ContainsFunc(after, func(x RPCB) bool { return x.Prog == 300002 && x.NetID == "udp" }) {
			t.Fatalf("UNSET of udp must remove exactly udp: %v", after)
		}
		res, err := rb.C.Call(ctx, PmapProg, vers, RpcbProcGetTime, nil)
		if err != nil || len(res) != 4 || res[0] != 0x65 {
			t.Fatalf("GETTIME = %x, %v", res, err)
		}
	}
}

// SET and UNSET are for local callers only, as in rpcbind.
func TestPortmapperRefusesRemoteChanges(t *testing.T) {
	pm := &Portmapper{}
	remote := &Request{Remote: netip.MustParseAddrPort("192.0.2.1:999"), Args: appendRPCB(nil, RPCB{Prog: 1, Vers: 1, NetID: "tcp", Addr: "0.0.0.0.0.1"})}
	res, err := pm.set(context.Background(), remote, nil)
	if err != nil || res[3] != 0 || len(pm.Entries()) != 0 {
		t.Fatal("remote SET accepted")
	}
	remote.Args = appendMapping(nil, Mapping{Prog: 1, Vers: 1, Prot: IPProtoTCP, Port: 1})
	if res, _ := pm.setV2(context.Background(), remote, nil); res[3] != 0 {
		t.Fatal("remote v2 SET accepted")
	}
	pm.Set(RPCB{Prog: 1, Vers: 1, NetID: "tcp", Addr: "0.0.0.0.0.1"})
	if res, _ := pm.unsetV2(context.Background(), remote, nil); res[3] != 0 || len(pm.Entries()) != 1 {
		t.Fatal("remote UNSET accepted")
	}
	if _, err := pm.set(context.Background(), &Request{Args: []byte{1}}, nil); !errors.Is(err, ErrGarbageArgs) {
		t.Fatalf("garbage SET args: %v", err)
	}
}

// Changes come only from privileged local ports; an unprivileged local
// user (uid 65534 in the issue) can neither remove nlmd's registration nor
// put its own port in place. With Insecure, such a caller may change only
// what such callers registered.
func TestPortmapperPrivilegedChanges(t *testing.T) {
	for _, insecure := range []bool{false, true} {
		pm := &Portmapper{Insecure: insecure}
		pm.Set(RPCB{Prog: 100021, Vers: 4, NetID: "tcp", Addr: "0.0.0.0.15.205", Owner: "nlmd"})
		call := func(port uint16, h func(context.Context, *Request, []byte) ([]byte, error), args []byte) bool {
			res, err := h(context.Background(), &Request{Remote: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port), Args: args}, nil)
			if err != nil {
				t.Fatal(err)
			}
			return res[3] == 1
		}
		nlm := appendMapping(nil, Mapping{Prog: 100021, Vers: 4, Prot: IPProtoTCP, Port: 5555})
		if call(40000, pm.unsetV2, nlm) || call(40000, pm.unset, appendRPCB(nil, RPCB{Prog: 100021, Vers: 4, NetID: "tcp"})) {
			t.Fatalf("insecure %v: an unprivileged UNSET removed nlmd's registration", insecure)
		}
		if call(40000, pm.setV2, appendMapping(nil, Mapping{Prog: 300007, Vers: 1, Prot: IPProtoTCP, Port: 5555})) != insecure {
			t.Fatalf("insecure %v: unprivileged SET of a new program", insecure)
		}
		if insecure && !call(40001, pm.unsetV2, appendMapping(nil, Mapping{Prog: 300007, Vers: 1})) {
			t.Fatal("an unprivileged caller could not remove what an unprivileged caller registered")
		}
		if ua, _ := pm.lookup(100021, 4, "tcp"); ua != "0.0.0.0.15.205" {
			t.Fatalf("insecure %v: nlmd's registration is now %q", insecure, ua)
		}
		// Root (a privileged port) removes and replaces anything.
		if !call(700, pm.unsetV2, nlm) || !call(700, pm.setV2, nlm) {
			t.Fatalf("insecure %v: root's UNSET and SET", insecure)
		}
		if e := pm.Entries(); len(e) != 1 || e[0].Owner != ownerRoot {
			t.Fatalf("insecure %v: table %+v", insecure, e)
		}
	}
}

func TestRegistrar(t *testing.T) {
	for _, vers := range []uint32{0, RpcbVers3, PmapVers2} {
		t.Run(map[uint32]string{0: "auto", 3: "v3", 2: "v2"}[vers], func(t *testing.T) {
			pm, addr := startPortmapper(t)
			r := &Registrar{Socket: "-", Addr: addr, Version: vers}
			ctx := callCtx(t)
			ours := []Registration{
				{Prog: 300003, Vers: 1, Transport: TCP, Port: 5000},
				{Prog: 300003, Vers: 1, Transport: UDP, Port: 5000},
			}
			if err := r.Register(ctx, ours...); err != nil {
				t.Fatal(err)
			}
			if err := r.Register(ctx, ours...); err != nil {
				t.Fatalf("registering again (restart, or a second instance on the same port): %v", err)
			}
			// Someone else's program, and someone else's version of ours.
			pm.Set(RPCB{Prog: 300004, Vers: 1, NetID: "tcp", Addr: "0.0.0.0.23.112", Owner: "other"})
			pm.Set(RPCB{Prog: 300003, Vers: 2, NetID: "tcp", Addr: "0.0.0.0.23.113", Owner: "other"})
			if err := r.Register(ctx, Registration{Prog: 300004, Vers: 1, Transport: TCP, Port: 5000}); !errors.Is(err, ErrRegisteredElsewhere) {
				t.Fatalf("taking over another process's registration: %v", err)
			}
			before := len(pm.Entries())
			// Unregistering a mapping that points elsewhere leaves it alone.
			if err := r.Unregister(ctx, Registration{Prog: 300004, Vers: 1, Transport: TCP, Port: 5000}); err != nil {
				t.Fatal(err)
			}
			if len(pm.Entries()) != before {
				t.Fatal("Unregister removed another process's entry")
			}
			if err := r.Unregister(ctx, ours...); err != nil {
				t.Fatal(err)
			}
			for _, e := range pm.Entries() {
				if e.Prog == 300003 && e.Vers == 1 {
					t.Fatalf("our entry survived: %+v", e)
				}
			}
			if got := len(pm.Entries()); got != before-2 {
				t.Fatalf("%d entries left, want %d", got, before-2)
			}
		})
	}
}

// Portmap v2 UNSET cannot remove one transport alone: the registrar puts
// back the mapping that is not ours.
func TestRegistrarV2RestoresOtherTransport(t *testing.T) {
	pm, addr := startPortmapper(t)
	pm.Set(RPCB{Prog: 300005, Vers: 1, NetID: "udp", Addr: "0.0.0.0.31.64", Owner: "other"}) // port 8000
	r := &Registrar{Socket: "-", Addr: addr, Version: PmapVers2}
	ctx := callCtx(t)
	reg := Registration{Prog: 300005, Vers: 1, Transport: TCP, Port: 5001}
	if err := r.Register(ctx, reg); err != nil {
		t.Fatal(err)
	}
	if err := r.Unregister(ctx, reg); err != nil {
		t.Fatal(err)
	}
	rb := Rpcbind{C: dial(t, TCP, addr, ClientOptions{})}
	if p, _ := rb.GetPort(ctx, 300005, 1, UDP); p != 8000 {
		t.Fatalf("the other process's UDP mapping is gone (port %d)", p)
	}
	if p, _ := rb.GetPort(ctx, 300005, 1, TCP); p != 0 {
		t.Fatalf("our TCP mapping survived (port %d)", p)
	}
}

func TestLookupPort(t *testing.T) {
	// A full rpcbind answers GETADDR; a portmap-only server makes the
	// lookup fall back to GETPORT.
	for _, versions := range [][]uint32{nil, {PmapVers2}} {
		pm, addr := startPortmapper(t, versions...)
		pm.Set(RPCB{Prog: 300006, Vers: 4, NetID: "udp", Addr: "0.0.0.0.3.232"})
		pm.Set(RPCB{Prog: 300006, Vers: 4, NetID: "tcp", Addr: "0.0.0.0.3.233"})
		ctx := callCtx(t)
		for _, tr := range []Transport{UDP, TCP} {
			rb := Rpcbind{C: dial(t, tr, addr, ClientOptions{Local: netip.MustParseAddr("127.0.0.5")})}
			want := uint16(1000)
			if tr == TCP {
				want = 1001
			}
			if p, err := rb.Lookup(ctx, 300006, 4, tr, false); err != nil || p != want {
				t.Fatalf("versions %v: %v port %d, %v; want %d", versions, tr, p, err, want)
			}
			if _, err := rb.Lookup(ctx, 300006, 3, tr, false); !errors.Is(err, ErrNotRegistered) {
				t.Fatalf("versions %v: unregistered: %v", versions, err)
			}
		}
	}
}

func TestLookupPortNoPortmapper(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	// 127.0.0.1:111 may or may not have a portmapper; an unserved loopback
	// address refuses at once either way.
	_, err := LookupPort(ctx, netip.MustParseAddr("127.0.0.254"), netip.Addr{}, 1, 1, UDP, ClientOptions{Retransmit: 50 * time.Millisecond})
	if err == nil {
		t.Fatal("lookup against nothing succeeded")
	}
}
