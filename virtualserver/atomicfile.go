package virtualserver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// TempPrefix starts the names of files being written by WriteFileAtomic.
// Readers of a state directory skip them; CleanTemp removes the ones a
// crash left behind.
const TempPrefix = ".tmp-"

// WriteFileAtomic replaces path with data so that after a crash at any
// moment the file holds either its old or its new contents, never a part:
// it writes a temporary file in the same directory, syncs it, renames it
// over path and syncs the directory so that the rename itself is durable.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) error {
	dir, base := filepath.Split(path)
	f, err := os.CreateTemp(dir, TempPrefix+base+"-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming into %s: %w", path, err)
	}
	ok = true
	return SyncDir(dir)
}

// SyncDir makes the directory's entries (creations, renames, removals)
// durable.
func SyncDir(dir string) error {
	if dir == "" {
		dir = "."
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}

// RemoveFileSync removes path (a missing file is not an error) and syncs
// its directory.
func RemoveFileSync(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// CleanTemp removes the temporary files that writes interrupted by a crash
// left in dir.
func CleanTemp(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), TempPrefix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// WriteFilesAtomic writes many files into dir, each atomically as with
// WriteFileAtomic, at the cost of one file-system sync instead of one per
// file: every temporary file is written, then syncfs(2) makes them all
// durable, then they are renamed into place and the directory is synced.
func WriteFilesAtomic(dir string, files map[string][]byte, perm fs.FileMode) error {
	tmps := make(map[string]string, len(files))
	defer func() {
		for _, t := range tmps {
			os.Remove(t)
		}
	}()
	for name, data := range files {
		f, err := os.CreateTemp(dir, TempPrefix+name+"-*")
		if err != nil {
			return fmt.Errorf("writing %s: %w", name, err)
		}
		tmps[name] = f.Name()
		_, err = f.Write(data)
		if err == nil {
			err = f.Chmod(perm)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("writing %s: %w", name, err)
		}
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	for name, tmp := range tmps {
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("renaming into %s: %w", name, err)
		}
		delete(tmps, name)
	}
	return d.Sync()
}
