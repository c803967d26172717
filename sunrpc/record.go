package sunrpc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Record marking (RFC 5531 §11): on stream transports each message is sent
// as fragments, each preceded by a 4-byte header whose top bit marks the last
// fragment and whose low 31 bits give the fragment length.
const (
	lastFragment  = 1 << 31
	fragLenMask   = lastFragment - 1
	recordMarkLen = 4
)

// Record reader limits.
var (
	ErrRecordTooLarge   = errors.New("sunrpc: record exceeds size limit")
	ErrTooManyFragments = errors.New("sunrpc: record has too many fragments")
)

// DefaultMaxFragments bounds the fragments of one record. Real peers send one
// fragment per record; the bound stops a peer from streaming empty fragments
// forever without ever growing the record.
const DefaultMaxFragments = 64

// RecordReader reassembles records from a byte stream.
type RecordReader struct {
	R            io.Reader
	MaxSize      int // cumulative size cap of one record
	MaxFragments int // 0 means DefaultMaxFragments

	hdr [recordMarkLen]byte
}

// Next reads the next whole record, reusing buf's storage when it is large
// enough. It returns io.EOF only when the stream ends cleanly between
// records; a stream that ends inside a record gives io.ErrUnexpectedEOF.
// After an error the stream position is undefined: close the connection.
func (rr *RecordReader) Next(buf []byte) ([]byte, error) {
	maxFrags := rr.MaxFragments
	if maxFrags <= 0 {
		maxFrags = DefaultMaxFragments
	}
	rec := buf[:0]
	for frag := 0; ; frag++ {
		if frag == maxFrags {
			return nil, fmt.Errorf("%w: more than %d", ErrTooManyFragments, maxFrags)
		}
		if _, err := io.ReadFull(rr.R, rr.hdr[:]); err != nil {
			if err == io.EOF && frag > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		h := binary.BigEndian.Uint32(rr.hdr[:])
		n := int(h & fragLenMask)
		if n > rr.MaxSize-len(rec) {
			return nil, fmt.Errorf("%w: %d bytes so far plus a %d-byte fragment, limit %d",
				ErrRecordTooLarge, len(rec), n, rr.MaxSize)
		}
		start := len(rec)
		rec = grow(rec, n)
		if _, err := io.ReadFull(rr.R, rec[start:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		if h&lastFragment != 0 {
			return rec, nil
		}
	}
}

// grow extends b by n bytes, reallocating only when capacity runs out.
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b[:len(b)+n]
	}
	nb := make([]byte, len(b)+n, max(2*cap(b), len(b)+n))
	copy(nb, b)
	return nb
}

// putRecordMark fills the 4 bytes reserved at the start of b with the header
// of a single, last fragment holding the rest of b.
func putRecordMark(b []byte) {
	binary.BigEndian.PutUint32(b, uint32(len(b)-recordMarkLen)|lastFragment)
}
