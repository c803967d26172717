package etcddlm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Owners is virtual-server ownership in etcd, for the nodes that share a
// Backend:
//
//	<prefix>n/<node>   the node, bound to its lease (cluster status)
//	<prefix>o/<vip>    the owner: the node's name, bound to its lease; its
//	                   creation revision is the virtual server's epoch
//	<prefix>h/<vip>    what a planned release left for the next owner
//	<prefix>c/<vip>    the claim that fences edits (see Backend)
//
// A takeover is one transaction that succeeds only if nobody owns the
// virtual server; it also moves the claim key off the previous owner, so
// that from the same instant none of that node's transactions can land.
// A release deletes the owner key and leaves the handoff, explicitly.
//
// The node's lease is kept alive here, one keepalive at a time, so that
// each acknowledgement can be matched with the instant it was sent: etcd
// cannot expire the lease before that instant plus the TTL. The node
// self-fences a margin before that deadline if no later keepalive was
// acknowledged — the backend stops every edit, and every virtual server
// owned is reported Lost — so no grant leaves it after another node may
// have taken over.
type Owners struct {
	b      *Backend
	cli    *clientv3.Client
	log    *slog.Logger
	lease  clientv3.LeaseID
	ttl    time.Duration
	margin time.Duration

	mu       sync.Mutex
	owned    map[netip.Addr]int64 // epoch (owner key's creation revision)
	deadline time.Time            // monotonic: the lease holds until then
	fenced   bool
	lost     chan netip.Addr

	cancel context.CancelFunc
	done   chan struct{}
}

// ErrLost: the virtual server is not this node's (any more).
var ErrLost = errors.New("etcddlm: virtual server owned by another node")

// ErrOwned: a takeover found another node owning the virtual server.
var ErrOwned = errors.New("etcddlm: virtual server owned by another node")

// ErrSelfFenced: the node's lease may have expired; it owns nothing.
var ErrSelfFenced = errors.New("etcddlm: node self-fenced (lease deadline passed)")

// OwnersConfig configures Owners.
type OwnersConfig struct {
	// TTL of the node's lease (default 10 s; etcd counts whole seconds).
	TTL time.Duration
	// Margin: the node fences itself this long before the lease could
	// expire (default a fifth of the TTL).
	Margin time.Duration
	// Info is published in the node key (cluster status).
	Info map[string]string
}

// NodeInfo is the value of a node key.
type NodeInfo struct {
	Node    string            `json:"node"`
	Started time.Time         `json:"started"`
	TTL     float64           `json:"ttl_seconds"`
	Info    map[string]string `json:"info,omitempty"`
}

// NewOwners grants the node's lease, publishes the node key and starts
// keeping the lease alive.
func NewOwners(ctx context.Context, b *Backend, cfg OwnersConfig) (*Owners, error) {
	if cfg.TTL <= 0 {
		cfg.TTL = 10 * time.Second
	}
	secs := int64((cfg.TTL + time.Second - 1) / time.Second)
	cfg.TTL = time.Duration(secs) * time.Second
	if cfg.Margin <= 0 {
		cfg.Margin = cfg.TTL / 5
	}
	o := &Owners{b: b, cli: b.cli, log: b.log, ttl: cfg.TTL, margin: cfg.Margin,
		owned: map[netip.Addr]int64{}, lost: make(chan netip.Addr, 1024), done: make(chan struct{})}
	sent := time.Now()
	cctx, cancel := context.WithTimeout(ctx, b.timeout)
	g, err := b.cli.Grant(cctx, secs)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("etcddlm: granting the node's lease: %w", err)
	}
	o.lease = clientv3.LeaseID(g.ID)
	o.deadline = sent.Add(time.Duration(g.TTL)*time.Second - o.margin)
	b.SetDeadline(o.deadline)
	info, _ := json.Marshal(NodeInfo{Node: b.node, Started: sent, TTL: cfg.TTL.Seconds(), Info: cfg.Info})
	cctx, cancel = context.WithTimeout(ctx, b.timeout)
	_, err = b.cli.Put(cctx, o.nodeKey(b.node), string(info), clientv3.WithLease(o.lease))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("etcddlm: publishing the node: %w", err)
	}
	var kctx context.Context
	kctx, o.cancel = context.WithCancel(context.Background())
	go o.keepAlive(kctx)
	return o, nil
}

func (o *Owners) nodeKey(node string) string       { return o.b.Prefix() + "n/" + node }
func (o *Owners) ownerKey(vip netip.Addr) string   { return o.b.Prefix() + "o/" + vip.String() }
func (o *Owners) handoffKey(vip netip.Addr) string { return o.b.Prefix() + "h/" + vip.String() }

// Lease is the node's lease.
func (o *Owners) Lease() clientv3.LeaseID { return o.lease }

// Deadline is when the node fences itself unless a keepalive sent
// before then is acknowledged.
func (o *Owners) Deadline() time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.deadline
}

// Fenced reports whether the node fenced itself.
func (o *Owners) Fenced() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.fenced
}

// Lost delivers the virtual servers this node lost without releasing
// them.
func (o *Owners) Lost() <-chan netip.Addr { return o.lost }

// keepAlive renews the lease every third of its TTL, one keepalive at a
// time, and fences the node when the deadline passes without renewal.
func (o *Owners) keepAlive(ctx context.Context) {
	defer close(o.done)
	every := o.ttl / 3
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		o.mu.Lock()
		wait := time.Until(o.deadline)
		o.mu.Unlock()
		fence := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			fence.Stop()
			return
		case <-fence.C:
			o.fence("no keepalive acknowledged in time")
			return
		case vip := <-o.b.claimsLost:
			fence.Stop()
			o.lose(vip)
			continue
		case <-tick.C:
			fence.Stop()
		}
		sent := time.Now()
		o.mu.Lock()
		wait = time.Until(o.deadline)
		o.mu.Unlock()
		kctx, cancel := context.WithTimeout(ctx, max(wait, time.Millisecond))
		resp, err := o.cli.KeepAliveOnce(kctx, o.lease)
		cancel()
		switch {
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			o.fence("lease expired")
			return
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			o.log.Warn("etcddlm: keepalive failed", "err", err, "deadline_in", time.Until(o.Deadline()).Round(time.Millisecond))
			continue
		case resp.TTL <= 0:
			o.fence("lease expired")
			return
		}
		o.mu.Lock()
		if d := sent.Add(time.Duration(resp.TTL)*time.Second - o.margin); d.After(o.deadline) {
			o.deadline = d
			o.b.SetDeadline(d)
		}
		o.mu.Unlock()
	}
}

// lose reports a virtual server whose claim etcd showed to be another
// node's (or another epoch's) now, if this node still thought it owned it.
func (o *Owners) lose(vip netip.Addr) {
	o.mu.Lock()
	_, owned := o.owned[vip]
	delete(o.owned, vip)
	o.mu.Unlock()
	if !owned {
		return
	}
	o.log.Error("etcddlm: another node took this virtual server over; no longer serving it", "vip", vip, "node", o.b.node)
	select {
	case o.lost <- vip:
	default:
	}
}

// fence stops the node from acting for any virtual server: the backend
// refuses every fenced edit from now on, and each owned virtual server
// is reported lost.
func (o *Owners) fence(why string) {
	o.b.Expire()
	o.mu.Lock()
	if o.fenced {
		o.mu.Unlock()
		return
	}
	o.fenced = true
	owned := make([]netip.Addr, 0, len(o.owned))
	for vip := range o.owned {
		owned = append(owned, vip)
	}
	clear(o.owned)
	o.mu.Unlock()
	o.b.fences.Add(1)
	o.log.Error("etcddlm: node self-fenced: it serves no virtual server any more", "why", why, "node", o.b.node,
		"lease", fmt.Sprintf("%x", int64(o.lease)), "virtual_servers", owned)
	for _, vip := range owned {
		select {
		case o.lost <- vip:
		default:
		}
	}
}

// Claimed is what a takeover got.
type Claimed struct {
	Epoch, Prev uint64
	Handoff     []byte
}

// Claim takes vip for this node if nobody owns it: the new epoch is the
// owner key's creation revision; Prev is the epoch of the claim it
// follows and Handoff what that claim's owner left at a planned release
// (handed out once).
func (o *Owners) Claim(ctx context.Context, vip netip.Addr) (Claimed, error) {
	vip = vip.Unmap()
	o.mu.Lock()
	fenced := o.fenced
	o.mu.Unlock()
	if fenced {
		return Claimed{}, ErrSelfFenced
	}
	ok, hk, ck := o.ownerKey(vip), o.handoffKey(vip), o.b.claimKey(vip)
	cctx, cancel := context.WithTimeout(ctx, o.b.timeout)
	defer cancel()
	// In the same transaction, the claim key moves off the previous
	// owner, so that none of its transactions can land from this instant
	// (the backend writes the new epoch there at SetClaim), and the
	// handoff is taken. Their old values are read first: the operations
	// of a transaction run in order.
	resp, err := o.cli.Txn(cctx).If(clientv3.Compare(clientv3.CreateRevision(ok), "=", 0)).
		Then(clientv3.OpPut(ok, o.b.node, clientv3.WithLease(o.lease)), clientv3.OpGet(ck), clientv3.OpGet(hk),
			clientv3.OpPut(ck, fmt.Sprintf("%016x %s", 0, o.b.node)), clientv3.OpDelete(hk)).
		Else(clientv3.OpGet(ok)).Commit()
	o.b.txns.Add(1)
	if err != nil {
		return Claimed{}, fmt.Errorf("etcddlm: claiming %v: %w", vip, err)
	}
	if !resp.Succeeded {
		holder := "?"
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
			holder = string(kvs[0].Value)
		}
		return Claimed{}, fmt.Errorf("%w: %v is %s's", ErrOwned, vip, holder)
	}
	c := Claimed{Epoch: uint64(resp.Header.Revision)}
	if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
		if e, _, err := parseClaim(kvs[0].Value); err == nil {
			c.Prev = e
		}
	}
	if kvs := resp.Responses[2].GetResponseRange().GetKvs(); len(kvs) > 0 {
		if e, payload, ok := strings.Cut(string(kvs[0].Value), " "); ok {
			if pe, err := strconv.ParseUint(e, 16, 64); err == nil && pe == c.Prev && c.Prev != 0 {
				c.Handoff = []byte(payload)
			}
		}
	}
	o.mu.Lock()
	o.owned[vip] = int64(c.Epoch)
	o.mu.Unlock()
	return c, nil
}

// Release gives vip up, leaving handoff (nil: nothing) for the next
// owner; ErrLost, and nothing left, if this node's claim of epoch is not
// the owner key any more.
func (o *Owners) Release(ctx context.Context, vip netip.Addr, epoch uint64, handoff []byte) error {
	vip = vip.Unmap()
	ok, hk := o.ownerKey(vip), o.handoffKey(vip)
	leave := clientv3.OpDelete(hk)
	if handoff != nil {
		leave = clientv3.OpPut(hk, fmt.Sprintf("%016x %s", epoch, handoff))
	}
	cctx, cancel := context.WithTimeout(ctx, o.b.timeout)
	defer cancel()
	resp, err := o.cli.Txn(cctx).If(
		clientv3.Compare(clientv3.CreateRevision(ok), "=", int64(epoch)),
		clientv3.Compare(clientv3.Value(ok), "=", o.b.node),
	).Then(leave, clientv3.OpDelete(ok)).Commit()
	o.b.txns.Add(1)
	o.mu.Lock()
	delete(o.owned, vip)
	o.mu.Unlock()
	if err != nil {
		return fmt.Errorf("etcddlm: releasing %v: %w", vip, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: %v at epoch %d", ErrLost, vip, epoch)
	}
	return nil
}

// Close stops the keepalives and revokes the lease: the node's owner
// keys go at once (a clean shutdown; what it did not release, the next
// owner takes over as after a crash).
func (o *Owners) Close() error {
	o.cancel()
	<-o.done
	ctx, cancel := context.WithTimeout(context.Background(), o.b.timeout)
	defer cancel()
	_, err := o.cli.Revoke(ctx, o.lease)
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("etcddlm: revoking the node's lease: %w", err)
	}
	return nil
}

// VirtualServer is one virtual server as etcd knows it.
type VirtualServer struct {
	VIP   netip.Addr `json:"vip"`
	Owner string     `json:"owner,omitempty"` // empty: nobody
	Epoch uint64     `json:"epoch"`           // the owner key's (0: none) or the last claim's
	// Claim is the node and epoch the claim key fences edits for.
	ClaimNode  string `json:"claim_node,omitempty"`
	ClaimEpoch uint64 `json:"claim_epoch,omitempty"`
	Handoff    bool   `json:"handoff,omitempty"`
}

// Node is a live node as etcd knows it.
type Node struct {
	NodeInfo
	Lease int64 `json:"lease"`
	// TTL is the lease's remaining time to live as etcd reports it (a
	// minimum: a leader change restarts it).
	TTL int64 `json:"lease_ttl_seconds"`
}

// VIPOwners maps the virtual servers owned now to their nodes (one read
// of the owner keys).
func (o *Owners) VIPOwners(ctx context.Context) (map[netip.Addr]string, error) {
	cctx, cancel := context.WithTimeout(ctx, o.b.timeout)
	defer cancel()
	pfx := o.b.Prefix() + "o/"
	resp, err := o.cli.Get(cctx, pfx, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("etcddlm: owners: %w", err)
	}
	out := make(map[netip.Addr]string, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if a, err := netip.ParseAddr(strings.TrimPrefix(string(kv.Key), pfx)); err == nil {
			out[a] = string(kv.Value)
		}
	}
	return out, nil
}

// ClusterStatus reads the nodes and virtual servers of the cluster.
func (o *Owners) ClusterStatus(ctx context.Context) ([]Node, []VirtualServer, error) {
	pfx := o.b.Prefix()
	cctx, cancel := context.WithTimeout(ctx, o.b.timeout)
	defer cancel()
	var nodes []Node
	resp, err := o.cli.Get(cctx, pfx+"n/", clientv3.WithPrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("etcddlm: cluster status: %w", err)
	}
	for _, kv := range resp.Kvs {
		var n Node
		_ = json.Unmarshal(kv.Value, &n.NodeInfo)
		n.Lease = kv.Lease
		if ttl, err := o.cli.TimeToLive(cctx, clientv3.LeaseID(kv.Lease)); err == nil {
			n.TTL = ttl.TTL
		}
		nodes = append(nodes, n)
	}
	vss := map[netip.Addr]*VirtualServer{}
	get := func(vip string) *VirtualServer {
		a, err := netip.ParseAddr(vip)
		if err != nil {
			return nil
		}
		if vss[a] == nil {
			vss[a] = &VirtualServer{VIP: a}
		}
		return vss[a]
	}
	for _, sub := range []string{"o/", "c/", "h/"} {
		resp, err := o.cli.Get(cctx, pfx+sub, clientv3.WithPrefix())
		if err != nil {
			return nil, nil, fmt.Errorf("etcddlm: cluster status: %w", err)
		}
		for _, kv := range resp.Kvs {
			vs := get(strings.TrimPrefix(string(kv.Key), pfx+sub))
			if vs == nil {
				continue
			}
			switch sub {
			case "o/":
				vs.Owner, vs.Epoch = string(kv.Value), uint64(kv.CreateRevision)
			case "c/":
				vs.ClaimEpoch, vs.ClaimNode, _ = parseClaim(kv.Value)
			case "h/":
				vs.Handoff = true
			}
		}
	}
	out := make([]VirtualServer, 0, len(vss))
	for _, vs := range vss {
		if vs.Epoch == 0 {
			vs.Epoch = vs.ClaimEpoch
		}
		out = append(out, *vs)
	}
	return nodes, out, nil
}
