package nsm

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Kinds of monitor records.
const (
	// KindClient: a client of this node's NLM service, monitored in process
	// the first time it locks through the virtual server. Its reboot drops
	// its locks here.
	KindClient = "client"
	// KindSMMon: a host monitored for a local lock manager by SM_MON. Its
	// reboot is reported by calling my_prog/my_vers/my_proc back.
	KindSMMon = "sm_mon"
)

// Priv is the 16 opaque bytes a lock manager gives SM_MON and gets back
// with the reboot callback.
type Priv [PrivSize]byte

// MarshalText renders p as hex.
func (p Priv) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(p[:])), nil }

// UnmarshalText parses 32 hex digits.
func (p *Priv) UnmarshalText(b []byte) error {
	if hex.DecodedLen(len(b)) != PrivSize {
		return fmt.Errorf("nsm: priv %q: want %d hex digits", b, 2*PrivSize)
	}
	_, err := hex.Decode(p[:], b)
	return err
}

// Record is one monitor record of a virtual server: a peer whose reboot
// must be noticed and who is told when the virtual server restarts.
type Record struct {
	Kind string `json:"kind"`
	// MonName is the monitored host's name: for a client, its address
	// (what Linux lockd monitors with nsm_use_hostnames off, and what
	// CTDB's callout expects); for SM_MON, the mon_name asked for.
	MonName string `json:"mon_name"`
	// Caller is a client's caller_name.
	Caller string `json:"caller,omitempty"`
	// Addrs are the host's addresses: a client's own; for SM_MON, the
	// addresses mon_name resolved to. SM_NOTIFY goes to the first.
	Addrs []netip.Addr `json:"addrs,omitempty"`
	// MyName is the name the peer knows us by: the virtual server's name
	// for a client; SM_MON's my_name.
	MyName string `json:"my_name"`
	// Prog, Vers and Proc are the callback of an SM_MON record.
	Prog uint32 `json:"my_prog,omitempty"`
	Vers uint32 `json:"my_vers,omitempty"`
	Proc uint32 `json:"my_proc,omitempty"`
	Priv Priv   `json:"priv"`
	// LastState is the peer's NSM state from its last accepted SM_NOTIFY
	// (0: none seen), so that a repeated notification is not taken for
	// another reboot.
	LastState int32     `json:"last_state,omitempty"`
	Created   time.Time `json:"created"`
}

// Client names a client host of one virtual server as the lock manager
// knows it.
type Client struct {
	VIP    netip.Addr
	Caller string
	Addr   netip.Addr
}

func clientRecord(c Client, myName string, now time.Time) *Record {
	return &Record{Kind: KindClient, MonName: c.Addr.String(), Caller: c.Caller,
		Addrs: []netip.Addr{c.Addr}, MyName: myName, Created: now}
}

func clientKey(caller string, addr netip.Addr) string {
	return KindClient + "\x00" + addr.String() + "\x00" + caller
}

// key identifies the record within its virtual server: a client by
// (address, caller_name); an SM_MON record by everything SM_MON gave,
// priv included, as rpc.statd tells duplicates apart.
func (r *Record) key() string {
	if r.Kind == KindClient && len(r.Addrs) > 0 {
		return clientKey(r.Caller, r.Addrs[0])
	}
	var b strings.Builder
	b.WriteString(r.Kind + "\x00" + r.MonName + "\x00" + r.MyName + "\x00")
	var n [12]byte
	binary.BigEndian.PutUint32(n[0:], r.Prog)
	binary.BigEndian.PutUint32(n[4:], r.Vers)
	binary.BigEndian.PutUint32(n[8:], r.Proc)
	b.Write(n[:])
	b.Write(r.Priv[:])
	return b.String()
}

// fileName is the record's file in sm/ and notify/: the kind, a client's
// address for the admin's eye, and a digest of the key.
func (r *Record) fileName() string {
	sum := sha256.Sum256([]byte(r.key()))
	h := hex.EncodeToString(sum[:8])
	if r.Kind == KindClient && len(r.Addrs) > 0 {
		return KindClient + "-" + r.Addrs[0].String() + "-" + h + ".json"
	}
	return r.Kind + "-" + h + ".json"
}

// Client returns the client a KindClient record stands for.
func (r *Record) Client(vip netip.Addr) Client {
	c := Client{VIP: vip, Caller: r.Caller}
	if len(r.Addrs) > 0 {
		c.Addr = r.Addrs[0]
	}
	return c
}

// Record validation errors.
var (
	ErrBadRecord = errors.New("nsm: damaged monitor record")
)

func (r *Record) validate() error {
	switch {
	case r.Kind != KindClient && r.Kind != KindSMMon:
		return fmt.Errorf("%w: kind %q", ErrBadRecord, r.Kind)
	case r.MonName == "" || len(r.MonName) > MaxStrLen || len(r.MyName) > MaxStrLen || len(r.Caller) > MaxStrLen:
		return fmt.Errorf("%w: bad names", ErrBadRecord)
	case r.Kind == KindClient && (len(r.Addrs) != 1 || !r.Addrs[0].IsValid()):
		return fmt.Errorf("%w: a client record needs its address", ErrBadRecord)
	}
	for _, a := range r.Addrs {
		if !a.IsValid() {
			return fmt.Errorf("%w: bad address", ErrBadRecord)
		}
	}
	return nil
}

func marshalRecord(r *Record) ([]byte, error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func unmarshalRecord(b []byte) (*Record, error) {
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRecord, err)
	}
	if err := r.validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

// matches reports whether a notification from sender naming monName is
// about this record's host: by name (mon_name, caller_name) or by address,
// as rpc.statd matches the canonical name or the sender's address.
func (r *Record) matches(monName string, sender netip.Addr) bool {
	if monName != "" && (monName == r.MonName || (r.Caller != "" && monName == r.Caller)) {
		return true
	}
	sender = sender.Unmap()
	for _, a := range r.Addrs {
		if a == sender || (monName != "" && a.String() == monName) {
			return true
		}
	}
	return false
}
