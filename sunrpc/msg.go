package sunrpc

import (
	"errors"
	"fmt"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// RPCVersion is the only ONC RPC version (RFC 5531 §8).
const RPCVersion = 2

// MaxAuthBytes bounds the body of an opaque_auth (RFC 5531 §8.2).
const MaxAuthBytes = 400

// MsgType is the msg_type discriminant of an rpc_msg.
type MsgType uint32

// Message types.
const (
	MsgCall  MsgType = 0
	MsgReply MsgType = 1
)

// AuthFlavor identifies an authentication flavor.
type AuthFlavor uint32

// Authentication flavors (RFC 5531 §8.2 and the IANA registry).
const (
	AuthNone  AuthFlavor = 0
	AuthSys   AuthFlavor = 1
	AuthShort AuthFlavor = 2
	AuthDH    AuthFlavor = 3
	RPCSecGSS AuthFlavor = 6
)

func (f AuthFlavor) String() string {
	switch f {
	case AuthNone:
		return "AUTH_NONE"
	case AuthSys:
		return "AUTH_SYS"
	case AuthShort:
		return "AUTH_SHORT"
	case AuthDH:
		return "AUTH_DH"
	case RPCSecGSS:
		return "RPCSEC_GSS"
	}
	return fmt.Sprintf("flavor(%d)", uint32(f))
}

// ReplyStat is the reply_stat discriminant.
type ReplyStat uint32

// Reply statuses.
const (
	MsgAccepted ReplyStat = 0
	MsgDenied   ReplyStat = 1
)

// AcceptStat is the status of an accepted call.
type AcceptStat uint32

// Accept statuses (RFC 5531 §9).
const (
	Success      AcceptStat = 0
	ProgUnavail  AcceptStat = 1
	ProgMismatch AcceptStat = 2
	ProcUnavail  AcceptStat = 3
	GarbageArgs  AcceptStat = 4
	SystemErr    AcceptStat = 5
)

var acceptStatNames = [...]string{"SUCCESS", "PROG_UNAVAIL", "PROG_MISMATCH", "PROC_UNAVAIL", "GARBAGE_ARGS", "SYSTEM_ERR"}

func (s AcceptStat) String() string {
	if int(s) < len(acceptStatNames) {
		return acceptStatNames[s]
	}
	return fmt.Sprintf("accept_stat(%d)", uint32(s))
}

// RejectStat is the status of a denied call.
type RejectStat uint32

// Reject statuses.
const (
	RPCMismatch RejectStat = 0
	AuthError   RejectStat = 1
)

// AuthStat says why authentication failed.
type AuthStat uint32

// Authentication statuses (RFC 5531 §9).
const (
	AuthOK           AuthStat = 0
	AuthBadCred      AuthStat = 1
	AuthRejectedCred AuthStat = 2
	AuthBadVerf      AuthStat = 3
	AuthRejectedVerf AuthStat = 4
	AuthTooWeak      AuthStat = 5
	AuthInvalidResp  AuthStat = 6
	AuthFailed       AuthStat = 7
)

var authStatNames = [...]string{"AUTH_OK", "AUTH_BADCRED", "AUTH_REJECTEDCRED", "AUTH_BADVERF", "AUTH_REJECTEDVERF", "AUTH_TOOWEAK", "AUTH_INVALIDRESP", "AUTH_FAILED"}

func (s AuthStat) String() string {
	if int(s) < len(authStatNames) {
		return authStatNames[s]
	}
	return fmt.Sprintf("auth_stat(%d)", uint32(s))
}

// OpaqueAuth is an opaque_auth: a flavor and up to MaxAuthBytes of body.
type OpaqueAuth struct {
	Flavor AuthFlavor
	Body   []byte
}

// CallHeader is the header of an RPC call, up to and including the verifier.
type CallHeader struct {
	XID     uint32
	RPCVers uint32
	Prog    uint32
	Vers    uint32
	Proc    uint32
	Cred    OpaqueAuth
	Verf    OpaqueAuth
}

// Header parse errors. ParseCall's error wraps one of these, and the server
// chooses its answer from which one it is.
var (
	// ErrShortHeader: the header is cut short; nothing sensible can be replied.
	ErrShortHeader = errors.New("sunrpc: truncated message header")
	// ErrNotCall: the message is a reply (or garbage), not a call.
	ErrNotCall = errors.New("sunrpc: message is not a call")
	// ErrRPCVersion: rpcvers is not 2; answer RPC_MISMATCH.
	ErrRPCVersion = errors.New("sunrpc: unsupported RPC version")
	// ErrBadCred: the credential is malformed; answer AUTH_ERROR(AUTH_BADCRED).
	ErrBadCred = errors.New("sunrpc: malformed credential")
	// ErrBadVerf: the verifier is malformed; answer AUTH_ERROR(AUTH_BADVERF).
	ErrBadVerf = errors.New("sunrpc: malformed verifier")
)

// PeekXID returns the XID and message type of an RPC message, if it is long
// enough to carry them.
func PeekXID(msg []byte) (xid uint32, mtype MsgType, ok bool) {
	d := xdr.NewDecoder(msg)
	xid = d.Uint32()
	mtype = MsgType(d.Uint32())
	return xid, mtype, d.Err() == nil
}

// ParseCall decodes the call header at the start of msg and returns it with
// the procedure arguments that follow. On ErrRPCVersion, ErrBadCred and
// ErrBadVerf the returned header holds at least the XID, so the caller can
// reply. Body slices alias msg.
func ParseCall(msg []byte) (CallHeader, []byte, error) {
	var h CallHeader
	d := xdr.NewDecoder(msg)
	h.XID = d.Uint32()
	mtype := MsgType(d.Uint32())
	if d.Err() != nil {
		return h, nil, fmt.Errorf("%w: %w", ErrShortHeader, d.Err())
	}
	if mtype != MsgCall {
		return h, nil, fmt.Errorf("%w: msg_type %d", ErrNotCall, mtype)
	}
	h.RPCVers = d.Uint32()
	if d.Err() != nil {
		return h, nil, fmt.Errorf("%w: %w", ErrShortHeader, d.Err())
	}
	if h.RPCVers != RPCVersion {
		return h, nil, fmt.Errorf("%w: %d", ErrRPCVersion, h.RPCVers)
	}
	h.Prog = d.Uint32()
	h.Vers = d.Uint32()
	h.Proc = d.Uint32()
	if d.Err() != nil {
		return h, nil, fmt.Errorf("%w: %w", ErrShortHeader, d.Err())
	}
	var err error
	if h.Cred, err = decodeAuth(d); err != nil {
		if errors.Is(err, xdr.ErrTooLong) {
			return h, nil, fmt.Errorf("%w: %w", ErrBadCred, err)
		}
		return h, nil, fmt.Errorf("%w: credential: %w", ErrShortHeader, err)
	}
	if h.Verf, err = decodeAuth(d); err != nil {
		if errors.Is(err, xdr.ErrTooLong) {
			return h, nil, fmt.Errorf("%w: %w", ErrBadVerf, err)
		}
		return h, nil, fmt.Errorf("%w: verifier: %w", ErrShortHeader, err)
	}
	return h, d.Rest(), nil
}

func decodeAuth(d *xdr.Decoder) (OpaqueAuth, error) {
	a := OpaqueAuth{Flavor: AuthFlavor(d.Uint32())}
	a.Body = d.Opaque(MaxAuthBytes)
	return a, d.Err()
}

// AppendCall appends a call header. Auth bodies longer than MaxAuthBytes are
// the caller's bug and are encoded as given.
func AppendCall(b []byte, h *CallHeader) []byte {
	b = xdr.AppendUint32(b, h.XID)
	b = xdr.AppendUint32(b, uint32(MsgCall))
	b = xdr.AppendUint32(b, h.RPCVers)
	b = xdr.AppendUint32(b, h.Prog)
	b = xdr.AppendUint32(b, h.Vers)
	b = xdr.AppendUint32(b, h.Proc)
	b = appendAuth(b, h.Cred)
	return appendAuth(b, h.Verf)
}

func appendAuth(b []byte, a OpaqueAuth) []byte {
	b = xdr.AppendUint32(b, uint32(a.Flavor))
	return xdr.AppendOpaque(b, a.Body)
}

// appendReplyPrefix appends xid, REPLY and a reply_stat.
func appendReplyPrefix(b []byte, xid uint32, rs ReplyStat) []byte {
	b = xdr.AppendUint32(b, xid)
	b = xdr.AppendUint32(b, uint32(MsgReply))
	return xdr.AppendUint32(b, uint32(rs))
}

// AppendAcceptedReply appends an accepted reply header with an AUTH_NONE
// verifier and the given status. For Success the results follow; use
// AppendProgMismatch for ProgMismatch.
func AppendAcceptedReply(b []byte, xid uint32, stat AcceptStat) []byte {
	b = appendReplyPrefix(b, xid, MsgAccepted)
	b = appendAuth(b, OpaqueAuth{Flavor: AuthNone})
	return xdr.AppendUint32(b, uint32(stat))
}

// AppendProgMismatch appends a PROG_MISMATCH reply carrying the lowest and
// highest versions of the program that are served.
func AppendProgMismatch(b []byte, xid, low, high uint32) []byte {
	b = AppendAcceptedReply(b, xid, ProgMismatch)
	b = xdr.AppendUint32(b, low)
	return xdr.AppendUint32(b, high)
}

// AppendRPCMismatch appends an RPC_MISMATCH denial (we speak version 2 only).
func AppendRPCMismatch(b []byte, xid uint32) []byte {
	b = appendReplyPrefix(b, xid, MsgDenied)
	b = xdr.AppendUint32(b, uint32(RPCMismatch))
	b = xdr.AppendUint32(b, RPCVersion)
	return xdr.AppendUint32(b, RPCVersion)
}

// AppendAuthError appends an AUTH_ERROR denial.
func AppendAuthError(b []byte, xid uint32, stat AuthStat) []byte {
	b = appendReplyPrefix(b, xid, MsgDenied)
	b = xdr.AppendUint32(b, uint32(AuthError))
	return xdr.AppendUint32(b, uint32(stat))
}

// ReplyHeader is a decoded reply header. Which fields are meaningful depends
// on Stat, AcceptStat and RejectStat.
type ReplyHeader struct {
	XID        uint32
	Stat       ReplyStat
	Verf       OpaqueAuth
	AcceptStat AcceptStat // Stat == MsgAccepted
	RejectStat RejectStat // Stat == MsgDenied
	AuthStat   AuthStat   // RejectStat == AuthError
	Low, High  uint32     // ProgMismatch or RPCMismatch
}

// Err converts a non-successful reply into an *Error (nil for SUCCESS).
func (h *ReplyHeader) Err() error {
	if h.Stat == MsgAccepted && h.AcceptStat == Success {
		return nil
	}
	return &Error{Reply: *h}
}

// ErrBadReply is wrapped by ParseReply errors.
var ErrBadReply = errors.New("sunrpc: malformed reply")

// ParseReply decodes a reply header and returns the results that follow
// (meaningful for an accepted SUCCESS reply only).
func ParseReply(msg []byte) (ReplyHeader, []byte, error) {
	var h ReplyHeader
	d := xdr.NewDecoder(msg)
	h.XID = d.Uint32()
	if MsgType(d.Uint32()) != MsgReply && d.Err() == nil {
		return h, nil, fmt.Errorf("%w: not a reply", ErrBadReply)
	}
	h.Stat = ReplyStat(d.Uint32())
	switch h.Stat {
	case MsgAccepted:
		h.Verf, _ = decodeAuth(d)
		h.AcceptStat = AcceptStat(d.Uint32())
		if h.AcceptStat == ProgMismatch {
			h.Low, h.High = d.Uint32(), d.Uint32()
		}
	case MsgDenied:
		h.RejectStat = RejectStat(d.Uint32())
		switch h.RejectStat {
		case RPCMismatch:
			h.Low, h.High = d.Uint32(), d.Uint32()
		case AuthError:
			h.AuthStat = AuthStat(d.Uint32())
		default:
			d.Fail(fmt.Errorf("%w: reject_stat %d", xdr.ErrBadEnum, h.RejectStat))
		}
	default:
		d.Fail(fmt.Errorf("%w: reply_stat %d", xdr.ErrBadEnum, h.Stat))
	}
	if err := d.Err(); err != nil {
		return h, nil, fmt.Errorf("%w: %w", ErrBadReply, err)
	}
	return h, d.Rest(), nil
}

// Error is an RPC-level failure reported by a peer: a non-SUCCESS accepted
// reply or a denied reply. errors.Is matches it against the Err* sentinels
// below.
type Error struct {
	Reply ReplyHeader
}

// Sentinels for errors.Is on an *Error.
var (
	ErrProgUnavail  = errors.New("sunrpc: program unavailable")
	ErrProgMismatch = errors.New("sunrpc: program version mismatch")
	ErrProcUnavail  = errors.New("sunrpc: procedure unavailable")
	ErrGarbageArgs  = errors.New("sunrpc: garbage arguments")
	ErrSystemErr    = errors.New("sunrpc: system error")
	ErrRPCMismatch  = errors.New("sunrpc: RPC version mismatch")
	ErrAuth         = errors.New("sunrpc: authentication error")
)

func (e *Error) sentinel() error {
	h := &e.Reply
	if h.Stat == MsgDenied {
		if h.RejectStat == RPCMismatch {
			return ErrRPCMismatch
		}
		return ErrAuth
	}
	switch h.AcceptStat {
	case ProgUnavail:
		return ErrProgUnavail
	case ProgMismatch:
		return ErrProgMismatch
	case ProcUnavail:
		return ErrProcUnavail
	case GarbageArgs:
		return ErrGarbageArgs
	}
	return ErrSystemErr
}

func (e *Error) Error() string {
	h := &e.Reply
	switch {
	case h.Stat == MsgDenied && h.RejectStat == RPCMismatch:
		return fmt.Sprintf("sunrpc: RPC_MISMATCH (peer speaks %d..%d)", h.Low, h.High)
	case h.Stat == MsgDenied:
		return fmt.Sprintf("sunrpc: AUTH_ERROR %v", h.AuthStat)
	case h.AcceptStat == ProgMismatch:
		return fmt.Sprintf("sunrpc: PROG_MISMATCH (peer serves versions %d..%d)", h.Low, h.High)
	}
	return "sunrpc: " + h.AcceptStat.String()
}

// Is lets errors.Is(err, ErrProcUnavail) and friends work.
func (e *Error) Is(target error) bool { return target == e.sentinel() }
