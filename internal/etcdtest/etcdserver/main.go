// Command etcdserver is the ordinary etcd server, built from our own module
// so tests can run real etcd members without etcd being installed: the
// upstream main package can't be `go install`ed (its go.mod has replace
// directives). internal/etcdtest builds it once per machine and runs it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
