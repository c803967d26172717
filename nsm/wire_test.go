package nsm

import (
	"bytes"
	"encoding/hex"
	"reflect"
	"strings"
	"testing"

	rxdr "github.com/rasky/go-xdr/xdr2"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sampleMon() Mon {
	m := Mon{MonID: MonID{MonName: "client1", MyID: MyID{MyName: "vip", Prog: 100021, Vers: 4, Proc: 16}}}
	copy(m.Priv[:], "0123456789abcdef")
	return m
}

// The encodings the Linux kernel and rpc.statd put on the wire (sm_inter.x).
func TestGolden(t *testing.T) {
	m := sampleMon()
	want := unhex(t, `
		00000007 636c6965 6e743100
		00000003 76697000
		000186b5 00000004 00000010
		30313233 34353637 38396162 63646566`)
	if got := m.Append(nil); !bytes.Equal(got, want) {
		t.Fatalf("mon:\n got %x\nwant %x", got, want)
	}
	var back Mon
	d := xdr.NewDecoder(want)
	back.Decode(d)
	if d.Err() != nil || d.Len() != 0 || back != m {
		t.Fatalf("mon round trip: %+v %v", back, d.Err())
	}
	c := StatChge{MonName: "10.0.0.1", State: 7}
	if got, want := c.Append(nil), unhex(t, "00000008 31302e30 2e302e31 00000007"); !bytes.Equal(got, want) {
		t.Fatalf("stat_chge: %x", got)
	}
	r := StatRes{Res: StatFail, State: 3}
	if got, want := r.Append(nil), unhex(t, "00000001 00000003"); !bytes.Equal(got, want) {
		t.Fatalf("sm_stat_res: %x", got)
	}
	s := Status{MonName: "h", State: -1, Priv: m.Priv}
	if got, want := s.Append(nil), unhex(t, "00000001 68000000 ffffffff 30313233 34353637 38396162 63646566"); !bytes.Equal(got, want) {
		t.Fatalf("status: %x", got)
	}
}

func TestDecodeLimits(t *testing.T) {
	long := MonID{MonName: strings.Repeat("x", MaxStrLen+1)}
	var m MonID
	d := xdr.NewDecoder(long.Append(nil))
	m.Decode(d)
	if d.Err() == nil {
		t.Fatal("a mon_name over SM_MAXSTRLEN decoded")
	}
	var mon Mon
	sm := sampleMon()
	d = xdr.NewDecoder(sm.Append(nil)[:40])
	mon.Decode(d)
	if d.Err() == nil {
		t.Fatal("a truncated mon decoded")
	}
}

// ---- differential fuzzing against rasky/go-xdr ----------------------------

type rMyID struct {
	MyName           string
	Prog, Vers, Proc uint32
}

type rMonID struct {
	MonName string
	MyID    rMyID
}

type rMon struct {
	MonID rMonID
	Priv  [16]byte
}

type rStatRes struct {
	Res   uint32
	State int32
}

type rStatChge struct {
	MonName string
	State   int32
}

type rStatus struct {
	MonName string
	State   int32
	Priv    [16]byte
}

// differential decodes b with ours and with rasky (UnmarshalLimited:
// 1024 = SM_MAXSTRLEN); they must agree on validity, on the value, and our
// encoding must be rasky's.
func differential[T any, R any](t *testing.T, b []byte, ours func(d *xdr.Decoder) T, enc func(T) []byte, conv func(R) T) {
	d := xdr.NewDecoder(b)
	got := ours(d)
	var r R
	_, rerr := rxdr.UnmarshalLimited(bytes.NewReader(b), &r, MaxStrLen)
	if (d.Err() == nil) != (rerr == nil) {
		t.Fatalf("validity differs on %x: ours %v, rasky %v", b, d.Err(), rerr)
	}
	if rerr != nil {
		return
	}
	if want := conv(r); !reflect.DeepEqual(got, want) {
		t.Fatalf("decoded values differ on %x:\nours  %+v\nrasky %+v", b, got, want)
	}
	var buf bytes.Buffer
	if _, err := rxdr.Marshal(&buf, &r); err != nil {
		t.Fatal(err)
	}
	if e := enc(got); !bytes.Equal(e, buf.Bytes()) {
		t.Fatalf("encodings differ:\nours  %x\nrasky %x", e, buf.Bytes())
	}
}

func myID(r rMyID) MyID { return MyID(r) }

func FuzzMon(f *testing.F) {
	sm := sampleMon()
	f.Add(sm.Append(nil))
	f.Add([]byte{0, 0, 0, 1, 'a', 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (m Mon) { m.Decode(d); return },
			func(m Mon) []byte { return m.Append(nil) },
			func(r rMon) Mon {
				return Mon{MonID: MonID{MonName: r.MonID.MonName, MyID: myID(r.MonID.MyID)}, Priv: r.Priv}
			})
	})
}

func FuzzMonID(f *testing.F) {
	sm := sampleMon()
	f.Add(sm.MonID.Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (m MonID) { m.Decode(d); return },
			func(m MonID) []byte { return m.Append(nil) },
			func(r rMonID) MonID { return MonID{MonName: r.MonName, MyID: myID(r.MyID)} })
	})
}

func FuzzMyID(f *testing.F) {
	sm := sampleMon()
	f.Add(sm.MonID.MyID.Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (m MyID) { m.Decode(d); return },
			func(m MyID) []byte { return m.Append(nil) }, myID)
	})
}

func FuzzStatRes(f *testing.F) {
	f.Add((&StatRes{Res: StatSucc, State: 5}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (r StatRes) { r.Decode(d); return },
			func(r StatRes) []byte { return r.Append(nil) },
			func(r rStatRes) StatRes { return StatRes{Res: Res(r.Res), State: r.State} })
	})
}

func FuzzStatChge(f *testing.F) {
	f.Add((&StatChge{MonName: "client", State: 3}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (c StatChge) { c.Decode(d); return },
			func(c StatChge) []byte { return c.Append(nil) },
			func(r rStatChge) StatChge { return StatChge(r) })
	})
}

func FuzzStatus(f *testing.F) {
	f.Add((&Status{MonName: "client", State: 3}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (s Status) { s.Decode(d); return },
			func(s Status) []byte { return s.Append(nil) },
			func(r rStatus) Status { return Status(r) })
	})
}

// FuzzRecord: a record file read back from disk is a decoder too. Whatever
// it holds, loading either yields a valid record that survives a write and
// read unchanged, or an error.
func FuzzRecord(f *testing.F) {
	b, _ := marshalRecord(clientRecord(Client{Caller: "c", Addr: mustAddr("10.0.0.1")}, "vip", fixedTime))
	f.Add(b)
	f.Add([]byte(`{"kind":"sm_mon","mon_name":"h","addrs":["::1"],"priv":"00000000000000000000000000000000"}`))
	f.Add([]byte(`{"kind":"client"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := unmarshalRecord(b)
		if err != nil {
			return
		}
		again, err := marshalRecord(r)
		if err != nil {
			t.Fatal(err)
		}
		r2, err := unmarshalRecord(again)
		if err != nil || !reflect.DeepEqual(r, r2) {
			t.Fatalf("record does not survive a round trip: %v\n%+v\n%+v", err, r, r2)
		}
		_ = r.fileName()
		_ = r.key()
	})
}
