// Package check holds the deploy kit's checks: the Helm chart, the
// Kubernetes manifests, the compose file, the Grafana dashboard and the
// Prometheus alert rules are read by the parsers of the tools that will read
// them (Helm's loader, linter and engine, kustomize's krusty, the
// Kubernetes API types decoded strictly, the Compose specification's loader,
// Prometheus' rule and PromQL parsers), and compared with what the relay's
// source says it reads (OUTBOX_* variables) and registers (metrics).
//
// It is a module of its own, so that the relay's module does not carry
// these dependencies. Run it from the repository root:
//
//	(cd deploy/check && go test -count=1 ./...)
package check
