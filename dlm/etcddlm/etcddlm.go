// Package etcddlm is the lock backend shared by the nodes of a cluster:
// every file's lock state is one etcd key, written by one conditional
// transaction per change.
//
// Each node keeps a mirror of every file's state, fed by a watch on the
// files' prefix, so a request that changes a file reads nothing from
// etcd first: the lock manager decides on the mirrored state and the node
// commits the result with
//
//	If(ModRevision(file) == mirrored revision, Value(claim) == this node's claim)
//	Then(Put or Delete file)
//	Else(Get file, Get claim)
//
// A mirror that lagged behind another node's change fails the first
// comparison; the Else branch brings the file's current state, and the
// edit runs again on it. So nothing is granted on stale knowledge, and a
// change costs one round trip and one write. A decision that changes
// nothing (a denial, a TEST) is confirmed by one read-only transaction
// (If ModRevision == mirrored revision), so none reaches a client from a
// stale mirror either.
//
// Fencing: a virtual server's claim is a key, <prefix>c/<address>, whose
// value names the epoch and the node acting for it. A node that takes
// the virtual server over writes a later epoch there, and from then on
// every transaction of the previous owner fails its comparison, however
// late it arrives. Lock records are not bound to any lease: a node's
// pause or death leaves them in place, stamped with their epoch, for the
// next owner's clients to reclaim.
//
// The mirror also feeds the hosts' counters (dlm.Host), with every
// node's changes: a node's view of a client covers the whole cluster.
package etcddlm

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nlmha/nlmha/dlm"
)

// Config configures a Backend.
type Config struct {
	// Client is the etcd client; the caller closes it after the backend.
	Client *clientv3.Client
	// Prefix of every key (several nlmha clusters may share one etcd);
	// default "/nlmha/".
	Prefix string
	// Node names this node in claims (default: the host name).
	Node string
	Log  *slog.Logger
	// MaxTxnOps and MaxTxnBytes bound one transaction of a bulk edit:
	// etcd's --max-txn-ops (default 128) and a share of
	// --max-request-bytes (default 1.5 MiB).
	MaxTxnOps   int
	MaxTxnBytes int
	// Retries is how many times an edit runs again after losing a race
	// on its file before failing with dlm.ErrConflict (default 32).
	Retries int
	// RequestTimeout bounds each etcd call (default 5 s).
	RequestTimeout time.Duration
}

// Stats are the backend's counters, for metrics.
type Stats struct {
	Txns      uint64 // transactions sent (writes)
	Reads     uint64 // reads that checked the mirror was current
	Retries   uint64 // edits run again after a lost race
	Fenced    uint64 // edits refused because the claim moved on
	Conflicts uint64 // edits that gave up (dlm.ErrConflict)
	Relists   uint64 // full reloads of the mirror (watch compacted)
	// SelfFenced counts the times the node fenced itself (its lease's
	// deadline passed unrenewed).
	SelfFenced uint64
}

const nShards = 64

// maxRemoteGrants bounds the grants waiting to be called back.
const maxRemoteGrants = 4096

var _ dlm.RemoteGrants = (*Backend)(nil)

// RemoteGrants delivers the pending grants another node made for a
// virtual server this node holds an active claim of.
func (b *Backend) RemoteGrants() <-chan dlm.RemoteGrant { return b.grants }

// Backend is the etcd lock backend.
type Backend struct {
	*dlm.Registry
	cli      *clientv3.Client
	log      *slog.Logger
	node     string
	filePfx  string
	claimPfx string
	syncKey  string
	maxOps   int
	maxBytes int
	retries  int
	timeout  time.Duration
	seed     maphash.Seed
	treap    uint64
	shards   [nShards]shard
	empty    dlm.State

	claimMu sync.Mutex
	claims  atomic.Pointer[dlm.ClaimTable]
	expired atomic.Bool // self-fenced: no fenced edit runs
	// deadline (nanoseconds after base, on the monotonic clock; 0: none)
	// is when the node's lease may expire: every fenced edit checks it,
	// so none runs past it even before the keepalive loop notices.
	base     time.Time
	deadline atomic.Int64
	// claimsLost reports virtual servers whose claim etcd showed to have
	// moved on (a fenced commit): the node no longer owns them.
	claimsLost chan netip.Addr

	// watchRev is the revision up to which the mirror has every change;
	// progress wakes those waiting for it (sync).
	revMu    sync.Mutex
	watchRev int64
	progress chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	closed atomic.Bool

	// grants delivers pending grants another node made (RemoteGrants).
	grants        chan dlm.RemoteGrant
	grantsDropped atomic.Uint64

	txns, reads, retried, fenced, conflicts, relists, fences atomic.Uint64
}

type shard struct {
	mu    sync.Mutex
	files map[string]*entry
}

// entry is one file in the mirror. Its state is never edited in place:
// an edit works on a clone and installs it, so readers may hold on to a
// state after letting go of the shard lock.
type entry struct {
	op    sync.Mutex // serialises this node's edits of the file
	users int        // edits holding the entry (shard lock)
	st    *dlm.State // nil: no state
	rev   int64      // etcd revision st is at (of the deletion if nil)
	// writing is the value this node is committing (under op): the watch
	// may bring the commit back before its response does, and what it
	// brings is then this node's own edit, not another node's grants.
	writing string
}

var _ dlm.Backend = (*Backend)(nil)

// New loads the mirror and starts the watch that keeps it current.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	if cfg.Client == nil {
		return nil, errors.New("etcddlm: no client")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "/nlmha/"
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		cfg.Prefix += "/"
	}
	if cfg.Node == "" {
		return nil, errors.New("etcddlm: no node name")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxTxnOps <= 0 {
		cfg.MaxTxnOps = 128
	}
	if cfg.MaxTxnBytes <= 0 {
		cfg.MaxTxnBytes = 1 << 20
	}
	if cfg.Retries <= 0 {
		cfg.Retries = 32
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	b := &Backend{
		Registry: dlm.NewRegistry(),
		cli:      cfg.Client,
		log:      cfg.Log,
		node:     cfg.Node,
		filePfx:  cfg.Prefix + "f/",
		claimPfx: cfg.Prefix + "c/",
		syncKey:  cfg.Prefix + "sync",
		maxOps:   cfg.MaxTxnOps,
		maxBytes: cfg.MaxTxnBytes,
		retries:  cfg.Retries,
		timeout:  cfg.RequestTimeout,
		seed:     maphash.MakeSeed(),
		treap:    rand.Uint64(),
		progress: make(chan struct{}),
		done:     make(chan struct{}),
		grants:   make(chan dlm.RemoteGrant, maxRemoteGrants),
		base:     time.Now(),

		claimsLost: make(chan netip.Addr, 64),
	}
	for i := range b.shards {
		b.shards[i].files = map[string]*entry{}
	}
	b.claims.Store(&dlm.ClaimTable{})
	b.ctx, b.cancel = context.WithCancel(context.Background())
	rev, err := b.load(ctx)
	if err != nil {
		b.cancel()
		return nil, err
	}
	go b.watch(rev)
	return b, nil
}

// Node is the node name the backend claims as.
func (b *Backend) Node() string { return b.node }

// Client is the backend's etcd client.
func (b *Backend) Client() *clientv3.Client { return b.cli }

// Prefix is the keys' prefix.
func (b *Backend) Prefix() string { return strings.TrimSuffix(b.filePfx, "f/") }

// Stats returns the backend's counters.
func (b *Backend) Stats() Stats {
	return Stats{Txns: b.txns.Load(), Reads: b.reads.Load(), Retries: b.retried.Load(), Fenced: b.fenced.Load(),
		Conflicts: b.conflicts.Load(), Relists: b.relists.Load(), SelfFenced: b.fences.Load()}
}

// Expire self-fences the node: from now on no edit under any claim runs
// (unfenced ones still do). A node does this when its lease may have
// expired: another node may be serving its virtual servers already.
func (b *Backend) Expire() { b.expired.Store(true) }

// SetDeadline sets when the node's lease may expire: no fenced edit runs
// from then on (the zero time: no deadline).
func (b *Backend) SetDeadline(t time.Time) {
	if t.IsZero() {
		b.deadline.Store(0)
		return
	}
	b.deadline.Store(max(int64(t.Sub(b.base)), 1))
}

// Expired reports whether the node self-fenced.
func (b *Backend) Expired() bool { return b.expired.Load() }

func (b *Backend) fileKey(fh []byte) string {
	return b.filePfx + base64.RawURLEncoding.EncodeToString(fh)
}

func (b *Backend) claimKey(vip netip.Addr) string { return b.claimPfx + vip.String() }

// claimValue is what the claim key holds while c is this node's: the
// epoch in fixed-width hex, so values order as epochs do, and the node.
func (b *Backend) claimValue(c dlm.Claim) string {
	return fmt.Sprintf("%016x %s", c.Epoch, b.node)
}

func parseClaim(v []byte) (epoch uint64, node string, err error) {
	e, n, ok := strings.Cut(string(v), " ")
	if !ok {
		return 0, "", fmt.Errorf("etcddlm: bad claim value %q", v)
	}
	epoch, err = strconv.ParseUint(e, 16, 64)
	return epoch, n, err
}

func (b *Backend) shardOf(fh string) *shard {
	return &b.shards[maphash.String(b.seed, fh)%nShards]
}

func (b *Backend) check(ctx context.Context) error {
	if b.closed.Load() {
		return dlm.ErrClosed
	}
	return ctx.Err()
}

// leaseOK reports ErrFenced once the node's lease may have expired (it
// self-fenced, or its deadline passed): from then on it changes nothing
// and answers nothing, whatever the claim — another node may own its
// virtual servers, and even an unfenced edit (a client's reboot) could
// undo what that node granted since.
func (b *Backend) leaseOK() error {
	if b.expired.Load() {
		return fmt.Errorf("%w: node self-fenced (lease)", dlm.ErrFenced)
	}
	if d := b.deadline.Load(); d != 0 && time.Since(b.base) >= time.Duration(d) {
		return fmt.Errorf("%w: the node's lease deadline has passed", dlm.ErrFenced)
	}
	return nil
}

// allows checks the acting claim locally: the etcd comparison is the
// fence that counts, this one stops what this node already knows to be
// over (a release in progress, a lease that may have expired).
func (b *Backend) allows(c dlm.Claim, bulk bool) error {
	if err := b.leaseOK(); err != nil {
		return err
	}
	if c.Unfenced() {
		return nil
	}
	c.VIP = c.VIP.Unmap()
	if !b.claims.Load().Allows(c, bulk) {
		return fmt.Errorf("%w: %v", dlm.ErrFenced, c)
	}
	return nil
}

// SetClaim records a claim of this node. Making a claim of a new epoch
// active also writes it to the claim key, unless a later epoch is there
// already (dlm.ErrFenced): from then on the previous owner's
// transactions fail.
func (b *Backend) SetClaim(ctx context.Context, c dlm.Claim, st dlm.ClaimState) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	c.VIP = c.VIP.Unmap()
	b.claimMu.Lock()
	defer b.claimMu.Unlock()
	cur := *b.claims.Load()
	next, err := cur.Set(c, st)
	if err != nil {
		return err
	}
	if old, ok := cur[c.VIP]; st == dlm.ClaimActive && (!ok || old.Epoch != c.Epoch) {
		if err := b.storeClaim(ctx, c); err != nil {
			return err
		}
	}
	b.claims.Store(&next)
	return nil
}

func (b *Backend) storeClaim(ctx context.Context, c dlm.Claim) error {
	key, val := b.claimKey(c.VIP), b.claimValue(c)
	for range b.retries {
		cctx, cancel := context.WithTimeout(ctx, b.timeout)
		get, err := b.cli.Get(cctx, key)
		cancel()
		if err != nil {
			return fmt.Errorf("%w: etcddlm: reading claim of %v: %w", dlm.ErrUnavailable, c.VIP, err)
		}
		var modRev int64
		if len(get.Kvs) > 0 {
			kv := get.Kvs[0]
			epoch, node, err := parseClaim(kv.Value)
			if err != nil {
				return err
			}
			switch {
			case epoch > c.Epoch || epoch == c.Epoch && node != b.node:
				return fmt.Errorf("%w: claim %v, etcd has epoch %d of node %s", dlm.ErrFenced, c, epoch, node)
			case epoch == c.Epoch:
				return nil
			}
			modRev = kv.ModRevision
		}
		cctx, cancel = context.WithTimeout(ctx, b.timeout)
		resp, err := b.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", modRev)).
			Then(clientv3.OpPut(key, val)).Commit()
		cancel()
		b.txns.Add(1)
		if err != nil {
			return fmt.Errorf("%w: etcddlm: writing claim %v: %w", dlm.ErrUnavailable, c, err)
		}
		if resp.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("%w: claim of %v", dlm.ErrConflict, c.VIP)
}

// acquire returns the file's entry, holding it against Sweep.
func (b *Backend) acquire(fh string) (*shard, *entry) {
	s := b.shardOf(fh)
	s.mu.Lock()
	e := s.files[fh]
	if e == nil {
		e = &entry{}
		s.files[fh] = e
	}
	e.users++
	s.mu.Unlock()
	return s, e
}

func (s *shard) release(e *entry) {
	s.mu.Lock()
	e.users--
	s.mu.Unlock()
}

// install makes st (nil: no state) the file's state at rev, unless the
// mirror has it at rev or later already, moving the hosts' counters
// from the old state's records to the new one's. The shard lock is held.
func install(e *entry, st *dlm.State, rev int64) {
	if rev <= e.rev {
		return
	}
	if e.st != nil || st != nil {
		var ed dlm.Edit
		ed.Account(e.st, -1)
		ed.Account(st, +1)
		ed.Apply()
	}
	e.st, e.rev = st, rev
}

// change is one file's edit, ready to commit.
type change struct {
	fh  string
	key string
	st  *dlm.State // nil: delete
	val string
	rev int64 // the file key's ModRevision the edit ran on (0: none)
	// readOnly: fn changed nothing; its outcome (a denial, a TEST) stands
	// only if the mirror was current (see verify).
	readOnly bool
}

// run runs fn on a copy of the file's mirrored state and returns the
// change to commit (readOnly if fn changed nothing). The caller holds
// e.op.
func (b *Backend) run(s *shard, e *entry, fh string, fn func(f *dlm.File) error) (*change, error) {
	s.mu.Lock()
	cur, rev := e.st, e.rev
	s.mu.Unlock()
	var work *dlm.State
	if cur != nil {
		work = cur.Clone()
	} else {
		work = dlm.NewState(fh)
	}
	ed := dlm.Edit{Seed: b.treap}
	var f dlm.File
	f.Bind(work, &ed)
	err := fn(&f)
	f.Bind(nil, nil)
	if err != nil {
		return nil, err
	}
	// A file with no state has no key: its ModRevision compares as 0.
	ch := &change{fh: fh, key: b.fileKey([]byte(fh))}
	if cur != nil {
		ch.rev = rev
	}
	switch {
	case !ed.Changed, work.Empty() && cur == nil:
		ch.readOnly = true // nothing to write; what fn decided still needs a fresh view
	case work.Empty():
	default:
		ch.st = work
		ch.val = string(dlm.AppendState(nil, work))
	}
	return ch, nil
}

func (ch *change) op() clientv3.Op {
	if ch.st == nil {
		return clientv3.OpDelete(ch.key)
	}
	return clientv3.OpPut(ch.key, ch.val)
}

// commit sends one transaction for the changes under claim c. On
// success it installs them in the mirror. Otherwise it reports whether
// the claim moved on (dlm.ErrFenced), or else installs the current
// state of the files the Else branch read, for the edits to run again.
func (b *Backend) commit(ctx context.Context, c dlm.Claim, chs []*change) (bool, error) {
	cmps := make([]clientv3.Cmp, 0, len(chs)+1)
	then := make([]clientv3.Op, 0, len(chs))
	orElse := make([]clientv3.Op, 0, len(chs)+1)
	for _, ch := range chs {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(ch.key), "=", ch.rev))
		then = append(then, ch.op())
		orElse = append(orElse, clientv3.OpGet(ch.key))
	}
	if !c.Unfenced() {
		ck := b.claimKey(c.VIP.Unmap())
		cmps = append(cmps, clientv3.Compare(clientv3.Value(ck), "=", b.claimValue(c)))
		orElse = append(orElse, clientv3.OpGet(ck))
	}
	b.marking(chs, true)
	defer b.marking(chs, false)
	cctx, cancel := context.WithTimeout(ctx, b.timeout)
	if d := b.deadline.Load(); d != 0 {
		// Not past the lease's deadline: by then another node may own the
		// virtual server, and the client is better off asking it.
		if left := time.Duration(d) - time.Since(b.base); left < b.timeout {
			cancel()
			cctx, cancel = context.WithTimeout(ctx, max(left, 0))
		}
	}
	resp, err := b.cli.Txn(cctx).If(cmps...).Then(then...).Else(orElse...).Commit()
	cancel()
	b.txns.Add(1)
	if err != nil {
		return false, fmt.Errorf("%w: etcddlm: commit: %w", dlm.ErrUnavailable, err)
	}
	rev := resp.Header.Revision
	if resp.Succeeded {
		for _, ch := range chs {
			s := b.shardOf(ch.fh)
			s.mu.Lock()
			if e := s.files[ch.fh]; e != nil {
				install(e, ch.st, rev)
			}
			s.mu.Unlock()
		}
		return true, nil
	}
	if !c.Unfenced() {
		kvs := resp.Responses[len(chs)].GetResponseRange().GetKvs()
		if len(kvs) == 0 || string(kvs[0].Value) != b.claimValue(c) {
			b.fenced.Add(1)
			holder := "nobody"
			if len(kvs) > 0 {
				holder = string(kvs[0].Value)
			}
			select {
			case b.claimsLost <- c.VIP.Unmap():
			default:
			}
			return false, fmt.Errorf("%w: %v (etcd: %s)", dlm.ErrFenced, c, holder)
		}
	}
	for i, ch := range chs {
		var kv *mvccpb.KeyValue
		if kvs := resp.Responses[i].GetResponseRange().GetKvs(); len(kvs) > 0 {
			kv = kvs[0]
		}
		if err := b.apply(ch.fh, kv, rev); err != nil {
			return false, err
		}
	}
	return false, nil
}

// marking records (or forgets) the values being committed in their
// entries, so that the watch does not take them for another node's.
func (b *Backend) marking(chs []*change, on bool) {
	for _, ch := range chs {
		if ch.st == nil {
			continue // a deletion carries no grants
		}
		s := b.shardOf(ch.fh)
		s.mu.Lock()
		if e := s.files[ch.fh]; e != nil {
			if on {
				e.writing = ch.val
			} else {
				e.writing = ""
			}
		}
		s.mu.Unlock()
	}
}

// verify checks that the mirror had the file as etcd has it now, for an
// edit that changed nothing (a denial, a request already satisfied):
// another node may have changed the file a moment ago, and a decision on
// a stale view must not reach the client. One read-only transaction; if
// the file moved on, its state comes back and is installed.
func (b *Backend) verify(ctx context.Context, ch *change) (bool, error) {
	cctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	resp, err := b.cli.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(ch.key), "=", ch.rev)).
		Else(clientv3.OpGet(ch.key)).Commit()
	b.reads.Add(1)
	if err != nil {
		return false, fmt.Errorf("%w: etcddlm: verify: %w", dlm.ErrUnavailable, err)
	}
	if resp.Succeeded {
		return true, nil
	}
	var kv *mvccpb.KeyValue
	if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
		kv = kvs[0]
	}
	return false, b.apply(ch.fh, kv, resp.Header.Revision)
}

// apply installs a file's state as etcd holds it: kv, or nothing (nil)
// as of revision rev.
func (b *Backend) apply(fh string, kv *mvccpb.KeyValue, rev int64) error {
	s := b.shardOf(fh)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.files[fh]
	if e == nil {
		if kv == nil {
			return nil
		}
		e = &entry{}
		s.files[fh] = e
	}
	if kv == nil {
		install(e, nil, rev)
		return nil
	}
	if kv.ModRevision <= e.rev {
		return nil
	}
	st, err := dlm.DecodeState(fh, kv.Value, b.Registry)
	if err != nil {
		return fmt.Errorf("etcddlm: file %s at revision %d: %w", kv.Key, kv.ModRevision, err)
	}
	old := e.st
	install(e, st, kv.ModRevision)
	if e.writing == "" || string(kv.Value) != e.writing {
		b.newGrants(fh, old, st)
	}
	return nil
}

// newGrants passes on the pending grants that st has and old had not, for
// the virtual servers this node holds. The state came from another node's
// edit (this node's own commits do not come this way: the mirror has
// them already when the watch brings them back).
func (b *Backend) newGrants(fh string, old, st *dlm.State) {
	var f dlm.File
	f.Bind(st, nil)
	pending := f.Pending()
	if len(pending) == 0 {
		return
	}
	var before map[uint64]bool
	if old != nil {
		f.Bind(old, nil)
		for _, p := range f.Pending() {
			if before == nil {
				before = map[uint64]bool{}
			}
			before[p.Seq] = true
		}
	}
	claims := *b.claims.Load()
	for _, p := range pending {
		if before[p.Seq] {
			continue
		}
		if r, ok := claims[p.Owner.Host.VIP]; !ok || r.State != dlm.ClaimActive {
			continue
		}
		w := *p
		w.Prev = slices.Clone(p.Prev)
		select {
		case b.grants <- dlm.RemoteGrant{FH: fh, Waiter: w}:
		default:
			if b.grantsDropped.Add(1) == 1 {
				b.log.Warn("etcddlm: too many grants from other nodes to call back; clients find them on their next request")
			}
		}
	}
}

// Update runs fn on the file's state and commits what it changed in one
// transaction, running it again on the current state if another node
// changed the file since the mirror saw it.
func (b *Backend) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	if err := b.allows(c, false); err != nil {
		return err
	}
	return b.update(ctx, string(fh), c, fn)
}

func (b *Backend) update(ctx context.Context, fh string, c dlm.Claim, fn func(f *dlm.File) error) error {
	s, e := b.acquire(fh)
	defer s.release(e)
	return b.updateHeld(ctx, s, e, fh, c, fn)
}

// UpdateAll runs fn on every file where a host sel selects has state,
// once the mirror has caught up with etcd (so it misses no file another
// node just wrote), committing up to MaxTxnOps files per transaction.
// A batch that loses a race is redone file by file.
func (b *Backend) UpdateAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, fn func(f *dlm.File) error) error {
	if sel.Empty() {
		return nil
	}
	if err := b.check(ctx); err != nil {
		return err
	}
	if err := b.allows(c, true); err != nil {
		return err
	}
	if err := b.sync(ctx); err != nil {
		return err
	}
	var fhs []string
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		for fh, e := range s.files {
			if e.st != nil && e.st.Involves(&sel) {
				fhs = append(fhs, fh)
			}
		}
		s.mu.Unlock()
	}
	// One order for every bulk edit: two of them lock entries alike.
	slices.Sort(fhs)
	for len(fhs) > 0 {
		n, err := b.batch(ctx, fhs, c, fn)
		if err != nil {
			return err
		}
		fhs = fhs[n:]
		if err := b.check(ctx); err != nil {
			return err
		}
		if err := b.allows(c, true); err != nil {
			return err
		}
	}
	return nil
}

// batch edits files from the front of fhs in one transaction, within the
// request limits, and returns how many it took.
func (b *Backend) batch(ctx context.Context, fhs []string, c dlm.Claim, fn func(f *dlm.File) error) (int, error) {
	type held struct {
		fh string
		s  *shard
		e  *entry
	}
	var hs []held
	var chs []*change
	var err error
	size := 0
	for _, fh := range fhs {
		if len(chs) == b.maxOps-1 || size > b.maxBytes/2 && len(hs) > 0 {
			break
		}
		s, e := b.acquire(fh)
		e.op.Lock()
		hs = append(hs, held{fh, s, e})
		var ch *change
		if ch, err = b.run(s, e, fh, fn); err != nil {
			break
		}
		// A bulk edit synced the mirror first: what it leaves as it was
		// needs no second look.
		if !ch.readOnly {
			chs = append(chs, ch)
			size += len(ch.key) + len(ch.val)
		}
	}
	ok := true
	if err == nil && len(chs) > 0 {
		ok, err = b.commit(ctx, c, chs)
	}
	for _, h := range hs {
		h.e.op.Unlock()
	}
	// Lost a race: the Else branch refreshed the files; redo each alone.
	for _, h := range hs {
		if !ok && err == nil {
			err = b.updateHeld(ctx, h.s, h.e, h.fh, c, fn)
		}
		h.s.release(h.e)
	}
	return len(hs), err
}

// updateHeld is update for an entry the caller already holds (users).
func (b *Backend) updateHeld(ctx context.Context, s *shard, e *entry, fh string, c dlm.Claim, fn func(f *dlm.File) error) error {
	e.op.Lock()
	defer e.op.Unlock()
	for attempt := 0; ; attempt++ {
		ch, err := b.run(s, e, fh, fn)
		if err != nil {
			return err
		}
		var ok bool
		if ch.readOnly {
			ok, err = b.verify(ctx, ch)
		} else {
			ok, err = b.commit(ctx, c, []*change{ch})
		}
		if err != nil {
			return err
		}
		if ok {
			// Done — unless the lease ran out meanwhile (a pause between
			// sending and hearing back): then the client hears nothing
			// from here, and asks the next owner, which has what was
			// committed.
			return b.leaseOK()
		}
		if attempt == b.retries {
			b.conflicts.Add(1)
			return dlm.ErrConflict
		}
		b.retried.Add(1)
		if err := b.check(ctx); err != nil {
			return err
		}
	}
}

// Read runs fn on the state of one file as etcd has it now: the
// mirror's, once one read-only transaction confirmed it current (TEST
// must not report a lock released a moment ago through another node).
func (b *Backend) Read(ctx context.Context, fh []byte, fn func(f *dlm.File)) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	key := string(fh)
	s := b.shardOf(key)
	var st *dlm.State
	for attempt := 0; ; attempt++ {
		s.mu.Lock()
		st = &b.empty
		var rev int64
		if e := s.files[key]; e != nil && e.st != nil {
			st, rev = e.st, e.rev
		}
		s.mu.Unlock()
		ok, err := b.verify(ctx, &change{fh: key, key: b.fileKey(fh), rev: rev})
		if err != nil {
			return err
		}
		if ok {
			break
		}
		if attempt == b.retries {
			return dlm.ErrConflict
		}
	}
	var f dlm.File
	f.Bind(st, nil)
	fn(&f)
	return nil
}

// View calls fn on every mirrored file with state.
func (b *Backend) View(ctx context.Context, fn func(f *dlm.File) bool) error {
	for i := range b.shards {
		if err := b.check(ctx); err != nil {
			return err
		}
		s := &b.shards[i]
		var sts []*dlm.State
		s.mu.Lock()
		for _, e := range s.files {
			if e.st != nil {
				sts = append(sts, e.st)
			}
		}
		s.mu.Unlock()
		for _, st := range sts {
			var f dlm.File
			f.Bind(st, nil)
			if !fn(&f) {
				return nil
			}
		}
	}
	return nil
}

// Files is the number of files with state.
func (b *Backend) Files() int {
	n := 0
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		for _, e := range s.files {
			if e.st != nil {
				n++
			}
		}
		s.mu.Unlock()
	}
	return n
}

// Sweep forgets idle hosts and owners, and the mirror's records of files
// deleted before the watch's revision (a later event cannot be older).
func (b *Backend) Sweep() {
	b.revMu.Lock()
	upto := b.watchRev
	b.revMu.Unlock()
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		for fh, e := range s.files {
			if e.st == nil && e.users == 0 && e.rev <= upto {
				delete(s.files, fh)
			}
		}
		s.mu.Unlock()
	}
	b.Registry.Sweep()
}

// Close stops the watch; every later call fails with dlm.ErrClosed.
func (b *Backend) Close() error {
	if b.closed.Swap(true) {
		return nil
	}
	b.cancel()
	<-b.done
	return nil
}

// load reads every file into the mirror at one revision, a page at a
// time, and returns that revision.
func (b *Backend) load(ctx context.Context) (int64, error) {
	const page = 1000
	var rev int64
	key, end := b.filePfx, clientv3.GetPrefixRangeEnd(b.filePfx)
	seen := map[string]bool{}
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(page)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		cctx, cancel := context.WithTimeout(ctx, b.timeout)
		resp, err := b.cli.Get(cctx, key, opts...)
		cancel()
		if err != nil {
			return 0, fmt.Errorf("etcddlm: loading files: %w", err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			fh, err := b.fhOf(kv.Key)
			if err != nil {
				b.log.Warn("etcddlm: skipping a key", "key", string(kv.Key), "err", err)
				continue
			}
			seen[fh] = true
			if err := b.apply(fh, kv, rev); err != nil {
				b.log.Error("etcddlm: skipping a file that does not decode", "err", err)
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	// What the mirror had that etcd no longer has was deleted.
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		for fh, e := range s.files {
			if !seen[fh] && e.st != nil {
				install(e, nil, rev)
			}
		}
		s.mu.Unlock()
	}
	b.advance(rev)
	return rev, nil
}

func (b *Backend) fhOf(key []byte) (string, error) {
	fh, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(string(key), b.filePfx))
	if err != nil {
		return "", fmt.Errorf("etcddlm: file key %q: %w", key, err)
	}
	return string(fh), nil
}

// advance records that the mirror has every change up to rev.
func (b *Backend) advance(rev int64) {
	b.revMu.Lock()
	if rev > b.watchRev {
		b.watchRev = rev
		close(b.progress)
		b.progress = make(chan struct{})
	}
	b.revMu.Unlock()
}

// watch keeps the mirror current from revision rev on, reloading it if
// the watch falls behind a compaction.
func (b *Backend) watch(rev int64) {
	defer close(b.done)
	backoff := 50 * time.Millisecond
	for b.ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(b.ctx))
		wch := b.cli.Watch(wctx, b.filePfx, clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
		for wr := range wch {
			if wr.CompactRevision != 0 || errors.Is(wr.Err(), rpctypes.ErrCompacted) {
				b.relists.Add(1)
				b.log.Warn("etcddlm: watch fell behind a compaction; reloading", "rev", rev)
				for b.ctx.Err() == nil {
					r, err := b.load(b.ctx)
					if err == nil {
						rev = r
						break
					}
					b.log.Warn("etcddlm: reload failed", "err", err)
					sleep(b.ctx, backoff)
				}
				break
			}
			if err := wr.Err(); err != nil {
				b.log.Debug("etcddlm: watch", "err", err)
				break
			}
			for _, ev := range wr.Events {
				fh, err := b.fhOf(ev.Kv.Key)
				if err != nil {
					continue
				}
				var kv *mvccpb.KeyValue
				if ev.Type == clientv3.EventTypePut {
					kv = ev.Kv
				}
				if err := b.apply(fh, kv, ev.Kv.ModRevision); err != nil {
					b.log.Error("etcddlm: a file changed to something that does not decode", "err", err)
				}
				rev = max(rev, ev.Kv.ModRevision)
			}
			// A response's header may be ahead of its events (a watch that
			// starts far behind gets them in pieces, each stamped with the
			// current revision): only a progress report, which carries no
			// events, vouches for everything up to its header.
			if wr.IsProgressNotify() {
				rev = max(rev, wr.Header.Revision)
			}
			b.advance(rev)
			backoff = 50 * time.Millisecond
		}
		cancel()
		sleep(b.ctx, backoff)
		backoff = min(2*backoff, 2*time.Second)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// sync waits until the mirror has every change made before it was
// called: a linearizable read gives etcd's current revision, and the
// watch's progress reports catch up to it.
func (b *Backend) sync(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	resp, err := b.cli.Get(cctx, b.syncKey, clientv3.WithCountOnly())
	if err != nil {
		return fmt.Errorf("%w: etcddlm: sync: %w", dlm.ErrUnavailable, err)
	}
	want := resp.Header.Revision
	for {
		b.revMu.Lock()
		have, ch := b.watchRev, b.progress
		b.revMu.Unlock()
		if have >= want {
			return nil
		}
		// Ask for a progress report: with no event to send, the watch
		// would otherwise stay silent at its revision.
		if err := b.cli.RequestProgress(clientv3.WithRequireLeader(cctx)); err != nil {
			return fmt.Errorf("%w: etcddlm: sync: %w", dlm.ErrUnavailable, err)
		}
		select {
		case <-ch:
		case <-cctx.Done():
			return fmt.Errorf("%w: etcddlm: sync to revision %d (mirror at %d): %w", dlm.ErrUnavailable, want, have, cctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
