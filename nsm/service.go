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
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

// NLM's program and the procedures statd may call back (SM_MON checks
// them, as rpc.statd does).
const (
	nlmProg           = 100021
	nlmProcSMNotify   = 16
	nlmProcSMNotifyV4 = 24
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
	Logger            *slog.Logger
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

// Stats count what the service saw.
type Stats struct {
	NotifyAccepted  atomic.Uint64 // SM_NOTIFY that dropped state or called back
	NotifyDuplicate atomic.Uint64 // for a monitored host, with a state already seen
	NotifyUnknown   atomic.Uint64 // for no monitored host
	Rejected        atomic.Uint64 // SM_MON/UNMON/UNMON_ALL/SIMU_CRASH refused
	CallbackFailed  atomic.Uint64 // lock manager callbacks that failed
	NotifyDropped   atomic.Uint64 // SM_NOTIFY left unanswered: the queue was full
}

// vip is the NSM state of one virtual server.
type vip struct {
	vs    *virtualserver.Server
	st    *store
	ready chan struct{} // closed once started; err tells how
	err   error

	// io is held shared by record writes and exclusively by a restart, so
	// that no write lands in sm/ while the records are being retired.
	io sync.RWMutex

	// fmu orders the file moves of notified clients' records (see acked)
	// and the writes of the reboot journal. Lock order: io, fmu, mu.
	fmu          sync.Mutex
	journalLines int // lines in the reboot journal

	// detached is set, under io held exclusively, when the virtual server
	// leaves this node: no writer touches its directory after that (the
	// next owner may be writing it already).
	detached bool

	mu    sync.Mutex
	state int32
	recs  map[string]*entry
	// byName and byAddr index recs by the names and addresses a reboot
	// notification may give (see Record.matches).
	byName  map[string][]*entry
	byAddr  map[netip.Addr][]*entry
	writing map[string]chan struct{}
	// pending are the client records still in notify/, by file name: their
	// clients count as monitored (a crash notifies them again) and, once
	// they answer, their records move back to sm/ (see acked).
	pending map[string]*entry
	// toNotify is the notification a start prepared and Notify launches.
	toNotify *prepared
	job      *job
	stop     context.CancelFunc
	jobDone  chan struct{}
}

type entry struct {
	rec *Record
	// doomed marks a client record found idle by one Prune; the next
	// Prune removes it unless the client was monitored again in between.
	doomed bool
	// file is the record's file in notify/ while its client waits to be
	// notified (it is pending: v.pending[file] is this entry).
	file string
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
	s := &Service{cfg: cfg, log: cfg.Logger, vips: map[netip.Addr]*vip{}, dropping: map[dropKey]chan struct{}{}, bell: make(chan struct{}, 1)}
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

// prepared is a notification ready to go: the state announced and the
// peers to tell.
type prepared struct {
	state int32
	list  []loaded
}

// Start starts the status monitor of a virtual server that this node takes
// over. It notifies nobody yet: the caller sets up the grace period that
// waits for Started.Clients first, then calls Notify, so that no answer to
// a notification comes back before the period that counts it.
//
// The records themselves load after Start returns: who is to be notified
// is known from the notify list's file names, so the first SM_NOTIFY can
// leave at once (100 000 records take about a second to read); whatever
// needs the records (monitoring, reboot notifications, the admin's
// queries) waits for them.
func (s *Service) Start(vs *virtualserver.Server, mode StartMode) (Started, error) {
	a := vs.Addr()
	s.Detach(a)
	v := &vip{vs: vs, ready: make(chan struct{})}
	s.mu.Lock()
	s.vips[a] = v
	s.mu.Unlock()
	st, load, err := s.start(v, mode)
	if err != nil {
		v.err = err
		close(v.ready)
		s.mu.Lock()
		if s.vips[a] == v {
			delete(s.vips, a)
		}
		s.mu.Unlock()
		return st, err
	}
	s.wg.Go(func() {
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

// ErrNotServed reports an address that is not a virtual server here.
var ErrNotServed = errors.New("nsm: not a virtual server of this node")

// start does what Start must before it returns — the directory, the
// state number, the retired monitor list, the notification prepared from
// the notify list's names — and returns what loads the records.
func (s *Service) start(v *vip, mode StartMode) (Started, func(), error) {
	st, err := openStore(VIPDir(s.cfg.StateDir, v.vs.Addr().String()))
	if err != nil {
		return Started{}, nil, err
	}
	v.st = st
	v.setRecs(map[string]*entry{})
	v.writing = map[string]chan struct{}{}
	v.io.Lock()
	defer v.io.Unlock()
	var state int32
	if mode == Adopt {
		state, err = s.adoptState(v)
	} else {
		state, err = s.restartState(v)
	}
	if err != nil {
		return Started{}, nil, err
	}
	names, err := v.st.list(notifyDir)
	if err != nil {
		return Started{}, nil, err
	}
	targets := s.targetsOf(v, names)
	if mode == Restart || len(targets) > 0 {
		s.prepare(v, state, targets)
	}
	load := func() {
		v.io.Lock()
		defer v.io.Unlock()
		if mode == Adopt {
			s.adoptLists(v, state)
		} else {
			s.restartLists(v, state)
		}
	}
	return Started{State: state, Clients: clientsOf(targets)}, load, nil
}

// targetsOf returns who a notify list names are to be notified: a client
// by the address its file's name carries (no need to read it), any other
// record read now (SM_MON records, a handful).
func (s *Service) targetsOf(v *vip, names []string) []loaded {
	out := make([]loaded, 0, len(names))
	var others []string
	for _, n := range names {
		if a, ok := clientOfFile(n); ok {
			out = append(out, loaded{file: n, rec: &Record{Kind: KindClient, MonName: a.String(), Addrs: []netip.Addr{a}}})
		} else {
			others = append(others, n)
		}
	}
	if len(others) > 0 {
		for _, l := range s.load(v, notifyDir) {
			if slices.Contains(others, l.file) {
				out = append(out, l)
			}
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

// load reads a list, setting damaged records aside.
func (s *Service) load(v *vip, sub string) []loaded {
	list, bad := v.st.load(sub)
	for _, b := range bad {
		s.log.Warn("nsm: skipping a damaged monitor record", "vip", v.vs.Addr(), "err", b.err)
		if b.path != "" {
			s.quarantine(b.path)
		}
	}
	return list
}

func clientsOf(list []loaded) []netip.Addr {
	var out []netip.Addr
	for _, l := range list {
		if l.rec.Kind == KindClient && len(l.rec.Addrs) > 0 {
			out = append(out, l.rec.Addrs[0])
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
	state, err := s.restartState(v)
	if err != nil {
		return Started{}, err
	}
	list := s.restartLists(v, state)
	s.prepare(v, state, list)
	if launch {
		s.launch(v)
	}
	return Started{State: state, Clients: clientsOf(list)}, nil
}

// restartState bumps the state number and retires the monitor list to
// the notify list; v.io is held.
func (s *Service) restartState(v *vip) (int32, error) {
	prev, rerr := v.st.readState()
	if rerr != nil {
		s.log.Warn("nsm: damaged state number; starting from the clock", "vip", v.vs.Addr(), "err", rerr)
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

// restartLists loads the notify list after a restart; v.io is held.
func (s *Service) restartLists(v *vip, state int32) []loaded {
	list := s.load(v, notifyDir)
	s.loadStates(v, list)
	s.setLists(v, state, map[string]*entry{}, list)
	s.foldJournal(v)
	s.log.Info("nsm: virtual server restarted", "vip", v.vs.Addr(), "state", state, "to_notify", len(list))
	return list
}

// adoptState carries the state number on (a damaged or missing one starts
// from the clock); v.io is held.
func (s *Service) adoptState(v *vip) (int32, error) {
	state, rerr := v.st.readState()
	if rerr != nil || state == 0 {
		if rerr != nil {
			s.log.Warn("nsm: damaged state number; starting from the clock", "vip", v.vs.Addr(), "err", rerr)
		}
		state = nextState(state, rerr, time.Now())
		if err := v.st.writeState(state); err != nil {
			return 0, err
		}
	}
	return state, nil
}

// adoptLists loads the monitor and notify lists as they are; v.io is
// held.
func (s *Service) adoptLists(v *vip, state int32) {
	recs := map[string]*entry{}
	sm := s.load(v, smDir)
	list := s.load(v, notifyDir)
	s.loadStates(v, sm, list)
	for _, l := range sm {
		recs[l.rec.key()] = &entry{rec: l.rec}
	}
	s.setLists(v, state, recs, list)
	if v.journalLines > len(recs)+len(list) {
		s.foldJournal(v)
	}
	s.log.Info("nsm: virtual server adopted", "vip", v.vs.Addr(), "state", state, "monitored", len(recs), "to_notify", len(list))
}

// setLists installs a started virtual server's state number and records:
// recs from sm/, and the clients of the notify list (see keepPending).
// Hosts marked as monitored go through Monitor again, which finds them.
func (s *Service) setLists(v *vip, state int32, recs map[string]*entry, list []loaded) {
	pending := map[string]*entry{}
	keepPending(list, recs, pending)
	v.mu.Lock()
	v.state = state
	v.setRecs(recs)
	v.pending = pending
	v.mu.Unlock()
	s.gen.Add(1)
}

// setRecs installs the records and indexes them; v.mu is held (or v is
// not shared yet).
func (v *vip) setRecs(recs map[string]*entry) {
	v.recs = recs
	v.byName, v.byAddr = map[string][]*entry{}, map[netip.Addr][]*entry{}
	for _, e := range recs {
		v.index(e)
	}
}

// putRec adds a record; v.mu is held.
func (v *vip) putRec(key string, e *entry) {
	v.recs[key] = e
	v.index(e)
}

// delRec removes a record; v.mu is held.
func (v *vip) delRec(key string) {
	e := v.recs[key]
	if e == nil {
		return
	}
	delete(v.recs, key)
	drop := func(l []*entry) []*entry { return slices.DeleteFunc(l, func(x *entry) bool { return x == e }) }
	for _, n := range e.names() {
		if l := drop(v.byName[n]); len(l) > 0 {
			v.byName[n] = l
		} else {
			delete(v.byName, n)
		}
	}
	for _, a := range e.rec.Addrs {
		a = a.Unmap()
		if l := drop(v.byAddr[a]); len(l) > 0 {
			v.byAddr[a] = l
		} else {
			delete(v.byAddr, a)
		}
	}
}

func (v *vip) index(e *entry) {
	for _, n := range e.names() {
		v.byName[n] = append(v.byName[n], e)
	}
	for _, a := range e.rec.Addrs {
		v.byAddr[a.Unmap()] = append(v.byAddr[a.Unmap()], e)
	}
}

// names are the names a notification may call the record's host by, but
// for a mon_name that is one of its addresses (a client's always is): that
// one is found through byAddr (see matching).
func (e *entry) names() []string {
	var out []string
	if a, err := netip.ParseAddr(e.rec.MonName); err != nil || !slices.ContainsFunc(e.rec.Addrs, func(x netip.Addr) bool { return x.Unmap() == a.Unmap() }) {
		out = append(out, e.rec.MonName)
	}
	if e.rec.Caller != "" && e.rec.Caller != e.rec.MonName {
		out = append(out, e.rec.Caller)
	}
	return out
}

// matching returns the records a notification from sender naming monName
// is about (Record.matches), each once; v.mu is held.
func (v *vip) matching(monName string, sender netip.Addr) []*entry {
	var out []*entry
	add := func(l []*entry) {
		for _, e := range l {
			if !slices.Contains(out, e) {
				out = append(out, e)
			}
		}
	}
	if monName != "" {
		add(v.byName[monName])
		if a, err := netip.ParseAddr(monName); err == nil {
			add(v.byAddr[a.Unmap()])
		}
	}
	add(v.byAddr[sender.Unmap()])
	return out
}

// keepPending adds the client records of the notify list to recs, unless
// the client's record is in sm/ too, and to pending by file name.
//
// A client being notified stays monitored: its record in notify/ is as
// durable as one in sm/ (a crash notifies it again), so the reclaims that
// follow a restart need no record written. After a takeover by a node
// whose state directory sits on shared storage that is hundreds of fsyncs
// off the reclaim path (a thousand clients: 1.1 s → 0.3 s to reclaim).
func keepPending(list []loaded, recs, pending map[string]*entry) {
	for _, l := range list {
		if l.rec.Kind != KindClient {
			continue // SM_MON's lock manager monitors again as rpc.statd expects
		}
		k := l.rec.key()
		if recs[k] != nil {
			continue
		}
		e := &entry{rec: l.rec, file: l.file}
		recs[k], pending[l.file] = e, e
	}
}

// acked settles the records of clients whose statd answered: a client
// still monitored has its record moved back to sm/; any other file is
// removed. A move or removal lost in a crash only means one more
// notification next time, so directories are not synced for each.
func (s *Service) acked(v *vip, files []string) {
	v.fmu.Lock()
	defer v.fmu.Unlock()
	for _, f := range files {
		v.mu.Lock()
		e := v.pending[f]
		delete(v.pending, f)
		keep := e != nil && v.recs[e.rec.key()] == e
		v.mu.Unlock()
		if keep {
			if err := os.Rename(v.st.path(notifyDir, f), v.st.path(smDir, f)); err != nil {
				s.log.Warn("nsm: moving a notified client's record back to the monitor list", "vip", v.vs.Addr(), "file", f, "err", err)
			}
			continue
		}
		s.unlinkNotify(v, f)
	}
}

// unlinkNotify removes a file of the notify list that is done with.
func (s *Service) unlinkNotify(v *vip, f string) {
	if err := os.Remove(v.st.path(notifyDir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("nsm: removing a record from the notify list", "vip", v.vs.Addr(), "file", f, "err", err)
	}
}

// quarantine renames a damaged record file so that it is reported once
// and kept for inspection.
func (s *Service) quarantine(path string) {
	if err := os.Rename(path, path+".damaged"); err != nil {
		s.log.Warn("nsm: cannot set a damaged record aside", "path", path, "err", err)
	}
}

// prepare readies the notification of list, for Notify; v.io is held.
func (s *Service) prepare(v *vip, state int32, list []loaded) {
	if s.cfg.Notify.Disabled {
		return
	}
	v.mu.Lock()
	v.toNotify = &prepared{state: state, list: list}
	v.mu.Unlock()
}

// Notify sends the notifications that the start of the virtual server vs
// prepared (none after a planned takeover with nobody left to notify).
func (s *Service) Notify(vs *virtualserver.Server) error {
	// Not waiting for the records to load: the notification needs none.
	s.mu.Lock()
	v := s.vips[vs.Addr()]
	s.mu.Unlock()
	if v == nil || v.vs != vs {
		return fmt.Errorf("%w: %v", ErrNotServed, vs.Addr())
	}
	s.launch(v)
	return nil
}

// launch starts the prepared notification, if any; v.io is held, or the
// records are still loading (nothing else restarts the virtual server).
func (s *Service) launch(v *vip) {
	v.mu.Lock()
	p := v.toNotify
	v.toNotify = nil
	v.mu.Unlock()
	if p != nil {
		s.notify(v, p.state, p.list)
	}
}

// notify starts the notification of list; v.io is held.
func (s *Service) notify(v *vip, state int32, list []loaded) {
	from := netip.AddrPortFrom(v.vs.Addr(), s.cfg.Port)
	j := newJob(s.cfg.Notify, s.cfg.RPC, from, v.vs.Name(), state, list, time.Now())
	// Answers are acted on once the records are loaded (they may come
	// first: the notification starts from the list's names).
	rm := newAcker(func(files []string) {
		<-v.ready
		s.acked(v, files)
	})
	j.acked = rm.add
	vs := v.vs
	j.settled = func(client netip.Addr, answered bool) {
		if answered {
			vs.GraceNotified(client)
		} else {
			vs.GraceUnreachable(client)
		}
	}
	j.logf, j.warnf = s.log.Debug, s.log.Warn
	ctx, stop := context.WithCancel(s.ctx)
	done := make(chan struct{})
	v.mu.Lock()
	v.job, v.stop, v.jobDone = j, stop, done
	v.mu.Unlock()
	s.wg.Go(func() {
		defer close(done)
		defer stop()
		j.run(ctx)
		rm.close()
		p := j.progress()
		s.log.Info("nsm: notification finished", "vip", p.VIP, "state", p.State, "notified", p.Done,
			"failed", p.Failed, "pending", p.Pending(), "took", p.Finished.Sub(p.Started).Round(time.Millisecond))
	})
}

// startedVIP returns the NSM state of the virtual server at a once its
// start is over, or nil when it has none here.
func (s *Service) startedVIP(a netip.Addr) *vip {
	s.mu.Lock()
	v := s.vips[a.Unmap()]
	s.mu.Unlock()
	if v != nil {
		<-v.ready
	}
	return v
}

// Progress reports the notification of the virtual server at a: the one
// running or the last one.
func (s *Service) Progress(a netip.Addr) (Progress, bool) {
	v := s.startedVIP(a)
	if v == nil {
		return Progress{}, false
	}
	v.mu.Lock()
	j := v.job
	v.mu.Unlock()
	if j == nil {
		return Progress{VIP: a.Unmap(), State: v.currentState()}, true
	}
	return j.progress(), true
}

// NotifyStates returns, for the virtual server at a, the notification
// state of each client of its running or last notification: "done",
// "failed" or "pending".
func (s *Service) NotifyStates(a netip.Addr) map[netip.Addr]string {
	v := s.startedVIP(a)
	if v == nil {
		return nil
	}
	v.mu.Lock()
	j := v.job
	v.mu.Unlock()
	if j == nil {
		return nil
	}
	return j.clients()
}

// Renotify tells every client of the virtual server vs, monitored or still
// to be notified, that it restarted: a new state number and SM_NOTIFY to
// each, as SM_SIMU_CRASH does. Clients reclaim; their locks are there, so
// each reclaim is granted as it stands.
func (s *Service) Renotify(ctx context.Context, vs *virtualserver.Server) (Started, error) {
	v, err := s.vipFor(ctx, vs)
	if err != nil {
		return Started{}, err
	}
	return s.restartAndNotify(v)
}

// restartAndNotify restarts a served virtual server's monitor and
// notifies its peers at once (SM_SIMU_CRASH, an admin's renotify).
func (s *Service) restartAndNotify(v *vip) (Started, error) { return s.restart(v, true) }

// State is the NSM state number of the virtual server at a.
func (s *Service) State(a netip.Addr) (int32, bool) {
	v := s.startedVIP(a)
	if v == nil {
		return 0, false
	}
	return v.currentState(), v.err == nil
}

// Records returns copies of the virtual server's monitor records.
func (s *Service) Records(a netip.Addr) []Record {
	v := s.startedVIP(a)
	if v == nil {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]Record, 0, len(v.recs))
	for _, e := range v.recs {
		out = append(out, *e.rec)
	}
	return out
}

func (v *vip) currentState() int32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.state
}

// ---- monitoring -----------------------------------------------------------

// Generation changes whenever monitor records end (unmonitor, prune,
// restart). A caller that saw a client monitored under the current
// generation may skip Monitor: that is how the NLM service keeps the
// per-lock cost of monitoring at two atomic loads.
func (s *Service) Generation() uint64 { return s.gen.Load() }

// Monitor makes sure a client of the virtual server at vipAddr is
// monitored: the first time, its record is written durably before Monitor
// returns, so a lock granted afterwards is never missing from the notify
// list after a crash.
func (s *Service) Monitor(ctx context.Context, vipAddr netip.Addr, caller string, addr netip.Addr) error {
	v, err := s.lookupVIP(ctx, vipAddr)
	if err != nil {
		return err
	}
	c := Client{VIP: v.vs.Addr(), Caller: caller, Addr: addr.Unmap()}
	key := clientKey(c.Caller, c.Addr)
	if ch := s.dropWait(c.VIP, key); ch != nil {
		// The client rebooted and its old state is about to be dropped:
		// what it asks for now must come after, or the drop would take it
		// too.
		t := time.NewTimer(dropWaitMax)
		defer t.Stop()
		select {
		case <-ch:
		case <-t.C:
			return fmt.Errorf("nsm: %s's reboot is still being handled: %w", caller, virtualserver.ErrRetryLater)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return s.add(ctx, v, key, func() *Record { return clientRecord(c, v.vs.Name(), time.Now()) })
}

// dropWaitMax bounds how long a rebooted client's request waits for its
// old state to go; past it the request is not answered and the client
// sends it again.
const dropWaitMax = 2 * time.Second

// add creates the record under key unless it exists. Concurrent adds of
// one key write it once; adds of different keys write in parallel.
func (s *Service) add(ctx context.Context, v *vip, key string, mk func() *Record) error {
	for {
		v.mu.Lock()
		if e := v.recs[key]; e != nil {
			e.doomed = false
			v.mu.Unlock()
			return nil
		}
		if ch := v.writing[key]; ch != nil {
			v.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		ch := make(chan struct{})
		v.writing[key] = ch
		v.mu.Unlock()

		rec := mk()
		v.io.RLock()
		err := fmt.Errorf("%w: %w", ErrDetached, virtualserver.ErrRetryLater)
		if !v.detached {
			err = v.st.put(smDir, rec)
		}
		v.mu.Lock()
		delete(v.writing, key)
		if err == nil {
			v.putRec(key, &entry{rec: rec})
		}
		v.mu.Unlock()
		v.io.RUnlock()
		close(ch)
		if err != nil {
			return fmt.Errorf("nsm: monitoring %s: %w", rec.MonName, err)
		}
		s.log.Debug("nsm: monitoring", "vip", v.vs.Addr(), "kind", rec.Kind, "mon_name", rec.MonName, "caller", rec.Caller)
		s.runCallout("add-client", rec.MonName, rec.MyName)
		return nil
	}
}

// removeIf removes the records pred selects and returns them.
func (s *Service) removeIf(v *vip, pred func(*entry) bool) []*Record {
	v.io.RLock()
	defer v.io.RUnlock()
	if v.detached {
		return nil
	}
	v.mu.Lock()
	var gone []*Record
	for k, e := range v.recs {
		if pred(e) {
			gone = append(gone, e.rec)
			v.delRec(k)
		}
	}
	v.mu.Unlock()
	if len(gone) == 0 {
		return nil
	}
	s.gen.Add(1)
	for _, r := range gone {
		if err := v.st.remove(smDir, r.fileName()); err != nil {
			s.log.Warn("nsm: removing a monitor record", "vip", v.vs.Addr(), "mon_name", r.MonName, "err", err)
		}
		s.runCallout("del-client", r.MonName, r.MyName)
	}
	return gone
}

// Prune ends the monitoring of clients that hold nothing any more, in two
// steps a sweep apart: the first marks idle clients, the second removes
// those still idle and not monitored again meanwhile, so that a lock in
// flight between the two is never left without its record.
func (s *Service) Prune(active func(Client) bool) int {
	s.mu.Lock()
	vips := make([]*vip, 0, len(s.vips))
	for _, v := range s.vips {
		vips = append(vips, v)
	}
	s.mu.Unlock()
	n := 0
	for _, v := range vips {
		<-v.ready
		if v.err != nil {
			continue
		}
		marked := false
		gone := s.removeIf(v, func(e *entry) bool {
			if e.rec.Kind != KindClient || v.pending[e.file] == e {
				return false // a client being notified: judged once it answered
			}
			if active(e.rec.Client(v.vs.Addr())) {
				e.doomed = false
				return false
			}
			if e.doomed {
				return true
			}
			e.doomed, marked = true, true
			return false
		})
		n += len(gone)
		if marked {
			s.gen.Add(1) // make marked clients go through Monitor again
		}
	}
	return n
}

// ---- reboot notifications ------------------------------------------------

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
		s.persist(v, recs)
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
func (s *Service) persist(v *vip, recs map[*entry]*Record) {
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
		s.log.Warn("nsm: recording rebooted peers' new state", "vip", v.vs.Addr(), "records", len(states), "err", err)
		return
	}
	v.journalLines += len(states)
	v.mu.Lock()
	live := len(v.recs)
	v.mu.Unlock()
	if v.journalLines > 2*live+256 {
		s.foldJournal(v)
	}
}

// foldJournal rewrites the reboot journal with the states of the records
// there are: it grew past them (records pruned, states superseded). v.fmu
// is held (or v is not shared yet).
func (s *Service) foldJournal(v *vip) {
	states := map[string]int32{}
	v.mu.Lock()
	for _, e := range v.recs {
		if e.rec.LastState != 0 {
			states[e.rec.fileName()] = e.rec.LastState
		}
	}
	v.mu.Unlock()
	if err := v.st.writeStates(states); err != nil {
		s.log.Warn("nsm: folding the reboot journal", "vip", v.vs.Addr(), "err", err)
		return
	}
	v.journalLines = len(states)
}

// loadStates gives loaded records the states of the reboot journal.
func (s *Service) loadStates(v *vip, lists ...[]loaded) {
	states, lines, err := v.st.readStates()
	if err != nil {
		s.log.Warn("nsm: cannot read the reboot journal; repeated notifications may drop state again", "vip", v.vs.Addr(), "err", err)
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

func (s *Service) runCallout(args ...string) {
	if s.callout != nil {
		s.callout.run(args...)
	}
}

// ---- the RPC service --------------------------------------------------------

type handler func(s *Service, ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error)

// Programs returns NSM version 1 for registration.
func (s *Service) Programs() []sunrpc.Program {
	bind := func(name string, h handler) sunrpc.Proc {
		return sunrpc.Proc{Name: name, NonIdempotent: true, Handler: func(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
			return h(s, ctx, req, res)
		}}
	}
	procs := []sunrpc.Proc{
		ProcNull:      {Name: "NULL", Handler: func(_ context.Context, _ *sunrpc.Request, res []byte) ([]byte, error) { return res, nil }},
		ProcStat:      bind("SM_STAT", (*Service).handleStat),
		ProcMon:       bind("SM_MON", (*Service).handleMon),
		ProcUnmon:     bind("SM_UNMON", (*Service).handleUnmon),
		ProcUnmonAll:  bind("SM_UNMON_ALL", (*Service).handleUnmonAll),
		ProcSimuCrash: bind("SM_SIMU_CRASH", (*Service).handleSimuCrash),
		ProcNotify:    bind("SM_NOTIFY", (*Service).handleNotify),
	}
	return []sunrpc.Program{{Name: "status", Prog: Prog, Vers: Vers, Procs: procs}}
}

// localCaller tells whether a caller may use the local-only procedures:
// from loopback, and from a privileged port unless the service is told
// otherwise. It says why not.
func (s *Service) localCaller(req *sunrpc.Request) (bool, string) {
	switch {
	case !req.Remote.Addr().Unmap().IsLoopback():
		return false, "not from this host"
	case req.Remote.Port() >= 1024 && !s.cfg.UnprivilegedLocal:
		return false, "not from a privileged port"
	}
	return true, ""
}

// validName accepts a host name that can be monitored: no '/', blanks or
// control characters (nfs-utils keeps them in file names and
// blank-separated lines).
func validName(n string) bool {
	if n == "" || len(n) > MaxStrLen {
		return false
	}
	for _, r := range n {
		if r == '/' || unicode.IsSpace(r) || unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// resolve turns a host name into addresses through the name cache; an
// address stands for itself. A request over UDP does not wait for a
// lookup in progress: errPending, and it gets no reply (see names).
func (s *Service) resolve(ctx context.Context, req *sunrpc.Request, name string) ([]netip.Addr, error) {
	return s.names.resolve(ctx, name, req.Transport != sunrpc.UDP)
}

// vipOf finds the virtual server an SM_* request is about: the one whose
// name or address is my_name, else the one the request was sent to.
func (s *Service) vipOf(ctx context.Context, req *sunrpc.Request, myName string) (*vip, error) {
	if myName != "" {
		for _, vs := range s.cfg.VirtualServers.All() {
			if vs.Name() == myName || vs.Addr().String() == myName {
				return s.vipFor(ctx, vs)
			}
		}
	}
	return s.lookupVIP(ctx, req.Local.Addr())
}

// fromUs tells whether a call comes from our own notifier: from the NSM
// port of a virtual server of this node.
func (s *Service) fromUs(remote netip.AddrPort) bool {
	if remote.Port() != s.cfg.Port {
		return false
	}
	s.mu.Lock()
	_, ok := s.vips[remote.Addr().Unmap()]
	s.mu.Unlock()
	return ok
}

func (s *Service) handleStat(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var name string
	if err := req.DecodeArgs(func(d *xdr.Decoder) { name = d.String(MaxStrLen) }); err != nil {
		return nil, err
	}
	out := StatRes{Res: StatFail}
	if v, err := s.vipOf(ctx, req, ""); err == nil {
		out.State = v.currentState()
		if validName(name) {
			_, err := s.resolve(ctx, req, name)
			if errors.Is(err, errPending) {
				return nil, sunrpc.ErrNoReply // the retransmission finds the answer
			}
			if err == nil {
				out.Res = StatSucc
			}
		}
	}
	return out.Append(res), nil
}

func (s *Service) refuse(req *sunrpc.Request, what, why string, args ...any) {
	s.stats.Rejected.Add(1)
	s.log.Warn("nsm: refused "+what+": "+why, append([]any{"remote", req.Remote}, args...)...)
}

func (s *Service) handleMon(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a Mon
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	out := StatRes{Res: StatFail}
	id := &a.MonID.MyID
	v, verr := s.vipOf(ctx, req, id.MyName)
	if verr == nil {
		out.State = v.currentState()
	}
	local, why := s.localCaller(req)
	switch {
	case !local:
		s.refuse(req, "SM_MON", why)
	case verr != nil:
		s.refuse(req, "SM_MON", "no virtual server for it", "my_name", id.MyName, "local", req.Local, "err", verr)
	case id.Prog != nlmProg || (id.Proc != nlmProcSMNotify && id.Proc != nlmProcSMNotifyV4):
		s.refuse(req, "SM_MON", "the callback is not the lock manager's", "prog", id.Prog, "proc", id.Proc)
	case !validName(a.MonID.MonName) || len(id.MyName) > MaxStrLen || strings.ContainsFunc(id.MyName, unicode.IsSpace):
		s.refuse(req, "SM_MON", "bad host name", "mon_name", a.MonID.MonName, "my_name", id.MyName)
	default:
		addrs, err := s.resolve(ctx, req, a.MonID.MonName)
		if errors.Is(err, errPending) {
			return nil, sunrpc.ErrNoReply // the retransmission finds the answer
		}
		if err != nil {
			s.refuse(req, "SM_MON", "cannot resolve mon_name", "mon_name", a.MonID.MonName, "err", err)
			break
		}
		rec := &Record{Kind: KindSMMon, MonName: a.MonID.MonName, Addrs: addrs, MyName: id.MyName,
			Prog: id.Prog, Vers: id.Vers, Proc: id.Proc, Priv: Priv(a.Priv), Created: time.Now()}
		if err := s.add(ctx, v, rec.key(), func() *Record { return rec }); err != nil {
			s.log.Error("nsm: SM_MON failed", "mon_name", rec.MonName, "err", err)
			break
		}
		out.Res = StatSucc
	}
	return out.Append(res), nil
}

func sameID(r *Record, id *MyID) bool {
	return r.Kind == KindSMMon && r.MyName == id.MyName && r.Prog == id.Prog && r.Vers == id.Vers && r.Proc == id.Proc
}

// stateReply is sm_stat, the result of SM_UNMON and SM_UNMON_ALL.
func stateReply(res []byte, v *vip) []byte {
	var state int32
	if v != nil {
		state = v.currentState()
	}
	return xdr.AppendInt32(res, state)
}

func (s *Service) handleUnmon(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a MonID
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	v, err := s.vipOf(ctx, req, a.MyID.MyName)
	local, why := s.localCaller(req)
	switch {
	case !local:
		s.refuse(req, "SM_UNMON", why)
	case err != nil:
		s.refuse(req, "SM_UNMON", "no virtual server for it", "my_name", a.MyID.MyName, "err", err)
	default:
		s.removeIf(v, func(e *entry) bool { return sameID(e.rec, &a.MyID) && e.rec.MonName == a.MonName })
	}
	return stateReply(res, v), nil
}

func (s *Service) handleUnmonAll(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a MyID
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	v, err := s.vipOf(ctx, req, a.MyName)
	local, why := s.localCaller(req)
	switch {
	case !local:
		s.refuse(req, "SM_UNMON_ALL", why)
	case err != nil:
		s.refuse(req, "SM_UNMON_ALL", "no virtual server for it", "my_name", a.MyName, "err", err)
	default:
		s.removeIf(v, func(e *entry) bool { return sameID(e.rec, &a) })
	}
	return stateReply(res, v), nil
}

// handleSimuCrash makes the virtual server the request was sent to (or,
// sent to an address that is none, every virtual server of this node) act
// as if it had crashed and restarted: a new state number and
// notifications to all its peers.
func (s *Service) handleSimuCrash(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	if len(req.Args) != 0 {
		return nil, fmt.Errorf("%w: SM_SIMU_CRASH takes no arguments", sunrpc.ErrGarbageArgs)
	}
	if local, why := s.localCaller(req); !local {
		s.refuse(req, "SM_SIMU_CRASH", why)
		return res, nil
	}
	targets := s.cfg.VirtualServers.All()
	if vs, ok := s.cfg.VirtualServers.Lookup(req.Local.Addr()); ok {
		targets = []*virtualserver.Server{vs}
	}
	for _, vs := range targets {
		v, err := s.vipFor(ctx, vs)
		if err == nil {
			_, err = s.restartAndNotify(v)
		}
		if err != nil {
			s.log.Error("nsm: SM_SIMU_CRASH", "vip", vs.Addr(), "err", err)
		}
	}
	return res, nil
}

func (s *Service) handleNotify(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a StatChge
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	// Only the matching happens here (through the index); the rest is
	// the reboot worker's, after the reply: a notification that matches
	// thousands of records must not hold an RPC worker, nor the others
	// behind it. Unanswered when the queue is full: the sender retransmits.
	n := &rebootNote{monName: a.MonName, sender: req.Remote.Addr().Unmap(), state: a.State, self: s.fromUs(req.Remote)}
	if !s.takeReboot(n) {
		s.stats.NotifyDropped.Add(1)
		return nil, sunrpc.ErrNoReply
	}
	return res, nil
}
