package dlm

import (
	"net/netip"
	"testing"
)

func TestRegistryInterns(t *testing.T) {
	r := NewRegistry()
	k := OwnerKey{HostKey: HostKey{VIP: netip.MustParseAddr("10.0.0.1"), Name: "c", Addr: netip.MustParseAddr("192.0.2.1")}, SVID: 4}
	o1, o2 := r.Owner(k), r.Owner(k)
	if o1 != o2 {
		t.Fatal("same key, two owners")
	}
	mapped := k
	mapped.VIP = netip.MustParseAddr("::ffff:10.0.0.1")
	if r.Owner(mapped) != o1 {
		t.Fatal("an IPv4-mapped address is the same virtual server")
	}
	if r.Host(k.HostKey) != o1.Host {
		t.Fatal("owner's host is not the interned host")
	}
	k2 := k
	k2.SVID = 5
	if r.Owner(k2) == o1 || r.Owner(k2).Host != o1.Host {
		t.Fatal("svid distinguishes owners of one host")
	}
	o1.SetOH([]byte("oh1"))
	o1.SetOH([]byte("oh1"))
	if string(o1.OH()) != "oh1" {
		t.Fatal("OH")
	}
}

// Idle records go after two sweeps without a lookup; busy ones stay.
func TestRegistrySweep(t *testing.T) {
	r := NewRegistry()
	k := OwnerKey{HostKey: HostKey{VIP: netip.MustParseAddr("10.0.0.1"), Name: "c", Addr: netip.MustParseAddr("192.0.2.1")}, SVID: 1}
	busy := k
	busy.SVID = 2
	o := r.Owner(k)
	b := r.Owner(busy)
	b.held.Add(1)
	b.Host.locks.Add(1)
	r.Sweep()
	if h, n := r.Len(); h != 1 || n != 2 {
		t.Fatalf("first sweep removed records looked up since the previous one: %d hosts %d owners", h, n)
	}
	r.Sweep()
	if r.Owner(busy) != b {
		t.Fatal("an owner holding locks was forgotten")
	}
	if _, n := r.Len(); n != 1 {
		t.Fatalf("idle owner survived two sweeps (%d owners)", n)
	}
	if r.Owner(k) == o {
		t.Fatal("a forgotten owner came back as the same record")
	}
	// The host stays while any owner points at it.
	b.held.Add(-1)
	b.Host.locks.Add(-1)
	r.Sweep()
	r.Sweep()
	r.Sweep()
	if h, n := r.Len(); h != 0 || n != 0 {
		t.Fatalf("idle records left: %d hosts %d owners", h, n)
	}
	count := 0
	r.Host(k.HostKey)
	r.Hosts(func(*Host) bool { count++; return true })
	if count != 1 {
		t.Fatal("Hosts")
	}
}
