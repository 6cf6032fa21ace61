#!/usr/bin/env bash
# Draws mocod training curves from progress logs (JSON lines) as one PNG with six panels:
# loss, instance accuracy, kNN accuracy (and linear-probe accuracy where logged), false-negative rate,
# hardness (the control value, with the mean similarity of the negatives used), learning rate, over steps. Several logs draw one line each, for comparisons.
#
#   scripts/plot_progress.sh [-o OUT.png] [-t TITLE] [-s SMOOTH] PROGRESS.jsonl [MORE.jsonl ...]
#
# Reads the events {"event":"progress","step":..,"loss":..,"inst_acc":..,"fn_rate":..,"hardness":..,"neg_sim":..,"lr":..}
# and {"event":"eval","step":..,"knn_acc":..,"probe_acc":..}; other events and missing fields are skipped.
# SMOOTH (default 1: off) averages the progress figures over that many consecutive events.
# Needs gnuplot (Debian: gnuplot-nox, installed by `MOCOD_EXTRAS=1 scripts/install-deps.sh`) and awk, so
# it runs on a machine without Python. mocod writes flat JSON objects, one per line, which awk can read.
set -euo pipefail

usage() { echo "usage: $0 [-o OUT.png] [-t TITLE] [-s SMOOTH] PROGRESS.jsonl [MORE.jsonl ...]" >&2; exit 2; }

out="progress.png"
title=""
smooth=1
while getopts "o:t:s:h" opt; do
  case $opt in
    o) out=$OPTARG ;;
    t) title=$OPTARG ;;
    s) smooth=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
[[ $smooth =~ ^[1-9][0-9]*$ ]] || { echo "plot_progress: -s: '$smooth', want a positive integer" >&2; exit 2; }
command -v gnuplot >/dev/null || {
  echo "plot_progress: gnuplot not found (apt-get install gnuplot-nox, or MOCOD_EXTRAS=1 scripts/install-deps.sh)" >&2
  exit 1
}
for f in "$@"; do
  [ -r "$f" ] || { echo "plot_progress: cannot read '$f'" >&2; exit 1; }
done
[ -n "$title" ] || title="mocod training: $(basename "$1")"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One table per log and event kind, "?" where a field is absent (gnuplot's missing-value mark).
# num(k): the number after "k": on this line, or "?" (null, strings and absent keys are all "?").
i=0
names=""
for f in "$@"; do
  i=$((i + 1))
  awk -v prog="$tmp/$i.prog" -v ev="$tmp/$i.eval" -v cnt="$tmp/$i.count" -v w="$smooth" '
    function num(k,   s) {
      if (!match($0, "\"" k "\"[ \t]*:[ \t]*-?[0-9][0-9.eE+-]*")) return "?"
      s = substr($0, RSTART, RLENGTH)
      sub(/^[^:]*:[ \t]*/, "", s)
      return s + 0
    }
    # running mean over the last w values of column c (w = 1: the value itself)
    function smooth(c, v,   j, t, n) {
      if (v == "?" || w == 1) return v
      hist[c, nh[c] % w] = v; nh[c]++
      n = nh[c] < w ? nh[c] : w
      for (j = 0; j < n; j++) t += hist[c, j]
      return t / n
    }
    /"event"[ \t]*:[ \t]*"progress"/ {
      s = num("step"); if (s == "?") next
      if (s > maxstep) maxstep = s
      split("loss inst_acc fn_rate hardness lr neg_sim", keys, " ")
      line = s
      for (c = 1; c <= 6; c++) {
        v = c != 5 ? smooth(c, num(keys[c])) : num(keys[c])  # the lr is exact: never smoothed
        if (v != "?") have[c < 6 ? c : 8]++
        line = line " " v
      }
      print line > prog; np++
    }
    /"event"[ \t]*:[ \t]*"eval"/ {
      s = num("step"); if (s == "?") next
      if (s > maxstep) maxstep = s
      k = num("knn_acc"); p = num("probe_acc")
      if (k != "?") have[6]++
      if (p != "?") have[7]++
      print s, k, p > ev; ne++
    }
    END {
      if (!np) print "0 ? ? ? ? ? ?" > prog
      if (!ne) print "0 ? ?" > ev
      # counts of loss inst_acc fn_rate hardness lr knn probe, the last step, count of neg_sim
      for (c = 1; c <= 7; c++) printf "%d ", have[c] + 0 > cnt
      print maxstep + 0, have[8] + 0 > cnt
    }' "$f"
  name=$(basename "$f"); name=${name%.jsonl}; name=${name%.json}; name=${name%.log}
  # run/experiments/hcl/seed-1/progress.jsonl -> hcl/seed-1: the directories name the run
  if [ "$name" = progress ] && [ "$(dirname "$f")" != . ]; then
    d=$(cd "$(dirname "$f")" && pwd)
    name="$(basename "$(dirname "$d")")/$(basename "$d")"
  fi
  names="$names ${name//[^A-Za-z0-9._\/-]/_}"
done
n=$i

# A panel is drawn where any log has that column; otherwise it says "no data" (gnuplot refuses to
# autoscale a plot without points).
have_col() { # column number in the .count file -> prints the total count over logs
  local t=0 k
  for ((k = 1; k <= n; k++)); do t=$((t + $(awk -v c="$1" '{print $c}' "$tmp/$k.count"))); done
  echo "$t"
}
panel() { # title ylabel file-kind column count-column key-position [extra plot clause] [single-log title]
  local ttl=$1 yl=$2 kind=$3 col=$4 cc=$5 pos=$6 extra=${7:-} one=${8:-}
  echo "set title '$ttl'; set ylabel '$yl'; set key $pos"
  # one log: no key, except where the panel has two kinds of line
  [ "$n" -gt 1 ] || [ -n "$extra" ] || echo "unset key"
  if [ "$(have_col "$cc")" -gt 0 ]; then
    local style="lines lw 1.5"
    [ "$kind" = eval ] && style="linespoints pt 7 ps 0.6 lw 1.5"
    echo "plot for [i=1:$n] sprintf('$tmp/%d.$kind', i) using 1:$col with $style lc i title (N > 1 ? word(names, i) : '$one')$extra"
  else
    echo "unset key; set label 1 'no data' at graph 0.5, 0.5 center; set yrange [0:1]; plot 1/0 notitle; unset label 1; set autoscale y"
  fi
}

maxstep=0
for ((k = 1; k <= n; k++)); do
  m=$(awk '{print $8}' "$tmp/$k.count"); [ "$m" -gt "$maxstep" ] && maxstep=$m
done
[ "$maxstep" -gt 0 ] || maxstep=1

negsim=""
if [ "$(have_col 9)" -gt 0 ]; then
  negsim=", for [i=1:$n] sprintf('$tmp/%d.prog', i) using 1:7 with lines dt 2 lw 1.5 lc i title (N > 1 ? word(names, i).' neg sim' : 'mean negative similarity')"
fi

probe=""
if [ "$(have_col 7)" -gt 0 ]; then
  probe=", for [i=1:$n] sprintf('$tmp/%d.eval', i) using 1:3 with linespoints dt 2 pt 6 ps 1.5 lw 1.5 lc i title (N > 1 ? word(names, i).' probe' : 'linear probe')"
fi

{
  cat <<EOF
set terminal pngcairo size 1400,1100 font 'DejaVu Sans,10'
set output '$out'
set datafile missing '?'
names = '${names# }'
N = $n
set multiplot layout 3,2 title '${title//\'/}' font ',13'
set grid lc rgb '#dddddd'
set key box opaque samplen 2 font ',9'
set xlabel 'step'
set xrange [0:$maxstep * 1.03]
set offsets 0, 0, graph 0.05, graph 0.05
set format y '%g'
EOF
  panel "contrastive loss" "loss" prog 2 1 "top right"
  panel "instance accuracy (positive ranked first)" "accuracy" prog 3 2 "bottom right"
  panel "kNN accuracy (periodic: eval.limit subset; last: full test set)" "accuracy" eval 2 6 "top left" "$probe" kNN
  panel "false-negative rate (share of negatives sharing the query class)" "rate" prog 4 3 "top left"
  panel "hardness (control value; dashed: mean similarity of negatives)" "hardness / cosine" prog 5 4 "top left" "$negsim" hardness
  panel "learning rate" "lr" prog 6 5 "top right"
  echo "unset multiplot"
} > "$tmp/plot.gp"

gnuplot "$tmp/plot.gp"
echo "plot_progress: wrote $out"
