package sunrpc

import (
	"bytes"
	"context"
	"net/netip"
	"reflect"
	"testing"
)

// Seeds live in testdata/fuzz/<FuzzName>/ as well; the f.Add calls keep the
// most telling ones next to the code.

func FuzzRecordReader(f *testing.F) {
	f.Add(frag([]byte("hello"), true), uint16(64))
	f.Add(append(frag([]byte("ab"), false), frag([]byte("cd"), true)...), uint16(4))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, uint16(100))
	f.Fuzz(func(t *testing.T, stream []byte, max uint16) {
		rr := RecordReader{R: bytes.NewReader(stream), MaxSize: int(max), MaxFragments: 8}
		total := 0
		for {
			rec, err := rr.Next(nil)
			if err != nil {
				break
			}
			if len(rec) > int(max) {
				t.Fatalf("record of %d bytes, max %d", len(rec), max)
			}
			total += len(rec) + 4
			if total > len(stream) {
				t.Fatalf("read %d bytes of records from %d bytes of stream", total, len(stream))
			}
			// A record re-framed as one fragment reads back unchanged.
			again, err := (&RecordReader{R: bytes.NewReader(frag(rec, true)), MaxSize: int(max)}).Next(nil)
			if err != nil || !bytes.Equal(again, rec) {
				t.Fatalf("re-framed record: %v", err)
			}
		}
	})
}

func FuzzParseCall(f *testing.F) {
	h := sampleCall()
	f.Add(append(AppendCall(nil, &h), 1, 2, 3, 4))
	f.Add(AppendCall(nil, &CallHeader{XID: 1, RPCVers: 2, Prog: 100000, Vers: 2, Proc: 0}))
	f.Add(AppendCall(nil, &CallHeader{XID: 1, RPCVers: 3}))
	f.Fuzz(func(t *testing.T, msg []byte) {
		h, args, err := ParseCall(msg)
		if err != nil {
			return
		}
		checkAuth(&h) // must not panic either
		again, args2, err := ParseCall(append(AppendCall(nil, &h), args...))
		if err != nil {
			t.Fatalf("re-encoded header does not parse: %v", err)
		}
		if !reflect.DeepEqual(normAuth(h), normAuth(again)) || !bytes.Equal(args, args2) {
			t.Fatalf("round trip changed the header:\n%+v\n%+v", h, again)
		}
	})
}

// normAuth makes empty and nil auth bodies compare equal.
func normAuth(h CallHeader) CallHeader {
	if len(h.Cred.Body) == 0 {
		h.Cred.Body = nil
	}
	if len(h.Verf.Body) == 0 {
		h.Verf.Body = nil
	}
	return h
}

func FuzzParseAuthSys(f *testing.F) {
	f.Add(AppendAuthSys(nil, &AuthSysCred{Stamp: 1, MachineName: "client", UID: 0, GID: 0, GIDs: []uint32{0, 1}}))
	f.Add(AppendAuthSys(nil, &AuthSysCred{GIDs: make([]uint32, 16)}))
	f.Fuzz(func(t *testing.T, body []byte) {
		c, err := ParseAuthSys(body)
		if err != nil {
			return
		}
		if len(c.MachineName) > MaxMachineName || len(c.GIDs) > MaxAuthSysGIDs {
			t.Fatalf("limits not enforced: %d-byte name, %d gids", len(c.MachineName), len(c.GIDs))
		}
		back, err := ParseAuthSys(AppendAuthSys(nil, &c))
		if err != nil || !reflect.DeepEqual(back, c) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, c, back)
		}
	})
}

func FuzzParseReply(f *testing.F) {
	f.Add(AppendAcceptedReply(nil, 1, Success))
	f.Add(AppendProgMismatch(nil, 1, 1, 4))
	f.Add(AppendAuthError(nil, 1, AuthBadCred))
	f.Add(AppendRPCMismatch(nil, 1))
	f.Fuzz(func(t *testing.T, msg []byte) {
		h, _, err := ParseReply(msg)
		if err != nil {
			return
		}
		_ = h.Err() // must classify any parsed reply without panicking
	})
}

func FuzzParseUaddr(f *testing.F) {
	f.Add("127.0.0.1.0.111")
	f.Add("::1.3.0")
	f.Add("0.0.0.0.255.255")
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := ParseUaddr(s)
		if err != nil {
			return
		}
		back, err := ParseUaddr(FormatUaddr(ap))
		if err != nil || back != ap {
			t.Fatalf("%q -> %v -> %q -> %v (%v)", s, ap, FormatUaddr(ap), back, err)
		}
	})
}

// FuzzDispatch runs arbitrary messages through the whole server path
// (header, auth, program lookup, handler): whatever comes in, the server
// either answers with a well-formed reply to the same XID or drops it.
func FuzzDispatch(f *testing.F) {
	h := CallHeader{XID: 7, RPCVers: 2, Prog: testProg, Vers: 1, Proc: procEcho}
	f.Add(AppendCall(nil, &h))
	h.Proc = procUint
	f.Add(append(AppendCall(nil, &h), 0, 0, 0, 1))
	h.Vers = 9
	f.Add(AppendCall(nil, &h))
	f.Add(AppendCall(nil, &CallHeader{XID: 7, RPCVers: 2, Prog: testProg, Vers: 1, Cred: OpaqueAuth{Flavor: AuthSys, Body: []byte{1}}}))
	s := newTestServer()
	f.Fuzz(func(t *testing.T, msg []byte) {
		req := &Request{Transport: UDP, Local: netip.MustParseAddrPort("127.0.0.2:1"), Remote: netip.MustParseAddrPort("127.0.0.9:2")}
		out, act := s.dispatch(context.Background(), req, msg, nil)
		if act != actReply {
			return
		}
		rh, _, err := ParseReply(out)
		if err != nil {
			t.Fatalf("server sent a malformed reply %x: %v", out, err)
		}
		if xid, _, _ := PeekXID(msg); rh.XID != xid {
			t.Fatalf("reply XID %d for call XID %d", rh.XID, xid)
		}
	})
}
