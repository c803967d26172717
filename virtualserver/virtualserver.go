// Package virtualserver keeps the virtual servers (floating IPs) of this
// node: their lifecycle (starting, serving, releasing, released), epoch and
// grace period. The NLM and NSM services look each request's destination
// address up here to learn which virtual server it belongs to, whether it
// is in its grace period, and its epoch.
//
// The grace period itself is a pure state machine (Grace); Server adds the
// clock, the lock and the timer around it.
package virtualserver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlmha/nlmha/dlm"
)

// ErrRetryLater reports a request that cannot be served now but will be
// soon, when the client sends it again (its virtual server is moving, or
// the client's reboot is being handled): services answer nothing.
var ErrRetryLater = errors.New("virtualserver: retry later")

// State is where a virtual server is in its lifecycle on this node.
type State int32

// States.
const (
	// Starting: being taken over; not served yet.
	Starting State = iota
	// Serving: served (in grace or not).
	Serving
	// Releasing: being released; requests in flight are fenced off.
	Releasing
	// Released: not served here (any more).
	Released
)

var stateNames = [...]string{"starting", "serving", "releasing", "released"}

func (s State) String() string { return stateNames[s] }

// Server is one virtual server on this node. Its methods are safe for
// concurrent use. A takeover creates a new Server: one released stays
// released, so that a request that looked it up before the release is
// fenced off for good.
type Server struct {
	addr     netip.Addr
	name     string
	epoch    uint64
	state    atomic.Int32
	graceEnd atomic.Int64 // unix nanoseconds while in grace; 0 otherwise
	// floor: during grace, the virtual server's records stamped below it
	// are reclaimable (0: the backend kept none; see SetReclaimFloor).
	floor atomic.Uint64
	reg   *Registry

	mu    sync.Mutex
	grace Grace
	timer *time.Timer
	// cutOff are the clients whose requests a release fenced off: they
	// will send them again to the next owner (see CutOff).
	cutOff map[netip.Addr]struct{}
}

// maxCutOff bounds what a release remembers of the requests it fenced
// off; past it, the rest count as not cut off (the quiet rule applies).
const maxCutOff = 1 << 16

// Addr is the virtual server's address.
func (v *Server) Addr() netip.Addr { return v.addr }

// Name is the name the virtual server gives itself in callbacks
// (caller_name of GRANTED, mon_name of SM_NOTIFY): by default its address.
func (v *Server) Name() string { return v.name }

// Epoch is the virtual server's epoch: it grows with every takeover, and
// stamps the locks granted through it.
func (v *Server) Epoch() uint64 { return v.epoch }

// State is the virtual server's lifecycle state.
func (v *Server) State() State { return State(v.state.Load()) }

// Serving reports whether the virtual server is served here. Services
// check it inside their backend updates: once a release has begun, a
// request still in flight must not add state.
func (v *Server) Serving() bool { return v.State() == Serving }

// InGrace reports whether the virtual server is in its grace period at now.
func (v *Server) InGrace(now time.Time) bool {
	end := v.graceEnd.Load()
	return end != 0 && now.UnixNano() < end
}

// InGraceNow is InGrace with the clock read only when a grace period is
// on at all (the common case, out of grace, reads no clock).
func (v *Server) InGraceNow(clock func() time.Time) bool {
	end := v.graceEnd.Load()
	return end != 0 && clock().UnixNano() < end
}

// SetReclaimFloor says that the backend kept the virtual server's
// records through an unplanned move (a shared backend): during grace,
// those stamped below epoch are reclaimable — a request that conflicts
// with one gets DENIED_GRACE_PERIOD until it is reclaimed or purged —
// and every other request is served at once. Without it (0), grace
// refuses every request but reclaims.
func (v *Server) SetReclaimFloor(epoch uint64) { v.floor.Store(epoch) }

// ReclaimFloor is the epoch below which the virtual server's records are
// reclaimable during grace (0: none kept).
func (v *Server) ReclaimFloor() uint64 { return v.floor.Load() }

// BeginGrace starts a grace period of the registry's length now. With
// early, it ends as soon as clients have all reclaimed (see Grace); with
// notified, those clients count as told already (someone else notifies
// them).
func (v *Server) BeginGrace(early, notified bool, clients []netip.Addr) {
	v.mu.Lock()
	now := time.Now()
	v.grace.Quiet = v.reg.cfg.GraceQuiet
	v.grace.Start(now, v.reg.cfg.Grace, early, clients)
	if notified {
		for _, c := range clients {
			v.grace.Notified(now, c)
		}
	}
	v.update(now)
}

// ResumeGrace goes on with the grace period the previous owner handed
// over (see Grace.Resume).
func (v *Server) ResumeGrace(h GraceHandover) {
	v.mu.Lock()
	now := time.Now()
	v.grace.Quiet = v.reg.cfg.GraceQuiet
	v.grace.Resume(now, h)
	v.update(now)
}

// GraceNotified records that a client's statd answered the notification.
func (v *Server) GraceNotified(client netip.Addr) { v.event(client, (*Grace).Notified) }

// GraceUnreachable records that a client could not be notified.
func (v *Server) GraceUnreachable(client netip.Addr) { v.event(client, (*Grace).Unreachable) }

// GraceRebooted records that a client rebooted: it has nothing to reclaim.
func (v *Server) GraceRebooted(client netip.Addr) { v.event(client, (*Grace).Rebooted) }

// GraceRequest records a request from a client while in grace: a reclaim
// or not. Out of grace it costs one atomic load.
func (v *Server) GraceRequest(client netip.Addr, reclaim bool) {
	if reclaim {
		v.event(client, (*Grace).Reclaim)
	} else {
		v.event(client, (*Grace).Request)
	}
}

func (v *Server) event(client netip.Addr, fn func(*Grace, time.Time, netip.Addr)) {
	if v.graceEnd.Load() == 0 {
		return
	}
	v.mu.Lock()
	now := time.Now()
	fn(&v.grace, now, client)
	v.update(now)
}

// EndGrace ends the grace period now (an admin's command, or a planned
// takeover that needs none).
func (v *Server) EndGrace(why string) {
	v.mu.Lock()
	now := time.Now()
	v.grace.End(now, why)
	v.update(now)
}

// Grace describes the current or last grace period.
func (v *Server) Grace() GraceStatus {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.grace.Status()
}

// update publishes the machine's state and arms the timer for its next
// tick; v.mu is held and released here. The end-of-grace hook runs after.
func (v *Server) update(now time.Time) {
	wasOn := v.graceEnd.Load() != 0
	on := v.grace.Active()
	if on {
		v.graceEnd.Store(v.grace.Until().UnixNano())
		if v.timer == nil {
			v.timer = time.AfterFunc(v.grace.Next().Sub(now), v.tick)
		} else {
			v.timer.Reset(v.grace.Next().Sub(now))
		}
	} else {
		v.graceEnd.Store(0)
		if v.timer != nil {
			v.timer.Stop()
		}
	}
	st := v.grace.Status()
	v.mu.Unlock()
	if wasOn && !on && v.reg.cfg.Orchestrated {
		v.reg.ev.emit(Event{Kind: GraceEnded, Server: v, Grace: st})
	}
}

func (v *Server) tick() {
	v.mu.Lock()
	now := time.Now()
	v.grace.Tick(now)
	v.update(now)
}

// Serve marks a started virtual server served.
func (v *Server) Serve() { v.state.CompareAndSwap(int32(Starting), int32(Serving)) }

// Claim is the virtual server's claim in the lock backend: the edits of
// its requests act under it.
func (v *Server) Claim() dlm.Claim { return dlm.Claim{VIP: v.addr, Epoch: v.epoch} }

// setClaim tells the backend (if the registry has one) where the claim is.
func (v *Server) setClaim(ctx context.Context, st dlm.ClaimState) error {
	if v.reg.cfg.Claims == nil {
		return nil
	}
	if err := v.reg.cfg.Claims.SetClaim(ctx, v.Claim(), st); err != nil {
		return fmt.Errorf("virtualserver: %v %v: %w", v.Claim(), st, err)
	}
	return nil
}

// BeginRelease fences the virtual server off — Serving turns false, and
// its claim in the backend becomes releasing, so that no request in flight
// adds state any more — and reports whether it was served or starting. Its
// grace period stops here; what was left of it, if one was on, is
// returned for the next owner. An error is the backend's: the virtual
// server is released here all the same.
func (v *Server) BeginRelease(ctx context.Context) (*GraceHandover, bool, error) {
	for {
		s := v.state.Load()
		if State(s) != Serving && State(s) != Starting {
			return nil, false, nil
		}
		if v.state.CompareAndSwap(s, int32(Releasing)) {
			err := v.setClaim(ctx, dlm.ClaimReleasing)
			v.mu.Lock()
			now := time.Now()
			h, on := v.grace.Handover(now)
			v.grace.End(now, EndReleased)
			v.graceEnd.Store(0)
			if v.timer != nil {
				v.timer.Stop()
			}
			v.mu.Unlock()
			if !on {
				return nil, true, err
			}
			return &h, true, err
		}
	}
}

// CutOff records that a request from client was fenced off by the release
// in progress: unanswered, it will come again to the next owner, possibly
// only after the client's retransmission timeout (10 s for a Linux
// client over UDP), so the handed-over grace period must wait for it
// rather than count the client's silence as done (see GraceClient).
func (v *Server) CutOff(client netip.Addr) {
	if v.State() != Releasing {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cutOff == nil {
		v.cutOff = map[netip.Addr]struct{}{}
	}
	if len(v.cutOff) < maxCutOff {
		v.cutOff[client.Unmap()] = struct{}{}
	}
}

// FinishHandover marks, in the grace period h that BeginRelease handed
// over, the clients whose requests the release cut off since. Call it
// once the virtual server's address is no longer served, before the
// handover is written.
func (v *Server) FinishHandover(h *GraceHandover) {
	if h == nil {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for i := range h.Clients {
		if _, ok := v.cutOff[h.Clients[i].Addr]; ok {
			h.Clients[i].Resending = true
		}
	}
}

// Spec configures one virtual server.
type Spec struct {
	Addr netip.Addr
	Name string // empty: the address
}

// Config configures a Registry.
type Config struct {
	// Claims, when set, is the lock backend, told of each virtual
	// server's claim as it is taken over (active), released (releasing)
	// and gone (released): the backend fences the edits of requests on it.
	Claims dlm.Claims
	// Servers are the virtual servers this node serves from its start.
	Servers []Spec
	// ServeUnknown makes every other local address a virtual server of
	// its own, taken over on first use, instead of refusing its requests.
	ServeUnknown bool
	// Orchestrated: an orchestrator runs HandleEvents. A request for an
	// address that has no virtual server yet (a configured one, or any
	// under ServeUnknown) then waits, up to TakeoverWait (default
	// DefaultTakeoverWait), for the orchestrator to take it over. Without
	// one (tools, tests), such an address is served at once, at epoch 1,
	// with no grace period, and no events are published.
	Orchestrated bool
	TakeoverWait time.Duration
	// Grace is the length of a grace period; GraceQuiet how long a
	// notified client may stay silent before it counts as done reclaiming.
	Grace      time.Duration
	GraceQuiet time.Duration
}

// Registry is the set of virtual servers of this node.
type Registry struct {
	cfg        Config
	configured map[netip.Addr]Spec
	mu         sync.RWMutex
	servers    map[netip.Addr]*Server
	ev         events
}

// New returns an empty registry; virtual servers join it through Begin.
func New(cfg Config) *Registry {
	if cfg.GraceQuiet <= 0 {
		cfg.GraceQuiet = 5 * time.Second
	}
	if cfg.TakeoverWait <= 0 {
		cfg.TakeoverWait = DefaultTakeoverWait
	}
	r := &Registry{cfg: cfg, servers: map[netip.Addr]*Server{}, configured: map[netip.Addr]Spec{}}
	r.ev.init()
	for _, s := range cfg.Servers {
		s.Addr = s.Addr.Unmap()
		r.configured[s.Addr] = s
	}
	return r
}

// Configured returns the configured virtual servers.
func (r *Registry) Configured() []Spec {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Spec, 0, len(r.configured))
	for _, s := range r.configured {
		out = append(out, s)
	}
	return out
}

// SetConfigured replaces the configured virtual servers (a reloaded
// configuration). Taking over the new ones and releasing the old is the
// caller's business.
func (r *Registry) SetConfigured(specs []Spec) {
	m := make(map[netip.Addr]Spec, len(specs))
	for _, s := range specs {
		s.Addr = s.Addr.Unmap()
		m[s.Addr] = s
	}
	r.mu.Lock()
	r.configured = m
	r.mu.Unlock()
}

// Spec returns how the address is configured (its name), or a spec of its
// own.
func (r *Registry) Spec(a netip.Addr) Spec {
	a = a.Unmap()
	r.mu.RLock()
	defer r.mu.RUnlock()
	if s, ok := r.configured[a]; ok {
		return s
	}
	return Spec{Addr: a}
}

// Lookup returns the served virtual server for a local address
// (IPv4-mapped IPv6 addresses match their IPv4 form). An address that has
// no virtual server yet is taken over first when it is configured or when
// ServeUnknown is set (by the orchestrator, see Wanted, while the request
// waits); one released here stays released.
func (r *Registry) Lookup(a netip.Addr) (*Server, bool) {
	a = a.Unmap()
	r.mu.RLock()
	v := r.servers[a]
	r.mu.RUnlock()
	if v != nil && v.State() != Starting {
		return v, v.Serving()
	}
	if !a.IsValid() {
		return nil, false
	}
	// Not yet taken over, or being taken over right now: the
	// orchestrator's takeover waits for the one in progress.
	r.mu.RLock()
	spec, configured := r.configured[a]
	r.mu.RUnlock()
	if !configured && !r.cfg.ServeUnknown && v == nil {
		return nil, false
	}
	if !configured {
		spec = Spec{Addr: a, Name: spec.Name}
		if v != nil {
			spec.Name = v.Name()
		}
	}
	if !r.cfg.Orchestrated {
		// Standalone use (tests, tools): served at once, epoch 1.
		v, _, err := r.Begin(context.Background(), spec, 1)
		if err != nil {
			return nil, false
		}
		v.Serve()
		return v, v.Serving()
	}
	return r.waitTakeover(spec)
}

// Get returns the newest virtual server at a, in whatever state.
func (r *Registry) Get(a netip.Addr) (*Server, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	v := r.servers[a.Unmap()]
	return v, v != nil
}

// Begin creates the virtual server of a takeover at epoch, in state
// Starting (not served until Serve), and makes its claim active in the
// backend. It returns the current one instead when that is starting or
// serving. It fails, creating nothing, when the backend refuses the claim.
func (r *Registry) Begin(ctx context.Context, s Spec, epoch uint64) (v *Server, created bool, err error) {
	a := s.Addr.Unmap()
	current := func() *Server {
		if cur := r.servers[a]; cur != nil && (cur.State() == Serving || cur.State() == Starting) {
			return cur
		}
		return nil
	}
	r.mu.RLock()
	cur := current()
	r.mu.RUnlock()
	if cur != nil {
		return cur, false, nil
	}
	name := s.Name
	if name == "" {
		name = a.String()
	}
	v = &Server{addr: a, name: name, epoch: epoch, reg: r}
	// Outside the registry's lock: a remote backend takes a round trip,
	// and every request looks the registry up.
	if err := v.setClaim(ctx, dlm.ClaimActive); err != nil {
		return nil, false, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur := current(); cur != nil {
		return cur, false, nil // a concurrent Begin won (standalone use only)
	}
	r.servers[a] = v
	return v, true, nil
}

// Finish marks a released virtual server as such, its claim in the
// backend released too (an error is the backend's; the virtual server is
// released here all the same).
func (r *Registry) Finish(ctx context.Context, v *Server) error {
	v.state.Store(int32(Released))
	return v.setClaim(ctx, dlm.ClaimReleased)
}

// All returns the known virtual servers, released ones included.
func (r *Registry) All() []*Server {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*Server, 0, len(r.servers))
	for _, v := range r.servers {
		out = append(out, v)
	}
	return out
}
