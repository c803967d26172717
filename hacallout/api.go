package hacallout

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/virtualserver"
)

// The control API: HTTP+JSON on a Unix socket (mode 0600), for nlmadmin
// and the cluster hooks. Every answer is JSON; an error is
// {"error": "..."} with a 4xx or 5xx status.
//
//	GET  /v1/status                       this node and its virtual servers
//	GET  /v1/vips                         the virtual servers
//	GET  /v1/vips/{vip}                   one (404: not known here)
//	POST /v1/vips/{vip}/takeover          {"name": "..."} (optional)
//	POST /v1/vips/{vip}/release           {"snapshot": false} (default true)
//	POST /v1/vips/{vip}/grace/start       a full grace period, no early end
//	POST /v1/vips/{vip}/grace/end
//	POST /v1/vips/{vip}/notify            new NSM state, SM_NOTIFY to its clients
//	GET  /v1/locks?vip=&client=&fh=&limit=
//	GET  /v1/clients?vip=
//	POST /v1/clients/drop                 {"client": "...", "vip": "..."}
//	GET  /v1/cluster                      the nodes sharing the backend (404: none)

// VIPStatus describes one virtual server.
type VIPStatus struct {
	VIP      netip.Addr                `json:"vip"`
	Name     string                    `json:"name"`
	State    string                    `json:"state"`
	Epoch    uint64                    `json:"epoch"`
	Grace    virtualserver.GraceStatus `json:"grace"`
	NSMState int32                     `json:"nsm_state,omitempty"`
	Notify   *NotifyStatus             `json:"notify,omitempty"`
	Locks    int64                     `json:"locks"`
	Blocked  int64                     `json:"blocked"`
	Shares   int64                     `json:"shares"`
	Clients  int                       `json:"clients"` // monitored client hosts
}

// NotifyStatus is a virtual server's last notification.
type NotifyStatus struct {
	State    int32     `json:"state"`
	Total    int       `json:"total"`
	Done     int       `json:"done"`
	Failed   int       `json:"failed"`
	Pending  int       `json:"pending"`
	Started  time.Time `json:"started,omitzero"`
	Finished time.Time `json:"finished,omitzero"`
}

// NodeStatus describes this node.
type NodeStatus struct {
	Version  string      `json:"version"`
	PID      int         `json:"pid"`
	Host     string      `json:"host"`
	Started  time.Time   `json:"started"`
	StateDir string      `json:"state_dir"`
	Listen   string      `json:"listen_mode"`
	VIPs     []VIPStatus `json:"vips"`
}

// ClientInfo is one client host of one virtual server.
type ClientInfo struct {
	VIP       netip.Addr `json:"vip"`
	Client    netip.Addr `json:"client"`
	Callers   []string   `json:"callers,omitempty"`
	Monitored bool       `json:"monitored"`
	Locks     int64      `json:"locks"`
	Blocked   int64      `json:"blocked"`
	Shares    int64      `json:"shares"`
	Notify    string     `json:"notify,omitempty"` // done, pending, failed
}

// LocksReply answers GET /v1/locks.
type LocksReply struct {
	Locks     []LockInfo `json:"locks"`
	Truncated bool       `json:"truncated,omitempty"`
}

// LockInfo is a lock with the node that serves its virtual server (with
// a shared backend, the locks of every node are listed; empty: this node
// alone, or nobody serves the virtual server now).
type LockInfo struct {
	nlm.LockInfo
	Node string `json:"node,omitempty"`
}

// Cluster is what a backend shared by nodes tells about them.
type Cluster interface {
	ClusterStatus(ctx context.Context) (ClusterStatus, error)
	// VIPOwners maps the virtual servers served now to their nodes.
	VIPOwners(ctx context.Context) (map[netip.Addr]string, error)
}

// ClusterStatus describes the nodes that share the lock backend.
type ClusterStatus struct {
	Backend string `json:"backend"`
	Node    string `json:"node"` // this node
	Prefix  string `json:"prefix,omitempty"`
	// LeaseDeadline is when this node fences itself unless a keepalive is
	// acknowledged before; SelfFenced once it has.
	LeaseDeadline  time.Time         `json:"lease_deadline"`
	SelfFenced     bool              `json:"self_fenced,omitempty"`
	Nodes          []ClusterNode     `json:"nodes"`
	VirtualServers []ClusterVIP      `json:"virtual_servers"`
	Endpoints      []EndpointHealth  `json:"endpoints"`
	Stats          map[string]uint64 `json:"stats,omitempty"`
	// Error: the store could not be read (what this node knows of itself
	// is reported all the same).
	Error string `json:"error,omitempty"`
}

// ClusterNode is a live node.
type ClusterNode struct {
	Name    string    `json:"name"`
	Started time.Time `json:"started"`
	// LeaseTTL is the remaining TTL of its lease as the store reports it
	// (a minimum: a leader change restarts it).
	LeaseTTL int64             `json:"lease_ttl_seconds"`
	Info     map[string]string `json:"info,omitempty"`
}

// ClusterVIP is a virtual server as the shared backend knows it.
type ClusterVIP struct {
	VIP   netip.Addr `json:"vip"`
	Owner string     `json:"owner,omitempty"` // empty: nobody serves it
	Epoch uint64     `json:"epoch"`
	// Handoff: a planned release left its records for the next owner.
	Handoff bool `json:"handoff,omitempty"`
}

// EndpointHealth is one store endpoint's health.
type EndpointHealth struct {
	Endpoint string   `json:"endpoint"`
	Healthy  bool     `json:"healthy"`
	Leader   bool     `json:"leader,omitempty"`
	Version  string   `json:"version,omitempty"`
	DBSize   int64    `json:"db_size,omitempty"`
	Error    string   `json:"error,omitempty"`
	Took     Duration `json:"took"`
}

// vipOwners maps virtual servers to the nodes serving them (nil without
// a cluster, or when the store cannot be read).
func (m *Manager) vipOwners(ctx context.Context) map[netip.Addr]string {
	if m.cfg.Cluster == nil {
		return nil
	}
	owners, _ := m.cfg.Cluster.VIPOwners(ctx)
	return owners
}

// DropReply answers POST /v1/clients/drop.
type DropReply struct {
	Client netip.Addr `json:"client"`
	Hosts  int        `json:"hosts"` // client host records dropped
}

// Info is what the node says of itself in /v1/status.
type Info struct {
	Version string
	Listen  string
	Started time.Time
}

// VIPs describes the virtual servers known here, by address.
func (m *Manager) VIPs() []VIPStatus {
	hosts := m.cfg.NLM.Hosts()
	var out []VIPStatus
	for _, vs := range m.cfg.Registry.All() {
		out = append(out, m.vipStatus(vs, hosts[vs.Addr()]))
	}
	slices.SortFunc(out, func(a, b VIPStatus) int { return a.VIP.Compare(b.VIP) })
	return out
}

func (m *Manager) vipStatus(vs *virtualserver.Server, hosts map[netip.Addr][]nlm.HostCounts) VIPStatus {
	st := VIPStatus{VIP: vs.Addr(), Name: vs.Name(), State: vs.State().String(), Epoch: vs.Epoch(), Grace: vs.Grace()}
	for _, hs := range hosts {
		for _, h := range hs {
			st.Locks += h.Locks
			st.Blocked += h.Blocked
			st.Shares += h.Shares
		}
	}
	if vs.Serving() {
		st.NSMState, _ = m.cfg.NSM.State(vs.Addr())
		if p, ok := m.cfg.NSM.Progress(vs.Addr()); ok && !p.Started.IsZero() {
			st.Notify = &NotifyStatus{State: p.State, Total: p.Total, Done: p.Done, Failed: p.Failed, Pending: p.Pending(),
				Started: p.Started, Finished: p.Finished}
		}
		st.Clients = len(clientAddrs(m.cfg.NSM.Records(vs.Addr())))
	}
	return st
}

func clientAddrs(recs []nsm.Record) map[netip.Addr][]string {
	out := map[netip.Addr][]string{}
	for _, r := range recs {
		if r.Kind == nsm.KindClient && len(r.Addrs) > 0 {
			out[r.Addrs[0]] = append(out[r.Addrs[0]], r.Caller)
		}
	}
	return out
}

// Clients lists the client hosts of one virtual server (or all).
func (m *Manager) Clients(vip netip.Addr) []ClientInfo {
	hosts := m.cfg.NLM.Hosts()
	var out []ClientInfo
	for _, vs := range m.cfg.Registry.All() {
		if (vip.IsValid() && vs.Addr() != vip) || !vs.Serving() {
			continue
		}
		byAddr := map[netip.Addr]*ClientInfo{}
		get := func(a netip.Addr) *ClientInfo {
			if c := byAddr[a]; c != nil {
				return c
			}
			c := &ClientInfo{VIP: vs.Addr(), Client: a}
			byAddr[a] = c
			return c
		}
		for a, callers := range clientAddrs(m.cfg.NSM.Records(vs.Addr())) {
			c := get(a)
			c.Monitored = true
			c.Callers = append(c.Callers, callers...)
		}
		for a, hs := range hosts[vs.Addr()] {
			c := get(a)
			for _, h := range hs {
				c.Locks += h.Locks
				c.Blocked += h.Blocked
				c.Shares += h.Shares
				if !slices.Contains(c.Callers, h.Caller) {
					c.Callers = append(c.Callers, h.Caller)
				}
			}
		}
		for a, state := range m.cfg.NSM.NotifyStates(vs.Addr()) {
			get(a).Notify = state
		}
		for _, c := range byAddr {
			slices.Sort(c.Callers)
			out = append(out, *c)
		}
	}
	slices.SortFunc(out, func(a, b ClientInfo) int {
		if c := a.VIP.Compare(b.VIP); c != 0 {
			return c
		}
		return a.Client.Compare(b.Client)
	})
	return out
}

// DropClient drops a client host's locks, blocked requests and shares
// (on one virtual server, or all), as if it had rebooted.
func (m *Manager) DropClient(ctx context.Context, vip, client netip.Addr) (int, error) {
	if !client.IsValid() {
		return 0, nil
	}
	return m.cfg.NLM.DropHosts(ctx, dlm.Selector{VIP: vip.Unmap(), Addr: client.Unmap()}, dlm.Claim{})
}

// Handler serves the control API.
func (m *Manager) Handler(info Info) http.Handler {
	mux := http.NewServeMux()
	host, _ := os.Hostname()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, NodeStatus{Version: info.Version, PID: os.Getpid(), Host: host, Started: info.Started,
			StateDir: m.cfg.StateDir, Listen: info.Listen, VIPs: m.VIPs()})
	})
	mux.HandleFunc("GET /v1/vips", func(w http.ResponseWriter, r *http.Request) { reply(w, m.VIPs()) })
	mux.HandleFunc("GET /v1/vips/{vip}", func(w http.ResponseWriter, r *http.Request) {
		vs, ok := m.vipParam(w, r)
		if ok {
			reply(w, m.vipStatus(vs, m.cfg.NLM.Hosts()[vs.Addr()]))
		}
	})
	mux.HandleFunc("POST /v1/vips/{vip}/takeover", func(w http.ResponseWriter, r *http.Request) {
		a, ok := addrParam(w, r.PathValue("vip"))
		if !ok {
			return
		}
		var body struct {
			Name string `json:"name"`
		}
		if !readBody(w, r, &body) {
			return
		}
		res, err := m.Takeover(r.Context(), virtualserver.Spec{Addr: a, Name: body.Name})
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		reply(w, res)
	})
	mux.HandleFunc("POST /v1/vips/{vip}/release", func(w http.ResponseWriter, r *http.Request) {
		a, ok := addrParam(w, r.PathValue("vip"))
		if !ok {
			return
		}
		body := struct {
			Snapshot *bool `json:"snapshot"`
		}{}
		if !readBody(w, r, &body) {
			return
		}
		res, err := m.Release(r.Context(), a, body.Snapshot == nil || *body.Snapshot)
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		reply(w, res)
	})
	mux.HandleFunc("POST /v1/vips/{vip}/grace/{action}", func(w http.ResponseWriter, r *http.Request) {
		vs, ok := m.vipParam(w, r)
		if !ok {
			return
		}
		switch r.PathValue("action") {
		case "start":
			vs.BeginGrace(false, true, nil)
		case "end":
			vs.EndGrace(virtualserver.EndAdmin)
		default:
			fail(w, http.StatusNotFound, fmt.Errorf("no grace action %q (start or end)", r.PathValue("action")))
			return
		}
		reply(w, m.vipStatus(vs, m.cfg.NLM.Hosts()[vs.Addr()]))
	})
	mux.HandleFunc("POST /v1/vips/{vip}/notify", func(w http.ResponseWriter, r *http.Request) {
		vs, ok := m.vipParam(w, r)
		if !ok {
			return
		}
		if _, err := m.cfg.NSM.Renotify(r.Context(), vs); err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		reply(w, m.vipStatus(vs, m.cfg.NLM.Hosts()[vs.Addr()]))
	})
	mux.HandleFunc("GET /v1/cluster", func(w http.ResponseWriter, r *http.Request) {
		if m.cfg.Cluster == nil {
			fail(w, http.StatusNotFound, errors.New("no cluster: the lock backend is this node's alone (--backend memory)"))
			return
		}
		st, err := m.cfg.Cluster.ClusterStatus(r.Context())
		if err != nil {
			fail(w, http.StatusServiceUnavailable, err)
			return
		}
		reply(w, st)
	})
	mux.HandleFunc("GET /v1/locks", func(w http.ResponseWriter, r *http.Request) {
		var f nlm.LockFilter
		q := r.URL.Query()
		var ok bool
		if v := q.Get("vip"); v != "" {
			if f.VIP, ok = addrParam(w, v); !ok {
				return
			}
		}
		if v := q.Get("client"); v != "" {
			if f.Client, ok = addrParam(w, v); !ok {
				return
			}
		}
		if v := q.Get("fh"); v != "" {
			fh, err := hex.DecodeString(v)
			if err != nil || len(fh) == 0 {
				fail(w, http.StatusBadRequest, fmt.Errorf("fh %q: want hex", v))
				return
			}
			f.FH = fh
		}
		f.Limit = 10000
		if v := q.Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				fail(w, http.StatusBadRequest, fmt.Errorf("limit %q", v))
				return
			}
			f.Limit = n
		}
		locks, cut, err := m.cfg.NLM.Locks(r.Context(), f)
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		if locks == nil {
			locks = []nlm.LockInfo{}
		}
		out := LocksReply{Locks: make([]LockInfo, len(locks)), Truncated: cut}
		owners := m.vipOwners(r.Context())
		for i, l := range locks {
			out.Locks[i] = LockInfo{LockInfo: l, Node: owners[l.VIP]}
		}
		reply(w, out)
	})
	mux.HandleFunc("GET /v1/clients", func(w http.ResponseWriter, r *http.Request) {
		var vip netip.Addr
		if v := r.URL.Query().Get("vip"); v != "" {
			var ok bool
			if vip, ok = addrParam(w, v); !ok {
				return
			}
		}
		out := m.Clients(vip)
		if out == nil {
			out = []ClientInfo{}
		}
		reply(w, out)
	})
	mux.HandleFunc("POST /v1/clients/drop", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Client string `json:"client"`
			VIP    string `json:"vip"`
		}
		if !readBody(w, r, &body) {
			return
		}
		c, ok := addrParam(w, body.Client)
		if !ok {
			return
		}
		var vip netip.Addr
		if body.VIP != "" {
			if vip, ok = addrParam(w, body.VIP); !ok {
				return
			}
		}
		n, err := m.DropClient(r.Context(), vip, c)
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		reply(w, DropReply{Client: c, Hosts: n})
	})
	return mux
}

func (m *Manager) vipParam(w http.ResponseWriter, r *http.Request) (*virtualserver.Server, bool) {
	a, ok := addrParam(w, r.PathValue("vip"))
	if !ok {
		return nil, false
	}
	vs, ok := m.cfg.Registry.Get(a)
	if !ok {
		fail(w, http.StatusNotFound, fmt.Errorf("%v is not a virtual server of this node", a))
		return nil, false
	}
	return vs, true
}

func addrParam(w http.ResponseWriter, s string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		fail(w, http.StatusBadRequest, fmt.Errorf("%q is not an IP address", s))
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

func readBody(w http.ResponseWriter, r *http.Request, v any) bool {
	if r.ContentLength == 0 {
		return true
	}
	d := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		fail(w, http.StatusBadRequest, fmt.Errorf("request body: %w", err))
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// APIError is an error the API answered with.
type APIError struct {
	Status  int    `json:"-"`
	Message string `json:"error"`
}

func (e *APIError) Error() string { return e.Message }

func fail(w http.ResponseWriter, status int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(APIError{Message: err.Error()})
}

// ListenControl opens the control socket at path, mode 0600, replacing a
// stale socket file left by a crashed nlmd (but not a live one).
func ListenControl(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("hacallout: another nlmd answers on %s", path)
	}
	os.Remove(path)
	// The socket is made in a directory of our own (mode 0700), given its
	// mode there and only then renamed into place: created at path, it
	// would be world-writable for an instant under a lax umask.
	dir, err := os.MkdirTemp(filepath.Dir(path), ".nlmd-control-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "sock")
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	// Closing must not unlink tmp's name, which is gone (nlmd removes the
	// socket at path when it stops).
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// ErrNotRunning is returned by the client when no nlmd answers.
var ErrNotRunning = errors.New("nlmd is not running")
