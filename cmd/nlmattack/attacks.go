package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// target holds the flags every attack has: where to, and from where.
type target struct {
	server, from string
	port         uint
}

func (t *target) flags(fs interface {
	StringVar(*string, string, string, string)
	UintVar(*uint, string, uint, string)
}, port uint) {
	fs.StringVar(&t.server, "server", "", "nlmd's address (a virtual server)")
	fs.StringVar(&t.from, "from", "", "source address (empty: the kernel's choice)")
	fs.UintVar(&t.port, "port", port, "destination port")
}

func (t *target) addrs() (to netip.AddrPort, from netip.Addr, err error) {
	a, err := netip.ParseAddr(t.server)
	if err != nil {
		return to, from, fmt.Errorf("--server: %w", err)
	}
	if t.from != "" {
		if from, err = netip.ParseAddr(t.from); err != nil {
			return to, from, fmt.Errorf("--from: %w", err)
		}
	}
	return netip.AddrPortFrom(a, uint16(t.port)), from, nil
}

// ---- locks --------------------------------------------------------------------

type locksResult struct {
	Sent    int            `json:"sent"`
	ByStat  map[string]int `json:"by_stat"`
	Errors  int            `json:"errors"`
	First   []string       `json:"first_errors,omitempty"`
	Seconds float64        `json:"seconds"`
}

// runLocks sends --requests LOCKs over TCP: request i under caller_name
// PREFIX(i mod --callers), its own svid and byte i of one file, so that
// they never conflict with each other (with --block, they wait behind
// whatever holds the file).
func runLocks(args []string) (any, error) {
	fs := newFlags("locks")
	var tg target
	tg.flags(fs, 4045)
	requests := fs.Int("requests", 1000, "LOCK calls")
	callers := fs.Int("callers", 1000, "distinct caller_names")
	prefix := fs.String("prefix", "adv-atk-", "caller_name prefix")
	fh := fs.String("fh", "adv-callers", "file handle")
	block := fs.Bool("block", false, "blocking requests")
	conns := fs.Int("conns", 4, "TCP connections")
	inflight := fs.Int("inflight", 16, "calls in flight per connection")
	timeout := fs.Duration("timeout", 10*time.Second, "per call")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	clients := make([]*nlm.Client, *conns)
	for i := range clients {
		c, err := sunrpc.Dial(context.Background(), sunrpc.TCP, to, sunrpc.ClientOptions{Local: from})
		if err != nil {
			return nil, err
		}
		defer c.Close()
		clients[i] = nlm.NewClient(c, nlm.Vers4)
	}
	start := time.Now()
	var next atomic.Int64
	var mu sync.Mutex
	res := locksResult{ByStat: map[string]int{}}
	var errs errList
	var wg sync.WaitGroup
	for w := range *conns * *inflight {
		cl := clients[w%*conns]
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= *requests {
					return
				}
				caller := *prefix + strconv.Itoa(i%*callers)
				l := nlm.Lock{CallerName: []byte(caller), FH: []byte(*fh), OH: []byte(strconv.Itoa(i) + "@" + caller),
					SVID: int32(i + 1), Offset: uint64(i), Len: 1}
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				r, err := cl.Lock(ctx, &nlm.LockArgs{Cookie: []byte(strconv.Itoa(i)), Block: *block, Exclusive: true, Lock: l, State: 1})
				cancel()
				mu.Lock()
				res.Sent++
				if err != nil {
					errs.add(err)
				} else {
					res.ByStat[r.Stat.String()]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.Errors, res.First, res.Seconds = errs.count(), errs.list(), time.Since(start).Seconds()
	return res, nil
}

// ---- notify -------------------------------------------------------------------

type notifyResult struct {
	Sent    int      `json:"sent"`
	Replies int      `json:"replies"`
	Errors  int      `json:"errors"`
	First   []string `json:"first_errors,omitempty"`
	Seconds float64  `json:"seconds"`
}

// runNotify sends SM_NOTIFY for --mon-name, each with a state not seen
// before: over UDP one every --interval, without waiting; over TCP all at
// once, pipelined on --conns connections, which stay open (replies
// counted) until stdin closes.
func runNotify(args []string) (any, error) {
	fs := newFlags("notify")
	var tg target
	tg.flags(fs, 32765)
	monName := fs.String("mon-name", "", "the host said to have rebooted")
	count := fs.Int("count", 10, "SM_NOTIFY calls")
	interval := fs.Duration("interval", time.Second, "between UDP calls")
	state := fs.Int("state", 1001, "state of the first call (each next +2)")
	tcp := fs.Bool("tcp", false, "pipelined over TCP")
	conns := fs.Int("conns", 10, "TCP connections")
	max := fs.Duration("max", time.Minute, "TCP: hold at most this long")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	arg := func(i int) []byte {
		return (&nsm.StatChge{MonName: *monName, State: int32(*state + 2*i)}).Append(nil)
	}
	start := time.Now()
	var res notifyResult
	var errs errList
	if !*tcp {
		c, err := dialRaw("udp", from, false, to, time.Second)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		for i := range *count {
			if i > 0 {
				time.Sleep(*interval)
			}
			if err := c.send(nsm.Prog, nsm.Vers, nsm.ProcNotify, arg(i)); err != nil {
				errs.add(err)
				continue
			}
			res.Sent++
		}
	} else {
		var replies atomic.Int64
		cs := make([]*rawClient, *conns)
		for i := range cs {
			if cs[i], err = dialRaw("tcp", from, false, to, 5*time.Second); err != nil {
				return nil, err
			}
			defer cs[i].Close()
			go func(c *rawClient) {
				buf := make([]byte, 1<<16)
				for {
					if _, err := readRecord(c.c, buf); err != nil {
						return
					}
					replies.Add(1)
				}
			}(cs[i])
		}
		for i := range *count {
			if err := cs[i%*conns].send(nsm.Prog, nsm.Vers, nsm.ProcNotify, arg(i)); err != nil {
				errs.add(err)
				continue
			}
			res.Sent++
		}
		emit(map[string]int{"pipelined": res.Sent})
		<-untilStdinCloses(*max)
		res.Replies = int(replies.Load())
	}
	res.Errors, res.First, res.Seconds = errs.count(), errs.list(), time.Since(start).Seconds()
	return res, nil
}

// ---- msgflood -----------------------------------------------------------------

type floodResult struct {
	Sent    int      `json:"sent"`
	Errors  int      `json:"errors"`
	First   []string `json:"first_errors,omitempty"`
	Seconds float64  `json:"seconds"`
}

// runMsgFlood sends --count UDP TEST_MSG (or another *_MSG procedure) at
// --rate, each asking for a *_RES callback to its sender.
func runMsgFlood(args []string) (any, error) {
	fs := newFlags("msgflood")
	var tg target
	tg.flags(fs, 4045)
	count := fs.Int("count", 1000, "datagrams")
	rate := fs.Float64("rate", 10000, "datagrams per second (0: as fast as possible)")
	callers := fs.Int("callers", 100, "distinct caller_names")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	c, err := dialRaw("udp", from, false, to, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	start := time.Now()
	var res floodResult
	var errs errList
	p := newPacer(*rate)
	for i := range *count {
		p.wait()
		caller := "adv-msg-" + strconv.Itoa(i%*callers)
		a := nlm.TestArgs{Cookie: []byte(strconv.Itoa(i)), Exclusive: true,
			Lock: nlm.Lock{CallerName: []byte(caller), FH: []byte("adv-msg"), OH: []byte(caller), SVID: int32(i), Len: 1}}
		if err := c.send(nlm.Prog, nlm.Vers4, nlm.ProcTestMsg, a.Append(nil, nlm.Vers4)); err != nil {
			errs.add(err)
			continue
		}
		res.Sent++
	}
	res.Errors, res.First, res.Seconds = errs.count(), errs.list(), time.Since(start).Seconds()
	return res, nil
}

// ---- garbage ------------------------------------------------------------------

type garbageResult struct {
	UDPSent  int      `json:"udp_sent"`
	TCPConns int      `json:"tcp_conns"`
	Errors   int      `json:"errors"`
	First    []string `json:"first_errors,omitempty"`
	Seconds  float64  `json:"seconds"`
}

// garbageMessage returns one malformed RPC message of a random kind: noise,
// a header cut short, a reply where a call belongs, a call with undecodable
// arguments.
func garbageMessage(rng *rand.Rand, xid uint32) []byte {
	switch rng.IntN(4) {
	case 0:
		b := make([]byte, 1+rng.IntN(300))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	case 1:
		b := xdr.AppendUint32(nil, xid)
		return xdr.AppendUint32(b, 0)[:4+rng.IntN(5)]
	case 2:
		b := xdr.AppendUint32(nil, xid)
		b = xdr.AppendUint32(b, 1) // REPLY
		return xdr.AppendUint32(b, 0)
	default:
		b := sunrpc.AppendCall(nil, &sunrpc.CallHeader{XID: xid, RPCVers: 2, Prog: nlm.Prog, Vers: nlm.Vers4, Proc: nlm.ProcLock})
		return append(b, 0xff, 0xff, 0xff, 0xff, 1, 2, 3)
	}
}

// runGarbage floods both ports with malformed input for --duration: UDP
// datagrams at --udp-rate, and TCP connections at --tcp-rate, each sending
// one bad record (a record mark announcing 2 GiB, endless empty fragments,
// or a malformed message) and closing.
func runGarbage(args []string) (any, error) {
	fs := newFlags("garbage")
	var tg target
	tg.flags(fs, 4045)
	ports := fs.String("ports", "4045,32765", "ports to flood")
	duration := fs.Duration("duration", 10*time.Second, "how long")
	udpRate := fs.Float64("udp-rate", 5000, "datagrams per second")
	tcpRate := fs.Float64("tcp-rate", 500, "connections per second")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	var dsts []netip.AddrPort
	for p := range strings.SplitSeq(*ports, ",") {
		n, err := strconv.Atoi(p)
		if err != nil {
			return nil, fmt.Errorf("--ports: %w", err)
		}
		dsts = append(dsts, netip.AddrPortFrom(to.Addr(), uint16(n)))
	}
	start := time.Now()
	end := start.Add(*duration)
	var errs errList
	var res garbageResult
	var udpSent, tcpConns atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		cs := make([]*rawClient, len(dsts))
		for i, d := range dsts {
			c, err := dialRaw("udp", from, false, d, time.Second)
			if err != nil {
				errs.add(err)
				return
			}
			defer c.Close()
			cs[i] = c
		}
		rng := rand.New(rand.NewPCG(1, 2))
		p := newPacer(*udpRate)
		for i := 0; time.Now().Before(end); i++ {
			p.wait()
			if _, err := cs[i%len(cs)].c.Write(garbageMessage(rng, uint32(i))); err != nil {
				errs.add(err)
				continue
			}
			udpSent.Add(1)
		}
	})
	// A few workers share the TCP pace, so that one slow connect does not
	// stall the rest.
	var tcpNext atomic.Int64
	every := time.Duration(float64(time.Second) / *tcpRate)
	for w := range 32 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 3))
			for {
				i := tcpNext.Add(1) - 1
				at := start.Add(time.Duration(i) * every)
				if !at.Before(end) {
					return
				}
				time.Sleep(time.Until(at))
				d := net.Dialer{Timeout: time.Second}
				if from.IsValid() {
					d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))
				}
				c, err := d.Dial("tcp", dsts[int(i)%len(dsts)].String())
				if err != nil {
					errs.add(err)
					continue
				}
				var rec []byte
				switch k := rng.IntN(5); {
				case k < 2:
					rec = xdr.AppendUint32(nil, 0xffffffff) // a 2 GiB last fragment
				case k < 4:
					for range 100 { // empty fragments, never a last one
						rec = xdr.AppendUint32(rec, 0)
					}
				default:
					m := garbageMessage(rng, uint32(i))
					rec = append(xdr.AppendUint32(nil, uint32(len(m))|1<<31), m...)
				}
				c.SetDeadline(time.Now().Add(200 * time.Millisecond))
				c.Write(rec)
				// Wait briefly for the server to answer or close, so that
				// the record is read before the connection goes.
				c.Read(make([]byte, 512))
				c.Close()
				tcpConns.Add(1)
			}
		})
	}
	wg.Wait()
	res.UDPSent, res.TCPConns = int(udpSent.Load()), int(tcpConns.Load())
	res.Errors, res.First, res.Seconds = errs.count(), errs.list(), time.Since(start).Seconds()
	return res, nil
}

// ---- conns --------------------------------------------------------------------

type connsResult struct {
	Opened         int      `json:"opened"`
	Failed         int      `json:"failed"`
	First          []string `json:"first_errors,omitempty"`
	ClosedByServer int      `json:"closed_by_server"`
}

// runConns opens --count TCP connections spread over --ports, sends
// nothing on them, reports how many opened, holds them until stdin closes,
// then counts those the server closed meanwhile.
func runConns(args []string) (any, error) {
	fs := newFlags("conns")
	var tg target
	tg.flags(fs, 4045)
	ports := fs.String("ports", "4045,32765", "ports")
	count := fs.Int("count", 1000, "connections")
	max := fs.Duration("max", time.Minute, "hold at most this long")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	var dsts []string
	for p := range strings.SplitSeq(*ports, ",") {
		dsts = append(dsts, net.JoinHostPort(to.Addr().String(), p))
	}
	var mu sync.Mutex
	var conns []net.Conn
	var errs errList
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= *count {
					return
				}
				d := net.Dialer{Timeout: 3 * time.Second}
				if from.IsValid() {
					d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))
				}
				c, err := d.Dial("tcp", dsts[i%len(dsts)])
				if err != nil {
					errs.add(err)
					continue
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res := connsResult{Opened: len(conns), Failed: errs.count(), First: errs.list()}
	emit(res)
	<-untilStdinCloses(*max)
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
			res.ClosedByServer++
		}
		c.Close()
	}
	return res, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// ---- nsmflood -----------------------------------------------------------------

// runNSMFlood sends --count SM_STAT (or SM_MON) over UDP at --rate, each
// naming a host that only DNS could resolve, without waiting for answers.
func runNSMFlood(args []string) (any, error) {
	fs := newFlags("nsmflood")
	var tg target
	tg.flags(fs, 32765)
	proc := fs.String("proc", "stat", "stat or mon")
	count := fs.Int("count", 100, "calls")
	rate := fs.Float64("rate", 20, "calls per second")
	nameFmt := fs.String("name-fmt", "adv-%d.nlmha.example", "host names (%d: the call's number)")
	reserved := fs.Bool("reserved", false, "from a privileged port")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	c, err := dialRaw("udp", from, *reserved, to, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	start := time.Now()
	var res floodResult
	var errs errList
	p := newPacer(*rate)
	for i := range *count {
		p.wait()
		name := fmt.Sprintf(*nameFmt, i)
		var err error
		if *proc == "mon" {
			m := nsm.Mon{MonID: nsm.MonID{MonName: name, MyID: nsm.MyID{Prog: nlm.Prog, Vers: nlm.Vers4, Proc: nlm.ProcSMNotify}}}
			err = c.send(nsm.Prog, nsm.Vers, nsm.ProcMon, m.Append(nil))
		} else {
			err = c.send(nsm.Prog, nsm.Vers, nsm.ProcStat, xdr.AppendString(nil, name))
		}
		if err != nil {
			errs.add(err)
			continue
		}
		res.Sent++
	}
	res.Errors, res.First, res.Seconds = errs.count(), errs.list(), time.Since(start).Seconds()
	return res, nil
}

// ---- rpc ----------------------------------------------------------------------

type rpcResult struct {
	Op    string `json:"op"`
	Local string `json:"local"`
	Error string `json:"error,omitempty"`
	Bool  *bool  `json:"bool,omitempty"`
	Res   *int   `json:"res,omitempty"`
	State *int   `json:"state,omitempty"`
	Port  *int   `json:"port,omitempty"`
	Uaddr string `json:"uaddr,omitempty"`
}

// runRPC makes one call, over a socket bound to --from and, with
// --reserved, a privileged port: the privilege checks of nlmd's local-only
// procedures and of its embedded portmapper.
func runRPC(args []string) (any, error) {
	fs := newFlags("rpc")
	var tg target
	tg.flags(fs, 0)
	op := fs.String("op", "", "nlm-smnotify, sm-stat, sm-mon, sm-unmon, sm-unmon-all, sm-simu-crash, pmap-set, pmap-unset, pmap-getport, rpcb-set, rpcb-unset, rpcb-getaddr")
	proto := fs.String("proto", "udp", "udp or tcp")
	reserved := fs.Bool("reserved", false, "from a privileged port")
	timeout := fs.Duration("timeout", 3*time.Second, "for the reply")
	monName := fs.String("mon-name", "", "mon_name (NSM, NLM procedure 16)")
	myName := fs.String("my-name", "", "my_name (SM_MON, SM_UNMON, SM_UNMON_ALL)")
	state := fs.Int("state", 1001, "state (procedure 16)")
	nlmVers := fs.Uint("nlm-vers", 4, "NLM version (procedure 16)")
	prog := fs.Uint("prog", nlm.Prog, "program (portmapper operations)")
	vers := fs.Uint("vers", 4, "version (portmapper operations)")
	prot := fs.String("prot", "tcp", "transport (portmapper operations)")
	setPort := fs.Uint("set-port", 5555, "port (pmap-set, rpcb-set)")
	owner := fs.String("owner", "", "owner (rpcb-set, rpcb-unset)")
	rpcbVers := fs.Uint("rpcb-vers", 4, "rpcbind version (rpcb-*)")
	fs.Parse(args)
	to, from, err := tg.addrs()
	if err != nil {
		return nil, err
	}
	c, err := dialRaw(*proto, from, *reserved, to, *timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	res := rpcResult{Op: *op, Local: c.local()}
	pmProt := uint32(6)
	if *prot == "udp" {
		pmProt = 17
	}
	myID := nsm.MyID{MyName: *myName, Prog: nlm.Prog, Vers: nlm.Vers4, Proc: nlm.ProcSMNotify}
	rpcb := func(port uint) []byte {
		b := xdr.AppendUint32(nil, uint32(*prog))
		b = xdr.AppendUint32(b, uint32(*vers))
		b = xdr.AppendString(b, *prot)
		addr := ""
		if port != 0 {
			addr = sunrpc.FormatUaddr(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(port)))
		}
		b = xdr.AppendString(b, addr)
		return xdr.AppendString(b, *owner)
	}
	var call struct {
		prog, vers, proc uint32
		args             []byte
		decode           func(d *xdr.Decoder)
	}
	intp := func(v int) *int { return &v }
	decodeBool := func(d *xdr.Decoder) { b := d.Bool(); res.Bool = &b }
	decodeStat := func(d *xdr.Decoder) { res.Res, res.State = intp(int(d.Uint32())), intp(int(d.Int32())) }
	decodeState := func(d *xdr.Decoder) { res.State = intp(int(d.Int32())) }
	switch *op {
	case "nlm-smnotify":
		st := nsm.Status{MonName: *monName, State: int32(*state)}
		call.prog, call.vers, call.proc, call.args = nlm.Prog, uint32(*nlmVers), nlm.ProcSMNotify, st.Append(nil)
	case "sm-stat":
		call.prog, call.vers, call.proc, call.args, call.decode = nsm.Prog, nsm.Vers, nsm.ProcStat, xdr.AppendString(nil, *monName), decodeStat
	case "sm-mon":
		m := nsm.Mon{MonID: nsm.MonID{MonName: *monName, MyID: myID}}
		copy(m.Priv[:], "nlmattack-priv")
		call.prog, call.vers, call.proc, call.args, call.decode = nsm.Prog, nsm.Vers, nsm.ProcMon, m.Append(nil), decodeStat
	case "sm-unmon":
		m := nsm.MonID{MonName: *monName, MyID: myID}
		call.prog, call.vers, call.proc, call.args, call.decode = nsm.Prog, nsm.Vers, nsm.ProcUnmon, m.Append(nil), decodeState
	case "sm-unmon-all":
		call.prog, call.vers, call.proc, call.args, call.decode = nsm.Prog, nsm.Vers, nsm.ProcUnmonAll, myID.Append(nil), decodeState
	case "sm-simu-crash":
		call.prog, call.vers, call.proc = nsm.Prog, nsm.Vers, nsm.ProcSimuCrash
	case "pmap-set", "pmap-unset", "pmap-getport":
		b := xdr.AppendUint32(nil, uint32(*prog))
		b = xdr.AppendUint32(b, uint32(*vers))
		b = xdr.AppendUint32(b, pmProt)
		b = xdr.AppendUint32(b, uint32(*setPort))
		call.prog, call.vers, call.args, call.decode = sunrpc.PmapProg, sunrpc.PmapVers2, b, decodeBool
		switch *op {
		case "pmap-set":
			call.proc = sunrpc.PmapProcSet
		case "pmap-unset":
			call.proc = sunrpc.PmapProcUnset
		default:
			call.proc = sunrpc.PmapProcGetPort
			call.decode = func(d *xdr.Decoder) { res.Port = intp(int(d.Uint32())) }
		}
	case "rpcb-set":
		call.prog, call.vers, call.proc, call.args, call.decode = sunrpc.PmapProg, uint32(*rpcbVers), sunrpc.PmapProcSet, rpcb(*setPort), decodeBool
	case "rpcb-unset":
		call.prog, call.vers, call.proc, call.args, call.decode = sunrpc.PmapProg, uint32(*rpcbVers), sunrpc.PmapProcUnset, rpcb(0), decodeBool
	case "rpcb-getaddr":
		call.prog, call.vers, call.proc, call.args = sunrpc.PmapProg, uint32(*rpcbVers), sunrpc.RpcbProcGetAddr, rpcb(0)
		call.decode = func(d *xdr.Decoder) { res.Uaddr = d.String(255) }
	default:
		return nil, fmt.Errorf("--op %q: unknown", *op)
	}
	out, err := c.call(call.prog, call.vers, call.proc, call.args, *timeout)
	if err != nil {
		res.Error = err.Error()
		return res, nil
	}
	if call.decode != nil {
		d := xdr.NewDecoder(out)
		call.decode(d)
		if d.Err() != nil {
			res.Error = "decoding the reply: " + d.Err().Error()
		}
	}
	return res, nil
}

// ---- unixconnect --------------------------------------------------------------

type unixResult struct {
	Attempts  int            `json:"attempts"`
	Connected int            `json:"connected"`
	Errors    map[string]int `json:"errors"`
}

// runUnixConnect keeps trying to connect to a Unix socket until stdin
// closes: run as an unprivileged user, a success means the socket let that
// user in.
func runUnixConnect(args []string) (any, error) {
	fs := newFlags("unixconnect")
	path := fs.String("path", "", "the socket")
	max := fs.Duration("max", time.Minute, "stop after this long even if stdin stays open")
	fs.Parse(args)
	res := unixResult{Errors: map[string]int{}}
	stop := untilStdinCloses(*max)
	for {
		select {
		case <-stop:
			return res, nil
		default:
		}
		res.Attempts++
		c, err := net.DialTimeout("unix", *path, 100*time.Millisecond)
		if err == nil {
			res.Connected++
			c.Close()
		} else {
			var se *net.OpError
			msg := err.Error()
			if errors.As(err, &se) && se.Err != nil {
				msg = se.Err.Error()
			}
			res.Errors[msg]++
		}
		time.Sleep(200 * time.Microsecond)
	}
}
