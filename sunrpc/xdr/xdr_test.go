package xdr

import (
	"bytes"
	"errors"
	"math"
	"testing"
)

func TestPrimitivesRoundTrip(t *testing.T) {
	var b []byte
	b = AppendUint32(b, 0xdeadbeef)
	b = AppendInt32(b, -2)
	b = AppendUint64(b, math.MaxUint64-1)
	b = AppendInt64(b, math.MinInt64)
	b = AppendBool(b, true)
	b = AppendBool(b, false)
	b = AppendOpaque(b, []byte{1, 2, 3})
	b = AppendString(b, "hello")
	b = AppendFixedOpaque(b, []byte{9, 8})
	b = AppendOpaque(b, nil)

	want := []byte{
		0xde, 0xad, 0xbe, 0xef,
		0xff, 0xff, 0xff, 0xfe,
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
		0x80, 0, 0, 0, 0, 0, 0, 0,
		0, 0, 0, 1,
		0, 0, 0, 0,
		0, 0, 0, 3, 1, 2, 3, 0,
		0, 0, 0, 5, 'h', 'e', 'l', 'l', 'o', 0, 0, 0,
		9, 8, 0, 0,
		0, 0, 0, 0,
	}
	if !bytes.Equal(b, want) {
		t.Fatalf("encoding:\n got %x\nwant %x", b, want)
	}

	d := NewDecoder(b)
	if v := d.Uint32(); v != 0xdeadbeef {
		t.Errorf("Uint32 = %x", v)
	}
	if v := d.Int32(); v != -2 {
		t.Errorf("Int32 = %d", v)
	}
	if v := d.Uint64(); v != math.MaxUint64-1 {
		t.Errorf("Uint64 = %d", v)
	}
	if v := d.Int64(); v != math.MinInt64 {
		t.Errorf("Int64 = %d", v)
	}
	if !d.Bool() || d.Bool() {
		t.Error("Bool values wrong")
	}
	if v := d.Opaque(3); !bytes.Equal(v, []byte{1, 2, 3}) {
		t.Errorf("Opaque = %x", v)
	}
	if v := d.String(5); v != "hello" {
		t.Errorf("String = %q", v)
	}
	if v := d.FixedOpaque(2); !bytes.Equal(v, []byte{9, 8}) {
		t.Errorf("FixedOpaque = %x", v)
	}
	if v := d.Opaque(0); len(v) != 0 {
		t.Errorf("empty Opaque = %x", v)
	}
	if d.Err() != nil || d.Len() != 0 {
		t.Fatalf("err %v, %d bytes left", d.Err(), d.Len())
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		op   func(*Decoder)
		want error
	}{
		{"uint32 short", []byte{1, 2, 3}, func(d *Decoder) { d.Uint32() }, ErrShort},
		{"uint64 short", []byte{1, 2, 3, 4, 5, 6, 7}, func(d *Decoder) { d.Uint64() }, ErrShort},
		{"bool 2", []byte{0, 0, 0, 2}, func(d *Decoder) { d.Bool() }, ErrBadBool},
		{"opaque over max", []byte{0, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0}, func(d *Decoder) { d.Opaque(4) }, ErrTooLong},
		{"opaque huge length", []byte{0xff, 0xff, 0xff, 0xff}, func(d *Decoder) { d.Opaque(math.MaxInt) }, ErrShort},
		{"opaque body short", []byte{0, 0, 0, 4, 1, 2}, func(d *Decoder) { d.Opaque(8) }, ErrShort},
		{"opaque padding missing", []byte{0, 0, 0, 1, 1}, func(d *Decoder) { d.Opaque(8) }, ErrShort},
		{"string over max", []byte{0, 0, 0, 2, 'a', 'b', 0, 0}, func(d *Decoder) { d.String(1) }, ErrTooLong},
		{"fixed negative", nil, func(d *Decoder) { d.FixedOpaque(-1) }, ErrShort},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := NewDecoder(tt.in)
			tt.op(d)
			if !errors.Is(d.Err(), tt.want) {
				t.Fatalf("err = %v, want %v", d.Err(), tt.want)
			}
		})
	}
}

func TestStickyError(t *testing.T) {
	d := NewDecoder([]byte{0, 0, 0, 7, 0, 0})
	if d.Uint32() != 7 {
		t.Fatal("first read")
	}
	if d.Uint32() != 0 || d.Err() == nil {
		t.Fatal("short read should fail")
	}
	first := d.Err()
	d.Fail(errors.New("later"))
	if d.Uint32() != 0 || d.Opaque(10) != nil || d.String(10) != "" || d.Err() != first {
		t.Fatal("reads after an error must return zero values and keep the first error")
	}
	d.Reset([]byte{0, 0, 0, 1})
	if !d.Bool() || d.Err() != nil {
		t.Fatal("Reset must clear the error")
	}
}

func TestOpaqueAliasesInput(t *testing.T) {
	in := []byte{0, 0, 0, 2, 'x', 'y', 0, 0, 0, 0, 0, 9}
	d := NewDecoder(in)
	v := d.Opaque(2)
	if cap(v) != 2 {
		t.Fatalf("cap = %d: appending to a decoded field must not overwrite the input", cap(v))
	}
	in[4] = 'z'
	if v[0] != 'z' {
		t.Fatal("Opaque should alias the input (callers copy what they keep)")
	}
	if d.Uint32() != 9 {
		t.Fatal("padding not skipped")
	}
}

func TestPad(t *testing.T) {
	for n, want := range []int{0, 3, 2, 1, 0, 3} {
		if got := Pad(n); got != want {
			t.Errorf("Pad(%d) = %d, want %d", n, got, want)
		}
		if got := SizeOpaque(n); got != 4+n+want {
			t.Errorf("SizeOpaque(%d) = %d", n, got)
		}
	}
}

// FuzzDecoder drives the decoder with operations chosen by the input itself;
// it must never panic, never return more bytes than it was given, and must
// account for every byte it consumes.
func FuzzDecoder(f *testing.F) {
	f.Add([]byte{0, 0, 0, 3, 1, 2, 3, 0}, []byte{3, 0, 1})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1}, []byte{3, 2})
	f.Add([]byte{}, []byte{0, 1, 2, 3, 4, 5})
	f.Fuzz(func(t *testing.T, in, ops []byte) {
		d := NewDecoder(in)
		for _, op := range ops {
			before := d.Len()
			switch op % 7 {
			case 0:
				d.Uint32()
			case 1:
				d.Uint64()
			case 2:
				d.Bool()
			case 3:
				if v := d.Opaque(int(op)); len(v) > int(op) {
					t.Fatalf("opaque of %d bytes, max %d", len(v), op)
				}
			case 4:
				d.String(1024)
			case 5:
				d.FixedOpaque(int(op) % 9)
			case 6:
				d.Int64()
			}
			if d.Len() > before {
				t.Fatal("decoder grew its input")
			}
		}
	})
}

func BenchmarkDecodeLockArgsShape(b *testing.B) {
	// The shape of nlm4_lockargs: cookie, bools, caller_name, fh, oh, svid,
	// offset, length, reclaim, state.
	var msg []byte
	msg = AppendOpaque(msg, []byte("cookie01"))
	msg = AppendBool(msg, true)
	msg = AppendBool(msg, true)
	msg = AppendString(msg, "client.example.com")
	msg = AppendOpaque(msg, bytes.Repeat([]byte{7}, 32))
	msg = AppendOpaque(msg, []byte("12345@client.example"))
	msg = AppendInt32(msg, 4242)
	msg = AppendUint64(msg, 0)
	msg = AppendUint64(msg, 100)
	msg = AppendBool(msg, false)
	msg = AppendInt32(msg, 3)
	b.ReportAllocs()
	b.SetBytes(int64(len(msg)))
	var d Decoder
	for b.Loop() {
		d.Reset(msg)
		d.Opaque(1024)
		d.Bool()
		d.Bool()
		d.Opaque(1024)
		d.Opaque(1024)
		d.Opaque(1024)
		d.Int32()
		d.Uint64()
		d.Uint64()
		d.Bool()
		d.Int32()
		if d.Err() != nil {
			b.Fatal(d.Err())
		}
	}
}

func BenchmarkEncodeRes(b *testing.B) {
	buf := make([]byte, 0, 64)
	cookie := []byte("cookie01")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendOpaque(buf[:0], cookie)
		buf = AppendUint32(buf, 0)
	}
}
