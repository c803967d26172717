package integration

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
)

// sharedTools is ../shared/tools beside the repository (override with
// NLMHA_SHARED_TOOLS).
func sharedTools() string {
	if d := os.Getenv("NLMHA_SHARED_TOOLS"); d != "" {
		return d
	}
	return filepath.Join("..", "..", "shared", "tools")
}

// peerTool returns the path of a built peer tool, e.g. "nlmpeer/cache/bin/nlmprobe".
func peerTool(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join(sharedTools(), rel))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		msg := fmt.Sprintf("peer tool %s not built (make test runs %s/nlmpeer/setup.sh)", p, sharedTools())
		if os.Getenv(requirePeersEnv) == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}

var (
	buildOnce sync.Once
	buildErr  error
)

// binary builds the project's commands once per test process (the parent
// of a namespaced test builds them and passes the directory on) and
// returns the path of one of them.
func binary(t *testing.T, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		if os.Getenv("NLMHA_BIN") != "" {
			return
		}
		dir, err := os.MkdirTemp("", "nlmha-bin-")
		if err != nil {
			buildErr = err
			return
		}
		out, err := exec.Command("go", "build", "-o", dir+"/", "../cmd/...").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		os.Setenv("NLMHA_BIN", dir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(os.Getenv("NLMHA_BIN"), name)
}

// waitRegistered waits until the portmapper at 127.0.0.1 lists prog.
func waitRegistered(t *testing.T, prog, vers uint32) uint16 {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		p, err := sunrpc.LookupPort(ctx, loopback, netip.Addr{}, prog, vers, sunrpc.TCP, sunrpc.ClientOptions{Retransmit: 100 * time.Millisecond})
		cancel()
		if err == nil {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("program %d v%d never registered: %v", prog, vers, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startGanesha serves export over NFSv3 with NLM disabled, so that the
// lock service is ours.
func startGanesha(t *testing.T, export string) {
	t.Helper()
	// Ganesha resolves its bind address with AI_ADDRCONFIG, which does not
	// count a lone 127.0.0.1: a second loopback address makes it start.
	if out, err := exec.Command("ip", "addr", "add", "127.0.0.2/8", "dev", "lo").CombinedOutput(); err != nil && !strings.Contains(string(out), "exists") {
		t.Fatalf("ip addr add: %v: %s", err, out)
	}
	dir := t.TempDir()
	tmpl, err := os.ReadFile("testdata/ganesha-nonlm.conf.in")
	if err != nil {
		t.Fatal(err)
	}
	conf := strings.NewReplacer("@DIR@", dir, "@EXPORT@", export).Replace(string(tmpl))
	if err := os.WriteFile(dir+"/ganesha.conf", []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(dir+"/recov", 0o755)
	startDaemon(t, "ganesha.nfsd", "-F", "-f", dir+"/ganesha.conf", "-L", dir+"/ganesha.log", "-p", dir+"/ganesha.pid", "-N", "NIV_EVENT")
	t.Cleanup(func() {
		if log, err := os.ReadFile(dir + "/ganesha.log"); err == nil && t.Failed() {
			t.Logf("ganesha.log:\n%s", log)
		}
	})
	waitRegistered(t, 100003, 3)
}

// runCmd runs a command with a deadline and returns its output and error.
func runCmd(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}
