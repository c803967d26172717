package virtualserver

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"
)

// refGrace is the grace period written the obvious way — every event walks
// every client — as the reference the heap-based machine must agree with.
type refGrace struct {
	quiet    time.Duration
	active   bool
	early    bool
	until    time.Time
	clients  map[netip.Addr]*refClient
	total    int
	reclaims int
	why      string
}

type refClient struct {
	notified, settled bool
	reclaimed         bool
	resending         bool // a move cut off a request of it
	last              time.Time
}

func (g *refGrace) start(now time.Time, length time.Duration, early bool, clients []netip.Addr) {
	*g = refGrace{quiet: g.quiet, active: true, early: early, until: now.Add(length), clients: map[netip.Addr]*refClient{}}
	for _, a := range clients {
		g.clients[a] = &refClient{}
	}
	g.total = len(g.clients)
	if length <= 0 {
		g.active, g.why = false, EndDeadline
		return
	}
	g.check(now)
}

func (g *refGrace) get(a netip.Addr) *refClient {
	if !g.active {
		return nil
	}
	return g.clients[a]
}

func (g *refGrace) event(now time.Time, kind int, a netip.Addr) {
	c := g.get(a)
	switch kind {
	case 0: // notified
		if c != nil && !c.notified && !c.settled {
			c.notified, c.last = true, now
		}
	case 1: // unreachable
		if c != nil && !c.resending {
			c.settled = true
		}
	case 2: // rebooted
		if c != nil {
			c.settled = true
		}
	case 3: // reclaim
		if !g.active {
			return
		}
		g.reclaims++
		if c != nil && !c.settled {
			c.notified, c.reclaimed, c.resending, c.last = true, true, false, now
		}
	case 4: // request
		switch {
		case c == nil:
		case c.reclaimed:
			c.settled = true
		case c.resending:
			c.resending, c.last = false, now
		}
	}
	g.check(now)
}

func (g *refGrace) check(now time.Time) {
	if !g.active {
		return
	}
	if g.early {
		pending := 0
		for _, c := range g.clients {
			if c.notified && !c.settled && !c.resending && !now.Before(c.last.Add(g.quiet)) {
				c.settled = true
			}
			if !c.settled {
				pending++
			}
		}
		if pending == 0 {
			g.active, g.why = false, EndReclaimed
			if g.total == 0 {
				g.why = EndNoClients
			}
			return
		}
	}
	if !now.Before(g.until) {
		g.active, g.why = false, EndDeadline
	}
}

func (g *refGrace) next() time.Time {
	if !g.active {
		return time.Time{}
	}
	next := g.until
	if g.early {
		for _, c := range g.clients {
			if c.notified && !c.settled && !c.resending && c.last.Add(g.quiet).Before(next) {
				next = c.last.Add(g.quiet)
			}
		}
	}
	return next
}

func (g *refGrace) pending() int {
	n := 0
	for _, c := range g.clients {
		if !c.settled {
			n++
		}
	}
	return n
}

// handover and resume, the obvious way.
func (g *refGrace) release(now time.Time) (refGrace, bool) {
	g.check(now)
	if !g.active {
		return refGrace{}, false
	}
	h := refGrace{active: true, early: g.early, until: g.until, clients: map[netip.Addr]*refClient{}, total: g.total, reclaims: g.reclaims}
	for a, c := range g.clients {
		if !c.settled {
			cc := *c
			h.clients[a] = &cc
		}
	}
	g.active, g.why = false, EndReleased
	return h, true
}

func (g *refGrace) resume(released, now time.Time, h refGrace) {
	q := g.quiet
	*g = h
	g.quiet = q
	g.until = now.Add(max(h.until.Sub(released), q))
	for _, c := range g.clients {
		if c.resending {
			c.notified = true
		} else if c.notified {
			c.last = now
		}
	}
	g.check(now)
}

// TestGraceAgainstReference runs random event sequences — clients
// notified, unreachable, rebooted, reclaiming and moving on, time passing,
// releases and resumptions on a new owner — through the machine and the
// reference, and compares what they say after every step. Replay one with
// -grace.seed.
func TestGraceAgainstReference(t *testing.T) {
	seeds := 300
	if testing.Short() {
		seeds = 50
	}
	base := rand.Uint64()
	for i := range seeds {
		seed := base + uint64(i)
		if err := graceSequence(seed, 200); err != nil {
			t.Fatalf("seed %d: %v (replay: graceSequence(%d, 200))", seed, err, seed)
		}
	}
}

func graceSequence(seed uint64, steps int) error {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	origin := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := origin
	quiet := time.Duration(1+rng.IntN(3)) * time.Second
	g := Grace{Quiet: quiet}
	ref := refGrace{quiet: quiet}
	n := 1 + rng.IntN(12)
	addrs := make([]netip.Addr, n)
	for i := range addrs {
		addrs[i] = netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)})
	}
	var log []string
	for step := range steps {
		var what string
		switch r := rng.IntN(100); {
		case r < 4 || (!g.Active() && r < 20):
			length := time.Duration(rng.IntN(60)) * time.Second
			early := rng.IntN(4) > 0
			var cl []netip.Addr
			for _, a := range addrs {
				if rng.IntN(2) == 0 {
					cl = append(cl, a)
				}
			}
			g.Start(now, length, early, cl)
			ref.start(now, length, early, cl)
			what = fmt.Sprintf("start %v early=%v clients=%d", length, early, len(cl))
		case r < 10:
			released := now
			h, ok := g.Handover(now)
			g.End(now, EndReleased)
			rh, rok := ref.release(now)
			if ok != rok {
				return fmt.Errorf("step %d: handover %v, reference %v\n%v", step, ok, rok, log)
			}
			now = now.Add(time.Duration(rng.IntN(5000)) * time.Millisecond)
			if ok {
				// Some clients' requests were cut off by the release.
				for i := range h.Clients {
					if rng.IntN(4) == 0 {
						h.Clients[i].Resending = true
						rh.clients[h.Clients[i].Addr].resending = true
					}
				}
				g = Grace{Quiet: quiet}
				g.Resume(now, h)
				ref.resume(released, now, rh)
			}
			what = fmt.Sprintf("release and resume %v", ok)
		case r < 15:
			g.End(now, EndAdmin)
			if ref.active {
				ref.active, ref.why = false, EndAdmin
			}
			what = "end"
		case r < 40:
			now = now.Add(time.Duration(rng.IntN(3000)) * time.Millisecond)
			g.Tick(now)
			ref.check(now)
			what = "tick " + now.Sub(origin).String()
		default:
			kind := rng.IntN(5)
			a := addrs[rng.IntN(n)]
			switch kind {
			case 0:
				g.Notified(now, a)
			case 1:
				g.Unreachable(now, a)
			case 2:
				g.Rebooted(now, a)
			case 3:
				g.Reclaim(now, a)
			case 4:
				g.Request(now, a)
			}
			ref.event(now, kind, a)
			what = fmt.Sprintf("event %d client %v", kind, a)
		}
		log = append(log, what)
		st := g.Status()
		if st.Active != ref.active || (!st.Active && st.Why != ref.why && ref.why != "") {
			return fmt.Errorf("step %d (%s): active %v (%s), reference %v (%s)\n%v", step, what, st.Active, st.Why, ref.active, ref.why, log)
		}
		if st.Active {
			if !g.Next().Equal(ref.next()) || st.Pending != ref.pending() || st.Reclaims != ref.reclaims || !st.Until.Equal(ref.until) {
				return fmt.Errorf("step %d (%s): next %v pending %d reclaims %d until %v; reference %v %d %d %v\n%v", step, what,
					g.Next().Sub(origin), st.Pending, st.Reclaims, st.Until.Sub(origin), ref.next().Sub(origin), ref.pending(), ref.reclaims,
					ref.until.Sub(origin), log)
			}
		}
	}
	return nil
}

// BenchmarkGraceEvent is the cost of one grace event with n clients in
// the period; it must not grow with n. order=notify is the phase as it
// happens: clients are notified, reclaim and move on in the notifier's
// order (three events each). order=random is a reclaim from a client
// drawn at random while half of them wait out their quiet time, the worst
// case for the memory caches.
func BenchmarkGraceEvent(b *testing.B) {
	origin := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, order := range []string{"notify", "random"} {
		for _, n := range []int{1000, 10000, 100000} {
			b.Run(fmt.Sprintf("order=%s/clients=%d", order, n), func(b *testing.B) {
				addrs := make([]netip.Addr, n)
				for i := range addrs {
					addrs[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
				}
				g := Grace{Quiet: time.Hour}
				start := func() { g.Start(origin, 24*time.Hour, true, addrs) }
				start()
				if order == "random" {
					for i := 0; i < n; i += 2 {
						g.Notified(origin.Add(time.Duration(i)), addrs[i])
					}
					rand.New(rand.NewPCG(1, 2)).Shuffle(n, func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					now := origin.Add(time.Duration(n+i) * time.Microsecond)
					if order == "random" {
						g.Reclaim(now, addrs[i%n])
						_ = g.Next()
						continue
					}
					k := i / 3 % n
					a := addrs[k]
					if k == 0 && i%3 == 0 && i > 0 {
						b.StopTimer()
						start()
						b.StartTimer()
					}
					switch i % 3 {
					case 0:
						g.Notified(now, a)
					case 1:
						g.Reclaim(now, a)
					case 2:
						g.Request(now, a)
					}
					_ = g.Next()
				}
			})
		}
	}
}
