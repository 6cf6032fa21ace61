#!/usr/bin/env python3
"""Runs several mocod configs with the same budget and seeds, and prints the results table (markdown).

    scripts/experiments.py                                  # every config, seeds 1,2,3, the configs' own budget
    scripts/experiments.py --steps 2000 --configs all,hardest --seeds 1,2
    scripts/experiments.py --table-only                     # only re-read the logs of earlier runs

Each run is the real daemon in the foreground, from scratch, with its own files in OUT/NAME/seed-S/:
    build/bin/mocod -c CONFIG --no-resume --set seed=S --set log.progress=D/progress.jsonl
                    --set log.file=D/mocod.log --set checkpoint.dir=D/checkpoint
                    --set service.socket=D/mocod.sock --set service.pid_file=D/mocod.pid
                    --set service.exit_on_finish=true
                    [--set optim.steps=STEPS | --set optim.epochs=EPOCHS] [--set ...]
which trains until the budget is spent and then exits (a daemon still up FINISH_GRACE seconds after its
"finished" event is stopped with SIGTERM). A config NAME is the file config/exp-NAME.json,
else config/NAME.json (with the aliases all = moco, hardest = default, in-batch = simclr), else a path.
The figures are the kNN and linear-probe accuracy of the run's final evaluation (the {"event":"eval"}
with "reason":"finish", on every sample) in its progress log. A run whose
directory holds a finished log (`done` marker) is not run again, so an interrupted sweep resumes.
Standard library only: runs on the machine that runs mocod.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# Negatives strategies of issue 6, in the order of the README table.
DEFAULT_CONFIGS = ["random", "all", "hardest", "semi-hard", "hcl", "mixing", "curriculum", "dynamic",
                   "in-batch", "triplet"]
LABELS = {
    "random": "random negatives",
    "all": "all queue negatives (plain MoCo)",
    "hardest": "hardest negatives",
    "semi-hard": "semi-hard negatives",
    "hcl": "HCL (hardness-weighted)",
    "mixing": "mixing (synthetic hard negatives)",
    "curriculum": "curriculum hardness",
    "dynamic": "dynamic hardness",
    "in-batch": "in-batch only (SimCLR-style NT-Xent)",
    "triplet": "triplet",
}
# Strategy names of the table -> the config file names under config/ where they differ.
ALIASES = {"all": "moco", "hardest": "default", "in-batch": "simclr"}
# Raw pixels under the same protocols (shared/REFERENCE.md for the kNN monitor; the probe figure is the
# same multinomial logistic regression on the 784 raw pixels). Override with --baseline-knn/--baseline-probe.
BASELINE_KNN = 78.9
BASELINE_PROBE = 84.7


def config_path(name):
    alias = ALIASES.get(name, name)
    for p in ("config/exp-%s.json" % name, "config/%s.json" % name, "config/%s.json" % alias, name):
        if os.path.isfile(p):
            return p
    return None


def run_name(name):
    base = os.path.basename(name)
    for suffix in (".json",):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
    return base[4:] if base.startswith("exp-") else base


def read_events(path):
    """The JSON objects of a progress log; lines that do not parse (a run killed mid-write) are skipped."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                events.append(ev)
    return events


def as_percent(v):
    """mocod logs accuracies as fractions; accept percentages too."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    return 100.0 * v if v <= 1.0 else float(v)


def final_figures(path):
    """(knn %, probe %, step) of the run's final evaluation (reason "finish", on every sample); None where
    the log has none yet. Periodic evaluations are left out: they use the eval.train_limit / eval.limit
    subsets, so a run that has not finished is reported missing, not with a subset figure."""
    knn = probe = step = None
    for ev in read_events(path):
        if ev.get("event") != "eval" or ev.get("reason") != "finish":
            continue
        knn, probe, step = as_percent(ev.get("knn_acc")), as_percent(ev.get("probe_acc")), ev.get("step")
    return knn, probe, step


def mean_std(xs):
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt(m, s):
    if m is None:
        return "–"
    return "%.1f" % m if s is None else "%.1f ± %.1f" % (m, s)


FINISH_GRACE = 30


def finished(log):
    """True once the progress log holds the daemon's {"event":"finished"}."""
    try:
        return any(ev.get("event") == "finished" for ev in read_events(log))
    except OSError:
        return False


def stop(proc):
    proc.terminate()
    try:
        return proc.wait(timeout=FINISH_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_run(proc, log, timeout):
    """Waits for one daemon: (exit status, None) when it ends by itself or lingers after finishing;
    (status, reason) when it had to be stopped for the --timeout."""
    t0, done_at = time.time(), None
    while True:
        try:
            return proc.wait(timeout=2), None
        except subprocess.TimeoutExpired:
            pass
        if timeout and time.time() - t0 > timeout:
            return stop(proc), "timed out after %d s" % timeout
        if done_at is None and finished(log):
            done_at = time.time()
        if done_at is not None and time.time() - done_at > FINISH_GRACE:
            stop(proc)  # finished but still serving: the run is complete
            return 0, None


def run_dir(out, name, seed):
    return os.path.join(out, run_name(name), "seed-%d" % seed)


def run_one(a, name, seed):
    """Runs one config and seed to the end; returns (name, seed, ok, message)."""
    cfg = config_path(name)
    d = run_dir(a.out, name, seed)
    done = os.path.join(d, "done")
    if os.path.exists(done) and not a.force:
        return name, seed, True, "kept (done)"
    if cfg is None:
        return name, seed, False, "no config file config/exp-%s.json, config/%s.json or %s" % (name, name, name)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "progress.jsonl")
    if os.path.exists(log):
        os.remove(log)  # a run that did not finish starts over (--no-resume)
    # Every file of the run in its own directory, so runs can share the machine (--jobs) and a run never
    # resumes another's checkpoint.
    cmd = [a.mocod, "-c", cfg, "--no-resume", "--set", "seed=%d" % seed,
           "--set", "%s=%s" % (a.progress_key, log),
           "--set", "log.file=" + os.path.join(d, "mocod.log"),
           "--set", "checkpoint.dir=" + os.path.join(d, "checkpoint"),
           "--set", "service.socket=" + os.path.join(d, "mocod.sock"),
           "--set", "service.pid_file=" + os.path.join(d, "mocod.pid"),
           "--set", "service.exit_on_finish=true"]
    if a.steps:
        cmd += ["--set", "optim.steps=%d" % a.steps]
    elif a.epochs:
        cmd += ["--set", "optim.epochs=%d" % a.epochs]
    for kv in a.set:
        cmd += ["--set", kv]
    if a.dry_run:
        return name, seed, True, " ".join(cmd)
    t0 = time.time()
    with open(os.path.join(d, "stdout.log"), "wb") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as e:
            return name, seed, False, "cannot start %s: %s" % (a.mocod, e)
        rc, why = wait_run(proc, log, a.timeout)
    took = time.time() - t0
    if why:
        return name, seed, False, "%s after %.0f s (see %s/stdout.log, mocod.log)" % (why, took, d)
    if rc != 0:
        return name, seed, False, "mocod exited with %d after %.0f s (see %s/stdout.log, mocod.log)" % (rc, took, d)
    knn, _, _ = final_figures(log) if os.path.exists(log) else (None, None, None)
    if knn is None:
        return name, seed, False, "no final eval event with knn_acc in %s" % log
    with open(done, "w") as f:
        f.write("%.1f s\n" % took)
    return name, seed, True, "done in %.0f s" % took


def table(a, names, seeds):
    lines = ["| config | kNN accuracy % | linear probe % | seeds | steps |",
             "| --- | --- | --- | --- | --- |"]
    missing = []
    for name in names:
        knns, probes, steps = [], [], set()
        for seed in seeds:
            log = os.path.join(run_dir(a.out, name, seed), "progress.jsonl")
            if not os.path.exists(log):
                missing.append("%s seed %d" % (name, seed))
                continue
            knn, probe, step = final_figures(log)
            if knn is None:
                missing.append("%s seed %d" % (name, seed))
                continue
            knns.append(knn)
            if probe is not None:
                probes.append(probe)
            if step is not None:
                steps.add(step)
        label = LABELS.get(run_name(name), run_name(name))
        lines.append("| %s | %s | %s | %d | %s |" % (label, fmt(*mean_std(knns)), fmt(*mean_std(probes)),
                                                    len(knns), ",".join(str(s) for s in sorted(steps)) or "–"))
    lines.append("| raw pixels (no training) | %s | %s | – | – |"
                 % (fmt(a.baseline_knn, None), fmt(a.baseline_probe, None)))
    return "\n".join(lines), missing


def blas_environment():
    """OPENBLAS_CORETYPE as scripts/blas-env.sh chooses it (one place decides; without it OpenBLAS may run
    its SSE3 kernels on virtual CPUs, about 5x slower), set in this process for the runs it starts."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["bash", "-c", '. "$1"; printf %s "${OPENBLAS_CORETYPE:-}"', "-",
                          os.path.join(here, "blas-env.sh")], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout:
        os.environ["OPENBLAS_CORETYPE"] = out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated config names or paths (default: the ten strategies)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--steps", type=int, default=0, help="budget in steps for every run (optim.steps)")
    ap.add_argument("--epochs", type=int, default=0, help="budget in epochs for every run (optim.epochs)")
    ap.add_argument("--progress-key", default="log.progress", help="config key of the progress-log path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (repeatable)")
    ap.add_argument("--mocod", default="build/bin/mocod")
    ap.add_argument("--out", default="run/experiments", help="one directory per config and seed below it")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each mocod uses its own threads)")
    ap.add_argument("--timeout", type=int, default=0, help="seconds per run, 0 = none")
    ap.add_argument("--force", action="store_true", help="rerun runs that finished before")
    ap.add_argument("--table-only", action="store_true", help="run nothing, tabulate the logs in --out")
    ap.add_argument("--dry-run", action="store_true", help="print the mocod command lines only")
    ap.add_argument("--baseline-knn", type=float, default=BASELINE_KNN)
    ap.add_argument("--baseline-probe", type=float, default=BASELINE_PROBE)
    a = ap.parse_args()

    names = [c for c in a.configs.split(",") if c]
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        ap.error("--seeds: %r, want comma-separated integers" % a.seeds)
    for kv in a.set:
        if "=" not in kv:
            ap.error("--set: %r, want KEY=VALUE" % kv)
    if not names or not seeds:
        ap.error("need at least one config and one seed")

    blas_environment()
    failed = []
    if not a.table_only:
        if not a.dry_run and not os.access(a.mocod, os.X_OK):
            print("experiments: %s is not an executable (build it with `make`)" % a.mocod, file=sys.stderr)
            return 1
        jobs = [(n, s) for n in names for s in seeds]
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            for i, (name, seed, ok, msg) in enumerate(pool.map(lambda j: run_one(a, *j), jobs), 1):
                print("[%d/%d] %s seed %d: %s" % (i, len(jobs), name, seed, msg), file=sys.stderr, flush=True)
                if not ok:
                    failed.append("%s seed %d: %s" % (name, seed, msg))
        if a.dry_run:
            return 0

    text, missing = table(a, names, seeds)
    budget = ("%d steps" % a.steps if a.steps else "%d epochs" % a.epochs if a.epochs
              else "each config's own budget")
    print("Fashion-MNIST test accuracy, %s, seeds %s (mean ± sample std over seeds); kNN: cosine, "
          "weighted, on backbone features.\n" % (budget, ",".join(map(str, seeds))))
    print(text)
    if missing:
        print("\nmissing runs: " + ", ".join(missing))
    for f in failed:
        print("experiments: failed: " + f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
