package integration

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
)

// nlmd registers with the system rpcbind, serves, and on SIGTERM withdraws
// exactly its registrations; without rpcbind it runs its own portmapper;
// and it refuses to start over another process's NLM registration.
func TestNlmdLifecycle(t *testing.T) {
	nlmd := binary(t, "nlmd")
	if !inNetns(t, "rpcbind", "rpcinfo") {
		return
	}
	t.Run("embedded portmapper", func(t *testing.T) {
		cmd := startNlmd(t, nlmd)
		if out := run(t, "rpcinfo", "-p", "127.0.0.1"); !strings.Contains(out, "nlockmgr") {
			t.Fatalf("embedded portmapper does not list NLM:\n%s", out)
		}
		stopNlmd(t, cmd)
	})
	t.Run("system rpcbind", func(t *testing.T) {
		startDaemon(t, "rpcbind", "-f", "-w")
		waitPortmapper(t, loopbackPmap)
		before := rpcinfoP(t)
		cmd := startNlmd(t, nlmd)
		got := rpcinfoP(t)
		for _, p := range []string{"tcp", "udp"} {
			for _, v := range []uint32{1, 3, 4} {
				if !got[key(nlm.Prog, v, p, nlmPort)] {
					t.Fatalf("rpcinfo lacks NLM v%d %s: %v", v, p, got)
				}
			}
			if !got[key(nsm.Prog, nsm.Vers, p, 32765)] {
				t.Fatalf("rpcinfo lacks NSM %s: %v", p, got)
			}
		}
		if out := run(t, "rpcinfo", "127.0.0.1"); !strings.Contains(out, "tcp6") {
			t.Fatalf("no IPv6 registrations:\n%s", out)
		}
		// It serves.
		c := nlmClient(t, hostA, sunrpc.TCP)
		if r := call(t, func(ctx context.Context) (nlm.Res, error) {
			return c.Lock(ctx, &nlm.LockArgs{Cookie: []byte("x"), Exclusive: true, Lock: lockOf("a", 1, 0, 1)})
		}); r.Stat != nlm.Granted {
			t.Fatalf("LOCK: %v", r.Stat)
		}
		stopNlmd(t, cmd)
		after := rpcinfoP(t)
		if len(after) != len(before) {
			t.Fatalf("registrations left after SIGTERM: %v (before start: %v)", after, before)
		}
		// Another process holds NLM on another port: nlmd refuses to start.
		other := &sunrpc.Registrar{Socket: "-"}
		foreign := sunrpc.Registration{Prog: nlm.Prog, Vers: 4, Transport: sunrpc.TCP, Port: 5999}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := other.Register(ctx, foreign); err != nil {
			t.Fatal(err)
		}
		out, err := runCmd(10*time.Second, nlmd, "--nlm-port", "4045", "--state-dir", t.TempDir())
		if err == nil || !strings.Contains(out, "another process") {
			t.Fatalf("nlmd started over another process's registration: %v\n%s", err, out)
		}
		if !rpcinfoP(t)[key(nlm.Prog, 4, "tcp", 5999)] {
			t.Fatal("the other process's registration was removed")
		}
	})
}

func startNlmd(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := startDaemon(t, bin, append([]string{"--nlm-port", "4045", "--state-dir", t.TempDir(), "--log-level", "debug"}, args...)...)
	waitRegistered(t, nlm.Prog, 4)
	return p
}

func stopNlmd(t *testing.T, p *proc) {
	t.Helper()
	if err := p.stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("nlmd after SIGTERM: %v\n%s", err, p.out.String())
	}
}
