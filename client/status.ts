// `opa-backup status`: runs healthWorkflow and prints each check, or runs
// the same checks in this process with --local or when Temporal cannot be
// reached. Exit codes:
//   0  no check is stale or failed; unknown checks are printed but do not fail
//   1  the checks could not run
//   2  invalid usage or plan
//   6  at least one check is stale
//   7  none is stale, but at least one could not read a destination or an OPA
import { randomBytes } from 'node:crypto';
import type { Command } from 'commander';
import { Connection, Client, WorkflowFailedError } from '@temporalio/client';
import { formatAge, runHealthChecks, type HealthCheck, type HealthReport } from '../activities/health';
import { loadPlanFile, PlanError } from '../activities/plan-loader';
import { temporalSettings } from '../common/config';
import type { Plan } from '../common/plan';

/** No check is stale. */
export const EXIT_STATUS_OK = 0;
/** The checks could not run: the workflow failed or timed out. */
export const EXIT_STATUS_ERROR = 1;
/** Invalid usage or an invalid plan. */
export const EXIT_STATUS_USAGE = 2;
/** At least one check is stale; the output names each. */
export const EXIT_STALE = 6;
/** No check is stale, but at least one could not read a destination or an OPA; the output names each. */
export const EXIT_CHECK_FAILED = 7;

/** Time healthWorkflow gets before the CLI gives up, such as when no worker polls the task queue. */
const WORKFLOW_TIMEOUT = '2m';

interface StatusOptions {
  plan: string;
  json?: boolean;
  local?: boolean;
}

function rootMessage(error: unknown): string {
  let current = error as { message?: string; cause?: unknown } | undefined;
  while (current?.cause && typeof current.cause === 'object') current = current.cause as { message?: string; cause?: unknown };
  return current?.message ?? String(error);
}

/** Runs healthWorkflow; returns undefined when Temporal cannot be reached, so the caller can check locally. */
async function runWorkflow(plan: Plan): Promise<HealthReport | undefined> {
  const settings = temporalSettings();
  let connection: Connection;
  try {
    connection = await Connection.connect({ address: settings.address, connectTimeout: '5s' });
  } catch (error) {
    console.error(`opa-backup: cannot connect to Temporal at ${settings.address} (${(error as Error).message}); running the checks here`);
    return undefined;
  }
  try {
    const client = new Client({ connection, namespace: settings.namespace });
    return await client.workflow.execute('healthWorkflow', {
      taskQueue: settings.taskQueue,
      workflowId: `opa-backup/${plan.name}/health-${randomBytes(4).toString('hex')}`,
      workflowExecutionTimeout: WORKFLOW_TIMEOUT,
      args: [{ plan }],
    });
  } finally {
    await connection.close();
  }
}

function cell(value: string, width: number): string {
  return value.length >= width ? `${value} ` : value.padEnd(width);
}

/** Formats the report as a table: one line per check, then the stale ones. */
export function formatReport(report: HealthReport): string[] {
  const lines = [`plan ${report.plan}, checked ${report.checkedAt} ${report.ranBy === 'temporal' ? 'by healthWorkflow' : 'locally'}`];
  const rows = report.checks.map((check: HealthCheck) => [
    check.name,
    check.state === 'ok' ? 'ok' : check.state.toUpperCase(),
    check.time ?? '-',
    check.ageSeconds === undefined ? '-' : formatAge(check.ageSeconds),
    check.limit ?? '-',
    check.revision ?? '-',
    check.reason,
  ]);
  const header = ['CHECK', 'STATE', 'TIME', 'AGE', 'LIMIT', 'REVISION', 'DETAILS'];
  const widths = header.map((title, column) =>
    column === header.length - 1 ? 0 : Math.max(title.length, ...rows.map((row) => row[column].length)) + 2,
  );
  for (const row of [header, ...rows]) lines.push(row.map((value, column) => (widths[column] ? cell(value, widths[column]) : value)).join('').trimEnd());
  if (report.stale.length > 0) lines.push(`stale: ${report.stale.join(', ')}`);
  if ((report.failed ?? []).length > 0) lines.push(`failed: ${report.failed!.join(', ')}`);
  return lines;
}

async function statusCommand(options: StatusOptions): Promise<number> {
  let plan: Plan;
  try {
    plan = loadPlanFile(options.plan);
  } catch (error) {
    if (error instanceof PlanError) {
      console.error(`opa-backup: invalid plan:\n${error.message}`);
      return EXIT_STATUS_USAGE;
    }
    throw error;
  }
  let report: HealthReport | undefined;
  try {
    report = options.local ? undefined : await runWorkflow(plan);
  } catch (error) {
    const detail = error instanceof WorkflowFailedError ? rootMessage(error) : (error as Error).message;
    console.error(`opa-backup: healthWorkflow of plan ${plan.name} failed: ${detail}; is a worker polling task queue ${temporalSettings().taskQueue}? Try --local`);
    return EXIT_STATUS_ERROR;
  }
  report ??= await runHealthChecks(plan);
  if (options.json) console.log(JSON.stringify(report, null, 2));
  else for (const line of formatReport(report)) console.log(line);
  if (report.stale.length > 0) return EXIT_STALE;
  return (report.failed ?? []).length > 0 ? EXIT_CHECK_FAILED : EXIT_STATUS_OK;
}

export function addStatusCommand(program: Command): void {
  program
    .command('status')
    .description("check the ages of a plan's newest backup, passed drill and OPA bundles against its health limits")
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--json', 'print the report as JSON')
    .option('--local', 'run the checks in this process instead of through Temporal')
    .action(async (options: StatusOptions) => {
      process.exitCode = await statusCommand(options);
    });
}
