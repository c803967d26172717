package sunrpc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

// frag encodes one fragment.
func frag(data []byte, last bool) []byte {
	h := uint32(len(data))
	if last {
		h |= lastFragment
	}
	return append(binary.BigEndian.AppendUint32(nil, h), data...)
}

func TestRecordReader(t *testing.T) {
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	tests := []struct {
		name    string
		stream  []byte
		max     int
		want    [][]byte
		wantErr error
	}{
		{"one record", frag([]byte("hello"), true), 100, [][]byte{[]byte("hello")}, io.EOF},
		{"two records", cat(frag([]byte("a"), true), frag([]byte("bc"), true)), 100, [][]byte{[]byte("a"), []byte("bc")}, io.EOF},
		{"three fragments", cat(frag([]byte("ab"), false), frag(nil, false), frag([]byte("cd"), true)), 100, [][]byte{[]byte("abcd")}, io.EOF},
		{"empty record", frag(nil, true), 100, [][]byte{{}}, io.EOF},
		{"exactly max", frag(make([]byte, 10), true), 10, [][]byte{make([]byte, 10)}, io.EOF},
		{"one byte over max", frag(make([]byte, 11), true), 10, nil, ErrRecordTooLarge},
		{"cumulative over max", cat(frag(make([]byte, 6), false), frag(make([]byte, 5), true)), 10, nil, ErrRecordTooLarge},
		{"huge fragment header", binary.BigEndian.AppendUint32(nil, 0xffffffff), 1 << 20, nil, ErrRecordTooLarge},
		{"endless empty fragments", bytes.Repeat(frag(nil, false), 1000), 100, nil, ErrTooManyFragments},
		{"eof inside header", []byte{0x80, 0}, 100, nil, io.ErrUnexpectedEOF},
		{"eof inside body", frag([]byte("hello"), true)[:6], 100, nil, io.ErrUnexpectedEOF},
		{"eof between fragments", frag([]byte("ab"), false), 100, nil, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// One byte at a time proves reassembly does not depend on
			// how the stream is cut into reads.
			rr := RecordReader{R: iotest.OneByteReader(bytes.NewReader(tt.stream)), MaxSize: tt.max}
			var got [][]byte
			var err error
			for {
				var rec []byte
				rec, err = rr.Next(nil)
				if err != nil {
					break
				}
				got = append(got, rec)
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %d records, want %d", len(got), len(tt.want))
			}
			for i := range got {
				if !bytes.Equal(got[i], tt.want[i]) {
					t.Fatalf("record %d = %q, want %q", i, got[i], tt.want[i])
				}
			}
		})
	}
}

func TestRecordReaderReusesBuffer(t *testing.T) {
	rr := RecordReader{R: bytes.NewReader(frag([]byte("abc"), true)), MaxSize: 100}
	buf := make([]byte, 0, 64)
	rec, err := rr.Next(buf)
	if err != nil {
		t.Fatal(err)
	}
	if &rec[0] != &buf[:1][0] {
		t.Fatal("record should reuse the supplied buffer")
	}
}

func TestPutRecordMark(t *testing.T) {
	b := append([]byte{0, 0, 0, 0}, "xyz"...)
	putRecordMark(b)
	if !bytes.Equal(b[:4], []byte{0x80, 0, 0, 3}) {
		t.Fatalf("mark = %x", b[:4])
	}
}
