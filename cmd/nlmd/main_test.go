package main

import (
	"strings"
	"testing"

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
