package virtualserver

import (
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

func TestLookup(t *testing.T) {
	start := time.Unix(1000, 0)
	r := New(Config{Servers: []Spec{{Addr: netip.MustParseAddr("10.0.0.1"), Name: "nfs-a"}}, Grace: 10 * time.Second, Start: start})
	v, ok := r.Lookup(netip.MustParseAddr("::ffff:10.0.0.1"))
	if !ok || v.Name() != "nfs-a" || v.Addr() != netip.MustParseAddr("10.0.0.1") || v.Epoch() != 1 {
		t.Fatalf("lookup: %v %v", v, ok)
	}
	if _, ok := r.Lookup(netip.MustParseAddr("10.0.0.2")); ok {
		t.Fatal("an unknown address is served without ServeUnknown")
	}
	if !v.InGrace(start.Add(9*time.Second)) || v.InGrace(start.Add(10*time.Second)) {
		t.Fatal("grace window")
	}
	v.EndGrace()
	if v.InGrace(start) {
		t.Fatal("EndGrace")
	}
	if !v.Serving() {
		t.Fatal("serving")
	}
	v.Release()
	if v.Serving() {
		t.Fatal("Release")
	}
}

func TestServeUnknown(t *testing.T) {
	r := New(Config{ServeUnknown: true})
	a, ok := r.Lookup(netip.MustParseAddr("127.0.0.9"))
	b, _ := r.Lookup(netip.MustParseAddr("127.0.0.9"))
	if !ok || a != b || a.Name() != "127.0.0.9" || a.InGrace(time.Now()) {
		t.Fatalf("default virtual server: %v", a)
	}
	if _, ok := r.Lookup(netip.Addr{}); ok {
		t.Fatal("the zero address is not a virtual server")
	}
	if len(r.All()) != 1 {
		t.Fatal("All")
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/f"
	if err := WriteFileAtomic(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(p, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "two" {
		t.Fatalf("contents %q", b)
	}
	if err := WriteFilesAtomic(dir, map[string][]byte{"a": []byte("A"), "b": []byte("B")}, 0o644); err != nil {
		t.Fatal(err)
	}
	// A crashed write leaves a temporary file, which CleanTemp removes.
	os.WriteFile(dir+"/"+TempPrefix+"f-123", []byte("half"), 0o600)
	if err := CleanTemp(dir); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != "a,b,f" {
		t.Fatalf("directory holds %v", names)
	}
	if st, _ := os.Stat(dir + "/a"); st.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v", st.Mode())
	}
	if err := RemoveFileSync(dir + "/a"); err != nil {
		t.Fatal(err)
	}
	if err := RemoveFileSync(dir + "/a"); err != nil {
		t.Fatal("removing a missing file:", err)
	}
}
