"""Issue 13 timing: ddkit after the speed-layer refactor (new) vs before it (old, commit 26b6bf9 in a git worktree)
beside the official code (``../shared/refbench/refbench.sh``), one after the other under the bench lock.

Usage (``DDKIT_OLD``: a worktree of the older commit; ``BENCH_OUT``: where run folders and results.jsonl go)::

    flock /tmp/ddkit-bench.lock python benchmarks/bench_issue13.py dm 10 new,old
    flock /tmp/ddkit-bench.lock python benchmarks/bench_issue13.py dc 1 new,old
    flock /tmp/ddkit-bench.lock python benchmarks/bench_issue13.py eval <synset dir> new
ddkit runs as shipped: the CLI with the method's full default budget
(so compile decisions are those of a full run), stopped after N logged iterations; per-iteration seconds from
metrics.jsonl, median after dropping the first WARM iterations."""
import json, os, signal, statistics, subprocess, sys, time
from pathlib import Path

PY = sys.executable
DATA = os.environ.get("DDKIT_DATA_ROOT", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
OUT = Path(os.environ.get("BENCH_OUT", "/tmp/bench_issue13"))
ENTRY = {"new": (["-m", "ddkit"], str(Path(__file__).resolve().parents[1])),
         "old": (["-c", "import sys; from ddkit.cli import main; sys.exit(main())"], os.environ.get("DDKIT_OLD", ""))}


def run_ddkit(version, method, ipc, n, warm, extra=()):
    args, root = ENTRY[version]
    out = OUT / f"{version}_{method}{ipc}_{int(time.time())}"
    cmd = [PY, *args, "distill", "--method", method, "--dataset", "fashion-mnist", "--ipc", str(ipc),
           "--data-root", DATA, "--out", str(out), "--no-progress", "--set", "engine.grid_every=0",
           "--set", "engine.checkpoint_every=0", *extra]
    env = {**os.environ, "PYTHONPATH": root}
    t0 = time.time()
    p = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=root, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    while p.poll() is None:
        time.sleep(2)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            os.killpg(p.pid, signal.SIGINT)
            break
    _, err = p.communicate(timeout=600)
    rss = [l for l in err.splitlines() if "Maximum resident" in l]
    secs = [json.loads(l)["seconds"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
    med = statistics.median(secs[warm:]) if len(secs) > warm else float("nan")
    rec = {"version": version, "method": method, "ipc": ipc, "n": len(secs), "warm": warm,
           "median_s": med, "seconds": secs, "peak_rss_mib": int(rss[0].split()[-1]) / 1024 if rss else None,
           "wall_s": time.time() - t0, "out": str(out)}
    print(json.dumps({k: v for k, v in rec.items() if k != "seconds"}), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def run_eval(version, synset, epochs=300):
    args, root = ENTRY[version]
    cmd = [PY, *args, "evaluate", synset, "--models", "convnet", "--runs", "1", "--epochs", str(epochs),
           "--data-root", DATA]
    env = {**os.environ, "PYTHONPATH": root}
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=root, env=env, capture_output=True, text=True)
    rss = [l for l in p.stderr.splitlines() if "Maximum resident" in l]
    rec = {"version": version, "method": "evaluate", "synset": synset, "wall_s": time.time() - t0,
           "peak_rss_mib": int(rss[0].split()[-1]) / 1024 if rss else None, "rc": p.returncode,
           "tail": p.stdout[-300:] + p.stderr[-600:]}
    print(json.dumps(rec), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    what = sys.argv[1]
    if what == "dm":
        ipc = int(sys.argv[2])
        for v in sys.argv[3].split(","):
            run_ddkit(v, "dm", ipc, n=14, warm=4)
    elif what in ("dc", "dsa"):
        for v in sys.argv[3].split(","):
            run_ddkit(v, what, int(sys.argv[2]), n=9, warm=3)
    elif what == "eval":
        for v in sys.argv[3].split(","):
            run_eval(v, sys.argv[2])
