package dlm

import "net/netip"

// Selector picks client hosts, and optionally their records below an
// epoch, by data a backend can index and batch: a set of host keys, or
// every host that matches all of the fields set. It replaces opaque
// predicates, which a remote store can only evaluate by reading
// everything. The zero Selector selects nothing.
type Selector struct {
	// Keys selects exactly these hosts (FREE_ALL, reboot notifications).
	Keys map[HostKey]bool
	// Otherwise, the hosts through VIP, from Addr, and named Name: their
	// caller_name is Name, or their address prints as Name (an SM_NOTIFY's
	// mon_name), across virtual servers unless VIP is set.
	VIP  netip.Addr
	Addr netip.Addr
	Name string
	// Below, when set, selects only records stamped below this epoch (what
	// a grace period's clients did not reclaim).
	Below uint64
}

// Empty reports whether s selects nothing.
func (s *Selector) Empty() bool {
	return len(s.Keys) == 0 && !s.VIP.IsValid() && !s.Addr.IsValid() && s.Name == ""
}

// Match reports whether s selects host h (whatever the epoch).
func (s *Selector) Match(h *Host) bool {
	if len(s.Keys) > 0 {
		return s.Keys[h.HostKey]
	}
	if s.Empty() {
		return false
	}
	return (!s.VIP.IsValid() || h.VIP == s.VIP) && (!s.Addr.IsValid() || h.Addr == s.Addr) &&
		(s.Name == "" || h.Name == s.Name || h.Addr.String() == s.Name)
}

// MatchRecord reports whether s selects a record of host h stamped with
// epoch.
func (s *Selector) MatchRecord(h *Host, epoch uint64) bool {
	return (s.Below == 0 || epoch < s.Below) && s.Match(h)
}
