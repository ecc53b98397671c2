#!/usr/bin/env bash
# Instruction counts by callgrind, a measure that does not move with the machine's load
# (unlike wall times), per contender:
#   - solo: instructions per call (the whole request: registry, flight, backend call);
#   - fanout/1000, join: instructions per waiter to join one key's flight (make the request,
#     box it, poll it once: `fanout_join`);
#   - fanout/1000, publish: instructions per waiter to publish one answer to 1,000 followers
#     and have each take its copy (the timed part of the fanout bench, `fanout_timed`).
# Writes target/criterion/tower-coalesce-callgrind.json, which `examples/bench_report.rs`
# picks up.
#
#   bash benches/callgrind.sh        (needs valgrind; a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
out=$(cargo bench --no-run --bench overhead 2>&1) || { echo "$out"; exit 1; }
bin=$(echo "$out" | grep -o 'target/release/deps/overhead-[0-9a-f]*' | tail -1)
bin="$target/${bin#target/}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Profiling runs write nothing for the report; keep criterion's own files out of target too.
export CARGO_TARGET_DIR="$work"

contenders="bare tower-coalesce tower-coalesce-group tower-resilience-coalesce
            singleflight-async async_singleflight blog-mutex-shared"
followers=1000

# Calls of function $2 (a callgrind name fragment) recorded in profile $1.
calls_of() {
  local id
  id=$(grep -oE "fn=\([0-9]+\) [^ ]*$2" "$1" | head -1 | grep -oE '^fn=\([0-9]+\)' | sed 's/fn=//')
  grep -A1 -F "cfn=$id" "$1" | grep -oE '^calls=[0-9]+' | cut -d= -f2 | paste -sd+ | bc
}

solo="" fanout="" sep=""
# Calls made and instructions spent in the bench's request loop (the task that makes the
# sequential calls, inclusive) by a solo run of contender $1 lasting $2 seconds.
solo_run() {
  # --profile-time: criterion runs the routine for that long, without analysis.
  valgrind --tool=callgrind --callgrind-out-file="$work/$1.solo$2" \
    "$bin" --bench --profile-time "$2" "^solo/$1\$" >"$work/$1.solo$2.out" 2>&1
  local calls instr
  calls=$(grep -E "backend calls +solo +$1 " "$work/$1.solo$2.out" | sed -E 's/.*, ([0-9]+) waves\)/\1/')
  instr=$(callgrind_annotate --inclusive=yes "$work/$1.solo$2" 2>/dev/null \
    | grep -F 'Solo as overhead::support::Visit<K>>::visit::{{closure}}::{{closure}}::{{closure}}::{{closure}}' \
    | head -1 | awk '{gsub(",", "", $1); print $1}')
  echo "$calls $instr"
}

for c in $contenders; do
  # Two runs of different lengths; the difference of their counts over the difference of
  # their calls is the cost of one call, without the loop's fixed costs (set-up, first-call
  # allocations), which would otherwise weigh on whichever contender ran fewer iterations.
  read -r calls1 instr1 < <(solo_run "$c" 1)
  read -r calls2 instr2 < <(solo_run "$c" 3)
  calls=$calls2
  per_call=$(awk -v a="$instr1" -v b="$instr2" -v m="$calls1" -v n="$calls2" \
    'BEGIN { printf "%.0f", (b - a) / (n - m) }')
  entry="\"$c\": {\"instructions_per_call\": $per_call, \"calls\": $calls}"
  solo="$solo$sep$entry"
  echo "solo     $c: $per_call instructions per call ($calls calls)"

  if [ "$c" != bare ]; then
    valgrind --tool=callgrind --callgrind-out-file="$work/$c.fanout" \
      "$bin" --bench --profile-time 1 "^fanout/$c/$followers\$" >/dev/null 2>&1
    inclusive=$(callgrind_annotate --inclusive=yes "$work/$c.fanout" 2>/dev/null)
    timed=$(echo "$inclusive" | grep -F 'overhead::support::fanout_timed' | head -1 \
      | awk '{gsub(",", "", $1); print $1}')
    joined=$(echo "$inclusive" | grep -F 'overhead::support::fanout_join' | head -1 \
      | awk '{gsub(",", "", $1); print $1}')
    waves=$(calls_of "$work/$c.fanout" 'overhead::support::fanout_timed')
    per() { awk -v i="$1" -v w="$waves" -v n="$followers" 'BEGIN { printf "%.0f", i / (w * (n + 1)) }'; }
    join=$(per "$joined") publish=$(per "$timed")
    fanout="$fanout$sep\"$c\": {\"join_instructions_per_waiter\": $join, \"instructions_per_waiter\": $publish, \"waves\": $waves}"
    echo "fanout   $c: join $join, publish $publish instructions per waiter ($waves waves of $followers followers)"
  fi
  sep=", "
done
fanout="${fanout#, }"
dest="${target}/criterion"
mkdir -p "$dest"
echo "{\"solo\": {$solo}, \"fanout\": {\"followers\": $followers, $fanout}}" \
  >"$dest/tower-coalesce-callgrind.json"
echo "wrote $dest/tower-coalesce-callgrind.json"
