package sunrpc

import (
	"fmt"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// AUTH_SYS limits (RFC 5531 appendix A).
const (
	MaxMachineName = 255
	MaxAuthSysGIDs = 16
)

// AuthSysCred is a decoded AUTH_SYS (AUTH_UNIX) credential.
type AuthSysCred struct {
	Stamp       uint32
	MachineName string
	UID         uint32
	GID         uint32
	GIDs        []uint32
}

// ParseAuthSys decodes an AUTH_SYS credential body. The body must hold
// exactly one credential: trailing bytes mean the sender and we disagree on
// the layout, and that is reported rather than guessed at.
func ParseAuthSys(body []byte) (AuthSysCred, error) {
	var c AuthSysCred
	d := xdr.NewDecoder(body)
	c.Stamp = d.Uint32()
	c.MachineName = d.String(MaxMachineName)
	c.UID = d.Uint32()
	c.GID = d.Uint32()
	n := d.Uint32()
	if d.Err() == nil && n > MaxAuthSysGIDs {
		d.Fail(fmt.Errorf("%w: %d gids, maximum %d", xdr.ErrTooLong, n, MaxAuthSysGIDs))
	}
	if d.Err() == nil && int(n)*4 > d.Len() {
		d.Fail(fmt.Errorf("%w: %d gids in %d bytes", xdr.ErrShort, n, d.Len()))
	}
	if d.Err() == nil && n > 0 {
		c.GIDs = make([]uint32, n)
		for i := range c.GIDs {
			c.GIDs[i] = d.Uint32()
		}
	}
	if err := d.Err(); err != nil {
		return AuthSysCred{}, fmt.Errorf("%w: AUTH_SYS: %w", ErrBadCred, err)
	}
	if d.Len() != 0 {
		return AuthSysCred{}, fmt.Errorf("%w: AUTH_SYS: %d trailing bytes", ErrBadCred, d.Len())
	}
	return c, nil
}

// AppendAuthSys appends the XDR body of an AUTH_SYS credential.
func AppendAuthSys(b []byte, c *AuthSysCred) []byte {
	b = xdr.AppendUint32(b, c.Stamp)
	b = xdr.AppendString(b, c.MachineName)
	b = xdr.AppendUint32(b, c.UID)
	b = xdr.AppendUint32(b, c.GID)
	b = xdr.AppendUint32(b, uint32(len(c.GIDs)))
	for _, g := range c.GIDs {
		b = xdr.AppendUint32(b, g)
	}
	return b
}

// NewAuthSys returns an opaque_auth carrying c.
func NewAuthSys(c *AuthSysCred) OpaqueAuth {
	return OpaqueAuth{Flavor: AuthSys, Body: AppendAuthSys(nil, c)}
}

// validAuthSys reports whether body is exactly one well-formed AUTH_SYS
// credential, without allocating: the server checks every credential but
// parses one only for a handler that asks (Request.AuthSys).
func validAuthSys(body []byte) bool {
	d := xdr.NewDecoder(body)
	d.Uint32() // stamp
	d.Opaque(MaxMachineName)
	d.Uint32() // uid
	d.Uint32() // gid
	n := d.Uint32()
	if d.Err() != nil || n > MaxAuthSysGIDs {
		return false
	}
	return d.Len() == int(n)*4
}

// checkAuth validates the credential and verifier of a call the way the
// server accepts them: AUTH_NONE (empty body) or AUTH_SYS, with an AUTH_NONE
// verifier. It returns the auth_stat to deny the call with, or AuthOK.
func checkAuth(h *CallHeader) AuthStat {
	switch h.Cred.Flavor {
	case AuthNone:
		if len(h.Cred.Body) != 0 {
			return AuthBadCred
		}
	case AuthSys:
		if !validAuthSys(h.Cred.Body) {
			return AuthBadCred
		}
	case AuthShort:
		// We never hand out short-hand verifiers, so one cannot be valid;
		// REJECTEDCRED tells the client to fall back to full credentials.
		return AuthRejectedCred
	default:
		// Like Linux's svc_authenticate: a flavor we do not serve is a bad
		// credential.
		return AuthBadCred
	}
	if h.Verf.Flavor != AuthNone {
		return AuthBadVerf
	}
	return AuthOK
}
