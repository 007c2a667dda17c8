#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing (scripts/setup.sh),
# builds, then runs every test file with Node's test runner. Each file
# starts the real servers it needs (Temporal dev server, OPA, SeaweedFS) on
# free loopback ports. Extra arguments go to `node --test`, such as
# --test-name-pattern=PATTERN.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/setup.sh
rm -rf .test-runs && mkdir -p .test-runs

mapfile -t files < <(find dist/test -maxdepth 1 -name '*.test.js' | sort)
[[ ${#files[@]} -gt 0 ]] || { echo "test: no compiled tests in dist/test" >&2; exit 1; }

# One file at a time: each starts its own servers, and two cores are
# shared with them. The spec report goes to the terminal, a TAP copy to a
# file for the closing summary line.
status=0
node --test --test-concurrency=1 \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination=.test-runs/results.tap \
  "$@" "${files[@]}" || status=$?

passed=$(grep -E '^# pass [0-9]+' .test-runs/results.tap | tail -n 1 | awk '{print $3}')
failed=$(grep -E '^# fail [0-9]+' .test-runs/results.tap | tail -n 1 | awk '{print $3}')
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$status"
