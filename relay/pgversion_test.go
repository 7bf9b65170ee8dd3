package relay

import "testing"

func TestTerminateWaitsFrom14(t *testing.T) {
	for v, want := range map[string]bool{
		"13.23":                          false,
		"13.0":                           false,
		"9.6.24":                         false,
		"14.23":                          true,
		"15.18 (Debian 15.18-0+deb12u1)": true,
		"18.4":                           true,
		"16beta1":                        true,
		"":                               true,
	} {
		if got := terminateWaits(v); got != want {
			t.Errorf("terminateWaits(%q) = %v, want %v", v, got, want)
		}
	}
}
