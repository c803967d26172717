package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"go.yaml.in/yaml/v3"
)

// fileConfig is nlmd's YAML configuration file. Every key is optional and
// stands for the flag of the same name (with - for _); an unknown key is
// an error, so that a typo is not silently ignored.
//
//	listen_mode: wildcard
//	state_dir: /srv/nlmha
//	grace_period: 90s
//	vips:
//	  - addr: 192.0.2.10
//	    name: nfs-a
type fileConfig struct {
	Listen        []string  `yaml:"listen"`
	ListenMode    *string   `yaml:"listen_mode"`
	NLMPort       *uint16   `yaml:"nlm_port"`
	NSMPort       *uint16   `yaml:"nsm_port"`
	Rpcbind       *string   `yaml:"rpcbind"`
	PortmapPort   *uint16   `yaml:"portmap_port"`
	StateDir      *string   `yaml:"state_dir"`
	ControlSocket *string   `yaml:"control_socket"`
	MetricsListen *string   `yaml:"metrics_listen"`
	VIPs          []fileVIP `yaml:"vips"`
	ServeUnknown  *bool     `yaml:"serve_unknown"`
	GracePeriod   *duration `yaml:"grace_period"`
	GraceQuiet    *duration `yaml:"grace_quiet"`
	NoSnapshot    *bool     `yaml:"no_snapshot"`
	NoNotify      *bool     `yaml:"no_notify"`
	UnprivLocal   *bool     `yaml:"unprivileged_local"`
	NotifyTimeout *duration `yaml:"notify_timeout"`
	NotifyWindow  *int      `yaml:"notify_window"`
	HACallout     *string   `yaml:"ha_callout"`
	HACalloutWait *duration `yaml:"ha_callout_timeout"`
	NFSServer     *string   `yaml:"nfs_server"`
	MaxLocks      *int64    `yaml:"max_locks_per_host"`
	MaxPerAddr    *int      `yaml:"max_clients_per_address"`
	MaxConns      *int      `yaml:"max_connections"`
	MaxBlocked    *int64    `yaml:"max_blocked_per_host"`
	MaxShares     *int64    `yaml:"max_shares_per_host"`
	MaxRequest    *int      `yaml:"max_request_size"`
	ShutdownWait  *duration `yaml:"shutdown_timeout"`
	Procs         *int      `yaml:"procs"`
	LogFormat     *string   `yaml:"log_format"`
	LogLevel      *string   `yaml:"log_level"`
	Backend       *string   `yaml:"backend"`
	EtcdEndpoints []string  `yaml:"etcd_endpoints"`
	EtcdPrefix    *string   `yaml:"etcd_prefix"`
	EtcdCACert    *string   `yaml:"etcd_cacert"`
	EtcdCert      *string   `yaml:"etcd_cert"`
	EtcdKey       *string   `yaml:"etcd_key"`
	EtcdEmbedded  *string   `yaml:"etcd_embedded"`
	EtcdEmbedURL  *string   `yaml:"etcd_embedded_listen"`
	NodeName      *string   `yaml:"node_name"`
	LeaseTTL      *duration `yaml:"lease_ttl"`
}

type fileVIP struct {
	Addr string `yaml:"addr"`
	Name string `yaml:"name"`
}

type duration time.Duration

func (d *duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (like 90s or 15m)", n.Line, n.Value)
	}
	*d = duration(v)
	return nil
}

// loadConfig reads the YAML file at path over o.
func loadConfig(path string, o *options) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	var c fileConfig
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: %w", path, err)
	}
	o.config = path
	set(&o.listen, c.Listen)
	setp(&o.listenMode, c.ListenMode)
	setp(&o.nlmPort, c.NLMPort)
	setp(&o.nsmPort, c.NSMPort)
	setp(&o.rpcbind, c.Rpcbind)
	setp(&o.portmapPort, c.PortmapPort)
	setp(&o.stateDir, c.StateDir)
	setp(&o.controlSocket, c.ControlSocket)
	setp(&o.metricsListen, c.MetricsListen)
	if c.VIPs != nil {
		o.vips = nil
		for _, v := range c.VIPs {
			s := v.Addr
			if v.Name != "" {
				s += "=" + v.Name
			}
			o.vips = append(o.vips, s)
		}
	}
	setp(&o.serveUnknown, c.ServeUnknown)
	setd(&o.grace, c.GracePeriod)
	setd(&o.graceQuiet, c.GraceQuiet)
	setp(&o.noSnapshot, c.NoSnapshot)
	setp(&o.noNotify, c.NoNotify)
	setp(&o.unprivLocal, c.UnprivLocal)
	setd(&o.notifyGiveUp, c.NotifyTimeout)
	setp(&o.notifyWindow, c.NotifyWindow)
	setp(&o.haCallout, c.HACallout)
	setd(&o.calloutWait, c.HACalloutWait)
	setp(&o.nfsServer, c.NFSServer)
	setp(&o.locksPerHost, c.MaxLocks)
	setp(&o.namesPerAddr, c.MaxPerAddr)
	setp(&o.maxConns, c.MaxConns)
	setp(&o.blockedPerHst, c.MaxBlocked)
	setp(&o.sharesPerHost, c.MaxShares)
	setp(&o.maxRecord, c.MaxRequest)
	setd(&o.shutdownWait, c.ShutdownWait)
	setp(&o.procs, c.Procs)
	setp(&o.logFormat, c.LogFormat)
	setp(&o.logLevel, c.LogLevel)
	setp(&o.backend, c.Backend)
	set(&o.etcdEndpoints, c.EtcdEndpoints)
	setp(&o.etcdPrefix, c.EtcdPrefix)
	setp(&o.etcdCACert, c.EtcdCACert)
	setp(&o.etcdCert, c.EtcdCert)
	setp(&o.etcdKey, c.EtcdKey)
	setp(&o.etcdEmbedded, c.EtcdEmbedded)
	setp(&o.etcdEmbedURL, c.EtcdEmbedURL)
	setp(&o.nodeName, c.NodeName)
	setd(&o.leaseTTL, c.LeaseTTL)
	return nil
}

func setp[T any](dst *T, v *T) {
	if v != nil {
		*dst = *v
	}
}

func set[T any](dst *[]T, v []T) {
	if v != nil {
		*dst = v
	}
}

func setd(dst *time.Duration, v *duration) {
	if v != nil {
		*dst = time.Duration(*v)
	}
}
