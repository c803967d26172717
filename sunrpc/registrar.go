package sunrpc

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
)

// Registration is one (program, version, transport, family) → port mapping
// published with rpcbind.
type Registration struct {
	Prog, Vers uint32
	Transport  Transport
	V6         bool
	Port       uint16
}

// NetID is the registration's rpcbind network id.
func (r Registration) NetID() string { return NetID(r.Transport, r.V6) }

func (r Registration) String() string {
	return fmt.Sprintf("%d v%d %s port %d", r.Prog, r.Vers, r.NetID(), r.Port)
}

func (r Registration) uaddr() string {
	a := netip.IPv4Unspecified()
	if r.V6 {
		a = netip.IPv6Unspecified()
	}
	return FormatUaddr(netip.AddrPortFrom(a, r.Port))
}

// Registration errors.
var (
	// ErrRegisteredElsewhere: another process has the (program, version,
	// network id) registered on a different port. We never take it over.
	ErrRegisteredElsewhere = errors.New("sunrpc: registered by another process")
	// ErrRegistrationRefused: rpcbind answered SET with false.
	ErrRegistrationRefused = errors.New("sunrpc: rpcbind refused the registration")
)

// Registrar publishes and withdraws registrations with the system rpcbind,
// and never removes a registration it did not make: a mapping on another
// port belongs to someone else and is left alone.
type Registrar struct {
	// Socket is rpcbind's local socket, used when it exists so that rpcbind
	// records our uid as the owner (default DefaultRpcbindSocket; "-" never
	// uses a socket).
	Socket string
	// Addr is rpcbind's address otherwise (default 127.0.0.1:111).
	Addr netip.AddrPort
	// Version forces a protocol version: 2 (portmap SET/UNSET), 3 or 4
	// (rpcbind SET/UNSET with network id and universal address). 0 uses the
	// newest the rpcbind speaks.
	Version uint32
	// Owner is the r_owner sent with version 3/4 SET (rpcbind substitutes
	// what it learns from a local socket).
	Owner string
	// Options tune the RPC client.
	Options ClientOptions
}

func (r *Registrar) dial(ctx context.Context) (*Client, error) {
	sock := r.Socket
	if sock == "" {
		sock = DefaultRpcbindSocket
	}
	if sock != "-" {
		if _, err := os.Stat(sock); err == nil {
			c, err := DialUnix(ctx, sock, r.Options)
			if err == nil {
				return c, nil
			}
		}
	}
	addr := r.Addr
	if !addr.IsValid() {
		addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), PmapPort)
	}
	return Dial(ctx, TCP, addr, r.Options)
}

// version finds the protocol version to use and, for 3 and 4, the current table.
func (r *Registrar) version(ctx context.Context, rb Rpcbind) (uint32, []RPCB, error) {
	versions := []uint32{RpcbVers4, RpcbVers3}
	switch r.Version {
	case PmapVers2:
		return PmapVers2, nil, nil
	case RpcbVers3, RpcbVers4:
		versions = []uint32{r.Version}
	}
	var lastErr error
	for _, v := range versions {
		table, err := rb.Dump(ctx, v)
		if err == nil {
			return v, table, nil
		}
		if !errors.Is(err, ErrProgMismatch) && !errors.Is(err, ErrProcUnavail) {
			return 0, nil, err
		}
		lastErr = err
	}
	if r.Version != 0 {
		return 0, nil, lastErr
	}
	return PmapVers2, nil, nil
}

// Register publishes regs. A registration that rpcbind already holds for the
// same port counts as done (a restart, or another instance serving the same
// fixed port on this host); one held for another port fails with
// ErrRegisteredElsewhere. It stops at the first failure.
func (r *Registrar) Register(ctx context.Context, regs ...Registration) error {
	c, err := r.dial(ctx)
	if err != nil {
		return fmt.Errorf("sunrpc: contacting rpcbind: %w", err)
	}
	defer c.Close()
	rb := Rpcbind{C: c}
	vers, table, err := r.version(ctx, rb)
	if err != nil {
		return fmt.Errorf("sunrpc: reading rpcbind table: %w", err)
	}
	for _, reg := range regs {
		if err := r.register(ctx, rb, vers, table, reg); err != nil {
			return fmt.Errorf("sunrpc: registering %v: %w", reg, err)
		}
	}
	return nil
}

func (r *Registrar) register(ctx context.Context, rb Rpcbind, vers uint32, table []RPCB, reg Registration) error {
	if vers == PmapVers2 {
		if reg.V6 {
			return nil // portmap v2 cannot describe IPv6
		}
		p, err := rb.GetPort(ctx, reg.Prog, reg.Vers, reg.Transport)
		switch {
		case err != nil:
			return err
		case p == reg.Port:
			return nil
		case p != 0:
			return fmt.Errorf("%w (port %d)", ErrRegisteredElsewhere, p)
		}
		ok, err := rb.SetV2(ctx, Mapping{Prog: reg.Prog, Vers: reg.Vers, Prot: reg.Transport.Proto(), Port: uint32(reg.Port)})
		if err != nil {
			return err
		}
		if !ok {
			return ErrRegistrationRefused
		}
		return nil
	}
	for _, e := range table {
		if e.Prog != reg.Prog || e.Vers != reg.Vers || e.NetID != reg.NetID() {
			continue
		}
		if ap, err := ParseUaddr(e.Addr); err == nil && ap.Port() == reg.Port {
			return nil
		}
		return fmt.Errorf("%w (%s, owner %q)", ErrRegisteredElsewhere, e.Addr, e.Owner)
	}
	owner := r.Owner
	if owner == "" {
		owner = "nlmha"
	}
	ok, err := rb.Set(ctx, vers, RPCB{Prog: reg.Prog, Vers: reg.Vers, NetID: reg.NetID(), Addr: reg.uaddr(), Owner: owner})
	if err != nil {
		return err
	}
	if !ok {
		return ErrRegistrationRefused
	}
	return nil
}

// Unregister withdraws regs, but only where rpcbind maps them to the port
// given: a mapping to any other port belongs to another process and stays.
func (r *Registrar) Unregister(ctx context.Context, regs ...Registration) error {
	c, err := r.dial(ctx)
	if err != nil {
		return fmt.Errorf("sunrpc: contacting rpcbind: %w", err)
	}
	defer c.Close()
	rb := Rpcbind{C: c}
	vers, table, err := r.version(ctx, rb)
	if err != nil {
		return fmt.Errorf("sunrpc: reading rpcbind table: %w", err)
	}
	if vers == PmapVers2 {
		return r.unregisterV2(ctx, rb, regs)
	}
	var errs []error
	for _, reg := range regs {
		for _, e := range table {
			if e.Prog != reg.Prog || e.Vers != reg.Vers || e.NetID != reg.NetID() {
				continue
			}
			if ap, err := ParseUaddr(e.Addr); err != nil || ap.Port() != reg.Port {
				continue // not ours
			}
			// UNSET with a network id removes only that network id's entry.
			if _, err := rb.Unset(ctx, vers, RPCB{Prog: reg.Prog, Vers: reg.Vers, NetID: reg.NetID()}); err != nil {
				errs = append(errs, fmt.Errorf("sunrpc: unregistering %v: %w", reg, err))
			}
		}
	}
	return errors.Join(errs...)
}

// unregisterV2 works around portmap v2 UNSET, which drops the mappings of
// every transport of a (prog, vers): any mapping that is not one of ours is
// put back right after.
func (r *Registrar) unregisterV2(ctx context.Context, rb Rpcbind, regs []Registration) error {
	type pv struct{ prog, vers uint32 }
	ours := map[pv]map[Transport]uint16{}
	for _, reg := range regs {
		if reg.V6 {
			continue
		}
		k := pv{reg.Prog, reg.Vers}
		if ours[k] == nil {
			ours[k] = map[Transport]uint16{}
		}
		ours[k][reg.Transport] = reg.Port
	}
	var errs []error
	for k, mine := range ours {
		current := map[Transport]uint16{}
		anyOurs := false
		for _, t := range []Transport{TCP, UDP} {
			p, err := rb.GetPort(ctx, k.prog, k.vers, t)
			if err != nil {
				return err
			}
			if p != 0 {
				current[t] = p
				if want, ok := mine[t]; ok && want == p {
					anyOurs = true
				}
			}
		}
		if !anyOurs {
			continue
		}
		if _, err := rb.UnsetV2(ctx, Mapping{Prog: k.prog, Vers: k.vers}); err != nil {
			errs = append(errs, err)
			continue
		}
		for t, p := range current {
			if want, ok := mine[t]; ok && want == p {
				continue
			}
			if _, err := rb.SetV2(ctx, Mapping{Prog: k.prog, Vers: k.vers, Prot: t.Proto(), Port: uint32(p)}); err != nil {
				errs = append(errs, fmt.Errorf("sunrpc: restoring %d v%d %s port %d: %w", k.prog, k.vers, t, p, err))
			}
		}
	}
	return errors.Join(errs...)
}
