#!/usr/bin/env python3
"""Runs several mocod configs with the same budget and seeds; writes the results (JSON), a markdown table,
a verdict against plain MoCo and plots.

    scripts/experiments.py --grid screening --parallel 16          # issue 17's grid: 15 configs x 3 seeds x 2 epochs
    scripts/experiments.py --grid screening --parallel 16 --data-dir /path/to/fashion-mnist
    scripts/experiments.py --configs all,hardest --seeds 1 --steps 40 --parallel 2   # a smoke run
    scripts/experiments.py --grid screening --table-only          # only re-read the logs of earlier runs

Each run is the real daemon in the foreground, from scratch, with its own files in OUT/NAME/seed-S/:
    build/bin/mocod -c CONFIG --no-resume --set seed=S --set log.progress=D/progress.jsonl
                    --set log.file=D/mocod.log --set checkpoint.dir=D/checkpoint
                    --set service.socket=D/mocod.sock --set service.pid_file=D/mocod.pid
                    --set service.exit_on_finish=true
                    [--set optim.steps=STEPS | --set optim.epochs=EPOCHS] [--set ...]
which trains until the budget is spent and then exits (a daemon still up FINISH_GRACE seconds after its
"finished" event is stopped with SIGTERM). A config NAME is the file config/exp-NAME.json,
else config/NAME.json (with the aliases all = moco, hardest = default, in-batch = simclr,
guard-positives = guards), else a path. --parallel N runs N daemons at once with threads=1 and
data.workers=1 each (one core per run); --jobs N runs N at once with the configs' own threads.

The figures come from the run's final evaluation (the {"event":"eval"} with "reason":"finish", on every
sample): kNN under both protocols (k 200, T 0.1 and k 20, T 0.07), the linear probe, instance retrieval
recall@1/@10 (backbone features and embeddings), the confusable group's kNN accuracy, and from the last
progress events the false-negative rate, the hardness and the instance accuracy at the end. A run whose
directory holds a finished log (`done` marker) is not run again, so an interrupted sweep resumes.

Writes into OUT: results.json (every run's figures and each config's mean and sample std), table.md (the
table and the verdict), and with gnuplot installed curves.png (scripts/plot_progress.sh on seed 1 of
every config) and controller.png (the dynamic controller's hardness and signal over steps).
Standard library only: runs on any machine that has python3 and the built binaries.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# Negatives strategies of issue 6 and the false-negative guards of issue 17, in the order of the README table.
DEFAULT_CONFIGS = ["random", "all", "hardest", "semi-hard", "hcl", "mixing", "curriculum", "dynamic",
                   "in-batch", "triplet"]
GRIDS = {
    # Issue 17's screening grid: every strategy, and the guards on the hardest 1,024 at equal hardness
    # (hardest itself is the unguarded row; band takes 1,024 below the top 2%).
    "screening": {"configs": ["all", "random", "hardest", "semi-hard", "band", "mixing", "adversarial",
                              "curriculum", "dynamic", "in-batch", "hcl", "triplet", "guard-ceiling",
                              "guard-skip", "guard-positives"],
                  "seeds": "1,2,3", "epochs": 2, "set": ["eval.every_steps=117", "log.every_steps=10"]},
    # The default budget for plain MoCo and the configs named with --configs (the best three of the screening).
    "default-budget": {"configs": ["all"], "seeds": "1,2,3", "epochs": 12, "set": ["log.every_steps=10"]},
    # Recipe changes for the default job's targets (kNN >= 88% at k=200, >= 90.5% at k=20, probe >= 91%
    # within 10 minutes on 2 cores): the default job, one change each at its own budget, and the symmetric
    # loss again at the default's compute. Run with
    # --jobs 8 --set threads=2 on 16 cores (each run then sees the 2 cores of the target machine).
    "recipe": {"configs": ["hardest", "recipe-t0.2", "recipe-t0.05", "recipe-symmetric", "recipe-crop0.3",
                           "recipe-queue16k-all", "recipe-embed256", "recipe-momentum0.996",
                           "recipe-symmetric-6ep"],
               "seeds": "1", "epochs": 12, "set": ["eval.every_steps=0"]},
}
# Named variants: a config plus overrides, for grids that change one thing at a time.
VARIANTS = {
    "recipe-t0.2": ("hardest", ["contrast.temperature=0.2"]),
    "recipe-t0.05": ("hardest", ["contrast.temperature=0.05"]),
    "recipe-symmetric": ("hardest", ["contrast.symmetric=true"]),
    "recipe-crop0.3": ("hardest", ["views.crop_scale_min=0.3"]),
    "recipe-queue16k-all": ("all", ["contrast.queue_size=16384"]),
    "recipe-embed256": ("hardest", ["model.embed_dim=256"]),
    "recipe-momentum0.996": ("hardest", ["contrast.momentum=0.996"]),
    # The symmetric loss computes both encoders on both views, about 1.8x a step: at equal compute it
    # gets half the epochs.
    "recipe-symmetric-6ep": ("hardest", ["contrast.symmetric=true", "optim.epochs=6"]),
}
LABELS = {
    "random": "random negatives",
    "all": "all queue negatives (plain MoCo)",
    "hardest": "hardest 1,024 (no guard)",
    "semi-hard": "semi-hard negatives",
    "band": "band (ranks 2-27%)",
    "hcl": "HCL (hardness-weighted)",
    "mixing": "mixing (synthetic hard negatives)",
    "adversarial": "adversarial (AdCo bank)",
    "curriculum": "curriculum hardness",
    "dynamic": "dynamic hardness (neg_sim)",
    "in-batch": "in-batch only (SimCLR-style NT-Xent)",
    "triplet": "triplet",
    "guard-ceiling": "hardest + ceiling (s > s_pos)",
    "guard-skip": "hardest + skip top 1%",
    "guard-positives": "hardest + top 1% as positives",
}
# Strategy names of the table -> the config file names under config/ where they differ.
ALIASES = {"all": "moco", "hardest": "default", "in-batch": "simclr", "guard-positives": "guards"}
# The figures of a run, as the columns of the table: (key in results, header, percent?).
MEASURES = [("knn", "kNN k=200 %", True), ("knn_small", "kNN k=20 %", True), ("probe", "probe %", True),
            ("recall1", "R@1 %", True), ("recall10", "R@10 %", True), ("recall1_emb", "R@1 emb %", True),
            ("group", "group kNN %", True), ("fn_rate", "fn_rate", False), ("hardness", "hardness", False)]
# Measures on which issue 17 asks whether a hard-negative config beats plain MoCo by >= 1 point.
VERDICT_MEASURES = ["recall1", "group", "group_small"]
# Data files a run reads from data.dir (the Fashion-MNIST gz files, ~30 MB).
DATA_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"]
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
# Raw pixels under the same protocols (shared/REFERENCE.md for the kNN monitor; the probe figure is the
# same multinomial logistic regression on the 784 raw pixels). Override with --baseline-knn/--baseline-probe.
BASELINE_KNN = 78.9
BASELINE_PROBE = 84.7
# Raw pixels under the small-k protocol (k 20, T 0.07), as issue 17 measured them.
BASELINE_KNN_SMALL = 84.6


def config_path(name):
    if name in VARIANTS:
        return config_path(VARIANTS[name][0])
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
    """The figures of the run's final evaluation (reason "finish", on every sample) and of its last
    progress events, as a dict (percent for accuracies and recalls); {} where the log has no final
    evaluation yet. Periodic evaluations are left out: they use the eval.train_limit / eval.limit
    subsets, so a run that has not finished is reported missing, not with a subset figure."""
    events = read_events(path)
    last = None
    for ev in events:
        if ev.get("event") == "eval" and ev.get("reason") == "finish":
            last = ev
    if last is None:
        return {}
    fig = {"step": last.get("step")}
    for key, field in (("knn", "knn_acc"), ("knn_small", "knn_acc_small"), ("probe", "probe_acc"),
                       ("recall1", "recall1"), ("recall10", "recall10"), ("recall1_emb", "recall1_emb"),
                       ("recall10_emb", "recall10_emb"), ("group", "group_acc"),
                       ("group_small", "group_acc_small")):
        fig[key] = as_percent(last.get(field))
    # The state at the end of training: the mean of the last FINAL_WINDOW progress events.
    prog = [ev for ev in events if ev.get("event") == "progress"][-FINAL_WINDOW:]
    for key in ("fn_rate", "hardness", "inst_acc", "neg_sim"):
        xs = [ev[key] for ev in prog if isinstance(ev.get(key), (int, float))]
        fig[key] = sum(xs) / len(xs) if xs else None
    return fig


FINAL_WINDOW = 5


def mean_std(xs):
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt(m, s, digits=1):
    if m is None:
        return "–"
    f = "%%.%df" % digits
    return f % m if s is None else (f + " ± " + f) % (m, s)


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
    for kv in a.set + VARIANTS.get(name, (None, []))[1]:
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
    knn = final_figures(log).get("knn") if os.path.exists(log) else None
    if knn is None:
        return name, seed, False, "no final eval event with knn_acc in %s" % log
    with open(done, "w") as f:
        f.write("%.1f s\n" % took)
    return name, seed, True, "done in %.0f s" % took


def label(name):
    """The table's name of a config; a variant is its config's plus its overrides."""
    if name in VARIANTS:
        base, sets = VARIANTS[name]
        return "%s + %s" % (LABELS.get(base, base), ", ".join(sets))
    return LABELS.get(name, name)


def collect(a, names, seeds):
    """{name: {"runs": {seed: figures}, "mean": {measure: m}, "std": {measure: s}}} and the missing runs."""
    results, missing = {}, []
    for name in names:
        runs = {}
        for seed in seeds:
            log = os.path.join(run_dir(a.out, name, seed), "progress.jsonl")
            fig = final_figures(log) if os.path.exists(log) else {}
            if fig.get("knn") is None:
                missing.append("%s seed %d" % (name, seed))
                continue
            runs[seed] = fig
        keys = sorted({k for f in runs.values() for k, v in f.items() if isinstance(v, (int, float))})
        stats = {k: mean_std([f[k] for f in runs.values() if isinstance(f.get(k), (int, float))]) for k in keys}
        results[run_name(name)] = {"label": label(run_name(name)), "runs": runs,
                                   "mean": {k: v[0] for k, v in stats.items()},
                                   "std": {k: v[1] for k, v in stats.items()}}
    return results, missing


def table(a, results):
    head = "| config | " + " | ".join(h for _, h, _ in MEASURES) + " | seeds |"
    lines = [head, "|" + " --- |" * (len(MEASURES) + 2)]
    for name, r in results.items():
        cells = [fmt(r["mean"].get(k), r["std"].get(k), 1 if pct else 3) for k, _, pct in MEASURES]
        lines.append("| %s | %s | %d |" % (r["label"], " | ".join(cells), len(r["runs"])))
    base = {"knn": a.baseline_knn, "knn_small": BASELINE_KNN_SMALL, "probe": a.baseline_probe}
    lines.append("| raw pixels (no training) | " + " | ".join(fmt(base.get(k), None) for k, _, _ in MEASURES)
                 + " | – |")
    return "\n".join(lines)


def verdict(results, reference="all"):
    """Issue 17's question: which config beats plain MoCo by >= 1 point on retrieval recall@1 or the
    confusable group, mean of the seeds, with the difference beyond two standard errors of the
    difference of the means (each side's sample std / sqrt(seeds))."""
    ref = results.get(reference)
    if not ref or len(ref["runs"]) < 2:
        return ["no verdict: plain MoCo (%s) needs at least two finished seeds" % reference]
    out, winners = [], []
    for name, r in results.items():
        if name == reference or len(r["runs"]) < 2:
            continue
        for k in VERDICT_MEASURES:
            m, s, m0, s0 = r["mean"].get(k), r["std"].get(k), ref["mean"].get(k), ref["std"].get(k)
            if None in (m, s, m0, s0):
                continue
            se = math.sqrt(s * s / len(r["runs"]) + s0 * s0 / len(ref["runs"]))
            d = m - m0
            if d >= 1.0 and d > 2 * se:
                winners.append("%s beats plain MoCo on %s by %.1f points (2 s.e. = %.1f)" % (name, k, d, 2 * se))
    if winners:
        out += winners
    else:
        out.append("no configuration beats plain MoCo by >= 1 point beyond two standard errors on %s"
                   % ", ".join(VERDICT_MEASURES))
    return out


def plots(a, results, seeds):
    """curves.png (seed 1 of every config) and controller.png (the dynamic runs' hardness and signal);
    skipped, with a note, without gnuplot."""
    if not shutil.which("gnuplot"):
        return ["plots skipped: gnuplot not found"]
    notes, here = [], os.path.dirname(os.path.abspath(__file__))
    seed = seeds[0]
    logs = [os.path.join(run_dir(a.out, n, seed), "progress.jsonl") for n in results]
    logs = [l for l in logs if os.path.exists(l)]
    if logs:
        png = os.path.join(a.out, "curves.png")
        r = subprocess.run(["bash", os.path.join(here, "plot_progress.sh"), "-s", "3", "-o", png,
                            "-t", "seed %d, every config" % seed] + logs, capture_output=True, text=True)
        notes.append("wrote " + png if r.returncode == 0 else "curves.png failed: " + r.stderr.strip())
    dyn = [(s, os.path.join(run_dir(a.out, "dynamic", s), "progress.jsonl")) for s in seeds]
    dyn = [(s, l) for s, l in dyn if os.path.exists(l)]
    if dyn:
        png = os.path.join(a.out, "controller.png")
        data = []
        for s, log in dyn:
            path = os.path.join(a.out, "controller-seed-%d.dat" % s)
            with open(path, "w") as f:
                for ev in read_events(log):
                    if ev.get("event") == "progress":
                        f.write("%s %s %s %s\n" % (ev.get("step"), ev.get("hardness"), ev.get("neg_sim"),
                                                   ev.get("fn_rate") if ev.get("fn_rate") is not None else "?"))
            data.append((s, path))
        plot = ["set terminal pngcairo noenhanced size 1000,700", "set output '%s'" % png, "set multiplot layout 3,1",
                "set key outside right center", "set xlabel 'step'"]
        for col, what in ((2, "hardness"), (3, "neg_sim (signal)"),
                          (4, "false-negative rate")):
            plot.append("set ylabel '%s'" % what)
            plot.append("plot " + ", ".join("'%s' using 1:%d with lines title 'seed %d'" % (p, col, s)
                                            for s, p in data))
        plot.append("unset multiplot")
        r = subprocess.run(["gnuplot"], input="\n".join(plot), capture_output=True, text=True)
        notes.append("wrote " + png if r.returncode == 0 else "controller.png failed: " + r.stderr.strip())
    return notes


def blas_environment():
    """OPENBLAS_CORETYPE as scripts/blas-env.sh chooses it (one place decides; without it OpenBLAS may run
    its SSE3 kernels on virtual CPUs, about 5x slower), set in this process for the runs it starts."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["bash", "-c", '. "$1"; printf %s "${OPENBLAS_CORETYPE:-}"', "-",
                          os.path.join(here, "blas-env.sh")], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout:
        os.environ["OPENBLAS_CORETYPE"] = out.stdout


def check_data(a, names):
    """The data directory every run reads (--data-dir, else the configs' own data.dir): say which files
    are missing before starting dozens of runs that would each fail on them."""
    d = a.data_dir or DEFAULT_DATA_DIR
    missing = [f for f in DATA_FILES if not os.path.isfile(os.path.join(d, f))]
    if missing and not a.data_dir and not os.path.isdir(d):
        return ("no Fashion-MNIST in %s: pass --data-dir DIR holding %s (~30 MB, Debian's "
                "dataset-fashion-mnist installs them there)" % (d, ", ".join(DATA_FILES)))
    if missing:
        return "%s lacks %s" % (d, ", ".join(missing))
    return None


def check_binary(a, names):
    """mocod starts and reads the first config (a missing shared library or a config error shows here,
    once, instead of in every run's stdout.log)."""
    cfg = config_path(names[0])
    if cfg is None:
        return None
    cmd = [a.mocod, "-c", cfg, "--print-config"] + [x for kv in a.set for x in ("--set", kv)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return "%s does not start: %s" % (" ".join(cmd), (r.stderr or r.stdout).strip()[-2000:])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--grid", choices=sorted(GRIDS), help="a preset: configs, seeds, budget and overrides "
                    "(explicit --configs/--seeds/--steps/--epochs win)")
    ap.add_argument("--configs", help="comma-separated config names or paths (default: the ten strategies)")
    ap.add_argument("--seeds")
    ap.add_argument("--steps", type=int, default=0, help="budget in steps for every run (optim.steps)")
    ap.add_argument("--epochs", type=int, default=0, help="budget in epochs for every run (optim.epochs)")
    ap.add_argument("--progress-key", default="log.progress", help="config key of the progress-log path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (repeatable)")
    ap.add_argument("--data-dir", help="directory of the Fashion-MNIST .gz files (data.dir for every run)")
    ap.add_argument("--mocod", default="build/bin/mocod")
    ap.add_argument("--out", default="run/experiments", help="one directory per config and seed below it")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each mocod uses its own threads)")
    ap.add_argument("--parallel", type=int, default=0,
                    help="runs at once, each on one core (threads=1, data.workers=1); overrides --jobs")
    ap.add_argument("--timeout", type=int, default=0, help="seconds per run, 0 = none")
    ap.add_argument("--force", action="store_true", help="rerun runs that finished before")
    ap.add_argument("--table-only", action="store_true", help="run nothing, tabulate the logs in --out")
    ap.add_argument("--dry-run", action="store_true", help="print the mocod command lines only")
    ap.add_argument("--baseline-knn", type=float, default=BASELINE_KNN)
    ap.add_argument("--baseline-probe", type=float, default=BASELINE_PROBE)
    a = ap.parse_args()

    grid = GRIDS.get(a.grid, {})
    names = [c for c in (a.configs or ",".join(grid.get("configs", DEFAULT_CONFIGS))).split(",") if c]
    seeds_text = a.seeds or grid.get("seeds", "1,2,3")
    if not a.steps and not a.epochs:
        a.epochs = grid.get("epochs", 0)
    a.set = grid.get("set", []) + a.set
    if a.data_dir:
        a.set.append("data.dir=" + os.path.abspath(a.data_dir))
    if a.parallel > 0:
        a.jobs = a.parallel
        a.set += ["threads=1", "data.workers=1"]
    try:
        seeds = [int(x) for x in seeds_text.split(",") if x]
    except ValueError:
        ap.error("--seeds: %r, want comma-separated integers" % seeds_text)
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
        problem = None if a.dry_run else check_data(a, names) or check_binary(a, names)
        if problem:
            print("experiments: " + problem, file=sys.stderr)
            return 1
        jobs = [(n, s) for s in seeds for n in names]  # seed-major: every config has seed 1 early
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            for i, (name, seed, ok, msg) in enumerate(pool.map(lambda j: run_one(a, *j), jobs), 1):
                print("[%d/%d %.0fs] %s seed %d: %s" % (i, len(jobs), time.time() - t0, name, seed, msg),
                      file=sys.stderr, flush=True)
                if not ok:
                    failed.append("%s seed %d: %s" % (name, seed, msg))
        if a.dry_run:
            return 0

    results, missing = collect(a, names, seeds)
    budget = ("%d steps" % a.steps if a.steps else "%d epochs" % a.epochs if a.epochs
              else "each config's own budget")
    text = ["Fashion-MNIST test set, %s, seeds %s (mean ± sample std over seeds). kNN: cosine, weighted, on "
            "backbone features (k=200 T=0.1 and k=20 T=0.07); R@k: instance retrieval recall (augmented test "
            "image -> its original among the test split), backbone features and embeddings (emb); group: "
            "kNN k=200 accuracy on the confusable classes (eval.groups); fn_rate, hardness: mean of the last "
            "%d progress events.\n" % (budget, ",".join(map(str, seeds)), FINAL_WINDOW), table(a, results), ""]
    text += ["- " + v for v in verdict(results)]
    if missing:
        text.append("\nmissing runs: " + ", ".join(missing))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"budget": budget, "seeds": seeds, "configs": results, "missing": missing}, f, indent=1)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    for note in plots(a, results, seeds):
        print(note, file=sys.stderr)
    for f in failed:
        print("experiments: failed: " + f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
