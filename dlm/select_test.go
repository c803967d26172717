package dlm

import (
	"net/netip"
	"testing"
)

func TestSelector(t *testing.T) {
	vip1, vip2 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	c1, c2 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	h := func(vip netip.Addr, name string, addr netip.Addr) *Host {
		return &Host{HostKey: HostKey{VIP: vip, Name: name, Addr: addr}}
	}
	a, b, c, d := h(vip1, "alpha", c1), h(vip2, "alpha", c1), h(vip1, "beta", c2), h(vip2, "192.0.2.1", c2)
	hosts := []*Host{a, b, c, d}
	for _, tc := range []struct {
		name string
		sel  Selector
		want []bool // a, b, c, d
	}{
		{"zero selects nothing", Selector{}, []bool{false, false, false, false}},
		{"below alone selects nothing", Selector{Below: 5}, []bool{false, false, false, false}},
		{"keys", Selector{Keys: map[HostKey]bool{a.HostKey: true, d.HostKey: true}}, []bool{true, false, false, true}},
		{"a virtual server", Selector{VIP: vip1}, []bool{true, false, true, false}},
		{"an address everywhere", Selector{Addr: c1}, []bool{true, true, false, false}},
		{"an address through one", Selector{VIP: vip2, Addr: c2}, []bool{false, false, false, true}},
		{"a mon_name: the caller_name", Selector{Name: "alpha"}, []bool{true, true, false, false}},
		{"a mon_name: the address", Selector{Name: "192.0.2.2"}, []bool{false, false, true, true}},
		{"a mon_name through one", Selector{VIP: vip1, Name: "alpha"}, []bool{true, false, false, false}},
	} {
		for i, x := range hosts {
			if got := tc.sel.Match(x); got != tc.want[i] {
				t.Errorf("%s: Match(%v) = %v", tc.name, x.HostKey, got)
			}
		}
	}
	sel := Selector{VIP: vip1, Below: 3}
	if !sel.MatchRecord(a, 2) || sel.MatchRecord(a, 3) || sel.MatchRecord(b, 1) {
		t.Error("Below: records of epoch 2 only, of the virtual server only")
	}
}
