package nlm

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

func sampleLock() Lock {
	return Lock{CallerName: []byte("client1"), FH: []byte{1, 2, 3, 4, 5}, OH: []byte("42@client1"), SVID: 42, Offset: 1 << 33, Len: 100}
}

func TestLockArgsGolden(t *testing.T) {
	a := LockArgs{Cookie: []byte{0xca, 0xfe}, Block: true, Exclusive: true, Lock: sampleLock(), Reclaim: false, State: 3}
	v4 := a.Append(nil, Vers4)
	want4 := unhex(t, `
		00000002 cafe0000
		00000001 00000001
		00000007 636c6965 6e743100
		00000005 01020304 05000000
		0000000a 34324063 6c69656e 74310000
		0000002a
		00000002 00000000 00000000 00000064
		00000000 00000003`)
	if !bytes.Equal(v4, want4) {
		t.Fatalf("v4:\n got %x\nwant %x", v4, want4)
	}
	// Version 1/3 offsets are 32 bits: the same lock inside 4 GiB.
	a.Lock.Offset = 0x10000
	v3 := a.Append(nil, Vers3)
	if len(v3) != len(v4)-8 {
		t.Fatalf("v3 encoding is %d bytes, want %d", len(v3), len(v4)-8)
	}
	if tail := v3[len(v3)-16:]; !bytes.Equal(tail, unhex(t, "00010000 00000064 00000000 00000003")) {
		t.Fatalf("v3 offsets: %x", tail)
	}
	for _, vers := range []uint32{Vers1, Vers3, Vers4} {
		enc := a.Append(nil, vers)
		var back LockArgs
		d := xdr.NewDecoder(enc)
		back.Decode(d, vers)
		if d.Err() != nil || d.Len() != 0 || !reflect.DeepEqual(back, a) {
			t.Fatalf("v%d round trip: %+v, %v", vers, back, d.Err())
		}
	}
}

func TestTestResGolden(t *testing.T) {
	denied := TestRes{Cookie: []byte{1}, Stat: Denied, Holder: Holder{Exclusive: true, SVID: 7, OH: []byte("ab"), Offset: 10, Len: 0}}
	got := denied.Append(nil, Vers4)
	want := unhex(t, "00000001 01000000 00000001 00000001 00000007 00000002 61620000 00000000 0000000a 00000000 00000000")
	if !bytes.Equal(got, want) {
		t.Fatalf("denied v4:\n got %x\nwant %x", got, want)
	}
	got = denied.Append(nil, Vers1)
	want = unhex(t, "00000001 01000000 00000001 00000001 00000007 00000002 61620000 0000000a 00000000")
	if !bytes.Equal(got, want) {
		t.Fatalf("denied v1:\n got %x\nwant %x", got, want)
	}
	// Any other status carries no holder.
	granted := TestRes{Cookie: []byte{1}, Stat: Granted, Holder: denied.Holder}
	if got := granted.Append(nil, Vers4); !bytes.Equal(got, unhex(t, "00000001 01000000 00000000")) {
		t.Fatalf("granted: %x", got)
	}
}

func TestSmallStructsGolden(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"res", (&Res{Cookie: []byte("ck"), Stat: StaleFH}).Append(nil), "00000002 636b0000 00000007"},
		{"shareres", (&ShareRes{Cookie: nil, Stat: Granted, Sequence: -1}).Append(nil), "00000000 00000000 ffffffff"},
		{"notify", (&Notify{Name: []byte("host"), State: 5}).Append(nil), "00000004 686f7374 00000005"},
		{"shareargs", (&ShareArgs{Cookie: []byte{}, Share: Share{CallerName: []byte("c"), FH: []byte{1}, OH: []byte{2}, Mode: 2, Access: 1}, Reclaim: true}).Append(nil),
			"00000000 00000001 63000000 00000001 01000000 00000001 02000000 00000002 00000001 00000001"},
	}
	for _, tt := range tests {
		if want := unhex(t, tt.want); !bytes.Equal(tt.got, want) {
			t.Errorf("%s:\n got %x\nwant %x", tt.name, tt.got, want)
		}
	}
}

func TestStatForVersion(t *testing.T) {
	for s, want := range map[Stat]Stat{Granted: Granted, DeniedGracePeriod: DeniedGracePeriod, Deadlck: Denied, StaleFH: DeniedNoLocks, FBig: DeniedNoLocks, Failed: DeniedNoLocks, ROFS: DeniedNoLocks} {
		if got := s.ForVersion(Vers3); got != want {
			t.Errorf("%v for v3 = %v, want %v", s, got, want)
		}
		if got := s.ForVersion(Vers4); got != s {
			t.Errorf("%v for v4 = %v", s, got)
		}
	}
}

func TestDecodeLimits(t *testing.T) {
	big := LockArgs{Cookie: make([]byte, MaxNetobj+1), Lock: sampleLock()}
	d := xdr.NewDecoder(big.Append(nil, Vers4))
	var a LockArgs
	a.Decode(d, Vers4)
	if d.Err() == nil {
		t.Fatal("cookie over MAXNETOBJ_SZ accepted")
	}
	long := LockArgs{Lock: sampleLock()}
	long.Lock.CallerName = make([]byte, MaxStrLen+1)
	d = xdr.NewDecoder(long.Append(nil, Vers4))
	a.Decode(d, Vers4)
	if d.Err() == nil {
		t.Fatal("caller_name over LM_MAXSTRLEN accepted")
	}
	n := Notify{Name: make([]byte, MaxNameLen)}
	d = xdr.NewDecoder(n.Append(nil))
	var back Notify
	back.Decode(d)
	if d.Err() != nil {
		t.Fatalf("a LM_MAXNAMELEN name refused: %v", d.Err())
	}
}

// ---- differential fuzzing against rasky/go-xdr ----------------------------
//
// The oracle types mirror the .x definitions field for field; rasky decodes
// them by reflection with UnmarshalLimited (1024 is every NLM netobj and
// string bound). Our decoder and rasky's must agree on whether an input is
// valid and on every decoded value, and our encoders must produce rasky's
// bytes.

type rLock4 struct {
	CallerName string
	FH, OH     []byte
	SVID       int32
	Offset     uint64
	Len        uint64
}

type rLock3 struct {
	CallerName string
	FH, OH     []byte
	SVID       int32
	Offset     uint32
	Len        uint32
}

type rLockArgs[L any] struct {
	Cookie           []byte
	Block, Exclusive bool
	Lock             L
	Reclaim          bool
	State            int32
}

type rCancelArgs[L any] struct {
	Cookie           []byte
	Block, Exclusive bool
	Lock             L
}

type rTestArgs[L any] struct {
	Cookie    []byte
	Exclusive bool
	Lock      L
}

type rUnlockArgs[L any] struct {
	Cookie []byte
	Lock   L
}

type rHolder4 struct {
	Exclusive bool
	SVID      int32
	OH        []byte
	Offset    uint64
	Len       uint64
}

type rHolder3 struct {
	Exclusive bool
	SVID      int32
	OH        []byte
	Offset    uint32
	Len       uint32
}

type rTestRes[H any] struct {
	Cookie []byte
	Stat   uint32 `xdr:"union"`
	Holder H      `xdr:"unioncase=1"`
}

type rRes struct {
	Cookie []byte
	Stat   uint32
}

type rShareArgs struct {
	Cookie       []byte
	CallerName   string
	FH, OH       []byte
	Mode, Access uint32
	Reclaim      bool
}

type rShareRes struct {
	Cookie   []byte
	Stat     uint32
	Sequence int32
}

type rNotify struct {
	Name  string
	State int32
}

func lock4(l rLock4) Lock {
	return Lock{CallerName: []byte(l.CallerName), FH: l.FH, OH: l.OH, SVID: l.SVID, Offset: l.Offset, Len: l.Len}
}

func lock3(l rLock3) Lock {
	return Lock{CallerName: []byte(l.CallerName), FH: l.FH, OH: l.OH, SVID: l.SVID, Offset: uint64(l.Offset), Len: uint64(l.Len)}
}

// normalize makes nil and empty byte slices compare equal.
func normalize(v any) any {
	rv := reflect.ValueOf(v)
	out := reflect.New(rv.Type()).Elem()
	out.Set(rv)
	var walk func(reflect.Value)
	walk = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.Struct:
			for i := range v.NumField() {
				walk(v.Field(i))
			}
		case reflect.Slice:
			if v.Type().Elem().Kind() == reflect.Uint8 && v.Len() == 0 && v.CanSet() {
				v.Set(reflect.MakeSlice(v.Type(), 0, 0))
			}
		}
	}
	walk(out)
	return out.Interface()
}

// differential checks one decoder and encoder pair against the oracle.
// ours decodes b (reporting its error) and re-encodes its value; oracle
// decodes b with rasky and converts the result to our type.
func differential[T any, R any](t *testing.T, b []byte, ours func(d *xdr.Decoder) T, enc func(T) []byte, conv func(R) T) {
	d := xdr.NewDecoder(b)
	got := ours(d)
	var r R
	_, rerr := rxdr.UnmarshalLimited(bytes.NewReader(b), &r, 1024)
	if (d.Err() == nil) != (rerr == nil) {
		t.Fatalf("validity differs on %x: ours %v, rasky %v", b, d.Err(), rerr)
	}
	if rerr != nil {
		return
	}
	want := conv(r)
	if !reflect.DeepEqual(normalize(got), normalize(want)) {
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

func seedLockArgs(f *testing.F) {
	a := LockArgs{Cookie: []byte("c00kie"), Block: true, Exclusive: true, Lock: sampleLock(), State: 1}
	f.Add(a.Append(nil, Vers4), true)
	a.Lock.Offset = 7
	f.Add(a.Append(nil, Vers3), false)
	f.Add([]byte{0, 0, 4, 1}, true)
}

func FuzzLockArgs(f *testing.F) {
	seedLockArgs(f)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		if v4 {
			differential(t, b, func(d *xdr.Decoder) (a LockArgs) { a.Decode(d, Vers4); return },
				func(a LockArgs) []byte { return a.Append(nil, Vers4) },
				func(r rLockArgs[rLock4]) LockArgs {
					return LockArgs{Cookie: r.Cookie, Block: r.Block, Exclusive: r.Exclusive, Lock: lock4(r.Lock), Reclaim: r.Reclaim, State: r.State}
				})
			return
		}
		differential(t, b, func(d *xdr.Decoder) (a LockArgs) { a.Decode(d, Vers3); return },
			func(a LockArgs) []byte { return a.Append(nil, Vers3) },
			func(r rLockArgs[rLock3]) LockArgs {
				return LockArgs{Cookie: r.Cookie, Block: r.Block, Exclusive: r.Exclusive, Lock: lock3(r.Lock), Reclaim: r.Reclaim, State: r.State}
			})
	})
}

func FuzzCancelArgs(f *testing.F) {
	seedLockArgs(f)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		if v4 {
			differential(t, b, func(d *xdr.Decoder) (a CancelArgs) { a.Decode(d, Vers4); return },
				func(a CancelArgs) []byte { return a.Append(nil, Vers4) },
				func(r rCancelArgs[rLock4]) CancelArgs {
					return CancelArgs{Cookie: r.Cookie, Block: r.Block, Exclusive: r.Exclusive, Lock: lock4(r.Lock)}
				})
			return
		}
		differential(t, b, func(d *xdr.Decoder) (a CancelArgs) { a.Decode(d, Vers1); return },
			func(a CancelArgs) []byte { return a.Append(nil, Vers1) },
			func(r rCancelArgs[rLock3]) CancelArgs {
				return CancelArgs{Cookie: r.Cookie, Block: r.Block, Exclusive: r.Exclusive, Lock: lock3(r.Lock)}
			})
	})
}

func FuzzTestArgs(f *testing.F) {
	seedLockArgs(f)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		if v4 {
			differential(t, b, func(d *xdr.Decoder) (a TestArgs) { a.Decode(d, Vers4); return },
				func(a TestArgs) []byte { return a.Append(nil, Vers4) },
				func(r rTestArgs[rLock4]) TestArgs {
					return TestArgs{Cookie: r.Cookie, Exclusive: r.Exclusive, Lock: lock4(r.Lock)}
				})
			return
		}
		differential(t, b, func(d *xdr.Decoder) (a TestArgs) { a.Decode(d, Vers3); return },
			func(a TestArgs) []byte { return a.Append(nil, Vers3) },
			func(r rTestArgs[rLock3]) TestArgs {
				return TestArgs{Cookie: r.Cookie, Exclusive: r.Exclusive, Lock: lock3(r.Lock)}
			})
	})
}

func FuzzUnlockArgs(f *testing.F) {
	seedLockArgs(f)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		if v4 {
			differential(t, b, func(d *xdr.Decoder) (a UnlockArgs) { a.Decode(d, Vers4); return },
				func(a UnlockArgs) []byte { return a.Append(nil, Vers4) },
				func(r rUnlockArgs[rLock4]) UnlockArgs { return UnlockArgs{Cookie: r.Cookie, Lock: lock4(r.Lock)} })
			return
		}
		differential(t, b, func(d *xdr.Decoder) (a UnlockArgs) { a.Decode(d, Vers3); return },
			func(a UnlockArgs) []byte { return a.Append(nil, Vers3) },
			func(r rUnlockArgs[rLock3]) UnlockArgs { return UnlockArgs{Cookie: r.Cookie, Lock: lock3(r.Lock)} })
	})
}

func FuzzTestRes(f *testing.F) {
	d := TestRes{Cookie: []byte("ck"), Stat: Denied, Holder: Holder{Exclusive: true, SVID: 3, OH: []byte("oh"), Offset: 9, Len: 1}}
	f.Add(d.Append(nil, Vers4), true)
	f.Add(d.Append(nil, Vers3), false)
	d.Stat = Granted
	f.Add(d.Append(nil, Vers4), true)
	f.Fuzz(func(t *testing.T, b []byte, v4 bool) {
		if v4 {
			differential(t, b, func(d *xdr.Decoder) (r TestRes) { r.Decode(d, Vers4); return },
				func(r TestRes) []byte { return r.Append(nil, Vers4) },
				func(r rTestRes[rHolder4]) TestRes {
					h := Holder{Exclusive: r.Holder.Exclusive, SVID: r.Holder.SVID, OH: r.Holder.OH, Offset: r.Holder.Offset, Len: r.Holder.Len}
					return TestRes{Cookie: r.Cookie, Stat: Stat(r.Stat), Holder: h}
				})
			return
		}
		differential(t, b, func(d *xdr.Decoder) (r TestRes) { r.Decode(d, Vers3); return },
			func(r TestRes) []byte { return r.Append(nil, Vers3) },
			func(r rTestRes[rHolder3]) TestRes {
				h := Holder{Exclusive: r.Holder.Exclusive, SVID: r.Holder.SVID, OH: r.Holder.OH, Offset: uint64(r.Holder.Offset), Len: uint64(r.Holder.Len)}
				return TestRes{Cookie: r.Cookie, Stat: Stat(r.Stat), Holder: h}
			})
	})
}

func FuzzRes(f *testing.F) {
	f.Add((&Res{Cookie: []byte("x"), Stat: Blocked}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (r Res) { r.Decode(d); return },
			func(r Res) []byte { return r.Append(nil) },
			func(r rRes) Res { return Res{Cookie: r.Cookie, Stat: Stat(r.Stat)} })
	})
}

func FuzzShareArgs(f *testing.F) {
	f.Add((&ShareArgs{Cookie: []byte("x"), Share: Share{CallerName: []byte("h"), FH: []byte{1}, OH: []byte{2}, Mode: 1, Access: 3}}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (a ShareArgs) { a.Decode(d); return },
			func(a ShareArgs) []byte { return a.Append(nil) },
			func(r rShareArgs) ShareArgs {
				return ShareArgs{Cookie: r.Cookie, Share: Share{CallerName: []byte(r.CallerName), FH: r.FH, OH: r.OH, Mode: r.Mode, Access: r.Access}, Reclaim: r.Reclaim}
			})
	})
}

func FuzzShareRes(f *testing.F) {
	f.Add((&ShareRes{Cookie: []byte("x"), Stat: Denied, Sequence: 2}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		differential(t, b, func(d *xdr.Decoder) (r ShareRes) { r.Decode(d); return },
			func(r ShareRes) []byte { return r.Append(nil) },
			func(r rShareRes) ShareRes {
				return ShareRes{Cookie: r.Cookie, Stat: Stat(r.Stat), Sequence: r.Sequence}
			})
	})
}

func FuzzNotify(f *testing.F) {
	f.Add((&Notify{Name: []byte("client"), State: 3}).Append(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		// FREE_ALL's name may be 1025 bytes (LM_MAXNAMELEN), one more than
		// the oracle's single limit: compare only below that.
		if len(b) >= 4 && (uint32(b[0])<<24|uint32(b[1])<<16|uint32(b[2])<<8|uint32(b[3])) == MaxNameLen {
			return
		}
		differential(t, b, func(d *xdr.Decoder) (n Notify) { n.Decode(d); return },
			func(n Notify) []byte { return n.Append(nil) },
			func(r rNotify) Notify { return Notify{Name: []byte(r.Name), State: r.State} })
	})
}

func BenchmarkDecodeLockArgs(b *testing.B) {
	a := LockArgs{Cookie: []byte("cookie01"), Block: true, Exclusive: true, Lock: sampleLock(), State: 3}
	msg := a.Append(nil, Vers4)
	b.ReportAllocs()
	var d xdr.Decoder
	var back LockArgs
	for b.Loop() {
		d.Reset(msg)
		back.Decode(&d, Vers4)
		if d.Err() != nil {
			b.Fatal(d.Err())
		}
	}
}

func BenchmarkEncodeTestRes(b *testing.B) {
	r := TestRes{Cookie: []byte("cookie01"), Stat: Denied, Holder: Holder{Exclusive: true, SVID: 5, OH: []byte("5@client"), Offset: 0, Len: 100}}
	buf := make([]byte, 0, 128)
	b.ReportAllocs()
	for b.Loop() {
		buf = r.Append(buf[:0], Vers4)
	}
}
