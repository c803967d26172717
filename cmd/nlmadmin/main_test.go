package main

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nlmha/nlmha/nsm"
)

func runAdmin(args ...string) (string, error) {
	var out bytes.Buffer
	root := newRoot(&out, &out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestExportSM(t *testing.T) {
	state := t.TempDir()
	d, err := nsm.OpenDir(state, netip.MustParseAddr("127.0.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetState(7); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"127.0.1.1", "127.0.1.2"} {
		if err := d.AddClient(nsm.Client{Caller: "c", Addr: netip.MustParseAddr(a)}, "nfs-vip"); err != nil {
			t.Fatal(err)
		}
	}
	dst := filepath.Join(t.TempDir(), "out")
	out, err := runAdmin("--state-dir", state, "export-sm", "127.0.0.2", dst)
	if err != nil || !strings.Contains(out, "exported 2 records of 127.0.0.2 (state 7)") {
		t.Fatalf("export-sm: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dst, "sm", "127.0.1.1"))
	if err != nil || !strings.HasSuffix(string(b), " 127.0.1.1 nfs-vip\n") {
		t.Fatalf("sm/127.0.1.1: %q %v", b, err)
	}
	if _, err := runAdmin("--state-dir", state, "export-sm", "127.0.0.9", dst); err == nil || !strings.Contains(err.Error(), "no state for virtual server 127.0.0.9") {
		t.Fatalf("unknown virtual server: %v", err)
	}
	if _, err := runAdmin("--state-dir", state, "export-sm", "not-an-address", dst); err == nil {
		t.Fatal("a bad address was accepted")
	}
}
