// Package sunrpc is an ONC RPC version 2 (RFC 5531) server and client over
// TCP and UDP, with rpcbind registration and an embedded portmapper.
//
// The server is shaped like net/http: programs are registered by (program,
// version) with a table of procedure handlers, and Serve / ServePacket run
// them on listeners the caller opens. Every request carries the local
// address it was sent to — on a wildcard UDP socket that is learned from
// IP_PKTINFO and the reply leaves from that same address — because the NLM
// and NSM services above key all their state by it (the virtual server).
package sunrpc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Transport is the transport a request arrived on or a call is made over.
type Transport uint8

// Transports.
const (
	TCP Transport = iota + 1
	UDP
)

func (t Transport) String() string {
	switch t {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return "unknown"
}

// IP protocol numbers, as portmap v2 names transports.
const (
	IPProtoTCP = 6
	IPProtoUDP = 17
)

// Proto is the IP protocol number of t (portmap v2's "prot").
func (t Transport) Proto() uint32 {
	if t == UDP {
		return IPProtoUDP
	}
	return IPProtoTCP
}

// Request is one call as a handler sees it.
type Request struct {
	XID       uint32
	Prog      uint32
	Vers      uint32
	Proc      uint32
	Transport Transport
	// Local is the address the client sent the call to: on a wildcard
	// listener this is how a virtual server is told apart.
	Local  netip.AddrPort
	Remote netip.AddrPort
	Cred   OpaqueAuth
	Verf   OpaqueAuth
	// Args are the encoded procedure arguments.
	Args []byte
}

// A Request and everything it refers to (Args, Cred) are valid only until
// the handler returns: the server reuses them for the next call.

// AuthSys parses the AUTH_SYS credential of the call. The server has
// already checked that the credential is well formed; it parses it only
// for handlers that ask, so that calls cost no allocation otherwise.
func (r *Request) AuthSys() (*AuthSysCred, bool) {
	if r.Cred.Flavor != AuthSys {
		return nil, false
	}
	c, err := ParseAuthSys(r.Cred.Body)
	if err != nil {
		return nil, false
	}
	return &c, true
}

// DecodeArgs runs dec over the call's arguments. Arguments that are short
// or malformed (dec left the decoder in error) are ErrGarbageArgs, which a
// handler returns as it is. Small enough to inline, so that the arguments
// dec fills stay on the handler's stack.
func (r *Request) DecodeArgs(dec func(*xdr.Decoder)) error {
	var d xdr.Decoder
	d.Reset(r.Args)
	dec(&d)
	if err := d.Err(); err != nil {
		return &garbageArgsError{err}
	}
	return nil
}

// garbageArgsError is ErrGarbageArgs with its cause, built without a call
// so that DecodeArgs stays within the inlining budget.
type garbageArgsError struct{ err error }

func (e *garbageArgsError) Error() string   { return ErrGarbageArgs.Error() + ": " + e.err.Error() }
func (e *garbageArgsError) Unwrap() []error { return []error{ErrGarbageArgs, e.err} }

// Handler serves one procedure: it decodes req.Args, appends the encoded
// results to res and returns the extended slice. To answer other than
// SUCCESS it returns ErrGarbageArgs, ErrSystemErr, ErrProcUnavail, an error
// from AuthErr, or ErrNoReply (send nothing); any other error is answered
// with SYSTEM_ERR and logged. Errors may be wrapped.
type Handler func(ctx context.Context, req *Request, res []byte) ([]byte, error)

// ErrNoReply, returned by a handler, makes the server send no reply.
var ErrNoReply = errors.New("sunrpc: no reply")

type authError AuthStat

func (e authError) Error() string        { return "sunrpc: authentication failed: " + AuthStat(e).String() }
func (e authError) Is(target error) bool { return target == ErrAuth }

// AuthErr returns a handler error that denies the call with AUTH_ERROR(stat).
func AuthErr(stat AuthStat) error { return authError(stat) }

// Proc describes one procedure of a program version.
type Proc struct {
	Name    string
	Handler Handler
	// NonIdempotent procedures have their UDP replies kept in the duplicate
	// request cache, so a retransmitted call gets the first answer again
	// instead of being executed twice.
	NonIdempotent bool
}

// Program is one version of an RPC program: its procedure table is indexed
// by procedure number, and a nil Handler means PROC_UNAVAIL.
type Program struct {
	Name  string
	Prog  uint32
	Vers  uint32
	Procs []Proc
}

// progVersions holds the registered versions of one program.
type progVersions struct {
	low, high uint32
	vers      map[uint32]*Program
}

// Defaults for the zero-valued Server fields.
const (
	DefaultMaxRecordSize = 16 << 10
	DefaultMaxInFlight   = 16
	DefaultIdleTimeout   = 6 * time.Minute
	DefaultRecordTimeout = 30 * time.Second
	DefaultWriteTimeout  = 30 * time.Second
	DefaultUDPQueue      = 1024
	DefaultDRCSize       = 1024
	DefaultDRCLifetime   = 2 * time.Minute
)

// ErrServerClosed is returned by Serve and ServePacket after Shutdown or Close.
var ErrServerClosed = errors.New("sunrpc: server closed")

// ErrDuplicateProgram is returned when a (program, version) is registered twice.
var ErrDuplicateProgram = errors.New("sunrpc: program version already registered")

// Server serves registered programs on any number of TCP listeners and UDP
// sockets. Set its fields before the first Serve; the zero value uses the
// defaults above.
type Server struct {
	// Logger receives transport-level events; nil discards them.
	Logger *slog.Logger
	// MaxRecordSize caps one call: a TCP record (all fragments together) or
	// a UDP datagram. NLM and NSM calls fit in a few KiB.
	MaxRecordSize int
	// MaxFragments caps the fragments of one TCP record.
	MaxFragments int
	// MaxInFlight bounds the calls being served at once per TCP connection;
	// beyond it the server stops reading that connection.
	MaxInFlight int
	// IdleTimeout closes a TCP connection that sends nothing for this long
	// while no call of it is in progress.
	IdleTimeout time.Duration
	// MaxConns caps the TCP connections served at once (0: no cap): a new
	// one past it closes the one that has been idle longest, so that a
	// host holding thousands of connections open cannot use up the
	// process's descriptors and lock out new clients.
	MaxConns int
	// RecordTimeout closes a TCP connection that starts a record and does
	// not finish it in this time.
	RecordTimeout time.Duration
	// WriteTimeout closes a TCP connection whose peer does not take a reply
	// in this time.
	WriteTimeout time.Duration
	// UDPWorkers is the number of goroutines serving datagrams per UDP
	// socket (default 2×GOMAXPROCS); UDPQueue is how many datagrams may wait
	// for them before further ones are dropped and counted.
	UDPWorkers int
	UDPQueue   int
	// UDPBuffer, if set, is the receive and send buffer size of the UDP
	// sockets served (see SetUDPBuffers).
	UDPBuffer int
	// Observer, if set, hears of every call that reached a procedure.
	Observer CallObserver
	// DRCSize bounds the duplicate request cache (entries); DRCLifetime is
	// how long an answer is kept for retransmissions.
	DRCSize     int
	DRCLifetime time.Duration
	// OnReply, if set, receives RPC replies that arrive on the server's UDP
	// sockets and that no PacketClient call is waiting for. msg is valid
	// only during the call.
	OnReply func(local, remote netip.AddrPort, msg []byte)

	now        atomic.Int64 // coarse clock for the TCP timeouts
	reaperOnce sync.Once

	replyMu sync.Mutex
	replies map[replyKey]func([]byte)

	initOnce sync.Once
	progs    atomic.Pointer[map[uint32]*progVersions]
	regMu    sync.Mutex
	drc      *replyCache
	stats    serverStats

	mu         sync.Mutex
	listeners  map[*net.Listener]struct{}
	packets    map[*udpServer]struct{}
	conns      map[*serverConn]struct{}
	stopped    atomic.Pointer[map[netip.Addr]struct{}]
	shutdown   atomic.Bool
	active     sync.WaitGroup // serving goroutines: conns and UDP loops
	baseCtx    context.Context
	cancelBase context.CancelFunc
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		empty := map[uint32]*progVersions{}
		s.progs.Store(&empty)
		stopped := map[netip.Addr]struct{}{}
		s.stopped.Store(&stopped)
		s.drc = newReplyCache(orDefault(s.DRCSize, DefaultDRCSize), orDefault(s.DRCLifetime, DefaultDRCLifetime))
		s.listeners = map[*net.Listener]struct{}{}
		s.packets = map[*udpServer]struct{}{}
		s.conns = map[*serverConn]struct{}{}
		s.baseCtx, s.cancelBase = context.WithCancel(context.Background())
		s.replies = map[replyKey]func([]byte){}
	})
}

// replyKey identifies an outstanding call made from a server socket.
type replyKey struct {
	peer netip.AddrPort
	xid  uint32
}

func (s *Server) expectReply(k replyKey, deliver func([]byte)) {
	s.replyMu.Lock()
	s.replies[k] = deliver
	s.replyMu.Unlock()
}

func (s *Server) forgetReply(k replyKey) {
	s.replyMu.Lock()
	delete(s.replies, k)
	s.replyMu.Unlock()
}

// ExpectReply routes the reply to a call sent with SendPacket — the reply
// datagram from peer carrying xid, reaching one of the server's UDP
// sockets — to deliver, until ForgetReply. deliver runs on the socket's
// reader and must not block; it gets its own copy of the message. It is
// the asynchronous form of PacketClient, for callers that keep many calls
// in flight without a goroutine each.
func (s *Server) ExpectReply(peer netip.AddrPort, xid uint32, deliver func(msg []byte)) {
	s.init()
	s.expectReply(replyKey{peer: unmapPeer(peer), xid: xid}, deliver)
}

// ForgetReply stops routing the replies ExpectReply asked for.
func (s *Server) ForgetReply(peer netip.AddrPort, xid uint32) {
	s.forgetReply(replyKey{peer: unmapPeer(peer), xid: xid})
}

// routeReply hands a reply datagram to the PacketClient call waiting for it.
func (s *Server) routeReply(remote netip.AddrPort, xid uint32, msg []byte) bool {
	s.replyMu.Lock()
	deliver := s.replies[replyKey{peer: remote, xid: xid}]
	s.replyMu.Unlock()
	if deliver == nil {
		return false
	}
	deliver(append([]byte(nil), msg...))
	return true
}

func orDefault[T int | time.Duration](v, d T) T {
	if v > 0 {
		return v
	}
	return d
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return discardLogger
}

var discardLogger = slog.New(slog.DiscardHandler)

// Register adds a program version. It may be called while serving.
func (s *Server) Register(p Program) error {
	s.init()
	s.regMu.Lock()
	defer s.regMu.Unlock()
	old := *s.progs.Load()
	if pv := old[p.Prog]; pv != nil && pv.vers[p.Vers] != nil {
		return fmt.Errorf("%w: %d v%d", ErrDuplicateProgram, p.Prog, p.Vers)
	}
	next := make(map[uint32]*progVersions, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	pv := &progVersions{low: p.Vers, high: p.Vers, vers: map[uint32]*Program{}}
	if o := old[p.Prog]; o != nil {
		for v, prog := range o.vers {
			pv.vers[v] = prog
		}
		pv.low, pv.high = min(o.low, p.Vers), max(o.high, p.Vers)
	}
	prog := p
	pv.vers[p.Vers] = &prog
	next[p.Prog] = pv
	s.progs.Store(&next)
	return nil
}

// Unregister removes a program version; calls to it get PROG_MISMATCH or
// PROG_UNAVAIL from then on.
func (s *Server) Unregister(prog, vers uint32) {
	s.init()
	s.regMu.Lock()
	defer s.regMu.Unlock()
	old := *s.progs.Load()
	o := old[prog]
	if o == nil || o.vers[vers] == nil {
		return
	}
	next := make(map[uint32]*progVersions, len(old))
	for k, v := range old {
		next[k] = v
	}
	delete(next, prog)
	if len(o.vers) > 1 {
		pv := &progVersions{low: ^uint32(0), vers: map[uint32]*Program{}}
		for v, p := range o.vers {
			if v != vers {
				pv.vers[v] = p
				pv.low, pv.high = min(pv.low, v), max(pv.high, v)
			}
		}
		next[prog] = pv
	}
	s.progs.Store(&next)
}

// StopAddr stops serving local address a: TCP connections to it are closed,
// new ones are refused, and datagrams to it are dropped, while every other
// address is served as before. IPv4-mapped IPv6 addresses are treated as
// the IPv4 address.
func (s *Server) StopAddr(a netip.Addr) {
	s.init()
	a = a.Unmap()
	s.mu.Lock()
	next := cloneSet(*s.stopped.Load())
	next[a] = struct{}{}
	s.stopped.Store(&next)
	var victims []*serverConn
	for c := range s.conns {
		if c.local.Addr() == a {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.abort()
	}
}

// ResumeAddr undoes StopAddr.
func (s *Server) ResumeAddr(a netip.Addr) {
	s.init()
	a = a.Unmap()
	s.mu.Lock()
	next := cloneSet(*s.stopped.Load())
	delete(next, a)
	s.stopped.Store(&next)
	s.mu.Unlock()
}

func cloneSet(m map[netip.Addr]struct{}) map[netip.Addr]struct{} {
	n := make(map[netip.Addr]struct{}, len(m)+1)
	for k := range m {
		n[k] = struct{}{}
	}
	return n
}

func (s *Server) isStopped(a netip.Addr) bool {
	m := *s.stopped.Load()
	if len(m) == 0 {
		return false
	}
	_, ok := m[a]
	return ok
}

// Stats are counters of what the server dropped or refused.
type Stats struct {
	Calls            uint64 // calls dispatched to a program
	UDPQueueDrops    uint64 // datagrams dropped because the worker queue was full
	UDPOversize      uint64 // datagrams larger than MaxRecordSize
	StoppedDrops     uint64 // calls to a stopped address
	MalformedHeaders uint64 // messages too short to answer or not calls
	RecordErrors     uint64 // TCP connections closed for a record-marking violation
	DRCHits          uint64 // retransmissions answered from the duplicate request cache
	ConnsEvicted     uint64 // idle TCP connections closed to make room (MaxConns)
	DRCInProgress    uint64 // retransmissions dropped while the original was running
}

type serverStats struct {
	calls, udpQueueDrops, udpOversize, stoppedDrops, malformed, recordErrors, drcHits, drcInProgress, evicted atomic.Uint64
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() Stats {
	st := &s.stats
	return Stats{
		Calls:            st.calls.Load(),
		UDPQueueDrops:    st.udpQueueDrops.Load(),
		UDPOversize:      st.udpOversize.Load(),
		StoppedDrops:     st.stoppedDrops.Load(),
		MalformedHeaders: st.malformed.Load(),
		RecordErrors:     st.recordErrors.Load(),
		DRCHits:          st.drcHits.Load(),
		DRCInProgress:    st.drcInProgress.Load(),
		ConnsEvicted:     st.evicted.Load(),
	}
}

// action is what the transport should do after dispatch.
type action uint8

const (
	actReply action = iota // send the reply in out
	actDrop                // send nothing
	actClose               // send nothing; on a stream, close the connection
)

// dispatch parses msg, runs the handler and appends the reply to out. The
// transport has set req.Transport, Local and Remote; req is the caller's
// (reused call after call). The reply starts at len(out) as passed in.
func (s *Server) dispatch(ctx context.Context, req *Request, msg, out []byte) ([]byte, action) {
	start := len(out)
	h, args, err := ParseCall(msg)
	if err != nil {
		switch {
		case errors.Is(err, ErrRPCVersion):
			return AppendRPCMismatch(out, h.XID), actReply
		case errors.Is(err, ErrBadCred):
			return AppendAuthError(out, h.XID, AuthBadCred), actReply
		case errors.Is(err, ErrBadVerf):
			return AppendAuthError(out, h.XID, AuthBadVerf), actReply
		}
		s.stats.malformed.Add(1)
		s.logger().Debug("sunrpc: dropping malformed message", "transport", req.Transport, "remote", req.Remote, "err", err)
		// Like Linux's svc_process: a header that cannot be parsed means we
		// lost framing or the peer is broken; drop it, and on a stream
		// close the connection.
		return out, actClose
	}
	if stat := checkAuth(&h); stat != AuthOK {
		return AppendAuthError(out, h.XID, stat), actReply
	}
	pv := (*s.progs.Load())[h.Prog]
	if pv == nil {
		return AppendAcceptedReply(out, h.XID, ProgUnavail), actReply
	}
	prog := pv.vers[h.Vers]
	if prog == nil {
		return AppendProgMismatch(out, h.XID, pv.low, pv.high), actReply
	}
	if h.Proc >= uint32(len(prog.Procs)) || prog.Procs[h.Proc].Handler == nil {
		return AppendAcceptedReply(out, h.XID, ProcUnavail), actReply
	}
	proc := &prog.Procs[h.Proc]
	s.stats.calls.Add(1)
	req.XID, req.Prog, req.Vers, req.Proc = h.XID, h.Prog, h.Vers, h.Proc
	req.Cred, req.Verf, req.Args = h.Cred, h.Verf, args
	out = AppendAcceptedReply(out, h.XID, Success)
	var t0 time.Time
	if s.Observer != nil {
		t0 = time.Now()
	}
	res, err := s.call(ctx, proc, req, out)
	if err == nil {
		s.observe(req, proc, CallSuccess, t0)
		return res, actReply
	}
	out = out[:start]
	var ae authError
	switch {
	case errors.Is(err, ErrNoReply):
		s.observe(req, proc, CallDropped, t0)
		return out, actDrop
	case errors.As(err, &ae):
		s.observe(req, proc, CallAuthError, t0)
		return AppendAuthError(out, h.XID, AuthStat(ae)), actReply
	case errors.Is(err, ErrGarbageArgs):
		s.observe(req, proc, CallGarbageArgs, t0)
		s.logger().Debug("sunrpc: garbage arguments", "prog", h.Prog, "vers", h.Vers, "proc", proc.Name, "remote", req.Remote, "err", err)
		return AppendAcceptedReply(out, h.XID, GarbageArgs), actReply
	case errors.Is(err, ErrProcUnavail):
		s.observe(req, proc, CallProcUnavail, t0)
		return AppendAcceptedReply(out, h.XID, ProcUnavail), actReply
	case !errors.Is(err, ErrSystemErr):
		s.logger().Warn("sunrpc: handler failed", "prog", h.Prog, "vers", h.Vers, "proc", proc.Name, "remote", req.Remote, "err", err)
	}
	s.observe(req, proc, CallSystemErr, t0)
	return AppendAcceptedReply(out, h.XID, SystemErr), actReply
}

// CallOutcome is how a call that reached a procedure ended.
type CallOutcome uint8

// Outcomes.
const (
	CallSuccess CallOutcome = iota
	CallGarbageArgs
	CallSystemErr
	CallProcUnavail
	CallAuthError
	CallDropped // the handler chose not to reply
)

var outcomeNames = [...]string{"success", "garbage_args", "system_err", "proc_unavail", "auth_error", "dropped"}

func (o CallOutcome) String() string { return outcomeNames[o] }

// CallObserver hears of every call that reached a procedure (metrics). It
// must be cheap and safe for concurrent use; proc is stable for the life
// of the registration.
type CallObserver interface {
	ObserveCall(req *Request, proc *Proc, outcome CallOutcome, d time.Duration)
}

func (s *Server) observe(req *Request, proc *Proc, o CallOutcome, t0 time.Time) {
	if s.Observer != nil {
		s.Observer.ObserveCall(req, proc, o, time.Since(t0))
	}
}

// call runs a handler, turning a panic into SYSTEM_ERR so that one bad
// request cannot take the daemon down.
func (s *Server) call(ctx context.Context, proc *Proc, req *Request, out []byte) (res []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			s.logger().Error("sunrpc: handler panicked", "proc", proc.Name, "panic", r, "stack", string(debug.Stack()))
			res, err = nil, fmt.Errorf("%w: handler panic", ErrSystemErr)
		}
	}()
	return proc.Handler(ctx, req, out)
}

// isNonIdempotent reports whether the call in msg is to a procedure whose
// replies the duplicate request cache must keep.
func (s *Server) isNonIdempotent(prog, vers, proc uint32) bool {
	pv := (*s.progs.Load())[prog]
	if pv == nil {
		return false
	}
	p := pv.vers[vers]
	return p != nil && proc < uint32(len(p.Procs)) && p.Procs[proc].NonIdempotent
}

// Shutdown stops accepting, lets calls in progress finish and their replies
// go out, then closes every connection and socket. If ctx ends first it
// closes everything at once and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.shutdown.Store(true)
	s.closeListeners()
	s.mu.Lock()
	for c := range s.conns {
		c.stopReading()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.active.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.cancelBase()
		return nil
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
}

// Close stops serving at once: listeners, sockets and connections are
// closed and calls in progress lose their replies.
func (s *Server) Close() error {
	s.init()
	s.shutdown.Store(true)
	s.closeListeners()
	s.mu.Lock()
	for c := range s.conns {
		c.abort()
	}
	s.mu.Unlock()
	s.cancelBase()
	s.active.Wait()
	return nil
}

func (s *Server) closeListeners() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for l := range s.listeners {
		(*l).Close()
	}
	for u := range s.packets {
		u.close()
	}
}

// bufPool recycles receive and reply buffers.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func getBuf() *[]byte { return bufPool.Get().(*[]byte) }

func putBuf(b *[]byte) {
	if cap(*b) > 64<<10 {
		return // do not let one large record pin memory in the pool
	}
	*b = (*b)[:0]
	bufPool.Put(b)
}

func defaultUDPWorkers() int { return 2 * runtime.GOMAXPROCS(0) }

func unmapPeer(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
