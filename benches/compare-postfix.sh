#!/usr/bin/env bash
# End-to-end delivery, sealpost against Postfix, on this machine and loopback only.
#
#   bash benches/compare-postfix.sh       # as root (installs postfix if missing)
#
# Both MTAs get the same workload from the same load generator and deliver to the same sink:
#   load:  Postfix's smtp-source, S sessions kept open (-d), N messages of SIZE payload bytes,
#          one recipient each (SEALPOST_BENCH_LOAD=smtp-source in benches/delivery.rs);
#   sink:  the in-process sink of benches/delivery.rs on 127.0.0.2:SINK_PORT, advertising
#          STARTTLS (self-signed certificate) and PIPELINING;
#   timer: from starting smtp-source to the sink's N-th 250;
#   CPU:   user+system seconds of the MTA's processes during the run (sealpost: its one process;
#          Postfix: master, its live daemons and those it reaped), per 1,000 messages.
#
# Postfix runs as a private, throwaway instance (own config, queue and data directories under
# a temporary directory, smtpd on 127.0.0.1:PF_PORT only, relayhost = the sink); the system's
# default Postfix instance, if any, is not touched. The instance is stopped and its directory
# removed on exit. Not part of CI.
#
# Environment: SEALPOST_BENCH_MESSAGES (10000), SEALPOST_BENCH_SESSIONS (50),
# SEALPOST_BENCH_SIZE (10240), PF_PORT (10025), SINK_PORT (10026),
# POSTFIX_TLS_REUSE (yes: smtp_tls_connection_reuse, so Postfix also keeps TLS connections
# open between messages, as sealpost does; "no" is Postfix's default).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${SEALPOST_BENCH_MESSAGES:-10000}
S=${SEALPOST_BENCH_SESSIONS:-50}
SIZE=${SEALPOST_BENCH_SIZE:-10240}
PF_PORT=${PF_PORT:-10025}
SINK_PORT=${SINK_PORT:-10026}
TLS_REUSE=${POSTFIX_TLS_REUSE:-yes}
export SEALPOST_BENCH_MESSAGES=$N SEALPOST_BENCH_SESSIONS=$S SEALPOST_BENCH_SIZE=$SIZE

if ! command -v postfix >/dev/null || ! command -v smtp-source >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "compare-postfix: postfix is not installed; run as root" >&2; exit 1; }
    # "No configuration": the package installs without configuring or starting the system's
    # default instance (which would listen on every interface).
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi
[ "$(id -u)" = 0 ] || { echo "compare-postfix: Postfix must be started as root" >&2; exit 1; }

echo "compare-postfix: building the bench"
cargo bench --bench delivery --no-run -q 2>/dev/null || cargo bench --bench delivery --no-run

WORK=$(mktemp -d /tmp/sealpost-postfix-bench.XXXXXX)
CONF=$WORK/etc
mkdir -p "$CONF" "$WORK/queue" "$WORK/data"
chmod 755 "$WORK"
chown postfix "$WORK/data"

stop_postfix() {
    if [ -f "$WORK/queue/pid/master.pid" ]; then
        postfix -c "$CONF" stop >/dev/null 2>&1 || true
        # Wait for the master to exit (it removes its lock).
        for _ in $(seq 50); do
            postfix -c "$CONF" status >/dev/null 2>&1 || break
            sleep 0.2
        done
    fi
    rm -rf "$WORK"
}
trap stop_postfix EXIT

# main.cf: Debian's defaults plus what a loopback relay to the sink needs.
cat >"$CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $WORK/queue
data_directory = $WORK/data
myhostname = postfix.bench.test
myorigin = \$myhostname
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
# No per-client connection cap (sealpost's bench config allows 10000 per IP).
smtpd_client_connection_count_limit = 0
relayhost = [127.0.0.2]:$SINK_PORT
smtp_tls_security_level = may
smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache
smtp_tls_connection_reuse = $TLS_REUSE
smtpd_tls_security_level = none
default_destination_concurrency_limit = 20
# Postfix's own log file (postlogd): this container has no syslog daemon.
maillog_file = $WORK/maillog
maillog_file_prefixes = $WORK
EOF
# master.cf: the distribution's, without chroot, smtpd on 127.0.0.1:PF_PORT instead of :25,
# and tlsproxy (needed by smtp_tls_connection_reuse) enabled.
sed -e "s/^smtp      inet  n       -       y       -       -       smtpd/127.0.0.1:$PF_PORT inet n - n - - smtpd/" \
    -e 's/^#tlsproxy /tlsproxy /' \
    /usr/share/postfix/master.cf.dist >"$CONF/master.cf"
postconf -c "$CONF" -F '*/*/chroot = n'
grep -q "^127.0.0.1:$PF_PORT " "$CONF/master.cf" || { echo "compare-postfix: master.cf edit failed" >&2; exit 1; }

postfix -c "$CONF" check
postfix -c "$CONF" start
for _ in $(seq 50); do
    [ -s "$WORK/queue/pid/master.pid" ] && break
    sleep 0.2
done
MASTER=$(tr -d ' ' <"$WORK/queue/pid/master.pid")
echo "compare-postfix: Postfix $(postconf -h mail_version) master pid $MASTER on 127.0.0.1:$PF_PORT, relayhost [127.0.0.2]:$SINK_PORT, smtp_tls_connection_reuse=$TLS_REUSE"

result() { sed -n "s/.*RESULT .*_msgs_per_sec=\([0-9.]*\) cpu_per_1000=\([0-9.NA]*\).*/\1 \2/p"; }

echo "compare-postfix: Postfix, $N messages of $SIZE bytes over $S smtp-source sessions"
PF_OUT=$(SEALPOST_BENCH_LOAD=smtp-source SEALPOST_BENCH_TARGET=127.0.0.1:$PF_PORT \
    SEALPOST_BENCH_TARGET_NAME=postfix \
    SEALPOST_BENCH_TARGET_PID=$MASTER SEALPOST_BENCH_SINK=127.0.0.2:$SINK_PORT \
    cargo bench -q --bench delivery 2>&1) || { echo "$PF_OUT"; exit 1; }
echo "$PF_OUT" | grep -E '^delivery:'
read -r PF_RATE PF_CPU <<<"$(echo "$PF_OUT" | result)"
sent=$(grep -c 'status=sent' "$WORK/maillog" || true)
echo "compare-postfix: Postfix log: $sent deliveries with status=sent, $(grep -c 'warning:' "$WORK/maillog" || true) warnings"
grep 'warning:' "$WORK/maillog" | head -5 || true
stop_postfix
trap - EXIT

echo "compare-postfix: sealpost, same load and sink"
SP_OUT=$(SEALPOST_BENCH_LOAD=smtp-source cargo bench -q --bench delivery 2>&1) || { echo "$SP_OUT"; exit 1; }
echo "$SP_OUT" | grep -E '^delivery:'
read -r SP_RATE SP_CPU <<<"$(echo "$SP_OUT" | result)"

echo
printf '%-9s %12s %22s\n' MTA messages/s "CPU s per 1,000 msgs"
printf '%-9s %12.0f %22.3f\n' postfix "$PF_RATE" "$PF_CPU" sealpost "$SP_RATE" "$SP_CPU"
awk -v s="$SP_RATE" -v p="$PF_RATE" -v sc="$SP_CPU" -v pc="$PF_CPU" 'BEGIN {
    printf "ratio sealpost/postfix: %.2fx messages/s, %.2fx CPU per message\n", s / p, sc / pc }'
echo "RESULT postfix_msgs_per_sec=$PF_RATE postfix_cpu_per_1000=$PF_CPU sealpost_msgs_per_sec=$SP_RATE sealpost_cpu_per_1000=$SP_CPU"
