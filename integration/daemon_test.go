package integration

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
)

// nlmd from its YAML configuration: the metrics it serves (well-formed,
// per virtual server, never per client or file), and SIGHUP taking over
// and releasing the virtual servers added to and removed from the list.
func TestConfigMetricsReload(t *testing.T) {
	nlmd := binary(t, "nlmd")
	if !inNetns(t) {
		return
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "nlmd.yaml")
	sock := filepath.Join(dir, "nlmd.sock")
	write := func(vips ...string) {
		var b strings.Builder
		fmt.Fprintf(&b, "state_dir: %s\ncontrol_socket: %s\nmetrics_listen: 127.0.0.1:9470\nrpcbind: none\nserve_unknown: false\nnsm_port: %d\nvips:\n", filepath.Join(dir, "state"), sock, nsmPort)
		for _, v := range vips {
			fmt.Fprintf(&b, "  - addr: %s\n    name: name-%s\n", v, strings.ReplaceAll(v, ".", "-"))
		}
		if err := os.WriteFile(conf, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(vip.String())
	p := startDaemon(t, nlmd, "--config", conf, "--log-level", "debug")
	waitServing(t, vip)
	lockAs(t, nlmTo(t, hostA, vip, sunrpc.TCP), "host-a", 1, "fh-metrics", nlm.Granted)
	lockAs(t, nlmTo(t, hostB, vip, sunrpc.TCP), "host-b", 1, "fh-metrics", nlm.Denied)

	resp, err := http.Get("http://127.0.0.1:9470/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	for _, want := range []string{
		`nlm_rpc_requests_total{outcome="success",procedure="LOCK",program="nlm",version="4"} 2`,
		`nlm_rpc_duration_seconds_count{procedure="LOCK",program="nlm"} 2`,
		`nlm_virtual_server_info{name="name-127-0-0-2",state="serving",vip="127.0.0.2"} 1`,
		`nlm_locks_held{vip="127.0.0.2"} 1`,
		`nlm_clients_monitored{vip="127.0.0.2"} 2`,
		`nlm_grace_active{vip="127.0.0.2"} 0`,
		`nlm_nsm_state{vip="127.0.0.2"} 1`,
		`nlm_granted_callbacks_total{result="failed"} 0`,
		`nlm_nsm_notifications_received_total{result="accepted"} 0`,
		`go_goroutines`, `process_cpu_seconds_total`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if strings.Contains(text, hostA.String()) || strings.Contains(text, "fh-metrics") {
		t.Error("a metric is labelled with a client or a file handle")
	}
	problems, err := promlint.New(strings.NewReader(text)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range problems {
		if strings.HasPrefix(pr.Metric, "nlm_") {
			t.Errorf("promlint: %s: %s", pr.Metric, pr.Text)
		}
	}

	// SIGHUP: 127.0.0.2 leaves the list, 127.0.0.3 joins it.
	write(vip3.String())
	p.cmd.Process.Signal(syscall.SIGHUP)
	api := hacallout.NewClient(sock)
	deadline := time.Now().Add(10 * time.Second)
	for {
		x, _ := api.VIP(context.Background(), vip)
		y, _ := api.VIP(context.Background(), vip3)
		if x.State == "released" && y.State == "serving" && y.Name == "name-127-0-0-3" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after SIGHUP: %v is %q, %v is %q", vip, x.State, vip3, y.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
	lockAs(t, nlmTo(t, hostA, vip3, sunrpc.TCP), "host-a", 1, "fh-metrics-y", nlm.Granted)
	// A configuration that does not parse changes nothing.
	os.WriteFile(conf, []byte("vipz: []\n"), 0o600)
	p.cmd.Process.Signal(syscall.SIGHUP)
	time.Sleep(300 * time.Millisecond)
	if y, _ := api.VIP(context.Background(), vip3); y.State != "serving" {
		t.Fatalf("a bad configuration released %v", vip3)
	}
	if err := p.stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("nlmd after SIGTERM: %v", err)
	}
}
