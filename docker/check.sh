#!/usr/bin/env bash
# Checks docker/ on a machine without a Docker engine (CI runs `docker/check.sh`):
#   static         promtool check config on the Prometheus file; the Grafana dashboard JSON is
#                  well formed, every panel uses the provisioned datasource, and every query is
#                  valid PromQL (promtool check rules); compose.yml names files that exist; both
#                  Dockerfiles run as a non-root user, health-check /ready and mount /models.
#   build-command  prints the `cargo build` line of docker/Dockerfile, after checking that
#                  docker/Dockerfile.cuda builds with the same line plus `--features cuda`.
#   build          runs that exact line in a copy of the Docker build context (the repository
#                  filtered by docker/Dockerfile.dockerignore, under target/docker-context), with
#                  the workspace's target/ directory: the binary is target/release/tga-serve.
#   live           starts that binary (or $TGA_SERVE_BIN) on a free port with the built-in model,
#                  sends a text, an image and a refused request, and checks that every metric a
#                  dashboard query names is in /metrics (histograms where `_bucket` is queried).
#   all (default)  static, build, live.
# Needs: bash, python3 (standard library only), curl, promtool (Debian package `prometheus`).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DOCKER="$ROOT/docker"
DASHBOARD="$DOCKER/grafana/dashboards/tga-serve.json"
WORK="$ROOT/target/docker-check"

log() { printf '== docker/check.sh: %s\n' "$*" >&2; }
fail() {
    printf 'docker/check.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Static checks

check_static() {
    command -v promtool >/dev/null || fail "promtool not found (apt-get install prometheus)"
    mkdir -p "$WORK"
    log "promtool check config docker/prometheus/prometheus.yml"
    promtool check config "$DOCKER/prometheus/prometheus.yml"

    log "dashboard, provisioning, compose and Dockerfiles"
    python3 - "$DOCKER" "$WORK/dashboard-rules.yml" <<'PY'
import json, pathlib, re, sys

docker = pathlib.Path(sys.argv[1])
rules_out = pathlib.Path(sys.argv[2])
errors = []

# The provisioned datasource uid (one `uid:` line in the provisioning file).
prov = (docker / "grafana/provisioning/datasources/prometheus.yml").read_text()
uids = re.findall(r"^\s*uid:\s*(\S+)\s*$", prov, re.M)
if len(uids) != 1:
    errors.append(f"datasource provisioning: expected one uid, found {uids}")
ds_uid = uids[0] if uids else None
dash_prov = (docker / "grafana/provisioning/dashboards/tga-serve.yml").read_text()
m = re.search(r"^\s*path:\s*(\S+)\s*$", dash_prov, re.M)
if not m:
    errors.append("dashboard provisioning: no options.path")

dash = json.loads((docker / "grafana/dashboards/tga-serve.json").read_text())
for key in ("uid", "title", "panels", "schemaVersion", "templating"):
    if key not in dash:
        errors.append(f"dashboard: missing top-level `{key}`")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
ids, exprs = set(), []
for panel in dash.get("panels", []):
    where = f"panel {panel.get('id')} `{panel.get('title')}`"
    for key in ("id", "type", "title", "gridPos"):
        if key not in panel:
            errors.append(f"{where}: missing `{key}`")
    if panel.get("id") in ids:
        errors.append(f"{where}: duplicate id")
    ids.add(panel.get("id"))
    gp = panel.get("gridPos", {})
    if not all(isinstance(gp.get(k), int) for k in "hwxy") or gp.get("x", 0) + gp.get("w", 0) > 24:
        errors.append(f"{where}: bad gridPos {gp}")
    if panel.get("repeat") and panel["repeat"] not in variables:
        errors.append(f"{where}: repeats over unknown variable `{panel['repeat']}`")
    if panel.get("type") == "row":
        continue
    targets = panel.get("targets") or []
    if not targets:
        errors.append(f"{where}: no queries")
    for holder in [panel] + targets:
        ds = holder.get("datasource")
        if ds is not None and ds != {"type": "prometheus", "uid": ds_uid}:
            errors.append(f"{where}: datasource {ds} is not the provisioned `{ds_uid}`")
    for t in targets:
        expr = (t.get("expr") or "").strip()
        if not expr:
            errors.append(f"{where}: query {t.get('refId')} has no expr")
            continue
        for var in re.findall(r"\$(\w+)", expr):
            if not var.startswith("__") and var not in variables:
                errors.append(f"{where}: unknown variable ${var}")
        exprs.append((where, expr))

# PromQL syntax: every query becomes a recording rule for `promtool check rules`, with Grafana's
# variables replaced by values of the right kind.
def concrete(expr):
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", "text", expr)
lines = ["groups:", "  - name: dashboard", "    rules:"]
for i, (where, expr) in enumerate(exprs):
    lines.append(f"      - record: dashboard:query_{i}")
    lines.append(f"        expr: {json.dumps(concrete(expr))}")
rules_out.write_text("\n".join(lines) + "\n")

# compose.yml: the files it mounts and builds from exist.
compose = (docker / "compose.yml").read_text()
for rel in re.findall(r"^\s*-\s*(\./[^:\s]+):", compose, re.M):
    if not (docker / rel).exists():
        errors.append(f"compose.yml mounts {rel}, which does not exist")
for rel in re.findall(r"dockerfile:\s*\$\{\w+:-([^}]+)\}", compose):
    if not (docker.parent / rel).exists():
        errors.append(f"compose.yml builds {rel}, which does not exist")

# Dockerfiles: non-root, health check on /ready, models as a volume, listening on all interfaces.
for name in ("Dockerfile", "Dockerfile.cuda"):
    text = (docker / name).read_text()
    runtime = text.split(" AS runtime", 1)[-1]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    if not users or users[-1] in ("root", "0"):
        errors.append(f"{name}: the runtime stage must end as a non-root USER")
    if not re.search(r"^HEALTHCHECK\b[^\n]*(\\\n[^\n]*)*?/ready", runtime, re.M):
        errors.append(f"{name}: no HEALTHCHECK on /ready")
    if not re.search(r'^VOLUME\s+\[?"?/models', runtime, re.M):
        errors.append(f"{name}: /models is not a VOLUME")
    if not re.search(r'^CMD\s+\[.*"--host",\s*"0\.0\.0\.0"', runtime, re.M):
        errors.append(f"{name}: CMD does not serve on 0.0.0.0")
    ignore = docker / f"{name}.dockerignore"
    if not ignore.exists():
        errors.append(f"{name}: no {ignore.name}")

if errors:
    sys.exit("\n".join(errors))
print(f"dashboard: {len(dash['panels'])} panels, {len(exprs)} queries")
PY
    log "promtool check rules (every dashboard query is valid PromQL)"
    promtool check rules "$WORK/dashboard-rules.yml"
}

# ---------------------------------------------------------------------------------------------
# Build commands

# The `cargo build` line of a Dockerfile's RUN instruction (continuation backslashes and the
# `&& install ...` that copies the binary out of the cache mount are not part of it).
cargo_line() {
    local lines
    lines="$(sed -n 's/^\(RUN\)\{0,1\}[[:space:]]*\(cargo build .*\)$/\2/p' "$1" |
        sed 's/[[:space:]]*\\$//; s/[[:space:]]*&&.*$//')"
    [ "$(printf '%s\n' "$lines" | grep -c .)" = 1 ] ||
        fail "$1 must have exactly one \`cargo build\` line, found: ${lines:-none}"
    printf '%s\n' "$lines"
}

build_command() {
    local cpu cuda
    cpu="$(cargo_line "$DOCKER/Dockerfile")"
    cuda="$(cargo_line "$DOCKER/Dockerfile.cuda")"
    case "$cpu" in
    "cargo build --release --locked -p tga-serve "*) ;;
    *) fail "docker/Dockerfile builds with \`$cpu\`, not \`cargo build --release --locked -p tga-serve ...\`" ;;
    esac
    [ "$cuda" = "$cpu --features cuda" ] ||
        fail "docker/Dockerfile.cuda builds with \`$cuda\`; expected the CPU line plus --features cuda: \`$cpu --features cuda\`"
    printf '%s\n' "$cpu"
}

# A copy of what `COPY . .` sees: the repository filtered by Dockerfile.dockerignore (Docker's
# rules: patterns relative to the context root, `**` across directories, the last matching
# pattern wins, `!` re-includes). Unchanged files keep their mtime, so cargo rebuilds nothing.
stage_context() {
    python3 - "$ROOT" "$DOCKER/Dockerfile.dockerignore" "$1" <<'PY'
import os, re, shutil, sys

root, ignore_file, dest = sys.argv[1:4]

def glob_regex(pattern):
    """Go's filepath.Match plus `**` (any number of directories), as Docker's patternmatcher."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("^") else body) + "]", j + 1
        else:
            out, i = out + re.escape(c), i + 1
    return out

rules = []
for line in open(ignore_file):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    negate = line.startswith("!")
    pattern = os.path.normpath(line.lstrip("!").strip().strip("/"))
    rules.append((re.compile(glob_regex(pattern) + r"(/.*)?\Z"), negate, pattern))

def excluded(rel):
    result = False
    for regex, negate, _ in rules:
        if regex.match(rel):
            result = not negate
    return result

def may_reinclude(rel):
    return any(neg and pat.startswith(rel + "/") for _, neg, pat in rules)

wanted = set()
for dirpath, dirnames, filenames in os.walk(root):
    reldir = os.path.relpath(dirpath, root)
    reldir = "" if reldir == "." else reldir
    keep = []
    for d in dirnames:
        rel = os.path.join(reldir, d)
        if os.path.abspath(os.path.join(root, rel)) == os.path.abspath(dest):
            continue
        if not excluded(rel) or may_reinclude(rel):
            keep.append(d)
    dirnames[:] = keep
    for f in filenames:
        rel = os.path.join(reldir, f)
        if not excluded(rel):
            wanted.add(rel)

for dirpath, dirnames, filenames in os.walk(dest, topdown=False):
    for f in filenames:
        rel = os.path.relpath(os.path.join(dirpath, f), dest)
        if rel not in wanted:
            os.remove(os.path.join(dirpath, f))
    if not os.listdir(dirpath) and dirpath != dest:
        os.rmdir(dirpath)
for rel in sorted(wanted):
    src, dst = os.path.join(root, rel), os.path.join(dest, rel)
    st = os.stat(src)
    if os.path.exists(dst):
        dt = os.stat(dst)
        if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
            continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)
print(f"docker build context: {len(wanted)} files")
PY
}

build() {
    local line context="$ROOT/target/docker-context"
    line="$(build_command)"
    mkdir -p "$context"
    stage_context "$context"
    log "in the Docker build context: $line"
    (cd "$context" && CARGO_TARGET_DIR="$ROOT/target" bash -c "$line")
}

# ---------------------------------------------------------------------------------------------
# Live /metrics check

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

live() {
    local bin="${TGA_SERVE_BIN:-$ROOT/target/release/tga-serve}"
    [ -x "$bin" ] || fail "$bin not found (run \`docker/check.sh build\`, or set TGA_SERVE_BIN)"
    command -v curl >/dev/null || fail "curl not found"
    mkdir -p "$WORK"
    local port base
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    base="http://127.0.0.1:$port"
    log "starting $bin serve --port $port (built-in model)"
    trap stop_server EXIT
    env -u TGA_MODEL RUST_LOG=warn "$bin" serve --host 127.0.0.1 --port "$port" \
        >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    local i
    for i in $(seq 1 240); do
        if curl -fsS "$base/ready" >/dev/null 2>&1; then break; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; fail "tga-serve exited"; }
        [ "$i" -lt 240 ] || { cat "$WORK/server.log" >&2; fail "/ready not 200 after 120 s"; }
        sleep 0.5
    done

    # A text request and an image request, both asking for diagnostics (so the safety metrics
    # of both modalities are observed where the server supports it), and one refused request.
    local image status
    image="$(base64 -w0 "$ROOT/fixtures/images/photo_120x160.png")"
    status="$(curl -sS -o "$WORK/text.json" -w '%{http_code}' "$base/v1/chat/completions" \
        -H 'content-type: application/json' \
        -d '{"messages":[{"role":"user","content":"How do I sharpen a knife?"}],
             "max_tokens":4,"temperature":0,"diagnostics":{}}')"
    [ "$status" = 200 ] || { cat "$WORK/text.json" >&2; fail "text chat request: HTTP $status"; }
    printf '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,%s"}},{"type":"text","text":"What is in this image?"}]}],"max_tokens":4,"temperature":0,"diagnostics":{"caption":"a photo"}}' \
        "$image" >"$WORK/image-request.json"
    status="$(curl -sS -o "$WORK/image.json" -w '%{http_code}' "$base/v1/chat/completions" \
        -H 'content-type: application/json' --data-binary "@$WORK/image-request.json")"
    [ "$status" = 200 ] || { cat "$WORK/image.json" >&2; fail "image chat request: HTTP $status"; }
    status="$(curl -sS -o "$WORK/refused.json" -w '%{http_code}' "$base/v1/chat/completions" \
        -H 'content-type: application/json' \
        -d '{"messages":[{"role":"user","content":"hi"}],"temperature":5}')"
    [ "$status" = 400 ] || { cat "$WORK/refused.json" >&2; fail "invalid request: HTTP $status, expected 400"; }
    curl -fsS "$base/metrics" >"$WORK/metrics.txt" || fail "GET /metrics failed"
    stop_server
    trap - EXIT

    log "every metric the dashboard queries is in /metrics"
    python3 - "$DASHBOARD" "$WORK/metrics.txt" <<'PY'
import json, re, sys

dash = json.load(open(sys.argv[1]))
types, samples = {}, set()
for line in open(sys.argv[2]):
    if line.startswith("# TYPE "):
        _, _, name, kind = line.split()
        types[name] = kind
    elif line.strip() and not line.startswith("#"):
        samples.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))

queried = {}
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        for name in re.findall(r"\btga_[a-z0-9_]+\b", target.get("expr", "")):
            queried.setdefault(name, set()).add(panel["title"])

errors = []
for name, panels in sorted(queried.items()):
    family, suffix = name, ""
    m = re.match(r"(.*)(_bucket|_sum|_count)$", name)
    if m and types.get(m.group(1)) in ("histogram", "summary"):
        family, suffix = m.group(1), m.group(2)
    where = ", ".join(sorted(panels))
    if family not in types:
        errors.append(f"{name} (panels: {where}) is not in /metrics")
    elif name.endswith("_bucket") and types[family] != "histogram":
        errors.append(f"{name} (panels: {where}): {family} is a {types[family]}, not a histogram")
    elif not suffix and types[family] == "histogram":
        errors.append(f"{name} (panels: {where}) is a histogram: query _bucket, _sum or _count")
    elif name not in samples:
        errors.append(f"{name} (panels: {where}) has a TYPE line but no samples")
if errors:
    sys.exit("metrics missing from a live /metrics (see target/docker-check/metrics.txt):\n  "
             + "\n  ".join(errors))
print(f"{len(queried)} metric names queried by the dashboard, all present")
PY
}

case "${1:-all}" in
static) check_static ;;
build-command) build_command ;;
build) build ;;
live) live ;;
all)
    check_static
    if [ -n "${TGA_SERVE_BIN:-}" ]; then
        log "TGA_SERVE_BIN is set: not building"
    else
        build
    fi
    live
    ;;
*) fail "usage: docker/check.sh [all|static|build-command|build|live]" ;;
esac
log "OK"
