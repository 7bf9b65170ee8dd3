package integration

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestPprofOnlyBehindItsFlag: the built relay serves profiles on its metrics
// listener under /debug/pprof/ only with OUTBOX_PPROF=true (a CPU profile and
// a heap profile in pprof's gzipped format, the index); without it
// /debug/pprof/ answers 404. Nothing is registered on http.DefaultServeMux.
func TestPprofOnlyBehindItsFlag(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	logs := newRelayLogs(t, "pprof")
	// Both relays have the table's identity: the second is a standby.
	base := relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-"))
	get := func(url string) (int, []byte) {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		return resp.StatusCode, b
	}
	// listen starts the relay with extra and returns the base URL of its
	// metrics listener, from its start-up log line.
	listen := func(extra ...string) string {
		t.Helper()
		env := append(append([]string(nil), base...), extra...)
		p := startRelayProcess(t, bin, env, logs)
		var addr string
		waitUntil(t, 30*time.Second, p, "the metrics listener", func() bool {
			if e := p.log.find("serving /metrics, /healthz, /readyz"); len(e) > 0 {
				addr, _ = e[0]["addr"].(string)
			}
			return addr != ""
		})
		return "http://" + addr
	}
	gzipped := func(b []byte) bool { return bytes.HasPrefix(b, []byte{0x1f, 0x8b}) }

	off := listen()
	if code, _ := get(off + "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d", code)
	}
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/profile?seconds=1", "/debug/pprof/heap"} {
		if code, _ := get(off + path); code != http.StatusNotFound {
			t.Fatalf("without OUTBOX_PPROF, %s = %d, want 404", path, code)
		}
	}

	on := listen("OUTBOX_PPROF=true")
	if code, b := get(on + "/debug/pprof/"); code != http.StatusOK || !bytes.Contains(b, []byte("goroutine")) {
		t.Fatalf("/debug/pprof/ = %d %q, want the index", code, b)
	}
	if code, b := get(on + "/debug/pprof/profile?seconds=1"); code != http.StatusOK || !gzipped(b) {
		t.Fatalf("/debug/pprof/profile?seconds=1 = %d (%d bytes), want a gzipped CPU profile", code, len(b))
	}
	if code, b := get(on + "/debug/pprof/heap?gc=1"); code != http.StatusOK || !gzipped(b) {
		t.Fatalf("/debug/pprof/heap = %d (%d bytes), want a gzipped heap profile", code, len(b))
	}
	if code, b := get(on + "/debug/pprof/goroutine?debug=1"); code != http.StatusOK || !bytes.Contains(b, []byte("goroutine profile:")) {
		t.Fatalf("/debug/pprof/goroutine?debug=1 = %d %q", code, b)
	}
	if code, _ := get(on + "/debug/pprof/nosuch"); code != http.StatusNotFound {
		t.Fatalf("/debug/pprof/nosuch = %d, want 404", code)
	}
	if code, _ := get(on + "/debug/pprof/profile?seconds=x"); code != http.StatusBadRequest {
		t.Fatalf("/debug/pprof/profile?seconds=x = %d, want 400", code)
	}
	// The global mux holds no profile handler: importing net/http/pprof
	// anywhere in the binary's packages would have put one there.
	if _, pattern := http.DefaultServeMux.Handler(httptest.NewRequest(http.MethodGet, "/debug/pprof/", nil)); pattern != "" {
		t.Fatalf("http.DefaultServeMux serves /debug/pprof/ (pattern %q)", pattern)
	}
}
