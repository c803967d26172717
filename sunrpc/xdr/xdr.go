// Package xdr is a small, allocation-free XDR (RFC 4506) codec for the
// fixed RPC, NLM, NSM and rpcbind structures.
//
// Decoding walks a byte slice with a sticky error: after the first failure
// every read returns a zero value and Err reports what went wrong, so a
// decoder of a whole structure checks the error once at the end. Every
// variable-length item is checked against the schema maximum and against the
// bytes that remain before anything is sliced, so hostile lengths can neither
// panic nor make the decoder allocate.
//
// Encoding appends to a caller-supplied slice (strconv.Append style), so a
// reply can be built in a pooled buffer with no garbage.
package xdr

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Decoding errors. Each failure wraps one of these.
var (
	ErrShort   = errors.New("xdr: input truncated")
	ErrTooLong = errors.New("xdr: length exceeds maximum")
	ErrBadBool = errors.New("xdr: boolean is neither 0 nor 1")
	ErrBadEnum = errors.New("xdr: value out of range")
)

// Decoder reads XDR items from a byte slice. The zero value decodes an empty
// input. Byte slices it returns alias the input: copy them before the input
// buffer is reused.
type Decoder struct {
	b   []byte
	err error
}

// NewDecoder returns a decoder over b.
func NewDecoder(b []byte) *Decoder { return &Decoder{b: b} }

// Reset makes d decode b from the start, clearing any error.
func (d *Decoder) Reset(b []byte) { d.b, d.err = b, nil }

// Err reports the first decoding failure, or nil.
func (d *Decoder) Err() error { return d.err }

// Len is the number of bytes not yet consumed.
func (d *Decoder) Len() int { return len(d.b) }

// Rest returns the bytes not yet consumed and consumes them.
func (d *Decoder) Rest() []byte {
	r := d.b
	d.b = d.b[len(d.b):]
	return r
}

// Fail records err as the decoder's error unless one is already set; schema
// decoders use it for semantic checks (an enum out of range, say).
func (d *Decoder) Fail(err error) {
	if d.err == nil {
		d.err = err
		d.b = nil
	}
}

func (d *Decoder) short(what string, need int) {
	d.Fail(fmt.Errorf("%w: %s needs %d bytes, %d left", ErrShort, what, need, len(d.b)))
}

// Uint32 decodes an unsigned int.
func (d *Decoder) Uint32() uint32 {
	if len(d.b) < 4 {
		d.short("uint32", 4)
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

// Int32 decodes an int.
func (d *Decoder) Int32() int32 { return int32(d.Uint32()) }

// Uint64 decodes an unsigned hyper.
func (d *Decoder) Uint64() uint64 {
	if len(d.b) < 8 {
		d.short("uint64", 8)
		return 0
	}
	v := binary.BigEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

// Int64 decodes a hyper.
func (d *Decoder) Int64() int64 { return int64(d.Uint64()) }

// Bool decodes a bool, which must be 0 or 1.
func (d *Decoder) Bool() bool {
	v := d.Uint32()
	if v > 1 {
		d.Fail(fmt.Errorf("%w: %d", ErrBadBool, v))
		return false
	}
	return v == 1
}

// Opaque decodes variable-length opaque data of at most max bytes. The result
// aliases the input.
func (d *Decoder) Opaque(max int) []byte {
	n := d.Uint32()
	if d.err != nil {
		return nil
	}
	if uint64(n) > uint64(max) {
		d.Fail(fmt.Errorf("%w: %d bytes, maximum %d", ErrTooLong, n, max))
		return nil
	}
	return d.FixedOpaque(int(n))
}

// FixedOpaque decodes n bytes of fixed-length opaque data plus its padding.
// The result aliases the input.
func (d *Decoder) FixedOpaque(n int) []byte {
	if d.err != nil {
		return nil
	}
	padded := n + Pad(n)
	if n < 0 || padded > len(d.b) {
		d.short("opaque", padded)
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[padded:]
	return v
}

// String decodes a string of at most max bytes. It allocates the string.
func (d *Decoder) String(max int) string { return string(d.Opaque(max)) }

// Pad is the number of zero bytes that follow n bytes of opaque data.
func Pad(n int) int { return (4 - n&3) & 3 }

// AppendUint32 appends an unsigned int.
func AppendUint32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }

// AppendInt32 appends an int.
func AppendInt32(b []byte, v int32) []byte { return binary.BigEndian.AppendUint32(b, uint32(v)) }

// AppendUint64 appends an unsigned hyper.
func AppendUint64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

// AppendInt64 appends a hyper.
func AppendInt64(b []byte, v int64) []byte { return binary.BigEndian.AppendUint64(b, uint64(v)) }

// AppendBool appends a bool.
func AppendBool(b []byte, v bool) []byte {
	if v {
		return AppendUint32(b, 1)
	}
	return AppendUint32(b, 0)
}

var zeros [4]byte

// AppendOpaque appends variable-length opaque data.
func AppendOpaque(b, p []byte) []byte {
	b = AppendUint32(b, uint32(len(p)))
	return AppendFixedOpaque(b, p)
}

// AppendFixedOpaque appends fixed-length opaque data and its padding.
func AppendFixedOpaque(b, p []byte) []byte {
	b = append(b, p...)
	return append(b, zeros[:Pad(len(p))]...)
}

// AppendString appends a string.
func AppendString(b []byte, s string) []byte {
	b = AppendUint32(b, uint32(len(s)))
	b = append(b, s...)
	return append(b, zeros[:Pad(len(s))]...)
}

// SizeOpaque is the encoded size of variable-length opaque data of n bytes.
func SizeOpaque(n int) int { return 4 + n + Pad(n) }
