package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
)

// rawClient makes RPC calls over one socket whose local address and port
// it chooses: the privilege checks under test look at the source port,
// which sunrpc.Client leaves to the kernel.
type rawClient struct {
	proto string // "udp" or "tcp"
	c     net.Conn
	xid   uint32
	cred  sunrpc.OpaqueAuth
}

// dialRaw connects from `from` (any address if invalid) to `to`; reserved
// takes a port below 1024, as bindresvport does (root only).
func dialRaw(proto string, from netip.Addr, reserved bool, to netip.AddrPort, timeout time.Duration) (*rawClient, error) {
	if !from.IsValid() {
		from = netip.IPv4Unspecified()
	}
	dial := func(port uint16) (net.Conn, error) {
		local := netip.AddrPortFrom(from, port)
		if proto == "udp" {
			return net.DialUDP("udp", net.UDPAddrFromAddrPort(local), net.UDPAddrFromAddrPort(to))
		}
		d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(local)}
		return d.Dial("tcp", to.String())
	}
	var c net.Conn
	var err error
	if !reserved {
		c, err = dial(0)
	} else {
		const low, high = 600, 1024
		start := rand.IntN(high - low)
		for i := range high - low {
			c, err = dial(uint16(low + (start+i)%(high-low)))
			if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
				break
			}
		}
	}
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	cred := sunrpc.NewAuthSys(&sunrpc.AuthSysCred{MachineName: host, UID: uint32(os.Getuid()), GID: uint32(os.Getgid())})
	return &rawClient{proto: proto, c: c, xid: rand.Uint32(), cred: cred}, nil
}

func (r *rawClient) Close() error { return r.c.Close() }

func (r *rawClient) local() string { return r.c.LocalAddr().String() }

// message encodes a call; on TCP with its record mark.
func (r *rawClient) message(prog, vers, proc uint32, args []byte) (uint32, []byte) {
	r.xid++
	var b []byte
	if r.proto == "tcp" {
		b = make([]byte, 4)
	}
	b = sunrpc.AppendCall(b, &sunrpc.CallHeader{XID: r.xid, RPCVers: 2, Prog: prog, Vers: vers, Proc: proc,
		Cred: r.cred, Verf: sunrpc.OpaqueAuth{Flavor: sunrpc.AuthNone}})
	b = append(b, args...)
	if r.proto == "tcp" {
		binary.BigEndian.PutUint32(b, uint32(len(b)-4)|1<<31)
	}
	return r.xid, b
}

// send sends a call and does not wait for its reply.
func (r *rawClient) send(prog, vers, proc uint32, args []byte) error {
	_, msg := r.message(prog, vers, proc, args)
	_, err := r.c.Write(msg)
	return err
}

// call sends a call and waits up to timeout for its accepted reply,
// retransmitting over UDP.
func (r *rawClient) call(prog, vers, proc uint32, args []byte, timeout time.Duration) ([]byte, error) {
	xid, msg := r.message(prog, vers, proc, args)
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 64<<10)
	for {
		if _, err := r.c.Write(msg); err != nil {
			return nil, err
		}
		wait := deadline
		if r.proto == "udp" {
			wait = minTime(deadline, time.Now().Add(250*time.Millisecond))
		}
		r.c.SetReadDeadline(wait)
		for {
			reply, err := r.read(buf)
			if ne, ok := err.(net.Error); ok && ne.Timeout() && r.proto == "udp" && time.Now().Before(deadline) {
				break // retransmit
			}
			if err != nil {
				return nil, err
			}
			h, res, err := sunrpc.ParseReply(reply)
			if err != nil || h.XID != xid {
				continue
			}
			if err := h.Err(); err != nil {
				return nil, err
			}
			return res, nil
		}
	}
}

func (r *rawClient) read(buf []byte) ([]byte, error) {
	if r.proto == "udp" {
		n, err := r.c.Read(buf)
		return buf[:n], err
	}
	return readRecord(r.c, buf)
}

// readRecord reads one single-fragment record (all nlmd sends).
func readRecord(c io.Reader, buf []byte) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[:]) &^ (1 << 31))
	if n > len(buf) {
		return nil, fmt.Errorf("reply of %d bytes", n)
	}
	_, err := io.ReadFull(c, buf[:n])
	return buf[:n], err
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
