package sunrpc

import (
	"io"
	"net/netip"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Packet is one datagram of SendPackets: where it goes, what it carries,
// and (set by SendPackets) why it could not be sent.
type Packet struct {
	To  netip.AddrPort
	Msg []byte
	Err error
}

// maxBatch bounds the datagrams of one sendmmsg(2) call.
const maxBatch = 64

// SendPackets sends datagrams from one of the server's UDP sockets, as
// SendPacket sends each, but with one system call per maxBatch of them
// (sendmmsg(2)): a notifier that keeps hundreds of calls in flight sends
// them in bursts. Each packet's Err tells whether it left; the error
// returned is the first of them.
func (s *Server) SendPackets(from netip.AddrPort, pkts []Packet) error {
	u, from, err := s.packetSocket(from)
	if err != nil {
		for i := range pkts {
			pkts[i].Err = err
		}
		return err
	}
	var first error
	for len(pkts) > 0 {
		n := min(len(pkts), maxBatch)
		first = cmpOrErr(first, u.sendBatch(pkts[:n], from.Addr()))
		pkts = pkts[n:]
	}
	return first
}

func cmpOrErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// mmsghdr is struct mmsghdr of sendmmsg(2).
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
	_   [4]byte
}

// sendBatch sends up to maxBatch datagrams from src, setting each Err.
func (u *udpServer) sendBatch(pkts []Packet, src netip.Addr) error {
	var oob []byte
	if !u.bound.IsValid() || u.bound.IsUnspecified() {
		oob = srcOOB(src, u.v6)
	}
	// Heap memory the kernel reads, alive until the call returns.
	hs := make([]mmsghdr, len(pkts))
	iov := make([]unix.Iovec, len(pkts))
	sa4 := make([]unix.RawSockaddrInet4, len(pkts))
	var sa6 []unix.RawSockaddrInet6
	if u.v6 {
		sa6 = make([]unix.RawSockaddrInet6, len(pkts))
	}
	var first error
	batched := make([]bool, len(pkts))
	for i := range pkts {
		p := &pkts[i]
		p.Err = nil
		a := p.To.Addr()
		if a.Zone() != "" || (!u.v6 && !a.Unmap().Is4()) {
			// A scoped address (or one the socket cannot reach): the
			// standard library's path, alone.
			p.Err = u.send(p.Msg, src, p.To)
			first = cmpOrErr(first, p.Err)
			continue
		}
		batched[i] = true
		h := &hs[i].hdr
		if len(p.Msg) > 0 {
			iov[i].Base = &p.Msg[0]
			iov[i].SetLen(len(p.Msg))
		}
		h.Iov, h.Iovlen = &iov[i], 1
		if len(oob) > 0 {
			h.Control = &oob[0]
			h.SetControllen(len(oob))
		}
		port := (*[2]byte)(unsafe.Pointer(&sa4[i].Port))
		if u.v6 {
			sa6[i] = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.As16()}
			port = (*[2]byte)(unsafe.Pointer(&sa6[i].Port))
			h.Name, h.Namelen = (*byte)(unsafe.Pointer(&sa6[i])), unix.SizeofSockaddrInet6
		} else {
			sa4[i] = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.Unmap().As4()}
			h.Name, h.Namelen = (*byte)(unsafe.Pointer(&sa4[i])), unix.SizeofSockaddrInet4
		}
		port[0], port[1] = byte(p.To.Port()>>8), byte(p.To.Port()) // network order
	}
	rc, err := u.c.SyscallConn()
	if err != nil {
		return err
	}
	for i := 0; i < len(pkts); {
		if !batched[i] {
			i++
			continue
		}
		j := i + 1 // the run of batched packets from i
		for j < len(pkts) && batched[j] {
			j++
		}
		var sent int
		var errno syscall.Errno
		werr := rc.Write(func(fd uintptr) bool {
			for {
				r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&hs[i])), uintptr(j-i), 0, 0, 0)
				switch e {
				case unix.EINTR:
					continue
				case unix.EAGAIN:
					return false // until the socket can take more
				}
				sent, errno = int(r), e
				return true
			}
		})
		switch {
		case werr != nil:
			// The socket is closed: nothing more leaves.
			for ; i < len(pkts); i++ {
				if batched[i] {
					pkts[i].Err = werr
				}
			}
			return cmpOrErr(first, werr)
		case errno != 0 || sent <= 0:
			// The first packet of the run failed (the kernel reports an
			// error only when it sent none): the others go on.
			err := error(errno)
			if errno == 0 {
				err = io.ErrShortWrite
			}
			pkts[i].Err = err
			first = cmpOrErr(first, err)
			i++
		default:
			i += sent
		}
	}
	runtime.KeepAlive(hs)
	runtime.KeepAlive(iov)
	runtime.KeepAlive(sa4)
	runtime.KeepAlive(sa6)
	runtime.KeepAlive(oob)
	runtime.KeepAlive(pkts)
	return first
}
