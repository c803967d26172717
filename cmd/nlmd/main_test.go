package main

import (
	"os"
	"strings"
	"testing"
	"time"

	flag "github.com/spf13/pflag"
)

// Every flag is documented in --help.
func TestHelpDocumentsEveryFlag(t *testing.T) {
	_, fs, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	help := fs.FlagUsages()
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		n++
		if len(f.Usage) < 20 {
			t.Errorf("--%s has no real description: %q", f.Name, f.Usage)
		}
		if !strings.Contains(help, "--"+f.Name) {
			t.Errorf("--%s missing from --help", f.Name)
		}
	})
	if n < 10 {
		t.Fatalf("only %d flags", n)
	}
}

func TestParseFlags(t *testing.T) {
	o, _, err := parseFlags([]string{"--nlm-port", "32803", "--vip", "10.0.0.5=nfs-a", "--vip", "10.0.0.6", "--log-format", "json",
		"--nsm-port", "32765", "--state-dir", "/srv/nlmha", "--no-notify", "--ha-callout", "/usr/lib/ctdb/statd_callout"})
	if err != nil || o.nlmPort != 32803 || len(o.vips) != 2 || o.logFormat != "json" || o.nsmPort != 32765 ||
		o.stateDir != "/srv/nlmha" || !o.noNotify || o.haCallout != "/usr/lib/ctdb/statd_callout" || o.notifyGiveUp.Minutes() != 15 {
		t.Fatalf("%+v %v", o, err)
	}
	vips, err := parseVIPs(o.vips)
	if err != nil || vips[0].Name != "nfs-a" || vips[1].Addr.String() != "10.0.0.6" {
		t.Fatalf("%+v %v", vips, err)
	}
	for _, bad := range [][]string{
		{"--rpcbind", "maybe"}, {"--log-format", "xml"}, {"--nlm-port", "70000"}, {"stray"},
		{"--nsm-port", "4045"}, {"--state-dir", ""}, {"--notify-window", "0"},
	} {
		if _, _, err := parseFlags(bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	if _, err := parseVIPs([]string{"not-an-ip"}); err == nil {
		t.Error("bad --vip accepted")
	}
	if ap, err := parseHostPort("127.0.0.1:2049"); err != nil || ap.Port() != 2049 {
		t.Error(ap, err)
	}
	if ap, err := parseHostPort("127.0.0.1"); err != nil || ap.Port() != 0 {
		t.Error(ap, err)
	}
}

func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/nlmd.yaml"
	os.WriteFile(path, []byte(`
listen_mode: vip
nsm_port: 32770
state_dir: /srv/nlmha
grace_period: 30s
vips:
  - addr: 192.0.2.10
    name: nfs-a
  - addr: 192.0.2.11
`), 0o600)
	o, _, err := parseFlags([]string{"--config", path, "--grace-period", "45s"})
	if err != nil {
		t.Fatal(err)
	}
	if o.listenMode != "vip" || o.nsmPort != 32770 || o.stateDir != "/srv/nlmha" || o.grace != 45*time.Second ||
		strings.Join(o.vips, ",") != "192.0.2.10=nfs-a,192.0.2.11" || o.nlmPort != 4045 {
		t.Fatalf("options %+v", o)
	}
	for name, body := range map[string]string{
		"unknown key":  "grace_periode: 30s\n",
		"bad duration": "grace_period: soon\n",
		"bad vip":      "vips:\n  - addr: nowhere\n",
		"bad mode":     "listen_mode: sideways\n",
	} {
		os.WriteFile(path, []byte(body), 0o600)
		if _, _, err := parseFlags([]string{"--config=" + path}); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
	if _, _, err := parseFlags([]string{"--config", dir + "/missing.yaml"}); err == nil {
		t.Error("a missing config file was accepted")
	}
}

// The packaged example configuration is valid.
func TestPackagedConfig(t *testing.T) {
	o, _, err := parseFlags([]string{"--config", "../../packaging/nlmd.yaml"})
	if err != nil {
		t.Fatal(err)
	}
	if o.stateDir != "/var/lib/nlmha" || o.grace != 90*time.Second || o.listenMode != "wildcard" {
		t.Fatalf("%+v", o)
	}
}
