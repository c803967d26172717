package integration

import (
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nlmha/nlmha/nsm"
)

// The independent peer probe (C, libnfs) against nlmd: Ganesha serves the
// NFS export with NLM disabled, nlmd serves NLM and NSM and checks file
// handles with Ganesha, and the probe locks a real file of the export.
// nlmd starts as after a crash while the probe's host held locks (its
// monitor record is in the state directory), so it is in grace and the
// probe's grace checks run too. The NSM checks act as a local lockd: the
// callback program is NLM version 2, which nlmd does not register.
func TestPeerProbe(t *testing.T) {
	nlmd := binary(t, "nlmd")
	probe := peerTool(t, "nlmpeer/cache/bin/nlmprobe")
	if !inNetns(t, "rpcbind", "rpcinfo", "ganesha.nfsd") {
		return
	}
	startDaemon(t, "rpcbind", "-f", "-w")
	waitPortmapper(t, loopbackPmap)
	export := t.TempDir()
	startGanesha(t, export)
	state := t.TempDir()
	d, err := nsm.OpenDir(state, netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddClient(nsm.Client{Caller: "nlmprobe", Addr: netip.MustParseAddr("127.0.0.1")}, ""); err != nil {
		t.Fatal(err)
	}
	startDaemon(t, nlmd, "--nfs-server", "127.0.0.1", "--grace-period", "5s", "--state-dir", state, "--log-level", "debug")
	waitRegistered(t, 100021, 4)

	out, err := runCmd(3*time.Minute, probe, "--server", "127.0.0.1", "--export", export, "--my-vers", "2", "--wait-grace", "60")
	t.Logf("nlmprobe:\n%s", out)
	m := regexp.MustCompile(`(?m)^(\d+) passed, (\d+) failed$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no summary from nlmprobe (%v)", err)
	}
	passed, _ := strconv.Atoi(m[1])
	if m[2] != "0" || err != nil {
		t.Fatalf("nlmprobe: %s passed, %s failed (%v)", m[1], m[2], err)
	}
	for _, must := range []string{"PASS  grace.lock-reclaim-granted", "PASS  fh.garbage-handle-stale", "PASS  nfs3.file-handle", "PASS  blocking.lock-returns-blocked",
		"PASS  nsm.mon", "PASS  nsm.unmon-all", "PASS  nsm.callback-delivers-priv", "PASS  notify.releases-locks", "PASS  nsm.state-stable"} {
		if !strings.Contains(out, must) {
			t.Fatalf("nlmprobe did not report %q", must)
		}
	}
	if passed < 70 {
		t.Fatalf("only %d checks passed", passed)
	}
}
