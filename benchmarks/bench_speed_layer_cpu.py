"""Issue 13 harness (python benchmarks/bench_speed_layer_cpu.py TAG METHOD IPC N WARM [eager]; run as a script, PYTHONPATH selects the
code version, e.g. a git worktree of an older commit): N iterations of METHOD at IPC through the Python API (the method's full default budget, so the
speed decisions are those of a full run), per-iteration wall and process-CPU seconds; works on the old and new
code (PYTHONPATH selects which)."""
import json, statistics, sys, time

import ddkit
from ddkit.engine import Callback

try:
    from ddkit.accel import keep_freed_memory
except ImportError:  # before the speed layer
    from ddkit.engine import keep_freed_memory


class Stop(Exception):
    pass


class Clock(Callback):
    def __init__(self, n):
        self.n, self.rows = n, []
        self.last = (time.perf_counter(), time.process_time())

    def on_start(self, run):
        self.last = (time.perf_counter(), time.process_time())

    def on_iteration_end(self, run):
        now = (time.perf_counter(), time.process_time())
        self.rows.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now
        if len(self.rows) >= self.n:
            raise Stop


def main():
    tag, method, ipc, n, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    eager = len(sys.argv) > 6 and sys.argv[6] == "eager"
    if eager:  # one thread, a run too short to compile under either version's rule: CPU time per iteration
        import torch
        torch.set_num_threads(1)
    keep_freed_memory()
    real = ddkit.load_dataset("fashion-mnist", "/work/shared/data")
    clock = Clock(n)
    budget = n if eager else {"dm": 20000, "dc": 1000, "dsa": 1000}[method]
    t0 = time.perf_counter()
    try:
        ddkit.distill(real, method, ipc, iterations=budget, seed=0, device="cpu", callbacks=[clock])
    except Stop:
        pass
    wall = [w for w, _ in clock.rows[warm:]]
    cpu = [c for _, c in clock.rows[warm:]]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    rec = {"tag": tag, "method": method, "ipc": ipc, "n": len(clock.rows), "warm": warm,
           "wall_median": statistics.median(wall), "cpu_median": statistics.median(cpu),
           "first_wall": clock.rows[0][0], "total_s": time.perf_counter() - t0, "load_end": load,
           "wall": [round(w, 3) for w, _ in clock.rows], "cpu": [round(c, 3) for _, c in clock.rows]}
    print(json.dumps(rec), flush=True)
    from pathlib import Path

    work = Path(__file__).resolve().parent / "_work"
    work.mkdir(exist_ok=True)
    with open(work / "speed_layer_cpu.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
