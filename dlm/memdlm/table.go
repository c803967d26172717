package memdlm

import "github.com/nlmha/nlmha/dlm"

// fileTable maps file handles to states: open addressing with linear
// probing over the handle's 64-bit hash, which the backend computes once
// per request (its top bits also choose the shard, its low bits the slot).
// A slot is 16 bytes and the handle is stored only once, in the state,
// which keeps a million files' index at about 25 bytes each and a lookup
// at one hash and usually one cache line of probing.
type fileTable struct {
	slots []slot // len is a power of two, or 0
	n     int
}

type slot struct {
	h  uint64
	st *dlm.State // nil: empty
}

const minSlots = 16

func (t *fileTable) get(h uint64, fh []byte) *dlm.State {
	if len(t.slots) == 0 {
		return nil
	}
	mask := uint64(len(t.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.st == nil {
			return nil
		}
		if s.h == h && s.st.FH() == string(fh) {
			return s.st
		}
	}
}

// put adds st, which must not be in the table.
func (t *fileTable) put(h uint64, st *dlm.State) {
	if (t.n+1)*4 > len(t.slots)*3 {
		t.resize(max(minSlots, 2*len(t.slots)))
	}
	t.insert(h, st)
	t.n++
}

func (t *fileTable) insert(h uint64, st *dlm.State) {
	mask := uint64(len(t.slots) - 1)
	i := h & mask
	for t.slots[i].st != nil {
		i = (i + 1) & mask
	}
	t.slots[i] = slot{h: h, st: st}
}

// del removes st, shifting later entries of its probe run back so that no
// tombstones are needed.
func (t *fileTable) del(h uint64, st *dlm.State) {
	if len(t.slots) == 0 {
		return
	}
	mask := uint64(len(t.slots) - 1)
	i := h & mask
	for t.slots[i].st != st {
		if t.slots[i].st == nil {
			return
		}
		i = (i + 1) & mask
	}
	t.slots[i] = slot{}
	t.n--
	for j := (i + 1) & mask; t.slots[j].st != nil; j = (j + 1) & mask {
		home := t.slots[j].h & mask
		// Move j back to i unless its home lies cyclically in (i, j].
		if (j > i && (home <= i || home > j)) || (j < i && home <= i && home > j) {
			t.slots[i], t.slots[j] = t.slots[j], slot{}
			i = j
		}
	}
	if len(t.slots) > minSlots && t.n*8 < len(t.slots) {
		t.resize(len(t.slots) / 2)
	}
}

func (t *fileTable) resize(n int) {
	old := t.slots
	t.slots = make([]slot, n)
	for _, s := range old {
		if s.st != nil {
			t.insert(s.h, s.st)
		}
	}
}

// each calls fn for every state until fn returns false. fn must not add
// or remove entries.
func (t *fileTable) each(fn func(*dlm.State) bool) {
	for _, s := range t.slots {
		if s.st != nil && !fn(s.st) {
			return
		}
	}
}
