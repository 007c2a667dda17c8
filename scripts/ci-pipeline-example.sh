#!/usr/bin/env bash
# A CI/CD step to run after a pipeline built and published a bundle: back up
# the plan that lists the bundle service as a `bundle` source, wait for the
# result, then run a restore drill of that backup. It fails the pipeline
# unless the backup is complete, contains the bundle, and restores.
#
# Usage: scripts/ci-pipeline-example.sh PLAN_FILE [BUNDLE_SOURCE_NAME]
#
# Environment: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE and OPA_BACKUP_TASK_QUEUE
# as for the CLI; OPA_BACKUP_BIN overrides the CLI (default: bin/opa-backup of
# this checkout). Secrets the plan references must be set where the worker
# runs; add --no-secret-check below when the pipeline does not have them.
#
# It relies on these exit codes of `opa-backup backup --wait --json`:
#   0    the backup is complete; stdout holds the result as JSON
#   1    the backup failed; stdout holds {"status": "failed", "error": ...}
#   2    invalid usage or an invalid plan; nothing was started
#   3    partial: some sources failed; stdout holds the result with "failures"
#   130  interrupted while waiting; the backup goes on in Temporal
# and these of `opa-backup drill --backup ID --json`:
#   0    every check passed; stdout holds the result with "checks"
#   1    the drill could not run; stdout holds {"outcome": "error", "error": ...}
#   6    the drill ran and at least one check failed; stdout names each
#   130  interrupted while waiting; the drill goes on in Temporal
# The drill runs on the worker, which needs opa (and git for Git sources) on PATH.
#
# This script exits with:
#   0    complete, holding a served bundle of BUNDLE_SOURCE_NAME when given, and the drill passed
#   1    the backup failed or is partial (the failures are printed)
#   2    invalid usage or an invalid plan
#   4    the backup is complete but does not hold the named bundle source
#   5    the drill could not run (its error is printed)
#   6    the drill ran and a check failed (the failed checks are printed)
#   130  interrupted
# On success it prints "backup_id=ID" on stdout for later steps.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 PLAN_FILE [BUNDLE_SOURCE_NAME]" >&2
  exit 2
fi
plan=$1
bundle_source=${2:-}
cli=${OPA_BACKUP_BIN:-"$(cd "$(dirname "$0")/.." && pwd)/bin/opa-backup"}

# Progress goes to stderr, the result JSON to stdout.
if result=$("$cli" backup --plan "$plan" --wait --json); then
  code=0
else
  code=$?
fi

# Prints one field of the result JSON, the failures or the failed drill checks, with Node (which the CLI needs anyway).
field() {
  RESULT_JSON=$result node -e '
    const result = JSON.parse(process.env.RESULT_JSON || "{}");
    const what = process.argv[1];
    if (what === "failures") {
      for (const failure of result.failures || []) console.log(`  ${failure.kind} source "${failure.source}" (${failure.type}): ${failure.message}`);
    } else if (what === "failed-checks") {
      for (const check of result.checks || []) if (check.outcome !== "passed") console.log(`  ${check.name} ${check.object}: ${check.message}`);
    } else if (what === "has-bundle") {
      const found = (result.artifacts || []).some((artifact) => artifact.kind === "bundle" && artifact.source === process.argv[2]);
      console.log(found ? "yes" : "no");
    } else {
      console.log(result[what] ?? "");
    }
  ' "$@"
}

case $code in
  0) ;;
  1)
    echo "ci: backup of $plan failed: $(field error)" >&2
    exit 1
    ;;
  2)
    echo "ci: invalid plan $plan or invalid usage; nothing was started" >&2
    exit 2
    ;;
  3)
    echo "ci: backup $(field backupId) of $plan is partial; these sources failed:" >&2
    field failures >&2
    exit 1
    ;;
  130)
    echo "ci: interrupted; the backup goes on in Temporal" >&2
    exit 130
    ;;
  *)
    echo "ci: opa-backup exited with unexpected code $code" >&2
    exit 1
    ;;
esac

backup_id=$(field backupId)
if [[ -n $bundle_source && $(field has-bundle "$bundle_source") != yes ]]; then
  echo "ci: backup $backup_id is complete but contains no served bundle of source \"$bundle_source\"" >&2
  exit 4
fi

echo "ci: backup $backup_id of $plan is complete; running a restore drill" >&2

# Restore drill of the backup just taken: the served bundle must load into a
# fresh OPA with its recorded revision, and every other source must restore.
if result=$("$cli" drill --plan "$plan" --backup "$backup_id" --json); then
  code=0
else
  code=$?
fi
case $code in
  0) ;;
  1)
    echo "ci: the restore drill of backup $backup_id could not run: $(field error)" >&2
    exit 5
    ;;
  2)
    echo "ci: invalid plan $plan or invalid usage of the drill; nothing was started" >&2
    exit 2
    ;;
  6)
    echo "ci: backup $backup_id does not restore; these drill checks failed:" >&2
    field failed-checks >&2
    echo "ci: the drill report is $(field reportKey) in $(field destination)" >&2
    exit 6
    ;;
  130)
    echo "ci: interrupted; the drill goes on in Temporal" >&2
    exit 130
    ;;
  *)
    echo "ci: opa-backup drill exited with unexpected code $code" >&2
    exit 5
    ;;
esac

echo "ci: backup $backup_id of $plan restores: the drill passed ($(field reportKey))" >&2
echo "backup_id=$backup_id"
