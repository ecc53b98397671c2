#!/usr/bin/env bash
# Instructions per call on the `solo` workload, per contender, counted by callgrind: a measure
# that does not move with the machine's load, unlike the wall times. Writes
# target/criterion/tower-coalesce-callgrind.json, which `examples/bench_report.rs` picks up.
#
#   bash benches/callgrind_solo.sh        (needs valgrind; about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
out=$(cargo bench --no-run --bench overhead 2>&1) || { echo "$out"; exit 1; }
bin=$(echo "$out" | grep -o 'target/release/deps/overhead-[0-9a-f]*' | tail -1)
bin="$target/${bin#target/}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

json="{"
sep=""
for c in bare tower-coalesce tower-coalesce-group tower-resilience-coalesce \
         singleflight-async async_singleflight blog-mutex-shared; do
  # --profile-time: criterion runs the routine for that long, without analysis.
  CARGO_TARGET_DIR="$target" valgrind --tool=callgrind --callgrind-out-file="$work/$c.cg" \
    "$bin" --bench --profile-time 1 "^solo/$c\$" >"$work/$c.out" 2>&1
  calls=$(grep -E "backend calls +solo +$c " "$work/$c.out" | sed -E 's/.*, ([0-9]+) waves\)/\1/')
  # Inclusive cost of the bench's request loop (the task that makes the sequential calls).
  instr=$(callgrind_annotate --inclusive=yes "$work/$c.cg" 2>/dev/null \
    | grep -F 'Solo as overhead::support::Visit<K>>::visit::{{closure}}::{{closure}}::{{closure}}::{{closure}}' \
    | head -1 | awk '{gsub(",", "", $1); print $1}')
  per=$(awk -v i="$instr" -v n="$calls" 'BEGIN { printf "%.0f", i / n }')
  echo "$c: $per instructions per call ($calls calls)"
  json="$json$sep\"$c\": {\"instructions_per_call\": $per, \"calls\": $calls}"
  sep=", "
done
json="$json}"
mkdir -p "$target/criterion"
echo "{\"solo\": $json}" >"$target/criterion/tower-coalesce-callgrind.json"
echo "wrote $target/criterion/tower-coalesce-callgrind.json"
