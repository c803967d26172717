package memdlm

import (
	"testing"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
)

func TestContract(t *testing.T) {
	dlmtest.Run(t, func(*testing.T) dlm.Backend { return New() })
}

// The contract holds for a backend that runs every function twice, the
// first run thrown away (as an optimistic one does on conflict).
func TestContractRetrying(t *testing.T) {
	dlmtest.Run(t, func(*testing.T) dlm.Backend { return dlmtest.Retrying(New()) })
}
