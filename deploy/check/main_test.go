package check

import (
	"io"
	"log/slog"
	"os"
	"testing"
)

// TestMain keeps Helm's informational logs (a symbolic link followed:
// files/alerts.yaml) out of the test output.
func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	os.Exit(m.Run())
}
