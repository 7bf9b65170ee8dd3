#!/usr/bin/env bash
# What the wake-up trigger costs the writers.
#
# Creates a scratch database on the server of BENCH_SERVER_URL (default: the
# one the integration tests use), migrates it with `outbox-relay migrate up`,
# and runs pgbench with CLIENTS clients, each transaction one single-row
# INSERT INTO outbox (topic, key, value), for DURATION seconds, in each
# configuration below, RUNS times interleaved (a b c ... a b c ...), with the
# table truncated and a CHECKPOINT before every run.
#
#   a  no wake-up trigger at all (the baseline)
#   b  our gated trigger, relay BUSY: the relay's exclusive advisory lock is
#      held from before the load starts (the steady state the design wants)
#   c  our gated trigger, NO relay: the lock is free, so every insert takes
#      the shared lock and NOTIFYs (the worst case, and why we gate)
#   d  a plain always-NOTIFY statement trigger, for reference
#   e  a "one-row idle flag table" trigger, the flag saying busy, for reference
#   f  our gated trigger; 0.5 s into the load the relay goes busy and takes
#      its lock the way relay/wakeup.go does: pg_try_advisory_lock, retried
#      (here every 1 ms) until it succeeds or the load ends
#   g  as f, but the relay takes the lock with a blocking pg_advisory_lock
#      under lock_timeout = 1s, retried on timeout
#
# f and g print how long the relay needed to get its lock under the load.
#
# It prints every run, then per configuration the median TPS, its loss
# against the median of (a), and the "paired" loss: the median over the
# rounds of each run's loss against the (a) run of the same round, which
# cancels load that drifts while the script runs.
#
# On a machine shared with other work, run-to-run noise can exceed the cost
# of a cheap trigger. For the configurations without commit serialization
# (b and e) the script therefore also measures the trigger in the same
# pgbench run as the baseline: two scripts, weight 1:1, one inserting into
# public.outbox (with the trigger) and one into an identical table without
# it; both see the same machine at the same moment, and the difference of
# their mean latencies is the trigger's cost per transaction. (Not valid for
# c, d, f: their NOTIFYs serialize commits and slow the other script too.)
#
# Environment (all optional):
#   BENCH_SERVER_URL  server URL       (default $TEST_DATABASE_URL, else
#                                       postgres://postgres@127.0.0.1:5432/postgres)
#   DURATION          seconds per run  (default 12)
#   CLIENTS           pgbench clients  (default 16)
#   JOBS              pgbench threads  (default 2)
#   RUNS              runs per config  (default 3)
#   CONFIGS           which configs    (default "a b c d e f g"; a always runs)
#   PAIRED            same-run configs (default "b e", those of CONFIGS; "" skips)
#   KEEP_DB=1         keep the scratch database
#
# Total time is about RUNS x (len(CONFIGS) + len(PAIRED)) x (DURATION + 2) s:
# about 6 minutes with the defaults.
#
#   bash bench/wakeup-writers.sh
#   DURATION=5 RUNS=1 CONFIGS="a b c" PAIRED= bash bench/wakeup-writers.sh   # a quick look
set -euo pipefail

SERVER_URL=${BENCH_SERVER_URL:-${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}}
DURATION=${DURATION:-12}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
RUNS=${RUNS:-3}
CONFIGS=${CONFIGS:-"a b c d e f g"}
case " $CONFIGS " in *" a "*) ;; *) CONFIGS="a $CONFIGS" ;; esac
PAIRED_ALL=${PAIRED-"b e"}
PAIRED=
for cfg in $PAIRED_ALL; do
	case " $CONFIGS " in *" $cfg "*) PAIRED="$PAIRED $cfg" ;; esac
done

# The wake-up lock of public.outbox (migrations.LockKey, relay/wakeup.go).
LOCK="1869968482, hashtext('public.outbox')"

cd "$(dirname "$0")/.."
for tool in psql pgbench go; do
	command -v "$tool" >/dev/null || { echo "wakeup-writers: $tool is not installed" >&2; exit 1; }
done

DB=outbox_wakebench_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
# Replace the database of SERVER_URL (URL form: scheme://user@host:port/db?params).
DB_URL=$(printf '%s' "$SERVER_URL" | sed -E "s#^([a-z]+://[^/?]*)(/[^?]*)?#\1/$DB#")
WORK=$(mktemp -d)
TAG=outbox_wakebench_$$

q() { psql -X -q -At -v ON_ERROR_STOP=1 "$DB_URL" "$@"; }

stop_holders() {
	q -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
	      WHERE application_name LIKE '${TAG}%' AND pid <> pg_backend_pid()" >/dev/null 2>&1 || true
	wait 2>/dev/null || true
}
cleanup() {
	stop_holders
	if [ "${KEEP_DB:-}" != 1 ]; then
		psql -X -q "$SERVER_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
	else
		echo "kept database $DB_URL"
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT

psql -X -q -v ON_ERROR_STOP=1 "$SERVER_URL" -c "CREATE DATABASE $DB"
if ! OUTBOX_DATABASE_URL=$DB_URL go run ./cmd/outbox-relay migrate up >"$WORK/migrate" 2>&1; then
	# The plain SQL files are the same schema for the default names.
	echo "wakeup-writers: \`go run ./cmd/outbox-relay migrate up\` failed; applying migrations/sql/*.up.sql with psql:" >&2
	sed 's/^/  /' "$WORK/migrate" >&2
	for f in migrations/sql/*.up.sql; do q -f "$f" >/dev/null; done
fi

GATED_DDL=$(q -c "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'outbox_wakeup' AND tgrelid = 'public.outbox'::regclass")
[ -n "$GATED_DDL" ] || { echo "wakeup-writers: trigger outbox_wakeup not found after migrate" >&2; exit 1; }

# The flag-table variant (e), and a trigger-less twin of the outbox for the
# same-run measurements.
q <<'SQL'
CREATE TABLE bench_relay_idle (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), idle boolean NOT NULL);
INSERT INTO bench_relay_idle VALUES (true, false); -- the relay is busy
CREATE FUNCTION bench_wakeup_if_idle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT idle FROM bench_relay_idle) THEN
        PERFORM pg_notify('outbox_' || md5(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME), '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TABLE public.outbox_plain (LIKE public.outbox INCLUDING ALL);
SQL

use_trigger() {
	local ddl
	case $1 in
	none) ddl= ;;
	gated) ddl=$GATED_DDL ;;
	always) ddl="CREATE TRIGGER outbox_wakeup AFTER INSERT ON public.outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_wakeup()" ;;
	flag) ddl="CREATE TRIGGER outbox_wakeup AFTER INSERT ON public.outbox FOR EACH STATEMENT EXECUTE FUNCTION bench_wakeup_if_idle()" ;;
	esac
	q -c "SET client_min_messages = warning" -c "DROP TRIGGER IF EXISTS outbox_wakeup ON public.outbox" ${ddl:+-c "$ddl"}
}

# hold_lock: a session that holds the wake-up lock exclusively, as a busy
# relay's listener connection does. Returns once the lock is granted.
hold_lock() {
	PGAPPNAME=${TAG}_hold q -c "SELECT pg_advisory_lock($LOCK)" -c "SELECT pg_sleep(86400)" >/dev/null 2>&1 &
	for _ in $(seq 200); do
		if [ "$(q -c "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
		              WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock'
		                AND a.application_name = '${TAG}_hold'")" = 1 ]; then
			return 0
		fi
		sleep 0.05
	done
	echo "wakeup-writers: the lock holder did not get the lock" >&2
	exit 1
}

# The relay going busy under load, 0.5 s after the load starts; it gives up
# 1 s before the load ends (a lock taken after the load proves nothing).
LIMIT=$((DURATION > 2 ? DURATION - 1 : 1))

# take_lock_try: as relay/wakeup.go does it today: pg_try_advisory_lock,
# retried.
take_lock_try() {
	sleep 0.5
	PGAPPNAME=${TAG}_try q -c "DO \$\$
DECLARE t0 timestamptz := clock_timestamp(); n int := 0;
BEGIN
    LOOP
        n := n + 1;
        EXIT WHEN pg_try_advisory_lock($LOCK);
        IF clock_timestamp() - t0 > interval '$LIMIT s' THEN
            RAISE NOTICE 'lock: NOT acquired under load (% attempts in $LIMIT s)', n;
            RETURN;
        END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
    RAISE NOTICE 'lock: acquired after % ms (% attempts)', round(extract(epoch FROM clock_timestamp() - t0) * 1000), n;
END \$\$" -c "SELECT pg_sleep(86400)" 2>&1 | grep -o 'lock: .*' >"$1" || true
}

# take_lock_wait: a blocking pg_advisory_lock under a lock_timeout. While it
# waits, the writers' shared try-locks fail at once (a request that conflicts
# with a waiter is refused), so they stop notifying, the holders commit, and
# the lock is granted.
take_lock_wait() {
	sleep 0.5
	PGAPPNAME=${TAG}_wait q -c "SET lock_timeout = '1s'" -c "DO \$\$
DECLARE t0 timestamptz := clock_timestamp(); n int := 0;
BEGIN
    LOOP
        n := n + 1;
        BEGIN
            PERFORM pg_advisory_lock($LOCK);
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() - t0 > interval '$LIMIT s' THEN
                RAISE NOTICE 'lock: NOT acquired under load (% attempts)', n;
                RETURN;
            END IF;
        END;
    END LOOP;
    RAISE NOTICE 'lock: acquired after % ms (% attempts)', round(extract(epoch FROM clock_timestamp() - t0) * 1000), n;
END \$\$" -c "SELECT pg_sleep(86400)" 2>&1 | grep -o 'lock: .*' >"$1" || true
}

cat >"$WORK/outbox.sql" <<'SQL'
\set aid random(1, 100000)
INSERT INTO outbox (topic, key, value) VALUES ('payments', convert_to('acct-' || :aid, 'UTF8'), '{"amount":100,"currency":"EUR"}');
SQL
sed 's/INSERT INTO outbox /INSERT INTO outbox_plain /' "$WORK/outbox.sql" >"$WORK/plain.sql"

describe() {
	case $1 in
	a) echo "no trigger (baseline)" ;;
	b) echo "gated trigger, relay busy (lock held)" ;;
	c) echo "gated trigger, no relay (lock free: every insert NOTIFYs)" ;;
	d) echo "always-NOTIFY statement trigger" ;;
	e) echo "idle-flag table trigger, relay busy" ;;
	f) echo "gated, relay takes lock with try-lock (wakeup.go today)" ;;
	g) echo "gated, relay takes lock with blocking lock + lock_timeout" ;;
	esac
}

# prepare CONFIG: the trigger, and the lock holder where the relay is busy.
prepare() {
	case $1 in
	a) use_trigger none ;;
	b) use_trigger gated; hold_lock ;;
	c | f | g) use_trigger gated ;;
	d) use_trigger always ;;
	e) use_trigger flag ;;
	esac
	q -c "TRUNCATE public.outbox, public.outbox_plain RESTART IDENTITY" -c "CHECKPOINT"
}

pgbench_run() { # output-file script...
	local out=$1
	shift
	pgbench -n -M prepared -c "$CLIENTS" -j "$JOBS" -T "$DURATION" "$@" "$DB_URL" >"$out" 2>&1 ||
		{ cat "$out" >&2; exit 1; }
}

run_one() { # config round
	local cfg=$1 note='' tps
	prepare "$cfg"
	rm -f "$WORK/lock"
	case $cfg in
	f) take_lock_try "$WORK/lock" & ;;
	g) take_lock_wait "$WORK/lock" & ;;
	esac
	pgbench_run "$WORK/out" -f "$WORK/outbox.sql"
	stop_holders
	[ -f "$WORK/lock" ] && note=$(cat "$WORK/lock")
	tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$WORK/out")
	[ -n "$tps" ] || { cat "$WORK/out" >&2; exit 1; }
	printf '%s %s %s\n' "$cfg" "$tps" "$2" >>"$WORK/results"
	printf '  round %d  %s  %-58s %7.0f tps  %s\n' "$2" "$cfg" "$(describe "$cfg")" "$tps" "$note"
}

paired_one() { # config round
	local cfg=$1 lat
	prepare "$cfg"
	pgbench_run "$WORK/out" -f "$WORK/plain.sql@1" -f "$WORK/outbox.sql@1"
	stop_holders
	# The per-script sections, in -f order: plain, then outbox.
	lat=$(sed -nE 's/^ - latency average = ([0-9.]+) ms$/\1/p' "$WORK/out" | tr '\n' ' ')
	# shellcheck disable=SC2086 # split the two latencies into $3 and $4
	set -- "$cfg" "$2" $lat
	[ $# = 4 ] || { cat "$WORK/out" >&2; exit 1; }
	printf '%s %s %s %s\n' "$1" "$3" "$4" "$2" >>"$WORK/paired"
	printf '  round %d  %s  same run: no trigger %.3f ms, trigger %.3f ms per transaction: %+.1f%%\n' \
		"$2" "$1" "$3" "$4" "$(awk -v a="$3" -v b="$4" 'BEGIN {print (b / a - 1) * 100}')"
}

median() { sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "# wakeup-writers: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine:    $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM"
echo "postgres:   $(q -c 'SHOW server_version') (synchronous_commit=$(q -c 'SHOW synchronous_commit'), fsync=$(q -c 'SHOW fsync'), shared_buffers=$(q -c 'SHOW shared_buffers'))"
echo "go:         $(go env GOVERSION); $(pgbench --version)"
echo "load:       $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, before the runs)"
echo "pgbench:    -n -M prepared -c $CLIENTS -j $JOBS -T $DURATION, $RUNS rounds, configs interleaved"
echo

for round in $(seq "$RUNS"); do
	for cfg in $CONFIGS; do
		run_one "$cfg" "$round"
	done
	for cfg in $PAIRED; do
		paired_one "$cfg" "$round"
	done
done

echo
echo "load:       $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, after the runs)"
echo
printf '%-3s %-58s %-26s %7s %7s %7s\n' cfg configuration "runs (tps)" median loss paired
base=$(awk '$1 == "a" {print $2}' "$WORK/results" | median)
for cfg in $CONFIGS; do
	runs=$(awk -v c="$cfg" '$1 == c {printf "%.0f ", $2}' "$WORK/results")
	med=$(awk -v c="$cfg" '$1 == c {print $2}' "$WORK/results" | median)
	loss=$(awk -v m="$med" -v b="$base" 'BEGIN {printf "%.1f%%", (1 - m / b) * 100}')
	paired=$(awk -v c="$cfg" '$1 == "a" {a[$3] = $2} $1 == c {v[$3] = $2} END {for (r in v) print (1 - v[r] / a[r]) * 100}' "$WORK/results" |
		median | awk '{printf "%.1f%%", $1}')
	printf '%-3s %-58s %-26s %7.0f %7s %7s\n' "$cfg" "$(describe "$cfg")" "$runs" "$med" "$loss" "$paired"
done
if [ -n "$PAIRED" ]; then
	echo
	echo "same run, 1:1 with a trigger-less twin table: mean latency per transaction, and the trigger's"
	echo "cost as a share of it (the throughput a writer loses to it is about the same share):"
	for cfg in $PAIRED; do
		costs=$(awk -v c="$cfg" '$1 == c {printf "%+.1f%% ", ($3 / $2 - 1) * 100}' "$WORK/paired")
		med=$(awk -v c="$cfg" '$1 == c {print ($3 / $2 - 1) * 100}' "$WORK/paired" | median)
		printf '%-3s %-58s %-26s median %+.1f%%\n' "$cfg" "$(describe "$cfg")" "$costs" "$med"
	done
fi
