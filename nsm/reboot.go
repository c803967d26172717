package nsm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
)

// rebootNote is an SM_NOTIFY being acted on: the host monName, calling
// from sender, says it restarted with state. self marks our own
// notification come back to us (from a virtual server's NSM port: this
// node is its own client): it is news for the lock managers that monitored
// the virtual server by SM_MON, not a client reboot.
type rebootNote struct {
	monName string
	sender  netip.Addr
	state   int32
	self    bool
	// What matching it changed, and what is left to do: records to write
	// (by virtual server), lock managers to call back, clients to drop.
	out     rebootOutcome
	changed map[*vip]map[*entry]*Record
	calls   []Record
	done    chan struct{}
}

// rebootOutcome is what one notification did, for logs and tests.
type rebootOutcome struct {
	clients   []Client
	callbacks int
	matched   bool
}

type dropKey struct {
	vip netip.Addr
	key string
}

// rebootQueue bounds the reboot notifications waiting to be acted on: one
// past it gets no reply, and its sender sends it again.
const rebootQueue = 1024

// rebootBatch is how many queued notifications one pass handles: their
// records are written with one file-system sync.
const rebootBatch = 256

// takeReboot takes a reboot notification: the records it is about are found
// (through the index) and take its state at once, so that a retransmission
// is known for one; writing them, calling lock managers back and dropping
// the clients' state is queued for the reboot worker. It reports false,
// changing nothing, when the queue is full.
func (s *Service) takeReboot(n *rebootNote) bool {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if len(s.rebootq) >= rebootQueue {
		return false
	}
	s.match(n)
	if len(n.changed) == 0 {
		s.logReboot(n)
		return true
	}
	n.done = make(chan struct{})
	for v, recs := range n.changed {
		for e := range recs {
			s.dropping[dropKey{v.vs.Addr(), e.rec.key()}] = n.done
		}
	}
	s.rebootq = append(s.rebootq, n)
	s.rebootsQueued.Add(1)
	// The clients' next monitored request goes through Monitor again,
	// which waits for the drop (see Monitor).
	s.gen.Add(1)
	select {
	case s.bell <- struct{}{}:
	default:
	}
	return true
}

// match finds the records n is about on every virtual server and gives
// those with another state n's.
func (s *Service) match(n *rebootNote) {
	s.mu.Lock()
	vips := make([]*vip, 0, len(s.vips))
	for _, v := range s.vips {
		vips = append(vips, v)
	}
	s.mu.Unlock()
	for _, v := range vips {
		select {
		case <-v.ready:
		default:
			continue // starting: nothing of it is monitored yet
		}
		if v.err != nil {
			continue
		}
		v.mu.Lock()
		for _, e := range v.matching(n.monName, n.sender) {
			if n.self && e.rec.Kind == KindClient {
				continue
			}
			n.out.matched = true
			if n.state != 0 && e.rec.LastState == n.state {
				continue
			}
			r := *e.rec
			r.LastState = n.state
			e.rec = &r
			if n.changed == nil {
				n.changed = map[*vip]map[*entry]*Record{}
			}
			if n.changed[v] == nil {
				n.changed[v] = map[*entry]*Record{}
			}
			n.changed[v][e] = &r
			switch r.Kind {
			case KindClient:
				n.out.clients = append(n.out.clients, r.Client(v.vs.Addr()))
			case KindSMMon:
				n.out.callbacks++
				n.calls = append(n.calls, r)
			}
		}
		v.mu.Unlock()
	}
}

// rebootWorker acts on the queued notifications, in batches: whatever
// queued while it worked on the last batch goes in the next, so that
// notifications matching thousands of records cost one file-system sync
// per virtual server and one drop of the clients' state.
func (s *Service) rebootWorker() {
	for {
		select {
		case <-s.bell:
		case <-s.ctx.Done():
			return
		}
		for {
			s.rmu.Lock()
			batch := s.rebootq[:min(len(s.rebootq), rebootBatch)]
			s.rebootq = s.rebootq[len(batch):]
			if len(s.rebootq) == 0 {
				s.rebootq = nil
			}
			s.rmu.Unlock()
			if len(batch) == 0 {
				break
			}
			s.rebooted(s.ctx, batch)
			s.handled.Add(uint64(len(batch)))
		}
	}
}

// rebooted does what the notifications of a batch left to do.
func (s *Service) rebooted(ctx context.Context, batch []*rebootNote) {
	changed := map[*vip]map[*entry]*Record{}
	var clients []Client
	for _, n := range batch {
		for v, recs := range n.changed {
			if changed[v] == nil {
				changed[v] = map[*entry]*Record{}
			}
			for e, r := range recs {
				changed[v][e] = r // the last change of an entry wins
			}
		}
		clients = append(clients, n.out.clients...)
		for _, r := range n.calls {
			s.callBack(r, n.state)
		}
		s.runCallout("sm-notify", n.monName, n.sender.String(), fmt.Sprint(n.state))
		s.logReboot(n)
	}
	for v, recs := range changed {
		v.persist(recs)
	}
	if len(clients) > 0 && s.cfg.OnReboot != nil {
		if err := s.cfg.OnReboot(ctx, clients); err != nil {
			s.log.Warn("nsm: dropping rebooted clients' state failed", "clients", len(clients), "err", err)
		}
	}
	s.rmu.Lock()
	for _, n := range batch {
		for k, ch := range s.dropping {
			if ch == n.done {
				delete(s.dropping, k)
			}
		}
		close(n.done)
	}
	s.rmu.Unlock()
}

// dropWait returns the channel to wait on before client record key of
// vip may gain state again: its reboot is being acted on. Nil when it is
// not.
func (s *Service) dropWait(vip netip.Addr, key string) chan struct{} {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return s.dropping[dropKey{vip, key}]
}

func (s *Service) logReboot(n *rebootNote) {
	o := &n.out
	switch {
	case !o.matched:
		s.stats.NotifyUnknown.Add(1)
		s.log.Info("nsm: SM_NOTIFY about a host not monitored here; ignored", "mon_name", n.monName, "sender", n.sender, "state", n.state)
	case len(o.clients) == 0 && o.callbacks == 0:
		s.stats.NotifyDuplicate.Add(1)
		s.log.Info("nsm: SM_NOTIFY with a state already seen; ignored", "mon_name", n.monName, "sender", n.sender, "state", n.state)
	default:
		s.stats.NotifyAccepted.Add(1)
		s.log.Info("nsm: a monitored host rebooted", "mon_name", n.monName, "sender", n.sender, "state", n.state,
			"clients_dropped", len(o.clients), "lock_managers_called", o.callbacks)
	}
}

// persist records the peers' new states in the reboot journal: one
// write and one fsync, however many records. Nothing is written once the
// virtual server has left this node.
func (v *vip) persist(recs map[*entry]*Record) {
	v.io.RLock()
	defer v.io.RUnlock()
	if v.detached {
		return
	}
	v.fmu.Lock()
	defer v.fmu.Unlock()
	states := make(map[string]int32, len(recs))
	for _, r := range recs {
		states[r.fileName()] = r.LastState
	}
	if err := v.st.appendStates(states); err != nil {
		v.log.Warn("nsm: recording rebooted peers' new state", "vip", v.vs.Addr(), "records", len(states), "err", err)
		return
	}
	v.journalLines += len(states)
	v.mu.Lock()
	live := len(v.recs)
	v.mu.Unlock()
	if v.journalLines > 2*live+256 {
		v.foldJournal()
	}
}

// foldJournal rewrites the reboot journal with the states of the records
// there are: it grew past them (records pruned, states superseded). v.fmu
// is held (or v is not shared yet).
func (v *vip) foldJournal() {
	states := map[string]int32{}
	v.mu.Lock()
	for _, e := range v.recs {
		if e.rec.LastState != 0 {
			states[e.rec.fileName()] = e.rec.LastState
		}
	}
	v.mu.Unlock()
	if err := v.st.writeStates(states); err != nil {
		v.log.Warn("nsm: folding the reboot journal", "vip", v.vs.Addr(), "err", err)
		return
	}
	v.journalLines = len(states)
}

// loadStates gives loaded records the states of the reboot journal.
func (v *vip) loadStates(lists ...[]loaded) {
	states, lines, err := v.st.readStates()
	if err != nil {
		v.log.Warn("nsm: cannot read the reboot journal; repeated notifications may drop state again", "vip", v.vs.Addr(), "err", err)
		return
	}
	for _, l := range lists {
		applyStates(l, states)
	}
	v.journalLines = lines
}

// callBack tells the lock manager that monitored rec by SM_MON that the
// host rebooted: my_proc of my_prog/my_vers on this host, with mon_name,
// the new state and priv, as rpc.statd does.
func (s *Service) callBack(rec Record, state int32) {
	s.wg.Go(func() {
		ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
		defer cancel()
		err := s.callLockd(ctx, rec, state)
		if err != nil {
			s.stats.CallbackFailed.Add(1)
			s.log.Warn("nsm: calling back the lock manager failed", "mon_name", rec.MonName,
				"prog", rec.Prog, "vers", rec.Vers, "proc", rec.Proc, "err", err)
		}
	})
}

func (s *Service) callLockd(ctx context.Context, rec Record, state int32) error {
	opts := sunrpc.ClientOptions{Retransmit: 500 * time.Millisecond, MaxRetransmit: 4 * time.Second}
	pm, err := sunrpc.Dial(ctx, sunrpc.UDP, s.cfg.LockdPortmap, opts)
	// The callback itself from a privileged port: Linux lockd takes it
	// from nowhere else.
	opts.Reserved = !s.cfg.UnprivilegedLocal
	if err != nil {
		return err
	}
	t := sunrpc.UDP
	port, err := sunrpc.Rpcbind{C: pm}.Lookup(ctx, rec.Prog, rec.Vers, t, false)
	if errors.Is(err, sunrpc.ErrNotRegistered) {
		t = sunrpc.TCP
		port, err = sunrpc.Rpcbind{C: pm}.GetPort(ctx, rec.Prog, rec.Vers, t)
		if err == nil && port == 0 {
			err = fmt.Errorf("%w: %d v%d", sunrpc.ErrNotRegistered, rec.Prog, rec.Vers)
		}
	}
	pm.Close()
	if err != nil {
		return err
	}
	c, err := sunrpc.Dial(ctx, t, netip.AddrPortFrom(s.cfg.LockdPortmap.Addr(), port), opts)
	if err != nil {
		return err
	}
	defer c.Close()
	st := Status{MonName: rec.MonName, State: state, Priv: rec.Priv}
	_, err = c.Call(ctx, rec.Prog, rec.Vers, rec.Proc, st.Append(nil))
	return err
}
