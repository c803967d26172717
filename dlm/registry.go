package dlm

import (
	"hash/maphash"
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
}

type hostShard struct {
	mu sync.Mutex
	m  map[HostKey]*Host
	_  [40]byte // keep shards on separate cache lines
}

type ownerShard struct {
	mu sync.Mutex
	m  map[OwnerKey]*Owner
	_  [40]byte
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	r := &Registry{seed: maphash.MakeSeed()}
	r.gen.Store(1)
	for i := range r.hosts {
		r.hosts[i].m = map[HostKey]*Host{}
	}
	for i := range r.owners {
		r.owners[i].m = map[OwnerKey]*Owner{}
	}
	return r
}

func (r *Registry) hostShard(k *HostKey) *hostShard {
	return &r.hosts[maphash.String(r.seed, k.Name)%uint64(len(r.hosts))]
}

// Host returns the interned host for key.
func (r *Registry) Host(key HostKey) *Host {
	key.VIP, key.Addr = key.VIP.Unmap(), key.Addr.Unmap()
	s := r.hostShard(&key)
	gen := r.gen.Load()
	s.mu.Lock()
	h := s.m[key]
	if h == nil {
		h = &Host{HostKey: key, id: r.nextID.Add(1)}
		s.m[key] = h
	}
	h.used.Store(gen)
	s.mu.Unlock()
	return h
}

// Owner returns the interned owner for key.
func (r *Registry) Owner(key OwnerKey) *Owner {
	key.VIP, key.Addr = key.VIP.Unmap(), key.Addr.Unmap()
	s := &r.owners[(maphash.String(r.seed, key.Name)^uint64(uint32(key.SVID))*0x9e3779b97f4a7c15)%uint64(len(r.owners))]
	gen := r.gen.Load()
	s.mu.Lock()
	o := s.m[key]
	if o == nil {
		s.mu.Unlock()
		h := r.Host(key.HostKey) // outside the owner shard: lock order hosts → none
		s.mu.Lock()
		if o = s.m[key]; o == nil {
			o = &Owner{Host: h, SVID: key.SVID}
			h.owners.Add(1)
			s.m[key] = o
		}
	}
	o.used.Store(gen)
	o.Host.used.Store(gen)
	s.mu.Unlock()
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
		for k, o := range s.m {
			if o.held.Load() == 0 && stale(o.used.Load()) {
				delete(s.m, k)
				o.Host.owners.Add(-1)
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
		owners += len(r.owners[i].m)
		r.owners[i].mu.Unlock()
	}
	return hosts, owners
}
