package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/etcddlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/virtualserver"
)

// backendParts is the lock backend and, with etcd, what goes with it:
// ownership of virtual servers in etcd, and what to close after the
// backend.
type backendParts struct {
	backend dlm.Backend
	etcd    *etcddlm.Backend
	owners  *etcddlm.Owners
	closers []func() error
}

// newBackend makes the lock backend. Everything above it sees only
// dlm.Backend (and, with etcd, virtualserver.Ownership).
func newBackend(ctx context.Context, o *options, log *slog.Logger) (*backendParts, error) {
	if o.backend == "memory" {
		b := memdlm.New()
		b.SetHostLimit(o.namesPerAddr)
		return &backendParts{backend: b}, nil
	}
	p := &backendParts{}
	fail := func(err error) (*backendParts, error) {
		p.close()
		return nil, err
	}
	var cli *clientv3.Client
	if o.etcdEmbedded != "" {
		e, err := startEmbeddedEtcd(o.etcdEmbedded, o.etcdEmbedURL, log)
		if err != nil {
			return nil, err
		}
		p.closers = append(p.closers, func() error { e.Close(); return nil })
		// In process: the client calls the server without a network hop.
		cli = v3client.New(e.Server)
		p.closers = append([]func() error{cli.Close}, p.closers...)
	} else {
		tlsCfg, err := etcdTLS(o)
		if err != nil {
			return nil, err
		}
		cli, err = clientv3.New(clientv3.Config{
			Endpoints:            o.etcdEndpoints,
			DialTimeout:          5 * time.Second,
			DialKeepAliveTime:    5 * time.Second,
			DialKeepAliveTimeout: 5 * time.Second,
			TLS:                  tlsCfg,
			Logger:               zap.NewNop(),
		})
		if err != nil {
			return nil, fmt.Errorf("etcd: %w", err)
		}
		p.closers = append(p.closers, cli.Close)
	}
	// Fail now, and clearly, if etcd cannot be reached.
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := cli.Get(sctx, "health", clientv3.WithCountOnly())
	cancel()
	if err != nil {
		return fail(fmt.Errorf("etcd at %v: %w", o.etcdEndpoints, err))
	}
	b, err := etcddlm.New(ctx, etcddlm.Config{Client: cli, Prefix: o.etcdPrefix, Node: o.nodeName, Log: log})
	if err != nil {
		return fail(err)
	}
	b.SetHostLimit(o.namesPerAddr)
	p.backend, p.etcd = b, b
	p.owners, err = etcddlm.NewOwners(ctx, b, etcddlm.OwnersConfig{TTL: o.leaseTTL,
		Info: map[string]string{"listen": fmt.Sprint(o.listen), "version": version}})
	if err != nil {
		b.Close()
		return fail(err)
	}
	return p, nil
}

var _ nsm.Mirror = (*etcddlm.NSMStore)(nil)

// nsmMirror is where the NSM state of virtual servers is shared: etcd,
// with that backend (the state directory then need not be shared
// storage); nowhere with the memory backend.
func (p *backendParts) nsmMirror() nsm.Mirror {
	if p.etcd == nil {
		return nil
	}
	return p.etcd.NSM()
}

// close releases what newBackend opened after the backend, in order.
func (p *backendParts) close() {
	for _, c := range p.closers {
		_ = c()
	}
	p.closers = nil
}

func etcdTLS(o *options) (*tls.Config, error) {
	if o.etcdCACert == "" && o.etcdCert == "" && o.etcdKey == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.etcdCACert != "" {
		pem, err := os.ReadFile(o.etcdCACert)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cacert: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-cacert %s: no certificate found", o.etcdCACert)
		}
		cfg.RootCAs = pool
	}
	if o.etcdCert != "" || o.etcdKey != "" {
		if o.etcdCert == "" || o.etcdKey == "" {
			return nil, errors.New("--etcd-cert and --etcd-key go together")
		}
		cert, err := tls.LoadX509KeyPair(o.etcdCert, o.etcdKey)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// startEmbeddedEtcd runs a one-member etcd inside nlmd, durable in dir,
// reached in process (its client listener is on loopback, on a port the
// kernel picks unless --etcd-embedded-listen names one, for etcdctl or a
// benchmark). Auto-compaction keeps lock churn from filling it.
func startEmbeddedEtcd(dir, clientURL string, log *slog.Logger) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.Name = "nlmd"
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	// etcd's own log (JSON, noisy at shutdown) is off: what matters of
	// it reaches nlmd as errors of its requests, logged there.
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "5m"
	lc, err := url.Parse(clientURL)
	if err != nil {
		return nil, fmt.Errorf("--etcd-embedded-listen: %w", err)
	}
	lp, _ := url.Parse("http://127.0.0.1:0")
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*lc}, []url.URL{*lc}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*lp}, []url.URL{*lp}
	cfg.InitialCluster = cfg.Name + "=" + lp.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("--etcd-embedded %s: %w", dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("--etcd-embedded %s: etcd not ready after 60 s", dir)
	}
	log.Info("nlmd: embedded etcd ready", "dir", dir, "client_url", e.Clients[0].Addr().String())
	return e, nil
}

// etcdOwnership is virtual-server ownership in etcd for the manager.
type etcdOwnership struct{ o *etcddlm.Owners }

func (e etcdOwnership) Claim(ctx context.Context, a netip.Addr) (virtualserver.Claimed, error) {
	c, err := e.o.Claim(ctx, a)
	return virtualserver.Claimed{Epoch: c.Epoch, Prev: c.Prev, Handoff: c.Handoff}, err
}

func (e etcdOwnership) Release(ctx context.Context, a netip.Addr, epoch uint64, handoff []byte) error {
	err := e.o.Release(ctx, a, epoch, handoff)
	if errors.Is(err, etcddlm.ErrLost) {
		return fmt.Errorf("%w: %w", virtualserver.ErrLost, err)
	}
	return err
}

func (e etcdOwnership) Lost() <-chan netip.Addr { return e.o.Lost() }

// etcdCluster answers the control API's /v1/cluster.
type etcdCluster struct{ p *backendParts }

func (c etcdCluster) VIPOwners(ctx context.Context) (map[netip.Addr]string, error) {
	return c.p.owners.VIPOwners(ctx)
}

func (c etcdCluster) ClusterStatus(ctx context.Context) (hacallout.ClusterStatus, error) {
	b, o := c.p.etcd, c.p.owners
	st := hacallout.ClusterStatus{Backend: "etcd", Node: b.Node(), Prefix: b.Prefix(), LeaseDeadline: o.Deadline(), SelfFenced: o.Fenced()}
	// What this node knows of itself is reported even when etcd cannot
	// be read: that is when an admin needs it most.
	octx, cancel := context.WithTimeout(ctx, time.Second)
	nodes, vss, err := o.ClusterStatus(octx)
	cancel()
	if err != nil {
		st.Error = err.Error()
	}
	for _, n := range nodes {
		st.Nodes = append(st.Nodes, hacallout.ClusterNode{Name: n.Node, Started: n.Started, LeaseTTL: n.TTL, Info: n.Info})
	}
	slices.SortFunc(vss, func(a, b etcddlm.VirtualServer) int { return a.VIP.Compare(b.VIP) })
	for _, v := range vss {
		st.VirtualServers = append(st.VirtualServers, hacallout.ClusterVIP{VIP: v.VIP, Owner: v.Owner, Epoch: v.Epoch, Handoff: v.Handoff})
	}
	cli := b.Client()
	eps := cli.Endpoints()
	if len(eps) == 0 {
		eps = []string{"(embedded)"}
	}
	// In parallel, each bounded: an unreachable member costs a second.
	st.Endpoints = make([]hacallout.EndpointHealth, len(eps))
	var wg sync.WaitGroup
	for i, ep := range eps {
		wg.Go(func() {
			h := hacallout.EndpointHealth{Endpoint: ep}
			start := time.Now()
			sctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			var s *clientv3.StatusResponse
			var err error
			if ep == "(embedded)" {
				_, err = cli.Get(sctx, "health", clientv3.WithCountOnly())
			} else {
				s, err = cli.Status(sctx, ep)
			}
			h.Took = hacallout.Duration(time.Since(start))
			switch {
			case err != nil:
				h.Error = err.Error()
			case s != nil:
				h.Healthy = len(s.Errors) == 0
				h.Leader = s.Header.MemberId == s.Leader
				h.Version, h.DBSize = s.Version, s.DbSize
				if len(s.Errors) > 0 {
					h.Error = strings.Join(s.Errors, "; ")
				}
			default:
				h.Healthy = true
			}
			st.Endpoints[i] = h
		})
	}
	wg.Wait()
	es := b.Stats()
	st.Stats = map[string]uint64{"transactions": es.Txns, "reads": es.Reads, "retries": es.Retries, "fenced_edits": es.Fenced,
		"self_fencing": es.SelfFenced, "conflicts": es.Conflicts, "relists": es.Relists}
	return st, nil
}
