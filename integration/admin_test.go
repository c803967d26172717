package integration

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
)

// admin runs nlmadmin and returns its output and exit code.
func admin(t *testing.T, bin, sock string, args ...string) (string, int) {
	t.Helper()
	out, err := runCmd(time.Minute, bin, append([]string{"--socket", sock}, args...)...)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out, 0
	case errors.As(err, &ee):
		return out, ee.ExitCode()
	}
	t.Fatalf("nlmadmin %v: %v", args, err)
	return "", 0
}

func mustAdmin(t *testing.T, bin, sock string, args ...string) string {
	t.Helper()
	out, code := admin(t, bin, sock, args...)
	if code != 0 {
		t.Fatalf("nlmadmin %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

// Every nlmadmin command against a running nlmd.
func TestNlmadmin(t *testing.T) {
	nlmd, bin := binary(t, "nlmd"), binary(t, "nlmadmin")
	if !inNetns(t) {
		return
	}
	peers := simClients(t) // the clients' portmapper and statd, for vip notify
	state := t.TempDir()
	sock := filepath.Join(t.TempDir(), "nlmd.sock")
	startDaemon(t, nlmd, nlmdArgs(state, "--vip", vip.String()+"=nfs-x", "--serve-unknown=false", "--rpcbind", "none",
		"--control-socket", sock)...)
	waitServing(t, vip)
	a, b := hostA, hostB
	lockAs(t, nlmTo(t, a, vip, sunrpc.TCP), "host-a", 1, "fh-admin-1", nlm.Granted)
	lockAs(t, nlmTo(t, b, vip, sunrpc.UDP), "host-b", 2, "fh-admin-2", nlm.Granted)

	// status, vip list, vip status
	out := mustAdmin(t, bin, sock, "status")
	if !strings.Contains(out, "127.0.0.2") || !strings.Contains(out, "nfs-x") || !strings.Contains(out, "serving") {
		t.Fatalf("status:\n%s", out)
	}
	var st hacallout.NodeStatus
	if err := json.Unmarshal([]byte(mustAdmin(t, bin, sock, "status", "--json")), &st); err != nil || len(st.VIPs) != 1 || st.VIPs[0].Locks != 2 {
		t.Fatalf("status --json: %+v %v", st, err)
	}
	if out := mustAdmin(t, bin, sock, "vip", "list"); !strings.Contains(out, "nfs-x") {
		t.Fatalf("vip list:\n%s", out)
	}
	mustAdmin(t, bin, sock, "vip", "status", vip.String())
	if out, code := admin(t, bin, sock, "vip", "status", "127.0.0.9"); code != 7 {
		t.Fatalf("vip status of an address not served: exit %d\n%s", code, out)
	}

	// locks list and its filters
	out = mustAdmin(t, bin, sock, "locks", "list")
	if !strings.Contains(out, "host-a") || !strings.Contains(out, "host-b") || !strings.Contains(out, "write") {
		t.Fatalf("locks list:\n%s", out)
	}
	for _, f := range [][]string{{"--client", a.String()}, {"--fh", hex.EncodeToString([]byte("fh-admin-1"))}, {"--vip", vip.String(), "--client", a.String()}} {
		var r hacallout.LocksReply
		if err := json.Unmarshal([]byte(mustAdmin(t, bin, sock, append([]string{"locks", "list", "--json"}, f...)...)), &r); err != nil ||
			len(r.Locks) != 1 || r.Locks[0].Caller != "host-a" {
			t.Fatalf("locks list %v: %+v %v", f, r, err)
		}
	}

	// clients list
	out = mustAdmin(t, bin, sock, "clients", "list", "--vip", vip.String())
	if !strings.Contains(out, a.String()) || !strings.Contains(out, b.String()) || !strings.Contains(out, "true") {
		t.Fatalf("clients list:\n%s", out)
	}

	// grace start / end
	mustAdmin(t, bin, sock, "vip", "grace", "start", vip.String())
	lockAs(t, nlmTo(t, a, vip, sunrpc.TCP), "host-a", 3, "fh-admin-3", nlm.DeniedGracePeriod)
	mustAdmin(t, bin, sock, "vip", "grace", "end", vip.String())
	lockAs(t, nlmTo(t, a, vip, sunrpc.TCP), "host-a", 3, "fh-admin-3", nlm.Granted)

	// vip notify: both clients hear of a new state from the virtual server
	mustAdmin(t, bin, sock, "vip", "notify", vip.String())
	if err := peers.WaitNotified(2, 10*time.Second); err != nil {
		t.Fatalf("vip notify reached %d of 2 clients", peers.Notified())
	}
	for _, nt := range peers.Notifications() {
		if nt.From.Addr() != vip || nt.MonName != "nfs-x" || nt.State != 3 {
			t.Fatalf("notification %+v", nt)
		}
	}

	// client drop
	if out := mustAdmin(t, bin, sock, "client", "drop", b.String()); !strings.Contains(out, "dropped") {
		t.Fatalf("client drop:\n%s", out)
	}
	if st := testAs(t, nlmTo(t, a, vip, sunrpc.TCP), "host-a", "fh-admin-2"); st != nlm.Granted {
		t.Fatalf("host-b's lock after client drop: TEST %v", st)
	}

	// release and takeover: the locks come back from the snapshot
	if out := mustAdmin(t, bin, sock, "vip", "release", vip.String()); !strings.Contains(out, "snapshot true") {
		t.Fatalf("vip release:\n%s", out)
	}
	if _, code := admin(t, bin, sock, "vip", "status", vip.String()); code != 7 {
		t.Fatal("a released virtual server reports as served")
	}
	out = mustAdmin(t, bin, sock, "vip", "takeover", vip.String())
	if !strings.Contains(out, "from its snapshot: 2 locks") {
		t.Fatalf("vip takeover:\n%s", out)
	}
	if st := testAs(t, nlmTo(t, b, vip, sunrpc.TCP), "host-b", "fh-admin-1"); st != nlm.Denied {
		t.Fatalf("host-a's lock after release and takeover: TEST %v", st)
	}

	// export-sm works on the state directory
	exp := t.TempDir()
	if out := mustAdmin(t, bin, sock, "--state-dir", state, "export-sm", vip.String(), exp); !strings.Contains(out, "exported") {
		t.Fatalf("export-sm:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(exp, "state")); err != nil {
		t.Fatal(err)
	}

	// errors: nlmd not running (3), bad usage (2), bad argument (2)
	if out, code := admin(t, bin, filepath.Join(t.TempDir(), "none.sock"), "status"); code != 3 || !strings.Contains(out, "not running") {
		t.Fatalf("no nlmd: exit %d\n%s", code, out)
	}
	if _, code := admin(t, bin, sock, "vip", "fly"); code != 2 {
		t.Fatalf("unknown command: exit %d", code)
	}
	if _, code := admin(t, bin, sock, "vip", "takeover", "not-an-ip"); code != 2 {
		t.Fatalf("bad address: exit %d", code)
	}
}
