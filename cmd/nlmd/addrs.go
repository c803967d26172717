package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/nlmha/nlmha/sunrpc"
)

// wildcardAddrs serves virtual servers on the wildcard sockets: serving or
// not is a filter by destination address in the RPC servers.
type wildcardAddrs struct{ nlm, nsm *sunrpc.Server }

func (w wildcardAddrs) Serve(a netip.Addr) error {
	w.nlm.ResumeAddr(a)
	w.nsm.ResumeAddr(a)
	return nil
}

func (w wildcardAddrs) Stop(a netip.Addr) {
	w.nlm.StopAddr(a)
	w.nsm.StopAddr(a)
}

// boundAddrs serves each virtual server on sockets bound to its address,
// opened at takeover and closed at release. IP_FREEBIND lets them bind
// before the address is configured on an interface (the cluster manager
// may bring it up after the takeover). Several nlmd on one host can so
// share the same ports, each serving its own addresses.
type boundAddrs struct {
	d     *daemon
	mu    sync.Mutex
	socks map[netip.Addr][]func() error
}

func freebind(network, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if network == "tcp6" || network == "udp6" {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IPV6, ipv6Freebind, 1)
		} else {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_FREEBIND, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// ipv6Freebind is IPV6_FREEBIND (linux/in6.h), which package syscall lacks.
const ipv6Freebind = 78

func (b *boundAddrs) Serve(a netip.Addr) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.socks[a] != nil {
		return nil
	}
	lc := net.ListenConfig{Control: freebind}
	tcp, udp := "tcp4", "udp4"
	if !a.Is4() {
		tcp, udp = "tcp6", "udp6"
	}
	var closers []func() error
	undo := func() {
		for _, c := range closers {
			c()
		}
	}
	for _, s := range []struct {
		srv  *sunrpc.Server
		port uint16
	}{{b.d.rpc, b.d.o.nlmPort}, {b.d.nsmRPC, b.d.o.nsmPort}} {
		addr := netip.AddrPortFrom(a, s.port).String()
		l, err := lc.Listen(context.Background(), tcp, addr)
		if err != nil {
			undo()
			return fmt.Errorf("listening on %s/tcp: %w", addr, err)
		}
		closers = append(closers, l.Close)
		pc, err := lc.ListenPacket(context.Background(), udp, addr)
		if err != nil {
			undo()
			return fmt.Errorf("listening on %s/udp: %w", addr, err)
		}
		closers = append(closers, pc.Close)
		srv := s.srv
		// Attached before Serve returns: the takeover's SM_NOTIFYs leave
		// from this socket right after.
		servePC, err := srv.AttachPacket(pc)
		if err != nil {
			undo()
			return fmt.Errorf("serving %s/udp: %w", addr, err)
		}
		srv.ResumeAddr(a)
		b.d.serving.Go(func() { logServeErr(b.d.log, srv.Serve(l)) })
		b.d.serving.Go(func() { logServeErr(b.d.log, servePC()) })
	}
	b.socks[a] = closers
	return nil
}

func (b *boundAddrs) Stop(a netip.Addr) {
	b.d.rpc.StopAddr(a) // closes the connections accepted on a
	b.d.nsmRPC.StopAddr(a)
	b.mu.Lock()
	closers := b.socks[a]
	delete(b.socks, a)
	b.mu.Unlock()
	var errs []error
	for _, c := range closers {
		if err := c(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		b.d.log.Warn("nlmd: closing a virtual server's sockets", "vip", a, "err", err)
	}
}

func (b *boundAddrs) closeAll() {
	b.mu.Lock()
	var all []netip.Addr
	for a := range b.socks {
		all = append(all, a)
	}
	b.mu.Unlock()
	for _, a := range all {
		b.Stop(a)
	}
}
