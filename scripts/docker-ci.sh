#!/usr/bin/env bash
# The Docker image, proved on this machine without Docker Hub (what `tox -e docker` runs):
#
#   1. installs Debian's docker.io and debootstrap if they are missing;
#   2. starts a private dockerd (own data root, exec root and socket under a temp dir, no bridge,
#      no iptables), which is stopped again on any exit;
#   3. builds a local base image: debootstrap <suite> minbase with python3, python3-venv and
#      ca-certificates, from the Debian mirror this host's apt uses, imported with `docker import`
#      (the rootfs tarball is cached under ~/.cache/pipetrain-docker, so reruns skip debootstrap);
#   4. builds the project's Dockerfile on it (classic builder, so no BuildKit-only syntax can slip
#      in; --network host; pip's index and CA bundle taken from this host's pip settings), then
#      rebuilds after a source-only change to show the dependency layer comes from the cache,
#      and checks the image runs as a non-root user under tini;
#   5. runs the scenario suite (the image's default command) with ./reports-docker mounted on
#      /reports and checks a report.json came out for every scenario; then one scenario the way
#      the README reproduces a failure (python -m pipetrain_harness run ..., then replay of its
#      report: the same history), as an arbitrary --user;
#   6. starts a long training run in a container, waits for steps in its events.jsonl, times
#      `docker stop` (must be under 1 s) and checks the checkpoint and the "stopped" state.
#
# Needs root (apt-get, dockerd). Environment:
#   PIPETRAIN_DOCKER_CACHE      cache directory (default ~/.cache/pipetrain-docker)
#   PIPETRAIN_DOCKER_SUITE      Debian suite of the base (default bookworm: its python3 is 3.11)
#   PIPETRAIN_DOCKER_SCENARIOS  what the suite runs (default: scenarios, i.e. all of them)
#   PIPETRAIN_DOCKER_TESTS=1    also run the unit and integration tests in the container
#   PIPETRAIN_DOCKER_KEEP=1     keep the temp dir (logs) after the run
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SUITE=${PIPETRAIN_DOCKER_SUITE:-bookworm}
CACHE=${PIPETRAIN_DOCKER_CACHE:-${HOME:-/root}/.cache/pipetrain-docker}
BASE_IMAGE=pipetrain-base:$SUITE
IMAGE=pipetrain:ci
APP_UID=10001                       # the Dockerfile's APP_UID default
REPORTS=$ROOT/reports-docker
read -ra SCENARIOS <<<"${PIPETRAIN_DOCKER_SCENARIOS:-scenarios}"
STOP_LIMIT_MS=1000
INCLUDE=python3,python3-venv,ca-certificates

DOCKER=/usr/bin/docker              # Debian's client, the daemon's own version
DOCKERD=/usr/sbin/dockerd
export DOCKER_BUILDKIT=0            # the classic builder

say() { printf '== %s\n' "$*"; }
FAILURES=()
fail() { printf 'docker-ci: FAIL: %s\n' "$*" >&2; FAILURES+=("$*"); }  # noted; the run goes on
die() { printf 'docker-ci: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }
# Long commands run in the background and are waited for: bash runs a trap (SIGTERM from a CI
# timeout, say) only once the foreground command is over, but interrupts a `wait` at once.
interruptible() { "$@" & wait $!; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f s", ms / 1000 }'; }

declare -a TIMINGS=()
T0=$(now_ms)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T_STEP=$T0
lap() {  # lap NAME: record the time since the previous lap
  local t
  t=$(now_ms)
  TIMINGS+=("$(printf '%-34s %8s' "$1" "$(secs $((t - T_STEP)))")")
  T_STEP=$t
}

[ "$(id -u)" -eq 0 ] || die "needs root (apt-get, dockerd)"

# -- 1. packages --------------------------------------------------------------------------------
missing=()
[ -x "$DOCKERD" ] && [ -x "$DOCKER" ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # No service may start from a package's postinst: the only dockerd is the one started below.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$made_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
fi
lap "packages"

# -- 2. a private dockerd -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/pipetrain-docker.XXXXXX)
DATA_ROOT=$WORK/data
export DOCKER_HOST=unix://$WORK/docker.sock
DOCKERD_PID=
CONTAINERS=()
# dockerd 20.10 also leaves a trust key in /etc/docker and an empty /run/docker/plugins: removed
# on exit unless they were there before.
TIDY=()
[ -e /etc/docker/key.json ] || TIDY+=(/etc/docker/key.json)
[ -e /run/docker ] || TIDY+=(/run/docker/plugins /run/docker)

cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    for c in "${CONTAINERS[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1; done
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { echo "docker-ci: dockerd did not stop; killing it"; kill -KILL "$DOCKERD_PID"; }
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  # Whatever the daemon left behind (its containerd, a shim) names our temp dir: only ours.
  local left
  left=$(pgrep -f -- "$WORK/" || true)
  if [ -n "$left" ]; then
    echo "docker-ci: killing leftover processes $left"
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null
  fi
  findmnt -rn -o TARGET | grep -F -- "$WORK/" | sort -r | while read -r m; do umount -l "$m"; done
  for path in "${TIDY[@]}"; do
    if [ -d "$path" ]; then rmdir "$path" 2>/dev/null; else rm -f "$path"; fi
  done
  if [ -d "$REPORTS" ]; then  # the logs go with the reports (CI keeps them as artifacts)
    mkdir -p "$REPORTS/docker-ci-logs"
    cp "$WORK"/*.log "$REPORTS/docker-ci-logs/" 2>/dev/null
  fi
  if [ "${PIPETRAIN_DOCKER_KEEP:-0}" = 1 ]; then
    echo "docker-ci: kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'echo "docker-ci: interrupted" >&2; exit 130' INT
trap 'echo "docker-ci: terminated" >&2; exit 143' TERM

say "starting dockerd (data root $DATA_ROOT, socket $WORK/docker.sock)"
echo '{}' >"$WORK/daemon.json"
mkdir -p "$DATA_ROOT"
"$DOCKERD" --config-file "$WORK/daemon.json" --data-root "$DATA_ROOT" --exec-root "$WORK/exec" \
  --pidfile "$WORK/dockerd.pid" --host "$DOCKER_HOST" \
  --bridge=none --iptables=false --ip-forward=false --ip-masq=false --userland-proxy=false \
  >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 150); do
  "$DOCKER" version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { cat "$WORK/dockerd.log" >&2; die "dockerd exited"; }
  sleep 0.2
done
"$DOCKER" version >/dev/null 2>&1 || { tail -n 40 "$WORK/dockerd.log" >&2; die "dockerd did not answer in 30 s"; }
echo "dockerd $("$DOCKER" version -f '{{.Server.Version}}'), storage driver $("$DOCKER" info -f '{{.Driver}}')"
lap "dockerd up"

# -- 3. the base image --------------------------------------------------------------------------
# The mirror, and the apt sources the base keeps, come from this host's apt configuration.
apt_sources() {  # prints the mirror for $SUITE, then one-line sources for $SUITE{,-updates,-security}
  python3 - "$SUITE" <<'EOF'
import glob, re, sys
suite = sys.argv[1]
wanted = {suite, f"{suite}-updates", f"{suite}-security"}
entries = []  # (uri, suite, components)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"]) == ["no"]:
            continue
        for uri in fields.get("uris", []):
            for s in fields.get("suites", []):
                entries.append((uri, s, fields.get("components", [])))
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            entries.append((line[1], line[2], line[3:]))
mains = [uri for uri, s, comps in entries if s == suite and "main" in comps]
if not mains:
    sys.exit(f"no 'deb ... {suite} main' source in /etc/apt")
print(mains[0])
for uri, s, comps in entries:
    if s in wanted and "main" in comps:
        print(f"deb {uri} {s} main")
EOF
}
sources=$(apt_sources) || die "cannot find the Debian mirror in /etc/apt"
MIRROR=$(head -n1 <<<"$sources")
key=$(printf '%s\n' "$SUITE" "$INCLUDE" "$sources" slim | sha256sum | cut -c1-12)
ROOTFS_TAR=$CACHE/rootfs-$SUITE-$key.tar
if [ -f "$ROOTFS_TAR" ]; then
  say "base rootfs from the cache: $ROOTFS_TAR"
else
  say "debootstrap $SUITE minbase + $INCLUDE from $MIRROR (cached for next time)"
  mkdir -p "$CACHE"
  rootfs=$WORK/rootfs
  if ! interruptible debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$MIRROR" \
      >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
  fi
  tail -n +2 <<<"$sources" >"$rootfs/etc/apt/sources.list"
  # Slim, as Debian's -slim images are: no docs, man pages or translations, now or from later
  # installs, and no apt caches left in image layers.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -rf "$rootfs"/usr/share/{man,info,groff}/* "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$ROOTFS_TAR.tmp" .
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf "$rootfs"
fi
lap "base rootfs"
"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
echo "$BASE_IMAGE: $("$DOCKER" run --rm --network none "$BASE_IMAGE" python3 --version)"
lap "docker import"

# -- 4. the image -------------------------------------------------------------------------------
# The build context: the work tree as git sees it (tracked and untracked files, not ignored ones,
# no reports), plus this host's CA bundle for pip; .dockerignore filters it further.
CONTEXT=$WORK/context
mkdir -p "$CONTEXT"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | grep -zvE '^(reports|reports-[^/]*|runs)/' \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
    | tar -C "$CONTEXT" -xf -
else
  tar --exclude=./.git --exclude=./.tox --exclude='./reports*' --exclude=./runs -cf - . \
    | tar -C "$CONTEXT" -xf -
fi
[ -f "$CONTEXT/Dockerfile" ] || die "no Dockerfile in the build context"

pip_setting() {  # pip_setting ENV_NAME KEY: this host's pip setting (environment first, then config)
  local value=${!1:-}
  if [ -z "$value" ]; then
    value=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\\.$2='\\(.*\\)'\$/\\1/p" | head -n1)
  fi
  printf '%s' "$value"
}
remote_urls() { tr ' ' '\n' | grep -E '^https?://' | paste -sd' ' -; }  # drops file:// and paths

BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
cert=$(pip_setting PIP_CERT cert)
[ -n "$cert" ] || cert=${REQUESTS_CA_BUNDLE:-${CURL_CA_BUNDLE:-}}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cp "$cert" "$CONTEXT/pip-cert.pem"
  BUILD_ARGS+=(--build-arg PIP_CERT=pip-cert.pem)
  echo "pip CA bundle: $cert"
fi
index=$(pip_setting PIP_INDEX_URL index-url | remote_urls || true)
extra=$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url | remote_urls || true)
[ -z "$index" ] || BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$index")
[ -z "$extra" ] || BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")

build() {  # build TAG LOG
  if ! interruptible "$DOCKER" build --network host "${BUILD_ARGS[@]}" -t "$1" "$CONTEXT" >"$2" 2>&1; then
    tail -n 60 "$2" >&2
    die "docker build failed (log above)"
  fi
  grep -E '^Step [0-9]+/[0-9]+ :|Using cache' "$2" | cut -c1-110
}
say "docker build -t $IMAGE (--network host, BASE_IMAGE=$BASE_IMAGE)"
build "$IMAGE" "$WORK/build.log"
echo "image size: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'), of which:"
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | grep -v '^0B' | cut -c1-100 | sed 's/^/  /'
lap "docker build"

say "rebuild after a source-only change: the dependency layer must come from the cache"
echo "<!-- cache probe -->" >>"$CONTEXT/README.md"
build pipetrain:cache-probe "$WORK/rebuild.log"
grep -A1 -E '^Step [0-9]+/[0-9]+ : RUN .*pip install --no-cache-dir -r' "$WORK/rebuild.log" \
  | grep -q 'Using cache' || die "the dependency layer was rebuilt after a source-only change"
"$DOCKER" rmi pipetrain:cache-probe >/dev/null
lap "rebuild, source changed"

say "the image: user, init, entry point"
# shellcheck disable=SC2016  # expanded by the container's shell
"$DOCKER" run --rm --network none "$IMAGE" sh -c \
  'echo "  uid $(id -u), PID 1: $(readlink /proc/1/exe), $(python --version), $(command -v pipetrain), /app owned by $(stat -c %u /app)"' \
  | tee "$WORK/sanity.log"
grep -q '^  uid 0,' "$WORK/sanity.log" && fail "the image runs as root"
grep -q 'PID 1: [^,]*/tini,' "$WORK/sanity.log" || fail "tini is not PID 1"

if [ "${PIPETRAIN_DOCKER_TESTS:-0}" = 1 ]; then
  say "unit and integration tests in the container"
  CONTAINERS+=(pipetrain-tests-$$)
  interruptible "$DOCKER" run --rm --name "pipetrain-tests-$$" --network none "$IMAGE" \
    python -m pytest -n auto --dist loadfile -q tests \
    || fail "the tests failed in the container"
  lap "tests in the container"
fi

# -- 5. the scenario suite ----------------------------------------------------------------------
rm -rf "$REPORTS"
install -d -o "$APP_UID" -g "$APP_UID" "$REPORTS"
say "scenario suite in the container (reports in $REPORTS)"
CONTAINERS+=(pipetrain-scenarios-$$)
set +e
if [ "${SCENARIOS[*]}" = scenarios ]; then
  interruptible "$DOCKER" run --rm --name "pipetrain-scenarios-$$" --network none \
    -v "$REPORTS:/reports" "$IMAGE"
else  # the default command with other paths
  interruptible "$DOCKER" run --rm --name "pipetrain-scenarios-$$" --network none \
    -v "$REPORTS:/reports" "$IMAGE" python -m pytest -n auto -p pipetrain_harness.pytest_plugin --report-dir /reports -q "${SCENARIOS[@]}"
fi
suite_status=$?
set -e
lap "scenario suite"

expected=$(cd "$ROOT" && find "${SCENARIOS[@]}" -name '*.toml' -not -path '*/found/*' | wc -l)
found=$(find "$REPORTS" -mindepth 2 -maxdepth 2 -name report.json | wc -l)
python3 - "$REPORTS" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/report.json")):
    report = json.loads(path.read_text())
    html = path.with_name("report.html").is_file()
    print(f"  {path.parent.name:32} {report.get('verdict', '?'):8} html={'yes' if html else 'NO'}")
EOF
echo "report.json files: $found of $expected scenarios"
[ "$found" -eq "$expected" ] || fail "expected $expected report.json files in $REPORTS, found $found"
[ "$suite_status" -eq 0 ] || fail "the scenario suite failed in the container (pytest exit $suite_status)"

say "one scenario, as the README reproduces a failure (and as another uid: --user 12345)"
install -d -o 12345 -g 12345 "$REPORTS/reproduce"
"$DOCKER" run --rm --network none --user 12345:12345 -v "$REPORTS/reproduce:/reports" "$IMAGE" \
  python -m pipetrain_harness run scenarios/baseline.toml --report-dir /reports | tail -n 3 \
  || fail "python -m pipetrain_harness run scenarios/baseline.toml failed in the container"
[ -f "$REPORTS/reproduce/baseline/report.json" ] || fail "no report from the reproduced scenario"
"$DOCKER" run --rm --network none --user 12345:12345 -v "$REPORTS/reproduce:/reports" "$IMAGE" \
  python -m pipetrain_harness replay /reports/baseline/report.json | tail -n 2 \
  || fail "python -m pipetrain_harness replay of the baseline report failed in the container"
lap "one scenario, reproduced and replayed"

# -- 6. docker stop of a training container -----------------------------------------------------
say "docker stop of a training container"
STOP=pipetrain-stop-$$
CONTAINERS+=("$STOP")
"$DOCKER" run -d --name "$STOP" --network none -v "$REPORTS:/reports" "$IMAGE" \
  pipetrain train --epochs 1000 --checkpoint-every 0 --run-dir /reports/stop-test --quiet >/dev/null
events=$REPORTS/stop-test/events.jsonl
steps=0
for _ in $(seq 300); do
  steps=$(grep -c '"event": "step"' "$events" 2>/dev/null || true)
  [ "${steps:-0}" -ge 30 ] && break
  [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$STOP")" = true ] || break
  sleep 0.1
done
if [ "${steps:-0}" -lt 30 ]; then
  "$DOCKER" logs "$STOP" 2>&1 | tail -n 20 >&2
  die "the training container made $steps steps"
fi
echo "running: $steps steps done"
t=$(now_ms)
"$DOCKER" stop "$STOP" >/dev/null
STOP_MS=$(( $(now_ms) - t ))
exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$STOP")
finished=$("$DOCKER" inspect -f '{{.State.FinishedAt}}' "$STOP")
"$DOCKER" logs "$STOP" >"$WORK/stop-test.log" 2>&1
"$DOCKER" rm "$STOP" >/dev/null
echo "docker stop took $STOP_MS ms; the container exited $exit_code"
python3 - "$REPORTS/stop-test" "$t" "$finished" <<'EOF' || fail "the stopped run's directory is not as it should be"
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
stop_at = int(sys.argv[2]) / 1000  # when `docker stop` began (the same clock as the events' t)
state = json.loads((run / "run.json").read_text())
manifests = sorted(run.glob("checkpoints/step-*/manifest.json"))
events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line]
kinds = [e["event"] for e in events]
marks = {e["event"]: e["t"] for e in events if e["t"] >= stop_at}
if "checkpoint" in marks and "run_end" in marks:
    from datetime import datetime
    day, frac = sys.argv[3].rstrip("Z").partition(".")[::2]  # RFC 3339 with nanoseconds, UTC
    exited = datetime.fromisoformat(f"{day}.{frac[:6]:0<6}+00:00").timestamp()
    print(f"  after SIGTERM: checkpoint written at +{(marks['checkpoint'] - stop_at) * 1000:.0f} ms, "
          f"run_end at +{(marks['run_end'] - stop_at) * 1000:.0f} ms, "
          f"the container's init exited at +{(exited - stop_at) * 1000:.0f} ms")
print(f"  run.json state={state.get('state')} step={state.get('step')}; "
      f"checkpoints: {[m.parent.name for m in manifests]}; last events: {kinds[-3:]}")
problems = []
if state.get("state") != "stopped":
    problems.append(f"run.json state is {state.get('state')!r}, not 'stopped'")
if not manifests:
    problems.append("no checkpoints/step-*/manifest.json")
elif json.loads(manifests[-1].read_text()).get("step") != state.get("step"):
    problems.append("the newest checkpoint is not at the step the run stopped")
if problems:
    sys.exit("\n".join(problems))
EOF
[ "$exit_code" -eq 0 ] || fail "the stopped training container exited $exit_code, not 0"
[ "$STOP_MS" -lt "$STOP_LIMIT_MS" ] || fail "docker stop took $STOP_MS ms (limit $STOP_LIMIT_MS ms)"
lap "docker stop test"

# -- summary ------------------------------------------------------------------------------------
say "timings"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-34s %8s\n' "total" "$(secs $(( $(now_ms) - T0 )))"
echo "  docker stop: $STOP_MS ms"
echo "  load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores (at the start: $LOAD0)"
if [ ${#FAILURES[@]} -gt 0 ]; then
  printf 'docker-ci: FAIL: %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
say "ok: image $IMAGE built on $BASE_IMAGE, scenarios run, reports in $REPORTS"
