#!/usr/bin/env bash
# Screenshots of the MLflow UI, the Prefect UI and the Optuna dashboard on a finished small run, taken with a
# real headless Chromium, for the README (docs/screenshots/).
#
# usage: scripts/screenshots.sh [--reuse] [ROOT]
#
#   ROOT     data root of the run (MLflow, Optuna and Prefect data); default: a new temporary folder
#   --reuse  ROOT already holds a finished `soups run`: skip the run and only take the screenshots
#
# Without --reuse it first runs a small pipeline into ROOT (6 trials, 5 recipes; about 4 minutes on 2 cores).
# Then it starts the three UIs on free 127.0.0.1 ports, drives Chromium over the DevTools protocol (open each
# page, wait for its content, expand the nested runs, pick a few metric columns) and writes the PNGs to $OUT
# (default docs/screenshots/). The servers and the browser stop when it exits, however it exits.
#
# Needs Chromium (Debian: apt-get install chromium) and optuna-dashboard, in its own venv so the project's
# stays untouched (default build/optuna-dashboard-venv, made with
#   python3 -m venv build/optuna-dashboard-venv && build/optuna-dashboard-venv/bin/pip install optuna-dashboard \
#       "optuna==$(.venv/bin/python -c 'import optuna; print(optuna.__version__)')"
# ) or on PATH. Settings from the environment: OUT, EXPERIMENT (default digits-soups), CHROMIUM,
# OPTUNA_DASHBOARD, VENV (default .venv), WIDTH and HEIGHT (default 1400 x 900).
set -euo pipefail

usage() { sed -n 's/^# usage: /usage: /p' "$0"; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REUSE=0
ROOT=""
while (($#)); do
    case "$1" in
        --reuse) REUSE=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; exit 2 ;;
        *) [[ -z "$ROOT" ]] || { usage >&2; exit 2; }; ROOT="$1" ;;
    esac
    shift
done

VENV="${VENV:-$REPO/.venv}"
OUT="${OUT:-$REPO/docs/screenshots}"
EXPERIMENT="${EXPERIMENT:-digits-soups}"
WIDTH="${WIDTH:-1400}"
HEIGHT="${HEIGHT:-900}"

find_tool() {  # the first executable among the arguments (paths, or names on PATH)
    local candidate
    for candidate in "$@"; do
        [[ -n "$candidate" ]] || continue
        if [[ "$candidate" == */* ]]; then
            [[ -x "$candidate" ]] && { echo "$candidate"; return 0; }
        elif command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"; return 0
        fi
    done
    return 1
}
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "no project virtualenv at $VENV (make run creates it, or set VENV)" >&2; exit 1; }
CHROMIUM="$(find_tool "${CHROMIUM:-}" chromium chromium-browser google-chrome)" ||
    { echo "no Chromium found (apt-get install chromium, or set CHROMIUM)" >&2; exit 1; }
DASHBOARD="$(find_tool "${OPTUNA_DASHBOARD:-}" "$REPO/build/optuna-dashboard-venv/bin/optuna-dashboard" optuna-dashboard)" ||
    { echo "no optuna-dashboard found (see the header of $0, or set OPTUNA_DASHBOARD)" >&2; exit 1; }

if [[ -z "$ROOT" ]]; then
    ((REUSE == 0)) || { echo "--reuse needs a ROOT" >&2; exit 2; }
    ROOT="$(mktemp -d "${TMPDIR:-/tmp}/soups-shots.XXXXXX")"
fi
if ((REUSE)); then
    [[ -d "$ROOT" ]] || { echo "no folder $ROOT to reuse" >&2; exit 1; }
else
    mkdir -p "$ROOT"
fi
mkdir -p "$OUT"
ROOT="$(cd "$ROOT" && pwd)"
OUT="$(cd "$OUT" && pwd)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/soups-shots-work.XXXXXX")"
PGIDS=()
cleanup() {
    local pgid
    for pgid in "${PGIDS[@]}"; do kill -TERM -- "-$pgid" 2>/dev/null || true; done
    for pgid in "${PGIDS[@]}"; do
        for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pgid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Prefect keeps its database beside the MLflow and Optuna data, as `soups run` does, so its UI shows the run.
export PREFECT_HOME="$ROOT/prefect"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
unset PREFECT_API_URL PREFECT_UI_API_URL

started=$SECONDS
if ((REUSE == 0)); then
    echo "== a small run into $ROOT"
    (cd "$REPO" && "$VENV/bin/soups" run --set "tracking.root=$ROOT" --set sweep.n_trials=6 \
        --set 'kitchen.recipes=["best","uniform","greedy","ensemble","wise_ft"]') >"$WORK/run.log" 2>&1 ||
        { tail -n 40 "$WORK/run.log" >&2; echo "soups run failed" >&2; exit 1; }
    grep -E "^Champion decision|^Finished in" "$WORK/run.log" || true
    echo "== run took $((SECONDS - started)) s"
fi
for store in mlflow.db optuna.db prefect; do
    [[ -e "$ROOT/$store" ]] || { echo "$ROOT has no $store: not a finished soups run" >&2; exit 1; }
done

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {  # start NAME COMMAND...: in a process group of its own (stopped as a whole on exit), log in $WORK
    local name="$1"
    shift
    setsid "$@" >"$WORK/$name.log" 2>&1 &
    PGIDS+=("$!")
}

wait_for() {  # wait_for NAME URL: until the URL answers 2xx, at most 180 s
    local name="$1" url="$2"
    for _ in $(seq 360); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.5
    done
    echo "$name did not come up at $url; the end of its log:" >&2
    tail -n 30 "$WORK/$name.log" >&2
    exit 1
}

MLFLOW_PORT="$(free_port)"
start mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$ROOT/mlflow.db" --default-artifact-root "file://$ROOT/artifacts"
PREFECT_PORT="$(free_port)"
start prefect env PREFECT_UI_API_URL="http://127.0.0.1:$PREFECT_PORT/api" \
    "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-services
OPTUNA_PORT="$(free_port)"
start optuna "$DASHBOARD" --host 127.0.0.1 --port "$OPTUNA_PORT" --quiet "sqlite:///$ROOT/optuna.db"

export MLFLOW="http://127.0.0.1:$MLFLOW_PORT"
export PREFECT="http://127.0.0.1:$PREFECT_PORT"
export OPTUNA="http://127.0.0.1:$OPTUNA_PORT"
wait_for mlflow "$MLFLOW/health"
wait_for prefect "$PREFECT/api/health"
wait_for optuna "$OPTUNA/api/studies"
echo "== UIs: MLflow $MLFLOW  Prefect $PREFECT  Optuna dashboard $OPTUNA"

json() {  # json PYTHON-EXPRESSION-OF-d: evaluated on the JSON read from stdin
    "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"
}
flow_runs() {  # flow_runs FILTER-JSON: the id of the newest flow run that matches
    curl -fsS -X POST "$PREFECT/api/flow_runs/filter" -H 'Content-Type: application/json' \
        -d "{\"sort\": \"START_TIME_DESC\", \"limit\": 1, $1}" | json 'd[0]["id"] if d else ""'
}
export EXPERIMENT
EXPERIMENT_ID="$(curl -fsS "$MLFLOW/api/2.0/mlflow/experiments/get-by-name?experiment_name=$EXPERIMENT" |
    json 'd["experiment"]["experiment_id"]')"
PIPELINE_RUN_ID="$(flow_runs '"flows": {"name": {"any_": ["soup-pipeline"]}}')"
[[ -n "$PIPELINE_RUN_ID" ]] || { echo "no soup-pipeline flow run in $PREFECT_HOME" >&2; exit 1; }
SWEEP_RUN_ID="$(flow_runs "\"flows\": {\"name\": {\"any_\": [\"sweep\"]}},
    \"flow_runs\": {\"parent_flow_run_id\": {\"any_\": [\"$PIPELINE_RUN_ID\"]}}")"
STUDY_ID="$(curl -fsS "$OPTUNA/api/studies" |
    json "next(s['study_id'] for s in d['study_summaries'] if s['study_name'] == '$EXPERIMENT')")"
export EXPERIMENT_ID PIPELINE_RUN_ID SWEEP_RUN_ID STUDY_ID OUT
echo "== MLflow experiment $EXPERIMENT_ID, pipeline flow run $PIPELINE_RUN_ID, sweep flow run $SWEEP_RUN_ID," \
    "study $STUDY_ID"

# The browser side: Chromium's DevTools protocol on a pipe (fds 3 and 4), standard library only.
cat >"$WORK/shoot.py" <<'PY'
import base64, fcntl, json, os, subprocess, sys, time

E = os.environ
MLFLOW, PREFECT, OPTUNA = E["MLFLOW"], E["PREFECT"], E["OPTUNA"]
CLOSE_ASSISTANT = "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()"
# The runs table's columns: the attributes to hide and the metrics to show (those the run logged).
COLUMNS = """
const want = {Dataset: false, Models: false, heldout_accuracy: true, best_heldout_accuracy: true, heldout: true,
              test: true, shift_mean: true};
for (const node of document.querySelectorAll('.du-bois-light-tree-treenode')) {
  const title = node.innerText.trim();
  if (title in want && /checkbox-checked/.test(node.className) !== want[title])
    node.querySelector('.du-bois-light-tree-node-content-wrapper').click();
}"""
# One collapsed parent run a time (its expander shows a plus): true while there was one to expand.
EXPAND_ONE = """(() => {
  const plus = [...document.querySelectorAll('button[data-component-id*=runnamecellrenderer]')]
    .find(b => b.innerHTML.includes('V4.5'));
  if (plus) plus.click();
  return !!plus;
})()"""
SHOTS = [
    {
        "file": "mlflow-runs.png",
        "url": f"{MLFLOW}/#/experiments/{E['EXPERIMENT_ID']}/runs?workflowType=machine_learning"
               "&orderByKey=attributes.start_time&orderByAsc=true",
        "wait": f"__has('sweep-{E['EXPERIMENT']}')",
        "steps": [
            {"sleep": 2}, {"run": CLOSE_ASSISTANT}, {"sleep": 1},
            {"run": "__click('button', '^Columns$')"}, {"sleep": 1}, {"run": COLUMNS}, {"sleep": 1},
            {"run": "__click('button', '^Columns$')"}, {"sleep": 1},
            {"repeat": EXPAND_ONE, "times": 6},
            {"wait": "__has('trial-0')"},
        ],
    },
    {
        "file": "mlflow-registry.png",
        "url": f"{MLFLOW}/#/models/{E['EXPERIMENT']}?workflowType=machine_learning",
        "wait": "__has('Version 1', 'champion')",
        "steps": [{"sleep": 1}, {"run": CLOSE_ASSISTANT}],
    },
    {
        "file": "prefect-flow-run.png",
        "url": f"{PREFECT}/runs/flow-run/{E['PIPELINE_RUN_ID']}",
        "wait": "__has('Completed', 'Subflow Runs') && !!document.querySelector('canvas')",
        "steps": [{"sleep": 4}],
    },
    {
        "file": "prefect-sweep-run.png",
        "url": f"{PREFECT}/runs/flow-run/{E['SWEEP_RUN_ID']}",
        "wait": "__has('Completed', 'Parent Run') && !!document.querySelector('canvas')",
        "steps": [{"sleep": 4}],
        "skip": not E["SWEEP_RUN_ID"],
    },
    {
        "file": "optuna-history.png",
        "url": f"{OPTUNA}/dashboard/studies/{E['STUDY_ID']}",
        "wait": "__has('History') && document.querySelectorAll('.js-plotly-plot .main-svg').length > 0",
        "steps": [{"sleep": 2}],
    },
]
HELPERS = r"""
window.__has = (...needles) => needles.every(n => (document.body ? document.body.innerText : '').includes(n));
window.__click = (selector, pattern) => {
  const re = new RegExp(pattern);
  const el = [...document.querySelectorAll(selector)].find(e => re.test((e.innerText || '').trim()));
  if (el) el.click();
  return !!el;
};
true"""


class Browser:
    def __init__(self, argv):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()

        def pipes_as_fds_3_and_4():
            a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        log = open(os.path.join(E["WORK"], "chromium.log"), "ab")
        self.proc = subprocess.Popen([*argv, "--remote-debugging-pipe"], preexec_fn=pipes_as_fds_3_and_4,
                                     close_fds=False, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_r)
        os.close(from_w)
        self.buffer, self.last_id, self.session = b"", 0, None

    def call(self, method, params=None, session=True):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe (see chromium.log)")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression):
        self.call("Runtime.evaluate", {"expression": HELPERS})
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("exception", {}).get("description", "page script failed"))
        return result["result"].get("value")

    def wait(self, condition, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if self.js(condition):
                    return True
            except RuntimeError:
                pass  # the page is still loading
        return False


def main():
    width, height = int(E["WIDTH"]), int(E["HEIGHT"])
    browser = Browser(sys.argv[1:] + [f"--window-size={width},{height}"])
    missing = []
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        attached = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)
        browser.session = attached["sessionId"]
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        for shot in SHOTS:
            if shot.get("skip"):
                print(f"   skipped {shot['file']}")
                continue
            browser.call("Page.navigate", {"url": shot["url"]})
            complete = browser.wait(shot["wait"])
            for step in shot["steps"] if complete else []:
                if "run" in step:
                    browser.js(step["run"])
                if "repeat" in step:
                    for _ in range(step["times"]):
                        if not browser.js(step["repeat"]):
                            break
                        time.sleep(1)
                if "wait" in step:
                    complete = complete and browser.wait(step["wait"], 30)
                time.sleep(step.get("sleep", 0))
            time.sleep(1)
            png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"})["data"])
            path = os.path.join(E["OUT"], shot["file"])
            with open(path, "wb") as out:
                out.write(png)
            note = "" if complete else "   INCOMPLETE: the page never showed what it waits for"
            print(f"   {path} ({len(png) // 1024} KiB) <- {shot['url']}{note}")
            if not complete:
                missing.append(shot["file"])
    finally:
        try:
            browser.call("Browser.close", session=False)
        except Exception:
            pass
        try:
            browser.proc.wait(15)
        except subprocess.TimeoutExpired:
            browser.proc.kill()
    if missing:
        sys.exit(f"incomplete screenshots: {', '.join(missing)}")


main()
PY

SANDBOX=()
((EUID != 0)) || SANDBOX=(--no-sandbox)  # Chromium refuses to run as root with its sandbox
echo "== screenshots into $OUT"
WORK="$WORK" WIDTH="$WIDTH" HEIGHT="$HEIGHT" "$PY" "$WORK/shoot.py" "$CHROMIUM" --headless "${SANDBOX[@]}" \
    --disable-gpu --hide-scrollbars --no-first-run --no-default-browser-check --user-data-dir="$WORK/chromium"
echo "== done in $((SECONDS - started)) s; the run's data stays in $ROOT (rerun with: $0 --reuse $ROOT)"
