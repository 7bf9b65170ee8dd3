package relay

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves /metrics from gatherer, /healthz (the process is alive) and
// /readyz (the relay has started, is not shutting down and runs every shard
// it holds; otherwise 503 and the reason). With OUTBOX_PPROF=true it also
// serves net/http/pprof's profiles under /debug/pprof/ (off: 404).
func (r *Relay) Handler(gatherer prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if why := r.NotReady(); why != "" {
			http.Error(w, "not ready: "+why+"\n", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	if r.cfg.Pprof {
		registerPprof(mux)
	}
	return mux
}
