package check

import (
	"context"
	"path/filepath"
	"testing"
)

// TestComposeFile: deploy/compose.yaml loads with the Compose
// specification's loader (all profiles), and its relay services agree with
// the relay (variables, metrics port, stop grace period).
func TestComposeFile(t *testing.T) {
	root := repoRoot(t)
	vars, err := RelayVariables(root)
	if err != nil {
		t.Fatal(err)
	}
	p, err := LoadCompose(context.Background(), filepath.Join(root, "deploy", "compose.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ports, errs := CheckCompose(p, vars)
	for _, err := range errs {
		t.Error(err)
	}
	if len(ports) < 2 {
		t.Errorf("relay services %v: want the relay and its standby", ports)
	}
	t.Logf("%d services; relay metrics ports %v", len(p.Services), ports)
}
