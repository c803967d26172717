package etcddlm

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/nlmha/nlmha/dlm"
)

// NSMStore keeps each virtual server's NSM state in etcd (it satisfies
// nsm.Mirror): <prefix>s/<vip>/state is the state number,
// <prefix>s/<vip>/m/<file> each monitor record. Every write is guarded by
// the virtual server's claim, like lock edits: a node that lost the
// virtual server changes nothing of it.
type NSMStore struct{ b *Backend }

// NSM returns the backend's NSM store.
func (b *Backend) NSM() *NSMStore { return &NSMStore{b: b} }

func (n *NSMStore) pfx(vip netip.Addr) string {
	return n.b.Prefix() + "s/" + vip.Unmap().String() + "/"
}

// guarded commits ops under claim c, in batches within the request limits.
func (n *NSMStore) guarded(ctx context.Context, c dlm.Claim, ops []clientv3.Op) error {
	if err := n.b.allows(c, true); err != nil {
		return err
	}
	ck, cv := n.b.claimKey(c.VIP.Unmap()), n.b.claimValue(c)
	for len(ops) > 0 {
		k := min(len(ops), n.b.maxOps-1)
		resp, err := n.b.cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(ck), "=", cv)).Then(ops[:k]...).Commit()
		n.b.txns.Add(1)
		if err != nil {
			return fmt.Errorf("%w: etcddlm: NSM state: %w", dlm.ErrUnavailable, err)
		}
		if !resp.Succeeded {
			n.b.fenced.Add(1)
			return fmt.Errorf("%w: %v", dlm.ErrFenced, c)
		}
		ops = ops[k:]
	}
	return nil
}

// Load reads a virtual server's NSM state; ok is false if etcd has none.
func (n *NSMStore) Load(ctx context.Context, vip netip.Addr) (int32, map[string][]byte, bool, error) {
	pfx := n.pfx(vip)
	recs := map[string][]byte{}
	var state int32
	ok := false
	key, end := pfx, clientv3.GetPrefixRangeEnd(pfx)
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(1000)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := n.b.cli.Get(ctx, key, opts...)
		if err != nil {
			return 0, nil, false, fmt.Errorf("%w: etcddlm: NSM state: %w", dlm.ErrUnavailable, err)
		}
		rev = resp.Header.Revision
		for _, kv := range resp.Kvs {
			name := strings.TrimPrefix(string(kv.Key), pfx)
			switch {
			case name == "state":
				v, err := strconv.ParseInt(string(kv.Value), 10, 32)
				if err == nil && v >= 0 {
					state, ok = int32(v), true
				}
			case strings.HasPrefix(name, "m/"):
				recs[strings.TrimPrefix(name, "m/")] = kv.Value
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	return state, recs, ok, nil
}

// Save replaces a virtual server's NSM state: the records first, the
// state number last (Load takes a state number as the sign that the rest
// is there).
func (n *NSMStore) Save(ctx context.Context, c dlm.Claim, state int32, recs map[string][]byte) error {
	pfx := n.pfx(c.VIP)
	// etcd refuses a transaction that deletes a range and puts into it.
	if err := n.guarded(ctx, c, []clientv3.Op{clientv3.OpDelete(pfx, clientv3.WithPrefix())}); err != nil {
		return err
	}
	var ops []clientv3.Op
	for name, b := range recs {
		ops = append(ops, clientv3.OpPut(pfx+"m/"+name, string(b)))
	}
	ops = append(ops, clientv3.OpPut(pfx+"state", strconv.FormatInt(int64(state), 10)))
	return n.guarded(ctx, c, ops)
}

// SetState records the state number.
func (n *NSMStore) SetState(ctx context.Context, c dlm.Claim, state int32) error {
	return n.guarded(ctx, c, []clientv3.Op{clientv3.OpPut(n.pfx(c.VIP)+"state", strconv.FormatInt(int64(state), 10))})
}

// PutRecord stores a monitor record.
func (n *NSMStore) PutRecord(ctx context.Context, c dlm.Claim, file string, data []byte) error {
	return n.guarded(ctx, c, []clientv3.Op{clientv3.OpPut(n.pfx(c.VIP)+"m/"+file, string(data))})
}

// DeleteRecords removes monitor records.
func (n *NSMStore) DeleteRecords(ctx context.Context, c dlm.Claim, files []string) error {
	ops := make([]clientv3.Op, 0, len(files))
	for _, f := range files {
		ops = append(ops, clientv3.OpDelete(n.pfx(c.VIP)+"m/"+f))
	}
	return n.guarded(ctx, c, ops)
}
