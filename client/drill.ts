// `opa-backup drill`: starts a restore drill of one backup, prints each check
// as it runs, and exits 0 only when every check passed.
import { randomBytes } from 'node:crypto';
import { Command, Option } from 'commander';
import { Connection, Client, WorkflowFailedError, type WorkflowHandle } from '@temporalio/client';
import { loadPlanFile, PlanError } from '../activities/plan-loader';
import type { DrillProgress, DrillWorkflowResult } from '../activities/drill/types';
import { temporalSettings } from '../common/config';
import { isBackupId } from '../common/layout';
import type { Plan } from '../common/plan';
import { warnWithoutWorker } from './schedules';

/** Every check passed. */
export const EXIT_DRILL_PASSED = 0;
/** The drill could not run: no such backup, Temporal unreachable, or the workflow failed. */
export const EXIT_DRILL_ERROR = 1;
/** Invalid usage or an invalid plan; nothing was started. */
export const EXIT_DRILL_USAGE = 2;
/** The drill ran and at least one check failed; the output and the report name each. */
export const EXIT_DRILL_FAILED = 6;
/** Interrupted (Ctrl-C) while waiting; the drill goes on in Temporal. */
export const EXIT_DRILL_INTERRUPTED = 130;

interface DrillOptions {
  plan: string;
  backup: string;
  withinDays?: string;
  json?: boolean;
  secretCheck: boolean;
}

function fail(message: string, code: number): number {
  console.error(`opa-backup: ${message}`);
  return code;
}

function rootMessage(error: unknown): string {
  let current = error as { message?: string; cause?: unknown } | undefined;
  while (current?.cause && typeof current.cause === 'object') current = current.cause as { message?: string; cause?: unknown };
  return current?.message ?? String(error);
}

/** Prints each check when its state changes, until the workflow closes. */
async function followChecks(handle: WorkflowHandle, print: (line: string) => void): Promise<void> {
  const seen = new Map<string, string>();
  let announced = false;
  for (;;) {
    const description = await handle.describe();
    try {
      const progress = await handle.query<DrillProgress>('progress');
      if (!announced && progress.backupId) {
        announced = true;
        print(`drilling backup ${progress.backupId} of plan ${progress.plan}`);
      }
      for (const check of progress.checks) {
        const label = `${check.name} ${check.object}`;
        const line = check.state === 'passed' || check.state === 'failed' ? `${check.state}: ${check.message ?? ''}` : check.state;
        if (seen.get(label) !== line) {
          seen.set(label, line);
          print(`  ${label}: ${line}`);
        }
      }
    } catch {
      // The query fails until the workflow's first task ran; try again on the next round.
    }
    if (description.status.name !== 'RUNNING') return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function drillCommand(options: DrillOptions): Promise<number> {
  let plan: Plan;
  try {
    plan = loadPlanFile(options.plan, { checkReferences: options.secretCheck });
  } catch (error) {
    if (error instanceof PlanError) return fail(`invalid plan:\n${error.message}`, EXIT_DRILL_USAGE);
    throw error;
  }
  let randomWithinDays: number | undefined;
  if (options.backup !== 'latest' && options.backup !== 'random' && !isBackupId(options.backup)) {
    return fail(
      `invalid --backup "${options.backup}": expected a backup id such as 20261204T194512Z-3f9a1c2b, "latest" or "random"; run "opa-backup list --plan ${options.plan}" for the ids`,
      EXIT_DRILL_USAGE,
    );
  }
  if (options.withinDays !== undefined) {
    randomWithinDays = Number(options.withinDays);
    if (!Number.isInteger(randomWithinDays) || randomWithinDays < 1) {
      return fail(`invalid --within-days "${options.withinDays}": expected a whole number of days, 1 or more`, EXIT_DRILL_USAGE);
    }
    if (options.backup !== 'random') return fail('--within-days applies only with --backup random', EXIT_DRILL_USAGE);
  }

  const settings = temporalSettings();
  let connection: Connection;
  try {
    connection = await Connection.connect({ address: settings.address, connectTimeout: '5s' });
  } catch (error) {
    return fail(`cannot connect to Temporal at ${settings.address}: ${(error as Error).message}; start a server or set TEMPORAL_ADDRESS`, EXIT_DRILL_ERROR);
  }
  const print = options.json ? (line: string) => process.stderr.write(`${line}\n`) : (line: string) => console.log(line);
  try {
    const client = new Client({ connection, namespace: settings.namespace });
    const workflowId = `drill-${plan.name}-${new Date().toISOString().replace(/[-:.]/g, '')}-${randomBytes(3).toString('hex')}`;
    const handle = await client.workflow.start('restoreDrillWorkflow', {
      taskQueue: settings.taskQueue,
      workflowId,
      args: [{ plan, backup: options.backup, randomWithinDays }],
    });
    print(`restore drill of plan ${plan.name} running as workflow ${workflowId}`);
    await warnWithoutWorker(client, settings.taskQueue);
    // Ctrl-C stops the CLI, not the drill: the workflow runs on and cleans up after itself.
    process.once('SIGINT', () => {
      process.stderr.write(
        `\nopa-backup: interrupted; the drill goes on as workflow ${workflowId}. ` +
          `Stop it with: temporal workflow cancel --workflow-id ${workflowId}\n`,
      );
      process.exit(EXIT_DRILL_INTERRUPTED);
    });
    await followChecks(handle, print);
    let result: DrillWorkflowResult;
    try {
      result = await handle.result();
    } catch (error) {
      const cause = error instanceof WorkflowFailedError ? rootMessage(error) : (error as Error).message;
      if (options.json) console.log(JSON.stringify({ workflowId, outcome: 'error', error: cause }));
      return fail(`drill failed to run: ${cause}`, EXIT_DRILL_ERROR);
    }
    if (options.json) {
      console.log(JSON.stringify(result, null, 2));
    } else {
      const failed = result.checks.filter((check) => check.outcome === 'failed');
      print(`drill of backup ${result.backupId}: ${result.outcome}, ${result.checks.length - failed.length} of ${result.checks.length} checks passed`);
      if (result.rtoSeconds !== undefined) print(`  restore time (from drill start to the last restore verified): ${result.rtoSeconds.toFixed(1)} s`);
      for (const check of failed) print(`  FAILED ${check.name} ${check.object}: ${check.message}`);
      print(`  report ${result.reportKey} in ${result.destination}`);
    }
    return result.outcome === 'passed' ? EXIT_DRILL_PASSED : EXIT_DRILL_FAILED;
  } finally {
    await connection.close();
  }
}

/** Adds the `drill` command to the program. */
export function addDrillCommand(program: Command): void {
  program
    .command('drill')
    .description('restore a backup into ephemeral servers and check it against its manifest')
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--backup <id>', 'backup id, "latest" (newest backup) or "random" (a random backup of the last --within-days days)', 'latest')
    .option('--within-days <days>', 'with --backup random: how many days back to choose from (default 7)')
    .option('--json', 'print the result as JSON on stdout (progress goes to stderr)')
    .addOption(new Option('--no-secret-check', 'skip checking that secret references resolve here (for workers with another environment)'))
    .action(async (options: DrillOptions) => {
      try {
        process.exitCode = await drillCommand(options);
      } catch (error) {
        process.exitCode = fail(`${(error as Error).name ?? 'Error'}: ${rootMessage(error)}`, EXIT_DRILL_ERROR);
      }
    });
}
