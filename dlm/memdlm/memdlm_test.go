package memdlm

import (
	"testing"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
)

func TestContract(t *testing.T) {
	dlmtest.Run(t, func(*testing.T) dlm.Backend { return New() })
}
