package sunrpc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Client defaults.
const (
	DefaultRetransmit    = time.Second
	DefaultMaxRetransmit = 16 * time.Second
	DefaultCallTimeout   = 30 * time.Second
	DefaultMaxReplySize  = 1 << 20
)

// ClientOptions configure a Client. The zero value is usable.
type ClientOptions struct {
	// Local is the source address of the client's socket; callbacks from a
	// virtual server set it to the virtual server's address. Zero lets the
	// kernel choose.
	Local netip.Addr
	// Cred is the credential sent with every call (default AUTH_NONE).
	Cred OpaqueAuth
	// Retransmit is the first UDP retransmission timeout; it doubles after
	// each retransmission up to MaxRetransmit.
	Retransmit    time.Duration
	MaxRetransmit time.Duration
	// CallTimeout bounds a call whose context has no deadline.
	CallTimeout time.Duration
	// MaxReplySize bounds a reply (a TCP record or a datagram).
	MaxReplySize int
	// Reserved binds the client's socket to a privileged port (below
	// 1024, as bindresvport does), if the process may: Linux lockd takes
	// statd's reboot callback only from one, and rpcbind changes only from
	// one.
	Reserved bool
}

// Client makes RPC calls to one server. It is safe for concurrent use:
// calls are matched to replies by XID, so many may be outstanding at once.
// A stream client that loses its connection dials again on the next call.
type Client struct {
	t      Transport
	remote netip.AddrPort
	unix   string  // stream over a Unix socket when set
	srv    *Server // datagrams through a server socket when set
	from   netip.AddrPort
	opts   ClientOptions
	xid    atomic.Uint32

	mu      sync.Mutex
	conn    net.Conn
	pending map[uint32]chan callResult
	closed  bool
}

type callResult struct {
	msg []byte
	err error
}

// ErrClientClosed is returned by calls on a closed Client.
var ErrClientClosed = errors.New("sunrpc: client closed")

// Dial returns a client for the server at remote over transport t. A UDP
// client's socket is created (and bound to opts.Local) at once; a TCP client
// connects now and again whenever its connection has broken.
func Dial(ctx context.Context, t Transport, remote netip.AddrPort, opts ClientOptions) (*Client, error) {
	c := newClient(t, opts)
	c.remote = remote
	if t == UDP {
		if err := c.dialUDP(); err != nil {
			return nil, err
		}
		return c, nil
	}
	if _, err := c.getConn(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// DialUnix returns a client that speaks record-marked RPC over a Unix stream
// socket, as rpcbind's local socket does.
func DialUnix(ctx context.Context, path string, opts ClientOptions) (*Client, error) {
	c := newClient(TCP, opts)
	c.unix = path
	if _, err := c.getConn(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// PacketClient returns a UDP client that sends from one of the server's own
// sockets — the one serving from's port, with from's address as source —
// so that its calls leave from the address and port the server answers on.
// Replies reach that socket and are handed to the client by XID. BSD and
// macOS lockd accept NLM *_RES callbacks only from the server's NLM port.
func (s *Server) PacketClient(from, to netip.AddrPort, opts ClientOptions) *Client {
	s.init()
	c := newClient(UDP, opts)
	c.srv, c.from, c.remote = s, from, to
	return c
}

func newClient(t Transport, opts ClientOptions) *Client {
	c := &Client{t: t, opts: opts, pending: map[uint32]chan callResult{}}
	c.xid.Store(rand.Uint32())
	return c
}

// Remote is the server address the client calls.
func (c *Client) Remote() netip.AddrPort { return c.remote }

// LocalAddr is the client's current local address (zero if not connected).
func (c *Client) LocalAddr() netip.AddrPort {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return netip.AddrPort{}
	}
	return addrPortOf(c.conn.LocalAddr())
}

func (c *Client) dialUDP() error {
	var uc *net.UDPConn
	err := c.withPort(func(port uint16) (err error) {
		var laddr *net.UDPAddr
		if c.opts.Local.IsValid() || port != 0 {
			laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(c.local(), port))
		}
		uc, err = net.DialUDP("udp", laddr, net.UDPAddrFromAddrPort(c.remote))
		return err
	})
	if err != nil {
		return fmt.Errorf("sunrpc: dial udp %v: %w", c.remote, err)
	}
	c.conn = uc
	go c.readDatagrams(uc)
	return nil
}

// local is the source address to bind: the chosen one, or the wildcard of
// the remote's family when only a port is asked for.
func (c *Client) local() netip.Addr {
	switch {
	case c.opts.Local.IsValid():
		return c.opts.Local
	case c.remote.Addr().Is4():
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// Reserved ports are tried from a random start in [reservedLow, 1024), as
// bindresvport does; below 600 lie well-known services.
const reservedLow = 600

// withPort runs bind with port 0, or — Reserved — with privileged ports
// until one is free. Without the privilege to bind one it takes any port:
// the call is then made as an unprivileged one.
func (c *Client) withPort(bind func(port uint16) error) error {
	if !c.opts.Reserved {
		return bind(0)
	}
	n := 1024 - reservedLow
	start := rand.IntN(n)
	var err error
	for i := range n {
		err = bind(uint16(reservedLow + (start+i)%n))
		switch {
		case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
			return bind(0)
		case err == nil || !errors.Is(err, syscall.EADDRINUSE):
			return err
		}
	}
	return err
}

// getConn returns the stream connection, dialling if there is none.
func (c *Client) getConn(ctx context.Context) (net.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClientClosed
	}
	if c.conn != nil {
		return c.conn, nil
	}
	if c.t == UDP {
		return nil, ErrClientClosed
	}
	var d net.Dialer
	var conn net.Conn
	var err error
	if c.unix != "" {
		conn, err = d.DialContext(ctx, "unix", c.unix)
	} else {
		err = c.withPort(func(port uint16) error {
			if c.opts.Local.IsValid() || port != 0 {
				d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(c.local(), port))
			}
			conn, err = d.DialContext(ctx, "tcp", c.remote.String())
			return err
		})
	}
	if err != nil {
		return nil, fmt.Errorf("sunrpc: dial %v: %w", c.target(), err)
	}
	c.conn = conn
	go c.readStream(conn)
	return conn, nil
}

func (c *Client) target() string {
	if c.srv != nil {
		return "udp:" + c.remote.String() + " from " + c.from.String()
	}
	if c.unix != "" {
		return "unix:" + c.unix
	}
	return c.t.String() + ":" + c.remote.String()
}

func (c *Client) maxReply() int { return orDefault(c.opts.MaxReplySize, DefaultMaxReplySize) }

func (c *Client) readStream(conn net.Conn) {
	rr := RecordReader{R: bufio.NewReader(conn), MaxSize: c.maxReply()}
	for {
		rec, err := rr.Next(nil)
		if err != nil {
			c.connFailed(conn, err)
			return
		}
		c.deliver(rec)
	}
}

func (c *Client) readDatagrams(uc *net.UDPConn) {
	buf := make([]byte, c.maxReply())
	for {
		n, err := uc.Read(buf)
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				// ICMP port unreachable: nobody listens there. Fail the
				// outstanding calls now rather than retransmitting into
				// the void until they time out.
				c.failPending(fmt.Errorf("sunrpc: %v: %w", c.target(), err))
				continue
			}
			c.failPending(ErrClientClosed)
			return
		}
		c.deliver(append([]byte(nil), buf[:n]...))
	}
}

func (c *Client) deliver(msg []byte) {
	xid, mtype, ok := PeekXID(msg)
	if !ok || mtype != MsgReply {
		return
	}
	c.mu.Lock()
	ch := c.pending[xid]
	delete(c.pending, xid)
	c.mu.Unlock()
	if ch != nil {
		ch <- callResult{msg: msg}
	}
}

func (c *Client) connFailed(conn net.Conn, err error) {
	c.mu.Lock()
	if c.conn == conn {
		c.conn = nil
	}
	c.mu.Unlock()
	conn.Close()
	if !errors.Is(err, net.ErrClosed) {
		err = fmt.Errorf("sunrpc: connection to %v lost: %w", c.target(), err)
	}
	c.failPending(err)
}

func (c *Client) failPending(err error) {
	c.mu.Lock()
	p := c.pending
	c.pending = map[uint32]chan callResult{}
	c.mu.Unlock()
	for _, ch := range p {
		ch <- callResult{err: err}
	}
}

// Close closes the client; outstanding calls fail.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	conn := c.conn
	c.conn = nil
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	c.failPending(ErrClientClosed)
	return nil
}

// Call calls procedure proc of program prog, version vers, with the encoded
// arguments args, and returns the encoded results of a SUCCESS reply. Any
// other reply is an *Error (see the Err* sentinels). Over UDP the call is
// retransmitted with exponential backoff until ctx (or CallTimeout) ends.
func (c *Client) Call(ctx context.Context, prog, vers, proc uint32, args []byte) ([]byte, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, orDefault(c.opts.CallTimeout, DefaultCallTimeout))
		defer cancel()
	}
	xid := c.xid.Add(1)
	h := CallHeader{XID: xid, RPCVers: RPCVersion, Prog: prog, Vers: vers, Proc: proc, Cred: c.opts.Cred}
	var msg []byte
	if c.t != UDP {
		msg = append(msg, 0, 0, 0, 0)
	}
	msg = AppendCall(msg, &h)
	msg = append(msg, args...)
	if c.t != UDP {
		putRecordMark(msg)
	}

	ch := make(chan callResult, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClientClosed
	}
	c.pending[xid] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, xid)
		c.mu.Unlock()
	}()

	var res callResult
	var err error
	switch {
	case c.srv != nil:
		key := replyKey{peer: c.remote, xid: xid}
		c.srv.expectReply(key, c.deliver)
		defer c.srv.forgetReply(key)
		res, err = c.roundTripUDP(ctx, msg, ch)
	case c.t == UDP:
		res, err = c.roundTripUDP(ctx, msg, ch)
	default:
		res, err = c.roundTripStream(ctx, msg, ch)
	}
	if err != nil {
		return nil, err
	}
	if res.err != nil {
		return nil, res.err
	}
	rh, results, err := ParseReply(res.msg)
	if err != nil {
		return nil, err
	}
	if err := rh.Err(); err != nil {
		return nil, err
	}
	return results, nil
}

func (c *Client) roundTripStream(ctx context.Context, msg []byte, ch chan callResult) (callResult, error) {
	conn, err := c.getConn(ctx)
	if err != nil {
		return callResult{}, err
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetWriteDeadline(dl)
	}
	if _, err := conn.Write(msg); err != nil {
		c.connFailed(conn, err)
		return callResult{}, fmt.Errorf("sunrpc: sending to %v: %w", c.target(), err)
	}
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		return callResult{}, fmt.Errorf("sunrpc: call to %v: %w", c.target(), ctx.Err())
	}
}

func (c *Client) roundTripUDP(ctx context.Context, msg []byte, ch chan callResult) (callResult, error) {
	send := func(msg []byte) error { return c.srv.SendPacket(c.from, c.remote, msg) }
	if c.srv == nil {
		c.mu.Lock()
		conn := c.conn
		c.mu.Unlock()
		if conn == nil {
			return callResult{}, ErrClientClosed
		}
		send = func(msg []byte) error { _, err := conn.Write(msg); return err }
	}
	timeout := orDefault(c.opts.Retransmit, DefaultRetransmit)
	maxTimeout := orDefault(c.opts.MaxRetransmit, DefaultMaxRetransmit)
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		if err := send(msg); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			return callResult{}, fmt.Errorf("sunrpc: sending to %v: %w", c.target(), err)
		}
		select {
		case r := <-ch:
			return r, nil
		case <-ctx.Done():
			return callResult{}, fmt.Errorf("sunrpc: call to %v: %w", c.target(), ctx.Err())
		case <-timer.C:
			timeout = min(2*timeout, maxTimeout)
			timer.Reset(timeout)
		}
	}
}
