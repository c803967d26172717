package nsm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// names resolves the host names of SM_STAT and SM_MON off the RPC
// workers: lookups run in goroutines of their own, at most maxLookups at
// once, and their answers are kept (a failure for less long). A caller
// over UDP does not wait for a lookup in progress — it gets no reply and
// its retransmission finds the answer — so that an unreachable DNS server
// (5 s a lookup) cannot take the UDP workers; one over TCP waits for it
// (its connection's worker is its own).
type names struct {
	r       Resolver
	timeout time.Duration
	now     func() time.Time

	mu      sync.Mutex
	entries map[string]*nameEntry
	running int
}

type nameEntry struct {
	addrs   []netip.Addr
	err     error
	expires time.Time     // zero while the lookup runs
	done    chan struct{} // closed when it has
}

// Bounds of the name cache.
const (
	maxLookups  = 8
	maxNames    = 4096
	nameTTL     = time.Minute
	nameFailTTL = 10 * time.Second
)

// errPending reports a lookup still running for a caller that does not
// wait; errNamesBusy one not started for want of room.
var (
	errPending   = errors.New("nsm: name lookup in progress")
	errNamesBusy = errors.New("nsm: too many name lookups in progress")
)

func newNames(r Resolver, timeout time.Duration) *names {
	return &names{r: r, timeout: timeout, now: time.Now, entries: map[string]*nameEntry{}}
}

// resolve turns a host name into addresses (IPv4 first: SM_NOTIFY goes to
// the first); an address stands for itself. Without wait, a lookup not
// yet answered gives errPending.
func (n *names) resolve(ctx context.Context, name string, wait bool) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(name); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	now := n.now()
	n.mu.Lock()
	e := n.entries[name]
	if e != nil && !e.expires.IsZero() && now.After(e.expires) {
		delete(n.entries, name)
		e = nil
	}
	if e == nil {
		if n.running >= maxLookups {
			n.mu.Unlock()
			return nil, errNamesBusy
		}
		if len(n.entries) >= maxNames {
			n.evict(now)
		}
		e = &nameEntry{done: make(chan struct{})}
		n.entries[name] = e
		n.running++
		go n.lookup(name, e)
	}
	n.mu.Unlock()
	select {
	case <-e.done:
		return e.addrs, e.err
	default:
	}
	if !wait {
		return nil, errPending
	}
	select {
	case <-e.done:
		return e.addrs, e.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// evict makes room: expired entries first, else any finished one. n.mu is
// held.
func (n *names) evict(now time.Time) {
	for k, e := range n.entries {
		if !e.expires.IsZero() && now.After(e.expires) {
			delete(n.entries, k)
		}
	}
	for k, e := range n.entries {
		if len(n.entries) < maxNames {
			return
		}
		if !e.expires.IsZero() {
			delete(n.entries, k)
		}
	}
}

func (n *names) lookup(name string, e *nameEntry) {
	ctx, cancel := context.WithTimeout(context.Background(), n.timeout)
	defer cancel()
	addrs, err := n.r.LookupNetIP(ctx, "ip", name)
	if err == nil && len(addrs) == 0 {
		err = fmt.Errorf("nsm: %q has no address", name)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if a = a.Unmap(); a.Is4() {
			out = append(out, a)
		}
	}
	for _, a := range addrs {
		if !a.Unmap().Is4() {
			out = append(out, a)
		}
	}
	ttl := nameTTL
	if err != nil {
		out, ttl = nil, nameFailTTL
	}
	n.mu.Lock()
	e.addrs, e.err, e.expires = out, err, n.now().Add(ttl)
	n.running--
	n.mu.Unlock()
	close(e.done)
}
