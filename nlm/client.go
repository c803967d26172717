package nlm

import (
	"context"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Client calls an NLM server: the client side of the protocol, for tests,
// tools and the load generator.
type Client struct {
	RPC  *sunrpc.Client
	Vers uint32
}

// NewClient returns a client speaking version vers over c.
func NewClient(c *sunrpc.Client, vers uint32) *Client { return &Client{RPC: c, Vers: vers} }

func (c *Client) call(ctx context.Context, proc uint32, args []byte) (*xdr.Decoder, error) {
	res, err := c.RPC.Call(ctx, Prog, c.Vers, proc, args)
	if err != nil {
		return nil, err
	}
	return xdr.NewDecoder(res), nil
}

func res(d *xdr.Decoder, err error) (Res, error) {
	var r Res
	if err != nil {
		return r, err
	}
	r.Decode(d)
	return r, d.Err()
}

// Null calls NULL.
func (c *Client) Null(ctx context.Context) error {
	_, err := c.call(ctx, ProcNull, nil)
	return err
}

// Test calls TEST.
func (c *Client) Test(ctx context.Context, a *TestArgs) (TestRes, error) {
	var r TestRes
	d, err := c.call(ctx, ProcTest, a.Append(nil, c.Vers))
	if err != nil {
		return r, err
	}
	r.Decode(d, c.Vers)
	return r, d.Err()
}

// Lock calls LOCK.
func (c *Client) Lock(ctx context.Context, a *LockArgs) (Res, error) {
	return res(c.call(ctx, ProcLock, a.Append(nil, c.Vers)))
}

// NMLock calls NM_LOCK.
func (c *Client) NMLock(ctx context.Context, a *LockArgs) (Res, error) {
	return res(c.call(ctx, ProcNMLock, a.Append(nil, c.Vers)))
}

// Cancel calls CANCEL.
func (c *Client) Cancel(ctx context.Context, a *CancelArgs) (Res, error) {
	return res(c.call(ctx, ProcCancel, a.Append(nil, c.Vers)))
}

// Unlock calls UNLOCK.
func (c *Client) Unlock(ctx context.Context, a *UnlockArgs) (Res, error) {
	return res(c.call(ctx, ProcUnlock, a.Append(nil, c.Vers)))
}

// Share calls SHARE.
func (c *Client) Share(ctx context.Context, a *ShareArgs) (ShareRes, error) {
	return c.share(ctx, ProcShare, a)
}

// Unshare calls UNSHARE.
func (c *Client) Unshare(ctx context.Context, a *ShareArgs) (ShareRes, error) {
	return c.share(ctx, ProcUnshare, a)
}

func (c *Client) share(ctx context.Context, proc uint32, a *ShareArgs) (ShareRes, error) {
	var r ShareRes
	d, err := c.call(ctx, proc, a.Append(nil))
	if err != nil {
		return r, err
	}
	r.Decode(d)
	return r, d.Err()
}

// FreeAll calls FREE_ALL.
func (c *Client) FreeAll(ctx context.Context, n *Notify) error {
	_, err := c.call(ctx, ProcFreeAll, n.Append(nil))
	return err
}

// Msg calls one of the *_MSG procedures with encoded arguments; the result
// arrives later as a *_RES call to the client's own lockd.
func (c *Client) Msg(ctx context.Context, proc uint32, args []byte) error {
	_, err := c.call(ctx, proc, args)
	return err
}
