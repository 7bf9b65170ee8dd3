package check

import (
	"context"
	"path/filepath"
	"testing"
)

// TestComposePublishesOnLoopbackOnly: deploy/compose.yaml has fixed
// passwords (PostgreSQL's, Grafana's admin): every port it publishes is
// bound to 127.0.0.1, not to every interface of the host.
func TestComposePublishesOnLoopbackOnly(t *testing.T) {
	p, err := LoadCompose(context.Background(), filepath.Join(repoRoot(t), "deploy", "compose.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for name, svc := range p.Services {
		for _, pc := range svc.Ports {
			n++
			if pc.HostIP != "127.0.0.1" {
				t.Errorf("compose service %s publishes port %d on %q (every interface): bind it to 127.0.0.1 (\"127.0.0.1:%s:%d\")", name, pc.Target, pc.HostIP, pc.Published, pc.Target)
			}
		}
	}
	if n == 0 {
		t.Fatal("compose publishes no port")
	}
}
