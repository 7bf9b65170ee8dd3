package check

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// isMigration reports whether c runs `outbox-relay migrate up`.
func isMigration(c corev1.Container) bool {
	argv := append(append([]string{}, c.Command...), c.Args...)
	i := slices.Index(argv, "migrate")
	return i >= 0 && i+1 < len(argv) && argv[i+1] == "up"
}

// databaseURLSource says where a container's OUTBOX_DATABASE_URL comes
// from: "Secret <name> key <key>", "ConfigMap ...", a literal value, or ""
// when it is not set. env wins over envFrom, as in Kubernetes; an envFrom
// source that is not among objs is taken to hold it (it may).
func databaseURLSource(c corev1.Container, objs []Object) string {
	const name = "OUTBOX_DATABASE_URL"
	for _, e := range c.Env {
		if e.Name != name {
			continue
		}
		switch {
		case e.ValueFrom == nil:
			return "the literal value " + e.Value
		case e.ValueFrom.SecretKeyRef != nil:
			return fmt.Sprintf("Secret %s key %s", e.ValueFrom.SecretKeyRef.Name, e.ValueFrom.SecretKeyRef.Key)
		case e.ValueFrom.ConfigMapKeyRef != nil:
			return fmt.Sprintf("ConfigMap %s key %s", e.ValueFrom.ConfigMapKeyRef.Name, e.ValueFrom.ConfigMapKeyRef.Key)
		}
		return "a field reference"
	}
	for i := len(c.EnvFrom) - 1; i >= 0; i-- { // the last source wins
		from := c.EnvFrom[i]
		if !strings.HasPrefix(name, from.Prefix) {
			continue
		}
		key := strings.TrimPrefix(name, from.Prefix)
		switch {
		case from.SecretRef != nil:
			s := find[*corev1.Secret](objs, "Secret", from.SecretRef.Name)
			if s != nil {
				_, inBytes := s.Data[key]
				_, inString := s.StringData[key]
				if !inBytes && !inString {
					continue
				}
			}
			return fmt.Sprintf("Secret %s key %s", from.SecretRef.Name, key)
		case from.ConfigMapRef != nil:
			cm := find[*corev1.ConfigMap](objs, "ConfigMap", from.ConfigMapRef.Name)
			if cm != nil {
				if _, ok := cm.Data[key]; !ok {
					continue
				}
			}
			return fmt.Sprintf("ConfigMap %s key %s", from.ConfigMapRef.Name, key)
		}
	}
	return ""
}

// CheckMigrationRole checks that `outbox-relay migrate up` runs as another
// database role than the relay: the relay role of the README's grants
// ("PostgreSQL permissions") may not CREATE, so a migration with the relay's
// URL fails with "permission denied for database" on a fresh install. Every
// migration container must take OUTBOX_DATABASE_URL from another source
// than every relay container of objs, and there must be a migration.
func CheckMigrationRole(objs []Object) []error {
	var errs []error
	relays := map[string]Object{}
	type migration struct {
		o      Object
		c      string
		source string
	}
	var migrations []migration
	for _, o := range objs {
		_, pod := podOf(o)
		if pod == nil {
			continue
		}
		for _, c := range pod.Containers {
			src := databaseURLSource(c, objs)
			switch {
			case isMigration(c):
				migrations = append(migrations, migration{o, c.Name, src})
			case isRelay(c) && src != "":
				relays[src] = o
			}
		}
	}
	if len(migrations) == 0 {
		errs = append(errs, fmt.Errorf("no container runs `outbox-relay migrate up`"))
	}
	for _, m := range migrations {
		if m.source == "" {
			errs = append(errs, fmt.Errorf("%s: container %s runs migrate up without OUTBOX_DATABASE_URL", m.o, m.c))
			continue
		}
		if r, ok := relays[m.source]; ok {
			errs = append(errs, fmt.Errorf("%s: container %s runs migrate up with the relay's database URL (%s, as %s does): the relay role of the README's grants may not CREATE, so the migration fails with \"permission denied for database\"; give it the admin role's URL from another Secret", m.o, m.c, m.source, r))
		}
	}
	return errs
}
