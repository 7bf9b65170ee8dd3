// Package docs holds the project's documentation (the Markdown files beside
// this one) and its checks: no relative link of README.md or docs/*.md is
// dead.
package docs

//go:generate go test -run TestConfigurationReference -update .
