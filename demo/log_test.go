package demo

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDefaultLogFileIsNotAPredictablePath: without -log the demo writes its
// relay log to a new file of its own in the temp directory, never to a name
// another user can guess and plant a symlink at: a link at the old fixed
// name outbox-relay-<schema>.log is neither followed nor truncated.
func TestDefaultLogFileIsNotAPredictablePath(t *testing.T) {
	schema := fmt.Sprintf("%s_%d", DefaultSchema, time.Now().UnixNano())
	target := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(target, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	planted := filepath.Join(os.TempDir(), "outbox-relay-"+schema+".log")
	if err := os.Symlink(target, planted); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(planted) })

	f, err := parseDemoFlags([]string{"-schema", schema}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	log, where, closeLog, err := demoLogger(f.logPath, f.schema, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hello")
	closeLog()
	if got, err := os.ReadFile(target); err != nil || string(got) != "keep" {
		t.Fatalf("the file a planted link at %s points to now holds %q (%v): the demo followed it", planted, got, err)
	}
	path := strings.TrimSuffix(where, " (JSON)")
	if !strings.HasPrefix(filepath.Base(path), "outbox-relay-"+schema+"-") {
		t.Errorf("the log file is %s, want outbox-relay-%s-*.log", path, schema)
	}
	t.Logf("log: %s", where)
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatalf("the log file %s: %v", path, err)
	}
	if fi.Mode()&os.ModeSymlink != 0 || fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("the log file %s has mode %v, want a regular file only its owner reads", path, fi.Mode())
	}
	os.Remove(path)
}
