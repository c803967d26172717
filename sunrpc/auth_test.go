package sunrpc

import (
	"errors"
	"strings"
	"testing"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

func TestAuthSysRoundTrip(t *testing.T) {
	c := AuthSysCred{Stamp: 99, MachineName: "host.example", UID: 1000, GID: 100, GIDs: []uint32{4, 24, 27}}
	back, err := ParseAuthSys(AppendAuthSys(nil, &c))
	if err != nil {
		t.Fatal(err)
	}
	if back.Stamp != 99 || back.MachineName != "host.example" || back.UID != 1000 || back.GID != 100 || len(back.GIDs) != 3 || back.GIDs[2] != 27 {
		t.Fatalf("round trip: %+v", back)
	}
}

func TestParseAuthSysLimits(t *testing.T) {
	gids := func(n int) []uint32 { return make([]uint32, n) }
	tests := []struct {
		name string
		body []byte
		ok   bool
	}{
		{"machinename 255", AppendAuthSys(nil, &AuthSysCred{MachineName: strings.Repeat("m", 255)}), true},
		{"machinename 256", AppendAuthSys(nil, &AuthSysCred{MachineName: strings.Repeat("m", 256)}), false},
		{"16 gids", AppendAuthSys(nil, &AuthSysCred{GIDs: gids(16)}), true},
		{"17 gids", AppendAuthSys(nil, &AuthSysCred{GIDs: gids(17)}), false},
		{"gid count beyond body", xdr.AppendUint32(AppendAuthSys(nil, &AuthSysCred{})[:16], 3), false},
		{"empty", nil, false},
		{"trailing bytes", append(AppendAuthSys(nil, &AuthSysCred{}), 0, 0, 0, 0), false},
		{"truncated", AppendAuthSys(nil, &AuthSysCred{MachineName: "abc"})[:10], false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseAuthSys(tt.body)
			if tt.ok != (err == nil) {
				t.Fatalf("err = %v, want ok=%v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrBadCred) {
				t.Fatalf("err %v does not wrap ErrBadCred", err)
			}
		})
	}
}

func TestCheckAuth(t *testing.T) {
	sys := NewAuthSys(&AuthSysCred{MachineName: "c", GIDs: []uint32{1}})
	none := OpaqueAuth{Flavor: AuthNone}
	tests := []struct {
		name       string
		cred, verf OpaqueAuth
		want       AuthStat
		sys        bool
	}{
		{"none", none, none, AuthOK, false},
		{"none with body", OpaqueAuth{Flavor: AuthNone, Body: []byte{1, 2, 3, 4}}, none, AuthBadCred, false},
		{"sys", sys, none, AuthOK, true},
		{"sys bad body", OpaqueAuth{Flavor: AuthSys, Body: []byte{0, 0, 0, 1}}, none, AuthBadCred, false},
		{"sys trailing bytes", OpaqueAuth{Flavor: AuthSys, Body: append(append([]byte{}, sys.Body...), 0, 0, 0, 0)}, none, AuthBadCred, false},
		{"sys with sys verifier", sys, sys, AuthBadVerf, true}, // the call is denied; the credential itself parses
		{"none with dh verifier", none, OpaqueAuth{Flavor: AuthDH}, AuthBadVerf, false},
		{"short", OpaqueAuth{Flavor: AuthShort, Body: []byte{1, 2, 3, 4}}, none, AuthRejectedCred, false},
		{"dh", OpaqueAuth{Flavor: AuthDH}, none, AuthBadCred, false},
		{"gss", OpaqueAuth{Flavor: RPCSecGSS}, none, AuthBadCred, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := CallHeader{Cred: tt.cred, Verf: tt.verf}
			if stat := checkAuth(&h); stat != tt.want {
				t.Fatalf("checkAuth = %v; want %v", stat, tt.want)
			}
			req := Request{Cred: tt.cred}
			if c, ok := req.AuthSys(); ok != tt.sys || (ok && string(c.MachineName) != "c") {
				t.Fatalf("AuthSys() = %v, %v; want sys=%v", c, ok, tt.sys)
			}
		})
	}
}
