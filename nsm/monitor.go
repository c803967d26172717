package nsm

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/nlmha/nlmha/virtualserver"
)

// Generation changes whenever monitor records end (unmonitor, prune,
// restart). A caller that saw a client monitored under the current
// generation may skip Monitor: that is how the NLM service keeps the
// per-lock cost of monitoring at two atomic loads.
func (s *Service) Generation() uint64 { return s.gen.Load() }

// Monitor makes sure a client of the virtual server at vipAddr is
// monitored: the first time, its record is written durably before Monitor
// returns, so a lock granted afterwards is never missing from the notify
// list after a crash.
func (s *Service) Monitor(ctx context.Context, vipAddr netip.Addr, caller string, addr netip.Addr) error {
	vs, ok := s.cfg.VirtualServers.Lookup(vipAddr)
	if !ok {
		return fmt.Errorf("%w: %v", ErrNotServed, vipAddr)
	}
	s.mu.Lock()
	v := s.vips[vs.Addr()]
	s.mu.Unlock()
	if v == nil || v.vs != vs {
		return fmt.Errorf("%w: %v", ErrNotServed, vs.Addr())
	}
	c := Client{VIP: v.vs.Addr(), Caller: caller, Addr: addr.Unmap()}
	if v.pendingClient(c) {
		return nil
	}
	v, err := s.vipFor(ctx, vs)
	if err != nil {
		return err
	}
	key := clientKey(c.Caller, c.Addr)
	if ch := s.dropWait(c.VIP, key); ch != nil {
		// The client rebooted and its old state is about to be dropped:
		// what it asks for now must come after, or the drop would take it
		// too.
		t := time.NewTimer(dropWaitMax)
		defer t.Stop()
		select {
		case <-ch:
		case <-t.C:
			return fmt.Errorf("nsm: %s's reboot is still being handled: %w", caller, virtualserver.ErrRetryLater)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return s.add(ctx, v, key, func() *Record { return clientRecord(c, v.vs.Name(), time.Now()) })
}

// dropWaitMax bounds how long a rebooted client's request waits for its
// old state to go; past it the request is not answered and the client
// sends it again.
const dropWaitMax = 2 * time.Second

// add creates the record under key unless it exists. Concurrent adds of
// one key write it once; adds of different keys write in parallel.
func (s *Service) add(ctx context.Context, v *vip, key string, mk func() *Record) error {
	for {
		v.mu.Lock()
		if e := v.recs[key]; e != nil {
			e.doomed = false
			v.mu.Unlock()
			return nil
		}
		if ch := v.writing[key]; ch != nil {
			v.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		ch := make(chan struct{})
		v.writing[key] = ch
		v.mu.Unlock()

		rec := mk()
		v.io.RLock()
		err := fmt.Errorf("%w: %w", ErrDetached, virtualserver.ErrRetryLater)
		if !v.detached {
			err = v.st.put(smDir, rec)
		}
		v.mu.Lock()
		delete(v.writing, key)
		if err == nil {
			v.putRec(key, &entry{rec: rec})
		}
		v.mu.Unlock()
		v.io.RUnlock()
		close(ch)
		if err != nil {
			return fmt.Errorf("nsm: monitoring %s: %w", rec.MonName, err)
		}
		s.log.Debug("nsm: monitoring", "vip", v.vs.Addr(), "kind", rec.Kind, "mon_name", rec.MonName, "caller", rec.Caller)
		s.runCallout("add-client", rec.MonName, rec.MyName)
		return nil
	}
}

// removeIf removes the records pred selects and returns them.
func (s *Service) removeIf(v *vip, pred func(*entry) bool) []*Record {
	v.io.RLock()
	defer v.io.RUnlock()
	if v.detached {
		return nil
	}
	v.mu.Lock()
	var gone []*Record
	for k, e := range v.recs {
		if pred(e) {
			gone = append(gone, e.rec)
			v.delRec(k)
		}
	}
	v.mu.Unlock()
	if len(gone) == 0 {
		return nil
	}
	s.gen.Add(1)
	for _, r := range gone {
		if err := v.st.remove(smDir, r.fileName()); err != nil {
			s.log.Warn("nsm: removing a monitor record", "vip", v.vs.Addr(), "mon_name", r.MonName, "err", err)
		}
		s.runCallout("del-client", r.MonName, r.MyName)
	}
	return gone
}

// Prune ends the monitoring of clients that hold nothing any more, in two
// steps a sweep apart: the first marks idle clients, the second removes
// those still idle and not monitored again meanwhile, so that a lock in
// flight between the two is never left without its record.
func (s *Service) Prune(active func(Client) bool) int {
	s.mu.Lock()
	vips := make([]*vip, 0, len(s.vips))
	for _, v := range s.vips {
		vips = append(vips, v)
	}
	s.mu.Unlock()
	n := 0
	for _, v := range vips {
		<-v.ready
		if v.err != nil {
			continue
		}
		marked := false
		gone := s.removeIf(v, func(e *entry) bool {
			if e.rec.Kind != KindClient || v.pending[e.file] == e {
				return false // a client being notified: judged once it answered
			}
			if active(e.rec.Client(v.vs.Addr())) {
				e.doomed = false
				return false
			}
			if e.doomed {
				return true
			}
			e.doomed, marked = true, true
			return false
		})
		n += len(gone)
		if marked {
			s.gen.Add(1) // make marked clients go through Monitor again
		}
	}
	return n
}
