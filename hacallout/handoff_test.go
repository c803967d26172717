package hacallout

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzHandoff: any bytes either fail to decode with ErrBadHandoff or decode
// to a handoff whose encoding is canonical.
func FuzzHandoff(f *testing.F) {
	for _, s := range []string{
		`{"vip":"127.0.0.2","epoch":3,"taken":"2026-11-21T10:00:00Z","files":[{"fh":"AQID","locks":[{"caller":"c","addr":"127.0.0.10","svid":7,"start":0,"end":10,"exclusive":true}]}],` +
			`"grace":{"remaining":58000000000,"early":true,"clients":[{"addr":"127.0.0.10","notified":true},{"addr":"127.0.0.11","reclaimed":true}],"started":"2026-11-21T09:59:58Z","total":3,"reclaims":1}}`,
		`{"vip":"127.0.0.2","epoch":1,"files":[]}`,
		`{"vip":"127.0.0.2","epoch":1,"files":[],"grace":{"remaining":-1,"started":"2026-11-21T09:59:58Z","total":0}}`,
		`{"vip":"127.0.0.2","epoch":1,"files":[],"grace":{"remaining":1,"clients":[{"addr":""}],"total":1}}`,
		`{"vip":"127.0.0.2","epoch":1,"files":[],"grace":{"remaining":1,"clients":[{"addr":"::1"}],"total":0}}`,
		`{"vip":"127.0.0.2","epoch":1,"files":[],"grace":null}`,
		`{"vip":"127.0.0.2","epoch":1,"files":[],"grace":7}`,
		`{}`, `null`, `[`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := unmarshalHandoff(b)
		if err != nil {
			if !errors.Is(err, ErrBadHandoff) {
				t.Fatalf("error without ErrBadHandoff: %v", err)
			}
			return
		}
		m1, err := marshalHandoff(h)
		if err != nil {
			t.Fatalf("a decoded handoff does not encode: %v", err)
		}
		h2, err := unmarshalHandoff(m1)
		if err != nil {
			t.Fatalf("an encoded handoff does not decode: %v\n%s", err, m1)
		}
		m2, _ := marshalHandoff(h2)
		if !bytes.Equal(m1, m2) {
			t.Fatalf("encoding not canonical:\n%s\n%s", m1, m2)
		}
	})
}
