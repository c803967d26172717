package integration

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The independent peer probe (C, libnfs) against nlmd: Ganesha serves the
// NFS export with NLM disabled, nlmd serves NLM and checks file handles
// with Ganesha, and the probe locks a real file of the export. nlmd starts
// with a short grace period, so the probe's grace checks run too.
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
	startDaemon(t, nlmd, "--nfs-server", "127.0.0.1", "--grace-period", "5s", "--log-level", "debug")
	waitRegistered(t, 100021, 4)

	out, err := runCmd(3*time.Minute, probe, "--server", "127.0.0.1", "--export", export, "--nlm-only", "--wait-grace", "60")
	t.Logf("nlmprobe:\n%s", out)
	m := regexp.MustCompile(`(?m)^(\d+) passed, (\d+) failed$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no summary from nlmprobe (%v)", err)
	}
	passed, _ := strconv.Atoi(m[1])
	if m[2] != "0" || err != nil {
		t.Fatalf("nlmprobe: %s passed, %s failed (%v)", m[1], m[2], err)
	}
	for _, must := range []string{"PASS  grace.lock-reclaim-granted", "PASS  fh.garbage-handle-stale", "PASS  nfs3.file-handle", "PASS  blocking.lock-returns-blocked"} {
		if !strings.Contains(out, must) {
			t.Fatalf("nlmprobe did not report %q", must)
		}
	}
	if passed < 57 {
		t.Fatalf("only %d checks passed", passed)
	}
}
