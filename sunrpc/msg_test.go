package sunrpc

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

func hexBytes(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sampleCall() CallHeader {
	return CallHeader{
		XID: 0x01020304, RPCVers: 2, Prog: 100021, Vers: 4, Proc: 2,
		Cred: NewAuthSys(&AuthSysCred{Stamp: 7, MachineName: "client", UID: 0, GID: 0, GIDs: []uint32{0, 4}}),
		Verf: OpaqueAuth{Flavor: AuthNone},
	}
}

func TestCallHeaderGolden(t *testing.T) {
	h := sampleCall()
	got := AppendCall(nil, &h)
	want := hexBytes(t, `
		01020304 00000000 00000002 000186b5 00000004 00000002
		00000001 00000024
		  00000007 00000006 636c6965 6e740000 00000000 00000000 00000002 00000000 00000004
		00000000 00000000`)
	if !bytes.Equal(got, want) {
		t.Fatalf("AppendCall:\n got %x\nwant %x", got, want)
	}
	msg := append(got, 0xaa, 0xbb, 0xcc, 0xdd)
	back, args, err := ParseCall(msg)
	if err != nil {
		t.Fatal(err)
	}
	if back.XID != h.XID || back.Prog != h.Prog || back.Vers != h.Vers || back.Proc != h.Proc ||
		back.Cred.Flavor != AuthSys || !bytes.Equal(back.Cred.Body, h.Cred.Body) || back.Verf.Flavor != AuthNone {
		t.Fatalf("round trip: %+v", back)
	}
	if !bytes.Equal(args, []byte{0xaa, 0xbb, 0xcc, 0xdd}) {
		t.Fatalf("args = %x", args)
	}
}

func TestParseCallErrors(t *testing.T) {
	h := sampleCall()
	good := AppendCall(nil, &h)

	// Every truncation of a good header is a short header, never a panic.
	for n := 0; n < len(good); n++ {
		_, _, err := ParseCall(good[:n])
		if !errors.Is(err, ErrShortHeader) {
			t.Fatalf("truncated to %d bytes: err = %v, want ErrShortHeader", n, err)
		}
	}

	withWord := func(idx int, v uint32) []byte {
		b := bytes.Clone(good)
		copy(b[idx*4:], xdr.AppendUint32(nil, v))
		return b
	}
	tests := []struct {
		name    string
		msg     []byte
		want    error
		wantXID bool
	}{
		{"reply not call", withWord(1, 1), ErrNotCall, false},
		{"msg type 7", withWord(1, 7), ErrNotCall, false},
		{"rpc version 3", withWord(2, 3), ErrRPCVersion, true},
		{"rpc version 1, rest missing", withWord(2, 1)[:12], ErrRPCVersion, true},
		{"credential missing", AppendCall(nil, &CallHeader{XID: 9, RPCVers: 2})[:24], ErrShortHeader, false},
		{"credential length 401", append(xdr.AppendUint32(bytes.Clone(good[:24]), 1), xdr.AppendUint32(nil, 401)...), ErrBadCred, true},
		{"verifier length 401", func() []byte {
			b := AppendCall(nil, &CallHeader{XID: 0x01020304, RPCVers: 2})[:32]
			b = xdr.AppendUint32(b, 0)
			return xdr.AppendUint32(b, 401)
		}(), ErrBadVerf, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := ParseCall(tt.msg)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if tt.wantXID && got.XID != 0x01020304 && got.XID != 9 {
				t.Fatalf("XID not kept for the reply: %x", got.XID)
			}
		})
	}
}

func TestReplyGolden(t *testing.T) {
	tests := []struct {
		name string
		enc  []byte
		want string
		stat ReplyHeader
		is   error
	}{
		{"success", AppendAcceptedReply(nil, 5, Success), "00000005 00000001 00000000 00000000 00000000 00000000",
			ReplyHeader{XID: 5, Stat: MsgAccepted, AcceptStat: Success}, nil},
		{"prog unavail", AppendAcceptedReply(nil, 5, ProgUnavail), "00000005 00000001 00000000 00000000 00000000 00000001",
			ReplyHeader{XID: 5, AcceptStat: ProgUnavail}, ErrProgUnavail},
		{"prog mismatch", AppendProgMismatch(nil, 5, 1, 4), "00000005 00000001 00000000 00000000 00000000 00000002 00000001 00000004",
			ReplyHeader{XID: 5, AcceptStat: ProgMismatch, Low: 1, High: 4}, ErrProgMismatch},
		{"proc unavail", AppendAcceptedReply(nil, 5, ProcUnavail), "00000005 00000001 00000000 00000000 00000000 00000003",
			ReplyHeader{XID: 5, AcceptStat: ProcUnavail}, ErrProcUnavail},
		{"garbage args", AppendAcceptedReply(nil, 5, GarbageArgs), "00000005 00000001 00000000 00000000 00000000 00000004",
			ReplyHeader{XID: 5, AcceptStat: GarbageArgs}, ErrGarbageArgs},
		{"system err", AppendAcceptedReply(nil, 5, SystemErr), "00000005 00000001 00000000 00000000 00000000 00000005",
			ReplyHeader{XID: 5, AcceptStat: SystemErr}, ErrSystemErr},
		{"rpc mismatch", AppendRPCMismatch(nil, 5), "00000005 00000001 00000001 00000000 00000002 00000002",
			ReplyHeader{XID: 5, Stat: MsgDenied, RejectStat: RPCMismatch, Low: 2, High: 2}, ErrRPCMismatch},
		{"auth error", AppendAuthError(nil, 5, AuthTooWeak), "00000005 00000001 00000001 00000001 00000005",
			ReplyHeader{XID: 5, Stat: MsgDenied, RejectStat: AuthError, AuthStat: AuthTooWeak}, ErrAuth},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if want := hexBytes(t, tt.want); !bytes.Equal(tt.enc, want) {
				t.Fatalf("encoding:\n got %x\nwant %x", tt.enc, want)
			}
			h, rest, err := ParseReply(append(bytes.Clone(tt.enc), 1, 2, 3, 4))
			if err != nil {
				t.Fatal(err)
			}
			h.Verf = OpaqueAuth{}
			if !reflect.DeepEqual(h, tt.stat) {
				t.Fatalf("parsed %+v, want %+v", h, tt.stat)
			}
			if !bytes.Equal(rest, []byte{1, 2, 3, 4}) {
				t.Fatalf("rest = %x", rest)
			}
			rerr := h.Err()
			if tt.is == nil {
				if rerr != nil {
					t.Fatalf("Err() = %v for success", rerr)
				}
				return
			}
			if !errors.Is(rerr, tt.is) {
				t.Fatalf("Err() = %v, not %v", rerr, tt.is)
			}
			if errors.Is(rerr, ErrSystemErr) && tt.is != ErrSystemErr {
				t.Fatalf("Err() %v matches ErrSystemErr too", rerr)
			}
		})
	}
}

func TestParseReplyErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		msg  []byte
	}{
		{"empty", nil},
		{"call not reply", AppendCall(nil, &CallHeader{XID: 1, RPCVers: 2})},
		{"bad reply_stat", hexBytes(t, "00000001 00000001 00000002")},
		{"bad reject_stat", hexBytes(t, "00000001 00000001 00000001 00000009")},
		{"truncated accepted", AppendAcceptedReply(nil, 5, Success)[:16]},
		{"truncated mismatch", AppendProgMismatch(nil, 5, 1, 4)[:28]},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := ParseReply(tt.msg); !errors.Is(err, ErrBadReply) {
				t.Fatalf("err = %v, want ErrBadReply", err)
			}
		})
	}
}

func TestPeekXID(t *testing.T) {
	if _, _, ok := PeekXID([]byte{1, 2, 3, 4, 5, 6, 7}); ok {
		t.Fatal("7 bytes cannot hold xid and type")
	}
	xid, mt, ok := PeekXID(AppendAcceptedReply(nil, 77, Success))
	if !ok || xid != 77 || mt != MsgReply {
		t.Fatalf("got %d %d %v", xid, mt, ok)
	}
}

func TestStatusStrings(t *testing.T) {
	if GarbageArgs.String() != "GARBAGE_ARGS" || AcceptStat(42).String() != "accept_stat(42)" {
		t.Error("AcceptStat strings")
	}
	if AuthTooWeak.String() != "AUTH_TOOWEAK" || AuthStat(99).String() != "auth_stat(99)" {
		t.Error("AuthStat strings")
	}
	if AuthSys.String() != "AUTH_SYS" || AuthFlavor(9).String() != "flavor(9)" {
		t.Error("AuthFlavor strings")
	}
}
