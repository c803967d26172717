package dlm

import "slices"

// State is the stored lock state of one file: held locks in an interval
// tree, blocked requests in arrival order, and DOS shares. Backends keep
// States; the lock manager works on a File, a view of one State during an
// Update that records what changes.
//
// Held locks are kept in a treap ordered by (start, host, svid) and
// augmented with the largest end in each subtree, so finding the locks
// that overlap a range costs O(log n + k) for n locks on the file and k
// results, and inserting or removing one costs O(log n). The lock manager
// keeps each owner's ranges disjoint, which makes that order total.
//
// A State is 32 bytes: a file with one lock costs that, its handle, its
// map entry in the backend, and one 64-byte tree node.
type State struct {
	fh   string
	root *Held
	more *fileMore // blocked requests and shares, allocated when needed
}

// NewState returns the empty state of the file with handle fh.
func NewState(fh string) *State { return &State{fh: fh} }

// FH is the file handle.
func (s *State) FH() string { return s.fh }

// Empty reports whether the file has no locks, blocked requests, pending
// grants or shares.
func (s *State) Empty() bool {
	return s.root == nil && (s.more == nil || s.more.empty())
}

// File is the lock manager's handle on one file's State during an Update:
// reads and edits go to the state, and every edit is recorded in the Edit
// the backend attached. A File is not safe for concurrent use: a backend
// gives one to one Update at a time.
type File struct {
	*State
	edit *Edit
}

// NewFile returns a File on a new, empty State, with no Edit attached.
func NewFile(fh string) *File { return &File{State: NewState(fh)} }

// Bind points f at state s with edit e (nil for a read-only view); backends
// reuse one File per lock domain this way.
func (f *File) Bind(s *State, e *Edit) { f.State, f.edit = s, e }

type fileMore struct {
	waiters []*Waiter // ascending Seq
	shares  []*Share
	pending []*Waiter // granted, callback not answered yet
	// pendingAt indexes pending by waiter Seq once there are many (a
	// release that grants thousands, each settled by its own callback).
	pendingAt map[uint64]int
	// seq is the last waiter sequence number given out. It starts over
	// only once the file has no waiters and no pending grants left, so
	// the numbers of those never repeat.
	seq uint64
}

func (m *fileMore) empty() bool {
	return len(m.waiters) == 0 && len(m.shares) == 0 && len(m.pending) == 0
}

// Held is one held lock in a File's tree. Its fields change only through
// File methods.
type Held struct {
	start, end, maxEnd uint64
	epoch              uint64
	owner              *Owner
	bits               uint32 // treap priority << 1 | exclusive
	since              uint32 // fills the padding after bits: 64 bytes still
	left, right        *Held
}

// Owner is the lock's owner.
func (h *Held) Owner() *Owner { return h.owner }

// Range is the locked range.
func (h *Held) Range() Range { return Range{h.start, h.end} }

// Exclusive reports a write lock.
func (h *Held) Exclusive() bool { return h.bits&1 != 0 }

// Epoch is the virtual-server epoch the lock was granted or reclaimed in.
func (h *Held) Epoch() uint64 { return h.epoch }

// Lock returns the lock by value.
func (h *Held) Lock() Lock {
	return Lock{Owner: h.owner, Range: h.Range(), Exclusive: h.Exclusive(), Since: h.since, Epoch: h.epoch}
}

// Clone returns a deep copy of the state: an optimistic backend runs an
// Update's function on a copy, and throws the copy away if the commit
// fails. Owners and hosts are shared (they are interned); the copy's
// waiters and pending grants are copies, with their Prev.
func (s *State) Clone() *State {
	c := &State{fh: s.fh, root: cloneTree(s.root)}
	if m := s.more; m != nil {
		cm := &fileMore{seq: m.seq}
		for _, w := range m.waiters {
			cm.waiters = append(cm.waiters, w.clone())
		}
		for _, p := range m.pending {
			cm.pending = append(cm.pending, p.clone())
		}
		if m.pendingAt != nil {
			cm.pendingAt = make(map[uint64]int, len(m.pendingAt))
			for k, v := range m.pendingAt {
				cm.pendingAt[k] = v
			}
		}
		for _, sh := range m.shares {
			x := *sh
			cm.shares = append(cm.shares, &x)
		}
		c.more = cm
	}
	return c
}

func cloneTree(t *Held) *Held {
	if t == nil {
		return nil
	}
	c := *t
	c.left, c.right = cloneTree(t.left), cloneTree(t.right)
	return &c
}

func (w *Waiter) clone() *Waiter {
	c := *w
	c.Prev = slices.Clone(w.Prev)
	return &c
}

// Records calls fn with the host and epoch of every record of the file —
// held locks, blocked requests, pending grants, shares — until fn returns
// false. Bulk operations find what a Selector concerns through it.
func (s *State) Records(fn func(h *Host, epoch uint64) bool) {
	if !visit(s.root, Range{0, Inf}, func(x *Held) bool { return fn(x.owner.Host, x.epoch) }) || s.more == nil {
		return
	}
	for _, w := range s.more.waiters {
		if !fn(w.Owner.Host, w.Epoch) {
			return
		}
	}
	for _, p := range s.more.pending {
		if !fn(p.Owner.Host, p.Epoch) {
			return
		}
	}
	for _, sh := range s.more.shares {
		if !fn(sh.Host, sh.Epoch) {
			return
		}
	}
}

// Involves reports whether a host sel selects has a record in the file:
// the files a bulk operation (UpdateAll) visits.
func (s *State) Involves(sel *Selector) bool {
	found := false
	s.Records(func(h *Host, _ uint64) bool { found = sel.Match(h); return !found })
	return found
}

// Len is the number of held lock ranges (it walks the tree).
func (s *State) Len() int {
	n := 0
	visit(s.root, Range{0, Inf}, func(*Held) bool { n++; return true })
	return n
}

// Overlapping calls fn for each held lock that overlaps r, in ascending
// order of start, until fn returns false. fn must not change the file.
func (f *File) Overlapping(r Range, fn func(*Held) bool) {
	if r.Start < r.End {
		visit(f.root, r, fn)
	}
}

// All calls fn for each held lock in ascending order of start until fn
// returns false. fn must not change the file.
func (f *File) All(fn func(*Held) bool) { visit(f.root, Range{0, Inf}, fn) }

func visit(t *Held, r Range, fn func(*Held) bool) bool {
	for t != nil && t.maxEnd > r.Start {
		if l := t.left; l != nil && l.maxEnd > r.Start && !visit(l, r, fn) {
			return false
		}
		if t.start >= r.End {
			return true // t and everything right of it start too late
		}
		if t.end > r.Start && !fn(t) {
			return false
		}
		t = t.right
	}
	return true
}

// Insert adds a held lock. The caller (the lock manager) guarantees that the
// owner holds nothing else overlapping l.Range.
func (f *File) Insert(l Lock) {
	n := f.edit.node()
	*n = Held{start: l.Range.Start, end: l.Range.End, epoch: l.Epoch, owner: l.Owner, since: l.Since}
	n.bits = f.priority(n) << 1
	if l.Exclusive {
		n.bits |= 1
	}
	f.root = insert(f.root, n)
	f.note(l.Owner, l.Owner.Host, 1, 0, 0)
}

// Remove removes a held lock. The caller must not use h afterwards: its
// node may be recycled by the next Insert of the same Update domain.
func (f *File) Remove(h *Held) {
	var found bool
	f.root, found = remove(f.root, h)
	if !found {
		return
	}
	f.note(h.owner, h.owner.Host, -1, 0, 0)
	f.edit.recycle(h)
}

// Restamp sets the epoch of a held lock (a reclaim in a new epoch).
func (f *File) Restamp(h *Held, epoch uint64) {
	if h.epoch != epoch {
		h.epoch = epoch
		f.changed()
	}
}

// priority derives a treap priority from the node's key, mixed with the
// backend's seed so that keys chosen by a client cannot unbalance the tree.
func (f *File) priority(n *Held) uint32 {
	var seed uint64
	if f.edit != nil {
		seed = f.edit.Seed
	}
	x := seed ^ n.start*0x9e3779b97f4a7c15 ^ uint64(n.owner.Host.id)<<32 ^ uint64(uint32(n.owner.SVID))
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return uint32(x) >> 1
}

func less(a, b *Held) bool {
	if a.start != b.start {
		return a.start < b.start
	}
	if a.owner.Host.id != b.owner.Host.id {
		return a.owner.Host.id < b.owner.Host.id
	}
	return a.owner.SVID < b.owner.SVID
}

func prio(t *Held) uint32 { return t.bits >> 1 }

func fix(t *Held) {
	m := t.end
	if t.left != nil && t.left.maxEnd > m {
		m = t.left.maxEnd
	}
	if t.right != nil && t.right.maxEnd > m {
		m = t.right.maxEnd
	}
	t.maxEnd = m
}

func insert(t, n *Held) *Held {
	if t == nil {
		n.left, n.right = nil, nil
		n.maxEnd = n.end
		return n
	}
	if less(n, t) {
		t.left = insert(t.left, n)
		if prio(t.left) > prio(t) {
			l := t.left
			t.left = l.right
			l.right = t
			fix(t)
			t = l
		}
	} else {
		t.right = insert(t.right, n)
		if prio(t.right) > prio(t) {
			r := t.right
			t.right = r.left
			r.left = t
			fix(t)
			t = r
		}
	}
	fix(t)
	return t
}

func remove(t, n *Held) (*Held, bool) {
	if t == nil {
		return nil, false
	}
	if t == n {
		return merge(t.left, t.right), true
	}
	var found bool
	if less(n, t) {
		t.left, found = remove(t.left, n)
	} else {
		t.right, found = remove(t.right, n)
	}
	if found {
		fix(t)
	}
	return t, found
}

// merge joins two treaps where every key of a precedes every key of b.
func merge(a, b *Held) *Held {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	case prio(a) > prio(b):
		a.right = merge(a.right, b)
		fix(a)
		return a
	default:
		b.left = merge(a, b.left)
		fix(b)
		return b
	}
}

// Waiters returns the blocked requests in arrival order (ascending Seq).
// The slice must not be changed.
func (f *File) Waiters() []*Waiter {
	if f.more == nil {
		return nil
	}
	return f.more.waiters
}

// AddWaiter queues a blocked request at the end, numbering it (Seq) unless
// it has a number already (a backend that loaded it).
func (f *File) AddWaiter(w *Waiter) {
	f.number(w).waiters = append(f.more.waiters, w)
	f.note(w.Owner, w.Owner.Host, 0, 1, 0)
}

// RemoveWaiter takes a blocked request out of the queue.
func (f *File) RemoveWaiter(w *Waiter) {
	if f.more == nil {
		return
	}
	i := slices.Index(f.more.waiters, w)
	if i < 0 {
		return
	}
	f.more.waiters = slices.Delete(f.more.waiters, i, i+1)
	f.note(w.Owner, w.Owner.Host, 0, -1, 0)
	f.compact()
}

// RemoveWaiters takes several blocked requests out of the queue in one
// pass (a release that grants thousands at once would otherwise walk the
// queue once per grant).
func (f *File) RemoveWaiters(ws []*Waiter) {
	if f.more == nil || len(ws) == 0 {
		return
	}
	if len(ws) == 1 {
		f.RemoveWaiter(ws[0])
		return
	}
	gone := make(map[*Waiter]struct{}, len(ws))
	for _, w := range ws {
		gone[w] = struct{}{}
	}
	f.more.waiters = slices.DeleteFunc(f.more.waiters, func(w *Waiter) bool {
		if _, ok := gone[w]; ok {
			f.note(w.Owner, w.Owner.Host, 0, -1, 0)
			return true
		}
		return false
	})
	f.compact()
}

// RestampShare sets the epoch of a share reservation (a reclaim in a new
// epoch), recorded like every other edit.
func (f *File) RestampShare(s *Share, epoch uint64) {
	if s.Epoch != epoch {
		s.Epoch = epoch
		f.changed()
	}
}

// Shares returns the share reservations. The slice must not be changed.
func (f *File) Shares() []*Share {
	if f.more == nil {
		return nil
	}
	return f.more.shares
}

// AddShare adds a share reservation.
func (f *File) AddShare(s *Share) {
	if f.more == nil {
		f.more = &fileMore{}
	}
	f.more.shares = append(f.more.shares, s)
	f.note(nil, s.Host, 0, 0, 1)
}

// RemoveShare removes a share reservation.
func (f *File) RemoveShare(s *Share) {
	if f.more == nil {
		return
	}
	i := slices.Index(f.more.shares, s)
	if i < 0 {
		return
	}
	f.more.shares = slices.Delete(f.more.shares, i, i+1)
	f.note(nil, s.Host, 0, 0, -1)
	f.compact()
}

func (f *File) compact() {
	if f.more.empty() {
		f.more = nil
	}
}

// number gives w the file's next sequence number unless it has one (a
// backend that loaded it), keeps the counter above it, and returns the
// file's queue storage.
func (f *File) number(w *Waiter) *fileMore {
	if f.more == nil {
		f.more = &fileMore{}
	}
	m := f.more
	if w.Seq == 0 {
		m.seq++
		w.Seq = m.seq
	}
	m.seq = max(m.seq, w.Seq)
	return m
}

// Pending returns the grants whose callback is not answered yet, in no
// particular order. The slice must not be changed.
func (f *File) Pending() []*Waiter {
	if f.more == nil {
		return nil
	}
	return f.more.pending
}

// AddPending records a granted waiter whose callback is still to be
// answered, numbering it (Seq) unless it has a number already.
func (f *File) AddPending(p *Waiter) {
	m := f.number(p)
	m.pending = append(m.pending, p)
	if m.pendingAt != nil {
		m.pendingAt[p.Seq] = len(m.pending) - 1
	} else if len(m.pending) > indexFrom {
		m.pendingAt = make(map[uint64]int, 2*len(m.pending))
		for i, x := range m.pending {
			m.pendingAt[x.Seq] = i
		}
	}
	f.changed()
}

// FindPending returns the pending grant of the waiter numbered seq, if
// it is still pending.
func (f *File) FindPending(seq uint64) *Waiter {
	if f.more == nil {
		return nil
	}
	m := f.more
	if m.pendingAt != nil {
		if i, ok := m.pendingAt[seq]; ok {
			return m.pending[i]
		}
		return nil
	}
	for _, p := range m.pending {
		if p.Seq == seq {
			return p
		}
	}
	return nil
}

// RemovePending forgets a pending grant (its callback was answered, given
// up or undone, or its host dropped).
func (f *File) RemovePending(p *Waiter) {
	if f.more == nil {
		return
	}
	m := f.more
	i := -1
	if m.pendingAt != nil {
		if j, ok := m.pendingAt[p.Seq]; ok && m.pending[j] == p {
			i = j
		}
	} else {
		i = slices.Index(m.pending, p)
	}
	if i < 0 {
		return
	}
	// Order does not matter: swap the last one in.
	last := len(m.pending) - 1
	m.pending[i] = m.pending[last]
	m.pending[last] = nil
	m.pending = m.pending[:last]
	if m.pendingAt != nil {
		delete(m.pendingAt, p.Seq)
		if i < last {
			m.pendingAt[m.pending[i].Seq] = i
		}
		if len(m.pending) == 0 {
			m.pendingAt = nil
		}
	}
	f.changed()
	f.compact()
}

// Edit records what an Update changed, for the backend to commit: counter
// deltas per owner and host. (Fencing is not the edit's business: the
// backend checks the acting Claim, whatever the records' stamps.) Backends own Edits and attach one with File.Bind for
// the duration of an Update.
type Edit struct {
	// Seed mixes the treap priorities (set once by the backend).
	Seed    uint64
	Deltas  []Delta
	Changed bool
	// index finds an owner's delta once an edit touches many owners (a
	// release granting thousands of waiters at once); small edits scan.
	index map[deltaKey]int
	// free recycles removed tree nodes into later inserts: a file that is
	// locked and unlocked over and over allocates nothing. A backend whose
	// Updates may re-run on a fresh copy of the state must use a new Edit
	// per copy (or none) so that no node of a discarded copy is reused
	// while still referenced.
	free []*Held
}

const maxFree = 64

// node returns a recycled node, or a new one.
func (e *Edit) node() *Held {
	if e != nil {
		if n := len(e.free); n > 0 {
			h := e.free[n-1]
			e.free = e.free[:n-1]
			return h
		}
	}
	return new(Held)
}

func (e *Edit) recycle(h *Held) {
	if e != nil && len(e.free) < maxFree {
		*h = Held{}
		e.free = append(e.free, h)
	}
}

// Delta is a change of counters. Owner is nil for share changes.
type Delta struct {
	Owner                  *Owner
	Host                   *Host
	Locks, Blocked, Shares int64
}

type deltaKey struct {
	o *Owner
	h *Host
}

// indexFrom is the number of deltas from which note uses the index.
const indexFrom = 16

// Reset clears the edit for the next Update, keeping its storage.
func (e *Edit) Reset() {
	e.Deltas = e.Deltas[:0]
	e.Changed = false
	if e.index != nil {
		e.index = nil // rare and possibly large: not worth keeping
	}
}

// Apply adds the deltas to the owners' and hosts' counters.
func (e *Edit) Apply() {
	for _, d := range e.Deltas {
		// Atomic adds cost: skip the counters an edit did not move (a lock
		// and its unlock in one file, for instance, net to zero).
		if n := d.Locks + d.Blocked; d.Owner != nil && n != 0 {
			d.Owner.held.Add(n)
		}
		if d.Locks != 0 {
			d.Host.locks.Add(d.Locks)
		}
		if d.Blocked != 0 {
			d.Host.blocked.Add(d.Blocked)
		}
		if d.Shares != 0 {
			d.Host.shares.Add(d.Shares)
		}
	}
}

func (f *File) changed() {
	if f.edit != nil {
		f.edit.Changed = true
	}
}

func (f *File) note(o *Owner, h *Host, locks, blocked, shares int64) {
	e := f.edit
	if e == nil {
		return
	}
	e.Changed = true
	i := e.deltaOf(o, h)
	if i < 0 {
		e.Deltas = append(e.Deltas, Delta{Owner: o, Host: h, Locks: locks, Blocked: blocked, Shares: shares})
		if e.index != nil {
			e.index[deltaKey{o, h}] = len(e.Deltas) - 1
		}
		return
	}
	d := &e.Deltas[i]
	d.Locks += locks
	d.Blocked += blocked
	d.Shares += shares
}

// deltaOf finds the delta of (o, h), or -1.
func (e *Edit) deltaOf(o *Owner, h *Host) int {
	if e.index != nil {
		if i, ok := e.index[deltaKey{o, h}]; ok {
			return i
		}
		return -1
	}
	for i := range e.Deltas {
		if d := &e.Deltas[i]; d.Owner == o && d.Host == h {
			return i
		}
	}
	if len(e.Deltas) >= indexFrom {
		e.index = make(map[deltaKey]int, 2*len(e.Deltas))
		for i, d := range e.Deltas {
			e.index[deltaKey{d.Owner, d.Host}] = i
		}
	}
	return -1
}

// Account adds sign (+1 or -1) times every record of s to the edit's
// counter deltas: a backend that replaces a file's state wholesale (a
// shared one, learning of a change another node made) moves the counters
// by Account(old, -1) and Account(new, +1), then Apply.
func (e *Edit) Account(s *State, sign int64) {
	if s == nil {
		return
	}
	f := File{State: s, edit: e}
	visit(s.root, Range{0, Inf}, func(h *Held) bool { f.note(h.owner, h.owner.Host, sign, 0, 0); return true })
	if m := s.more; m != nil {
		for _, w := range m.waiters {
			f.note(w.Owner, w.Owner.Host, 0, sign, 0)
		}
		for _, sh := range m.shares {
			f.note(nil, sh.Host, 0, 0, sign)
		}
	}
}
