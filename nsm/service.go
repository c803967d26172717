// Package nsm is the Network Status Monitor (statd, program 100024) of
// nlmha, kept per virtual server: each virtual server has its own monitor
// list, its own state number (odd while up, bumped by 2 on every start) and
// its own directory under the state directory, and notifies its own
// clients, from its own address, when it starts.
//
// The NLM service monitors its clients in process (Monitor), the first time
// a client locks through a virtual server. Local lock managers may monitor
// hosts through SM_MON from loopback, as with rpc.statd. An SM_NOTIFY from
// a rebooted client drops that client's state through OnReboot, and calls
// back the lock managers that monitored it by SM_MON.
package nsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

// Resolver resolves host names; *net.Resolver is one.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Config configures a Service.
type Config struct {
	VirtualServers *virtualserver.Registry
	// StateDir holds one directory per virtual server.
	StateDir string
	// RPC is the server that carries NSM, and Port its NSM port: SM_NOTIFY
	// leaves from that UDP socket with the virtual server's address.
	RPC    *sunrpc.Server
	Port   uint16
	Notify NotifyConfig
	// HACallout, if set, is run like rpc.statd's --ha-callout: with
	// add-client MON_NAME MY_NAME on a new monitor record, del-client
	// MON_NAME MY_NAME when one ends, and sm-notify MON_NAME SENDER STATE on
	// an accepted reboot notification. CalloutTimeout bounds each run
	// (default 10 s).
	HACallout      string
	CalloutTimeout time.Duration
	// OnReboot drops the state of clients that rebooted: their locks,
	// blocked requests and shares, and the callbacks outstanding to them.
	OnReboot func(ctx context.Context, clients []Client) error
	// Resolver resolves SM_STAT and SM_MON names (default net.DefaultResolver,
	// each lookup bounded by ResolveTimeout, default 5 s).
	Resolver       Resolver
	ResolveTimeout time.Duration
	// LockdPortmap is where the lock managers that SM_MON registered are
	// looked up for their callback (default 127.0.0.1:111).
	LockdPortmap netip.AddrPort
	// UnprivilegedLocal accepts SM_MON, SM_UNMON, SM_UNMON_ALL and
	// SM_SIMU_CRASH from any local port; by default they must come from a
	// privileged one, so that an unprivileged local user cannot make the
	// status monitor forget or invent peers (rpc.statd checks only for
	// loopback). For test rigs.
	UnprivilegedLocal bool
	// Mirror, if set, keeps every virtual server's state number and
	// monitor records in a store the nodes share (see Mirror).
	Mirror Mirror
	Logger *slog.Logger
}

// Service is the NSM service of one node.
type Service struct {
	cfg     Config
	log     *slog.Logger
	callout *callout
	names   *names
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	gen     atomic.Uint64
	stats   Stats
	// notifying: work at a start waits for the notifications (of every
	// virtual server) while answers come in.
	notifying *notifying

	mu   sync.Mutex
	vips map[netip.Addr]*vip

	// Reboot notifications wait in rebootq for the worker that acts on
	// them, off the RPC workers (see handleNotify); bell wakes it. dropping
	// holds, per client record whose drop is queued, a channel closed once
	// it is done (see Monitor). queued and handled count notifications.
	rmu                    sync.Mutex
	rebootq                []*rebootNote
	dropping               map[dropKey]chan struct{}
	bell                   chan struct{}
	rebootsQueued, handled atomic.Uint64
}

// Stats count what the service saw.
type Stats struct {
	NotifyAccepted  atomic.Uint64 // SM_NOTIFY that dropped state or called back
	NotifyDuplicate atomic.Uint64 // for a monitored host, with a state already seen
	NotifyUnknown   atomic.Uint64 // for no monitored host
	Rejected        atomic.Uint64 // SM_MON/UNMON/UNMON_ALL/SIMU_CRASH refused
	CallbackFailed  atomic.Uint64 // lock manager callbacks that failed
	NotifyDropped   atomic.Uint64 // SM_NOTIFY left unanswered: the queue was full
}

// New returns a service; register its Programs with cfg.RPC and call
// StartAll once the server listens.
func New(cfg Config) (*Service, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("nsm: no state directory")
	}
	if cfg.VirtualServers == nil || cfg.RPC == nil {
		return nil, errors.New("nsm: incomplete configuration")
	}
	if err := os.MkdirAll(cfg.StateDir, dirPerm); err != nil {
		return nil, fmt.Errorf("nsm: state directory: %w", err)
	}
	cfg.Notify = cfg.Notify.withDefaults()
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.ResolveTimeout <= 0 {
		cfg.ResolveTimeout = 5 * time.Second
	}
	if !cfg.LockdPortmap.IsValid() {
		cfg.LockdPortmap = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), sunrpc.PmapPort)
	}
	s := &Service{cfg: cfg, log: cfg.Logger, vips: map[netip.Addr]*vip{}, dropping: map[dropKey]chan struct{}{}, bell: make(chan struct{}, 1), notifying: newNotifying()}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.gen.Store(1)
	s.names = newNames(cfg.Resolver, cfg.ResolveTimeout)
	s.wg.Go(s.rebootWorker)
	if cfg.HACallout != "" {
		s.callout = newCallout(cfg.HACallout, cfg.CalloutTimeout, s.log)
	}
	return s, nil
}

// Stats returns the service's counters.
func (s *Service) Stats() *Stats { return &s.stats }

// Close stops the notifications and callbacks in progress and waits for
// them, then for the HA callouts queued.
func (s *Service) Close() {
	s.cancel()
	s.wg.Wait()
	if s.callout != nil {
		s.callout.close()
	}
}

// StartMode says how a virtual server starts on this node.
type StartMode int

const (
	// Restart is a start after a crash (or an unplanned takeover): a new
	// state number, the monitor list retired to the notify list, and every
	// peer on it notified, so that clients reclaim.
	Restart StartMode = iota
	// Adopt is a planned takeover: the state number and the monitor list
	// carry on as they were; only what was still waiting to be notified is.
	Adopt
)

// Started tells what Start did.
type Started struct {
	State int32
	// Clients are the client hosts being notified: those the grace period
	// of a restart waits for.
	Clients []netip.Addr
}

// Start starts the status monitor of a virtual server that this node takes
// over. It notifies nobody yet: the caller sets up the grace period that
// waits for Started.Clients first, then calls Notify, so that no answer to
// a notification comes back before the period that counts it.
//
// The records themselves load after Start returns, once the notification
// is under way and behind it (see notifying): who is to be notified is
// known from the notify list's file names, so the first SM_NOTIFY can
// leave at once (100 000 records take about a second to read); whatever
// needs the records (monitoring, reboot notifications, the admin's
// queries of the records) waits for them, but for the monitoring of a
// client still to be notified (see vip.pendingClient).
func (s *Service) Start(vs *virtualserver.Server, mode StartMode) (Started, error) {
	a := vs.Addr()
	s.Detach(a)
	v := &vip{vs: vs, log: s.log, ready: make(chan struct{}), started: make(chan struct{}), launched: make(chan struct{}), hurry: make(chan struct{})}
	s.mu.Lock()
	s.vips[a] = v
	s.mu.Unlock()
	st, load, err := s.start(v, mode)
	if err != nil {
		v.err = err
		close(v.started)
		close(v.ready)
		s.mu.Lock()
		if s.vips[a] == v {
			delete(s.vips, a)
		}
		s.mu.Unlock()
		return st, err
	}
	close(v.started)
	s.wg.Go(func() {
		// The notification goes first: on one CPU, the records loading
		// beside it held up its setting out (the grace period, the first
		// calls) for a time slice or two. Notify comes right after Start;
		// a caller that never calls it waits launchWait for the records.
		t := time.NewTimer(launchWait)
		select {
		case <-v.launched:
		case <-v.hurry:
		case <-t.C:
		case <-s.ctx.Done():
		}
		t.Stop()
		v.pace = s.notifying.pacer(v.hurry)
		load()
		close(v.ready)
	})
	return st, nil
}

// Detach stops the status monitor of a virtual server this node releases:
// its notifications stop; its records stay on disk for the next owner.
func (s *Service) Detach(a netip.Addr) {
	a = a.Unmap()
	s.mu.Lock()
	v := s.vips[a]
	delete(s.vips, a)
	s.mu.Unlock()
	if v == nil {
		return
	}
	// The records are waited for now: they load at once (see hurry).
	v.detaching()
	<-v.ready
	v.mu.Lock()
	stop, done := v.stop, v.jobDone
	v.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
	// Fence: wait for the writes in progress, and let no other start.
	v.io.Lock()
	v.detached = true
	v.io.Unlock()
	s.gen.Add(1)
}

// ErrDetached reports a write to the state of a virtual server that left
// this node meanwhile.
var ErrDetached = errors.New("nsm: virtual server released")

// ErrNotServed reports an address that is not a virtual server here.
var ErrNotServed = errors.New("nsm: not a virtual server of this node")

// vipFor returns the started NSM state of vs.
func (s *Service) vipFor(ctx context.Context, vs *virtualserver.Server) (*vip, error) {
	s.mu.Lock()
	v := s.vips[vs.Addr()]
	s.mu.Unlock()
	if v == nil || v.vs != vs {
		return nil, fmt.Errorf("%w: %v", ErrNotServed, vs.Addr())
	}
	select {
	case <-v.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if v.err != nil {
		return nil, v.err
	}
	return v, nil
}

func (s *Service) lookupVIP(ctx context.Context, a netip.Addr) (*vip, error) {
	vs, ok := s.cfg.VirtualServers.Lookup(a)
	if !ok {
		return nil, fmt.Errorf("%w: %v", ErrNotServed, a)
	}
	return s.vipFor(ctx, vs)
}

// start does what Start must before it returns — the directory, the
// state number, the retired monitor list, the notification prepared from
// the notify list's names — and returns what loads the records.
func (s *Service) start(v *vip, mode StartMode) (Started, func(), error) {
	st, err := openStore(VIPDir(s.cfg.StateDir, v.vs.Addr().String()))
	if err != nil {
		return Started{}, nil, err
	}
	if s.cfg.Mirror != nil {
		st.mirror = &mirrored{m: s.cfg.Mirror, vs: v.vs}
		ctx, cancel := context.WithTimeout(s.ctx, time.Minute)
		err := st.sync(ctx)
		cancel()
		if err != nil {
			return Started{}, nil, err
		}
	}
	v.st = st
	v.setRecs(map[string]*entry{})
	v.writing = map[string]chan struct{}{}
	v.io.Lock()
	defer v.io.Unlock()
	var state int32
	if mode == Adopt {
		state, err = v.adoptState()
	} else {
		state, err = v.restartState()
	}
	if err != nil {
		return Started{}, nil, err
	}
	// Listed once, for the notification now and the records next (nothing
	// changes notify/ in between: whatever would waits for the records).
	names, err := v.st.list(notifyDir, true)
	if err != nil {
		return Started{}, nil, err
	}
	v.mu.Lock()
	v.state, v.listed = state, names
	v.mu.Unlock()
	targets := v.targetsOf(names)
	if mode == Restart || len(targets) > 0 {
		s.prepare(v, state, targets)
	}
	load := func() {
		v.io.Lock()
		defer v.io.Unlock()
		list := v.read(notifyDir, names)
		if mode == Adopt {
			s.adoptLists(v, state, list)
		} else {
			s.restartLists(v, state, list)
		}
	}
	return Started{State: state, Clients: clientsOf(targets)}, load, nil
}

// targetsOf returns who a notify list names are to be notified: a client
// by the address its file's name carries (no need to read it), any other
// record read now (SM_MON records, a handful).
func (v *vip) targetsOf(names []string) []target {
	out := make([]target, 0, len(names))
	var others []string
	for _, n := range names {
		if a, ok := clientOfFile(n); ok {
			out = append(out, target{file: n, addr: a, client: true})
		} else {
			others = append(others, n)
		}
	}
	if len(others) > 0 {
		for _, l := range v.read(notifyDir, others) {
			out = append(out, targetOf(l))
		}
	}
	return out
}

// clientOfFile reads the address in a client record's file name
// ("client-ADDRESS-DIGEST.json", see Record.fileName).
func clientOfFile(name string) (netip.Addr, bool) {
	rest, ok := strings.CutPrefix(name, KindClient+"-")
	if !ok {
		return netip.Addr{}, false
	}
	rest, ok = strings.CutSuffix(rest, ".json")
	i := strings.LastIndexByte(rest, '-')
	if !ok || i < 0 || len(rest)-i-1 != 16 {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(rest[:i])
	return a.Unmap(), err == nil
}

func clientsOf(list []target) []netip.Addr {
	var out []netip.Addr
	for _, t := range list {
		if t.client && t.addr.IsValid() {
			out = append(out, t.addr)
		}
	}
	return out
}

// restart bumps the state and retires the monitor list, to be notified
// (at once with launch, else by Notify): SM_SIMU_CRASH, an admin's
// renotify. The virtual server is served; its records load right here.
func (s *Service) restart(v *vip, launch bool) (Started, error) {
	v.io.Lock()
	defer v.io.Unlock()
	v.mu.Lock()
	stop, done := v.stop, v.jobDone
	v.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
	state, err := v.restartState()
	if err != nil {
		return Started{}, err
	}
	list := s.restartLists(v, state, v.load(notifyDir))
	targets := make([]target, len(list))
	for i, l := range list {
		targets[i] = targetOf(l)
	}
	s.prepare(v, state, targets)
	if launch {
		s.launch(v)
	}
	return Started{State: state, Clients: clientsOf(targets)}, nil
}

// restartState bumps the state number and retires the monitor list to
// the notify list; v.io is held.
func (v *vip) restartState() (int32, error) {
	prev, rerr := v.st.readState()
	if rerr != nil {
		v.log.Warn("nsm: damaged state number; starting from the clock", "vip", v.vs.Addr(), "err", rerr)
	}
	state := nextState(prev, rerr, time.Now())
	if err := v.st.writeState(state); err != nil {
		return 0, err
	}
	if err := v.st.retire(); err != nil {
		return 0, err
	}
	return state, nil
}

// restartLists installs the notify list, read after a restart; v.io is
// held.
func (s *Service) restartLists(v *vip, state int32, list []loaded) []loaded {
	v.loadStates(list)
	s.setLists(v, state, make(map[string]*entry, len(list)), list)
	v.foldJournal()
	s.log.Info("nsm: virtual server restarted", "vip", v.vs.Addr(), "state", state, "to_notify", len(list))
	return list
}

// adoptState carries the state number on (a damaged or missing one starts
// from the clock); v.io is held.
func (v *vip) adoptState() (int32, error) {
	state, rerr := v.st.readState()
	if rerr != nil || state == 0 {
		if rerr != nil {
			v.log.Warn("nsm: damaged state number; starting from the clock", "vip", v.vs.Addr(), "err", rerr)
		}
		state = nextState(state, rerr, time.Now())
		if err := v.st.writeState(state); err != nil {
			return 0, err
		}
	}
	return state, nil
}

// adoptLists loads the monitor list and installs it with the notify list
// as they are; v.io is held.
func (s *Service) adoptLists(v *vip, state int32, list []loaded) {
	sm := v.load(smDir)
	recs := make(map[string]*entry, len(sm)+len(list))
	v.loadStates(sm, list)
	for _, l := range sm {
		recs[l.rec.key()] = &entry{rec: l.rec}
	}
	s.setLists(v, state, recs, list)
	if v.journalLines > len(recs)+len(list) {
		v.foldJournal()
	}
	s.log.Info("nsm: virtual server adopted", "vip", v.vs.Addr(), "state", state, "monitored", len(recs), "to_notify", len(list))
}

// setLists installs a started virtual server's state number and records:
// recs from sm/, and the clients of the notify list (see keepPending).
// Hosts marked as monitored go through Monitor again, which finds them.
func (s *Service) setLists(v *vip, state int32, recs map[string]*entry, list []loaded) {
	// Built aside (giving way to notifications), then installed at once.
	pending := make(map[string]*entry, len(list))
	keepPending(list, recs, pending, v.pace)
	byName, byAddr := indexOf(recs, v.pace)
	v.mu.Lock()
	v.state = state
	v.recs, v.byName, v.byAddr = recs, byName, byAddr
	v.pending, v.listed = pending, nil
	v.mu.Unlock()
	s.gen.Add(1)
}
