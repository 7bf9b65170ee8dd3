package otlpenv_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/tracing/otlpenv"
)

// TestTracingIsOffUnlessTheEnvironmentAsks: no OTEL_* variable, none, or
// the SDK disabled: off; an endpoint or otlp: on; an exporter or protocol
// outbox-relay does not ship: an error naming the variable.
func TestTracingIsOffUnlessTheEnvironmentAsks(t *testing.T) {
	for _, c := range []struct {
		env     []string
		on      bool
		errWord string
	}{
		{env: nil},
		{env: []string{"PATH=/bin", "OUTBOX_TABLE=outbox"}},
		{env: []string{"OTEL_SERVICE_NAME=payments"}},
		{env: []string{"OTEL_TRACES_EXPORTER=otlp"}, on: true},
		{env: []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318"}, on: true},
		{env: []string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://collector:4318/v1/traces"}, on: true},
		{env: []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318", "OTEL_TRACES_EXPORTER=none"}},
		{env: []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318", "OTEL_SDK_DISABLED=true"}},
		{env: []string{"OTEL_TRACES_EXPORTER=zipkin"}, errWord: "OTEL_TRACES_EXPORTER"},
		{env: []string{"OTEL_TRACES_EXPORTER=otlp", "OTEL_EXPORTER_OTLP_PROTOCOL=grpc"}, errWord: "OTEL_EXPORTER_OTLP_PROTOCOL"},
		{env: []string{"OTEL_EXPORTER_OTLP_PROTOCOL=grpc"}}, // off: nothing to refuse
	} {
		on, err := otlpenv.Enabled(c.env)
		switch {
		case c.errWord != "" && (err == nil || !strings.Contains(err.Error(), c.errWord)):
			t.Errorf("%v: err = %v, want one naming %s", c.env, err, c.errWord)
		case c.errWord == "" && err != nil:
			t.Errorf("%v: %v", c.env, err)
		case on != c.on:
			t.Errorf("%v: on = %v, want %v", c.env, on, c.on)
		}
	}
	tp, shutdown, err := otlpenv.Provider(context.Background(), nil, "outbox-relay")
	if tp != nil || err != nil || shutdown(context.Background()) != nil {
		t.Fatalf("Provider with tracing off: %v, %v; want nil and a shutdown that does nothing", tp, err)
	}
}

// TestProviderExportsOverOTLPHTTP: with OTEL_EXPORTER_OTLP_ENDPOINT set, a
// span ended before shutdown reaches the collector's /v1/traces as OTLP
// protobuf, with the service name of OTEL_SERVICE_NAME.
func TestProviderExportsOverOTLPHTTP(t *testing.T) {
	var (
		mu     sync.Mutex
		bodies []string
		paths  []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies, paths = append(bodies, string(b)), append(paths, r.URL.Path+" "+r.Header.Get("Content-Type"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer srv.Close()
	t.Setenv("OTEL_SERVICE_NAME", "relay-under-test")
	env := []string{"OTEL_EXPORTER_OTLP_ENDPOINT=" + srv.URL}
	tp, shutdown, err := otlpenv.Provider(context.Background(), env, "outbox-relay")
	if err != nil || tp == nil {
		t.Fatalf("Provider: %v, %v", tp, err)
	}
	_, span := tp.Tracer("test").Start(context.Background(), "outbox-relay transaction")
	span.End()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(bodies) != 1 || paths[0] != "/v1/traces application/x-protobuf" ||
		!strings.Contains(bodies[0], "outbox-relay transaction") || !strings.Contains(bodies[0], "relay-under-test") {
		t.Fatalf("the collector got %d requests %v; want one to /v1/traces with the span and the service name", len(bodies), paths)
	}
}
