package hacallout

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"syscall"
)

// DefaultSocket is where nlmd listens for the control API by default.
const DefaultSocket = "/run/nlmha/nlmd.sock"

// Client calls the control API of the nlmd at a socket path.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{path: path, hc: &http.Client{Transport: tr}}
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://nlmd"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return fmt.Errorf("%w (no control socket answers at %s)", ErrNotRunning, c.path)
		}
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(b, e) != nil || e.Message == "" {
			e.Message = fmt.Sprintf("nlmd answered %s", resp.Status)
		}
		return e
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(b, out)
}

// Status is GET /v1/status.
func (c *Client) Status(ctx context.Context) (st NodeStatus, err error) {
	return st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Cluster is GET /v1/cluster.
func (c *Client) Cluster(ctx context.Context) (st ClusterStatus, err error) {
	return st, c.do(ctx, http.MethodGet, "/v1/cluster", nil, &st)
}

// VIPs is GET /v1/vips.
func (c *Client) VIPs(ctx context.Context) (v []VIPStatus, err error) {
	return v, c.do(ctx, http.MethodGet, "/v1/vips", nil, &v)
}

// VIP is GET /v1/vips/{vip}.
func (c *Client) VIP(ctx context.Context, a netip.Addr) (v VIPStatus, err error) {
	return v, c.do(ctx, http.MethodGet, "/v1/vips/"+a.String(), nil, &v)
}

// Takeover is POST /v1/vips/{vip}/takeover.
func (c *Client) Takeover(ctx context.Context, a netip.Addr, name string) (r TakeoverResult, err error) {
	return r, c.do(ctx, http.MethodPost, "/v1/vips/"+a.String()+"/takeover", map[string]string{"name": name}, &r)
}

// Release is POST /v1/vips/{vip}/release.
func (c *Client) Release(ctx context.Context, a netip.Addr, snapshot bool) (r ReleaseResult, err error) {
	return r, c.do(ctx, http.MethodPost, "/v1/vips/"+a.String()+"/release", map[string]bool{"snapshot": snapshot}, &r)
}

// Grace is POST /v1/vips/{vip}/grace/{start|end}.
func (c *Client) Grace(ctx context.Context, a netip.Addr, action string) (v VIPStatus, err error) {
	return v, c.do(ctx, http.MethodPost, "/v1/vips/"+a.String()+"/grace/"+url.PathEscape(action), nil, &v)
}

// Notify is POST /v1/vips/{vip}/notify.
func (c *Client) Notify(ctx context.Context, a netip.Addr) (v VIPStatus, err error) {
	return v, c.do(ctx, http.MethodPost, "/v1/vips/"+a.String()+"/notify", nil, &v)
}

// Locks is GET /v1/locks.
func (c *Client) Locks(ctx context.Context, vip, client, fh string, limit int) (r LocksReply, err error) {
	q := url.Values{}
	for k, v := range map[string]string{"vip": vip, "client": client, "fh": fh} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	return r, c.do(ctx, http.MethodGet, "/v1/locks?"+q.Encode(), nil, &r)
}

// Clients is GET /v1/clients.
func (c *Client) Clients(ctx context.Context, vip string) (r []ClientInfo, err error) {
	p := "/v1/clients"
	if vip != "" {
		p += "?vip=" + url.QueryEscape(vip)
	}
	return r, c.do(ctx, http.MethodGet, p, nil, &r)
}

// DropClient is POST /v1/clients/drop.
func (c *Client) DropClient(ctx context.Context, vip, client string) (r DropReply, err error) {
	return r, c.do(ctx, http.MethodPost, "/v1/clients/drop", map[string]string{"vip": vip, "client": client}, &r)
}
