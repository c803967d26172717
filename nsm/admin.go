package nsm

import "net/netip"

// startedVIP returns the NSM state of the virtual server at a once its
// start is over, or nil when it has none here.
func (s *Service) startedVIP(a netip.Addr) *vip {
	s.mu.Lock()
	v := s.vips[a.Unmap()]
	s.mu.Unlock()
	if v != nil {
		<-v.started
	}
	return v
}

// readyVIP returns the NSM state of the virtual server at a once its
// records are in, or nil when it has none here.
func (s *Service) readyVIP(a netip.Addr) *vip {
	v := s.startedVIP(a)
	if v != nil {
		<-v.ready
	}
	return v
}

// Progress reports the notification of the virtual server at a: the one
// running or the last one.
func (s *Service) Progress(a netip.Addr) (Progress, bool) {
	v := s.startedVIP(a)
	if v == nil {
		return Progress{}, false
	}
	v.mu.Lock()
	j := v.job
	v.mu.Unlock()
	if j == nil {
		return Progress{VIP: a.Unmap(), State: v.currentState()}, true
	}
	return j.progress(), true
}

// NotifyStates returns, for the virtual server at a, the notification
// state of each client of its running or last notification: "done",
// "failed" or "pending".
func (s *Service) NotifyStates(a netip.Addr) map[netip.Addr]string {
	v := s.startedVIP(a)
	if v == nil {
		return nil
	}
	v.mu.Lock()
	j := v.job
	v.mu.Unlock()
	if j == nil {
		return nil
	}
	return j.clients()
}

// State is the NSM state number of the virtual server at a.
func (s *Service) State(a netip.Addr) (int32, bool) {
	v := s.startedVIP(a)
	if v == nil {
		return 0, false
	}
	return v.currentState(), v.err == nil
}

// Records returns copies of the virtual server's monitor records.
func (s *Service) Records(a netip.Addr) []Record {
	v := s.readyVIP(a)
	if v == nil {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]Record, 0, len(v.recs))
	for _, e := range v.recs {
		out = append(out, *e.rec)
	}
	return out
}
