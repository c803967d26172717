package etcdtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// BinDirEnv names a directory to keep the built etcd binary in instead of
// the user's cache directory (for CI caches, or a HOME that is read-only).
const BinDirEnv = "NLMHA_ETCD_BIN"

// serverPkg is the main package built as the etcd server.
const serverPkg = "github.com/nlmha/nlmha/internal/etcdtest/etcdserver"

// staleAfter is how long an unused binary of another go.sum stays in the
// cache: worktrees on other branches share the directory, so only binaries
// nobody has used for a while are removed.
const staleAfter = 7 * 24 * time.Hour

// built is the build-once guard: the binary's path once this process has
// found or built it. A failed build is not remembered, so the next test
// tries again and reports its own error.
var built struct {
	sync.Mutex
	path string
}

// Binary returns the path of the etcd server binary, building it first if
// this machine has none for the module's current go.sum. Parallel test
// processes (go test ./... runs packages at once) take a file lock, so the
// ~25 s build happens once and the others wait for it.
func Binary(ctx context.Context) (string, error) {
	built.Lock()
	defer built.Unlock()
	if built.path != "" {
		return built.path, nil
	}
	p, err := findOrBuild(ctx)
	if err != nil {
		return "", err
	}
	built.path = p
	return p, nil
}

func findOrBuild(ctx context.Context) (string, error) {
	modDir, err := moduleDir(ctx)
	if err != nil {
		return "", err
	}
	key, err := sourceKey(modDir)
	if err != nil {
		return "", err
	}
	dir, err := binDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("etcdtest: creating the binary cache: %w", err)
	}
	bin := filepath.Join(dir, "etcd-"+key)

	unlock, err := lockFile(filepath.Join(dir, "etcd.lock"))
	if err != nil {
		return "", err
	}
	defer unlock()

	if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() {
		// Mark it used, so pruning in other worktrees leaves it alone.
		now := time.Now()
		_ = os.Chtimes(bin, now, now)
		return bin, nil
	}

	// Build beside the target and rename, so a build killed halfway never
	// leaves a truncated binary under the final name.
	tmp := fmt.Sprintf("%s.tmp%d", bin, os.Getpid())
	defer os.Remove(tmp)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, serverPkg)
	cmd.Dir = modDir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("etcdtest: go build %s: %w\n%s", serverPkg, err, out.Bytes())
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", fmt.Errorf("etcdtest: installing the etcd binary: %w", err)
	}
	pruneStale(dir, bin)
	return bin, nil
}

// moduleDir is the root of the module the test runs in (a test's working
// directory is its package directory).
func moduleDir(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("etcdtest: go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("etcdtest: not inside a Go module; cannot build the etcd server")
	}
	return filepath.Dir(gomod), nil
}

// sourceKey names a binary by what decides its content: the dependency
// versions (go.sum), our main package, and the target platform.
func sourceKey(modDir string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s/%s\n", runtime.GOOS, runtime.GOARCH)
	for _, f := range []string{"go.sum", "internal/etcdtest/etcdserver/main.go"} {
		b, err := os.ReadFile(filepath.Join(modDir, f))
		if err != nil {
			return "", fmt.Errorf("etcdtest: hashing the etcd sources: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", f, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

func binDir() (string, error) {
	if d := os.Getenv(BinDirEnv); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		// No HOME (some CI sandboxes): still share across packages.
		d = os.TempDir()
	}
	return filepath.Join(d, "nlmha"), nil
}

// lockFile takes an exclusive flock, which the kernel drops if the holder
// dies, so a killed test run never leaves the cache locked.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: opening the build lock: %w", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("etcdtest: locking %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// pruneStale removes binaries for other go.sum contents that nobody has
// used for staleAfter (each is ~36 MB). Errors are ignored: it is tidying.
func pruneStale(dir, keep string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if p == keep || !strings.HasPrefix(e.Name(), "etcd-") || e.Type()&fs.ModeType != 0 {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > staleAfter {
			os.Remove(p)
		}
	}
}
