package sunrpc

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Serve accepts TCP connections on l and serves each until it closes, is
// idle too long, breaks the record-marking rules, or the server shuts down.
// It always returns a non-nil error; after Shutdown or Close, ErrServerClosed.
func (s *Server) Serve(l net.Listener) error {
	s.init()
	if !s.trackListener(&l, true) {
		l.Close()
		return ErrServerClosed
	}
	s.startReaper()
	defer s.trackListener(&l, false)
	var tempDelay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.shutdown.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) || isTemporaryAccept(err) {
				// Back off like net/http: out of file descriptors and
				// similar conditions clear up on their own.
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				s.logger().Warn("sunrpc: accept failed; retrying", "err", err, "delay", tempDelay)
				time.Sleep(tempDelay)
				continue
			}
			return err
		}
		tempDelay = 0
		sc := newServerConn(s, c)
		if s.isStopped(sc.local.Addr()) {
			s.stats.stoppedDrops.Add(1)
			c.Close()
			continue
		}
		if !s.trackConn(sc, true) {
			c.Close()
			return ErrServerClosed
		}
		go sc.serve()
	}
}

func isTemporaryAccept(err error) bool {
	var se interface{ Temporary() bool }
	return errors.As(err, &se) && se.Temporary()
}

func (s *Server) trackListener(l *net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.shutdown.Load() {
			return false
		}
		s.listeners[l] = struct{}{}
	} else {
		delete(s.listeners, l)
	}
	return true
}

func (s *Server) trackConn(c *serverConn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.shutdown.Load() {
			return false
		}
		if s.MaxConns > 0 && len(s.conns) >= s.MaxConns {
			s.evictIdlest()
		}
		s.conns[c] = struct{}{}
		s.active.Add(1)
	} else {
		delete(s.conns, c)
		s.active.Done()
	}
	return true
}

// evictIdlest closes the connection that has been idle longest (none with
// a call in progress or a record arriving, if it can help it); s.mu is
// held. A scan, but only when the server is full.
func (s *Server) evictIdlest() {
	var victim *serverConn
	var vBusy bool
	var vSince int64
	for c := range s.conns {
		if c.closed.Load() {
			continue
		}
		busy := c.busy.Load() != 0 || c.recordStart.Load() != 0
		since := c.lastActive.Load()
		if victim == nil || (vBusy && !busy) || (vBusy == busy && since < vSince) {
			victim, vBusy, vSince = c, busy, since
		}
	}
	if victim != nil {
		s.stats.evicted.Add(1)
		s.logger().Debug("sunrpc: closing the idlest connection to make room", "remote", victim.remote)
		victim.abort()
	}
}

// serverConn is one TCP connection.
type serverConn struct {
	s             *Server
	c             net.Conn
	local, remote netip.AddrPort

	wmu      sync.Mutex // serialises replies: one Write per record
	inflight sync.WaitGroup
	busy     atomic.Int32
	draining atomic.Bool
	closed   atomic.Bool

	// Calls go to a few persistent workers (see dispatchCall).
	work    chan *[]byte
	done    chan struct{}
	slots   chan struct{}
	workers atomic.Int32

	// Timestamps on the server's coarse clock, for the reaper: the last
	// completed record or reply, the start of a record still arriving, the
	// start of a reply still being written (0: none).
	lastActive  atomic.Int64
	recordStart atomic.Int64
	writeStart  atomic.Int64
}

func newServerConn(s *Server, c net.Conn) *serverConn {
	return &serverConn{s: s, c: c, local: addrPortOf(c.LocalAddr()), remote: addrPortOf(c.RemoteAddr()),
		work: make(chan *[]byte), done: make(chan struct{})}
}

// addrPortOf converts a net.Addr to an unmapped netip.AddrPort.
func addrPortOf(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// stopReading makes the reader return so that the connection closes once its
// calls in progress have answered (graceful shutdown).
func (sc *serverConn) stopReading() {
	sc.draining.Store(true)
	sc.c.SetReadDeadline(time.Now())
}

// abort closes the connection at once.
func (sc *serverConn) abort() {
	if sc.closed.CompareAndSwap(false, true) {
		sc.c.Close()
	}
}

func (sc *serverConn) serve() {
	s := sc.s
	defer s.trackConn(sc, false)
	defer func() {
		close(sc.done) // idle workers leave; busy ones finish their call
		sc.inflight.Wait()
		sc.abort()
	}()
	sc.lastActive.Store(s.clock())
	br := bufio.NewReaderSize(sc.c, 4096)
	rr := RecordReader{R: br, MaxSize: orDefault(s.MaxRecordSize, DefaultMaxRecordSize), MaxFragments: s.MaxFragments}
	sc.slots = make(chan struct{}, orDefault(s.MaxInFlight, DefaultMaxInFlight))
	for {
		// No per-call deadlines (each costs timer updates and clock reads):
		// the server's reaper closes a connection that idles too long, that
		// starts a record and stalls, or whose peer stops taking replies.
		if br.Buffered() == 0 {
			if sc.draining.Load() {
				return
			}
			if _, err := br.Peek(1); err != nil {
				return
			}
		}
		sc.recordStart.Store(s.clock())
		if sc.draining.Load() {
			return
		}
		bp := getBuf()
		rec, err := rr.Next(*bp)
		sc.recordStart.Store(0)
		if err != nil {
			putBuf(bp)
			if errors.Is(err, ErrRecordTooLarge) || errors.Is(err, ErrTooManyFragments) {
				s.stats.recordErrors.Add(1)
				s.logger().Warn("sunrpc: closing connection", "remote", sc.remote, "err", err)
			}
			return
		}
		sc.lastActive.Store(s.clock())
		*bp = rec
		sc.dispatchCall(bp)
	}
}

// dispatchCall hands a call to an idle worker of the connection, or starts
// a worker while fewer than MaxInFlight run, or waits for one to be free.
// Workers persist (for workerIdle) so a call runs on a warm stack: a fresh
// goroutine per call would grow a new stack through the whole handler path
// every time. A handler that blocks holds up only its own worker.
func (sc *serverConn) dispatchCall(bp *[]byte) {
	select {
	case sc.work <- bp:
		return
	default:
	}
	if sc.workers.Load() < int32(cap(sc.slots)) {
		sc.slots <- struct{}{}
		sc.workers.Add(1)
		sc.inflight.Add(1)
		go sc.worker(bp)
		return
	}
	sc.work <- bp
}

// workerIdle is how long a connection's extra worker waits for work; the
// first worker stays for the connection's life.
const workerIdle = 2 * time.Second

func (sc *serverConn) worker(bp *[]byte) {
	req := &Request{} // reused for every call of this worker
	defer func() {
		sc.workers.Add(-1)
		<-sc.slots
		sc.inflight.Done()
	}()
	first := sc.workers.Load() == 1
	var idle *time.Timer
	for {
		sc.busy.Add(1)
		sc.handle(req, bp)
		sc.busy.Add(-1)
		if first {
			select {
			case bp = <-sc.work:
				continue
			case <-sc.done:
				return
			}
		}
		if idle == nil {
			idle = time.NewTimer(workerIdle)
		} else {
			idle.Reset(workerIdle)
		}
		select {
		case bp = <-sc.work:
		case <-idle.C:
			return
		case <-sc.done:
			return
		}
	}
}

// reap closes the connection if it broke a timeout at now (coarse clock).
func (sc *serverConn) reap(now int64, idle, record, write time.Duration) {
	switch {
	case started(sc.recordStart.Load(), now, record):
		sc.s.logger().Debug("sunrpc: closing a connection stalled inside a record", "remote", sc.remote)
	case started(sc.writeStart.Load(), now, write):
		sc.s.logger().Debug("sunrpc: closing a connection that does not take its replies", "remote", sc.remote)
	case sc.busy.Load() == 0 && sc.recordStart.Load() == 0 && now-sc.lastActive.Load() > int64(idle):
		sc.s.logger().Debug("sunrpc: closing an idle connection", "remote", sc.remote)
	default:
		return
	}
	sc.abort()
}

func started(at, now int64, limit time.Duration) bool { return at != 0 && now-at > int64(limit) }

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// handle serves one record and writes its reply.
func (sc *serverConn) handle(req *Request, bp *[]byte) {
	s := sc.s
	defer putBuf(bp)
	if s.isStopped(sc.local.Addr()) {
		s.stats.stoppedDrops.Add(1)
		sc.abort()
		return
	}
	out := getBuf()
	defer putBuf(out)
	*req = Request{Transport: TCP, Local: sc.local, Remote: sc.remote}
	reply, act := s.dispatch(s.ctx(), req, *bp, append((*out)[:0], 0, 0, 0, 0))
	*out = reply
	switch act {
	case actClose:
		sc.abort()
		return
	case actDrop:
		return
	}
	putRecordMark(reply)
	sc.wmu.Lock()
	sc.writeStart.Store(s.clock())
	_, err := sc.c.Write(reply)
	sc.writeStart.Store(0)
	sc.lastActive.Store(s.clock())
	sc.wmu.Unlock()
	if err != nil {
		s.logger().Debug("sunrpc: reply write failed; closing", "remote", sc.remote, "err", err)
		sc.abort()
	}
}

// ctx is the context handlers run under; it ends when the server closes.
func (s *Server) ctx() context.Context { return s.baseCtx }

// The reaper keeps the server's coarse clock and enforces the TCP
// timeouts, so that serving a call reads no clock and sets no deadline.
func (s *Server) startReaper() {
	s.reaperOnce.Do(func() {
		s.now.Store(time.Now().UnixNano())
		idle := orDefault(s.IdleTimeout, DefaultIdleTimeout)
		record := orDefault(s.RecordTimeout, DefaultRecordTimeout)
		write := orDefault(s.WriteTimeout, DefaultWriteTimeout)
		tick := min(max(min(idle, record, write)/4, 10*time.Millisecond), time.Second)
		go func() {
			t := time.NewTicker(tick)
			defer t.Stop()
			for {
				select {
				case <-s.baseCtx.Done():
					return
				case now := <-t.C:
					n := now.UnixNano()
					s.now.Store(n)
					s.mu.Lock()
					for c := range s.conns {
						c.reap(n, idle, record, write)
					}
					s.mu.Unlock()
				}
			}
		}()
	})
}

// clock is the coarse time, in Unix nanoseconds, updated by the reaper.
func (s *Server) clock() int64 { return s.now.Load() }
