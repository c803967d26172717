package virtualserver

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Grace is one virtual server's grace period as a pure state machine:
// events and the time come in; whether only reclaims are served, and until
// when, comes out. It reads no clock and starts no timer (Server does).
//
// A period starts with the clients that may reclaim — those the virtual
// server held state for and notifies of its restart — and ends at its
// deadline, on an admin's word, or early, once every one of those clients
// has settled:
//
//   - its statd could not be reached: it cannot reclaim what it was not
//     told to;
//   - it rebooted: it holds nothing to reclaim;
//   - it reclaimed, and then sent a request that is not a reclaim (a Linux
//     client finishes reclaiming before it lets new requests out);
//   - Quiet has passed since its notification was answered or since its
//     last reclaim, whichever is later.
//
// A period started with no clients ends at once (nobody can reclaim). A
// period started without early end (an admin's, or when the clients are
// not known) runs to its deadline.
//
// A period belongs to the virtual server, not to the node: a release
// during grace hands the rest of it over (Handover) and the next owner
// goes on with it (Resume).
//
// Every event costs O(1) in the n clients of the period: the clients
// waiting out their quiet time sit in a list by deadline, so neither an
// event nor Next walks the clients. (Deadlines are the event time plus
// Quiet, and event times come in order, so a client whose quiet time
// restarts goes to the tail; one that would not, were the time to step
// back, is placed from the tail.)
type Grace struct {
	// Quiet is how long a notified client may stay silent before it counts
	// as done reclaiming.
	Quiet time.Duration

	active  bool
	early   bool
	until   time.Time
	clients map[netip.Addr]*graceClient
	arena   []graceClient // where clients live, side by side, in the order they came
	quiet   quietList     // notified clients not settled yet, by quiet deadline
	pending int           // clients not settled yet
	// what the period did, for status
	total    int
	started  time.Time
	ended    time.Time
	why      string
	reclaims int
}

type graceClient struct {
	addr     netip.Addr
	notified bool
	settled  bool
	reclaims int
	// resending: a move cut off a request of it (GraceClient.Resending).
	resending bool
	due       time.Time // quiet deadline: notification answered, or last reclaim, plus Quiet
	// In the quiet list while notified and not settled.
	queued     bool
	prev, next *graceClient
}

// Why a grace period ended.
const (
	EndDeadline  = "deadline"
	EndReclaimed = "all clients reclaimed"
	EndNoClients = "no clients to reclaim"
	EndAdmin     = "ended by the admin"
	EndReleased  = "released"
)

// Start begins a period of length at now. With early set, clients are the
// ones whose reclaims it waits for; without, it runs to its deadline.
func (g *Grace) Start(now time.Time, length time.Duration, early bool, clients []netip.Addr) {
	g.reset(now, now.Add(length), early, len(clients))
	for _, a := range clients {
		g.add(a)
	}
	g.total = len(g.clients)
	if length <= 0 {
		g.end(now, EndDeadline)
		return
	}
	g.check(now)
}

func (g *Grace) reset(now, until time.Time, early bool, n int) {
	*g = Grace{Quiet: g.Quiet, active: true, early: early, until: until, started: now,
		clients: make(map[netip.Addr]*graceClient, n), arena: make([]graceClient, 0, n)}
}

func (g *Grace) add(a netip.Addr) *graceClient {
	a = a.Unmap()
	if c := g.clients[a]; c != nil {
		return c
	}
	if len(g.arena) == cap(g.arena) {
		// Full (never, for the sizes reset was told): a new block; the
		// clients already placed stay where they are.
		g.arena = make([]graceClient, 0, max(16, cap(g.arena)))
	}
	g.arena = append(g.arena, graceClient{addr: a})
	c := &g.arena[len(g.arena)-1]
	g.clients[a] = c
	g.pending++
	return c
}

// Notified records that a client's statd answered our SM_NOTIFY.
func (g *Grace) Notified(now time.Time, a netip.Addr) {
	if c := g.client(a); c != nil && !c.notified {
		c.notified = true
		g.touch(c, now)
	}
	g.check(now)
}

// Unreachable records that a client could not be notified.
func (g *Grace) Unreachable(now time.Time, a netip.Addr) {
	// A client with a request cut off by a move knows already: it is
	// waited for all the same.
	if c := g.client(a); c != nil && !c.resending {
		g.settle(c)
	}
	g.check(now)
}

// Rebooted records that a client rebooted (its SM_NOTIFY came in): it
// holds nothing to reclaim any more.
func (g *Grace) Rebooted(now time.Time, a netip.Addr) {
	if c := g.client(a); c != nil {
		g.settle(c)
	}
	g.check(now)
}

// Reclaim records a reclaim request from a client.
func (g *Grace) Reclaim(now time.Time, a netip.Addr) {
	if !g.active {
		return
	}
	g.reclaims++
	if c := g.client(a); c != nil && !c.settled {
		c.notified = true // it knows, however it learnt it
		c.reclaims++
		c.resending = false
		g.touch(c, now)
	}
	g.check(now)
}

// Request records a request that is not a reclaim from a client.
func (g *Grace) Request(now time.Time, a netip.Addr) {
	switch c := g.client(a); {
	case c == nil:
	case c.reclaims > 0:
		g.settle(c)
	case c.resending:
		// Back after a move, not reclaiming (yet): its quiet time runs.
		c.resending = false
		g.touch(c, now)
	}
	g.check(now)
}

// End ends the period now.
func (g *Grace) End(now time.Time, why string) {
	if g.active {
		g.end(now, why)
	}
}

// Tick advances the period to now and reports whether it is still on.
func (g *Grace) Tick(now time.Time) bool {
	g.check(now)
	return g.active
}

// Active reports whether the period is on (as of the last event or Tick).
func (g *Grace) Active() bool { return g.active }

// Until is the deadline of the period that is on.
func (g *Grace) Until() time.Time { return g.until }

// Next is when Tick must next run for the period to end on time: the
// deadline or the first moment a notified client turns quiet. Zero when
// the period is off.
func (g *Grace) Next() time.Time {
	if !g.active {
		return time.Time{}
	}
	if c := g.quiet.head; g.early && c != nil && c.due.Before(g.until) {
		return c.due
	}
	return g.until
}

// GraceStatus describes the current or last grace period.
type GraceStatus struct {
	Active   bool      `json:"active"`
	Started  time.Time `json:"started,omitzero"`
	Until    time.Time `json:"until,omitzero"`
	Ended    time.Time `json:"ended,omitzero"`
	Why      string    `json:"why,omitempty"`
	Clients  int       `json:"clients"`
	Pending  int       `json:"pending"`
	Reclaims int       `json:"reclaims"`
}

// Status describes the period.
func (g *Grace) Status() GraceStatus {
	return GraceStatus{Active: g.active, Started: g.started, Until: g.until, Ended: g.ended, Why: g.why,
		Clients: g.total, Pending: g.pending, Reclaims: g.reclaims}
}

// GraceHandover is the rest of a grace period, as a release hands it to
// the next owner of the virtual server: how long it had left, and the
// clients it still waits for with how far each got.
type GraceHandover struct {
	Remaining time.Duration `json:"remaining"`
	Early     bool          `json:"early,omitempty"`
	// Clients are the clients not settled yet, by address.
	Clients []GraceClient `json:"clients,omitempty"`
	// For status: when the period began (on the first owner), how many
	// clients it started with and how many reclaims it saw.
	Started  time.Time `json:"started"`
	Total    int       `json:"total"`
	Reclaims int       `json:"reclaims,omitempty"`
}

// GraceClient is one client a handed-over grace period still waits for.
type GraceClient struct {
	Addr     netip.Addr `json:"addr"`
	Notified bool       `json:"notified,omitempty"`
	// Reclaimed: it has reclaimed already, so its next request that is not
	// a reclaim settles it.
	Reclaimed bool `json:"reclaimed,omitempty"`
	// Resending: the release cut off a request of it, which it will send
	// again; its silence does not settle it until that request comes.
	Resending bool `json:"resending,omitempty"`
}

// ErrBadHandover reports a grace handover that cannot be used.
var ErrBadHandover = errors.New("virtualserver: damaged grace handover")

// maxHandover bounds a handed-over period: no configuration makes one
// longer, so anything above is damage.
const maxHandover = 24 * time.Hour

// Check validates a handover read back from storage.
func (h *GraceHandover) Check() error {
	if h.Remaining < 0 || h.Remaining > maxHandover {
		return fmt.Errorf("%w: remaining %v", ErrBadHandover, h.Remaining)
	}
	if h.Total < len(h.Clients) || h.Reclaims < 0 {
		return fmt.Errorf("%w: %d clients of %d", ErrBadHandover, len(h.Clients), h.Total)
	}
	for _, c := range h.Clients {
		if !c.Addr.IsValid() {
			return fmt.Errorf("%w: a client without an address", ErrBadHandover)
		}
	}
	return nil
}

// Handover returns the rest of the period at now, and false when none is
// on (nothing to hand over).
func (g *Grace) Handover(now time.Time) (GraceHandover, bool) {
	g.check(now)
	if !g.active {
		return GraceHandover{}, false
	}
	h := GraceHandover{Remaining: g.until.Sub(now), Early: g.early, Started: g.started, Total: g.total, Reclaims: g.reclaims}
	for _, c := range g.clients {
		if !c.settled {
			h.Clients = append(h.Clients, GraceClient{Addr: c.addr, Notified: c.notified, Reclaimed: c.reclaims > 0, Resending: c.resending})
		}
	}
	slices.SortFunc(h.Clients, func(a, b GraceClient) int { return a.Addr.Compare(b.Addr) })
	return h, true
}

// Resume goes on at now with a period handed over by the previous owner.
// Its rest runs from now: the time the virtual server was served nowhere
// does not count against its clients. It lasts at least Quiet, so that a
// reclaim cut off by the move (the client resends it to the new owner)
// still finds the period on. A notified client's quiet time starts again
// now, for the same reason.
func (g *Grace) Resume(now time.Time, h GraceHandover) {
	g.reset(h.Started, now.Add(max(h.Remaining, g.Quiet)), h.Early, len(h.Clients))
	g.total, g.reclaims = h.Total, h.Reclaims
	for _, hc := range h.Clients {
		c := g.add(hc.Addr)
		c.notified = hc.Notified || hc.Reclaimed
		if hc.Reclaimed {
			c.reclaims = 1
		}
		if hc.Resending {
			// Its quiet time starts when the request comes back: a Linux
			// client over UDP resends after 10 s, more than Quiet.
			c.notified, c.resending = true, true
			continue
		}
		if c.notified {
			g.touch(c, now)
		}
	}
	g.total = max(g.total, len(g.clients))
	g.check(now)
}

func (g *Grace) client(a netip.Addr) *graceClient {
	if !g.active {
		return nil
	}
	return g.clients[a.Unmap()]
}

// touch restarts a notified client's quiet time at now.
func (g *Grace) touch(c *graceClient, now time.Time) {
	if c.settled {
		return
	}
	c.due = now.Add(g.Quiet)
	g.quiet.remove(c)
	g.quiet.insert(c)
}

func (g *Grace) settle(c *graceClient) {
	if c.settled {
		return
	}
	c.settled = true
	g.pending--
	g.quiet.remove(c)
}

// check ends the period when its time is up or every client settled.
func (g *Grace) check(now time.Time) {
	if !g.active {
		return
	}
	if g.early {
		for c := g.quiet.head; c != nil && !now.Before(c.due); c = g.quiet.head {
			g.settle(c)
		}
		if g.pending == 0 {
			why := EndReclaimed
			if g.total == 0 {
				why = EndNoClients
			}
			g.end(now, why)
			return
		}
	}
	if !now.Before(g.until) {
		g.end(now, EndDeadline)
	}
}

func (g *Grace) end(now time.Time, why string) {
	g.active, g.ended, g.why = false, now, why
	// The clients are no longer needed; a finished period keeps only its
	// status.
	g.clients, g.arena, g.quiet = nil, nil, quietList{}
}

// quietList holds notified clients in order of quiet deadline.
type quietList struct{ head, tail *graceClient }

// insert places c by its deadline, searching from the tail: where it
// almost always goes.
func (l *quietList) insert(c *graceClient) {
	at := l.tail
	for at != nil && c.due.Before(at.due) {
		at = at.prev
	}
	c.queued, c.prev = true, at
	if at == nil {
		c.next, l.head = l.head, c
	} else {
		c.next, at.next = at.next, c
	}
	if c.next == nil {
		l.tail = c
	} else {
		c.next.prev = c
	}
}

func (l *quietList) remove(c *graceClient) {
	if !c.queued {
		return
	}
	if c.prev == nil {
		l.head = c.next
	} else {
		c.prev.next = c.next
	}
	if c.next == nil {
		l.tail = c.prev
	} else {
		c.next.prev = c.prev
	}
	c.queued, c.prev, c.next = false, nil, nil
}
