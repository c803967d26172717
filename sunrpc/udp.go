package sunrpc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// udpServer is one UDP socket being served.
type udpServer struct {
	s     *Server
	c     *net.UDPConn
	v6    bool
	port  uint16
	bound netip.Addr // the socket's own address; unspecified on a wildcard socket
	jobs  chan udpJob

	closeOnce sync.Once
}

type udpJob struct {
	buf *[]byte
	dst netip.Addr
	src netip.AddrPort
}

// ErrNotUDP is returned by ServePacket for a PacketConn that is not a UDP socket.
var ErrNotUDP = errors.New("sunrpc: ServePacket needs a *net.UDPConn")

// ServePacket serves calls arriving on a UDP socket. On a wildcard socket
// (one per address family) it learns each datagram's destination address
// from IP_PKTINFO / IPV6_PKTINFO and sends the reply from that address, so a
// client that addressed a virtual server hears back from it. Datagrams the
// worker pool cannot take are dropped and counted. It returns
// ErrServerClosed after Shutdown or Close.
func (s *Server) ServePacket(pc net.PacketConn) error {
	serve, err := s.AttachPacket(pc)
	if err != nil {
		return err
	}
	return serve()
}

// AttachPacket makes a UDP socket the server's at once — SendPacket finds
// it as soon as AttachPacket returns — and returns the function that
// serves it (ServePacket's loop). A caller that sends from the socket
// right after opening it (SM_NOTIFY at a takeover) attaches it first, so
// nothing leaves before the socket is there. The caller must run serve:
// the server counts the socket as active from now on.
func (s *Server) AttachPacket(pc net.PacketConn) (serve func() error, err error) {
	s.init()
	c, ok := pc.(*net.UDPConn)
	if !ok {
		return nil, ErrNotUDP
	}
	la := c.LocalAddr().(*net.UDPAddr)
	u := &udpServer{
		s:     s,
		c:     c,
		v6:    la.IP.To4() == nil,
		port:  uint16(la.Port),
		bound: addrPortOf(la).Addr(),
		jobs:  make(chan udpJob, orDefault(s.UDPQueue, DefaultUDPQueue)),
	}
	if err := u.enablePktinfo(); err != nil {
		return nil, err
	}
	if s.UDPBuffer > 0 {
		SetUDPBuffers(c, s.UDPBuffer)
	}
	if !s.trackPacket(u, true) {
		c.Close()
		return nil, ErrServerClosed
	}
	return func() error {
		defer s.trackPacket(u, false)
		var workers sync.WaitGroup
		for range orDefault(s.UDPWorkers, defaultUDPWorkers()) {
			workers.Go(u.work)
		}
		err := u.read()
		u.close()
		close(u.jobs)
		workers.Wait()
		return err
	}, nil
}

func (u *udpServer) enablePktinfo() error {
	if u.bound.IsValid() && !u.bound.IsUnspecified() {
		return nil // a bound socket only ever receives for its own address
	}
	if u.v6 {
		// A dual-stack socket may also carry IPv4 datagrams: ask for both
		// and accept either (as miekg/dns does).
		err6 := ipv6.NewPacketConn(u.c).SetControlMessage(ipv6.FlagDst, true)
		err4 := ipv4.NewPacketConn(u.c).SetControlMessage(ipv4.FlagDst, true)
		if err6 != nil && err4 != nil {
			return fmt.Errorf("sunrpc: enabling IPV6_PKTINFO: %w", err6)
		}
		return nil
	}
	if err := ipv4.NewPacketConn(u.c).SetControlMessage(ipv4.FlagDst, true); err != nil {
		return fmt.Errorf("sunrpc: enabling IP_PKTINFO: %w", err)
	}
	return nil
}

func (s *Server) trackPacket(u *udpServer, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.shutdown.Load() {
			return false
		}
		s.packets[u] = struct{}{}
		s.active.Add(1)
	} else {
		delete(s.packets, u)
		s.active.Done()
	}
	return true
}

func (u *udpServer) close() { u.closeOnce.Do(func() { u.c.Close() }) }

// read is the socket's reader loop.
func (u *udpServer) read() error {
	s := u.s
	maxSize := orDefault(s.MaxRecordSize, DefaultMaxRecordSize)
	buf := make([]byte, maxSize)
	oob := make([]byte, 128)
	for {
		n, oobn, flags, src, err := u.c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if s.shutdown.Load() || errors.Is(err, net.ErrClosed) {
				return ErrServerClosed
			}
			if errors.Is(err, syscall.ECONNREFUSED) || isTimeout(err) {
				continue // an ICMP error for an earlier send; not fatal
			}
			return err
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if flags&syscall.MSG_TRUNC != 0 {
			s.stats.udpOversize.Add(1)
			continue
		}
		dst := u.dst(oob[:oobn])
		msg := buf[:n]
		xid, mtype, ok := PeekXID(msg)
		if !ok {
			s.stats.malformed.Add(1)
			continue
		}
		if mtype == MsgReply {
			if s.routeReply(src, xid, msg) {
				continue
			}
			if s.OnReply != nil {
				s.OnReply(netip.AddrPortFrom(dst, u.port), src, msg)
			}
			continue
		}
		if s.isStopped(dst) {
			s.stats.stoppedDrops.Add(1)
			continue
		}
		bp := getBuf()
		*bp = append((*bp)[:0], msg...)
		select {
		case u.jobs <- udpJob{buf: bp, dst: dst, src: src}:
		default:
			putBuf(bp)
			s.stats.udpQueueDrops.Add(1)
		}
	}
}

// dst extracts the datagram's destination address from its control message.
func (u *udpServer) dst(oob []byte) netip.Addr {
	if len(oob) > 0 {
		var cm4 ipv4.ControlMessage
		if cm4.Parse(oob) == nil && cm4.Dst != nil {
			if a, ok := netip.AddrFromSlice(cm4.Dst); ok {
				return a.Unmap()
			}
		}
		if u.v6 {
			var cm6 ipv6.ControlMessage
			if cm6.Parse(oob) == nil && cm6.Dst != nil {
				if a, ok := netip.AddrFromSlice(cm6.Dst); ok {
					return a.Unmap()
				}
			}
		}
	}
	return u.bound
}

// srcOOB builds the control message that makes a datagram leave from src.
func srcOOB(src netip.Addr, v6socket bool) []byte {
	if !src.IsValid() || src.IsUnspecified() {
		return nil
	}
	if src.Is4() && !v6socket {
		return (&ipv4.ControlMessage{Src: src.AsSlice()}).Marshal()
	}
	if src.Is4() {
		// A dual-stack socket answering an IPv4 client.
		return (&ipv4.ControlMessage{Src: src.AsSlice()}).Marshal()
	}
	return (&ipv6.ControlMessage{Src: src.AsSlice()}).Marshal()
}

// send writes one datagram from src to dst.
func (u *udpServer) send(msg []byte, src netip.Addr, dst netip.AddrPort) error {
	if u.v6 && dst.Addr().Is4() {
		dst = netip.AddrPortFrom(netip.AddrFrom16(dst.Addr().As16()), dst.Port())
	}
	var oob []byte
	if !u.bound.IsValid() || u.bound.IsUnspecified() {
		oob = srcOOB(src, u.v6)
	}
	_, _, err := u.c.WriteMsgUDPAddrPort(msg, oob, dst)
	return err
}

func (u *udpServer) work() {
	req := &Request{} // reused for every call of this worker
	for j := range u.jobs {
		u.serve(req, j)
		putBuf(j.buf)
	}
}

func (u *udpServer) serve(req *Request, j udpJob) {
	s := u.s
	msg := *j.buf
	*req = Request{Transport: UDP, Local: netip.AddrPortFrom(j.dst, u.port), Remote: j.src}
	var key drcKey
	cached := false
	if xid, prog, vers, proc, ok := peekCall(msg); ok && s.isNonIdempotent(prog, vers, proc) {
		key = drcKey{local: req.Local, remote: req.Remote, xid: xid, prog: prog, vers: vers, proc: proc, sum: crc32.ChecksumIEEE(msg[4:])}
		reply, state := s.drc.begin(key)
		switch state {
		case drcDone:
			s.stats.drcHits.Add(1)
			if reply != nil {
				u.send(reply, j.dst, j.src)
			}
			return
		case drcInProgress:
			s.stats.drcInProgress.Add(1)
			return
		}
		cached = true
	}
	out := getBuf()
	defer putBuf(out)
	reply, act := s.dispatch(s.ctx(), req, msg, (*out)[:0])
	*out = reply
	if act != actReply {
		reply = nil
	}
	switch {
	case cached && act == actDrop:
		s.drc.forget(key)
	case cached:
		s.drc.finish(key, reply)
	}
	if reply != nil {
		if err := u.send(reply, j.dst, j.src); err != nil {
			s.logger().Debug("sunrpc: UDP reply failed", "remote", j.src, "err", err)
		}
	}
}

// peekCall reads xid, prog, vers and proc from a call without validating the rest.
func peekCall(msg []byte) (xid, prog, vers, proc uint32, ok bool) {
	if len(msg) < 24 || binary.BigEndian.Uint32(msg[4:]) != uint32(MsgCall) {
		return 0, 0, 0, 0, false
	}
	be := binary.BigEndian
	return be.Uint32(msg), be.Uint32(msg[12:]), be.Uint32(msg[16:]), be.Uint32(msg[20:]), true
}

// ErrNoSocket is returned by SendPacket when no served UDP socket fits.
var ErrNoSocket = errors.New("sunrpc: no UDP socket serves that address and port")

// SendPacket sends msg as one datagram from one of the server's UDP sockets:
// the one on from's port and family, with from's address as the source.
// Callbacks that peers filter by source port (NLM *_RES to BSD lockd) use it.
func (s *Server) SendPacket(from, to netip.AddrPort, msg []byte) error {
	u, from, err := s.packetSocket(from)
	if err != nil {
		return err
	}
	return u.send(msg, from.Addr(), to)
}

// packetSocket picks the served UDP socket to send from from: the one on
// its port and family.
func (s *Server) packetSocket(from netip.AddrPort) (*udpServer, netip.AddrPort, error) {
	s.init()
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	s.mu.Lock()
	var best *udpServer
	for u := range s.packets {
		if u.port != from.Port() {
			continue
		}
		if u.bound.IsValid() && !u.bound.IsUnspecified() {
			if u.bound == from.Addr() {
				best = u
				break
			}
			continue
		}
		if u.v6 == !from.Addr().Is4() || best == nil {
			best = u
		}
	}
	s.mu.Unlock()
	if best == nil {
		return nil, from, fmt.Errorf("%w: %v", ErrNoSocket, from)
	}
	return best, from, nil
}

// SetUDPBuffers sizes a UDP socket's receive and send buffers. With
// CAP_NET_ADMIN it goes past the system's maximum (SO_RCVBUFFORCE), as a
// daemon that takes bursts (hundreds of replies to a fan-out at once) must;
// without, it gets what the system allows. It reports the first failure.
func SetUDPBuffers(c *net.UDPConn, bytes int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{syscall.SO_RCVBUFFORCE, syscall.SO_RCVBUF}, {syscall.SO_SNDBUFFORCE, syscall.SO_SNDBUF}} {
			if syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, o[0], bytes) != nil {
				if e := syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, o[1], bytes); e != nil && serr == nil {
					serr = e
				}
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}
