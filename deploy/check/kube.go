package check

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Object is one Kubernetes object of a manifest, decoded into its API type.
type Object struct {
	Source string // the file or chart template it came from
	Kind   string
	Name   string
	Obj    runtime.Object
}

func (o Object) String() string { return fmt.Sprintf("%s %s (%s)", o.Kind, o.Name, o.Source) }

// scheme knows every kind the deploy kit may contain: core, apps, batch,
// policy, networking (NetworkPolicy), and the Prometheus operator's
// ServiceMonitor and PrometheusRule.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, batchv1.AddToScheme,
		policyv1.AddToScheme, networkingv1.AddToScheme, monitoringv1.AddToScheme} {
		if err := add(s); err != nil {
			panic(fmt.Sprintf("kubernetes scheme: %v", err))
		}
	}
	return s
}()

// strictDecoder is apimachinery's own YAML serializer in strict mode, the
// one `kubectl apply --validate=strict` and the API server's field
// validation use: an unknown or misspelled field, or a field given twice,
// is an error, as is a kind the scheme does not know.
var strictDecoder = json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme, scheme,
	json.SerializerOptions{Yaml: true, Strict: true})

// DecodeStrict splits a YAML stream into documents and decodes each into its
// Kubernetes API type, strictly. Empty documents (comments only) are
// skipped.
func DecodeStrict(source string, stream []byte) ([]Object, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(stream)))
	var objs []Object
	var problems []string
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: split YAML documents: %w", source, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := strictDecoder.Decode(doc, nil, nil)
		if err != nil {
			what := fmt.Sprintf("document %d", i+1)
			if gvk != nil && gvk.Kind != "" {
				what = gvk.Kind
			}
			problems = append(problems, fmt.Sprintf("%s: %s: %v", source, what, err))
			continue
		}
		acc, err := metaName(obj)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %s: %v", source, gvk.Kind, err))
			continue
		}
		objs = append(objs, Object{Source: source, Kind: gvk.Kind, Name: acc, Obj: obj})
	}
	if len(problems) > 0 {
		return objs, errors.New(strings.Join(problems, "\n"))
	}
	return objs, nil
}

func metaName(obj runtime.Object) (string, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return "", fmt.Errorf("%T has no metadata", obj)
	}
	if m.GetName() == "" {
		return "", errors.New("metadata.name is empty")
	}
	return m.GetName(), nil
}

func stripComments(doc []byte) []byte {
	var out [][]byte
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' && !bytes.Equal(t, []byte("---")) {
			out = append(out, line)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// podOf returns the pod template of a workload object, or nil.
func podOf(o Object) (*metav1.ObjectMeta, *corev1.PodSpec) {
	switch w := o.Obj.(type) {
	case *appsv1.Deployment:
		return &w.Spec.Template.ObjectMeta, &w.Spec.Template.Spec
	case *appsv1.StatefulSet:
		return &w.Spec.Template.ObjectMeta, &w.Spec.Template.Spec
	case *appsv1.DaemonSet:
		return &w.Spec.Template.ObjectMeta, &w.Spec.Template.Spec
	case *batchv1.Job:
		return &w.Spec.Template.ObjectMeta, &w.Spec.Template.Spec
	case *batchv1.CronJob:
		return &w.Spec.JobTemplate.Spec.Template.ObjectMeta, &w.Spec.JobTemplate.Spec.Template.Spec
	case *corev1.Pod:
		return &w.ObjectMeta, &w.Spec
	}
	return nil, nil
}

// envValue is what a container's environment says of one variable.
type envValue struct {
	value string // the literal value, when known
	known bool   // false: from a Secret, a field or a ConfigMap not among the objects
	from  string // where it is set, for messages
}

// containerEnv resolves a container's environment: envFrom ConfigMaps and
// Secrets found among objs, then env (which wins, as in Kubernetes).
// Variables of a source that is not among objs are unknown; opaque is true
// when such a source could set any variable.
func containerEnv(c corev1.Container, objs []Object) (env map[string]envValue, opaque bool) {
	env = map[string]envValue{}
	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm := find[*corev1.ConfigMap](objs, "ConfigMap", from.ConfigMapRef.Name)
			if cm == nil {
				opaque = true
				continue
			}
			for k, v := range cm.Data {
				env[from.Prefix+k] = envValue{value: v, known: true, from: "ConfigMap " + cm.Name}
			}
		case from.SecretRef != nil:
			s := find[*corev1.Secret](objs, "Secret", from.SecretRef.Name)
			if s == nil {
				opaque = true
				continue
			}
			for k, v := range s.StringData {
				env[from.Prefix+k] = envValue{value: v, known: true, from: "Secret " + s.Name}
			}
			for k, v := range s.Data {
				env[from.Prefix+k] = envValue{value: string(v), known: true, from: "Secret " + s.Name}
			}
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			env[e.Name] = envValue{value: e.Value, known: true, from: "env"}
		} else {
			env[e.Name] = envValue{from: "env (valueFrom)"}
		}
	}
	return env, opaque
}

func find[T runtime.Object](objs []Object, kind, name string) T {
	var zero T
	for _, o := range objs {
		if o.Kind == kind && o.Name == name {
			if t, ok := o.Obj.(T); ok {
				return t
			}
		}
	}
	return zero
}

// isRelay reports whether c runs `outbox-relay run` (the image's default
// command when neither command nor args is given).
func isRelay(c corev1.Container) bool {
	argv := append(append([]string{}, c.Command...), c.Args...)
	if len(argv) == 0 {
		return true
	}
	return slices.Contains(argv, "run")
}

// MetricsPort returns the TCP port of an OUTBOX_METRICS_ADDR value, which
// must listen on every interface (so that the kubelet and Prometheus reach
// it).
func MetricsPort(addr string) (int32, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, fmt.Errorf("OUTBOX_METRICS_ADDR %q: %w", addr, err)
	}
	if host != "" && host != "0.0.0.0" && host != "::" {
		return 0, fmt.Errorf("OUTBOX_METRICS_ADDR %q listens on %s only: probes and Prometheus reach the pod's IP; use %q", addr, host, ":"+port)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("OUTBOX_METRICS_ADDR %q: port %q is not a port number", addr, port)
	}
	return int32(n), nil
}

// relayPod is a pod template that runs the relay, with its metrics port.
type relayPod struct {
	obj   Object
	meta  *metav1.ObjectMeta
	port  int32
	pname string // the container port's name, if any
	cname string
}

// CheckObjects checks decoded manifests against what the relay reads:
//   - every OUTBOX_* variable a container sets (env, envFrom) and every
//     OUTBOX_* key of a ConfigMap or Secret is one the relay reads;
//   - a relay container sets the relay's required variables;
//   - its probes are readiness /readyz and liveness /healthz, on the port of
//     OUTBOX_METRICS_ADDR (default DefaultMetricsAddr), which the container
//     declares; a prometheus.io/port annotation names that port too;
//   - the pod's grace period exceeds OUTBOX_SHUTDOWN_TIMEOUT;
//   - every container runs as non-root with a read-only root filesystem
//     and no privilege escalation;
//   - a Service selecting relay pods targets the metrics port; a
//     ServiceMonitor selects such a Service by labels and names one of its
//     ports; a PodDisruptionBudget selects relay pods.
func CheckObjects(objs []Object, vars Variables) []error {
	var errs []error
	bad := func(o Object, f string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: "+f, append([]any{o}, a...)...))
	}

	for _, o := range objs {
		var keys []string
		switch v := o.Obj.(type) {
		case *corev1.ConfigMap:
			for k := range v.Data {
				keys = append(keys, k)
			}
		case *corev1.Secret:
			for k := range v.Data {
				keys = append(keys, k)
			}
			for k := range v.StringData {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		for _, k := range keys {
			if strings.HasPrefix(k, "OUTBOX_") && !vars.Has(k) {
				bad(o, "key %s is not a variable the relay reads%s", k, vars.suggest(k))
			}
		}
	}

	var relays []relayPod
	for _, o := range objs {
		meta, pod := podOf(o)
		if pod == nil {
			continue
		}
		for _, c := range append(append([]corev1.Container{}, pod.InitContainers...), pod.Containers...) {
			for _, e := range c.Env {
				if strings.HasPrefix(e.Name, "OUTBOX_") && !vars.Has(e.Name) {
					bad(o, "container %s sets %s, which the relay does not read%s", c.Name, e.Name, vars.suggest(e.Name))
				}
			}
			checkSecurity(o, pod, c, bad)
			if !isRelay(c) {
				continue
			}
			env, opaque := containerEnv(c, objs)
			if !opaque {
				for _, req := range vars.Required {
					if _, ok := env[req]; !ok {
						bad(o, "container %s runs the relay without %s, which it requires", c.Name, req)
					}
				}
			}
			addr := vars.Defaults["OUTBOX_METRICS_ADDR"]
			if v, ok := env["OUTBOX_METRICS_ADDR"]; ok {
				if !v.known {
					bad(o, "container %s: OUTBOX_METRICS_ADDR comes from %s: set it literally, so that probes and ports can be checked against it", c.Name, v.from)
					continue
				}
				addr = v.value
			}
			if addr == "" {
				bad(o, "container %s: OUTBOX_METRICS_ADDR is empty, which turns off /healthz and /readyz that the probes need", c.Name)
				continue
			}
			port, err := MetricsPort(addr)
			if err != nil {
				bad(o, "container %s: %v", c.Name, err)
				continue
			}
			rp := relayPod{obj: o, meta: meta, port: port, cname: c.Name}
			declared := false
			for _, p := range c.Ports {
				if p.ContainerPort == port && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) {
					declared, rp.pname = true, p.Name
				}
			}
			if !declared {
				bad(o, "container %s declares no TCP containerPort %d, the port of OUTBOX_METRICS_ADDR=%q", c.Name, port, addr)
			}
			checkProbe := func(kind string, p *corev1.Probe, paths ...string) {
				if p == nil {
					bad(o, "container %s has no %s probe (on %s)", c.Name, kind, strings.Join(paths, " or "))
					return
				}
				if p.HTTPGet == nil {
					bad(o, "container %s: the %s probe is not an httpGet on %s", c.Name, kind, strings.Join(paths, " or "))
					return
				}
				if !slices.Contains(paths, p.HTTPGet.Path) {
					bad(o, "container %s: the %s probe gets %q, want %s", c.Name, kind, p.HTTPGet.Path, strings.Join(paths, " or "))
				}
				if got, ok := resolvePort(p.HTTPGet.Port, c); !ok || got != port {
					bad(o, "container %s: the %s probe's port %s is not %d, the port of OUTBOX_METRICS_ADDR=%q", c.Name, kind, p.HTTPGet.Port.String(), port, addr)
				}
			}
			checkProbe("readiness", c.ReadinessProbe, "/readyz")
			checkProbe("liveness", c.LivenessProbe, "/healthz")
			if c.StartupProbe != nil {
				checkProbe("startup", c.StartupProbe, "/healthz", "/readyz")
			}
			if a, ok := meta.Annotations["prometheus.io/port"]; ok && a != strconv.Itoa(int(port)) {
				bad(o, "pod annotation prometheus.io/port is %q, but the relay listens on %d", a, port)
			}
			shutdown := vars.Defaults["OUTBOX_SHUTDOWN_TIMEOUT"]
			if v, ok := env["OUTBOX_SHUTDOWN_TIMEOUT"]; ok && v.known {
				shutdown = v.value
			}
			if d, err := time.ParseDuration(shutdown); err == nil {
				grace := int64(corev1.DefaultTerminationGracePeriodSeconds)
				if pod.TerminationGracePeriodSeconds != nil {
					grace = *pod.TerminationGracePeriodSeconds
				}
				if time.Duration(grace)*time.Second <= d {
					bad(o, "terminationGracePeriodSeconds %d does not exceed OUTBOX_SHUTDOWN_TIMEOUT=%s: the kubelet would kill the relay while it finishes its transaction", grace, shutdown)
				}
			} else {
				bad(o, "container %s: OUTBOX_SHUTDOWN_TIMEOUT %q is not a duration", c.Name, shutdown)
			}
			relays = append(relays, rp)
		}
	}

	selects := func(sel map[string]string, rp relayPod) bool {
		return len(sel) > 0 && labels.SelectorFromSet(sel).Matches(labels.Set(rp.meta.Labels))
	}
	services := map[string]*corev1.Service{}
	for _, o := range objs {
		switch v := o.Obj.(type) {
		case *corev1.Service:
			for _, rp := range relays {
				if !selects(v.Spec.Selector, rp) {
					continue
				}
				services[v.Name] = v
				for _, sp := range v.Spec.Ports {
					target := sp.TargetPort
					if target.Type == intstr.Int && target.IntVal == 0 {
						target = intstr.FromInt32(sp.Port)
					}
					if got, ok := resolvePortByName(target, rp); !ok || got != rp.port {
						bad(o, "port %q targets %s, not the relay's metrics port %d (%s)", sp.Name, target.String(), rp.port, rp.obj)
					}
				}
				if a, ok := v.Annotations["prometheus.io/port"]; ok && a != strconv.Itoa(int(rp.port)) {
					found := false
					for _, sp := range v.Spec.Ports {
						found = found || strconv.Itoa(int(sp.Port)) == a
					}
					if !found {
						bad(o, "annotation prometheus.io/port is %q, which is none of its ports", a)
					}
				}
			}
		case *policyv1.PodDisruptionBudget:
			sel, err := metav1.LabelSelectorAsSelector(v.Spec.Selector)
			if err != nil {
				bad(o, "selector: %v", err)
				continue
			}
			matched := false
			for _, rp := range relays {
				matched = matched || (!sel.Empty() && sel.Matches(labels.Set(rp.meta.Labels)))
			}
			if !matched {
				bad(o, "selects no relay pod")
			}
		}
	}
	for _, o := range objs {
		sm, ok := o.Obj.(*monitoringv1.ServiceMonitor)
		if !ok {
			continue
		}
		sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		if err != nil {
			bad(o, "selector: %v", err)
			continue
		}
		var matched []*corev1.Service
		for _, s := range services {
			if !sel.Empty() && sel.Matches(labels.Set(s.Labels)) {
				matched = append(matched, s)
			}
		}
		if len(matched) == 0 {
			bad(o, "selects no Service of the relay's pods")
			continue
		}
		for _, ep := range sm.Spec.Endpoints {
			if ep.Path != "" && ep.Path != "/metrics" {
				bad(o, "endpoint path %q: the relay serves /metrics", ep.Path)
			}
			for _, s := range matched {
				ok := false
				for _, sp := range s.Spec.Ports {
					ok = ok || (ep.Port != "" && sp.Name == ep.Port)
				}
				if !ok {
					bad(o, "endpoint port %q is not a port name of Service %s", ep.Port, s.Name)
				}
			}
		}
	}
	return errs
}

func checkSecurity(o Object, pod *corev1.PodSpec, c corev1.Container, bad func(Object, string, ...any)) {
	nonRoot := pod.SecurityContext != nil && pod.SecurityContext.RunAsNonRoot != nil && *pod.SecurityContext.RunAsNonRoot
	sc := c.SecurityContext
	if sc != nil && sc.RunAsNonRoot != nil {
		nonRoot = *sc.RunAsNonRoot
	}
	if !nonRoot {
		bad(o, "container %s may run as root: set runAsNonRoot: true", c.Name)
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		bad(o, "container %s: set securityContext.readOnlyRootFilesystem: true", c.Name)
	}
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		bad(o, "container %s: set securityContext.allowPrivilegeEscalation: false", c.Name)
	}
}

// resolvePort turns a probe's port (a number or a container port's name)
// into a number.
func resolvePort(p intstr.IntOrString, c corev1.Container) (int32, bool) {
	if p.Type == intstr.Int {
		return p.IntVal, true
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

func resolvePortByName(p intstr.IntOrString, rp relayPod) (int32, bool) {
	if p.Type == intstr.Int {
		return p.IntVal, true
	}
	return rp.port, p.StrVal != "" && p.StrVal == rp.pname
}
