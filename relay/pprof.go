package relay

import (
	"fmt"
	"html"
	"net/http"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"strconv"
	"strings"
	"time"
)

// registerPprof serves the runtime's profiles under /debug/pprof/ on mux,
// in the format `go tool pprof` and `go tool trace` read:
//
//	/debug/pprof/                  an index of the profiles
//	/debug/pprof/profile?seconds=N a CPU profile of N seconds (default 30)
//	/debug/pprof/trace?seconds=N   an execution trace of N seconds (default 1)
//	/debug/pprof/<name>            heap, allocs, goroutine, block, mutex,
//	                               threadcreate (?debug=1 or 2 for text,
//	                               ?gc=1 runs a GC before a heap profile)
//
// It is written on runtime/pprof rather than imported from net/http/pprof,
// whose init registers the same handlers on http.DefaultServeMux: the relay
// keeps no global state, and only the mux it serves exposes profiles, only
// when OUTBOX_PPROF=true.
func registerPprof(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprofNamed)
	mux.HandleFunc("/debug/pprof/profile", pprofCPU)
	mux.HandleFunc("/debug/pprof/trace", pprofTrace)
}

// pprofSeconds is the request's seconds parameter, or def.
func pprofSeconds(r *http.Request, def int) (time.Duration, error) {
	v := r.FormValue("seconds")
	if v == "" {
		return time.Duration(def) * time.Second, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 || n > 3600 {
		return 0, fmt.Errorf("seconds=%q: expected a whole number of seconds from 1 to 3600", v)
	}
	return time.Duration(n) * time.Second, nil
}

// pprofWait waits d, or until the client goes away.
func pprofWait(r *http.Request, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
	}
}

func pprofAttachment(w http.ResponseWriter, name string) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="`+name+`"`)
	w.Header().Set("X-Content-Type-Options", "nosniff")
}

// pprofCPU writes a CPU profile of the requested length.
func pprofCPU(w http.ResponseWriter, r *http.Request) {
	d, err := pprofSeconds(r, 30)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pprofAttachment(w, "profile")
	if err := pprof.StartCPUProfile(w); err != nil {
		http.Error(w, "could not start the CPU profile (is another one running?): "+err.Error(), http.StatusInternalServerError)
		return
	}
	pprofWait(r, d)
	pprof.StopCPUProfile()
}

// pprofTrace writes an execution trace of the requested length.
func pprofTrace(w http.ResponseWriter, r *http.Request) {
	d, err := pprofSeconds(r, 1)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pprofAttachment(w, "trace")
	if err := trace.Start(w); err != nil {
		http.Error(w, "could not start the trace (is another one running?): "+err.Error(), http.StatusInternalServerError)
		return
	}
	pprofWait(r, d)
	trace.Stop()
}

// pprofNamed writes the named profile, or the index at /debug/pprof/.
func pprofNamed(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, "/debug/pprof/")
	if name == "" {
		pprofIndex(w)
		return
	}
	p := pprof.Lookup(name)
	if p == nil {
		http.Error(w, fmt.Sprintf("no profile %q: see /debug/pprof/ for the list", name), http.StatusNotFound)
		return
	}
	debug, _ := strconv.Atoi(r.FormValue("debug"))
	if name == "heap" && r.FormValue("gc") != "" && r.FormValue("gc") != "0" {
		runtime.GC()
	}
	if debug != 0 {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
	} else {
		pprofAttachment(w, name)
	}
	if err := p.WriteTo(w, debug); err != nil {
		// Headers may be sent already; say it in the body too.
		http.Error(w, "profile "+name+": "+err.Error(), http.StatusInternalServerError)
	}
}

// pprofIndex lists the profiles with their counts.
func pprofIndex(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	var b strings.Builder
	b.WriteString("<html><head><title>/debug/pprof/</title></head><body>\n<p>outbox-relay profiles (OUTBOX_PPROF=true)</p>\n<table>\n")
	b.WriteString(`<tr><td></td><td><a href="profile?seconds=30">profile</a></td><td>CPU profile; ?seconds=N (go tool pprof http://host:9090/debug/pprof/profile?seconds=30)</td></tr>` + "\n")
	b.WriteString(`<tr><td></td><td><a href="trace?seconds=1">trace</a></td><td>execution trace; ?seconds=N (go tool trace)</td></tr>` + "\n")
	for _, p := range pprof.Profiles() {
		n := html.EscapeString(p.Name())
		fmt.Fprintf(&b, "<tr><td>%d</td><td><a href=\"%s?debug=1\">%s</a></td><td></td></tr>\n", p.Count(), n, n)
	}
	b.WriteString("</table></body></html>\n")
	_, _ = w.Write([]byte(b.String()))
}
