package virtualserver

import (
	"context"
	"net/netip"
	"sync"
	"time"
)

// The registry does not act on its own: what needs doing — taking over an
// address a request came for, purging after a grace period — it publishes
// as events for its orchestrator (hacallout), which runs HandleEvents.
// Nothing here calls back up into the orchestrator.

// EventKind says what happened.
type EventKind int

// Event kinds.
const (
	// Wanted: a request came for an address that is to be served here
	// and has no virtual server (configured, or any under ServeUnknown).
	// Spec says which. The request waits until the event is handled.
	Wanted EventKind = iota + 1
	// GraceEnded: a grace period ended; Server and Grace say which and
	// how.
	GraceEnded
)

// Event is something for the orchestrator to act on.
type Event struct {
	Kind   EventKind
	Spec   Spec        // Wanted
	Server *Server     // GraceEnded
	Grace  GraceStatus // GraceEnded
}

// maxWanted bounds the takeovers requests may wait for at once: past it, a
// request for yet another address is not served (its client sends it
// again). Every local address is one under ServeUnknown.
const maxWanted = 1024

// DefaultTakeoverWait is how long a request waits for the takeover of its
// address by default.
const DefaultTakeoverWait = 30 * time.Second

type events struct {
	mu     sync.Mutex
	queue  []Event
	wanted map[netip.Addr]chan struct{} // closed when handled
	signal chan struct{}                // cap 1: something is queued
}

func (e *events) init() {
	e.wanted = map[netip.Addr]chan struct{}{}
	e.signal = make(chan struct{}, 1)
}

func (e *events) push(ev Event) {
	e.queue = append(e.queue, ev)
	select {
	case e.signal <- struct{}{}:
	default:
	}
}

// emit queues an event. e.mu must not be held.
func (e *events) emit(ev Event) {
	e.mu.Lock()
	e.push(ev)
	e.mu.Unlock()
}

// want queues a Wanted event for s, unless one is pending already, and
// returns what closes when it is handled (nil: too many pending).
func (e *events) want(s Spec) chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ch, ok := e.wanted[s.Addr]; ok {
		return ch
	}
	if len(e.wanted) >= maxWanted {
		return nil
	}
	ch := make(chan struct{})
	e.wanted[s.Addr] = ch
	e.push(Event{Kind: Wanted, Spec: s})
	return ch
}

func (e *events) take() []Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	q := e.queue
	e.queue = nil
	return q
}

// settle wakes the requests waiting for a's takeover.
func (e *events) settle(a netip.Addr) {
	e.mu.Lock()
	ch := e.wanted[a]
	delete(e.wanted, a)
	e.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}

// settleAll wakes every waiting request (the orchestrator stops).
func (e *events) settleAll() {
	e.mu.Lock()
	w := e.wanted
	e.wanted = map[netip.Addr]chan struct{}{}
	e.queue = nil
	e.mu.Unlock()
	for _, ch := range w {
		close(ch)
	}
}

// HandleEvents runs fn on every event, each in a goroutine of its own
// (there are at most maxWanted takeovers waited for, and one grace end per
// virtual server), until ctx ends; then it waits for them and wakes any
// request still waiting. A Wanted event's requests are woken when fn
// returns. One orchestrator runs it; fn must be safe for concurrent use.
func (r *Registry) HandleEvents(ctx context.Context, fn func(context.Context, Event)) {
	var wg sync.WaitGroup
	defer func() {
		wg.Wait()
		r.ev.settleAll()
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.ev.signal:
		}
		for _, ev := range r.ev.take() {
			wg.Go(func() {
				fn(ctx, ev)
				if ev.Kind == Wanted {
					r.ev.settle(ev.Spec.Addr)
				}
			})
		}
	}
}

// waitTakeover has the orchestrator take s over and waits for it (up to
// the registry's TakeoverWait); it returns the virtual server, if served.
func (r *Registry) waitTakeover(s Spec) (*Server, bool) {
	ch := r.ev.want(s)
	if ch == nil {
		return nil, false
	}
	t := time.NewTimer(r.cfg.TakeoverWait)
	select {
	case <-ch:
	case <-t.C:
	}
	t.Stop()
	v, ok := r.Get(s.Addr)
	return v, ok && v.Serving()
}
