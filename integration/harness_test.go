// Package integration holds end-to-end tests against real peers (rpcbind,
// rpcinfo, nfs-utils, the tools in ../shared/tools). Tests that need a
// private network re-run themselves inside a fresh network and mount
// namespace, so they can bind port 111 and start their own daemons without
// touching the host, and send traffic only to loopback addresses they own.
package integration

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
)

// requirePeersEnv makes missing peers a failure instead of a skip; `make
// test` sets it after installing them, so CI never silently skips.
const requirePeersEnv = "NLMHA_REQUIRE_PEERS"

const inNetnsEnv = "NLMHA_IN_NETNS"

// requirePeers checks that the named programs are installed and that we run
// as root (needed for namespaces and port 111).
func requirePeers(t *testing.T, programs ...string) {
	t.Helper()
	var missing []string
	for _, p := range programs {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if os.Geteuid() != 0 {
		missing = append(missing, "root privileges")
	}
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("needs %s (run `make test`, which installs them)", strings.Join(missing, ", "))
	if os.Getenv(requirePeersEnv) == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// inNetns runs the calling test in a private network and mount namespace.
// Outside one it re-executes the test binary for just this test inside
// `unshare --net --mount`, reports its output and returns false; inside it
// brings loopback up, gives the namespace its own /run, and returns true.
func inNetns(t *testing.T, programs ...string) bool {
	t.Helper()
	requirePeers(t, append([]string{"unshare", "ip"}, programs...)...)
	if os.Getenv(inNetnsEnv) == "1" {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			t.Fatalf("ip link set lo up: %v: %s", err, out)
		}
		// A private /run keeps rpcbind's lock file and socket apart from
		// any rpcbind the host runs.
		if err := syscall.Mount("tmpfs", "/run", "tmpfs", 0, "mode=0755"); err != nil {
			t.Fatalf("mounting a private /run: %v", err)
		}
		return true
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--net", "--mount", "--propagation", "private", "--", exe,
		"-test.run", "^" + t.Name() + "$", "-test.v", "-test.count=1"}
	// As long as the test may run (make soak runs with no limit).
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if d, ok := t.Deadline(); ok {
		ctx, cancel = context.WithDeadline(ctx, d)
	}
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", args...)
	cmd.Env = append(os.Environ(), inNetnsEnv+"=1")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	t.Logf("inside the namespace:\n%s", out.String())
	if err != nil {
		t.Fatalf("test failed inside its namespace: %v", err)
	}
	if !strings.Contains(out.String(), "--- PASS: "+t.Name()) {
		t.Fatal("the test did not run inside its namespace")
	}
	return false
}

// proc is a daemon started by a test.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // exit status, once done is closed
	out  bytes.Buffer
}

// stop sends sig and waits for the process to exit (SIGKILL after wait).
func (p *proc) stop(sig syscall.Signal, wait time.Duration) error {
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return p.err
	case <-time.After(wait):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("still running %v after %v", wait, sig)
	}
}

// startDaemon starts a program in the foreground and stops it (SIGTERM,
// then SIGKILL) when the test ends.
func startDaemon(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM, 5*time.Second)
		if t.Failed() && p.out.Len() > 0 {
			t.Logf("%s output:\n%s", name, p.out.String())
		}
	})
	return p
}

// waitPortmapper waits until a portmapper answers NULL at addr.
func waitPortmapper(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	waitNull(t, addr, sunrpc.PmapProg, sunrpc.PmapVers2)
}

// waitNull waits until (prog, vers) answers NULL over UDP at addr.
func waitNull(t *testing.T, addr netip.AddrPort, prog, vers uint32) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := sunrpc.Dial(context.Background(), sunrpc.UDP, addr, sunrpc.ClientOptions{Retransmit: 50 * time.Millisecond})
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			_, err = c.Call(ctx, prog, vers, 0, nil)
			cancel()
			c.Close()
			if err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer from %d v%d at %v: %v", prog, vers, addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// run runs a command and returns its combined output, failing the test on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
