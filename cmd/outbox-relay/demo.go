package main

import (
	"context"
	"io"

	"github.com/outbox-relay/outbox-relay/demo"
)

const (
	// defaultDemoDatabaseURL and defaultDemoSchema are the demo's, named
	// for the tests of this package.
	defaultDemoDatabaseURL = demo.DefaultDatabaseURL
	defaultDemoSchema      = demo.DefaultSchema
)

// runDemo is `outbox-relay demo`; the demo is a program of its own, in
// package demo.
func runDemo(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	return demo.Run(ctx, args, environ, stdout, stderr)
}

// runDemoLedger is the hidden `outbox-relay demo-ledger`: the demo's
// ledger service alone, as a process (integration/inbox_kill_test.go kills
// it with SIGKILL).
func runDemoLedger(ctx context.Context, args, environ []string, stderr io.Writer) error {
	return demo.RunLedger(ctx, args, environ, stderr)
}
