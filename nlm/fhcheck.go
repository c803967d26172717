package nlm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// NFS version 3 constants for GETATTR.
const (
	nfsProg          = 100003
	nfsVers3         = 3
	nfsProcGetattr   = 1
	nfs3FHSize       = 64
	nfs3ErrStale     = 70
	nfs3ErrBadHandle = 10001
)

// NFSValidator checks NLM file handles with the NFS server that issued
// them: a GETATTR answered NFS3ERR_STALE or NFS3ERR_BADHANDLE makes the
// lock request NLM4_STALE_FH, as Linux lockd and Ganesha answer for a
// handle they cannot resolve. Answers are cached; when the NFS server
// cannot be asked, requests go ahead (locking must not depend on it).
type NFSValidator struct {
	// Addr is the NFS server; with port 0 the port is asked of its rpcbind.
	Addr netip.AddrPort
	// TTL [5m] keeps a valid handle; StaleTTL [10s] a stale one.
	TTL, StaleTTL time.Duration
	// MaxEntries [65536] bounds the cache.
	MaxEntries int
	// Timeout [2s] bounds one GETATTR.
	Timeout time.Duration

	mu     sync.Mutex
	client *sunrpc.Client
	cache  map[string]fhEntry
}

type fhEntry struct {
	valid   bool
	expires time.Time
}

var errNFSUnavailable = errors.New("nlm: NFS server unavailable for handle checks")

// Valid implements FHValidator.
func (v *NFSValidator) Valid(ctx context.Context, fh []byte) (bool, error) {
	if len(fh) == 0 || len(fh) > nfs3FHSize {
		return false, nil // cannot be an NFSv3 handle
	}
	now := time.Now()
	v.mu.Lock()
	e, ok := v.cache[string(fh)]
	v.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.valid, nil
	}
	valid, err := v.getattr(ctx, fh)
	if err != nil {
		return false, err
	}
	ttl := orDur(v.TTL, 5*time.Minute)
	if !valid {
		ttl = orDur(v.StaleTTL, 10*time.Second)
	}
	v.mu.Lock()
	if v.cache == nil {
		v.cache = map[string]fhEntry{}
	}
	limit := v.MaxEntries
	if limit <= 0 {
		limit = 65536
	}
	for k := range v.cache { // full: forget an arbitrary tenth
		if len(v.cache) < limit {
			break
		}
		delete(v.cache, k)
		if len(v.cache) <= limit*9/10 {
			break
		}
	}
	v.cache[string(fh)] = fhEntry{valid: valid, expires: now.Add(ttl)}
	v.mu.Unlock()
	return valid, nil
}

func orDur(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

func (v *NFSValidator) getattr(ctx context.Context, fh []byte) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, orDur(v.Timeout, 2*time.Second))
	defer cancel()
	c, err := v.dial(ctx)
	if err != nil {
		return false, err
	}
	res, err := c.Call(ctx, nfsProg, nfsVers3, nfsProcGetattr, xdr.AppendOpaque(nil, fh))
	if err != nil {
		return false, fmt.Errorf("%w: GETATTR: %w", errNFSUnavailable, err)
	}
	st := xdr.NewDecoder(res).Uint32()
	return st != nfs3ErrStale && st != nfs3ErrBadHandle, nil
}

func (v *NFSValidator) dial(ctx context.Context) (*sunrpc.Client, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.client != nil {
		return v.client, nil
	}
	addr := v.Addr
	if addr.Port() == 0 {
		p, err := sunrpc.LookupPort(ctx, addr.Addr(), netip.Addr{}, nfsProg, nfsVers3, sunrpc.TCP, sunrpc.ClientOptions{Retransmit: 200 * time.Millisecond})
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errNFSUnavailable, err)
		}
		addr = netip.AddrPortFrom(addr.Addr(), p)
	}
	c, err := sunrpc.Dial(ctx, sunrpc.TCP, addr, sunrpc.ClientOptions{
		Cred: sunrpc.NewAuthSys(&sunrpc.AuthSysCred{MachineName: "nlmd"}),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errNFSUnavailable, err)
	}
	v.client = c
	return c, nil
}

// Close releases the connection to the NFS server.
func (v *NFSValidator) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.client != nil {
		v.client.Close()
		v.client = nil
	}
	return nil
}
