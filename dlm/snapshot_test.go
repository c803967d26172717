package dlm

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzSnapshot: any bytes either fail to decode with ErrBadSnapshot or
// decode to a snapshot whose encoding is canonical (decoding and encoding
// it again gives the same bytes).
func FuzzSnapshot(f *testing.F) {
	for _, s := range []string{
		`{"vip":"127.0.0.2","epoch":3,"taken":"2026-11-21T10:00:00Z","files":[{"fh":"AQID","locks":[{"caller":"c","addr":"127.0.0.10","svid":7,"oh":"b2g=","start":0,"end":10,"exclusive":true,"since":5}],"waiters":[{"caller":"d","addr":"127.0.0.11","svid":1,"start":5,"end":6,"exclusive":true,"vers":4,"transport":1,"async":true}],"shares":[{"caller":"e","addr":"::1","oh":"eA==","mode":1,"access":3}]}]}`,
		`{"vip":"::ffff:127.0.0.2","epoch":1,"files":[]}`,
		`{"vip":"127.0.0.2","files":[{"fh":""}]}`,
		`{"vip":"127.0.0.2","files":[{"fh":"AQ==","locks":[{"addr":"127.0.0.1","start":9,"end":9}]}]}`,
		`{}`, `null`, `[`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := UnmarshalSnapshot(b)
		if err != nil {
			if !errors.Is(err, ErrBadSnapshot) {
				t.Fatalf("error without ErrBadSnapshot: %v", err)
			}
			return
		}
		m1, err := MarshalSnapshot(s)
		if err != nil {
			t.Fatalf("a decoded snapshot does not encode: %v", err)
		}
		s2, err := UnmarshalSnapshot(m1)
		if err != nil {
			t.Fatalf("an encoded snapshot does not decode: %v\n%s", err, m1)
		}
		m2, _ := MarshalSnapshot(s2)
		if !bytes.Equal(m1, m2) {
			t.Fatalf("encoding not canonical:\n%s\n%s", m1, m2)
		}
	})
}
