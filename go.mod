module github.com/nlmha/nlmha

go 1.26.0

require (
	github.com/cockroachdb/datadriven v1.0.3
	github.com/rasky/go-xdr v0.0.0-20170124162913-1a41d1a06c93
	github.com/sirupsen/logrus v1.10.2
	github.com/spf13/cobra v1.10.2
	github.com/spf13/pflag v1.0.10
	golang.org/x/net v0.62.0
	golang.org/x/sys v0.49.0
)

require (
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/pmezard/go-difflib v1.0.0 // indirect
)
