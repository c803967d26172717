// Package virtualserver keeps the virtual servers (floating IPs) this node
// serves. The NLM and NSM services look each request's destination address
// up here to learn which virtual server it belongs to, whether that
// virtual server is in its grace period, and its epoch.
package virtualserver

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Server is one virtual server. Its methods are safe for concurrent use.
type Server struct {
	addr     netip.Addr
	name     string
	epoch    atomic.Uint64
	graceEnd atomic.Int64 // unix nanoseconds; 0 = not in grace
	released atomic.Bool
}

// Addr is the virtual server's address.
func (v *Server) Addr() netip.Addr { return v.addr }

// Name is the name the virtual server gives itself in callbacks
// (caller_name of GRANTED, mon_name of SM_NOTIFY): by default its address.
func (v *Server) Name() string { return v.name }

// Epoch is the virtual server's epoch on this node.
func (v *Server) Epoch() uint64 { return v.epoch.Load() }

// InGrace reports whether the virtual server is in its grace period at now.
func (v *Server) InGrace(now time.Time) bool {
	end := v.graceEnd.Load()
	return end != 0 && now.UnixNano() < end
}

// InGraceNow is InGrace with the clock read only when a grace period is
// set at all (the common case, out of grace, reads no clock).
func (v *Server) InGraceNow(clock func() time.Time) bool {
	end := v.graceEnd.Load()
	return end != 0 && clock().UnixNano() < end
}

// Serving reports whether the virtual server is served here. Services
// check it inside their backend updates: once a release has begun, a
// request still in flight must not add state.
func (v *Server) Serving() bool { return !v.released.Load() }

// Release marks the virtual server as no longer served here: requests in
// flight are fenced off from then on.
func (v *Server) Release() { v.released.Store(true) }

// StartGrace puts the virtual server into grace until end.
func (v *Server) StartGrace(end time.Time) { v.graceEnd.Store(end.UnixNano()) }

// EndGrace ends the grace period now.
func (v *Server) EndGrace() { v.graceEnd.Store(0) }

// Spec configures one virtual server.
type Spec struct {
	Addr netip.Addr
	Name string // empty: the address
}

// Config configures a Registry.
type Config struct {
	// Servers are the configured virtual servers.
	Servers []Spec
	// ServeUnknown makes every other local address a virtual server of
	// its own, created on first use, instead of refusing its requests.
	ServeUnknown bool
	// Grace is the grace period every virtual server starts with, counted
	// from Start (the daemon's start).
	Grace time.Duration
	Start time.Time
	// OnNew, if set, is called once for each virtual server ServeUnknown
	// creates, before the Lookup that created it returns (the NSM service
	// starts its monitor there: state number, notifications, grace).
	OnNew func(*Server)
}

// Registry is the set of virtual servers of this node.
type Registry struct {
	cfg     Config
	mu      sync.RWMutex
	servers map[netip.Addr]*Server
}

// New returns a registry with the configured virtual servers.
func New(cfg Config) *Registry {
	r := &Registry{cfg: cfg, servers: map[netip.Addr]*Server{}}
	for _, s := range cfg.Servers {
		r.add(s)
	}
	return r
}

func (r *Registry) add(s Spec) *Server {
	a := s.Addr.Unmap()
	name := s.Name
	if name == "" {
		name = a.String()
	}
	v := &Server{addr: a, name: name}
	v.epoch.Store(1)
	if r.cfg.Grace > 0 {
		v.StartGrace(r.cfg.Start.Add(r.cfg.Grace))
	}
	r.servers[a] = v
	return v
}

// Lookup returns the virtual server for a local address (IPv4-mapped IPv6
// addresses match their IPv4 form). It reports false for an address that
// is not served.
func (r *Registry) Lookup(a netip.Addr) (*Server, bool) {
	a = a.Unmap()
	r.mu.RLock()
	v := r.servers[a]
	r.mu.RUnlock()
	if v != nil {
		return v, true
	}
	if !r.cfg.ServeUnknown || !a.IsValid() {
		return nil, false
	}
	r.mu.Lock()
	created := false
	if v = r.servers[a]; v == nil {
		v, created = r.add(Spec{Addr: a}), true
	}
	r.mu.Unlock()
	if created && r.cfg.OnNew != nil {
		r.cfg.OnNew(v)
	}
	return v, true
}

// Get returns the virtual server at a if it exists, without creating one
// for ServeUnknown.
func (r *Registry) Get(a netip.Addr) (*Server, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	v := r.servers[a.Unmap()]
	return v, v != nil
}

// All returns the known virtual servers.
func (r *Registry) All() []*Server {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*Server, 0, len(r.servers))
	for _, v := range r.servers {
		out = append(out, v)
	}
	return out
}
