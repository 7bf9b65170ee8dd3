package main

import (
	"context"
	"errors"
	"io"
)

// runDemo is `outbox-relay demo`.
func runDemo(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	return errors.New("demo: not built yet")
}
