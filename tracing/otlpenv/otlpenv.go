// Package otlpenv builds the binary's tracer provider from the standard
// OpenTelemetry environment: an OTLP exporter over HTTP (protobuf), a batch
// span processor, the sampler of OTEL_TRACES_SAMPLER and the resource of
// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. Tracing is off unless the
// environment asks for it, so a relay without OTEL_* variables exports
// nothing and pays nothing.
//
// Only the binary calls it; library packages take a trace.TracerProvider
// (relay.WithTracerProvider, inbox.WithTracerProvider) and never read the
// environment or set a global provider.
package otlpenv

import (
	"context"
	"fmt"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Enabled reports whether environ turns tracing on, or which variable is
// set to a value outbox-relay cannot serve:
//   - OTEL_SDK_DISABLED=true, or OTEL_TRACES_EXPORTER=none: off;
//   - OTEL_TRACES_EXPORTER=otlp: on;
//   - OTEL_TRACES_EXPORTER unset: on when OTEL_EXPORTER_OTLP_ENDPOINT or
//     OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, else off (the default);
//   - any other exporter, or an OTLP protocol other than http/protobuf
//     (OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL): an
//     error naming the variable.
func Enabled(environ []string) (bool, error) {
	env := lookup(environ)
	if strings.EqualFold(env["OTEL_SDK_DISABLED"], "true") {
		return false, nil
	}
	on := env["OTEL_EXPORTER_OTLP_ENDPOINT"] != "" || env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] != ""
	switch exp := strings.TrimSpace(env["OTEL_TRACES_EXPORTER"]); exp {
	case "":
	case "none":
		return false, nil
	case "otlp":
		on = true
	default:
		return false, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: outbox-relay exports traces with OTLP only: set it to otlp, or none to turn tracing off", exp)
	}
	for _, name := range []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
		if p := env[name]; on && p != "" && p != "http/protobuf" {
			return false, fmt.Errorf("%s=%q: outbox-relay's OTLP exporter speaks http/protobuf only: set it to http/protobuf (port 4318 of a collector), or unset it", name, p)
		}
	}
	return on, nil
}

// Provider returns the tracer provider environ asks for (see Enabled) and
// its shutdown, which flushes the spans not yet exported; call it before
// the process exits. With tracing off it returns a nil provider (the
// libraries' "off") and a shutdown that does nothing. service is the
// default service.name, which OTEL_SERVICE_NAME overrides.
//
// The exporter's endpoint comes from environ
// (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is, or OTEL_EXPORTER_OTLP_ENDPOINT
// with /v1/traces appended; default http://localhost:4318/v1/traces); its
// other settings (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _CERTIFICATE,
// _COMPRESSION and their _TRACES_ forms), the sampler (OTEL_TRACES_SAMPLER,
// OTEL_TRACES_SAMPLER_ARG), the batch processor (OTEL_BSP_*) and the
// resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) are read by the
// OpenTelemetry SDK from the process environment.
func Provider(ctx context.Context, environ []string, service string) (trace.TracerProvider, func(context.Context) error, error) {
	none := func(context.Context) error { return nil }
	on, err := Enabled(environ)
	if err != nil || !on {
		return nil, none, err
	}
	env := lookup(environ)
	var opts []otlptracehttp.Option
	switch {
	case env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] != "":
		opts = append(opts, otlptracehttp.WithEndpointURL(env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]))
	case env["OTEL_EXPORTER_OTLP_ENDPOINT"] != "":
		opts = append(opts, otlptracehttp.WithEndpointURL(strings.TrimSuffix(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "/")+"/v1/traces"))
	}
	exp, err := otlptracehttp.New(ctx, opts...)
	if err != nil {
		return nil, none, fmt.Errorf("OTLP trace exporter (OTEL_EXPORTER_OTLP_*): %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", service)),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(),
	)
	if err != nil {
		return nil, none, fmt.Errorf("trace resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES): %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return tp, tp.Shutdown, nil
}

// lookup maps environ's NAME=value entries, the last of a name winning.
func lookup(environ []string) map[string]string {
	out := make(map[string]string)
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "OTEL_") {
			out[k] = v
		}
	}
	return out
}
