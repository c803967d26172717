package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
)

// Programs of our own, in the range RFC 5531 leaves to users.
const (
	testProg    = 0x20000077
	foreignProg = 0x20000078
	v2Prog      = 0x20000079
)

var (
	loopback     = netip.MustParseAddr("127.0.0.1")
	loopbackPmap = netip.AddrPortFrom(loopback, 111)
)

// serveTestProgram serves testProg versions 1 and 3 (NULL only) on TCP and
// UDP on one free port of all IPv4 addresses in the namespace.
func serveTestProgram(t *testing.T) uint16 {
	t.Helper()
	s := &sunrpc.Server{}
	null := sunrpc.Proc{Name: "NULL", Handler: func(_ context.Context, _ *sunrpc.Request, res []byte) ([]byte, error) { return res, nil }}
	for _, v := range []uint32{1, 3} {
		if err := s.Register(sunrpc.Program{Name: "test", Prog: testProg, Vers: v, Procs: []sunrpc.Proc{null}}); err != nil {
			t.Fatal(err)
		}
	}
	return serveOn(t, s, "0.0.0.0", 0)
}

// serveOn serves s on TCP and UDP at host:port (0 = a free port for both).
func serveOn(t *testing.T, s *sunrpc.Server, host string, port uint16) uint16 {
	t.Helper()
	l, err := net.Listen("tcp4", net.JoinHostPort(host, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	port = uint16(l.Addr().(*net.TCPAddr).Port)
	pc, err := net.ListenPacket("udp4", net.JoinHostPort(host, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { s.Serve(l) })
	wg.Go(func() { s.ServePacket(pc) })
	t.Cleanup(func() { s.Close(); wg.Wait() })
	return port
}

// rpcinfoP parses `rpcinfo -p HOST` into "prog/vers/proto/port" keys.
func rpcinfoP(t *testing.T) map[string]bool {
	t.Helper()
	out := run(t, "rpcinfo", "-p", "127.0.0.1")
	set := map[string]bool{}
	for _, line := range strings.Split(out, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) >= 4 {
			set[strings.Join(f[:4], "/")] = true
		}
	}
	return set
}

func key(prog, vers uint32, proto string, port uint16) string {
	return fmt.Sprintf("%d/%d/%s/%d", prog, vers, proto, port)
}

func ourRegs(port uint16) []sunrpc.Registration {
	var regs []sunrpc.Registration
	for _, v := range []uint32{1, 3} {
		for _, tr := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
			regs = append(regs, sunrpc.Registration{Prog: testProg, Vers: v, Transport: tr, Port: port})
		}
	}
	return regs
}

// pingBoth runs rpcinfo's TCP and UDP NULL pings of every version we serve.
// rpcinfo finds the port through the portmapper, then calls our server.
func pingBoth(t *testing.T) {
	t.Helper()
	for _, flag := range []string{"-t", "-u"} {
		for _, v := range []string{"1", "3"} {
			out := run(t, "rpcinfo", flag, "127.0.0.1", fmt.Sprint(testProg), v)
			if !strings.Contains(out, "ready and waiting") {
				t.Fatalf("rpcinfo %s: %s", flag, out)
			}
		}
	}
}

func TestRpcbindInterop(t *testing.T) {
	if !inNetns(t, "rpcbind", "rpcinfo") {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	port := serveTestProgram(t)

	// Our embedded portmapper first, while port 111 is free, then Debian's rpcbind.
	t.Run("embedded portmapper", func(t *testing.T) {
		pm := &sunrpc.Portmapper{}
		s := &sunrpc.Server{}
		for _, p := range pm.Programs() {
			s.Register(p)
		}
		serveOn(t, s, "0.0.0.0", sunrpc.PmapPort)
		pm.RegisterSelf(sunrpc.PmapPort, false)
		waitPortmapper(t, netip.AddrPortFrom(loopback, sunrpc.PmapPort))

		r := &sunrpc.Registrar{Socket: "-", Options: sunrpc.ClientOptions{Reserved: true}} // changes only from privileged ports
		if err := r.Register(ctx, ourRegs(port)...); err != nil {
			t.Fatal(err)
		}
		got := rpcinfoP(t)
		for _, k := range []string{key(testProg, 1, "tcp", port), key(testProg, 1, "udp", port), key(testProg, 3, "tcp", port), key(testProg, 3, "udp", port), key(sunrpc.PmapProg, 2, "tcp", 111)} {
			if !got[k] {
				t.Fatalf("rpcinfo -p lacks %s: %v", k, got)
			}
		}
		pingBoth(t)
		out := run(t, "rpcinfo", "127.0.0.1") // rpcbind v4 DUMP
		if !strings.Contains(out, fmt.Sprint(testProg)) || !strings.Contains(out, "0.0.0.0."+uaddrPort(port)) {
			t.Fatalf("rpcinfo (v4 dump) lacks our entry:\n%s", out)
		}
		if err := r.Unregister(ctx, ourRegs(port)...); err != nil {
			t.Fatal(err)
		}
		got = rpcinfoP(t)
		if got[key(testProg, 1, "tcp", port)] || !got[key(sunrpc.PmapProg, 2, "udp", 111)] {
			t.Fatalf("after unregistering: %v", got)
		}
	})

	t.Run("debian rpcbind", func(t *testing.T) {
		startDaemon(t, "rpcbind", "-f", "-w")
		waitPortmapper(t, netip.AddrPortFrom(loopback, sunrpc.PmapPort))
		before := rpcinfoP(t)

		// Someone else's registrations: another version of our program on
		// another port, and another program. Made over TCP, not the socket.
		other := &sunrpc.Registrar{Socket: "-", Owner: "someone-else"}
		foreign := []sunrpc.Registration{
			{Prog: testProg, Vers: 2, Transport: sunrpc.TCP, Port: port + 1},
			{Prog: foreignProg, Vers: 1, Transport: sunrpc.UDP, Port: port + 2},
		}
		if err := other.Register(ctx, foreign...); err != nil {
			t.Fatal(err)
		}

		r := &sunrpc.Registrar{} // through /run/rpcbind.sock
		if err := r.Register(ctx, ourRegs(port)...); err != nil {
			t.Fatal(err)
		}
		if err := r.Register(ctx, ourRegs(port)...); err != nil {
			t.Fatalf("registering the same port again: %v", err)
		}
		err := r.Register(ctx, sunrpc.Registration{Prog: testProg, Vers: 2, Transport: sunrpc.TCP, Port: port})
		if !errors.Is(err, sunrpc.ErrRegisteredElsewhere) {
			t.Fatalf("registering over another process's entry: %v", err)
		}
		got := rpcinfoP(t)
		for _, reg := range ourRegs(port) {
			if !got[key(reg.Prog, reg.Vers, reg.Transport.String(), port)] {
				t.Fatalf("rpcinfo -p lacks %v:\n%v", reg, got)
			}
		}
		pingBoth(t)

		// Unregister ours, and try to unregister the foreign entry with our port.
		if err := r.Unregister(ctx, append(ourRegs(port), sunrpc.Registration{Prog: testProg, Vers: 2, Transport: sunrpc.TCP, Port: port})...); err != nil {
			t.Fatal(err)
		}
		got = rpcinfoP(t)
		for _, reg := range ourRegs(port) {
			if got[key(reg.Prog, reg.Vers, reg.Transport.String(), port)] {
				t.Fatalf("%v survived Unregister", reg)
			}
		}
		for _, f := range foreign {
			if !got[key(f.Prog, f.Vers, f.Transport.String(), f.Port)] {
				t.Fatalf("another process's entry %v was removed", f)
			}
		}
		for k := range before {
			if !got[k] {
				t.Fatalf("rpcbind's own entry %s was removed", k)
			}
		}

		// Portmap v2 SET/UNSET against the same rpcbind.
		v2 := &sunrpc.Registrar{Socket: "-", Version: sunrpc.PmapVers2}
		v2regs := []sunrpc.Registration{
			{Prog: v2Prog, Vers: 1, Transport: sunrpc.TCP, Port: port},
			{Prog: v2Prog, Vers: 1, Transport: sunrpc.UDP, Port: port},
		}
		if err := v2.Register(ctx, v2regs...); err != nil {
			t.Fatal(err)
		}
		got = rpcinfoP(t)
		if !got[key(v2Prog, 1, "tcp", port)] || !got[key(v2Prog, 1, "udp", port)] {
			t.Fatalf("v2 registration missing: %v", got)
		}
		if err := v2.Unregister(ctx, v2regs...); err != nil {
			t.Fatal(err)
		}
		got = rpcinfoP(t)
		if got[key(v2Prog, 1, "tcp", port)] || got[key(v2Prog, 1, "udp", port)] || !got[key(foreignProg, 1, "udp", port+2)] {
			t.Fatalf("after v2 unregister: %v", got)
		}

		// rpcbind's GETADDR answers our lookup the way a callback would use it.
		p, err := sunrpc.LookupPort(ctx, loopback, netip.MustParseAddr("127.0.0.2"), foreignProg, 1, sunrpc.UDP, sunrpc.ClientOptions{})
		if err != nil || p != port+2 {
			t.Fatalf("LookupPort = %d, %v", p, err)
		}
	})
}

func uaddrPort(p uint16) string { return fmt.Sprintf("%d.%d", p>>8, p&0xff) }
