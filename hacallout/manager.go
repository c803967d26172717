// Package hacallout is what moving a virtual server does, in order, and
// the control API that the cluster resource manager (through its hooks)
// and nlmadmin drive it by.
//
// Release (old node): fence the virtual server off, stop serving its
// address, cancel its callbacks, take its locks, blocked requests and
// shares out of the backend into a snapshot (written atomically into its
// state directory, stamped with its epoch), stop its status monitor.
//
// Takeover (new node): claim the next epoch; if the snapshot of the epoch
// it follows is there (a planned move), put it back and serve at once, no
// grace period, no notification; otherwise (the old node died) restart the
// status monitor — new state number, SM_NOTIFY to every client — and serve
// with a grace period of this virtual server only, which ends as soon as
// its clients have reclaimed. Both are idempotent.
package hacallout

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/virtualserver"
)

// Addresses starts and stops serving one address on this node's sockets.
type Addresses interface {
	// Serve makes the address served (resumes it on wildcard sockets, or
	// opens sockets bound to it).
	Serve(a netip.Addr) error
	// Stop stops serving it: its connections are closed and its datagrams
	// dropped (or its sockets closed).
	Stop(a netip.Addr)
}

// Config configures a Manager.
type Config struct {
	Registry *virtualserver.Registry
	NLM      *nlm.Service
	NSM      *nsm.Service
	Addrs    Addresses
	// StateDir holds a directory per virtual server (see virtualserver
	// and nsm); on shared storage, it moves with the address.
	StateDir string
	// Ownership is where virtual servers are claimed and handed over
	// (default: the state directories, virtualserver.StateDir).
	Ownership virtualserver.Ownership
	// NoSnapshot makes releases drop state without a snapshot, so that
	// every takeover goes through grace and reclaim.
	NoSnapshot bool
	// Shared says that the lock backend is shared by the nodes and keeps
	// every record whatever happens to a node (etcd). A release leaves
	// the virtual server's records in place and the next owner adopts
	// them: no snapshot, no grace, no reclaim. After a node died, its
	// records stay reclaimable through the grace period: only requests
	// that conflict with them wait (see virtualserver.SetReclaimFloor).
	Shared bool
	// Cluster, with a shared backend, tells about the nodes that share it
	// (the control API's /v1/cluster).
	Cluster Cluster
	// Notified says that clients are notified by someone else (nlmd
	// --no-notify): a restart's grace period counts them as told.
	Notified bool
	// ServeUnknown: at start, the state directories of local addresses are
	// taken over too (they were served here as unknown addresses).
	ServeUnknown bool
	Logger       *slog.Logger
}

// Manager moves virtual servers in and out of this node.
type Manager struct {
	cfg Config
	log *slog.Logger
	own virtualserver.Ownership

	mu    sync.Mutex
	locks map[netip.Addr]*sync.Mutex
}

// New returns a manager; Run orchestrates its registry.
func New(cfg Config) *Manager {
	m := &Manager{cfg: cfg, log: cfg.Logger, locks: map[netip.Addr]*sync.Mutex{}, own: cfg.Ownership}
	if m.own == nil {
		m.own = &virtualserver.StateDir{Root: cfg.StateDir}
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	return m
}

func (m *Manager) lock(a netip.Addr) func() {
	m.mu.Lock()
	l := m.locks[a]
	if l == nil {
		l = &sync.Mutex{}
		m.locks[a] = l
	}
	m.mu.Unlock()
	l.Lock()
	return l.Unlock
}

// TakeoverResult tells what a takeover did.
type TakeoverResult struct {
	VIP   netip.Addr `json:"vip"`
	Name  string     `json:"name"`
	Epoch uint64     `json:"epoch"`
	// Already: the virtual server was served here; nothing was done.
	Already bool `json:"already,omitempty"`
	// Planned: a snapshot of the previous epoch was installed (no grace,
	// no notification); its counts follow.
	Planned  bool  `json:"planned"`
	Locks    int   `json:"locks"`
	Waiters  int   `json:"waiters"`
	Shares   int   `json:"shares"`
	Refused  int   `json:"refused,omitempty"`
	NSMState int32 `json:"nsm_state"`
	// Notifying is how many clients are being notified; GraceUntil the end
	// of the grace period (zero: none).
	Notifying  int       `json:"notifying"`
	GraceUntil time.Time `json:"grace_until,omitzero"`
	// GraceResumed: the previous owner released it during its grace
	// period, which goes on here.
	GraceResumed bool     `json:"grace_resumed,omitempty"`
	Took         Duration `json:"took"`
}

// Takeover starts serving a virtual server on this node. It is idempotent:
// a virtual server already served here is left as it is.
func (m *Manager) Takeover(ctx context.Context, spec virtualserver.Spec) (TakeoverResult, error) {
	start := time.Now()
	spec.Addr = spec.Addr.Unmap()
	if !spec.Addr.IsValid() {
		return TakeoverResult{}, errors.New("hacallout: no address")
	}
	defer m.lock(spec.Addr)()
	if spec.Name == "" {
		spec = m.cfg.Registry.Spec(spec.Addr)
	}
	if vs, ok := m.cfg.Registry.Get(spec.Addr); ok && vs.Serving() {
		st, _ := m.cfg.NSM.State(spec.Addr)
		return TakeoverResult{VIP: vs.Addr(), Name: vs.Name(), Epoch: vs.Epoch(), Already: true, NSMState: st,
			GraceUntil: graceUntil(vs)}, nil
	}
	claim, err := m.own.Claim(ctx, spec.Addr)
	if err != nil {
		return TakeoverResult{}, fmt.Errorf("hacallout: %w", err)
	}
	if claim.Damaged != nil {
		m.log.Warn("hacallout: damaged state; clients will reclaim", "vip", spec.Addr, "err", claim.Damaged)
	}
	epoch := claim.Epoch
	vs, _, err := m.cfg.Registry.Begin(ctx, spec, epoch)
	if err != nil {
		m.giveUp(ctx, spec.Addr, epoch)
		return TakeoverResult{}, fmt.Errorf("hacallout: taking over %v: %w", spec.Addr, err)
	}
	res := TakeoverResult{VIP: vs.Addr(), Name: vs.Name(), Epoch: epoch}
	fail := func(err error) (TakeoverResult, error) {
		_, _, cerr := vs.BeginRelease(ctx)
		m.cfg.Addrs.Stop(vs.Addr())
		m.cfg.NSM.Detach(vs.Addr())
		if ferr := m.cfg.Registry.Finish(ctx, vs); cerr == nil {
			cerr = ferr
		}
		if cerr != nil {
			m.log.Warn("hacallout: the backend did not take the failed takeover's release", "vip", vs.Addr(), "err", cerr)
		}
		m.giveUp(ctx, spec.Addr, epoch)
		return TakeoverResult{}, fmt.Errorf("hacallout: taking over %v: %w", spec.Addr, err)
	}
	// The sockets first: notifications leave from them, and their answers
	// come back to them. Requests that arrive meanwhile wait for the
	// takeover (the virtual server is Starting).
	if err := m.cfg.Addrs.Serve(vs.Addr()); err != nil {
		return fail(err)
	}
	snap := m.handoff(spec.Addr, claim)
	var started nsm.Started
	if snap != nil && snap.Shared {
		// The records stayed in the shared backend: adopt them, and send
		// the callbacks still due to the virtual server's clients.
		res.Planned = true
		res.Locks, res.Waiters, res.Shares = m.cfg.NLM.CountVIP(vs.Addr())
		if started, err = m.cfg.NSM.Start(vs, nsm.Adopt); err != nil {
			return fail(err)
		}
		if snap.Grace != nil {
			// The period goes on over what the previous owner's floor
			// left reclaimable; records reclaimed since are above it.
			vs.SetReclaimFloor(snap.Floor)
			vs.ResumeGrace(*snap.Grace)
			res.GraceResumed = true
		}
	} else if snap != nil {
		in, err := m.cfg.NLM.InstallSnapshot(ctx, snap.Locks, vs)
		if err != nil {
			return fail(err)
		}
		res.Planned, res.Locks, res.Waiters, res.Shares, res.Refused = true, in.Locks, in.Waiters, in.Shares, in.Refused
		if started, err = m.cfg.NSM.Start(vs, nsm.Adopt); err != nil {
			return fail(err)
		}
		if snap.Grace != nil {
			// Released during its grace period: the period goes on here,
			// for the clients that have not reclaimed yet.
			vs.ResumeGrace(*snap.Grace)
			res.GraceResumed = true
		}
	} else {
		if started, err = m.cfg.NSM.Start(vs, nsm.Restart); err != nil {
			return fail(err)
		}
		early := true
		if m.cfg.Shared {
			// The previous owner's records are still there: only requests
			// that conflict with one of them wait for grace. It ends when
			// none is left to reclaim (endWhenReclaimed), not by guessing
			// from quiet clients: a client whose reclaim is slow to get
			// through (a busy store) would lose its lock to the purge.
			vs.SetReclaimFloor(epoch)
			early = false
		}
		vs.BeginGrace(early, m.cfg.Notified, started.Clients)
	}
	if vs.ReclaimFloor() != 0 {
		go m.endWhenReclaimed(vs)
	}
	// The grace period is set up before the first notification leaves, so
	// that it counts every answer.
	if err := m.cfg.NSM.Notify(vs); err != nil {
		return fail(err)
	}
	res.NSMState, res.Notifying = started.State, len(started.Clients)
	vs.Serve()
	if snap != nil && snap.Shared {
		if _, err := m.cfg.NLM.ResumeVIP(ctx, vs); err != nil {
			m.log.Warn("hacallout: resending the callbacks due", "vip", vs.Addr(), "err", err)
		}
	} else if m.cfg.Shared {
		// The dead owner's blocked requests die with it; its clients,
		// notified, reclaim and ask again.
		if n, err := m.cfg.NLM.DropStaleWaiters(ctx, vs, epoch); err != nil {
			m.log.Warn("hacallout: dropping the previous owner's blocked requests", "vip", vs.Addr(), "err", err)
		} else if n > 0 {
			m.log.Info("hacallout: dropped the previous owner's blocked requests", "vip", vs.Addr(), "count", n)
		}
	}
	res.GraceUntil = graceUntil(vs)
	res.Took = Duration(time.Since(start))
	m.log.Info("hacallout: took over", "vip", vs.Addr(), "epoch", epoch, "planned", res.Planned, "locks", res.Locks,
		"waiters", res.Waiters, "shares", res.Shares, "nsm_state", res.NSMState, "notifying", res.Notifying,
		"grace_until", res.GraceUntil, "grace_resumed", res.GraceResumed, "took", time.Duration(res.Took))
	return res, nil
}

// reclaimCheck is how often a grace period over kept records looks for
// what is left to reclaim.
const reclaimCheck = 250 * time.Millisecond

// endWhenReclaimed ends a grace period over records a shared backend kept
// as soon as none of them is left to reclaim (each was reclaimed, or
// dropped by its client's reboot or FREE_ALL): nothing can conflict with
// a reclaim any more.
func (m *Manager) endWhenReclaimed(vs *virtualserver.Server) {
	t := time.NewTicker(reclaimCheck)
	defer t.Stop()
	for range t.C {
		if !vs.Serving() && vs.State() != virtualserver.Starting || !vs.InGrace(time.Now()) {
			return
		}
		if !vs.Serving() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		left, err := m.cfg.NLM.Reclaimable(ctx, vs, vs.ReclaimFloor())
		cancel()
		if err == nil && !left {
			vs.EndGrace("nothing left to reclaim")
			return
		}
	}
}

func graceUntil(vs *virtualserver.Server) time.Time {
	if g := vs.Grace(); g.Active {
		return g.Until
	}
	return time.Time{}
}

// handoff decodes what the previous owner left, if it is the handoff of
// the epoch this claim follows. Anything else is stale (a later epoch
// ended in a crash) or damaged: reported, and the clients reclaim.
func (m *Manager) handoff(vip netip.Addr, c virtualserver.Claimed) *handoff {
	if c.Handoff == nil {
		return nil
	}
	h, err := unmarshalHandoff(c.Handoff)
	switch {
	case err != nil:
		m.log.Warn("hacallout: cannot use the snapshot; clients will reclaim", "vip", vip, "err", err)
	case h.Locks.VIP != vip || h.Locks.Epoch != c.Prev || c.Prev == 0:
		m.log.Warn("hacallout: stale snapshot ignored; clients will reclaim", "vip", vip, "snapshot_epoch", h.Locks.Epoch, "previous_epoch", c.Prev)
	default:
		return &h
	}
	return nil
}

// giveUp hands back a claim this node cannot serve (a takeover that
// failed), leaving nothing: the next owner goes through grace.
func (m *Manager) giveUp(ctx context.Context, a netip.Addr, epoch uint64) {
	if err := m.own.Release(ctx, a, epoch, nil); err != nil {
		m.log.Warn("hacallout: giving up a failed takeover's claim", "vip", a, "epoch", epoch, "err", err)
	}
}

// Run orchestrates the registry (made Orchestrated) until ctx ends: a
// request for an address that is configured, or served as an unknown
// address, takes it over; the end of a grace period purges what was not
// reclaimed.
func (m *Manager) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	if lost := m.own.Lost(); lost != nil {
		wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case a := <-lost:
					m.lose(ctx, a)
				}
			}
		})
	}
	m.cfg.Registry.HandleEvents(ctx, m.handle)
}

// lose stops serving a virtual server whose claim this node lost: another
// node may own it already, so nothing is answered or handed over from
// here any more.
func (m *Manager) lose(ctx context.Context, a netip.Addr) {
	m.log.Error("hacallout: lost the claim of a virtual server; no longer serving it", "vip", a)
	if _, err := m.release(ctx, a, false, true); err != nil {
		m.log.Warn("hacallout: stopping a lost virtual server", "vip", a, "err", err)
	}
}

func (m *Manager) handle(ctx context.Context, ev virtualserver.Event) {
	switch ev.Kind {
	case virtualserver.Wanted:
		if _, err := m.Takeover(ctx, ev.Spec); err != nil {
			m.log.Error("hacallout: takeover on demand failed", "vip", ev.Spec.Addr, "err", err)
		}
	case virtualserver.GraceEnded:
		m.graceEnded(ctx, ev.Server, ev.Grace)
	}
}

// ReleaseResult tells what a release did.
type ReleaseResult struct {
	VIP      netip.Addr `json:"vip"`
	Epoch    uint64     `json:"epoch"`
	Already  bool       `json:"already,omitempty"`
	Snapshot bool       `json:"snapshot"`
	Locks    int        `json:"locks"`
	Waiters  int        `json:"waiters"`
	Shares   int        `json:"shares"`
	// GraceLeft is what was left of its grace period, handed over with the
	// snapshot (zero: it was not in grace); GracePending the clients that
	// period still waits for.
	GraceLeft    Duration `json:"grace_left,omitempty"`
	GracePending int      `json:"grace_pending,omitempty"`
	Took         Duration `json:"took"`
}

// Release stops serving a virtual server on this node, handing its state to
// the next owner through a snapshot unless snapshot is false (or the
// manager takes none). It is idempotent.
func (m *Manager) Release(ctx context.Context, a netip.Addr, snapshot bool) (ReleaseResult, error) {
	return m.release(ctx, a, snapshot, false)
}

// release is Release; lost: the claim is gone already (Ownership.Lost),
// there is nothing to hand over.
func (m *Manager) release(ctx context.Context, a netip.Addr, snapshot, lost bool) (ReleaseResult, error) {
	start := time.Now()
	a = a.Unmap()
	defer m.lock(a)()
	vs, ok := m.cfg.Registry.Get(a)
	if !ok {
		return ReleaseResult{VIP: a, Already: true}, nil
	}
	grace, ok, cerr := vs.BeginRelease(ctx)
	if !ok {
		return ReleaseResult{VIP: a, Already: true}, nil
	}
	if cerr != nil {
		// The address stops being served all the same; what a request in
		// flight adds meanwhile is captured or dropped below.
		m.log.Warn("hacallout: the backend did not take the release's claim", "vip", a, "err", cerr)
	}
	res := ReleaseResult{VIP: a, Epoch: vs.Epoch()}
	if grace != nil {
		res.GraceLeft, res.GracePending = Duration(grace.Remaining), len(grace.Clients)
	}
	m.cfg.Addrs.Stop(a)
	var snap *dlm.Snapshot
	var err error
	if m.cfg.Shared {
		// The records stay in the shared backend for the next owner.
		m.cfg.NLM.DetachVIP(a)
		snap = &dlm.Snapshot{VIP: a, Epoch: vs.Epoch(), Taken: time.Now()}
		res.Locks, res.Waiters, res.Shares = m.cfg.NLM.CountVIP(a)
	} else {
		snap, err = m.cfg.NLM.ReleaseVIP(ctx, vs.Claim())
	}
	m.cfg.NSM.Detach(a)
	// The address is served no more: every request the release cut off is
	// known, and the next owner waits for those clients to send them again.
	vs.FinishHandover(grace)
	if cerr := m.cfg.Registry.Finish(ctx, vs); cerr != nil {
		m.log.Warn("hacallout: the backend did not take the end of the release's claim", "vip", a, "err", cerr)
	}
	if snap != nil && !m.cfg.Shared {
		res.Locks, res.Waiters, res.Shares = snap.Counts()
	}
	var b []byte
	if err == nil && snapshot && !m.cfg.NoSnapshot && !lost {
		b, err = marshalHandoff(handoff{Locks: snap, Grace: grace, Shared: m.cfg.Shared, Floor: vs.ReclaimFloor()})
	}
	if !lost {
		if oerr := m.own.Release(ctx, a, res.Epoch, b); oerr != nil {
			err = errors.Join(err, oerr)
		}
	}
	res.Snapshot = b != nil && err == nil
	res.Took = Duration(time.Since(start))
	if err != nil {
		m.log.Error("hacallout: released without a snapshot; clients will reclaim at the next takeover", "vip", a, "err", err)
		return res, fmt.Errorf("hacallout: releasing %v: %w", a, err)
	}
	m.log.Info("hacallout: released", "vip", a, "epoch", res.Epoch, "snapshot", res.Snapshot, "locks", res.Locks,
		"waiters", res.Waiters, "shares", res.Shares, "grace_left", time.Duration(res.GraceLeft), "grace_pending", res.GracePending,
		"took", time.Duration(res.Took))
	return res, nil
}

// graceEnded purges what was not reclaimed in a grace period, under the
// virtual server's claim (a virtual server released meanwhile is the next
// owner's business: the purge is fenced).
func (m *Manager) graceEnded(ctx context.Context, vs *virtualserver.Server, st virtualserver.GraceStatus) {
	m.log.Info("hacallout: grace period over", "vip", vs.Addr(), "why", st.Why, "lasted", st.Ended.Sub(st.Started).Round(time.Millisecond),
		"clients", st.Clients, "reclaims", st.Reclaims)
	if !vs.Serving() {
		return
	}
	if m.cfg.Shared && vs.ReclaimFloor() == 0 {
		// A shared backend's records older than this epoch were adopted,
		// not left to reclaim: nothing is known to purge.
		return
	}
	// A shared store may be unreachable for a while: the purge is tried
	// again (what it would remove stays until then, stalling only the
	// requests that conflict with it), until it is done, fenced (the
	// virtual server moved on: the next owner's business) or ten minutes.
	wait := time.Second
	for give := time.Now().Add(10 * time.Minute); ; {
		pctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := m.cfg.NLM.PurgeVIP(pctx, vs)
		cancel()
		switch {
		case err == nil, errors.Is(err, dlm.ErrFenced):
			return
		case !vs.Serving() || ctx.Err() != nil || time.Now().After(give):
			m.log.Warn("hacallout: purging unreclaimed state", "vip", vs.Addr(), "err", err)
			return
		}
		m.log.Warn("hacallout: purging unreclaimed state; trying again", "vip", vs.Addr(), "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 10*time.Second)
	}
}

// StartAll takes over, at nlmd's start, the configured virtual servers and
// — serving unknown addresses — the local addresses that have a state
// directory (served here before). A state directory of an address this
// host does not have is left alone: another node may own it now.
func (m *Manager) StartAll(ctx context.Context) error {
	seen := map[netip.Addr]bool{}
	var errs []error
	for _, s := range m.cfg.Registry.Configured() {
		seen[s.Addr.Unmap()] = true
		if _, err := m.Takeover(ctx, s); err != nil {
			errs = append(errs, err)
		}
	}
	if !m.cfg.ServeUnknown {
		return errors.Join(errs...)
	}
	ents, err := os.ReadDir(m.cfg.StateDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return errors.Join(append(errs, err)...)
	}
	local := localPrefixes()
	for _, e := range ents {
		a, err := netip.ParseAddr(e.Name())
		if err != nil || !e.IsDir() || seen[a] {
			continue
		}
		if !isLocal(local, a) {
			m.log.Info("hacallout: keeping the state of an address this host does not have", "vip", a)
			continue
		}
		if _, err := m.Takeover(ctx, virtualserver.Spec{Addr: a}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ReleaseAll releases every virtual server served here, with snapshots: a
// clean stop of nlmd hands its locks to its next start (or another node).
func (m *Manager) ReleaseAll(ctx context.Context) error {
	var errs []error
	for _, vs := range m.cfg.Registry.All() {
		if vs.State() == virtualserver.Serving {
			if _, err := m.Release(ctx, vs.Addr(), true); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// localPrefixes are the networks of this host's addresses.
func localPrefixes() []netip.Prefix {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if p, err := netip.ParsePrefix(n.String()); err == nil {
				out = append(out, p)
			}
		}
	}
	return out
}

// isLocal tells whether a is one of this host's addresses: assigned, or in
// the loopback network (where Linux answers for every address).
func isLocal(local []netip.Prefix, a netip.Addr) bool {
	for _, p := range local {
		if p.Addr().Unmap() == a || (a.IsLoopback() && p.Addr().IsLoopback() && p.Contains(a)) {
			return true
		}
	}
	return false
}

// Duration is a time.Duration that reads as text in JSON ("1.5ms").
type Duration time.Duration

// MarshalText renders d.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText parses d.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}
