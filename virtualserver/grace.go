package virtualserver

import (
	"net/netip"
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
//   - it reclaimed, and then sent a request that is not a reclaim (a Linux
//     client finishes reclaiming before it lets new requests out);
//   - Quiet has passed since its notification was answered or since its
//     last reclaim, whichever is later.
//
// A period started with no clients ends at once (nobody can reclaim). A
// period started without early end (an admin's, or when the clients are
// not known) runs to its deadline.
type Grace struct {
	// Quiet is how long a notified client may stay silent before it counts
	// as done reclaiming.
	Quiet time.Duration

	active  bool
	early   bool
	until   time.Time
	clients map[netip.Addr]*graceClient
	pending int
	// what the last period did, for status
	started  time.Time
	ended    time.Time
	why      string
	reclaims int
}

type graceClient struct {
	notified bool
	settled  bool
	reclaims int
	last     time.Time // notification answered, or last reclaim
}

// Why a grace period ended.
const (
	EndDeadline  = "deadline"
	EndReclaimed = "all clients reclaimed"
	EndNoClients = "no clients to reclaim"
	EndAdmin     = "ended by the admin"
)

// Start begins a period of length at now. With early set, clients are the
// ones whose reclaims it waits for; without, it runs to its deadline.
func (g *Grace) Start(now time.Time, length time.Duration, early bool, clients []netip.Addr) {
	*g = Grace{Quiet: g.Quiet, active: true, early: early, until: now.Add(length), started: now,
		clients: make(map[netip.Addr]*graceClient, len(clients))}
	for _, a := range clients {
		a = a.Unmap()
		if _, dup := g.clients[a]; !dup {
			g.clients[a] = &graceClient{}
			g.pending++
		}
	}
	if length <= 0 {
		g.end(now, EndDeadline)
		return
	}
	g.check(now)
}

// Notified records that a client's statd answered our SM_NOTIFY.
func (g *Grace) Notified(now time.Time, a netip.Addr) {
	if c := g.client(a); c != nil && !c.notified {
		c.notified, c.last = true, now
	}
	g.check(now)
}

// Unreachable records that a client could not be notified.
func (g *Grace) Unreachable(now time.Time, a netip.Addr) {
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
		c.last = now
	}
	g.check(now)
}

// Request records a request that is not a reclaim from a client.
func (g *Grace) Request(now time.Time, a netip.Addr) {
	if c := g.client(a); c != nil && c.reclaims > 0 {
		g.settle(c)
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
	next := g.until
	if g.early {
		for _, c := range g.clients {
			if c.notified && !c.settled {
				if t := c.last.Add(g.Quiet); t.Before(next) {
					next = t
				}
			}
		}
	}
	return next
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
		Clients: len(g.clients), Pending: g.pending, Reclaims: g.reclaims}
}

func (g *Grace) client(a netip.Addr) *graceClient {
	if !g.active {
		return nil
	}
	return g.clients[a.Unmap()]
}

func (g *Grace) settle(c *graceClient) {
	if !c.settled {
		c.settled = true
		g.pending--
	}
}

// check ends the period when its time is up or every client settled.
func (g *Grace) check(now time.Time) {
	if !g.active {
		return
	}
	if g.early {
		for _, c := range g.clients {
			if c.notified && !c.settled && !now.Before(c.last.Add(g.Quiet)) {
				g.settle(c)
			}
		}
		if g.pending == 0 {
			why := EndReclaimed
			if len(g.clients) == 0 {
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
}
