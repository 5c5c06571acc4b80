#!/usr/bin/env bash
# Runs every fuzz target under atheris for SECONDS each (default 60), starting
# from the checked-in seeds. A crash leaves its input in the work folder and
# fails the run; copy the input to fuzz/regressions/TARGET/ once fixed. The seed is
# fixed (MESHCA_FUZZ_SEED, default 1) so a CI run repeats what ran before it landed;
# set another to explore.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
work="$(mktemp -d "${TMPDIR:-/tmp}/meshca-fuzz.XXXXXX")"
python3 -m pip install -q --disable-pip-version-check 'atheris>=2.3'
targets=$(python3 -c 'import sys; sys.path.insert(0, "fuzz"); import targets; print(" ".join(targets.TARGETS))')
failed=()
for target in $targets; do
  mkdir -p "$work/$target"
  if python3 fuzz/run.py "$target" -max_total_time="$seconds" -seed="${MESHCA_FUZZ_SEED:-1}" -print_final_stats=1 \
      -artifact_prefix="$work/$target-" "$work/$target" "fuzz/corpus/$target" >"$work/$target.log" 2>&1; then
    echo "fuzz $target: $(grep -o 'Done [0-9]* runs' "$work/$target.log" || echo done) in ${seconds}s, no finding"
  else
    echo "fuzz $target: FINDING (log $work/$target.log)" >&2
    grep -A30 'Uncaught Python exception' "$work/$target.log" | head -40 >&2 || tail -20 "$work/$target.log" >&2
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]}; inputs in $work" >&2
  exit 1
fi
rm -rf "$work"
