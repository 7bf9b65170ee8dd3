package check

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
)

// LoadCompose loads a compose file with the Compose specification's own Go
// loader (the one `docker compose` is built on): the file is validated
// against the specification's JSON schema (an unknown or misspelled key
// fails), interpolated with an empty environment (so every ${VAR:-default}
// takes its default), and normalized. Every profile is enabled, so that no
// service escapes the checks.
func LoadCompose(ctx context.Context, path string) (*types.Project, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("compose file %s: %w", path, err)
	}
	details := types.ConfigDetails{
		WorkingDir:  filepath.Dir(abs),
		ConfigFiles: []types.ConfigFile{{Filename: abs}},
		Environment: types.Mapping{},
	}
	p, err := loader.LoadWithContext(ctx, details, loader.WithProfiles([]string{"*"}), func(o *loader.Options) {
		o.SetProjectName("outbox-relay", false)
	})
	if err != nil {
		return nil, fmt.Errorf("load %s with compose-go: %w", path, err)
	}
	return p, nil
}

// CheckCompose checks a loaded compose project against the relay: every
// OUTBOX_* variable a service sets is one the relay reads; a service running
// the relay sets the required variables, publishes or exposes the port of
// its OUTBOX_METRICS_ADDR (default DefaultMetricsAddr) and stops with a
// grace period longer than OUTBOX_SHUTDOWN_TIMEOUT. It returns the metrics
// port of each relay service.
func CheckCompose(p *types.Project, vars Variables) (map[string]int32, []error) {
	var errs []error
	bad := func(svc, f string, a ...any) {
		errs = append(errs, fmt.Errorf("compose service %s: "+f, append([]any{svc}, a...)...))
	}
	ports := map[string]int32{}
	names := make([]string, 0, len(p.Services))
	for name := range p.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		svc := p.Services[name]
		keys := make([]string, 0, len(svc.Environment))
		for k := range svc.Environment {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if strings.HasPrefix(k, "OUTBOX_") && !vars.Has(k) {
				bad(name, "sets %s, which the relay does not read%s", k, vars.suggest(k))
			}
		}
		argv := append(append([]string{}, svc.Entrypoint...), svc.Command...)
		if !strings.HasPrefix(svc.Image, "outbox-relay") || !slices.Contains(argv, "run") {
			continue
		}
		for _, req := range vars.Required {
			if v, ok := svc.Environment[req]; !ok || v == nil || *v == "" {
				bad(name, "runs the relay without %s, which it requires", req)
			}
		}
		addr := vars.Defaults["OUTBOX_METRICS_ADDR"]
		if v, ok := svc.Environment["OUTBOX_METRICS_ADDR"]; ok && v != nil {
			addr = *v
		}
		port, err := MetricsPort(addr)
		if err != nil {
			bad(name, "%v", err)
			continue
		}
		ports[name] = port
		found := slices.Contains(svc.Expose, fmt.Sprint(port))
		for _, pc := range svc.Ports {
			found = found || pc.Target == uint32(port)
		}
		if !found {
			bad(name, "neither publishes nor exposes container port %d, the port of OUTBOX_METRICS_ADDR=%q", port, addr)
		}
		shutdown := vars.Defaults["OUTBOX_SHUTDOWN_TIMEOUT"]
		if v, ok := svc.Environment["OUTBOX_SHUTDOWN_TIMEOUT"]; ok && v != nil {
			shutdown = *v
		}
		d, err := time.ParseDuration(shutdown)
		if err != nil {
			bad(name, "OUTBOX_SHUTDOWN_TIMEOUT %q is not a duration", shutdown)
			continue
		}
		grace := 10 * time.Second // compose's default
		if svc.StopGracePeriod != nil {
			grace = time.Duration(*svc.StopGracePeriod)
		}
		if grace <= d {
			bad(name, "stop_grace_period %v does not exceed OUTBOX_SHUTDOWN_TIMEOUT=%s: compose would kill the relay while it finishes its transaction", grace, shutdown)
		}
	}
	if len(ports) == 0 {
		errs = append(errs, fmt.Errorf("compose: no service runs the relay (image outbox-relay..., command run)"))
	}
	return ports, errs
}
