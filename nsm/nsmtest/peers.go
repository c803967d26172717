// Package nsmtest simulates the peers of a status monitor on loopback: a
// portmapper and a statd that answer for every address they are reached
// at, so that thousands of 127.x.y.z addresses stand for thousands of
// client hosts, and a lock manager callback that records what statd tells
// it. Tests and the notify benchmark use it.
package nsmtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// NSM and NLM numbers, repeated here so that the package stands apart from
// the code it tests.
const (
	nsmProg       = 100024
	nsmVers       = 1
	nsmProcNotify = 6
	nlmProg       = 100021
)

// Notification is one SM_NOTIFY a simulated statd received.
type Notification struct {
	To      netip.Addr     // the client host it was sent to
	From    netip.AddrPort // where it came from
	MonName string
	State   int32
	At      time.Time
}

// Callback is one call a simulated lock manager received from a statd.
type Callback struct {
	Vers, Proc uint32
	MonName    string
	State      int32
	Priv       [16]byte
	From       netip.AddrPort
}

// Peers is a set of simulated client hosts.
type Peers struct {
	// PortmapPort and StatdPort are where the portmapper and statd listen
	// (UDP, every address).
	PortmapPort, StatdPort uint16

	pm, statd *sunrpc.Server
	pmConn    net.PacketConn
	stConn    net.PacketConn

	mu           sync.Mutex
	notes        []Notification
	byHost       map[netip.Addr]int
	dead         map[netip.Addr]bool
	unregistered map[netip.Addr]bool
	lockd        map[uint32]bool
	callbacks    []Callback
	changed      chan struct{}
	onNotify     func(Notification)
}

// OnNotify makes fn hear of each SM_NOTIFY as it arrives (a simulated
// client that reclaims its locks).
func (p *Peers) OnNotify(fn func(Notification)) {
	p.mu.Lock()
	p.onNotify = fn
	p.mu.Unlock()
}

// Start starts the portmapper on pmPort (0: any free port) and the statd.
func Start(pmPort uint16) (*Peers, error) {
	p := &Peers{byHost: map[netip.Addr]int{}, dead: map[netip.Addr]bool{}, unregistered: map[netip.Addr]bool{},
		lockd: map[uint32]bool{}, changed: make(chan struct{})}
	var err error
	if p.stConn, err = net.ListenPacket("udp4", "0.0.0.0:0"); err != nil {
		return nil, err
	}
	if p.pmConn, err = net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", pmPort)); err != nil {
		p.stConn.Close()
		return nil, err
	}
	p.StatdPort = uint16(p.stConn.LocalAddr().(*net.UDPAddr).Port)
	p.PortmapPort = uint16(p.pmConn.LocalAddr().(*net.UDPAddr).Port)
	// Real client hosts each have their own statd; this one stands for
	// thousands, so it queues what arrives at once instead of dropping.
	p.pm = &sunrpc.Server{UDPQueue: 1 << 16, UDPBuffer: 8 << 20}
	p.statd = &sunrpc.Server{UDPQueue: 1 << 16, UDPBuffer: 8 << 20}
	pmProcs := make([]sunrpc.Proc, 4)
	pmProcs[0] = sunrpc.Proc{Name: "NULL", Handler: null}
	pmProcs[sunrpc.PmapProcGetPort] = sunrpc.Proc{Name: "GETPORT", Handler: p.getPort}
	rpcbProcs := make([]sunrpc.Proc, 4)
	rpcbProcs[0] = sunrpc.Proc{Name: "NULL", Handler: null}
	rpcbProcs[sunrpc.RpcbProcGetAddr] = sunrpc.Proc{Name: "GETADDR", Handler: p.getAddr}
	for _, prog := range []sunrpc.Program{
		{Name: "portmapper", Prog: sunrpc.PmapProg, Vers: sunrpc.PmapVers2, Procs: pmProcs},
		{Name: "rpcbind", Prog: sunrpc.PmapProg, Vers: sunrpc.RpcbVers3, Procs: rpcbProcs},
		{Name: "rpcbind", Prog: sunrpc.PmapProg, Vers: sunrpc.RpcbVers4, Procs: rpcbProcs},
	} {
		if err := p.pm.Register(prog); err != nil {
			return nil, err
		}
	}
	stProcs := make([]sunrpc.Proc, nsmProcNotify+1)
	stProcs[0] = sunrpc.Proc{Name: "NULL", Handler: null}
	stProcs[nsmProcNotify] = sunrpc.Proc{Name: "SM_NOTIFY", Handler: p.notify}
	if err := p.statd.Register(sunrpc.Program{Name: "status", Prog: nsmProg, Vers: nsmVers, Procs: stProcs}); err != nil {
		return nil, err
	}
	go p.pm.ServePacket(p.pmConn)
	go p.statd.ServePacket(p.stConn)
	return p, nil
}

func null(_ context.Context, _ *sunrpc.Request, res []byte) ([]byte, error) { return res, nil }

// Drops is the number of datagrams the simulated hosts dropped for lack
// of queue room (each costs its sender a retransmission timeout).
func (p *Peers) Drops() uint64 {
	return p.pm.Stats().UDPQueueDrops + p.statd.Stats().UDPQueueDrops
}

// Close stops the servers.
func (p *Peers) Close() {
	p.pm.Close()
	p.statd.Close()
}

// SetDead makes the host at a silent: neither its portmapper nor its
// statd answers.
func (p *Peers) SetDead(a netip.Addr, dead bool) {
	p.mu.Lock()
	p.dead[a] = dead
	p.mu.Unlock()
}

// SetUnregistered makes the portmapper of a answer that no statd runs.
func (p *Peers) SetUnregistered(a netip.Addr, unregistered bool) {
	p.mu.Lock()
	p.unregistered[a] = unregistered
	p.mu.Unlock()
}

// ServeLockd registers a lock manager program (NLM, version vers) whose
// calls are recorded as Callbacks: what a local lockd gets from statd.
func (p *Peers) ServeLockd(vers uint32) error {
	procs := make([]sunrpc.Proc, 25)
	procs[0] = sunrpc.Proc{Name: "NULL", Handler: null}
	for _, proc := range []uint32{16, 24} {
		procs[proc] = sunrpc.Proc{Name: "SM_NOTIFY", Handler: p.lockdNotify}
	}
	if err := p.statd.Register(sunrpc.Program{Name: "nlockmgr", Prog: nlmProg, Vers: vers, Procs: procs}); err != nil {
		return err
	}
	p.mu.Lock()
	p.lockd[vers] = true
	p.mu.Unlock()
	return nil
}

func (p *Peers) port(to netip.Addr, prog, vers uint32) (port uint16, drop bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.dead[to]:
		return 0, true
	case prog == nsmProg && vers == nsmVers && !p.unregistered[to]:
		return p.StatdPort, false
	case prog == nlmProg && p.lockd[vers]:
		return p.StatdPort, false
	}
	return 0, false
}

func (p *Peers) getPort(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	d := xdr.NewDecoder(req.Args)
	prog, vers, prot := d.Uint32(), d.Uint32(), d.Uint32()
	d.Uint32()
	if d.Err() != nil {
		return nil, sunrpc.ErrGarbageArgs
	}
	port, drop := p.port(req.Local.Addr(), prog, vers)
	if drop {
		return nil, sunrpc.ErrNoReply
	}
	if prot != sunrpc.UDP.Proto() {
		port = 0
	}
	return xdr.AppendUint32(res, uint32(port)), nil
}

func (p *Peers) getAddr(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	d := xdr.NewDecoder(req.Args)
	prog, vers := d.Uint32(), d.Uint32()
	netid := d.String(64)
	d.String(256)
	d.String(256)
	if d.Err() != nil {
		return nil, sunrpc.ErrGarbageArgs
	}
	port, drop := p.port(req.Local.Addr(), prog, vers)
	if drop {
		return nil, sunrpc.ErrNoReply
	}
	if port == 0 || (netid != "udp" && netid != "udp6") {
		return xdr.AppendString(res, ""), nil
	}
	return xdr.AppendString(res, sunrpc.FormatUaddr(netip.AddrPortFrom(req.Local.Addr(), port))), nil
}

func (p *Peers) notify(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	d := xdr.NewDecoder(req.Args)
	name := d.String(1024)
	state := d.Int32()
	if d.Err() != nil {
		return nil, sunrpc.ErrGarbageArgs
	}
	n := Notification{To: req.Local.Addr(), From: req.Remote, MonName: name, State: state, At: time.Now()}
	p.mu.Lock()
	if p.dead[n.To] {
		p.mu.Unlock()
		return nil, sunrpc.ErrNoReply
	}
	p.notes = append(p.notes, n)
	p.byHost[n.To]++
	p.signal()
	fn := p.onNotify
	p.mu.Unlock()
	if fn != nil {
		fn(n)
	}
	return res, nil
}

func (p *Peers) lockdNotify(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	d := xdr.NewDecoder(req.Args)
	c := Callback{Vers: req.Vers, Proc: req.Proc, From: req.Remote}
	c.MonName = d.String(1024)
	c.State = d.Int32()
	copy(c.Priv[:], d.FixedOpaque(16))
	if d.Err() != nil {
		return nil, sunrpc.ErrGarbageArgs
	}
	p.mu.Lock()
	p.callbacks = append(p.callbacks, c)
	p.signal()
	p.mu.Unlock()
	return res, nil
}

// signal wakes waiters; p.mu is held.
func (p *Peers) signal() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// Reset forgets the notifications and callbacks received so far.
func (p *Peers) Reset() {
	p.mu.Lock()
	p.notes, p.callbacks = nil, nil
	p.byHost = map[netip.Addr]int{}
	p.mu.Unlock()
}

// Notifications returns the SM_NOTIFY calls received so far.
func (p *Peers) Notifications() []Notification {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Notification(nil), p.notes...)
}

// Notified is the number of distinct hosts notified.
func (p *Peers) Notified() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.byHost)
}

// Callbacks returns the lock manager calls received so far.
func (p *Peers) Callbacks() []Callback {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Callback(nil), p.callbacks...)
}

// ErrTimeout is returned by the Wait functions.
var ErrTimeout = errors.New("nsmtest: timed out")

// WaitNotified waits until n distinct hosts were notified.
func (p *Peers) WaitNotified(n int, timeout time.Duration) error {
	return p.wait(func() bool { return len(p.byHost) >= n }, timeout)
}

// WaitCallbacks waits until n lock manager calls arrived.
func (p *Peers) WaitCallbacks(n int, timeout time.Duration) error {
	return p.wait(func() bool { return len(p.callbacks) >= n }, timeout)
}

func (p *Peers) wait(done func() bool, timeout time.Duration) error {
	deadline := time.After(timeout)
	for {
		p.mu.Lock()
		ok, ch := done(), p.changed
		p.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-deadline:
			return ErrTimeout
		}
	}
}
