package dlm

import (
	"encoding/binary"
	"hash/maphash"
	"net/netip"
	"sync"
	"sync/atomic"
)

// Registry interns hosts and owners for a backend. Lookups take one shard
// mutex; Sweep forgets records that hold nothing and were not looked up
// since the previous Sweep (two sweeps make sure no request that looked a
// record up is still using it).
type Registry struct {
	seed   maphash.Seed
	gen    atomic.Uint32
	nextID atomic.Uint32
	hosts  [16]hostShard
	owners [64]ownerShard

	// perAddr counts the hosts of each client address (per virtual
	// server), against maxPerAddr; only a new host and Sweep touch it.
	limitMu    sync.Mutex
	maxPerAddr int
	perAddr    map[addrKey]int
}

type addrKey struct{ vip, addr netip.Addr }

// SetHostLimit bounds the hosts one client address may have through one
// virtual server — caller_names, as clients call themselves — at n (0: no
// bound). A host beyond it is not created: HostLimited and OwnerLimited
// return nil. One address could otherwise make the service keep as many
// hosts, owners and monitor records as it has names to send.
func (r *Registry) SetHostLimit(n int) {
	r.limitMu.Lock()
	r.maxPerAddr = n
	r.limitMu.Unlock()
}

type hostShard struct {
	mu sync.Mutex
	m  map[HostKey]*Host
	_  [40]byte // keep shards on separate cache lines
}

// ownerShard keys owners by a hash of their identity, so that a request can
// find its owner from the caller_name bytes it decoded without building a
// string; colliding owners share a bucket.
type ownerShard struct {
	mu sync.Mutex
	m  map[uint64][]*Owner
	_  [40]byte
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	r := &Registry{seed: maphash.MakeSeed(), perAddr: map[addrKey]int{}}
	r.gen.Store(1)
	for i := range r.hosts {
		r.hosts[i].m = map[HostKey]*Host{}
	}
	for i := range r.owners {
		r.owners[i].m = map[uint64][]*Owner{}
	}
	return r
}

func (r *Registry) hostShard(k *HostKey) *hostShard {
	return &r.hosts[maphash.String(r.seed, k.Name)%uint64(len(r.hosts))]
}

// Host returns the interned host for key.
func (r *Registry) Host(key HostKey) *Host { return r.host(key, false) }

// HostLimited is Host for a request: nil when the host is new and its
// address has as many as SetHostLimit allows.
func (r *Registry) HostLimited(key HostKey) *Host { return r.host(key, true) }

func (r *Registry) host(key HostKey, limited bool) *Host {
	key.VIP, key.Addr = key.VIP.Unmap(), key.Addr.Unmap()
	s := r.hostShard(&key)
	gen := r.gen.Load()
	s.mu.Lock()
	h := s.m[key]
	if h == nil {
		if !r.admit(key, limited) {
			s.mu.Unlock()
			return nil
		}
		h = &Host{HostKey: key, id: r.nextID.Add(1)}
		s.m[key] = h
	}
	h.used.Store(gen)
	s.mu.Unlock()
	return h
}

// admit counts a new host of key's address, unless limited and the
// address is at its bound.
func (r *Registry) admit(key HostKey, limited bool) bool {
	k := addrKey{key.VIP, key.Addr}
	r.limitMu.Lock()
	defer r.limitMu.Unlock()
	if limited && r.maxPerAddr > 0 && r.perAddr[k] >= r.maxPerAddr {
		return false
	}
	r.perAddr[k]++
	return true
}

func (r *Registry) forget(key HostKey) {
	k := addrKey{key.VIP, key.Addr}
	r.limitMu.Lock()
	if r.perAddr[k]--; r.perAddr[k] <= 0 {
		delete(r.perAddr, k)
	}
	r.limitMu.Unlock()
}

// ownerHash mixes the parts of an owner's identity; nameHash is the hash of
// the caller_name.
func ownerHash(nameHash uint64, vip, addr netip.Addr, svid int32) uint64 {
	v, a := vip.As16(), addr.As16()
	h := nameHash ^ uint64(uint32(svid))*0x9e3779b97f4a7c15
	h ^= binary.LittleEndian.Uint64(v[8:])*0xbf58476d1ce4e5b9 ^ binary.LittleEndian.Uint64(v[:8])
	h ^= binary.LittleEndian.Uint64(a[8:])*0x94d049bb133111eb ^ binary.LittleEndian.Uint64(a[:8])*0xff51afd7ed558ccd
	return h
}

func (o *Owner) is(vip, addr netip.Addr, name []byte, svid int32) bool {
	return o.SVID == svid && o.Host.VIP == vip && o.Host.Addr == addr && o.Host.Name == string(name)
}

// Owner returns the interned owner for key.
func (r *Registry) Owner(key OwnerKey) *Owner {
	key.VIP, key.Addr = key.VIP.Unmap(), key.Addr.Unmap()
	return r.owner(maphash.String(r.seed, key.Name), key.VIP, key.Addr, []byte(key.Name), key.SVID, false)
}

// OwnerOf returns the interned owner of a request, from the caller_name
// bytes it decoded: no allocation once the owner exists. It is nil when
// the owner's host would be new and its address is at the bound of
// SetHostLimit.
func (r *Registry) OwnerOf(vip, addr netip.Addr, name []byte, svid int32) *Owner {
	return r.owner(maphash.Bytes(r.seed, name), vip.Unmap(), addr.Unmap(), name, svid, true)
}

func (r *Registry) owner(nameHash uint64, vip, addr netip.Addr, name []byte, svid int32, limited bool) *Owner {
	h := ownerHash(nameHash, vip, addr, svid)
	s := &r.owners[h%uint64(len(r.owners))]
	gen := r.gen.Load()
	s.mu.Lock()
	for _, o := range s.m[h] {
		if o.is(vip, addr, name, svid) {
			o.used.Store(gen)
			o.Host.used.Store(gen)
			s.mu.Unlock()
			return o
		}
	}
	s.mu.Unlock()
	host := r.host(HostKey{VIP: vip, Name: string(name), Addr: addr}, limited) // lock order: never an owner shard, then a host shard
	if host == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, o := range s.m[h] {
		if o.is(vip, addr, name, svid) {
			o.used.Store(gen)
			return o
		}
	}
	o := &Owner{Host: host, SVID: svid}
	o.used.Store(gen)
	host.owners.Add(1)
	s.m[h] = append(s.m[h], o)
	return o
}

// Hosts calls fn for every known host until fn returns false.
func (r *Registry) Hosts(fn func(*Host) bool) {
	for i := range r.hosts {
		s := &r.hosts[i]
		s.mu.Lock()
		hs := make([]*Host, 0, len(s.m))
		for _, h := range s.m {
			hs = append(hs, h)
		}
		s.mu.Unlock()
		for _, h := range hs {
			if !fn(h) {
				return
			}
		}
	}
}

// Sweep forgets idle hosts and owners that were not looked up since the
// previous Sweep.
func (r *Registry) Sweep() {
	gen := r.gen.Add(1)
	stale := func(used uint32) bool { return gen-used >= 2 }
	for i := range r.owners {
		s := &r.owners[i]
		s.mu.Lock()
		for h, bucket := range s.m {
			keep := bucket[:0]
			for _, o := range bucket {
				if o.held.Load() == 0 && stale(o.used.Load()) {
					o.Host.owners.Add(-1)
					continue
				}
				keep = append(keep, o)
			}
			if len(keep) == 0 {
				delete(s.m, h)
			} else {
				clear(bucket[len(keep):])
				s.m[h] = keep
			}
		}
		s.mu.Unlock()
	}
	for i := range r.hosts {
		s := &r.hosts[i]
		s.mu.Lock()
		for k, h := range s.m {
			if h.Idle() && h.owners.Load() == 0 && stale(h.used.Load()) {
				delete(s.m, k)
				r.forget(k)
			}
		}
		s.mu.Unlock()
	}
}

// Len returns the number of interned hosts and owners.
func (r *Registry) Len() (hosts, owners int) {
	for i := range r.hosts {
		r.hosts[i].mu.Lock()
		hosts += len(r.hosts[i].m)
		r.hosts[i].mu.Unlock()
	}
	for i := range r.owners {
		r.owners[i].mu.Lock()
		for _, b := range r.owners[i].m {
			owners += len(b)
		}
		r.owners[i].mu.Unlock()
	}
	return hosts, owners
}
