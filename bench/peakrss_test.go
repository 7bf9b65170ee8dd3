package bench

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"
)

// watchPeakRSS reads the peak resident set (VmHWM) of process pid from /proc
// every 20 ms until the process is gone or stop is called, which returns
// the highest value seen, in MiB. A child's rusage would not do: a vforked
// child's counts this process (which holds kfake) too.
func watchPeakRSS(pid int) (stop func() float64) {
	var hwm atomic.Int64 // KiB
	done, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		for {
			raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				return
			}
			for _, l := range strings.Split(string(raw), "\n") {
				var kib int64
				if _, err := fmt.Sscanf(l, "VmHWM: %d kB", &kib); err == nil && kib > hwm.Load() {
					hwm.Store(kib)
				}
			}
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() float64 {
		close(done)
		<-watched
		return float64(hwm.Load()) / 1024
	}
}
