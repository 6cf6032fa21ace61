#!/usr/bin/env bash
# `make run`: train on Fashion-MNIST with config/default.json in the background daemon, show live
# progress with mococtl watch, then print the final kNN and linear-probe accuracy and where things are.
# Interrupting (Ctrl-C) stops the daemon cleanly with a checkpoint; running again resumes from it.
set -euo pipefail
BIN=${1:-build/bin}
CONFIG=${MOCOD_CONFIG:-config/default.json}
shift || true
. "$(dirname "$0")/blas-env.sh"

progress=$("$BIN/mocod" -c "$CONFIG" "$@" --print-config | /usr/bin/python3 -c \
  'import json,sys; c=json.load(sys.stdin); print(c["log"]["progress"]); print(c["service"]["socket"]); print(c["checkpoint"]["dir"]); print(c["log"]["file"])')
{ read -r progress_file; read -r socket; read -r ckpt_dir; read -r log_file; } <<<"$progress"

"$BIN/mocod" -c "$CONFIG" "$@" --set service.exit_on_finish=true -d
trap '"$BIN/mococtl" -s "$socket" stop >/dev/null 2>&1 || true; exit 130' INT TERM
"$BIN/mococtl" -s "$socket" watch || true
# The daemon exits on its own after the final evaluation; wait for it so the figures are complete.
for _ in $(seq 600); do [ -S "$socket" ] || break; sleep 1; done

/usr/bin/python3 - "$progress_file" <<'PY'
import json, sys
last = None
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == "eval":
        last = e
if last is None:
    print("no evaluation in", sys.argv[1]); sys.exit(1)
print("\nFashion-MNIST test set, step %d (%s encoder):" % (last["step"], last.get("encoder", "query")))
pct = lambda v: "%.2f%%" % (100 * v) if isinstance(v, (int, float)) else "-"
print("  kNN accuracy (k=%s, T=%s):   %s" % (last.get("knn_k"), last.get("knn_t"), pct(last["knn_acc"])))
if "knn_acc_small" in last:
    print("  kNN accuracy (k=%s, T=%s):   %s" % (last.get("knn_k_small"), last.get("knn_t_small"),
                                               pct(last["knn_acc_small"])))
if last.get("group_acc") is not None:
    print("  confusable group kNN:       %s (k=%s), %s (k=%s)" % (pct(last["group_acc"]), last.get("knn_k"),
                                                              pct(last.get("group_acc_small")),
                                                              last.get("knn_k_small")))
if last.get("probe_acc") is not None:
    print("  linear probe accuracy:      %s" % pct(last["probe_acc"]))
if last.get("recall1") is not None:
    print("  instance retrieval (%d augmented queries, %d originals): recall@1 %s, @10 %s; on embeddings %s, %s"
          % (last["retrieval_queries"], last["retrieval_gallery"], pct(last["recall1"]), pct(last["recall10"]),
             pct(last["recall1_emb"]), pct(last["recall10_emb"])))
PY
echo "  progress log: $progress_file"
echo "  human log:    $log_file"
echo "  checkpoints:  $ckpt_dir/ ($(ls -t "$ckpt_dir" 2>/dev/null | head -1))"
