package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
)

func repoFile(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// The Pacemaker resource agent passes ocf-tester (Debian's
// resource-agents) against a running nlmd: probe, start, start again,
// monitor, stop, stop again, and the rest of its checks.
func TestOCFAgent(t *testing.T) {
	nlmd, bin := binary(t, "nlmd"), binary(t, "nlmadmin")
	agent := repoFile(t, "hacallout/ocf/nlmha")
	if !inNetns(t, "ocf-tester") {
		return
	}
	sock := filepath.Join(t.TempDir(), "nlmd.sock")
	startDaemon(t, nlmd, nlmdArgs(t.TempDir(), "--serve-unknown=false", "--rpcbind", "none", "--control-socket", sock)...)
	waitFile(t, sock)
	out, err := runCmd(3*time.Minute, "ocf-tester", "-v", "-n", "nlmha-test", "-o", "vip=127.0.0.7", "-o", "name=nfs-seven",
		"-o", "socket="+sock, "-o", "nlmadmin="+bin, agent)
	t.Logf("ocf-tester:\n%s", out)
	if err != nil || !strings.Contains(out, "passed all tests") {
		t.Fatalf("ocf-tester: %v", err)
	}
	// And the agent really moved the virtual server: started, it serves.
	env := append(os.Environ(), "OCF_ROOT=/usr/lib/ocf", "OCF_RESKEY_vip=127.0.0.7", "OCF_RESKEY_socket="+sock, "OCF_RESKEY_nlmadmin="+bin)
	for _, step := range []struct {
		action string
		rc     int
	}{{"monitor", 7}, {"start", 0}, {"monitor", 0}, {"stop", 0}, {"monitor", 7}, {"stop", 0}} {
		if rc := runAgent(t, env, agent, step.action); rc != step.rc {
			t.Fatalf("%s: rc %d, want %d", step.action, rc, step.rc)
		}
	}
}

func runAgent(t *testing.T, env []string, agent, action string) int {
	t.Helper()
	cmd := execCommand(agent, action)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err == nil {
		return 0
	}
	if ee, ok := err.(interface{ ExitCode() int }); ok {
		t.Logf("%s %s: rc %d: %s", agent, action, ee.ExitCode(), out)
		return ee.ExitCode()
	}
	t.Fatalf("%s %s: %v", agent, action, err)
	return -1
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	for range 200 {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never appeared", path)
}

// The CTDB callout played through CTDB's event sequence on two nodes (two
// nlmd on this host, sockets bound per address): the public address moves
// from node 1 to node 2 with releaseip-pre/takeip, the client's lock moves
// with it and no grace period stalls anyone; nlockmgr restarts are no-ops;
// every event also reaches the NFS callout it chains to.
func TestCTDBCallout(t *testing.T) {
	nlmd := binary(t, "nlmd")
	bin := binary(t, "nlmadmin")
	callout := repoFile(t, "hacallout/ctdb/nlmha-nfs-callout")
	if !inNetns(t) {
		return
	}
	state := t.TempDir() // shared by the two nodes, as on a cluster file system
	var socks [2]string
	var nodes [2]*proc
	startNode := func(i int) {
		os.Remove(socks[i])
		nodes[i] = startDaemon(t, nlmd, nlmdArgs(state, "--listen-mode", "vip", "--serve-unknown=false", "--rpcbind", "none",
			"--control-socket", socks[i], "--grace-period", "60s")...)
		waitFile(t, socks[i])
	}
	for i := range socks {
		socks[i] = filepath.Join(t.TempDir(), "nlmd.sock")
		startNode(i)
	}
	nfsLog := filepath.Join(t.TempDir(), "nfs-callout.log")
	fakeNFS := filepath.Join(t.TempDir(), "nfs-callout")
	os.WriteFile(fakeNFS, []byte("#!/bin/sh\n[ \"$1\" = register ] && { echo stop; echo monitor-list-shares; exit 0; }\necho \"$@\" >> "+nfsLog+"\n"), 0o755)
	event := func(node int, args ...string) string {
		t.Helper()
		cmd := execCommand(callout, args...)
		cmd.Env = append(os.Environ(), "CTDB_NLMHA_SOCKET="+socks[node], "CTDB_NLMHA_NLMADMIN="+bin, "CTDB_NLMHA_NFS_CALLOUT="+fakeNFS)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("node %d: callout %v: %v\n%s", node+1, args, err, out)
		}
		return string(out)
	}
	ip := vip.String()
	if out := event(0, "register"); !strings.Contains(out, "takeip") || !strings.Contains(out, "monitor-list-shares") {
		t.Fatalf("register:\n%s", out)
	}
	for n := range 2 {
		event(n, "startup")
		event(n, "check", "nlockmgr")
	}
	// node 1 hosts the address
	event(0, "startipreallocate")
	event(0, "takeip-pre", "lo", ip, "8")
	if out := event(0, "takeip", "lo", ip, "8"); !strings.Contains(out, "took over "+ip) {
		t.Fatalf("takeip:\n%s", out)
	}
	event(0, "monitor-pre")
	event(0, "check", "nlockmgr")
	event(0, "monitor-post")
	waitServing(t, vip)
	lockAs(t, nlmTo(t, hostA, vip, sunrpc.TCP), "host-a", 1, "fh-ctdb", nlm.Granted)
	// CTDB's "grace hack" (restarting the lock manager on every node) is
	// a no-op: nothing is dropped.
	event(0, "stop", "nlockmgr")
	event(0, "start", "nlockmgr")
	// the address moves to node 2
	for n := range 2 {
		event(n, "startipreallocate")
	}
	if out := event(0, "releaseip-pre", "lo", ip, "8"); !strings.Contains(out, "released "+ip) || !strings.Contains(out, "snapshot true") {
		t.Fatalf("releaseip-pre:\n%s", out)
	}
	event(0, "releaseip", "lo", ip, "8")
	event(1, "takeip-pre", "lo", ip, "8")
	if out := event(1, "takeip", "lo", ip, "8"); !strings.Contains(out, "from its snapshot: 1 locks") || !strings.Contains(out, "no grace period") {
		t.Fatalf("takeip on node 2:\n%s", out)
	}
	waitServing(t, vip)
	if st := testAs(t, nlmTo(t, hostB, vip, sunrpc.TCP), "host-b", "fh-ctdb"); st != nlm.Denied {
		t.Fatalf("host-a's lock on node 2: TEST %v", st)
	}
	lockAs(t, nlmTo(t, hostB, vip, sunrpc.TCP), "host-b", 1, "fh-ctdb-2", nlm.Granted) // no grace
	// Node 2 dies; node 1 takes the address back (grace: host-a has not
	// reclaimed, its statd cannot be reached), and hands it on to node 2,
	// restarted, before host-a reclaimed: the grace period goes with it.
	nodes[1].stop(syscall.SIGKILL, 5*time.Second)
	startNode(1)
	if out := event(0, "takeip", "lo", ip, "8"); !strings.Contains(out, "after an unplanned stop") {
		t.Fatalf("takeip after node 2 died:\n%s", out)
	}
	if out := event(0, "releaseip-pre", "lo", ip, "8"); !strings.Contains(out, "in grace:") || !strings.Contains(out, "handed over") {
		t.Fatalf("releaseip-pre during grace:\n%s", out)
	}
	if out := event(1, "takeip", "lo", ip, "8"); !strings.Contains(out, "its grace period goes on until") {
		t.Fatalf("takeip during grace on node 2:\n%s", out)
	}
	waitServing(t, vip)
	lockAs(t, nlmTo(t, hostB, vip, sunrpc.TCP), "host-b", 2, "fh-ctdb", nlm.DeniedGracePeriod)
	if st := reclaimAs(t, nlmTo(t, hostA, vip, sunrpc.TCP), "host-a", 1, "fh-ctdb"); st != nlm.Granted {
		t.Fatalf("host-a's reclaim in the handed-over grace period: %v", st)
	}
	for n := range 2 {
		event(n, "shutdown")
	}
	b, _ := os.ReadFile(nfsLog)
	for _, want := range []string{"startup", "takeip lo " + ip + " 8", "releaseip-pre lo " + ip + " 8", "releaseip lo " + ip + " 8", "shutdown", "monitor-pre"} {
		if !strings.Contains(string(b), want+"\n") {
			t.Fatalf("the NFS callout did not get %q:\n%s", want, b)
		}
	}
	if strings.Contains(string(b), "nlockmgr") {
		t.Fatalf("nlockmgr restarts reached the NFS callout:\n%s", b)
	}
}

func execCommand(name string, args ...string) *exec.Cmd { return exec.Command(name, args...) }

// The systemd unit passes systemd-analyze verify.
func TestSystemdUnit(t *testing.T) {
	nlmd := binary(t, "nlmd")
	requirePeers(t, "systemd-analyze")
	b, err := os.ReadFile(repoFile(t, "packaging/nlmd.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(string(b), "/usr/sbin/nlmd", nlmd)
	path := filepath.Join(t.TempDir(), "nlmd.service")
	os.WriteFile(path, []byte(unit), 0o644)
	out, err := runCmd(time.Minute, "systemd-analyze", "verify", path)
	if err != nil || strings.Contains(out, "nlmd.service:") {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
