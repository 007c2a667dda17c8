// `opa-backup retention`: runs retentionWorkflow for a plan and prints, for
// each destination, what it deleted (or, with --dry-run, would delete) and
// why each kept backup is kept. It exits 1 when a destination failed. A real run uses the plan's fixed retention workflow id, so it fails
// while another retention run of the plan is running; a dry run deletes
// nothing and gets an id of its own.
import { randomBytes } from 'node:crypto';
import type { Command } from 'commander';
import { WorkflowExecutionAlreadyStartedError, WorkflowFailedError } from '@temporalio/client';
import { planWorkflowId } from '../common/plan';
import type { DestinationRetention, RetentionRunReport } from '../activities/retention';
import { CommandError, EXIT_BUSY, runCommand, warnWithoutWorker, withClient } from './schedules';
import { loadPlanFile, PlanError } from '../activities/plan-loader';

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

/** Returns the message of the innermost cause: for a failed workflow, the activity's own error. */
function rootMessage(error: unknown): string {
  let current = error as { message?: string; cause?: unknown } | undefined;
  while (current && current.cause && typeof current.cause === 'object') current = current.cause as { message?: string; cause?: unknown };
  return current?.message ?? String(error);
}

/** Prints a report as lines for people: the drills, then each destination. */
export function printRetentionReport(report: RetentionRunReport, print: (line: string) => void = console.log): void {
  print(`retention of plan ${report.plan} (periods in ${report.timeZone}, decided at ${report.decidedAt})`);
  for (const drill of report.unresolvedDrills) print(`  running drill ${drill.workflowId} did not name its backup: ${drill.reason}`);
  for (const destination of report.destinations) printDestination(destination, report.dryRun, print);
}

function printDestination(report: DestinationRetention, dryRun: boolean, print: (line: string) => void): void {
  const verb = dryRun ? 'would delete' : 'deleted';
  print(`${report.name}: ${report.destination}`);
  for (const id of report.deleted) print(`  ${verb.padEnd(12)} ${id}  not kept by any rule`);
  for (const kept of report.kept) print(`  ${'keep'.padEnd(12)} ${kept.id}  ${kept.reasons.join(', ')}`);
  for (const entry of report.unreadable) print(`  unreadable manifest, kept: ${entry.error}`);
  for (const id of report.future) print(`  dated in the future, kept: ${id}; check the clock of the worker that wrote it`);
  for (const entry of report.missingReferences) {
    print(`  backup ${entry.by} stores artifacts in ${entry.id}, which does not exist: a restore of ${entry.by} will fail`);
  }
  const leftoverVerb = dryRun ? 'would remove' : 'removed';
  for (const leftover of report.leftovers) {
    const objects = leftover.objects === 1 ? '1 object' : `${leftover.objects} objects`;
    print(`  ${leftoverVerb} ${leftover.id}: no manifest.json, ${objects}, last written ${leftover.lastModified}`);
  }
  for (const id of report.uncommittedRecent ?? []) {
    print(`  not yet a leftover: ${id} has no manifest.json but is younger than leftoverGrace; a running backup, or removed by a later run`);
  }
  const uploadVerb = dryRun ? 'would abort' : 'aborted';
  for (const upload of report.staleUploads) {
    print(`  ${uploadVerb} unfinished upload of ${upload.key} (started ${upload.initiated ?? 'at an unknown time'})`);
  }
  if (report.state !== 'failed' || report.backups > 0) {
    print(`  ${report.backups} backups: ${report.kept.length} kept, ${report.deleted.length} ${verb}`);
  }
  if (report.deferred) {
    print(`  ${report.deferred} newer backups that no rule keeps are left for the next run, which deletes the oldest first`);
  }
  if (report.state === 'failed') {
    print(`  FAILED: ${report.error}; the next run tries this destination again`);
  }
}

async function retentionCommand(options: { plan: string; dryRun?: boolean; json?: boolean }): Promise<number> {
  let plan;
  try {
    plan = loadPlanFile(options.plan);
  } catch (error) {
    if (error instanceof PlanError) throw new CommandError(`invalid plan:\n${error.message}`, EXIT_USAGE);
    throw error;
  }
  const dryRun = options.dryRun ?? false;
  const workflowId = dryRun
    ? `${planWorkflowId(plan.name, 'retention')}-dry-run-${randomBytes(4).toString('hex')}`
    : planWorkflowId(plan.name, 'retention');
  const report = await withClient(async (client, taskQueue) => {
    let handle;
    try {
      handle = await client.workflow.start('retentionWorkflow', { taskQueue, workflowId, args: [{ plan, dryRun }] });
    } catch (error) {
      if (error instanceof WorkflowExecutionAlreadyStartedError) {
        throw new CommandError(
          `a retention run of plan ${plan.name} is already running as workflow ${workflowId}; ` +
            `wait for it (temporal workflow show --workflow-id ${workflowId}) and try again`,
          EXIT_BUSY,
        );
      }
      throw error;
    }
    await warnWithoutWorker(client, taskQueue);
    try {
      return (await handle.result()) as RetentionRunReport;
    } catch (error) {
      const cause = error instanceof WorkflowFailedError ? rootMessage(error) : (error as Error).message;
      throw new CommandError(`retention of plan ${plan.name} failed: ${cause}`, EXIT_FAILED);
    }
  });
  if (options.json) console.log(JSON.stringify(report, null, 2));
  else printRetentionReport(report);
  const failed = report.destinations.filter((destination) => destination.state === 'failed');
  if (failed.length > 0) {
    const names = failed.map((destination) => destination.name).join(', ');
    console.error(`opa-backup: retention of plan ${plan.name} failed in destination ${names}; see the report above`);
    return EXIT_FAILED;
  }
  return EXIT_OK;
}

/** Adds `retention --plan FILE [--dry-run] [--json]` to the program. */
export function addRetentionCommand(program: Command): void {
  program
    .command('retention')
    .description("delete the plan's backups that its retention rules do not keep, with the reason for each kept backup")
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--dry-run', 'decide and print, but delete nothing')
    .option('--json', 'print the report as JSON')
    .action(async (options) => {
      process.exitCode = await runCommand(() => retentionCommand(options));
    });
}
